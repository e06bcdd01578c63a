"""Train the UNet on Carvana car masks.

python train.py                               # the demo, on generated cars, when data/ is empty
python train.py --DATA_DIR=path/to/photos     # your own folder (README: Data layouts)

The settings are the constants at the top of train.py: edit them there, or override any of them as
--NAME=value (python train.py --NUM_EPOCHS=10 --AMP=false).
"""
import csv
import difflib
import functools
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import dataset as data
import synthetic
from files import make_run_folder, not_a_folder, replacing, write_text
from model import UNet
from utils import (
    CheckpointError,
    WeightAverage,
    WorstImages,
    all_finite,
    autocast,
    autocast_dtype,
    check_accuracy,
    clean_state_dict,
    get_device,
    link_checkpoint,
    load_checkpoint,
    recompute_batchnorm,
    save_checkpoint,
    save_predictions_as_imgs,
    save_training_curves,
    seed_everything,
    segmentation_loss,
    to_model_input,
)

# ---- settings ---------------------------------------------------------------------------------
DATA_DIR = "data"                 # train/ + train_masks/ (Carvana), train_images/ ... val_masks/, images/ + masks/ or imgs/ + masks/
CHECKPOINT_DIR = "checkpoints"    # last.pt every epoch, best.pt on a new best Dice; on Colab a Drive folder
IMAGE_HEIGHT = 160                # pixels the model sees; Carvana's photos are 1280 high
IMAGE_WIDTH = 240                 # pixels the model sees; Carvana's photos are 1918 wide
BATCH_SIZE = 8                    # images per optimizer step (README: Training recipe)
NUM_EPOCHS = 5                    # passes over the training images (a resume keeps the run's own unless given)
LEARNING_RATE = 3e-4              # Adam's rate at step 0 of the cosine decay to 1% of it over the run
WARMUP = 0.1                      # share of the run's steps over which a linear rise scales the rate up (0 <= x < 1)
HEAD_LR_FACTOR = 10.0             # the 1x1 output layer's rate as a multiple of LEARNING_RATE (>= 1; README: Training recipe)
LOSS = "lovasz"                   # BCE plus "lovasz" (Lovasz hinge) or "dice" (soft Dice) (README: Training recipe)
NUM_WORKERS = "auto"              # loader processes: "auto" (none on a CPU once the cache is built, enough to feed a GPU), or 0, 1, 2, ...
PIN_MEMORY = True                 # page-locked batches: faster copies to a CUDA GPU (ignored elsewhere)
LOAD_MODEL = False                # True: resume from CHECKPOINT_DIR/last.pt (model, optimizer, epoch, best Dice)
DEVICE = "auto"                   # "auto" (cuda, then mps, then cpu), or "cuda", "cuda:1", "mps", "cpu"
AMP = True                        # mixed precision: bfloat16/float16 on CUDA, bfloat16 on CPUs that support it
AMP_DTYPE = "auto"                # "auto" (as above), "float16" (with loss scaling, as on a T4) or "bfloat16"
SEED = 42                         # one seed for Python, NumPy, torch, augmentations and the validation split
VAL_FRACTION = 0.2                # share of cars held out for validation when there is no val_images/ folder
FEATURES = (64, 128, 256, 512)    # UNet channels per level; the bottleneck has twice the last (about 31M parameters)
THRESHOLD = 0.5                   # probability above which a pixel counts as car, between 0 and 1
EMA_DECAY = 0.99                  # validate and save an average of the weights (0 <= decay < 1; 0: the weights as trained)
BATCHNORM_IMAGES = 256            # training images (unaugmented) that BatchNorm's statistics are recomputed on before each validation (0: off)
SAVED_IMAGES = "saved_images"     # pictures of a run go to SAVED_IMAGES/<CHECKPOINT_DIR's name>/ (curves, predictions)
DEMO = True                       # DATA_DIR left at "data" and no data there: generate synthetic cars, train with DEMO_SETTINGS
CHANNELS_LAST = True              # NHWC memory format: faster convolutions with oneDNN and cuDNN tensor cores
CACHE_DIR = "cache"               # decoded, resized uint8 copies of the data, made once (local disk); "" decodes every epoch
COMPILE = False                   # torch.compile the model in place: faster steps after a slow first one
SYNC_BATCHNORM = False            # under torchrun: BatchNorm statistics over all processes' batches (CUDA)
# -----------------------------------------------------------------------------------------------
SETTING_NAMES = [name for name in globals() if name.isupper()]

# Sized so that a bare `python train.py` on a 2-core CPU finishes in a few minutes, bfloat16 or not:
# widths 16..128 took 9 min 50 s on a float32-only (AVX2) CPU for +0.005 Dice (README: What the demo reaches).
DEMO_SETTINGS = {"FEATURES": (8, 16, 32, 64), "LEARNING_RATE": 2e-3, "BATCH_SIZE": 16, "NUM_EPOCHS": 12}
DEMO_DATA = {"cars": 24, "size": (480, 320), "seed": 0}  # 384 images at a quarter of Carvana's size
DEMO_DATA_DIR = "data"  # DATA_DIR's default: the one folder where finding no data starts the demo
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def defaults():
    return {name: globals()[name] for name in SETTING_NAMES}


