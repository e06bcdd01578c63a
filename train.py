"""Train the UNet on Carvana car masks.

python train.py                               # the demo, on generated cars, when data/ is empty
python train.py --DATA_DIR=path/to/photos     # your own folder (README: Your data)

The settings are the constants at the top of train.py: edit them there, or override any of them as
--NAME=value (python train.py --NUM_EPOCHS=10 --AMP=false).
"""
import csv
import functools
import math
import os
import random
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import data_folder
import dataset
import memory
import resume
import settings
import synthetic
from cache import split_cache
from classes import Classes, find_classes
from files import InUse, exclusive, make_run_folder, replacing, write_text
from model import model_for
from pictures import WorstImages, save_training_curves
from pretrained import PretrainedWeightsError, load_pretrained
from progress import tqdm
from stopwatch import Stopwatch
from utils import (
    CheckpointError,
    ExponentialMovingAverage,
    all_finite,
    autocast_dtype,
    available_cores,
    class_colours,
    clean_state_dict,
    evaluate,
    forward,
    get_device,
    is_out_of_memory,
    link_checkpoint,
    recompute_batchnorm,
    save_checkpoint,
    save_predictions_as_imgs,
    seed_everything,
    segmentation_loss,
    to_device,
    wait_for_other_processes,
)

# ---- settings ---------------------------------------------------------------------------------
DATA_DIR = "data"                 # train/ + train_masks/ (Carvana), train_images/ ... val_masks/, images/ + masks/ or imgs/ + masks/
CHECKPOINT_DIR = "checkpoints"    # last.pt every epoch, best.pt on a new best Dice (the demo: checkpoints/demo); on Colab a Drive folder
IMAGE_HEIGHT = 160                # pixels the model sees; Carvana's photos are 1280 high
IMAGE_WIDTH = 240                 # pixels the model sees; Carvana's photos are 1918 wide
BATCH_SIZE = 8                    # images per micro-batch (docs/training.md)
ACCUMULATE_STEPS = 1              # micro-batches per optimizer step: the effective batch is BATCH_SIZE x ACCUMULATE_STEPS
CROP_HEIGHT = 0                   # train on random crops this high of the IMAGE_HEIGHT images (0: whole images); validation sees whole images
CROP_WIDTH = 0                    # train on random crops this wide of the IMAGE_WIDTH images (0: whole images)
NUM_EPOCHS = 5                    # passes over the training images (a resume keeps the run's own unless given)
LEARNING_RATE = 3e-4              # Adam's rate at step 0 of the cosine decay to 1% of it over the run
WARMUP = 0.1                      # share of the run's steps over which a linear rise scales the rate up (0 <= x < 1)
HEAD_LR_FACTOR = 10.0             # the 1x1 output layer's rate as a multiple of LEARNING_RATE (>= 1; docs/training.md)
LOSS = "lovasz"                   # BCE plus "lovasz" (Lovasz hinge) or "dice" (soft Dice) (docs/training.md)
NUM_WORKERS = "auto"              # loader processes: "auto" (none on a CPU once the cache is built, enough to feed a GPU), or 0, 1, 2, ...
PIN_MEMORY = True                 # page-locked batches: faster copies to a CUDA GPU (ignored elsewhere)
LOAD_MODEL = False                # True: resume from CHECKPOINT_DIR/last.pt (model, optimizer, epoch, best Dice)
DEVICE = "auto"                   # "auto" (cuda, then mps, then cpu), or "cuda", "cuda:1", "mps", "cpu"
AMP = True                        # mixed precision: bfloat16/float16 on CUDA, bfloat16 on CPUs that support it
AMP_DTYPE = "auto"                # "auto" (as above), "float16" (with loss scaling, as on a T4) or "bfloat16"
SEED = 42                         # one seed for Python, NumPy, torch, augmentations and the validation split
VAL_FRACTION = 0.2                # share of cars held out for validation when there is no val_images/ folder
ENCODER = "unet"                  # "unet" (the plain UNet of FEATURES), or a UNet decoder on "resnet18", "resnet34", "resnet50"
ENCODER_WEIGHTS = "imagenet"      # ResNets: "imagenet" (torchvision's, downloaded once), "none" (random), or a .pth file's path
ENCODER_LR_FACTOR = 1.0           # a ResNet encoder's rate as a multiple of LEARNING_RATE (0 < x <= 1; README: Pretrained encoders)
FEATURES = (64, 128, 256, 512)    # plain UNet channels per level; the bottleneck has twice the last (about 31M parameters)
THRESHOLD = 0.5                   # probability above which a pixel counts as car, between 0 and 1
NUM_CLASSES = 1                   # 1: car and background; N >= 2: background and N - 1 classes, the masks' values or colours
EMA_DECAY = 0.99                  # validate and save an average of the weights (0 <= decay < 1; 0: the weights as trained)
BATCHNORM_IMAGES = "auto"         # training images (unaugmented) for the BatchNorm statistics of each validation: "auto" (a quarter, 32 to 256), a count, 0: off
SAVED_IMAGES = "saved_images"     # pictures of a run go to SAVED_IMAGES/<CHECKPOINT_DIR's path>/ (curves, predictions)
DEMO = True                       # DATA_DIR left at "data" and no data there: generate synthetic cars, train with DEMO_SETTINGS
CHANNELS_LAST = True              # NHWC memory format: faster convolutions with oneDNN and cuDNN tensor cores
ACTIVATION_CHECKPOINTING = False  # recompute each UNet level in the backward pass: about a third more compute, far less memory
CACHE_DIR = "cache"               # decoded, resized uint8 copies of the data, made once (local disk); "" decodes every epoch
COMPILE = False                   # torch.compile the model in place: faster steps after a slow first one
SYNC_BATCHNORM = False            # under torchrun: BatchNorm statistics over all processes' batches (CUDA)
# -----------------------------------------------------------------------------------------------
SETTING_NAMES = list(settings.meanings(__file__))  # the block above, whatever else the module defines

