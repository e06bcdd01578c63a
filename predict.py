"""Turn a checkpoint and images into full-resolution masks.

python predict.py --checkpoint checkpoints/best.pt --input data/test [--masks data/train_masks]
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset as data
from utils import (
    CheckpointError,
    autocast,
    autocast_dtype,
    dice_numpy,
    get_device,
    load_checkpoint,
    model_from_checkpoint,
    overlay,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by train.py")
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output", default="saved_images/predictions", help="folder for masks and overlays")
    parser.add_argument("--threshold", type=float, help="probability cut-off (default: the checkpoint's)")
    parser.add_argument("--masks", help="folder of true masks (Carvana naming): print Dice and pixel accuracy")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--no-amp", action="store_true", help="run in float32 even where mixed precision is available")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def input_files(path):
    path = Path(path)
    if path.is_dir():
        return data.visible_files(path)
    return [path] if path.is_file() else []


def readable_images(paths, progress):
    """(path, RGB image) for each file that decodes; the others are named on stderr and skipped."""
    for path in paths:
        progress.update(1)
        problem, _ = data.image_problem(path)
        if problem is None:
            try:
                yield path, data.read_image(path)
                continue
            except ValueError:
                problem = "cannot decode image"
        progress.write(f"warning: skipping {path}: {problem}", file=sys.stderr)


def read_truth(image_path, mask_dir):
    mask_path = data.find_mask(image_path, mask_dir)
    try:
        return data.read_mask(mask_path) if mask_path else None
    except ValueError:
        return None


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict_probabilities(model, images, image_size, device, amp_dtype):
    """Car probability for each RGB image, at the image's own full resolution (float32 arrays)."""
    transform = data.val_transform(*image_size)
    x = torch.stack([data.to_tensor(transform(image=image)["image"]) for image in images])
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x).float()
    # Upsample logits, not thresholded masks, so that edges land between the model's pixels.
    return [torch.sigmoid(F.interpolate(logits[i:i + 1], size=image.shape[:2], mode="bilinear",
                                        align_corners=False))[0, 0].cpu().numpy()
            for i, image in enumerate(images)]


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
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    written, scores, correct, pixels, unscored = 0, [], 0, 0, []
    progress = tqdm(total=len(paths), desc="predicting", unit="img")
    for batch in batches(readable_images(paths, progress), args.batch_size):
        probabilities = predict_probabilities(model, [image for _, image in batch], state["image_size"],
                                              device, amp_dtype)
        for (path, image), probability in zip(batch, probabilities):
            mask = probability > threshold
            cv2.imwrite(str(output / f"{path.stem}_mask.png"), mask.astype(np.uint8) * 255)
            cv2.imwrite(str(output / f"{path.stem}_overlay.jpg"), cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))
            written += 1
            if args.masks:
                truth = read_truth(path, args.masks)
                if truth is None or truth.shape != mask.shape:
                    unscored.append(path.name)
                    continue
                scores.append(dice_numpy(mask, truth))
                correct += int((mask == truth.astype(bool)).sum())
                pixels += truth.size
    progress.close()

    if written == 0:
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    print(f"wrote {written} masks (threshold {threshold}) and overlays to {output}/")
    if args.masks:
        if unscored:
            print(f"warning: no usable mask in {args.masks} for {len(unscored)} image(s): "
                  f"{', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}", file=sys.stderr)
        if scores:
            print(f"full-resolution Dice {np.mean(scores):.4f} (mean over {len(scores)} images), "
                  f"pixel accuracy {100 * correct / pixels:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