def setting_meanings():
    """{name: its comment} from the settings block at the top of this file, the one place they are written."""
    block = Path(__file__).read_text().split("# ---- settings")[1].split("\n# ----")[0]
    found = (re.match(r"([A-Z_]+) = .*?  # (.*)", line) for line in block.splitlines())
    return {match[1]: match[2].strip() for match in found if match}


def convert(name, text, default):
    """A command-line value in the type of the setting's default, or SystemExit saying why."""
    kind = type(default)
    if name == "NUM_WORKERS":  # "auto" or a count
        kind = str if text == "auto" else int
    try:
        if kind is bool:
            if text.lower() not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError
            return text.lower() in TRUE_WORDS
        if kind is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number",
                  tuple: "comma-separated integers"}.get(kind, "a value")
        raise SystemExit(f"error: --{name} expects {wanted}, got {text!r}") from None


def parse_settings(argv):
    """Settings from the defaults above and --NAME=value arguments; returns (config, names given)."""
    config, given = defaults(), set()
    for argument in argv:
        if argument in ("-h", "--help"):
            print(__doc__)
            meanings = setting_meanings()
            width = max(len(f"--{name}={shown(value)}") for name, value in config.items())
            for name, value in config.items():
                print(f"  {f'--{name}={shown(value)}':<{width}}  {meanings.get(name, '')}")
            raise SystemExit(0)
        name, equals, text = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise SystemExit(f"error: expected --NAME=value, got {argument!r}")
        if name not in config:
            close = difflib.get_close_matches(name.upper(), config, n=1)
            hint = f"did you mean --{close[0]}?" if close else "python train.py --help lists them"
            raise SystemExit(f"error: unknown setting --{name}; {hint}")
        config[name] = convert(name, text, config[name])
        given.add(name)
    check_settings(config)
    return config, given