# Sized so that a bare `python train.py` on a 2-core CPU finishes in a few minutes, bfloat16 or not
# (docs/training.md).
DEMO_SETTINGS = {"FEATURES": (8, 16, 32, 64), "LEARNING_RATE": 2e-3, "BATCH_SIZE": 16, "NUM_EPOCHS": 12}
DEMO_DATA = {"cars": 24, "size": (480, 320), "seed": 0}  # 384 images at a quarter of Carvana's size
DEMO_DATA_DIR = "data"  # DATA_DIR's default: the one folder where finding no data starts the demo


def defaults():
    return {name: globals()[name] for name in SETTING_NAMES}


def parse_settings(argv):
    """(config, the names given on the command line) from the settings above and --NAME=value."""
    return settings.parse(argv, defaults(), __file__, __doc__)


def main(argv=None, fast_paths=True):
    """fast_paths=False trains without the speed paths that change no result (reduced JPEG decoding,
    upsampling as one matrix product, fused Adam): bench.py's "before"."""
    config, named = parse_settings(sys.argv[1:] if argv is None else argv)
    config = demo_folder(config, named)
    rank, world_size, device = setup_distributed(config)
    try:
        with holding_run_folders(config, rank):
            result = run(config, named, rank, world_size, device, fast_paths)
            wait_for_other_processes()  # the others wait while rank 0 draws its pictures, then all leave together
        return result
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\n{interrupted(config)}", file=sys.stderr)
        raise
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@contextmanager
def holding_run_folders(config, rank):
    """CHECKPOINT_DIR and the run's pictures folder, held by this run alone while it writes them:
    a second run into either is refused in one line naming the first (two writers would overwrite
    each other's checkpoints), and a folder that cannot be written stops the run before any
    training. Rank 0 of a torchrun job writes them; the other processes hold nothing."""
    if rank:
        yield
        return
    with ExitStack() as held:
        for name, folder in (("CHECKPOINT_DIR", Path(config["CHECKPOINT_DIR"])),
                             ("SAVED_IMAGES", settings.pictures_folder(config))):
            made = next((part for part in reversed((folder, *folder.parents)) if not part.exists()), None)
            if made:  # a run stopped before writing anything (bad data, say) leaves no folder behind
                held.callback(remove_unused, folder, made)
            try:
                make_run_folder(folder)
                held.enter_context(exclusive(folder, "train.py"))
            except InUse as error:
                raise SystemExit(f"error: {name}: {error}; two runs in one folder would overwrite each other's "
                                 f"files: wait for it to end, or give this run another --{name}") from None
            except OSError as error:
                raise SystemExit(f"error: {name}: cannot write in {folder} ({error.strerror or error}); give "
                                 f"--{name} a folder this run can write") from None
        yield


