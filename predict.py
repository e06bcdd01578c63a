"""Turn a checkpoint and images into full-resolution masks, scores and a Kaggle submission.

python predict.py --checkpoint checkpoints/best.pt --input data/test [--masks data/train_masks]
python predict.py --checkpoint checkpoints/best.pt --input data/test --submission submission.csv --no-images
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import dataset as data
from utils import (
    THRESHOLDS,
    CheckpointError,
    WorstImages,
    autocast,
    autocast_dtype,
    dice_by_threshold,
    dice_numpy,
    get_device,
    load_checkpoint,
    model_from_checkpoint,
    overlay,
    rle_encode,
    to_model_input,
)

SUBMISSION_HEADER = "img,rle_mask\n"


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
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (0: none)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 even where mixed precision is available")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    if args.resume and not args.submission:
        parser.error("--resume continues a --submission file: name it")
    return args


def input_files(path):
    path = Path(path)
    if path.is_dir():
        return data.visible_files(path)
    if path.suffix.lower() == ".txt" and path.is_file():
        return [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    return [path] if path.is_file() else []


class ImageFiles(Dataset):
    """Decoded, model-ready images, so that loader workers decode while the model runs.
    An unreadable file comes back as its reason instead of an image."""

    def __init__(self, paths, image_size, keep_image):
        self.paths, self.size, self.keep_image = paths, tuple(image_size), keep_image
        self.transform = data.val_transform()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        problem, _ = data.image_problem(path)
        if problem:
            return path, problem, None, None
        try:
            image = data.read_image(path)
        except ValueError:
            return path, "cannot decode image", None, None
        x = data.to_tensor(self.transform(image=data.shrink_image(image, self.size))["image"])
        return path, image.shape[:2], x, image if self.keep_image else None


def as_list(batch):
    return batch


@torch.no_grad()
def probabilities(model, x, sizes, device, amp_dtype, tta=False):
    """Car probability for each image of a batch, upsampled to each image's own size."""
    x = to_model_input(x, model, device)
    with autocast(device, amp_dtype):
        probability = torch.sigmoid(model(x).float())
        if tta:  # the flip's prediction, flipped back
            probability = (probability + torch.sigmoid(model(x.flip(3)).float()).flip(3)) / 2
    return [F.interpolate(probability[i:i + 1], size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
            for i, size in enumerate(sizes)]


class Submission:
    """img,rle_mask rows appended and flushed one by one; --resume keeps every complete row."""

    def __init__(self, path, resume):
        self.path, self.done = Path(path), set()
        if self.path.exists() and not resume:
            raise SystemExit(f"error: {self.path} exists: pass --resume to continue it, or remove it")
        if resume and self.path.exists():
            text = self.path.read_text()
            if text and not text.startswith(SUBMISSION_HEADER):
                raise SystemExit(f"error: {self.path} is not a submission (its first line is not img,rle_mask)")
            complete = text[: text.rfind("\n") + 1]  # a row cut off by the interruption is redone
            self.path.write_text(complete or SUBMISSION_HEADER)
            self.done = {line.split(",", 1)[0] for line in complete.splitlines()[1:]}
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(SUBMISSION_HEADER)
        self.stream = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())

    def add(self, name, mask):
        self.stream.write(f"{name},{rle_encode(mask)}\n")

    def close(self):
        self.stream.close()


class Scores:
    """Full-resolution Dice and pixel accuracy, and Dice for every threshold in THRESHOLDS."""

    def __init__(self):
        self.dice, self.correct, self.pixels, self.unscored = [], 0, 0, []
        self.by_threshold = 0.0
        self.worst = WorstImages()

    def add(self, path, image, probability, mask, truth):
        if truth is None or truth.shape != mask.shape:
            self.unscored.append(path.name)
            return
        dice = dice_numpy(mask, truth)
        self.dice.append(dice)
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


def write_outputs(path, image, mask, probability, args, submission, scores):
    """Everything asked for one image: mask and overlay files, a submission row, its scores."""
    if not args.no_images:
        output = Path(args.output)
        cv2.imwrite(str(output / f"{path.stem}_mask.png"), mask.astype(np.uint8) * 255)
        cv2.imwrite(str(output / f"{path.stem}_overlay.jpg"), cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))
    if submission:
        submission.add(path.name, mask)
    if scores:
        scores.add(path, image, probability, mask, read_truth(path, args.masks))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = get_device(args.device)
    try:
        state = load_checkpoint(args.checkpoint, device)
        model = model_from_checkpoint(state, device).to(memory_format=torch.channels_last)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else state.get("threshold", 0.5)
    amp_dtype = None if args.no_amp else autocast_dtype(device)
    paths = input_files(args.input)
    if not paths:
        print(f"error: no images found at {args.input}", file=sys.stderr)
        return 1
    submission = Submission(args.submission, args.resume) if args.submission else None
    if submission and submission.done:
        paths = [p for p in paths if p.name not in submission.done]
        print(f"resuming {args.submission}: {len(submission.done)} rows already written, {len(paths)} images to go")
    output = Path(args.output)
    if not args.no_images:
        output.mkdir(parents=True, exist_ok=True)
    scores = Scores() if args.masks else None

    keep_image = not args.no_images or scores is not None
    loader = DataLoader(ImageFiles(paths, state["image_size"], keep_image), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=as_list)
    predicted = 0
    try:
        with tqdm(total=len(paths), desc="predicting", unit="img") as progress:
            for batch in loader:
                for path, problem, x, _ in batch:
                    if x is None:
                        progress.write(f"warning: skipping {path}: {problem}", file=sys.stderr)
                good = [item for item in batch if item[2] is not None]
                if good:
                    x = torch.stack([item[2] for item in good])
                    sizes = [item[1] for item in good]
                    for (path, _, _, image), probability in zip(good, probabilities(model, x, sizes, device,
                                                                                    amp_dtype, args.tta)):
                        write_outputs(path, image, probability > threshold, probability, args, submission, scores)
                        predicted += 1
                progress.update(len(batch))
    except KeyboardInterrupt:
        resume = f"; the same command with --resume finishes {args.submission}" if submission else ""
        print(f"\ninterrupted after {predicted} images{resume}", file=sys.stderr)
        return 130
    finally:
        if submission:
            submission.close()

    if predicted == 0 and not (submission and submission.done):
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    if not args.no_images:
        print(f"wrote {predicted} masks (threshold {threshold}{', flip TTA' if args.tta else ''}) "
              f"and overlays to {output}/")
    if submission:
        print(f"submission: {args.submission} ({len(submission.done) + predicted} rows)")
    if scores:
        scores.report(threshold, args.masks, output.parent / "worst_predictions.png"
                      if args.no_images else output / "worst_predictions.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