def check_settings(config):
    """Every value in range before anything runs: SystemExit with one line naming the setting."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    for name in ("IMAGE_HEIGHT", "IMAGE_WIDTH", "BATCH_SIZE", "NUM_EPOCHS"):
        if config[name] < 1:
            fail(f"{name} must be at least 1, got {config[name]}")
    if config["BATCHNORM_IMAGES"] < 0:
        fail(f"BATCHNORM_IMAGES must be 0 or more, got {config['BATCHNORM_IMAGES']}")
    for name in ("VAL_FRACTION", "THRESHOLD"):
        if not 0 < config[name] < 1:
            fail(f"{name} must be between 0 and 1, got {config[name]}")
    if not 0 <= config["WARMUP"] < 1:
        fail(f"WARMUP must be at least 0 and below 1, got {config['WARMUP']}")
    if not 0 <= config["EMA_DECAY"] < 1:
        fail(f"EMA_DECAY must be at least 0 and below 1, got {config['EMA_DECAY']}")
    if not config["LEARNING_RATE"] > 0 or not math.isfinite(config["LEARNING_RATE"]):
        fail(f"LEARNING_RATE must be a positive number, got {config['LEARNING_RATE']}")
    if not 1 <= config["HEAD_LR_FACTOR"] < math.inf:
        fail(f"HEAD_LR_FACTOR must be a number of at least 1, got {config['HEAD_LR_FACTOR']}")
    if not 0 <= config["SEED"] < 2**32:
        fail(f"SEED must be between 0 and 2**32 - 1, got {config['SEED']}")
    workers = config["NUM_WORKERS"]
    if workers != "auto" and (not isinstance(workers, int) or workers < 0):
        fail(f"NUM_WORKERS must be auto or a count of 0 or more, got {workers!r}")
    if not config["FEATURES"] or min(config["FEATURES"]) < 1:
        fail(f"FEATURES must be one or more positive channel counts such as 64,128,256,512, got {config['FEATURES']}")
    smallest = 2 ** len(config["FEATURES"])
    if min(config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]) < smallest:
        fail(f"IMAGE_HEIGHT and IMAGE_WIDTH must be at least {smallest} for a {len(config['FEATURES'])}-level UNet, "
             f"got {config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']}")
    if config["LOSS"] not in ("lovasz", "dice"):
        fail(f"LOSS must be lovasz or dice, got {config['LOSS']!r}")
    if config["AMP_DTYPE"] not in ("auto", "float16", "bfloat16"):
        fail(f"AMP_DTYPE must be auto, float16 or bfloat16, got {config['AMP_DTYPE']!r}")
    for name in ("DATA_DIR", "CHECKPOINT_DIR", "SAVED_IMAGES"):
        if not config[name]:
            fail(f"{name} must name a folder")
    for name, folder in (("CHECKPOINT_DIR", config["CHECKPOINT_DIR"]), ("SAVED_IMAGES", pictures_folder(config))):
        if not_a_folder(folder):
            fail(f"{name}: {not_a_folder(folder)} is a file, so no folder can be made at {folder}")
    levels = len(config["FEATURES"])
    if (config["IMAGE_HEIGHT"] >> levels) * (config["IMAGE_WIDTH"] >> levels) < 2:
        fail(f"IMAGE_HEIGHT x IMAGE_WIDTH {config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']} leaves the {levels}-level "
             f"UNet's bottleneck one pixel, where BatchNorm has one value per channel from a 1-image batch: "
             f"make one side at least {2 ** (levels + 1)}")
    try:
        get_device(config["DEVICE"])
    except ValueError as error:
        fail(f"DEVICE: {error}")


def quiet(*args, **kwargs):
    """print() for the processes of a torchrun job other than rank 0."""


def prepare_data(config, given, rank=0):
    """Use DATA_DIR if it holds a known layout. Otherwise, with DATA_DIR left at its default and
    DEMO on, the synthetic set under data/synthetic/, made once by rank 0; a DATA_DIR the user
    named (on the command line or by editing the setting) is a one-line error, and nothing is
    created in it."""
    if data.has_data(config["DATA_DIR"]):
        return config
    if not config["DEMO"] or "DATA_DIR" in given or config["DATA_DIR"] != DEMO_DATA_DIR:
        raise SystemExit(f"error: DATA_DIR: {data.layout_error(config['DATA_DIR'])}")
    root = Path(config["DATA_DIR"]) / "synthetic"
    say = quiet if rank else print
    say("=" * 78)
    say(f"No training images in {config['DATA_DIR']}/. Running the DEMO on synthetic cars instead.")
    say("For the real data: accept the rules of Kaggle's 'Carvana Image Masking Challenge', then")
    say("  kaggle competitions download -c carvana-image-masking-challenge")
    say(f"and unzip train.zip and train_masks.zip into {config['DATA_DIR']}/ (train/, train_masks/).")
    marker = root / ".complete"
    if rank == 0 and (marker.read_text() if marker.is_file() else "") != repr(DEMO_DATA):
        say(f"Generating {DEMO_DATA['cars'] * 16} synthetic images ({DEMO_DATA['size'][0]}x"
              f"{DEMO_DATA['size'][1]}) under {root}/ ...")
        synthetic.make_synthetic(root, **DEMO_DATA)
        marker.write_text(repr(DEMO_DATA))
    if dist.is_initialized():
        dist.barrier()  # the other processes wait for rank 0's files
    demo = {name: value for name, value in DEMO_SETTINGS.items() if name not in given}
    say("Demo settings in use: " + ", ".join(f"{k}={v}" for k, v in demo.items()))
    say("=" * 78)
    return {**config, **demo, "DATA_DIR": str(root)}


def load_samples(config, rank=0):
    """(train, val) sample lists; rank 0 reports every file that was skipped and the masks with no
    car pixels. Validation is val_images/ where the layout has it, else VAL_FRACTION of the cars;
    with photos of one car, VAL_FRACTION of its photos (with a warning)."""
    splits = data.find_splits(config["DATA_DIR"])
    if not splits:
        raise SystemExit(f"error: DATA_DIR: {data.layout_error(config['DATA_DIR'])}")
    # Every mask is decoded to be checked (about half a minute for Carvana's 5,088 on 2 cores), once:
    # the results of unchanged files are kept in CACHE_DIR.
    checks = data.MaskChecks(Path(config["CACHE_DIR"]) / "mask_checks.json" if config["CACHE_DIR"] else None)
    train, problems = data.scan_pairs(*splits["train"], progress=rank == 0, checks=checks)
    if "val" in splits:
        val, val_problems = data.scan_pairs(*splits["val"], progress=rank == 0, checks=checks)
        problems += val_problems
    if rank == 0:
        data.report_problems(problems)
        if config["CACHE_DIR"]:
            checks.save()
    listed = " (the skipped files are listed above)" if problems else ""
    if "val" not in splits:
        if len(train) < 2:
            raise SystemExit(f"error: {splits['train'][0]} has {len(train)} usable image/mask pair{'s' * (len(train) != 1)}{listed}; "
                             f"training needs at least 2, one to train on and one to validate: add photos with masks")
        cars = {data.car_id(s.image) for s in train}
        unnamed = [s.image.name for s in train if not data.has_car_id(s.image)]
        train, val = data.split_by_car(train, config["VAL_FRACTION"], config["SEED"])
        if len(cars) < 2 and rank == 0:
            print(f"warning: all {len(train) + len(val)} photos in {splits['train'][0]} are of one car ({cars.pop()}): "
                  f"validation holds out {len(val)} of them, so it shares that car with training and its scores "
                  f"read high; photos of other cars (or a val_images/ folder) give a fair score", file=sys.stderr)
        elif unnamed and rank == 0:
            shown = ", ".join(unnamed[:2]) + (", ..." if len(unnamed) > 2 else "")
            print(f"warning: {len(unnamed)} of the {len(train) + len(val)} photos in {splits['train'][0]} have no car "
                  f"id in their names ({shown}; Carvana's are <car id>_<angle>), so each is held out or trained on "
                  f"alone: photos of one car may fall on both sides, and validation then shares that car with "
                  f"training and its scores read high; names such as <car>_01.jpg (or a val_images/ folder) give "
                  f"a fair score", file=sys.stderr)
    if not train or not val:
        raise SystemExit(f"error: {config['DATA_DIR']} has {len(train)} usable training and {len(val)} validation "
                         f"images{listed}; both must be at least 1")
    empty = set(problems.no_car)
    why = {"training": "there is nothing to learn",
           "validation": "Dice cannot tell a model that finds cars from one that predicts nothing"}
    for name, samples in (("training", train), ("validation", val)):
        if all(sample.mask in empty for sample in samples):
            other = "" if "val" in splits else ", or hold out other cars (SEED, VAL_FRACTION)"
            raise SystemExit(f"error: all {len(samples)} {name} masks in {config['DATA_DIR']} are empty (no car "
                             f"pixels), so {why[name]}: add photos whose masks show the car{other}")
    return train, val


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of an epoch's shuffled order, each index paired with the seed of its
    augmentation. Both derive from (SEED, epoch) alone, so a resumed run repeats exactly what the
    uninterrupted run would have drawn, with or without loader workers."""

    def __init__(self, dataset, seed, rank=0, world_size=1):
        # drop_last under torchrun: no sample is padded in twice, so the processes' shares never overlap.
        self.order = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=world_size > 1)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(len(self.order.dataset))
        return ((index, int(seeds[index])) for index in self.order)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(config, device, cached):
    """NUM_WORKERS, or for "auto": enough processes to keep a GPU fed; on a CPU none once the cache
    is built, since loader processes then only take cores from the model."""
    if config["NUM_WORKERS"] != "auto":
        return config["NUM_WORKERS"]
    cores = available_cores()
    if device.type in ("cuda", "mps"):
        per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, min(8, per_process - 1))
    return 0 if cached else min(2, cores // 4)


def make_loader(dataset, config, device, workers, sampler=None):
    return DataLoader(dataset, batch_size=config["BATCH_SIZE"], sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=config["PIN_MEMORY"] and device.type == "cuda")


def make_cache(samples, name, config, builder):
    """The split's ResizedCache, built by one process per machine if needed and held while this run
    reads it; None without CACHE_DIR, or when it cannot be written or would not fit (training then
    decodes every epoch)."""
    if not config["CACHE_DIR"]:
        return None
    folder = config["CACHE_DIR"]
    cache = data.ResizedCache(folder, name, samples, (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]))
    if builder and not cache.ready():
        needed = cache.bytes_needed()
        try:
            make_run_folder(folder)
            free = shutil.disk_usage(folder).free
            if free < 1.2 * needed:  # a margin for the checkpoints and everything else on that disk
                raise OSError(f"{free / 2**30:.1f} GiB free, it needs {needed / 2**30:.1f} GiB")
            print(f"caching the {len(samples)} {name} images at {cache.size[0]}x{cache.size[1]} in {folder}: "
                  f"{needed / 2**30:.2f} GiB of its {free / 2**30:.1f} GiB free, once", file=sys.stderr)
            cache.build(config["NUM_WORKERS"] if config["NUM_WORKERS"] != "auto" else min(8, available_cores()))
        except OSError as error:
            print(f"warning: cannot cache the {name} images in {folder} ({error.strerror or error}): decoding "
                  f"every epoch instead", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()  # the machine's other processes wait for its builder
    return cache.hold() if cache.ready() else None


def batchnorm_set(samples, config, cache):
    """The training images that the validated model's BatchNorm statistics are recomputed on before
    each validation: up to BATCHNORM_IMAGES of them, drawn once with SEED (so a resume draws the same),
    without augmentation, as validation and predict.py see images."""
    count = min(len(samples), config["BATCHNORM_IMAGES"]) or 1
    chosen = sorted(random.Random(config["SEED"]).sample(range(len(samples)), count))
    return data.CarvanaDataset([samples[i] for i in chosen], data.val_transform(),
                               (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]), cache)