def run(config, named, rank, world_size, device, fast_paths=True):
    log = print if rank == 0 else silent
    stopwatch = Stopwatch(device)  # the seconds of each part, for bench.py --epoch
    amp_dtype = autocast_dtype(device, config["AMP_DTYPE"]) if config["AMP"] else None
    checkpoints = Path(config["CHECKPOINT_DIR"])

    # Settings: a resumed run keeps its own; the data folder is checked before the checkpoint folder.
    resumed = resume.read(checkpoints, device, log) if config["LOAD_MODEL"] else None
    if resumed:
        config = resume.continue_settings(config, named, resumed, log)
        settings.check_sizes(config)
    seed_everything(config["SEED"])
    config = prepare_data(config, named, rank)
    if not resumed:
        resume.refuse_to_overwrite(checkpoints)

    # Data: the checked photos, split by car.
    cache_dir = config["CACHE_DIR"]
    with stopwatch.part("photo checks"):
        train_samples, val_samples = data_folder.training_split(
            config["DATA_DIR"], config["VAL_FRACTION"], config["SEED"],
            Path(cache_dir) / "mask_checks.json" if cache_dir else None, show=rank == 0,
            classes=config["NUM_CLASSES"])
        classes = None
        if config["NUM_CLASSES"] > 1:  # the masks' values or colours, found over the training masks
            classes, val_samples = find_classes(train_samples, val_samples, config["NUM_CLASSES"], show=rank == 0)
    if resumed:
        resume.check_same_photos(resumed, train_samples, val_samples)
        resume.check_same_classes(resumed, classes)
    log(f"device {device}{f' x {world_size} processes' if world_size > 1 else ''}, mixed precision "
        f"{amp_dtype or 'off'}, {len(train_samples)} training and {len(val_samples)} validation images "
        f"at {config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']}")

    # The model, its average, optimizer and loss scale; continued where a resume left them.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    with stopwatch.part("model"):
        model = build_model(config, device, fast_paths, pretrained=not resumed)
        state = new_training_state(model, config, device, amp_dtype, fused=fast_paths, world_size=world_size)
    start_epoch, best_dice = state.load_state_dict(resumed, log) if resumed else (0, -1.0)
    del resumed  # its tensors: the state holds copies now
    if config["COMPILE"]:
        state.model.compile()  # in place: parameter names, and so checkpoints, stay as they are
    parallel_model = torch.nn.parallel.DistributedDataParallel(state.model) if world_size > 1 else state.model

    # Loaders of the training, validation and BatchNorm images, from the resized cache where it fits.
    with stopwatch.part("cache and loaders"):
        loaders = make_loaders(train_samples, val_samples, config, device, rank, world_size, fast_paths, classes)

    # The epoch loop: train, validate the averaged weights as they are saved, save.
    steps_per_epoch = optimizer_steps(loaders.train, config)
    total_steps = config["NUM_EPOCHS"] * steps_per_epoch
    history = resume.read_history(checkpoints / "history.csv", start_epoch)
    split = resume.split_names(train_samples, val_samples)
    if rank == 0:
        make_run_folder(checkpoints)
        # The held-out images, for `predict.py --input CHECKPOINT_DIR/val_files.txt --masks ...`.
        write_text(checkpoints / "val_files.txt", "".join(f"{s.image}\n" for s in val_samples))
    curves = settings.pictures_folder(config) / "training_curves.png"
    metrics, trained_images, worst, curves_drawn = None, 0, None, time.time()
    steps_taken = 0  # optimizer steps (and weight-average updates) of this run
    for epoch in range(start_epoch, config["NUM_EPOCHS"]):
        started = time.time()
        loaders.sampler.set_epoch(epoch)
        try:
            with stopwatch.part("training steps"):
                train_loss = unless_out_of_memory(train_one_epoch, loaders.train, state, parallel_model, config,
                                                  epoch, epoch * steps_per_epoch, total_steps)
        except NonFiniteLoss as error:
            stop_without_saving(checkpoints, error)
        if train_loss is OUT_OF_MEMORY:
            out_of_memory(config, state, checkpoints)
        steps_taken += steps_per_epoch
        trained_images += len(loaders.sampler)
        if not state.finite():
            stop_without_saving(checkpoints, f"the weights became non-finite during epoch {epoch + 1}")
        last = epoch + 1 == config["NUM_EPOCHS"]
        # The last validation also picks the worst images for the gallery (one process scores them all).
        worst = WorstImages(colours=class_colours(classes)) if last and world_size == 1 else None
        metrics = unless_out_of_memory(validate, state, loaders, config, rank, world_size, stopwatch, worst)
        if metrics is OUT_OF_MEMORY:
            out_of_memory(config, state, checkpoints)
        # A model that predicts no car anywhere is never a best, whatever Dice an empty mask scores.
        improved = predicts_car(metrics) and metrics["dice"] > best_dice
        best_dice = metrics["dice"] if improved else best_dice
        if rank == 0:
            checkpoint = {**state.state_dict(), "epoch": epoch + 1, "best_dice": best_dice, "config": config,
                          "model_args": dict(state.model.model_args), "split": split,
                          "image_size": (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]),
                          "crop_size": (config["CROP_HEIGHT"], config["CROP_WIDTH"]),
                          "threshold": config["THRESHOLD"], "classes": classes and classes.as_dict()}
            with stopwatch.part("checkpoints and history"):
                record_epoch(config, epoch, train_loss, metrics, started, history, checkpoint, improved)
            # Matplotlib takes most of a second per drawing: redraw while training at most once a minute.
            if last or time.time() - curves_drawn > 60:
                with stopwatch.part("training curves"):
                    draw_curves(history, curves)
                curves_drawn = time.time()

    # Pictures of the validation images, and where everything is.
    if rank == 0:
        with stopwatch.part("pictures"):
            draw_pictures(state, loaders, config, history, worst, best_dice)
    return {"best_dice": best_dice, "last": metrics, "config": config, "seconds": stopwatch.parts(),
            "optimizer_steps": steps_taken,
            "train_images_per_second": trained_images / stopwatch.seconds["training steps"]
            if stopwatch.seconds["training steps"] else None}


class NonFiniteLoss(Exception):
    pass


OUT_OF_MEMORY = object()


def unless_out_of_memory(function, *args):
    """function(*args), or OUT_OF_MEMORY where the device ran out. The error is not raised on: its
    traceback holds the failed step's tensors, which would stay alive (in a notebook, until the
    kernel restarts) as the context of any exception raised while handling it."""
    try:
        return function(*args)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
    return OUT_OF_MEMORY


