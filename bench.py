"""Measure data loading, training and inference speed on this machine, in one run, as a table.

python bench.py [--height 160 --width 240 --batch 16 --steps 2 --images 24 --data DIR --no-compile]
python bench.py --epoch DIR    # also: one train.py epoch on DIR before and after this project's fast paths
python bench.py --memory       # only: training memory per image at sizes up to Carvana's 1280x1918

Ratios are only meaningful between rows of the same run on the same machine.
"""
import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import data_folder
import dataset
import memory
import synthetic
import train
from cache import ResizedCache
from model import RESNETS, build_model, model_arguments
from stopwatch import synchronize
from utils import (
    ExponentialMovingAverage,
    autocast,
    autocast_dtype,
    forward,
    get_device,
    is_out_of_memory,
    segmentation_loss,
)


def widths(text):
    """--features as a tuple of positive channel counts, or argparse's one-line error."""
    try:
        features = tuple(int(part) for part in text.split(","))
    except ValueError:
        features = ()
    if not features or min(features) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive widths such as 64,128,256,512")
    return features


def device_name(text):
    """--device as a device that exists here, or argparse's one-line error."""
    try:
        get_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=160, help="training height in pixels")
    parser.add_argument("--width", type=int, default=240, help="training width in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per training step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per training path (after a warm-up step)")
    parser.add_argument("--images", type=int, default=24, help="full-size images for the data measurements")
    parser.add_argument("--features", default=(64, 128, 256, 512), type=widths, help="UNet widths (train.py's FEATURES)")
    parser.add_argument("--encoder", default="unet", choices=("unet", *RESNETS),
                        help="train.py's ENCODER (random weights: speed and memory do not depend on them)")
    parser.add_argument("--data", help="a Carvana-layout folder to read instead of generated 1918x1280 images")
    parser.add_argument("--device", default="auto", type=device_name, help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--amp-dtype", default="auto", choices=("auto", "float16", "bfloat16"),
                        help="mixed-precision type (auto: train.py's choice for the device); float16 on a CPU "
                             "counts a T4's memory")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (saves a minute or more on CPU)")
    parser.add_argument("--epoch", metavar="DIR", help="time one train.py epoch on DIR before and after")
    parser.add_argument("--memory", action="store_true", help="print only the table of training memory per image "
                                                               "and the largest batch that fits a T4, an A100 40 GB and an 80 GB GPU")
    return parser.parse_args(argv)