def learning_rate(config, step, total_steps):
    """The cosine decay from LEARNING_RATE to 1% of it, scaled by a linear rise over the first WARMUP
    of the steps (so the highest rate is the cosine's value when the rise ends, about 98% of
    LEARNING_RATE for WARMUP 0.1); derived from the step, so resuming needs no state. The rise lets
    Adam's moment estimates and BatchNorm's statistics settle before full-size steps (README:
    Training recipe)."""
    progress = min(1.0, step / max(1, total_steps))
    warmup_steps = config["WARMUP"] * total_steps
    rise = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return rise * config["LEARNING_RATE"] * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def setup_distributed(config):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, Gloo on CPU.
    Returns (rank, world size, device)."""
    device = get_device(config["DEVICE"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


class NonFiniteLoss(Exception):
    pass


def train_one_epoch(loader, model, optimizer, scaler, average, config, device, amp_dtype, epoch, steps_done,
                    total_steps):
    """One pass over the training share; returns the mean loss. `model` may be DDP-wrapped;
    `average` (a WeightAverage) follows the underlying model after every step."""
    model.train()
    loss_sum, images = 0.0, 0
    distributed = dist.is_initialized()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config['NUM_EPOCHS']}", unit="batch", leave=False,
               disable=distributed and dist.get_rank() > 0)
    for step, (x, y) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, steps_done + step, total_steps) * group.get("rate_factor", 1.0)
        x = to_model_input(x, model, device)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = segmentation_loss(logits.float(), y, config["LOSS"])
        mean = loss.detach().clone()
        if distributed:  # every process sees the same mean loss, so all stop together on NaN
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        value = mean.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        # With float16 the scaler skips a step whose gradients overflowed and lowers its scale;
        # only a non-finite loss (above) stops the run.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        average.update(getattr(model, "module", model))
        loss_sum += value * x.shape[0]
        images += x.shape[0]
        bar.set_postfix(loss=f"{value:.4f}")
    return loss_sum / max(1, images)


HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "dice", "pixel_accuracy", "learning_rate", "seconds"]


def read_history(path, epochs_done):
    """Rows of an earlier run up to the epoch a resume starts from."""
    if not path.is_file():
        return []
    with open(path, newline="") as stream:
        return [row for row in csv.DictReader(stream) if int(row["epoch"]) <= epochs_done]


def write_history(rows, path):
    with replacing(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def checkpoint_state(model, average, optimizer, scaler, amp_dtype, epoch, best_dice, config, split):
    """One dict: `model` holds the averaged weights that were validated (what predict.py uses),
    `training_model` the weights the optimizer steps (what a resume continues)."""
    return {"model": average.model.state_dict(), "training_model": model.state_dict(), "average_steps": average.steps,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "amp_dtype": str(amp_dtype),
            "epoch": epoch, "best_dice": best_dice, "config": config,
            "model_args": dict(model.model_args), "split": split,
            "image_size": (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]), "threshold": config["THRESHOLD"]}


def build_model(config, device, world_size):
    memory_format = torch.channels_last if config["CHANNELS_LAST"] else torch.contiguous_format
    model = UNet(features=config["FEATURES"]).to(device, memory_format=memory_format)
    if config["SYNC_BATCHNORM"] and world_size > 1:
        if device.type != "cuda":
            raise SystemExit("error: SYNC_BATCHNORM needs CUDA devices; set it to false for CPU runs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def make_optimizer(model, config):
    """Adam, with the output layer in a group of its own that learns HEAD_LR_FACTOR times faster.
    Why: Adam moves each weight by at most about the learning rate per step, and BatchNorm undoes
    any growth in the layers before it, so the logits' scale is set by the last layer alone; at the
    rate of the rest it cannot grow far enough in a short run for the model to become sure of the
    background, and the loss stalls (see README: Training recipe)."""
    head = [parameter for name, parameter in model.named_parameters() if name.startswith("head.")]
    body = [parameter for name, parameter in model.named_parameters() if not name.startswith("head.")]
    # fused: one kernel updates every weight (else ~10 tensor operations per weight; ~3% of a CPU step).
    fused = all(parameter.device.type in ("cpu", "cuda") for parameter in model.parameters())
    return torch.optim.Adam([{"params": body, "rate_factor": 1.0},
                             {"params": head, "rate_factor": config["HEAD_LR_FACTOR"]}], lr=config["LEARNING_RATE"],
                            fused=fused or None)


def refuse_to_overwrite(checkpoints):
    """A fresh run never replaces an earlier run's checkpoints or history."""
    earlier = [name for name in ("last.pt", "best.pt", "history.csv") if (checkpoints / name).is_file()]
    if earlier:
        raise SystemExit(f"error: {checkpoints} holds an earlier run ({', '.join(earlier)}): continue it with "
                         f"--LOAD_MODEL=true, or start a new run with another --CHECKPOINT_DIR")