LOSS_CHECK_EVERY = 8  # micro-batches between looks at the loss: each look waits for the device


def train_one_epoch(loader, state, parallel_model, config, epoch, steps_done, total_steps):
    """One pass over this process's share of the training images; returns the mean loss. Each
    optimizer step adds the gradients of ACCUMULATE_STEPS micro-batches, each loss weighted by its
    share of the step's images, so the step is the one a batch of all of them would make (BatchNorm
    aside). parallel_model is state.model or its DDP wrapper; the average follows every step. The
    losses stay on the device and are looked at every LOSS_CHECK_EVERY micro-batches, so that the
    host runs ahead of a GPU; a non-finite one stops the run naming the first."""
    parallel_model.train()
    distributed = dist.is_initialized()
    accumulate, batches = config["ACCUMULATE_STEPS"], len(loader)
    sampler = getattr(loader, "sampler", None)  # a DataLoader's; the tests' lists of batches have none
    images_in_epoch = len(sampler) if sampler is not None else None
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config['NUM_EPOCHS']}", unit="batch", leave=False,
               disable=distributed and dist.get_rank() > 0)
    losses = LossRecord(epoch, distributed)
    for batch, (x, y) in enumerate(bar):
        step, micro = divmod(batch, accumulate)
        steps_last = min((step + 1) * accumulate, batches) == batch + 1  # the micro-batch that steps
        if micro == 0:
            for group in state.optimizer.param_groups:
                group["lr"] = learning_rate(config, steps_done + step, total_steps) * group.get("rate_factor", 1.0)
            state.optimizer.zero_grad(set_to_none=True)
            step_images = step_size(step, accumulate, batches, x.shape[0], images_in_epoch)
        # Under torchrun the gradients are summed over processes once per optimizer step: DDP needs
        # the forward pass inside no_sync too, or every micro-batch's backward pass all-reduces.
        with nullcontext() if steps_last or not distributed else parallel_model.no_sync():
            logits = forward(parallel_model, x, state.device, state.amp_dtype)
            loss = segmentation_loss(logits, to_device(y, state.device), config["LOSS"])
            state.scaler.scale(loss * (x.shape[0] / step_images)).backward()
        if steps_last:
            # With float16 the scaler skips a step whose gradients overflowed and lowers its scale;
            # only a non-finite loss stops the run.
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.average.update(state.model)
        losses.add(loss, x.shape[0])
        if len(losses.pending) == LOSS_CHECK_EVERY or batch + 1 == batches:
            bar.set_postfix(loss=f"{losses.check():.4f}")
    return losses.mean()


class LossRecord:
    """An epoch's micro-batch losses, kept on the device until check() looks at them."""

    def __init__(self, epoch, distributed):
        self.epoch, self.distributed = epoch, distributed
        self.pending, self.sizes, self.checked, self.total, self.images = [], [], 0, 0.0, 0

    def add(self, loss, images):
        self.pending.append(loss.detach().float())
        self.sizes.append(images)

    def check(self):
        """The losses since the last check, as one copy from the device (under torchrun the mean over
        processes, so that all stop together); NonFiniteLoss naming the first that is not finite.
        Returns the last of them."""
        values = torch.stack(self.pending)
        if self.distributed:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        values = values.tolist()
        for index, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss became {value} at epoch {self.epoch + 1}, step {self.checked + index + 1}")
        self.total += sum(value * images for value, images in zip(values, self.sizes))
        self.images += sum(self.sizes)
        self.checked += len(values)
        self.pending, self.sizes = [], []
        return values[-1]

    def mean(self):
        if self.pending:
            self.check()
        return self.total / max(1, self.images)


def step_size(step, accumulate, batches, batch_size, images_in_epoch=None):
    """Images in optimizer step `step` of an epoch: its micro-batches are full but for the epoch's last."""
    first, end = step * accumulate, min((step + 1) * accumulate, batches)
    if images_in_epoch is None:
        return (end - first) * batch_size
    return min(end * batch_size, images_in_epoch) - first * batch_size


def optimizer_steps(loader, config):
    """Optimizer steps in an epoch of this loader."""
    return math.ceil(len(loader) / config["ACCUMULATE_STEPS"])


def learning_rate(config, step, total_steps):
    """The cosine decay from LEARNING_RATE to 1% of it, scaled by a linear rise over the first WARMUP
    of the steps (so the highest rate is the cosine's value when the rise ends, about 98% of
    LEARNING_RATE for WARMUP 0.1); derived from the step, so resuming needs no state. The rise lets
    Adam's moment estimates and BatchNorm's statistics settle before full-size steps."""
    progress = min(1.0, step / max(1, total_steps))
    warmup_steps = config["WARMUP"] * total_steps
    rise = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return rise * config["LEARNING_RATE"] * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(config, device, matmul_upsampling=True, pretrained=False):
    """The model of ENCODER; with `pretrained`, its encoder holds ENCODER_WEIGHTS (a new run: a
    resume's weights come from its checkpoint)."""
    memory_format = torch.channels_last if config["CHANNELS_LAST"] else torch.contiguous_format
    model = model_for(config["ENCODER"], config["FEATURES"], config["NUM_CLASSES"], matmul_upsampling=matmul_upsampling,
                      activation_checkpointing=config["ACTIVATION_CHECKPOINTING"])
    if pretrained and config["ENCODER"] != "unet":
        try:
            load_pretrained(model, config["ENCODER_WEIGHTS"])
        except PretrainedWeightsError as error:
            raise SystemExit(f"error: ENCODER_WEIGHTS: {error}") from None
    return model.to(device, memory_format=memory_format)


