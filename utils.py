"""Devices, seeds, metrics, checkpoints, run-length encoding and prediction pictures."""
import os
import random
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and torch.compile


def get_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast_dtype(device):
    """The mixed-precision type this device runs fastest with quality kept, or None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------
# Metrics. Dice as the competition scores it: per image, then averaged; empty on empty is 1.

def dice_per_image(prediction, target):
    """Per-image Dice of two boolean tensors shaped (N, ...)."""
    prediction = prediction.reshape(prediction.shape[0], -1).bool()
    target = target.reshape(target.shape[0], -1).bool()
    overlap = (prediction & target).sum(1).double()
    total = prediction.sum(1).double() + target.sum(1).double()
    return torch.where(total == 0, torch.ones_like(total), 2 * overlap / total.clamp(min=1))


def dice_numpy(prediction, target):
    """Dice of one pair of boolean arrays (full-resolution scoring in predict.py)."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    total = int(prediction.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & target).sum()) / total


@torch.no_grad()
def check_accuracy(loader, model, device, threshold=0.5, amp_dtype=None, loss_fn=None):
    """Mean per-image Dice, pixel accuracy and (with loss_fn) mean loss over a loader."""
    was_training = model.training
    model.eval()
    dice_sum, images, correct, pixels, loss_sum = 0.0, 0, 0, 0, 0.0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += loss_fn(logits, y).item() * x.shape[0]
        prediction = torch.sigmoid(logits) > threshold
        target = y > 0.5
        dice_sum += dice_per_image(prediction, target).sum().item()
        correct += (prediction == target).sum().item()
        pixels += target.numel()
        images += x.shape[0]
    model.train(was_training)
    if images == 0:
        raise ValueError("the validation loader yielded no images")
    return {"dice": dice_sum / images, "pixel_accuracy": correct / pixels, "loss": loss_sum / images,
            "images": images}


def dice_loss(logits, target, eps=1.0):
    """Soft Dice loss per image, averaged: trains directly for the metric that is scored."""
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probability * target).sum(1)
    return (1 - (2 * overlap + eps) / (probability.sum(1) + target.sum(1) + eps)).mean()


def segmentation_loss(logits, target):
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


# ---------------------------------------------------------------------------------------------
# Checkpoints: one dict; written atomically so that an interrupted save never harms the old file.

def save_checkpoint(state, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def load_checkpoint(path, device="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from error
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no model/model_args)")
    state["model"] = clean_state_dict(state["model"])
    return state


def clean_state_dict(state_dict):
    """Drop the prefixes that DataParallel, DDP and torch.compile put before parameter names."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def model_from_checkpoint(state, device="cpu"):
    from model import UNet

    model = UNet(**state["model_args"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint weights do not fit UNet{state['model_args']}: "
                              f"{str(error).splitlines()[0]}") from error
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Pictures.

def mask_to_rgb(mask):
    return np.repeat((np.asarray(mask) > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)


def overlay(image, mask, colour=(255, 0, 0), strength=0.45):
    """The image with the mask tinted in a colour (RGB uint8 in and out)."""
    out = image.astype(np.float32)
    where = np.asarray(mask) > 0
    out[where] = out[where] * (1 - strength) + np.array(colour, np.float32) * strength
    return out.astype(np.uint8)


@torch.no_grad()
def save_predictions_as_imgs(dataset, model, folder="saved_images", device="cpu", count=4,
                             threshold=0.5, amp_dtype=None):
    """For the first `count` samples: one PNG each of image | true mask | predicted mask,
    named after the source image. Returns the paths written."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    written = []
    for index in range(min(count, len(dataset))):
        x, y = dataset[index]
        batch = x[None].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            probability = torch.sigmoid(model(batch).float())[0, 0].cpu().numpy()
        image = (x.permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)
        panel = np.hstack([image, mask_to_rgb(y[0].numpy()), mask_to_rgb(probability > threshold)])
        path = folder / f"pred_{Path(dataset.samples[index].image).stem}.png"
        Image.fromarray(panel).save(path)
        written.append(path)
    model.train(was_training)
    return written