def resume_file(checkpoints):
    """last.pt; or best.pt where a run was killed after its first best.pt and before any last.pt
    (best.pt holds the same complete state, so continuing from it loses nothing)."""
    last, best = checkpoints / "last.pt", checkpoints / "best.pt"
    return best if best.is_file() and not last.is_file() else last


# A resume continues the run it resumes. These settings shape the split, the model or the optimizer:
# they come from the checkpoint, and one given with another value is refused. DATA_DIR and NUM_EPOCHS
# come from it unless given (the data may move; a run may be lengthened). The rest (NUM_WORKERS,
# DEVICE, AMP, AMP_DTYPE, PIN_MEMORY, CACHE_DIR, COMPILE, SAVED_IMAGES, ...) are this session's.
RUN_SETTINGS = ("IMAGE_HEIGHT", "IMAGE_WIDTH", "BATCH_SIZE", "LEARNING_RATE", "WARMUP", "HEAD_LR_FACTOR", "LOSS",
                "SEED", "VAL_FRACTION", "FEATURES", "THRESHOLD", "EMA_DECAY", "BATCHNORM_IMAGES", "CHANNELS_LAST",
                "SYNC_BATCHNORM")
CONTINUED_SETTINGS = ("DATA_DIR", "NUM_EPOCHS")


