"""Turn a checkpoint and images into full-resolution masks, scores and a Kaggle submission.

python predict.py --checkpoint checkpoints/best.pt --input data/test [--masks data/train_masks]
python predict.py --checkpoint checkpoints/best.pt --input data/test --submission submission.csv --no-images
"""
import argparse
import json
import os
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import data_folder
import image_files
import memory
import settings
from classes import Classes
from dataset import to_tensor, val_transform
from files import InUse, WriteError, exclusive, not_a_folder, write_bytes, write_text
from pictures import WorstImages, overlay, overlay_classes
from progress import tqdm
from submission import (
    RowEncoder,
    Submission,
    duplicate_names,
    rle_encode,
    source_changes,
    submission_source,
    unusable_names,
)
from utils import (
    THRESHOLDS,
    CheckpointError,
    all_finite,
    autocast_dtype,
    available_cores,
    dice_by_threshold,
    dice_numpy,
    forward,
    get_device,
    is_out_of_memory,
    load_checkpoint,
    model_from_checkpoint,
    resize_on_device,
    resize_probability,
)

ENCODER_THREADS = 2  # CPU threads making submission rows while the model runs


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, without the usage before them."""

    def error(self, message):
        self.exit(2, f"error: {message} (python predict.py --help lists the options)\n")


def default_output(checkpoint):
    """saved_images/<the checkpoint's run>/<its name>_predictions: each model's masks in a folder of
    their own (checkpoints/best.pt: saved_images/checkpoints/best_predictions), beside its run's pictures."""
    checkpoint = Path(checkpoint)
    run = settings.pictures_folder({"SAVED_IMAGES": "saved_images", "CHECKPOINT_DIR": checkpoint.parent})
    return str(run / f"{checkpoint.stem}_predictions")


def parse_args(argv):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--input", required=True, help="an image, a folder of images, or a .txt list of image paths")
    parser.add_argument("--output", help="folder for masks and overlays (default: saved_images/<the checkpoint's "
                                         "folder>/<its name>_predictions, e.g. saved_images/checkpoints/best_predictions)")
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
    args.default_output = args.output is None
    if args.output is None:
        args.output = default_output(args.checkpoint)
    return args


def input_files(path):
    path = Path(path)
    if path.is_dir():
        return data_folder.visible_files(path)
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
        if path not in parts:  # not resolved: symbolic links keep their own names; no root, so never absolute
            parts[path] = Path(os.path.abspath(path)).parts[1:]
        return "__".join(parts[path][-depth[path]:])

    while True:
        counts = Counter(name(path) for path in depth)
        clashing = [path for path in depth if counts[name(path)] > 1]
        deeper = [path for path in clashing if depth[path] <= len(parts.get(path, ()))]
        if not deeper:  # distinct names, or one file given twice (the same masks)
            return {path: name(path) for path in depth}
        for path in deeper:
            depth[path] += 1

class Photo(NamedTuple):
    path: Path
    size: tuple | None           # (height, width) of the photo as displayed
    tensor: torch.Tensor | None  # at the model's size, ready for it
    image: np.ndarray | None     # the photo itself, where masks, overlays or scores need it
    problem: str | None = None   # why it cannot be predicted


class ImageFiles(Dataset):
    """Photos, decoded by loader workers while the model runs. An unreadable file comes back as a
    Photo with its problem. The model sees each photo as training saw it, whatever else is asked:
    a JPEG decoded at libjpeg's largest DCT-domain reduction that still covers the model's size
    (1918x1280 straight to 240x160), so that submission rows and --masks scores come from the same
    probabilities; the full-size photo is decoded as well only where masks, overlays or scores need it."""

    def __init__(self, paths, image_size, keep_image):
        self.paths, self.size, self.keep_image = paths, tuple(image_size), keep_image
        self.transform = val_transform()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        checked = image_files.image_problem(path)
        if checked.problem:
            return Photo(path, None, None, None, checked.problem)
        reduced = checked.format in image_files.REDUCED_FORMATS
        try:
            image = image_files.read_image(path) if self.keep_image or not reduced else None
            small = (image_files.load_image(path, self.size, checked.size) if reduced
                     else image_files.shrink_image(image, self.size))
        except (OSError, ValueError, cv2.error):
            return Photo(path, None, None, None, "cannot decode image")
        width, height = checked.size
        x = to_tensor(self.transform(image=small)["image"])
        return Photo(path, (height, width), x, image if self.keep_image else None)


