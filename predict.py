"""Turn a checkpoint and images into full-resolution masks, scores and a Kaggle submission.

python predict.py --checkpoint checkpoints/best.pt --input data/test [--masks data/train_masks]
python predict.py --checkpoint checkpoints/best.pt --input data/test --submission submission.csv --no-images
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import dataset as data
from files import not_a_folder, replacing, write_text
from utils import (
    THRESHOLDS,
    CheckpointError,
    WorstImages,
    all_finite,
    autocast,
    autocast_dtype,
    dice_by_threshold,
    dice_numpy,
    get_device,
    load_checkpoint,
    model_from_checkpoint,
    overlay,
    to_model_input,
)

SUBMISSION_HEADER = "img,rle_mask\n"
ENCODER_THREADS = 2  # CPU threads making submission rows while the model runs


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--input", required=True, help="an image, a folder of images, or a .txt list of image paths")
    parser.add_argument("--output", default="saved_images/predictions", help="folder for masks and overlays")
    parser.add_argument("--threshold", type=float, help="probability cut-off (default: the checkpoint's)")
    parser.add_argument("--masks", help="folder of true masks (Carvana naming): print Dice, pixel accuracy, "
                                         "the best threshold, and draw the worst images")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--submission", help="write Kaggle's img,rle_mask CSV here")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted --submission file")
    parser.add_argument("--no-images", action="store_true", help="write no mask or overlay files (submissions)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--workers", type=int, help="processes decoding images (0: none; default: a quarter of "
                                                     "the CPU cores, at least 1, or up to 8 with a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 even where mixed precision is available")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1 or (args.workers or 0) < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    if args.resume and not args.submission:
        parser.error("--resume continues a --submission file: name it")
    if args.no_images and not (args.submission or args.masks):
        parser.error("--no-images without --submission or --masks would write nothing")
    return args


def input_files(path):
    path = Path(path)
    if path.is_dir():
        return data.visible_files(path)
    if path.suffix.lower() == ".txt" and path.is_file():
        return listed_files(path)
    return [path] if path.is_file() else []


def listed_files(list_path):
    """The files a .txt list names, one a line; blank lines and `#` comments are skipped. Relative
    paths are read from the list's own folder; one found only from the current folder is still
    taken (train.py's val_files.txt holds paths as DATA_DIR was given). A file listed twice is
    predicted once; missing files are named in one warning and skipped."""
    found, missing, seen = [], [], set()
    for line in read_list(list_path).splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        listed = Path(entry).expanduser()
        path = listed if listed.is_absolute() else list_path.parent / listed
        if not path.is_file() and listed.is_file():
            path = listed
        if not path.is_file():
            missing.append(str(path))
        elif os.path.abspath(path) not in seen:
            seen.add(os.path.abspath(path))
            found.append(path)
    if missing:
        names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"warning: {len(missing)} file(s) listed in {list_path} do not exist (skipped): {names}",
              file=sys.stderr)
    return found


def read_list(list_path):
    """A list file's text: UTF-8 (with or without a byte-order mark) or UTF-16 with its mark, as
    editors on Windows save them; ValueError naming the file otherwise."""
    raw = list_path.read_bytes()
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        raise ValueError(f"{list_path}: not a text list of image paths (neither UTF-8 nor UTF-16 with a "
                         f"byte-order mark)") from None


def output_names(paths):
    """A distinct name for each input's mask and overlay files: its stem (`car`) when no other input
    shares it, else its file name (`car.jpg`, `car.png`), else the file name behind as many of its
    folders as tell it apart (`left__car.jpg`, `right__car.jpg`)."""
    depth = dict.fromkeys(paths, 0)
    parts = {}

    def name(path):
        if depth[path] == 0:
            return path.stem
        if path not in parts:  # not resolved: symbolic links keep their own names
            parts[path] = Path(os.path.abspath(path)).parts
        return "__".join(parts[path][-depth[path]:])

    while True:
        counts = Counter(name(path) for path in depth)
        clashing = [path for path in depth if counts[name(path)] > 1]
        deeper = [path for path in clashing if depth[path] <= len(parts.get(path, ()))]
        if not deeper:  # distinct names, or one file given twice (the same masks)
            return {path: name(path) for path in depth}
        for path in deeper:
            depth[path] += 1


class ImageFiles(Dataset):
    """(path, full (height, width), model-ready tensor, full image or None), so that loader workers
    decode while the model runs. An unreadable file comes back as (path, its reason, None, None).
    `reduced`: no full-size image is needed, so JPEGs are decoded at libjpeg's largest DCT-domain
    reduction that still covers the model's size (1918x1280 -> 240x160 directly, ~4x faster)."""

    def __init__(self, paths, image_size, keep_image, reduced=False):
        self.paths, self.size, self.keep_image, self.reduced = paths, tuple(image_size), keep_image, reduced
        self.transform = data.val_transform()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        problem, displayed = data.image_problem(path)  # displayed: data.image_size's (width, height)
        if problem:
            return path, problem, None, None
        try:
            if self.reduced:
                width, height = displayed
                image, small = None, data.load_image(path, self.size, displayed)
            else:
                image = data.read_image(path)
                (height, width), small = image.shape[:2], data.shrink_image(image, self.size)
        except (OSError, ValueError, cv2.error):
            return path, "cannot decode image", None, None
        x = data.to_tensor(self.transform(image=small)["image"])
        return path, (height, width), x, image if self.keep_image else None


def as_list(batch):
    return batch


@torch.no_grad()
def model_probabilities(model, x, device, amp_dtype, tta=False):
    """Car probability (float32, N x 1 x model size) of a batch, on the device."""
    x = to_model_input(x, model, device)
    with autocast(device, amp_dtype):
        probability = torch.sigmoid(model(x).float())
        if tta:  # the flip's prediction, flipped back
            probability = (probability + torch.sigmoid(model(x.flip(3)).float()).flip(3)) / 2
    return probability


def upsample(probability, size):
    """One image's probability (a 2-D float32 array) at size (height, width), bilinear with pixel
    centres aligned: the same values as torch's align_corners=False, ~9x faster on a CPU."""
    return cv2.resize(probability, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def probabilities(model, x, sizes, device, amp_dtype, tta=False):
    """Car probability for each image of a batch, upsampled to each image's own size."""
    probability = model_probabilities(model, x, device, amp_dtype, tta)
    if device.type == "cpu":
        return [upsample(p, size) for p, size in zip(probability[:, 0].numpy(), sizes)]
    return [F.interpolate(probability[i:i + 1], size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            for i, size in enumerate(sizes)]


def run_length_text(mask):
    """Kaggle's run-length text of a mask, exactly utils.rle_encode's, ~5x faster: one comparison of
    each flattened pixel with the next finds every run's start and end."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    flat = (flat if flat.dtype == bool else flat != 0).view(np.uint8)
    if not flat.size:
        return ""
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 2  # 1-indexed first pixel after each change
    edges = np.concatenate((np.array([1] if flat[0] else [], np.int64), changes,
                            np.array([flat.size + 1] if flat[-1] else [], np.int64)))
    return runs_text(edges)


def runs_text(edges):
    """"start length ..." from 1-indexed run edges (start, end + 1, start, end + 1, ...)."""
    edges = np.asarray(edges, np.int64)
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges.tolist()))


def cpu_row(probability, size, threshold):
    """A submission row's run-length text from one low-resolution probability (a pool thread's work:
    cv2 and numpy release the GIL)."""
    return run_length_text(upsample(probability, size) > threshold)


@torch.no_grad()
def device_rows(probability, sizes, threshold):
    """Run-length texts of a batch's masks, made where the batch is: the upsampling, threshold and
    run edges run on the device and only the edges are copied back."""
    rows = [None] * len(sizes)
    for size in dict.fromkeys(sizes):
        chosen = [i for i, other in enumerate(sizes) if other == size]
        mask = F.interpolate(probability[chosen], size=size, mode="bilinear", align_corners=False)[:, 0] > threshold
        flat = mask.flatten(1)
        border = flat.new_zeros(len(chosen), 1)
        flat = torch.cat((border, flat, border), 1)  # every run starts and ends inside
        image, edge = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
        counts = torch.bincount(image, minlength=len(chosen)).cpu().numpy()
        edges = np.split((edge + 1).cpu().numpy(), np.cumsum(counts)[:-1])
        for i, image_edges in zip(chosen, edges):
            rows[i] = runs_text(image_edges)
    return rows


class Submission:
    """img,rle_mask rows appended and flushed one by one, so the file only grows by whole rows; a
    resume drops a row cut off by the interruption with one atomic replacement. Beside it,
    `<file>.source` records the model and options that made its rows: a resume with others is refused."""

    def __init__(self, path, resume, source):
        self.path, self.done = Path(path), set()
        record = self.path.with_name(f"{self.path.name}.source")
        if self.path.exists() and not resume:
            raise SystemExit(f"error: {self.path} exists: pass --resume to continue it, or remove it")
        if resume and self.path.exists():
            self.check_source(record, source)
            self.done = self.complete_rows()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(record, json.dumps(source, indent=1))
            with open(self.path, "x") as stream:
                stream.write(SUBMISSION_HEADER)
        self.stream = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())

    def check_source(self, record, source):
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            print(f"warning: {record} is missing, so nothing tells which model wrote the rows in {self.path}: "
                  f"continuing them with {source['checkpoint']}", file=sys.stderr)
            return
        changed = [name for name in source if name != "checkpoint" and saved.get(name) != source[name]]
        if changed:
            what = "model" if changed == ["model"] else ", ".join(changed)
            raise SystemExit(f"error: {self.path} holds rows made with another {what} (by {saved.get('checkpoint')}"
                             f"): resuming it with {source['checkpoint']} would mix two models; write a new file")

    def complete_rows(self):
        """Names of the complete rows; a cut-off last row is dropped (the file atomically replaced)."""
        done, length = set(), 0
        with open(self.path, newline="") as stream:
            first = stream.readline()
            if first and first != SUBMISSION_HEADER:
                raise SystemExit(f"error: {self.path} is not a submission (its first line is not img,rle_mask)")
            length = len(first.encode()) if first.endswith("\n") else 0
            for line in stream:
                if not line.endswith("\n"):
                    break
                done.add(line.split(",", 1)[0])
                length += len(line.encode())
        if length != self.path.stat().st_size:
            with open(self.path, "rb") as source, replacing(self.path) as copy:
                if length == 0:
                    copy.write(SUBMISSION_HEADER.encode())
                else:
                    shutil.copyfileobj(LimitedReader(source, length), copy)
        return done

    def add(self, name, text):
        """One row: the image's file name and its mask's run-length text."""
        self.stream.write(f"{name},{text}\n")

    def close(self):
        self.stream.close()


class LimitedReader:
    """The first `limit` bytes of a binary stream."""

    def __init__(self, stream, limit):
        self.stream, self.left = stream, limit

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        chunk = self.stream.read(size)
        self.left -= len(chunk)
        return chunk


def submission_source(checkpoint, state, threshold, tta):
    """What makes a submission's rows: the model's weights (a digest), its input size, the threshold
    and TTA. Rows made with other values do not belong in the same file."""
    digest = hashlib.sha1()
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"checkpoint": str(checkpoint), "model": digest.hexdigest(), "image_size": list(state["image_size"]),
            "threshold": threshold, "tta": tta}


def unusable_names(paths):
    """File names that cannot be a field of Kaggle's CSV rows (a comma, quote or line break)."""
    return sorted({path.name for path in paths if any(mark in path.name for mark in ',"\n\r')})


class RowEncoder:
    """Submission rows from batches of model-size probabilities, written in input order. On a GPU
    the rows are made on the device (device_rows); on a CPU `threads` threads make them while the
    main thread runs the model, at most `ahead` images behind it."""

    def __init__(self, device, threshold, threads, ahead):
        self.threshold, self.ahead, self.pending, self.written = threshold, ahead, deque(), 0
        self.pool = ThreadPoolExecutor(threads, "encoder") if device.type == "cpu" and threads else None
        self.device = device

    def add(self, paths, probability, sizes):
        if self.device.type != "cpu":
            self.pending.extend(zip(paths, device_rows(probability, sizes, self.threshold)))
            return
        for path, small, size in zip(paths, probability[:, 0].numpy(), sizes):
            row = self.pool.submit(cpu_row, small, size, self.threshold) if self.pool else cpu_row(
                small, size, self.threshold)
            self.pending.append((path, row))

    def write(self, submission, everything=False):
        """Write the finished rows at the head of the queue (all of them with `everything`, and
        waiting for rows when the queue is longer than `ahead`)."""
        while self.pending and (everything or len(self.pending) > self.ahead or finished(self.pending[0][1])):
            path, row = self.pending.popleft()
            submission.add(path.name, row.result() if isinstance(row, Future) else row)
            self.written += 1

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def finished(row):
    return not isinstance(row, Future) or row.done()


class Scores:
    """Full-resolution Dice and pixel accuracy, and Dice for every threshold in THRESHOLDS."""

    def __init__(self):
        self.dice, self.correct, self.pixels, self.unscored = [], 0, 0, []
        self.by_threshold, self.with_car, self.predicted_car, self.highest = 0.0, 0, 0, 0.0
        self.worst = WorstImages()

    def add(self, path, image, probability, mask, truth):
        if truth is None or truth.shape != mask.shape:
            self.unscored.append(path.name)
            return
        dice = dice_numpy(mask, truth)
        self.dice.append(dice)
        self.with_car += bool(truth.any())
        self.predicted_car += bool(mask.any())
        self.highest = max(self.highest, float(probability.max()))
        self.correct += int((mask == truth.astype(bool)).sum())
        self.pixels += truth.size
        self.by_threshold = self.by_threshold + dice_by_threshold(probability, truth)
        if image is not None:
            self.worst.add(path.name, dice, image, truth, mask)

    def report(self, threshold, mask_dir, gallery):
        if self.unscored:
            names = ", ".join(self.unscored[:5]) + (" ..." if len(self.unscored) > 5 else "")
            print(f"warning: no usable mask in {mask_dir} for {len(self.unscored)} image(s): {names}", file=sys.stderr)
        if not self.dice:
            return
        n = len(self.dice)
        print(f"full-resolution Dice {np.mean(self.dice):.4f} (mean over {n} images), "
              f"pixel accuracy {100 * self.correct / self.pixels:.2f}%, threshold {threshold}")
        if self.with_car == 0:
            print(f"warning: all {n} true masks are empty (no car), so Dice says nothing of finding cars", file=sys.stderr)
        if self.with_car and not self.predicted_car:
            print(f"warning: the model predicts no car on any of these {n} images (highest car probability "
                  f"{self.highest:.2f}): it has not learned; train it longer or at a higher LEARNING_RATE, a "
                  f"lower threshold is no cure", file=sys.stderr)
        else:
            best = int(np.argmax(self.by_threshold))
            print(f"best threshold on these images: {THRESHOLDS[best]:.2f} (Dice {self.by_threshold[best] / n:.4f}); "
                  f"pass --threshold {THRESHOLDS[best]:.2f} to use it")
        if self.worst.save(gallery):
            print(f"worst images drawn in {gallery}")


def read_truth(image_path, mask_dir):
    mask_path = data.find_mask(image_path, mask_dir)
    try:
        return data.read_mask(mask_path) if mask_path else None
    except ValueError:
        return None


def write_outputs(path, name, image, mask, probability, args, submission, scores):
    """Everything asked for one image: mask and overlay files called `name`_..., a submission row,
    its scores."""
    if not args.no_images:
        output = Path(args.output)
        cv2.imwrite(str(output / f"{name}_mask.png"), mask.astype(np.uint8) * 255)
        cv2.imwrite(str(output / f"{name}_overlay.jpg"), cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))
    if submission:
        submission.add(path.name, run_length_text(mask))
    if scores:
        scores.add(path, image, probability, mask, read_truth(path, args.masks))


class Predictor:
    """The model and everything asked for its predictions; `finished` counts the images done."""

    def __init__(self, model, device, amp_dtype, threshold, args, names, submission, scores, encoder):
        self.model, self.device, self.amp_dtype, self.threshold = model, device, amp_dtype, threshold
        self.args, self.names, self.submission, self.scores, self.encoder = args, names, submission, scores, encoder
        self.written = 0

    @property
    def finished(self):
        return self.encoder.written if self.encoder else self.written

    def batch(self, items):
        x, sizes = torch.stack([item[2] for item in items]), [item[1] for item in items]
        if self.encoder:  # submission rows only: low-resolution probabilities to the encoder
            probability = model_probabilities(self.model, x, self.device, self.amp_dtype, self.args.tta)
            self.encoder.add([item[0] for item in items], probability, sizes)
            self.encoder.write(self.submission)
            return
        for (path, _, _, image), probability in zip(items, probabilities(self.model, x, sizes, self.device,
                                                                         self.amp_dtype, self.args.tta)):
            write_outputs(path, self.names[path], image, probability > self.threshold, probability, self.args,
                          self.submission, self.scores)
            self.written += 1


def duplicate_names(paths):
    """File names that more than one input has (Kaggle keys submission rows by file name)."""
    counts = Counter(path.name for path in paths)
    return sorted(name for name, count in counts.items() if count > 1)


def cpu_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device):
    """Decoding processes: on a GPU machine enough to keep the GPU busy; on a CPU the model needs
    most of the cores, so a quarter of them (at least one)."""
    return min(8, cpu_cores()) if device.type != "cpu" else max(1, cpu_cores() // 4)


def model_threads(workers):
    """CPU threads for the model: the cores the decoding processes leave. More would share cores
    with them, and torch's threads wait for each other at every layer: on 2 cores, 2 threads and
    one decoding process predicted 5x slower than 1 thread and one process."""
    return max(1, cpu_cores() - workers)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = output_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        device = get_device(args.device)
        state = load_checkpoint(args.checkpoint, device)
        if not all_finite(state["model"].values()):
            raise CheckpointError(f"{args.checkpoint}: its weights hold NaN or infinite values; use another "
                                  f"checkpoint of the run (best.pt, last.pt)")
        model = model_from_checkpoint(state, device).to(memory_format=torch.channels_last)
        paths = input_files(args.input)
    except (CheckpointError, ValueError) as error:
        message = str(error) if str(args.checkpoint) in str(error) or isinstance(error, ValueError) else \
            f"{args.checkpoint}: {error}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else state.get("threshold", 0.5)
    amp_dtype = None if args.no_amp else autocast_dtype(device)
    if not paths:
        print(f"error: no images found at {args.input}", file=sys.stderr)
        return 1
    clashing = duplicate_names(paths) if args.submission else []
    if clashing:
        print(f"error: {len(clashing)} file name(s) belong to more than one input ({', '.join(clashing[:5])}"
              f"{' ...' if len(clashing) > 5 else ''}) and Kaggle keys submission rows by file name: "
              f"submit one folder at a time", file=sys.stderr)
        return 1
    unusable = unusable_names(paths) if args.submission else []
    if unusable:
        print(f"error: {len(unusable)} file name(s) cannot be a submission row ({', '.join(map(repr, unusable[:5]))}"
              f"{' ...' if len(unusable) > 5 else ''}: a comma, quote or line break would split the row); rename "
              f"them", file=sys.stderr)
        return 1
    names = output_names(paths)
    source = submission_source(args.checkpoint, state, threshold, args.tta) if args.submission else None
    submission = Submission(args.submission, args.resume, source) if args.submission else None
    if submission and submission.done:
        paths = [p for p in paths if p.name not in submission.done]
        print(f"resuming {args.submission}: {len(submission.done)} rows already written, {len(paths)} images to go")
    output = Path(args.output)
    if not args.no_images:
        output.mkdir(parents=True, exist_ok=True)
    scores = Scores() if args.masks else None

    # Only submission rows wanted: decode at the model's size and encode rows off the main thread.
    rows_only = args.no_images and scores is None
    keep_image = not args.no_images or scores is not None
    workers = default_workers(device) if args.workers is None else args.workers
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(model_threads(workers))
    loader = DataLoader(ImageFiles(paths, state["image_size"], keep_image, reduced=rows_only),
                        batch_size=args.batch_size, num_workers=workers, collate_fn=as_list)
    encoder = RowEncoder(device, threshold, ENCODER_THREADS, 2 * args.batch_size) if rows_only else None
    predictor = Predictor(model, device, amp_dtype, threshold, args, names, submission, scores, encoder)
    skipped = []
    try:
        with tqdm(total=len(paths), desc="predicting", unit="img") as progress:
            for batch in loader:
                for path, problem, x, _ in batch:
                    if x is None:
                        skipped.append(path)
                        progress.write(f"warning: skipping {path}: {problem}", file=sys.stderr)
                good = [item for item in batch if item[2] is not None]
                if good:
                    predictor.batch(good)
                progress.update(len(batch))
            if encoder:
                encoder.write(submission, everything=True)
    except KeyboardInterrupt:
        resume = f"; the same command with --resume finishes {args.submission}" if submission else ""
        print(f"\ninterrupted after {predictor.finished} images{resume}", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)
        if encoder:
            encoder.close()
        if submission:
            submission.close()

    predicted = predictor.finished
    if predicted == 0 and not (submission and submission.done):
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    if not args.no_images:
        print(f"wrote {predicted} masks (threshold {threshold}{', flip TTA' if args.tta else ''}) "
              f"and overlays to {output}/")
    if skipped:
        print(f"{len(skipped)} input(s) could not be read and were skipped (named above)", file=sys.stderr)
    if scores:
        scores.report(threshold, args.masks, output.parent / "worst_predictions.png"
                      if args.no_images else output / "worst_predictions.png")
    if submission:
        print(f"submission: {args.submission} ({len(submission.done) + predicted} rows)")
        if skipped:  # Kaggle refuses a file without a row for every test image
            print(f"error: {args.submission} lacks the rows of the {len(skipped)} skipped image(s): replace them, "
                  f"then the same command with --resume adds their rows", file=sys.stderr)
            return 1
    return 0


def output_problem(args):
    """Why the output paths cannot be written, in one line, or None; checked before anything runs."""
    if not args.no_images and not_a_folder(args.output):
        return f"--output {args.output}: {not_a_folder(args.output)} is a file, not a folder"
    if args.submission:
        if Path(args.submission).is_dir():
            example = Path(args.submission) / "submission.csv"
            return f"--submission {args.submission} is a folder: name the CSV file to write, e.g. {example}"
        if not_a_folder(Path(args.submission).parent):
            blocking = not_a_folder(Path(args.submission).parent)
            return f"--submission {args.submission}: {blocking} is a file, not a folder"
    return None


if __name__ == "__main__":
    sys.exit(main())