def make_optimizer(model, config, fused=True):
    """Adam, with the output layer in a group of its own that learns HEAD_LR_FACTOR times faster
    (and a ResNet encoder in one at ENCODER_LR_FACTOR).
    Why: Adam moves each weight by at most about the learning rate per step, and BatchNorm undoes
    any growth in the layers before it, so the logits' scale is set by the last layer alone; at the
    rate of the rest it cannot grow far enough in a short run for the model to become sure of the
    background, and the loss stalls (docs/training.md). fused: one kernel updates every weight
    (where the device has it) instead of several tensor operations per weight."""
    groups = {"encoder.": [], "head.": [], "": []}  # a ResNet's encoder; the output layer; the rest
    for name, parameter in model.named_parameters():
        groups[next(prefix for prefix in groups if name.startswith(prefix))].append(parameter)
    factors = {"encoder.": config["ENCODER_LR_FACTOR"], "head.": config["HEAD_LR_FACTOR"], "": 1.0}
    fused = fused and all(parameter.device.type in ("cpu", "cuda") for parameter in model.parameters())
    # Body first, head second as before (the plain UNet's checkpoints resume as they are), encoder last.
    return torch.optim.Adam([{"params": groups[prefix], "rate_factor": factors[prefix]}
                             for prefix in ("", "head.", "encoder.") if groups[prefix]],
                            lr=config["LEARNING_RATE"], fused=fused or None)


@dataclass
class TrainingState:
    """Everything a training step changes and a checkpoint keeps: the weights the optimizer steps,
    their moving average (what is validated and saved for prediction), the optimizer, the float16
    loss scale, and where and in which precision the steps run."""

    model: torch.nn.Module
    average: ExponentialMovingAverage
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None

    def state_dict(self):
        """`model` holds the averaged weights that were validated (what predict.py uses),
        `training_model` the weights the optimizer steps (what a resume continues)."""
        return {"model": self.average.model.state_dict(), "training_model": self.model.state_dict(),
                "average_steps": self.average.steps, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "amp_dtype": str(self.amp_dtype)}

    def load_state_dict(self, resumed, log):
        """Continue from a Resumed checkpoint: weights, averaged weights, optimizer, loss scale (where
        it applies); returns (epochs done, best Dice)."""
        state = resumed.state
        try:
            self.model.load_state_dict(clean_state_dict(state.get("training_model", state["model"])))
            self.average.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (CheckpointError, RuntimeError, ValueError, KeyError) as error:
            raise SystemExit(f"error: cannot resume (LOAD_MODEL): {str(error).splitlines()[0]}") from None
        self.average.steps = state.get("average_steps", 0)
        saved_dtype = state.get("amp_dtype", str(self.amp_dtype))
        if self.scaler.is_enabled() and state.get("scaler") and saved_dtype == str(self.amp_dtype):
            self.scaler.load_state_dict(state["scaler"])
        elif saved_dtype != str(self.amp_dtype):
            log(f"mixed precision was {saved_dtype}, now {self.amp_dtype}: continuing"
                f"{' with a fresh loss scale' if self.scaler.is_enabled() else ''}")
        done = f"{state['epoch']} epoch{'s' * (state['epoch'] != 1)}"
        log(f"resumed from {resumed.path}: {done} done, best Dice {state['best_dice']:.4f}")
        return state["epoch"], state["best_dice"]

    def finite(self):
        return all_finite(self.average.model.state_dict().values()) and all_finite(self.model.state_dict().values())


def new_training_state(model, config, device, amp_dtype, fused=True, world_size=1):
    """The TrainingState of a new run. Under torchrun with SYNC_BATCHNORM the trained model's
    BatchNorm layers gather statistics over all processes; the average is copied before they do, so
    that rank 0 alone can recompute its statistics and every process can validate it."""
    average = ExponentialMovingAverage(model, config["EMA_DECAY"])
    if config["SYNC_BATCHNORM"] and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Loss scaling is needed only for float16; bfloat16 has float32's range.
    return TrainingState(model, average, make_optimizer(model, config, fused),
                         torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), device, amp_dtype)


@dataclass
class Loaders:
    train: DataLoader
    sampler: dataset.EpochSampler
    val: DataLoader          # this process's share of the validation images
    batchnorm: DataLoader    # the unaugmented training images of recompute_batchnorm
    val_images: dataset.CarvanaDataset  # all of them, for the pictures