def as_list(batch):
    return batch


class Predictor:
    """A checkpoint's model run on batches of photos, in mixed precision where it helps."""

    def __init__(self, model, device, amp_dtype, tta=False):
        self.model, self.device, self.amp_dtype, self.tta = model, device, amp_dtype, tta

    def probability(self, x):
        """Car probability (N x 1 x H x W), or each class's (N x classes x H x W) for several."""
        logits = forward(self.model, x, self.device, self.amp_dtype)
        return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)

    @torch.no_grad()
    def at_model_size(self, x):
        """Car probability (float32, N x 1 x the model's size; N x classes x ... for several classes)
        of a batch, on the device; with tta the mean with the mirror image's, mirrored back."""
        probability = self.probability(x)
        if self.tta:
            probability = (probability + self.probability(x.flip(3)).flip(3)) / 2
        return probability

    def at_full_size(self, x, sizes):
        """Car probability of each photo of a batch at the photo's own (height, width); for several
        classes each class's, (height, width, classes)."""
        probability = self.at_model_size(x)
        if probability.shape[1] > 1:
            if self.device.type == "cpu":
                return [resize_probability(np.ascontiguousarray(p.permute(1, 2, 0).numpy()), size)
                        for p, size in zip(probability, sizes)]
            return [resize_on_device(probability[i:i + 1], size)[0].permute(1, 2, 0).cpu().numpy()
                    for i, size in enumerate(sizes)]
        if self.device.type == "cpu":
            return [resize_probability(p, size) for p, size in zip(probability[:, 0].numpy(), sizes)]
        return [resize_on_device(probability[i:i + 1], size)[0, 0].cpu().numpy() for i, size in enumerate(sizes)]


class Scores:
    """Full-resolution Dice and pixel accuracy, and Dice for every threshold in THRESHOLDS; with
    classes (classes.Classes), each class's Dice, and an image's Dice the mean of its classes' but
    background."""

    def __init__(self, classes=None):
        self.dice, self.correct, self.pixels, self.unscored = [], 0, 0, []
        self.by_threshold, self.with_car, self.predicted_car, self.highest = 0.0, 0, 0, 0.0
        self.classes, self.class_dice = classes, []
        self.worst = WorstImages(colours=classes.colours() if classes else None)

    def add(self, path, image, probability, mask, truth):
        if isinstance(truth, str) or truth.shape != mask.shape:
            reason = truth if isinstance(truth, str) else f"its mask is {truth.shape[1]}x{truth.shape[0]}"
            self.unscored.append(f"{path.name} ({reason})")
            return
        if self.classes:
            self.class_dice.append([dice_numpy(mask == k, truth == k) for k in range(1, len(self.classes))])
            dice = float(np.mean(self.class_dice[-1]))
            self.highest = max(self.highest, float(probability[..., 1:].max()))
            self.correct += int((mask == truth).sum())
        else:
            dice = dice_numpy(mask, truth)
            self.highest = max(self.highest, float(probability.max()))
            self.correct += int((mask == truth.astype(bool)).sum())
            self.by_threshold = self.by_threshold + dice_by_threshold(probability, truth)
        self.dice.append(dice)
        self.with_car += bool(truth.any())
        self.predicted_car += bool(mask.any())
        self.pixels += truth.size
        if image is not None:
            self.worst.add(path.name, dice, image, truth, mask)

    def report(self, threshold, mask_dir, gallery):
        if self.unscored:
            names = ", ".join(self.unscored[:5]) + (" ..." if len(self.unscored) > 5 else "")
            print(f"warning: no usable mask in {mask_dir} for {len(self.unscored)} image(s): {names}", file=sys.stderr)
        if not self.dice:
            return
        n = len(self.dice)
        if self.classes:
            print(f"full-resolution Dice {np.mean(self.dice):.4f} (mean over {n} images of the classes' mean), "
                  f"pixel accuracy {100 * self.correct / self.pixels:.2f}%")
            print("per class: " + ", ".join(f"{self.classes.name(k + 1)} Dice {dice:.4f}"
                                            for k, dice in enumerate(np.mean(self.class_dice, 0))))
        else:
            print(f"full-resolution Dice {np.mean(self.dice):.4f} (mean over {n} images), "
                  f"pixel accuracy {100 * self.correct / self.pixels:.2f}%, threshold {threshold}")
        if self.with_car == 0:
            print(f"warning: all {n} true masks are empty (no car), so Dice says nothing of finding cars", file=sys.stderr)
        if self.with_car and not self.predicted_car:
            print(f"warning: the model predicts no car on any of these {n} images (highest car probability "
                  f"{self.highest:.2f}): it has not learned; train it longer or at a higher LEARNING_RATE, a "
                  f"lower threshold is no cure", file=sys.stderr)
        elif not self.classes:
            best = int(np.argmax(self.by_threshold))
            print(f"best threshold on these images: {THRESHOLDS[best]:.2f} (Dice {self.by_threshold[best] / n:.4f}); "
                  f"pass --threshold {THRESHOLDS[best]:.2f} to use it")
        if self.worst.save(gallery):
            print(f"worst images drawn in {gallery}")