def shown(value):
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def setting_conflicts(config, given, saved):
    """The settings given for a resume that differ from the run's own (saved: the checkpoint's config)."""
    return [name for name in RUN_SETTINGS if name in given and name in saved and shown(config[name]) != shown(saved[name])]


def read_resume_state(checkpoints, device):
    """The state a LOAD_MODEL run continues from (see resume_file), or SystemExit saying why not."""
    path = resume_file(checkpoints)
    try:
        state = load_checkpoint(path, device)
    except CheckpointError as error:
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {str(error).splitlines()[0]}") from None
    if not all(all_finite(state.get(part, {}).values()) for part in ("model", "training_model")):
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {path} holds NaN or infinite weights (not written by "
                         f"this version, which never saves them); start a new run with another --CHECKPOINT_DIR")
    return path, state


def continue_settings(config, given, path, saved, say):
    """The settings of a resumed run: its own (RUN_SETTINGS, CONTINUED_SETTINGS unless given) and this
    session's for the rest. A run setting given with another value is a one-line error naming it."""
    conflicts = setting_conflicts(config, given, saved)
    if conflicts:
        what = "model" if conflicts == ["FEATURES"] else "settings"
        listed = "; ".join(f"{name}={shown(saved[name])}, this run asks for {shown(config[name])}" for name in conflicts)
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {path} holds another run's {what} ({listed}); resume "
                         f"without changing them, or start a new run with another --CHECKPOINT_DIR")
    kept = {name: saved[name] for name in (*RUN_SETTINGS, *CONTINUED_SETTINGS) if name in saved and name not in given}
    changed = [f"{name}={shown(value)}" for name, value in kept.items() if shown(value) != shown(config[name])]
    if changed:
        say(f"continuing {path}'s run with its own settings: {', '.join(changed)}")
    return {**config, **kept}


def split_names(train_samples, val_samples):
    """The split as file names (recorded in checkpoints: the folder may move, the photos may not change)."""
    return {"train": sorted(Path(s.image).name for s in train_samples),
            "val": sorted(Path(s.image).name for s in val_samples)}


def check_same_photos(path, saved_split, train_samples, val_samples):
    """SystemExit when the photos of a resumed run's split have changed: a new split would validate on
    photos the run trained on."""
    if not saved_split:
        return  # checkpoints older than the split record
    now = split_names(train_samples, val_samples)
    for side in ("train", "val"):
        before = set(saved_split[side])
        if set(now[side]) != before:
            added, gone = len(set(now[side]) - before), len(before - set(now[side]))
            raise SystemExit(f"error: cannot resume (LOAD_MODEL): the {side} photos differ from {path}'s run "
                             f"({added} new, {gone} gone): the data changed since it started, so validation would "
                             f"mix with training; restore the photos, or start a new run with another --CHECKPOINT_DIR")


def resume_conflicts(argv):
    """The settings in argv that differ from those of the run in its CHECKPOINT_DIR ([] when there is
    no checkpoint there): the notebook resumes only the same run."""
    config, given = parse_settings(argv)
    path = resume_file(Path(config["CHECKPOINT_DIR"]))
    if not path.is_file():
        return []
    try:
        saved = load_checkpoint(path)["config"]
    except CheckpointError:
        return ["(unreadable checkpoint)"]
    return setting_conflicts(config, given, saved)


def resume(path, state, model, average, optimizer, scaler, amp_dtype, say):
    """Continue from a checkpoint's state: weights, averaged weights, optimizer, loss scale (where it
    applies); returns (epochs done, best Dice)."""
    try:
        model.load_state_dict(clean_state_dict(state.get("training_model", state["model"])))
        average.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (CheckpointError, RuntimeError, ValueError, KeyError) as error:
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {str(error).splitlines()[0]}") from None
    average.steps = state.get("average_steps", 0)
    saved_dtype = state.get("amp_dtype", str(amp_dtype))
    if scaler.is_enabled() and state.get("scaler") and saved_dtype == str(amp_dtype):
        scaler.load_state_dict(state["scaler"])
    elif saved_dtype != str(amp_dtype):
        say(f"mixed precision was {saved_dtype}, now {amp_dtype}: continuing"
            f"{' with a fresh loss scale' if scaler.is_enabled() else ''}")
    say(f"resumed from {path}: {state['epoch']} epochs done, best Dice {state['best_dice']:.4f}")
    return state["epoch"], state["best_dice"]