class PeakMemory:
    """Peak memory of a block: CUDA's allocator on a GPU, the process's resident set on a CPU."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:  # Linux: "5" resets the peak resident set size (VmHWM)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start = resident("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else resident("VmHWM")

    @property
    def grown(self):
        """How far the peak rose above the memory in use when the block began."""
        return self.peak - self.start


def resident(field):
    """This process's resident memory (VmRSS) or its peak (VmHWM) in bytes, from /proc; else the peak."""
    import resource

    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    kib = [int(line.split()[1]) for line in lines if line.startswith(f"{field}:")]
    return 1024 * (kib[0] if kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def data_rates(samples, size, count):
    """Images/s through CarvanaDataset (training transform included) in one process."""
    rates = {}
    transform = dataset.train_transform()
    with tempfile.TemporaryDirectory() as folder:
        cache = ResizedCache(folder, "bench", samples, size)
        started = time.perf_counter()
        cache.build()
        rates["cache build (once)"] = len(samples) / (time.perf_counter() - started)
        modes = {"full decode + resize": (False, None), "reduced JPEG decode": (True, None), "cache": (True, cache)}
        for name, (reduced, source) in modes.items():
            images = dataset.CarvanaDataset(samples, transform, size, source, reduced_decoding=reduced)
            images[0]
            started = time.perf_counter()
            for index in range(count):
                images[index % len(images)]
            rates[name] = count / (time.perf_counter() - started)
    return rates


def matmul_ceiling(device, dtype, size=4096, repeats=3):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def training_rate(args, device, model_args, amp_dtype, channels_last, compile_model, fast_paths=True):
    """(images/s, FLOP per step, peak bytes) of train.py's optimizer steps on random batches; without
    fast_paths, with transposed convolutions and per-weight Adam."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_args, matmul_upsampling=fast_paths).to(device, memory_format=memory_format)
    optimizer = train.make_optimizer(model, train.defaults(), fused=fast_paths)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    x = torch.randn(args.batch, 3, args.height, args.width, device=device).contiguous(memory_format=memory_format)
    y = (torch.rand(args.batch, 1, args.height, args.width, device=device) > 0.5).float()

    def step():
        loss = segmentation_loss(forward(model, x, device, amp_dtype), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    if compile_model:
        model.compile()
        step()  # compilation happens here
    synchronize(device)
    with PeakMemory(device) as peak:
        best = float("inf")
        for _ in range(args.steps):
            started = time.perf_counter()
            step()
            synchronize(device)
            best = min(best, time.perf_counter() - started)
    return args.batch / best, counter.get_total_flops(), peak.peak


@torch.no_grad()
def inference_rate(args, device, model_args, amp_dtype):
    model = build_model(model_args).to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(args.batch, 3, args.height, args.width, device=device).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        model(x)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            model(x)
        synchronize(device)
    return args.batch * args.steps / (time.perf_counter() - started)


MEMORY_SIZES = ((160, 240), (320, 480), (640, 960), (1280, 1918))
CAPACITIES = (14.7, 39.5, 79.1)  # GiB as torch reports them: a T4 (16 GB), an A100 40 GB, an A100 or H100 80 GB


def real_step(model_args, size, batch, device, amp_dtype, checkpointing):
    """(peak bytes above what was in use before the model existed, seconds) of one training step of a
    fresh model at size, after a first step that builds Adam's state."""
    with PeakMemory(device) as peak:
        model = build_model(model_args, activation_checkpointing=checkpointing).to(device,
                                                                                 memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters())
        average = [parameter.detach().clone() for parameter in model.parameters()]  # the weight average's copy
        x = torch.rand(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(batch, 1, *size, device=device) > 0.5).float()
        for _ in range(2):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            segmentation_loss(forward(model, x, device, amp_dtype), y).backward()
            optimizer.step()
            synchronize(device)
    del model, optimizer, average, x, y
    return peak.grown, time.perf_counter() - started


def real_step_alone(*arguments):
    """real_step in a fresh process: memory that earlier steps freed but this process kept would hide
    the growth of the resident set."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(real_step, arguments)


def memory_rows(args, device, amp_dtype):
    """Training memory per image of the plain UNet (args.features) and each ResNet UNet at
    MEMORY_SIZES with and without activation checkpointing, in the device's mixed-precision type,
    and the largest batch that fits each of CAPACITIES; on a GPU measured by its allocator (two real
    steps a size), elsewhere counted (memory.step_bytes); checked against real steps of
    args.encoder at 320x480."""
    kind = "measured by the CUDA allocator" if device.type == "cuda" else "counted"
    rows = [("model, training size", "activation checkpointing", f"memory per image ({kind})",
             f"largest batch in {' / '.join(map(str, CAPACITIES))} GiB")]
    for encoder in ("unet", *RESNETS):
        model_args = model_arguments(encoder, args.features)
        fixed = memory.fixed_training_bytes(build_model(model_args))
        model = f"UNet{args.features}" if encoder == "unet" else f"{encoder} UNet"
        rows.append((f"{model}: weights, gradients, Adam's moments, the weight average", "",
                     f"{fixed / 2**30:.2f} GiB", ""))
        for size in MEMORY_SIZES:
            for checkpointing in (False, True):
                name = (f"{model}, {size[0]}x{size[1]}", "on" if checkpointing else "off")
                try:
                    if device.type == "cuda":
                        one, two = (real_step(model_args, size, batch, device, amp_dtype, checkpointing)[0]
                                    for batch in (1, 2))
                        per_image, per_step = two - one, max(0, one - (two - one) - fixed)
                    else:
                        per_step, per_image = memory.step_bytes(model_args, size, amp_dtype, checkpointing)
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    rows.append((*name, "does not fit here at batch 2", ""))
                    torch.cuda.empty_cache()
                    continue
                fits = [memory.largest_batch(capacity * 2**30, per_image, fixed + per_step)
                        for capacity in CAPACITIES]
                rows.append((*name, f"{per_image / 2**30:.2f} GiB", " / ".join(map(str, fits))))
    model_args = model_arguments(args.encoder, args.features)
    fixed = memory.fixed_training_bytes(build_model(model_args))
    size, batch = (320, 480), 2
    # Real steps in the type this device runs fast: float16 convolutions on a CPU take many minutes.
    checked = autocast_dtype(device) if device.type == "cpu" else amp_dtype
    seconds = {}
    for checkpointing in (False, True):
        grown, seconds[checkpointing] = real_step_alone(model_args, size, batch, device, checked, checkpointing)
        per_step, per_image = memory.step_bytes(model_args, size, checked, checkpointing)
        predicted = fixed + per_step + batch * per_image
        check = f"check: one real step at {size[0]}x{size[1]}, batch {batch}, {checked or torch.float32}"
        rows.append((f"{check}: peak growth / counted",
                     "on" if checkpointing else "off", f"{grown / 2**30:.2f} / {predicted / 2**30:.2f} GiB",
                     f"{grown / predicted:.2f}x"))
    rows.append((f"step time at {size[0]}x{size[1]}, batch {batch}: with checkpointing / without", "",
                 f"{seconds[True]:.2f} s / {seconds[False]:.2f} s", f"{seconds[True] / seconds[False]:.2f}x"))
    return rows


def epoch_run(args, extra, folder, fast_paths=True):
    """(wall seconds, train.main's result) of a whole one-epoch train.py run: start-up, scan,
    cache, the epoch, validation, checkpoints and pictures."""
    started = time.perf_counter()
    model = ([f"--FEATURES={','.join(map(str, args.features))}"] if args.encoder == "unet"
             else [f"--ENCODER={args.encoder}", "--ENCODER_WEIGHTS=none"])  # FEATURES: the plain UNet's only
    result = train.main(fast_paths=fast_paths, argv=[f"--DATA_DIR={args.epoch}", f"--CHECKPOINT_DIR={folder}/checkpoints",
                         f"--SAVED_IMAGES={folder}/images", "--NUM_EPOCHS=1", "--DEMO=false", *model,
                         f"--BATCH_SIZE={args.batch}",
                         f"--IMAGE_HEIGHT={args.height}", f"--IMAGE_WIDTH={args.width}", f"--DEVICE={args.device}",
                         *extra])
    return time.perf_counter() - started, result


def epoch_rows(args, step_rate):
    """One train.py epoch before (mixed precision, but NCHW, transposed convolutions, per-weight Adam
    and full decoding every epoch) and after (channels-last, reduced decoding, cache, compile), on the
    same folder; and the training loop's own rate next to the step's alone."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        before, _ = epoch_run(args, ["--CHANNELS_LAST=false", "--CACHE_DIR="], f"{folder}/before",
                              fast_paths=False)
        cache = f"--CACHE_DIR={folder}/cache"
        first, first_result = epoch_run(args, [cache], f"{folder}/1")
        ready, result = epoch_run(args, [cache], f"{folder}/2")
        runs = [("before: NCHW, transposed convolutions, per-weight Adam, full decode every epoch", before),
                ("after, first run (builds the cache)", first), ("after, cache ready", ready)]
        if not args.no_compile:
            compiled, _ = epoch_run(args, [cache, "--COMPILE=true"], f"{folder}/3")
            runs.append(("after, cache ready, COMPILE=true", compiled))
        rows += [(f"train.py 1-epoch run, {name}", f"{seconds:.0f} s", f"{before / seconds:.2f}x")
                 for name, seconds in runs]
        loop_rate = result["train_images_per_second"]
        rows.append(("  training loop of that run (cache ready), share of the step rate above",
                     f"{loop_rate:.2f} img/s", f"{100 * loop_rate / step_rate:.0f}%"))
        rows += part_rows(result, ready)
        built = first_result["seconds"]["cache and loaders"]
        rows.append(("  part of the first run: cache and loaders (building the cache)", f"{built:.2f} s",
                     f"{100 * built / first:.0f}%"))
    return rows


def part_rows(result, wall):
    """Where the cache-ready run's time went, a row a part, with its share of the run's wall time;
    the weight average, updated after every optimizer step inside the training steps, timed alone."""
    seconds = dict(result["seconds"])
    seconds["other"] += wall - sum(seconds.values())  # settings, start-up and the exit, outside train.run
    rows = [(f"  part: {name}", f"{value:.2f} s", f"{100 * value / wall:.0f}%")
            for name, value in sorted(seconds.items(), key=lambda item: -item[1])]
    config = result["config"]
    device = get_device(config["DEVICE"])
    model = build_model(model_arguments(config["ENCODER"], config["FEATURES"])).to(device)
    average = ExponentialMovingAverage(model, config["EMA_DECAY"])
    synchronize(device)
    started = time.perf_counter()
    for _ in range(3):
        average.update(model)
    synchronize(device)
    update = (time.perf_counter() - started) / 3
    steps = result["optimizer_steps"]
    rows.append((f"  of the training steps: weight average, {steps} updates of {1000 * update:.0f} ms alone",
                 f"{steps * update:.2f} s", f"{100 * steps * update / wall:.0f}%"))
    return rows


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = get_device(args.device)
    model_args = model_arguments(args.encoder, args.features)
    size = (args.height, args.width)
    fast_dtype = autocast_dtype(device, args.amp_dtype)
    rows = []
    if args.memory:
        print_table(device, args, memory_rows(args, device, fast_dtype))
        return

    with tempfile.TemporaryDirectory() as folder:
        if args.data:
            splits = data_folder.find_splits(args.data)
            samples = data_folder.scan_pairs(*splits["train"])[0][: args.images]
        else:
            synthetic.make_synthetic(folder, cars=-(-args.images // 16), angles=min(16, args.images), progress=False)
            samples = data_folder.scan_pairs(Path(folder) / "train", Path(folder) / "train_masks")[0][: args.images]
        rates = data_rates(samples, size, max(len(samples), 48))
    base = rates["full decode + resize"]
    source = f"{samples[0].width}x{samples[0].height} {'files of ' + args.data if args.data else 'synthetic'}"
    for name, rate in rates.items():
        rows.append((f"data {name} ({source})", f"{rate:.1f} img/s",
                     "" if name.startswith("cache build") else f"{rate / base:.2f}x"))

    ceilings = {torch.float32: matmul_ceiling(device, torch.float32)}
    if fast_dtype is not None:
        ceilings[fast_dtype] = matmul_ceiling(device, fast_dtype)
    fast = f"{fast_dtype} autocast, channels-last" if fast_dtype else "float32, channels-last"
    paths = [("float32, NCHW", None, False, False, False),
             (f"{fast}, transposed convolutions, per-weight Adam", fast_dtype, True, False, False),
             (fast, fast_dtype, True, False, True)]
    if not args.no_compile:
        paths.append((f"{fast}, compiled", fast_dtype, True, True, True))
    base = None
    for name, dtype, channels_last, compile_model, fast_paths in paths:
        rate, flops, peak = training_rate(args, device, model_args, dtype, channels_last, compile_model, fast_paths)
        base = base or rate
        if channels_last and not compile_model and fast_paths:
            step_rate = rate  # train.py's default path: the rate its whole loop is compared with
        share = flops * rate / args.batch / ceilings[dtype or torch.float32]
        rows.append((f"train {name}", f"{rate:.2f} img/s", f"{rate / base:.2f}x"))
        rows.append((f"  FLOP rate, share of {dtype or torch.float32} matmul ceiling",
                     f"{flops * rate / args.batch / 1e9:.0f} GFLOP/s", f"{100 * share:.0f}%"))
        rows.append(("  peak memory", f"{peak / 2**30:.2f} GiB", ""))
    for dtype, ceiling in ceilings.items():
        rows.append((f"matmul ceiling {dtype} (4096^3)", f"{ceiling / 1e9:.0f} GFLOP/s", ""))
    rows.append((f"inference {fast}",
                 f"{inference_rate(args, device, model_args, fast_dtype):.1f} img/s", ""))
    if args.epoch:
        rows += epoch_rows(args, step_rate)

    print_table(device, args, [("measurement", "value", "ratio"), *rows])


def print_table(device, args, rows):
    """rows[0] is the header."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"
    shape = "" if args.memory else f"{args.height}x{args.width}, batch {args.batch}, "
    amp = autocast_dtype(device, args.amp_dtype)
    model = "UNet" + str(args.features) if args.encoder == "unet" else f"{args.encoder} UNet"
    print(f"\n{name}; torch {torch.__version__}; mixed precision {amp}; {shape}{model}")
    print(f"| {' | '.join(rows[0])} |\n|{'---|' * len(rows[0])}")
    for row in rows[1:]:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