def make_loaders(train_samples, val_samples, config, device, rank, world_size, reduced_decoding=True, classes=None):
    """The loaders of a run, reading from the resized cache where it can be built; with classes
    (classes.Classes), of masks read as classes."""
    size = (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"])
    builds = int(os.environ.get("LOCAL_RANK", "0")) == 0  # node-local cache folders work too
    cache_workers = config["NUM_WORKERS"] if config["NUM_WORKERS"] != "auto" else min(8, available_cores())
    caches = {name: split_cache(samples, name, config["CACHE_DIR"], size, builds, cache_workers, classes)
              if config["CACHE_DIR"] else None for name, samples in (("train", train_samples), ("val", val_samples))}
    workers = loader_workers(config, device, caches["train"] is not None)
    # Unaugmented images from the cache need no worker; otherwise workers started for each pass, so
    # that at most twice `workers` loader processes live at once (macOS starts each from scratch).
    passes = 0 if caches["train"] is not None and caches["val"] is not None else workers
    crop = (config["CROP_HEIGHT"], config["CROP_WIDTH"]) if config["CROP_HEIGHT"] else None
    train_set = dataset.CarvanaDataset(train_samples, dataset.train_transform(crop), size, caches["train"],
                                       reduced_decoding, classes)
    sampler = dataset.EpochSampler(train_set, config["SEED"], rank, world_size)
    # Each process scores every world_size-th validation image; evaluate adds up the sums.
    val_share = dataset.CarvanaDataset(val_samples[rank::world_size], dataset.val_transform(), size, caches["val"],
                                       reduced_decoding, classes)
    batchnorm_images = batchnorm_set(train_samples, config, caches["train"], reduced_decoding, classes)
    return Loaders(make_loader(train_set, config, device, workers, sampler, persistent=True), sampler,
                   make_loader(val_share, config, device, passes), make_loader(batchnorm_images, config, device, passes),
                   dataset.CarvanaDataset(val_samples, dataset.val_transform(), size, caches["val"], reduced_decoding,
                                          classes))


def make_loader(images, config, device, workers, sampler=None, persistent=False):
    return DataLoader(images, batch_size=config["BATCH_SIZE"], sampler=sampler, num_workers=workers,
                      persistent_workers=persistent and workers > 0,
                      pin_memory=config["PIN_MEMORY"] and device.type == "cuda")


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


def batchnorm_set(samples, config, cache, reduced_decoding=True, classes=None):
    """The training images that the validated model's BatchNorm statistics are recomputed on before
    each validation: up to BATCHNORM_IMAGES of them, drawn once with SEED (so a resume draws the same),
    without augmentation, as validation and predict.py see images."""
    count = min(len(samples), batchnorm_count(config["BATCHNORM_IMAGES"], len(samples))) or 1
    chosen = sorted(random.Random(config["SEED"]).sample(range(len(samples)), count))
    return dataset.CarvanaDataset([samples[i] for i in chosen], dataset.val_transform(),
                                  (config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]), cache, reduced_decoding, classes)