def main(argv=None):
    config, given = parse_settings(sys.argv[1:] if argv is None else argv)
    rank, world_size, device = setup_distributed(config)
    try:
        result = run(config, given, rank, world_size, device)
        if world_size > 1:
            dist.barrier()  # the others wait while rank 0 draws its pictures, then all leave together
        return result
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run(config, given, rank, world_size, device):
    say = quiet if rank else print
    seed_everything(config["SEED"])
    amp_dtype = autocast_dtype(device, config["AMP_DTYPE"]) if config["AMP"] else None
    checkpoints = Path(config["CHECKPOINT_DIR"])
    resume_path, saved = read_resume_state(checkpoints, device) if config["LOAD_MODEL"] else (None, None)
    if saved:
        config = continue_settings(config, given, resume_path, saved.get("config", {}), say)
        seed_everything(config["SEED"])
    config = prepare_data(config, given, rank)  # the data folder is checked before the checkpoint folder
    if not config["LOAD_MODEL"]:
        refuse_to_overwrite(checkpoints)
    train_samples, val_samples = load_samples(config, rank)
    if saved:
        check_same_photos(resume_path, saved.get("split"), train_samples, val_samples)
    height, width = config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]
    say(f"device {device}{f' x {world_size} processes' if world_size > 1 else ''}, mixed precision "
        f"{amp_dtype or 'off'}, {len(train_samples)} training and {len(val_samples)} validation images "
        f"at {height}x{width}")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model = build_model(config, device, world_size)
    average = WeightAverage(model, config["EMA_DECAY"])
    optimizer = make_optimizer(model, config)
    # Loss scaling is needed only for float16; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_dice = 0, -1.0
    if saved:
        start_epoch, best_dice = resume(resume_path, saved, model, average, optimizer, scaler, amp_dtype, say)
        del saved  # its tensors: the model, average and optimizer hold copies now
    if config["COMPILE"]:
        model.compile()  # in place: parameter names, and so checkpoints, stay as they are
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model

    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0  # node-local cache folders work too
    size = (height, width)
    train_cache = make_cache(train_samples, "train", config, builder)
    val_cache = make_cache(val_samples, "val", config, builder)
    workers = loader_workers(config, device, train_cache is not None)
    train_set = data.CarvanaDataset(train_samples, data.train_transform(), size, train_cache)
    sampler = EpochSampler(train_set, config["SEED"], rank, world_size)
    train_loader = make_loader(train_set, config, device, workers, sampler)
    # Each process scores every world_size-th validation image; check_accuracy adds up the sums.
    val_set = data.CarvanaDataset(val_samples[rank::world_size], data.val_transform(), size, val_cache)
    val_loader = make_loader(val_set, config, device, workers)
    batchnorm_loader = make_loader(batchnorm_set(train_samples, config, train_cache), config, device, workers)
    total_steps = config["NUM_EPOCHS"] * len(train_loader)
    split = split_names(train_samples, val_samples)
    history = read_history(checkpoints / "history.csv", start_epoch)
    pictures = pictures_folder(config)
    curves = pictures / "training_curves.png"
    if rank == 0:
        make_run_folder(checkpoints)
        # The held-out images, for `predict.py --input CHECKPOINT_DIR/val_files.txt --masks ...`.
        write_text(checkpoints / "val_files.txt", "".join(f"{s.image}\n" for s in val_samples))
    metrics, train_seconds, trained_images, worst, curves_drawn = None, 0.0, 0, None, time.time()
    for epoch in range(start_epoch, config["NUM_EPOCHS"]):
        started = time.time()
        sampler.set_epoch(epoch)
        try:
            train_loss = train_one_epoch(train_loader, trained, optimizer, scaler, average, config, device, amp_dtype,
                                         epoch, epoch * len(train_loader), total_steps)
        except NonFiniteLoss as error:
            stop_without_saving(checkpoints, error)
        train_seconds += time.time() - started
        trained_images += len(sampler)
        if not all_finite(average.model.state_dict().values()) or not all_finite(model.state_dict().values()):
            stop_without_saving(checkpoints, f"the weights became non-finite during epoch {epoch + 1}")
        if rank == 0 and config["BATCHNORM_IMAGES"]:
            recompute_batchnorm(average.model, batchnorm_loader, device, amp_dtype)
        if world_size > 1:  # every process scores the model rank 0 saves, BatchNorm statistics included
            for buffer in average.model.buffers():
                dist.broadcast(buffer, 0)
        last = epoch + 1 == config["NUM_EPOCHS"]
        # The last validation also picks the worst images for the gallery (one process scores them all).
        worst = WorstImages() if last and world_size == 1 else None
        loss_fn = functools.partial(segmentation_loss, kind=config["LOSS"])
        metrics = check_accuracy(val_loader, average.model, device, config["THRESHOLD"], amp_dtype, loss_fn,
                                 worst=worst, all_ranks=world_size > 1)
        # A model that predicts no car anywhere is never a best, whatever Dice an empty mask scores.
        improved = predicts_car(metrics) and metrics["dice"] > best_dice
        best_dice = metrics["dice"] if improved else best_dice
        if rank == 0:
            record_epoch(config, epoch, train_loss, metrics, started, history,
                         checkpoint_state(model, average, optimizer, scaler, amp_dtype, epoch + 1, best_dice, config,
                                          split),
                         improved)
            # Matplotlib takes most of a second per drawing: redraw while training at most once a minute.
            if last or time.time() - curves_drawn > 60:
                save_training_curves(history, curves)
                curves_drawn = time.time()

    if rank == 0:
        full_val = data.CarvanaDataset(val_samples, data.val_transform(), size, val_cache)
        written = save_predictions_as_imgs(full_val, average.model, pictures, device, one_per_car(val_samples),
                                           threshold=config["THRESHOLD"], amp_dtype=amp_dtype)
        if worst is None:  # torchrun, or a resumed run with no epochs left: score the whole share here
            worst = WorstImages()
            check_accuracy(make_loader(full_val, config, device, 0), average.model, device, config["THRESHOLD"],
                           amp_dtype, worst=worst)
        if not curves.exists() and history:
            save_training_curves(history, curves)
        gallery = worst.save(pictures / "worst_predictions.png")
        outcome = (f"best validation Dice {best_dice:.4f}" if best_dice >= 0 else
                   "no epoch's model predicted any car, so there is no best.pt (last.pt holds the last weights): "
                   "train longer (NUM_EPOCHS) or raise LEARNING_RATE")
        print(f"{outcome}; checkpoints and history.csv in {checkpoints}/; "
              f"{len(written)} prediction pictures, {curves.name} and {gallery.name} in {pictures}/")
    return {"best_dice": best_dice, "last": metrics, "config": config,
            "train_images_per_second": trained_images / train_seconds if train_seconds else None}