def read_truth(image_path, mask_dir, classes=None):
    """An image's true mask in mask_dir, as car/background or (classes) class indices; where it has
    none that can be read, why (a string)."""
    mask_path = data_folder.find_mask(image_path, mask_dir)
    if mask_path is None:
        return "no mask"
    try:
        return classes.read(mask_path) if classes else image_files.read_mask(mask_path)
    except ValueError as error:
        return str(error).removeprefix(f"{mask_path}: ")


class Outputs:
    """Everything asked for each photo: mask and overlay files, a submission row, scores. With an
    encoder (a RowEncoder) only submission rows, made from model-size probabilities."""

    def __init__(self, args, names, threshold, submission, scores, encoder, classes=None):
        self.args, self.names, self.threshold, self.classes = args, names, threshold, classes
        self.submission, self.scores, self.encoder, self.written = submission, scores, encoder, 0

    @property
    def finished(self):
        """Photos whose outputs are all written."""
        return self.encoder.written if self.encoder else self.written

    def add(self, predictor, photos):
        x, sizes = torch.stack([photo.tensor for photo in photos]), [photo.size for photo in photos]
        if self.encoder:
            self.encoder.add([photo.path for photo in photos], predictor.at_model_size(x), sizes)
            self.encoder.write(self.submission)
            return
        for photo, probability in zip(photos, predictor.at_full_size(x, sizes)):
            # Several classes: each pixel the most probable class (the threshold is for car alone).
            mask = probability.argmax(2).astype(np.uint8) if self.classes else probability > self.threshold
            self.write(photo, mask, probability)
            self.written += 1

    def write(self, photo, mask, probability):
        if not self.args.no_images:
            output, name = Path(self.args.output), self.names[photo.path]
            if self.classes:  # in the training masks' own values, palette or colours
                write_file(output / f"{name}_mask.png", self.classes.png(mask))
                drawn = overlay_classes(photo.image, mask, self.classes.colours(),
                                        [self.classes.name(k) for k in range(len(self.classes))])
            else:
                write_image(output / f"{name}_mask.png", mask.astype(np.uint8) * 255)
                drawn = overlay(photo.image, mask)
            write_image(output / f"{name}_overlay.jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if self.submission:
            self.submission.add(photo.path.name, rle_encode(mask))
        if self.scores:
            truth = read_truth(photo.path, self.args.masks, self.classes)
            self.scores.add(photo.path, photo.image, probability, mask, truth)


def default_workers(device):
    """Decoding processes: on a GPU machine enough to keep the GPU busy; on a CPU the model needs
    most of the cores, so a quarter of them (at least one)."""
    return min(8, available_cores()) if device.type != "cpu" else max(1, available_cores() // 4)


def model_threads(workers):
    """CPU threads for the model: the cores the decoding processes leave. More would share cores
    with them, and torch's threads wait for each other at every layer (README: Prediction)."""
    return max(1, available_cores() - workers)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with ExitStack() as held:  # the output folder and the submission file: this run's alone while it writes
        return run(args, held)


def run(args, held):
    problem = output_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        device = get_device(args.device)
        state, predictor = load_predictor(args, device)
        paths = input_files(args.input)
    except (CheckpointError, ValueError) as error:
        message = str(error) if str(args.checkpoint) in str(error) or isinstance(error, ValueError) else \
            f"{args.checkpoint}: {error}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else state.get("threshold", 0.5)
    classes = Classes.from_dict(state["classes"]) if state.get("classes") else None
    if classes and args.submission:
        print(f"error: --submission: {args.checkpoint} predicts {len(classes)} classes, and a Kaggle Carvana "
              f"submission holds car masks of one: use a checkpoint trained with NUM_CLASSES=1", file=sys.stderr)
        return 2
    if classes and args.threshold is not None:
        print(f"warning: --threshold is ignored: {args.checkpoint} gives each pixel its most probable of "
              f"{len(classes)} classes", file=sys.stderr)
    problem = path_problem(paths, args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    problem = input_problem(paths, args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    names = output_names(paths)
    source = submission_source(args.checkpoint, state, threshold, args.tta)
    if args.default_output and not args.no_images:
        free_default_output(args, source)
    problem = hold_outputs(args, held, source)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    submission = Submission(args.submission, args.resume, source) if args.submission else None
    if submission and submission.done:
        paths = [p for p in paths if p.name not in submission.done]
        print(f"resuming {args.submission}: {len(submission.done)} rows already written, {len(paths)} images to go")
    output = Path(args.output)
    scores = Scores(classes) if args.masks else None

    # Only submission rows wanted: no full-size decoding, and the rows encoded off the main thread.
    rows_only = args.no_images and scores is None
    keep_image = not args.no_images or scores is not None
    workers = default_workers(device) if args.workers is None else args.workers
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(model_threads(workers))
    loader = DataLoader(ImageFiles(paths, state["image_size"], keep_image),
                        batch_size=args.batch_size, num_workers=workers, collate_fn=as_list)
    encoder = RowEncoder(device, threshold, ENCODER_THREADS, 2 * args.batch_size) if rows_only else None
    outputs = Outputs(args, names, threshold, submission, scores, encoder, classes)
    resume = f"; the same command with --resume finishes {args.submission}" if submission else ""
    skipped = []
    try:
        with tqdm(total=len(paths), desc="predicting", unit="img") as progress:
            for batch in loader:
                for photo in batch:
                    if photo.problem:
                        skipped.append(photo.path)
                        progress.write(f"warning: skipping {photo.path}: {photo.problem}", file=sys.stderr)
                good = [photo for photo in batch if not photo.problem]
                if good:
                    outputs.add(predictor, good)
                progress.update(len(batch))
            if encoder:
                encoder.write(submission, everything=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {outputs.finished} images{resume}", file=sys.stderr)
        return 130
    except WriteError as error:  # a full disk or a lost mount: every file written so far is whole
        print(f"\nerror: {error}{resume}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        advice = memory.out_of_memory_in_prediction(predictor.model, device, state["image_size"], args.batch_size,
                                                    predictor.amp_dtype)
        print(f"error: {advice}{resume}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads_before)
        if encoder:
            encoder.close()
        if submission:
            submission.close()
    return summarize(args, outputs, skipped, threshold, output)


def hold_outputs(args, held, source):
    """Take the submission file and the output folder for this run alone (files.exclusive), the
    folder only for one model's outputs: why they cannot be written, in one line, or None."""
    places = [("--submission", Path(args.submission))] if args.submission else []
    if not args.no_images or args.masks:  # masks and overlays, or the gallery of the worst images
        places.append(("--output", Path(args.output)))
    for option, place in places:
        try:
            (place if option == "--output" else place.parent).mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive(place, "predict.py"))
            if option == "--output" and not args.no_images:
                problem = claim_folder(place, source)
                if problem:
                    return problem
        except InUse as error:
            return f"{option}: {error}; two runs writing it at once would mix their outputs: wait for it to end"
        except OSError as error:
            return f"{option} {place}: cannot write there ({error.strerror or error})"
    return None


def free_default_output(args, source):
    """Where the default --output holds another model's masks (a retrained best.pt, another
    threshold), the first of <it>-2, <it>-3, ... that is new or holds this model's: the same command
    works again, and nothing written earlier is touched. A --output given is the user's to choose."""
    base = candidate = Path(args.output)
    while other_source(candidate, source):
        candidate = Path(f"{base}-{int(candidate.name.rsplit('-', 1)[-1]) + 1 if candidate != base else 2}")
    if candidate != base:
        print(f"{base} holds the masks of another {other_source(base, source)}: this run's go to {candidate}")
        args.output = str(candidate)


def other_source(folder, source):
    """What differs between this run and the masks a folder holds ("" where it holds none or the same)."""
    try:
        saved = json.loads((folder / ".source").read_text())
    except (OSError, ValueError):
        return ""
    return source_changes(saved, source) if isinstance(saved, dict) else ""


def claim_folder(output, source):
    """Keep one model's masks in a folder: the first run records its source (model, size, threshold,
    TTA) there; a run with another is refused (why, in one line), as masks of two models mixed in one
    folder cannot be told apart."""
    record = output / ".source"
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    changed = source_changes(saved, source) if isinstance(saved, dict) else []
    if changed:
        return (f"--output {output} holds the masks of another {changed} (by {saved.get('checkpoint')}): give this "
                f"run another --output, or remove them")
    if saved != source:
        write_text(record, json.dumps(source, indent=1))
    return None


def write_image(path, pixels):
    """An image file written whole (encoded in memory, then files.write_bytes), or WriteError."""
    encoded, data = cv2.imencode(path.suffix, pixels)
    if not encoded:
        raise WriteError(f"cannot encode {path}")
    write_file(path, data.tobytes())


def write_file(path, data):
    """Bytes written whole (files.write_bytes), or WriteError naming the file."""
    try:
        write_bytes(path, data)
    except OSError as error:
        raise WriteError(f"cannot write {path} ({error.strerror or error})") from None


def load_predictor(args, device):
    """(checkpoint state, Predictor), or CheckpointError saying why the checkpoint cannot predict."""
    # Read on the CPU: only the model goes to the device, not the optimizer and training weights.
    state = load_checkpoint(args.checkpoint)
    if not all_finite(state["model"].values()):
        raise CheckpointError(f"{args.checkpoint}: its weights hold NaN or infinite values; use another "
                              f"checkpoint of the run (best.pt, last.pt)")
    model = model_from_checkpoint(state, device).to(memory_format=torch.channels_last)
    return state, Predictor(model, device, None if args.no_amp else autocast_dtype(device), args.tta)


def path_problem(paths, args):
    """Why --input or --masks names nothing usable (a misspelt path), in one line, or None."""
    if not os.path.exists(args.input):
        return f"--input {args.input}: no such file or folder"
    if args.masks and not Path(args.masks).is_dir():
        return f"--masks {args.masks}: no such folder"
    if args.masks and paths:
        names = data_folder.mask_names(args.masks)
        if not any(data_folder.find_mask(path, args.masks, names) for path in paths):
            return (f"--masks {args.masks} holds no mask of these {len(paths)} images (<image name>_mask.<ext> or "
                    f"<image name>.<ext>, README: Your data), so nothing could be scored")
    return None


def input_problem(paths, args):
    """Why these inputs cannot be predicted as asked, in one line, or None."""
    if not paths:
        return f"no images found at {args.input}"
    clashing = duplicate_names(paths) if args.submission else []
    if clashing:
        return (f"{len(clashing)} file name(s) belong to more than one input ({', '.join(clashing[:5])}"
                f"{' ...' if len(clashing) > 5 else ''}) and Kaggle keys submission rows by file name: "
                f"submit one folder at a time")
    unusable = unusable_names(paths) if args.submission else []
    if unusable:
        return (f"{len(unusable)} file name(s) cannot be a submission row ({', '.join(map(repr, unusable[:5]))}"
                f"{' ...' if len(unusable) > 5 else ''}: a comma, quote or line break would split the row); rename "
                f"them")
    return None


def summarize(args, outputs, skipped, threshold, output):
    """Print what was written and scored; the exit status."""
    predicted, submission = outputs.finished, outputs.submission
    if predicted == 0 and not (submission and submission.done):
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    if not args.no_images:
        rule = f"{len(outputs.classes)} classes" if outputs.classes else f"threshold {threshold}"
        print(f"wrote {predicted} masks ({rule}{', flip TTA' if args.tta else ''}) "
              f"and overlays to {output}/")
    if skipped:
        print(f"{len(skipped)} input(s) could not be read and were skipped (named above)", file=sys.stderr)
    if outputs.scores:
        try:
            outputs.scores.report(threshold, args.masks, output / "worst_predictions.png")
        except OSError as error:
            print(f"error: cannot draw {output / 'worst_predictions.png'} ({error.strerror or error})", file=sys.stderr)
            return 2
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