def batchnorm_count(setting, training_images):
    """BATCHNORM_IMAGES as a count; "auto" is a quarter of the training images, 32 to 256, chosen on
    the real photos (docs/performance.md)."""
    return min(256, max(32, training_images // 4)) if setting == "auto" else setting


def validate(state, loaders, config, rank, world_size, stopwatch, worst=None):
    """The averaged model's scores on the validation images, with BatchNorm statistics of its own
    weights (docs/training.md): what its checkpoint scores in predict.py."""
    with stopwatch.part("BatchNorm recompute"):
        if rank == 0 and config["BATCHNORM_IMAGES"]:
            recompute_batchnorm(state.average.model, loaders.batchnorm, state.device, state.amp_dtype)
        if world_size > 1:  # every process scores the model rank 0 saves, BatchNorm statistics included
            for buffer in state.average.model.buffers():
                dist.broadcast(buffer, 0)
    loss = functools.partial(segmentation_loss, kind=config["LOSS"])
    with stopwatch.part("validation"):
        return evaluate(loaders.val, state.average.model, state.device, config["THRESHOLD"], state.amp_dtype,
                        loss, worst=worst, all_ranks=world_size > 1)


def predicts_car(metrics):
    """Whether the validated model predicts car on some photo (always true when no mask has car)."""
    return metrics["images_predicted_car"] > 0 or metrics["images_with_car"] == 0


def record_epoch(config, epoch, train_loss, metrics, started, history, checkpoint, improved):
    """Print the epoch, add it to history.csv, save best.pt (improved) and then last.pt: a run
    killed between the two saves resumes from the older last.pt (from best.pt when there is none
    yet), repeats the epoch identically and writes the same best.pt again, so the two never disagree."""
    checkpoints = Path(config["CHECKPOINT_DIR"])
    print(f"epoch {epoch + 1}/{config['NUM_EPOCHS']}: train loss {train_loss:.4f}, "
          f"val loss {metrics['loss']:.4f}, val Dice {metrics['dice']:.4f}, "
          f"pixel accuracy {100 * metrics['pixel_accuracy']:.2f}% ({time.time() - started:.0f}s)")
    if checkpoint["classes"]:  # val Dice is the mean of these
        classes = Classes.from_dict(checkpoint["classes"])
        print("  per class: " + ", ".join(f"{classes.name(k + 1)} Dice {dice:.4f} IoU {iou:.4f}" for k, (dice, iou)
                                          in enumerate(zip(metrics["class_dice"], metrics["class_iou"]))))
    if not predicts_car(metrics):
        print(f"  the model predicts no car on any of the {metrics['images']} validation photos (highest car "
              f"probability {metrics['highest_probability']:.2f}, THRESHOLD {config['THRESHOLD']}), so it is not "
              f"saved as best.pt: it has not learned yet; train longer (NUM_EPOCHS) or raise LEARNING_RATE")
    history.append({"epoch": epoch + 1, "train_loss": f"{train_loss:.5f}", "val_loss": f"{metrics['loss']:.5f}",
                    "dice": f"{metrics['dice']:.5f}", "pixel_accuracy": f"{metrics['pixel_accuracy']:.5f}",
                    "learning_rate": f"{checkpoint['optimizer']['param_groups'][0]['lr']:.3g}",
                    "seconds": f"{time.time() - started:.1f}",
                    "class_dice": " ".join(f"{dice:.5f}" for dice in metrics["class_dice"])})
    try:
        write_history(history, checkpoints / "history.csv")
        if improved:
            save_checkpoint(checkpoint, checkpoints / "best.pt")
            print(f"  new best Dice: saved {checkpoints / 'best.pt'}")
            # The same bytes: last.pt becomes a second name for best.pt (a copy where links are not allowed).
            link_checkpoint(checkpoints / "best.pt", checkpoints / "last.pt", checkpoint)
        else:
            save_checkpoint(checkpoint, checkpoints / "last.pt")
    except OSError as error:  # a full disk or a lost Drive mount: the files on disk are still whole
        raise SystemExit(f"error: cannot save epoch {epoch + 1} in {checkpoints} ({error.strerror or error}): free "
                         f"some space; {resume.how_to_go_on(checkpoints)}") from None


def write_history(rows, path):
    with replacing(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, resume.HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def out_of_memory(config, state, checkpoints):
    """An out-of-memory error of a step: one line with the settings that fit (memory.py's count) and
    the last good checkpoint, which is left as it was."""
    if state.device.type == "cuda":
        torch.cuda.empty_cache()  # the failed step's tensors are freed by now: give their memory back
    raise SystemExit(f"error: {memory.out_of_memory_advice(config, state.device, state.amp_dtype)}; "
                     f"{resume.how_to_go_on(checkpoints)}") from None


def stop_without_saving(checkpoints, reason):
    kept = checkpoints / "last.pt"
    raise SystemExit(f"error: {reason}; stopped without saving. Last good checkpoint: "
                     f"{kept if kept.is_file() else 'none yet'}. Try a lower LEARNING_RATE.") from None


def draw_curves(history, path):
    """The training curves, redrawn while training; a failure (a full disk) is a warning, not the end
    of a run whose checkpoints are saved."""
    try:
        save_training_curves(history, path)
    except OSError as error:
        print(f"warning: cannot draw {path} ({error.strerror or error}); training goes on", file=sys.stderr)


def draw_pictures(state, loaders, config, history, worst, best_dice):
    """Four validation predictions of different cars, the training curves and the worst validation
    images in the run's own pictures folder (settings.pictures_folder); then where everything is.
    A picture that cannot be written is one line naming the folder (the checkpoints are whole)."""
    try:
        draw_all_pictures(state, loaders, config, history, worst, best_dice)
    except OSError as error:
        reason = error.strerror or error
        raise SystemExit(f"error: cannot draw the pictures in {settings.pictures_folder(config)} ({reason}); the "
                         f"checkpoints in {config['CHECKPOINT_DIR']} are whole") from None


def draw_all_pictures(state, loaders, config, history, worst, best_dice):
    pictures = settings.pictures_folder(config)
    images = loaders.val_images
    written = save_predictions_as_imgs(images, state.average.model, pictures, state.device,
                                       one_per_car(images.samples), config["THRESHOLD"], state.amp_dtype)
    if worst is None:  # torchrun, or a resumed run with no epochs left: score the whole set here
        worst = WorstImages(colours=class_colours(images.classes))
        evaluate(make_loader(images, config, state.device, 0), state.average.model, state.device,
                 config["THRESHOLD"], state.amp_dtype, worst=worst)
    curves = pictures / "training_curves.png"
    if not curves.exists() and history:
        save_training_curves(history, curves)
    gallery = worst.save(pictures / "worst_predictions.png")
    outcome = (f"best validation Dice {best_dice:.4f}" if best_dice >= 0 else
               "no epoch's model predicted any car, so there is no best.pt (last.pt holds the last weights): "
               "train longer (NUM_EPOCHS) or raise LEARNING_RATE")
    print(f"{outcome}; checkpoints and history.csv in {config['CHECKPOINT_DIR']}/; "
          f"{len(written)} prediction pictures, {curves.name} and {gallery.name} in {pictures}/")


def one_per_car(samples, count=4):
    """Indices of `count` samples, one photo of each car first (then more photos where cars are few)."""
    first = {}
    for index, sample in enumerate(samples):
        first.setdefault(data_folder.car_id(sample.image), index)
    chosen = list(first.values())[:count]
    return chosen + [index for index in range(len(samples)) if index not in chosen][: count - len(chosen)]


def silent(*args, **kwargs):
    """print() for the processes of a torchrun job other than rank 0."""


def demo_runs(config, named):
    """Whether this run is the demo: DEMO on, DATA_DIR left at its default, and no data there."""
    return (config["DEMO"] and "DATA_DIR" not in named and config["DATA_DIR"] == DEMO_DATA_DIR
            and not data_folder.has_data(config["DATA_DIR"]))


def demo_folder(config, named):
    """The demo's run goes to CHECKPOINT_DIR/demo unless CHECKPOINT_DIR is given: the folder that a
    run on your own photos takes next (and predict.py's checkpoints/best.pt) is never the demo's. A
    resume continues the run in CHECKPOINT_DIR itself where there is one (your own run, resumed
    while data/ is empty, or a demo of an earlier version)."""
    checkpoints = Path(config["CHECKPOINT_DIR"])
    if "CHECKPOINT_DIR" in named or not demo_runs(config, named):
        return config
    if config["LOAD_MODEL"] and resume.resume_file(checkpoints).is_file():
        return config
    return {**config, "CHECKPOINT_DIR": str(checkpoints / "demo")}


def prepare_data(config, named, rank=0):
    """Use DATA_DIR if it holds a known layout. Otherwise, with DATA_DIR left at its default and
    DEMO on, the synthetic set under data/synthetic/, made once by rank 0; a DATA_DIR the user
    named (on the command line or by editing the setting) is a one-line error, and nothing is
    created in it."""
    if data_folder.has_data(config["DATA_DIR"]):
        return config
    if not demo_runs(config, named):
        raise SystemExit(f"error: DATA_DIR: {data_folder.layout_error(config['DATA_DIR'])}")
    root = Path(config["DATA_DIR"]) / "synthetic"
    log = silent if rank else print
    log("=" * 78)
    log(f"No training images in {config['DATA_DIR']}/. Running the DEMO on synthetic cars instead.")
    log("For the real data: accept the rules of Kaggle's 'Carvana Image Masking Challenge', then")
    log("  kaggle competitions download -c carvana-image-masking-challenge")
    log(f"and unzip train.zip and train_masks.zip into {config['DATA_DIR']}/ (train/, train_masks/).")
    marker = root / ".complete"
    if rank == 0 and (marker.read_text() if marker.is_file() else "") != repr(DEMO_DATA):
        log(f"Generating {DEMO_DATA['cars'] * 16} synthetic images ({DEMO_DATA['size'][0]}x"
            f"{DEMO_DATA['size'][1]}) under {root}/ ...")
        synthetic.make_synthetic(root, **DEMO_DATA)
        marker.write_text(repr(DEMO_DATA))
    wait_for_other_processes()  # the others wait for rank 0's files
    demo = {name: value for name, value in DEMO_SETTINGS.items()
            if name not in named and not (name == "FEATURES" and config["ENCODER"] != "unet")}
    log("Demo settings in use: " + ", ".join(f"{k}={v}" for k, v in demo.items()))
    log("=" * 78)
    return {**config, **demo, "DATA_DIR": str(root)}


def setup_distributed(config):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, Gloo on CPU.
    Returns (rank, world size, device)."""
    device = get_device(config["DEVICE"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if config["SYNC_BATCHNORM"] and device.type != "cuda":
        raise SystemExit("error: SYNC_BATCHNORM needs CUDA devices; set it to false for CPU runs")
    if device.type == "cuda":
        local_rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= count:
            raise SystemExit(f"error: torchrun started process {local_rank} of this machine, which has {count} CUDA "
                             f"device(s): use --nproc_per_node={count}, or --DEVICE=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def interrupted(config):
    """What a run stopped by Ctrl-C has kept, and how to go on, in one line."""
    kept = resume.resume_file(Path(config["CHECKPOINT_DIR"]))
    if not kept.is_file():
        return "interrupted before the first checkpoint was saved: the same command starts the run again"
    return f"interrupted: the last good checkpoint is {kept}; the same command with --LOAD_MODEL=true continues the run"


def remove_unused(folder, top):
    """Remove a folder this run made and wrote nothing into, with the empty ones it made above it
    up to `top`."""
    if not folder.is_dir() or any(path.name != ".gitignore" for path in folder.iterdir()):
        return
    (folder / ".gitignore").unlink(missing_ok=True)
    for part in (folder, *folder.parents):
        try:
            part.rmdir()
        except OSError:
            return
        if part == top:
            return


def command_line():
    """main() as a command: its one-line errors exit with status 2, as predict.py's do; Ctrl-C, having
    said what is kept, with 130 and no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        return 130
    except SystemExit as error:
        if isinstance(error.code, str):
            print(error.code, file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