def pictures_folder(config):
    """SAVED_IMAGES/<CHECKPOINT_DIR's name>: each run's pictures apart from other runs'."""
    return Path(config["SAVED_IMAGES"]) / Path(config["CHECKPOINT_DIR"]).absolute().name


def one_per_car(samples, count=4):
    """Indices of `count` samples, one photo of each car first (then more photos where cars are few)."""
    first = {}
    for index, sample in enumerate(samples):
        first.setdefault(data.car_id(sample.image), index)
    chosen = list(first.values())[:count]
    return chosen + [index for index in range(len(samples)) if index not in chosen][: count - len(chosen)]


def stop_without_saving(checkpoints, reason):
    kept = checkpoints / "last.pt"
    raise SystemExit(f"error: {reason}; stopped without saving. Last good checkpoint: "
                     f"{kept if kept.is_file() else 'none yet'}. Try a lower LEARNING_RATE.") from None


def predicts_car(metrics):
    """Whether the validated model predicts car on some photo (always true when no mask has car)."""
    return metrics["images_predicted_car"] > 0 or metrics["images_with_car"] == 0


def record_epoch(config, epoch, train_loss, metrics, started, history, state, improved):
    """Print the epoch, add it to history.csv, save best.pt (improved) and then last.pt: a run
    killed between the two saves resumes from the older last.pt (from best.pt when there is none
    yet), repeats the epoch identically and writes the same best.pt again, so the two never disagree."""
    checkpoints = Path(config["CHECKPOINT_DIR"])
    print(f"epoch {epoch + 1}/{config['NUM_EPOCHS']}: train loss {train_loss:.4f}, "
          f"val loss {metrics['loss']:.4f}, val Dice {metrics['dice']:.4f}, "
          f"pixel accuracy {100 * metrics['pixel_accuracy']:.2f}% ({time.time() - started:.0f}s)")
    if not predicts_car(metrics):
        print(f"  the model predicts no car on any of the {metrics['images']} validation photos (highest car "
              f"probability {metrics['highest_probability']:.2f}, THRESHOLD {config['THRESHOLD']}), so it is not "
              f"saved as best.pt: it has not learned yet; train longer (NUM_EPOCHS) or raise LEARNING_RATE")
    history.append({"epoch": epoch + 1, "train_loss": f"{train_loss:.5f}", "val_loss": f"{metrics['loss']:.5f}",
                    "dice": f"{metrics['dice']:.5f}", "pixel_accuracy": f"{metrics['pixel_accuracy']:.5f}",
                    "learning_rate": f"{state['optimizer']['param_groups'][0]['lr']:.3g}",
                    "seconds": f"{time.time() - started:.1f}"})
    try:
        write_history(history, checkpoints / "history.csv")
        if improved:
            save_checkpoint(state, checkpoints / "best.pt")
            print(f"  new best Dice: saved {checkpoints / 'best.pt'}")
            # The same bytes: last.pt becomes a second name for best.pt (a copy where links are not allowed).
            link_checkpoint(checkpoints / "best.pt", checkpoints / "last.pt", state)
        else:
            save_checkpoint(state, checkpoints / "last.pt")
    except OSError as error:  # a full disk or a lost Drive mount: the files on disk are still whole
        kept = resume_file(checkpoints)
        raise SystemExit(f"error: cannot save epoch {epoch + 1} in {checkpoints} ({error.strerror or error}); the "
                         f"last good checkpoint is {kept if kept.is_file() else 'none yet'}: free some space, then "
                         f"continue with --LOAD_MODEL=true") from None

if __name__ == "__main__":
    main()
