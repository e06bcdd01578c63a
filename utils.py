"""Devices and seeds, the model's forward step, metrics and losses, checkpoints, and the prediction
pictures that training writes."""
import copy
import os
import random
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from files import replacing
from pictures import draw_panels, mask_to_rgb

STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and torch.compile


def mps_available():
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def get_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; a named device must exist here (ValueError saying why)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device {name!r} does not exist here ({found}); use auto or cpu")
    if device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r} does not exist here (no Apple MPS); use auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def available_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def wait_for_other_processes():
    """Under torchrun, wait until every process gets here; alone, nothing to wait for."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast_dtype(device, choice="auto"):
    """The mixed-precision type this device runs fastest with quality kept, or None; choice
    "float16" or "bfloat16" forces one (float16 on a CPU runs Colab's T4 path, loss scaling included)."""
    if choice != "auto":
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}[choice]
    if device.type == "cuda":
        # Native bfloat16 starts at compute capability 8.0; older GPUs such as Colab's T4 (7.5) only
        # emulate it, slowly, and is_bf16_supported() counts emulation: float16 with loss scaling there.
        native = torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def resize_probability(probability, size):
    """One image's probability (a 2-D float32 array) at size (height, width), bilinear with pixel
    centres aligned: the same values as torch's align_corners=False, and faster on a CPU."""
    import cv2

    return cv2.resize(probability, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_on_device(probability, size):
    """resize_probability of a batch (N, 1, h, w) where it is."""
    return F.interpolate(probability, size=size, mode="bilinear", align_corners=False)


def forward(model, x, device, amp_dtype=None):
    """The model's float32 logits of a batch, run on the device in its memory format and mixed
    precision: the one forward step of training, validation and prediction."""
    with autocast(device, amp_dtype):
        return model(to_model_input(x, model, device)).float()


# CUDA's and MPS's messages, cuDNN's and cuBLAS's, and the CPU allocator's ("can't allocate memory")
OUT_OF_MEMORY_MARKS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                      "CUDNN_STATUS_NOT_INITIALIZED", "can't allocate memory")


def is_out_of_memory(error):
    """Whether an exception is the device running out of memory: torch's OutOfMemoryError (named
    torch.cuda.OutOfMemoryError before torch 2.5), MPS's, or cuDNN's and cuBLAS's failures to
    allocate, which reach Python as plain RuntimeErrors."""
    kind = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(error, kind) or (isinstance(error, RuntimeError)
                                       and any(mark in str(error) for mark in OUT_OF_MEMORY_MARKS))


def all_finite(tensors):
    """True when every floating-point tensor holds only finite numbers."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def to_device(tensor, device):
    """A copy on the device; asynchronous only to CUDA, where pinned batches need it. To MPS an
    asynchronous copy of a temporary can read memory already freed (pytorch issues 139550, 189690)."""
    return tensor.to(device, non_blocking=device.type == "cuda")


def to_model_input(x, model, device):
    """A batch on the device in the model's memory format (channels-last when the model is)."""
    weight = next(model.parameters())
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    return to_device(x, device).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class ExponentialMovingAverage:
    """An exponential moving average of a model's weights (EMA_DECAY), the model that is validated
    and saved: it moves less between epochs than the weights the optimizer steps. The decay ramps
    up from 0 over the first steps, (1 + n) / (10 + n), so a short run is not dominated by its
    random initial weights."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        averaged, current = self.model.state_dict(), model.state_dict()
        floats = [name for name, value in averaged.items() if value.is_floating_point()]
        torch._foreach_lerp_([averaged[n] for n in floats], [current[n].detach() for n in floats], 1 - decay)
        for name, value in averaged.items():
            if not value.is_floating_point():
                value.copy_(current[name])


@torch.no_grad()
def recompute_batchnorm(model, loader, device, amp_dtype=None):
    """Replace the BatchNorm running statistics of `model` by their plain average over `loader`'s
    batches, as torch.optim.swa_utils.update_bn does. Why: running averages lag weights that move
    fast (the first tens of steps) and do not belong to averaged weights at all; in eval mode such
    a model can predict no car although its weights have learned. Returns the images used."""
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {module: module.momentum for module in norms}
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: every batch counts the same
    was_training = model.training
    model.train()
    images = 0
    for x, _ in loader:
        forward(model, x, device, amp_dtype)
        images += x.shape[0]
    for module, momentum in momenta.items():
        module.momentum = momentum
    model.train(was_training)
    return images


def dice_per_image(prediction, target):
    """Per-image Dice of two boolean tensors shaped (N, ...), as a float64 NumPy array: the pixels are
    counted where the tensors are, in int64 (MPS has no float64), and divided on the host."""
    overlap, total = dice_counts(prediction, target)
    return dice_from_counts(overlap.cpu().numpy(), total.cpu().numpy())


def dice_counts(prediction, target):
    """(overlap, predicted + true pixels) per image of two boolean tensors shaped (N, ...), int64."""
    prediction = prediction.reshape(prediction.shape[0], -1).bool()
    target = target.reshape(target.shape[0], -1).bool()
    return (prediction & target).sum(1), prediction.sum(1) + target.sum(1)


def dice_from_counts(overlap, total):
    overlap, total = np.asarray(overlap, np.float64), np.asarray(total, np.float64)
    return np.where(total == 0, 1.0, 2 * overlap / np.maximum(total, 1))


def dice_numpy(prediction, target):
    """Dice of one pair of boolean arrays (full-resolution scoring in predict.py)."""
    prediction, target = prediction.astype(bool), target.astype(bool)
    total = int(prediction.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & target).sum()) / total


THRESHOLDS = np.arange(1, 100) / 100  # candidate cut-offs, 0.01 apart


def dice_by_threshold(probability, truth):
    """Dice of `probability > t` for every t in THRESHOLDS, from one histogram instead of 99 masks."""
    bins = np.clip((probability * 100).astype(np.int64), 0, 99).ravel()
    truth = np.asarray(truth).astype(bool).ravel()
    # Suffix sums: pixels with probability of at least t, overall and on the car.
    predicted = np.cumsum(np.bincount(bins, minlength=100)[::-1])[::-1][1:]
    overlap = np.cumsum(np.bincount(bins[truth], minlength=100)[::-1])[::-1][1:]
    total = predicted + truth.sum()
    return np.where(total == 0, 1.0, 2 * overlap / np.maximum(total, 1))


def class_masks(logits, y, threshold=0.5):
    """(predicted, true, highest) of a batch: boolean N x K x H x W masks of the K scored classes (car,
    for one output channel; with several, each class but the background, channel 0) and the highest
    probability of any of them. A pixel is the class of highest probability, or car above threshold."""
    if logits.shape[1] == 1:
        probability = torch.sigmoid(logits)
        return probability > threshold, y > 0.5, probability.max()
    probability = logits.softmax(1)
    scored = torch.arange(1, logits.shape[1], device=logits.device)[None, :, None, None]
    return (probability.argmax(1, keepdim=True) == scored, y.argmax(1, keepdim=True) == scored,
            probability[:, 1:].max())


def scored_classes(model):
    """The classes a model's Dice is the mean of: car, or each of its classes but the background."""
    return max(1, getattr(model, "model_args", {}).get("out_channels", 1) - 1)


def as_labels(masks):
    """N x K x H x W boolean class masks as N x H x W uint8 labels (0 background, k for class k)."""
    scored = torch.arange(1, masks.shape[1] + 1, device=masks.device, dtype=torch.uint8)[None, :, None, None]
    return (masks.to(torch.uint8) * scored).sum(1, dtype=torch.uint8)


def iou_from_counts(overlap, total):
    overlap, total = np.asarray(overlap, np.float64), np.asarray(total, np.float64)
    union = total - overlap
    return np.where(union == 0, 1.0, overlap / np.maximum(union, 1))


@torch.no_grad()
def evaluate(loader, model, device, threshold=0.5, amp_dtype=None, loss_fn=None, worst=None, all_ranks=False):
    """Mean per-image Dice, pixel accuracy and (with loss_fn) mean loss over a loader, and what tells
    a model that learned nothing: the images whose truth has car, those where car is predicted, and
    the highest car probability. With several classes an image's Dice is the mean of its classes'
    other than background, and each class's mean Dice and IoU are reported too (class_dice,
    class_iou). With a WorstImages `worst`, also collects the lowest-Dice images (the loader must
    not shuffle). With all_ranks, each torchrun process scores its share and the sums are added
    over processes. The counts stay on the device until the end: one wait for it, not several a
    batch."""
    names = iter(Path(sample.image).name for sample in loader.dataset.samples) if worst is not None else None
    was_training = model.training
    model.eval()
    counts, losses = [], []  # per batch: int64 (overlap, total) per class, (correct, with car, predicted car); loss
    pixels = 0
    highest = torch.zeros((), device=device)
    for x, y in loader:
        logits = forward(model, x, device, amp_dtype)
        y = to_device(y, device)
        if loss_fn is not None:
            losses.append(loss_fn(logits, y).detach() * x.shape[0])
        prediction, target, top = class_masks(logits, y, threshold)
        highest = torch.maximum(highest, top)
        overlap = (prediction & target).flatten(2).sum(2)
        total = prediction.flatten(2).sum(2) + target.flatten(2).sum(2)
        correct = (prediction == target).all(1).flatten(1).sum(1)
        counts.append((overlap, total, torch.stack((correct, target.flatten(1).any(1).long(),
                                                    prediction.flatten(1).any(1).long()))))
        if worst is not None:
            scores = dice_from_counts(overlap.cpu().numpy(), total.cpu().numpy()).mean(1)
            truths, predictions = as_labels(target).cpu().numpy(), as_labels(prediction).cpu().numpy()
            for i, name in zip(range(x.shape[0]), names):
                image = (x[i].float().permute(1, 2, 0).cpu().numpy().clip(0, 1) * 255).astype(np.uint8)
                worst.add(name, float(scores[i]), image, truths[i], predictions[i])
        pixels += target[:, 0].numel()
    model.train(was_training)
    # On the host in NumPy: float64 sums, and no float64 tensor on the device.
    classes = scored_classes(model)  # known without a batch: a torchrun process may have none
    overlap, total = (torch.cat([batch[part] for batch in counts]).cpu().numpy() if counts
                      else np.zeros((0, classes), np.int64) for part in (0, 1))
    others = torch.cat([batch[2] for batch in counts], 1).cpu().numpy() if counts else np.zeros((3, 0), np.int64)
    dice, iou = dice_from_counts(overlap, total), iou_from_counts(overlap, total)
    dice_sum, class_sums = float(dice.mean(1).sum()), np.concatenate((dice.sum(0), iou.sum(0)))
    loss_sum = float(torch.stack(losses).cpu().numpy().astype(np.float64).sum()) if losses else 0.0
    images, correct, with_car, predicted_car = overlap.shape[0], *others.sum(1).tolist()
    if all_ranks:
        # float64 for exact sums; NCCL reduces CUDA tensors, Gloo CPU ones (MPS never runs torchrun).
        where = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        sums = torch.tensor([dice_sum, images, correct, pixels, loss_sum, with_car, predicted_car, *class_sums],
                            dtype=torch.float64, device=where)
        torch.distributed.all_reduce(sums)
        highest = highest.to(where)
        torch.distributed.all_reduce(highest, torch.distributed.ReduceOp.MAX)
        dice_sum, images, correct, pixels, loss_sum, with_car, predicted_car, *class_sums = sums.tolist()
    if images == 0:
        raise ValueError("the validation loader yielded no images")
    class_means = np.asarray(class_sums, np.float64) / images
    return {"dice": dice_sum / images, "pixel_accuracy": correct / pixels, "loss": loss_sum / images,
            "images": int(images), "images_with_car": int(with_car), "images_predicted_car": int(predicted_car),
            "highest_probability": highest.item(), "class_dice": class_means[:classes].tolist(),
            "class_iou": class_means[classes:].tolist()}


def dice_loss(logits, target, eps=1.0):
    """Soft Dice loss per image, averaged: trains directly for the metric that is scored."""
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probability * target).sum(1)
    return (1 - (2 * overlap + eps) / (probability.sum(1) + target.sum(1) + eps)).mean()


def lovasz_hinge(logits, target):
    """Lovasz hinge per image, averaged (Berman et al. 2018, with the smooth elu + 1 of the hinge):
    a surrogate whose gradient follows each pixel's effect on the image's Jaccard index, so it works
    on the outline errors that the metric counts, where soft Dice's gradient is small. The target is
    binarised at a half; BCE keeps the soft target."""
    logits = logits.flatten(1)
    labels = (target.flatten(1) > 0.5).to(logits.dtype)
    errors, order = (1 - logits * (2 * labels - 1)).sort(dim=1, descending=True)
    labels = labels.gather(1, order)
    cars = labels.sum(1, keepdim=True)
    jaccard = 1 - (cars - labels.cumsum(1)) / (cars + (1 - labels).cumsum(1))  # never 0 / 0
    weights = torch.cat((jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]), 1)
    return ((F.elu(errors) + 1) * weights).sum(1).mean()


def lovasz_softmax(probability, labels):
    """Lovasz-softmax per image and class present, averaged (Berman et al. 2018): the Lovasz hinge's
    Jaccard surrogate for several classes, on the softmax probabilities (N x C x H x W) against
    N x H x W class labels."""
    probability = probability.flatten(2)
    truth = F.one_hot(labels.flatten(1), probability.shape[1]).transpose(1, 2).to(probability.dtype)
    errors, order = (truth - probability).abs().sort(dim=2, descending=True)
    truth = truth.gather(2, order)
    totals = truth.sum(2, keepdim=True)
    jaccard = 1 - (totals - truth.cumsum(2)) / (totals + (1 - truth).cumsum(2))  # never 0 / 0
    weights = torch.cat((jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]), 2)
    losses, present = (errors * weights).sum(2), (totals[..., 0] > 0).to(errors.dtype)
    return (losses * present).sum() / present.sum().clamp_min(1)  # no wait for the device


def multiclass_loss(logits, shares, kind="lovasz"):
    """Cross-entropy against each pixel's class shares, plus the Lovasz-softmax ("lovasz") or the soft
    Dice of the classes other than background ("dice")."""
    shares = shares / shares.sum(1, keepdim=True).clamp_min(1e-6)  # shares stored as bytes add up to about 1
    probability = logits.softmax(1)
    if kind == "lovasz":
        overlap = lovasz_softmax(probability, shares.argmax(1))
    else:
        predicted, truth = probability[:, 1:].flatten(2), shares[:, 1:].flatten(2)
        overlap = (1 - (2 * (predicted * truth).sum(2) + 1) / (predicted.sum(2) + truth.sum(2) + 1)).mean()
    return F.cross_entropy(logits, shares) + overlap


def segmentation_loss(logits, target, kind="lovasz"):
    """Binary cross-entropy plus the Lovasz hinge ("lovasz", train.py's default) or soft Dice ("dice");
    for logits of several classes, multiclass_loss."""
    if logits.shape[1] > 1:
        return multiclass_loss(logits, target, kind)
    overlap = lovasz_hinge(logits, target) if kind == "lovasz" else dice_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target) + overlap


def save_checkpoint(state, path):
    """torch.save through files.replacing: the old file stays whole whatever happens meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as stream:
        try:
            torch.save(state, stream)
        except RuntimeError as error:  # torch's zip writer turns a Ctrl-C while writing into its own error
            if isinstance(error.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise


def link_checkpoint(source, path, state):
    """Make `path` a second name for the finished checkpoint file `source`, atomically; where the
    file system has no hard links (some network and Drive mounts), save `state` there instead.
    Safe because checkpoints are only ever replaced by renaming, never rewritten in place."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.link.tmp"
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
    except OSError:
        save_checkpoint(state, path)
        return
    os.replace(temporary, path)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def damaged_member(path):
    """The first part of a checkpoint whose bytes differ from the CRC-32 stored with them when it was
    written (torch.save writes a zip archive, and torch.load checks none), or None. Reading them
    costs about 0.1 s for 120 MB. Files that are not zip archives (older formats) are torch.load's
    to judge."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as error:
        return f"the archive's index ({error})"


def load_checkpoint(path, device="cpu"):
    """A checkpoint's contents, checked whole first; CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: name one in it, e.g. {path / 'best.pt'}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        damaged = damaged_member(path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if damaged:
        raise CheckpointError(f"{path} is damaged: {damaged} no longer matches the checksum stored when it was "
                              f"written (a disk or copy error); use another checkpoint of the run")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(error)})") from error
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no model/model_args)")
    state["model"] = clean_state_dict(state["model"])
    return state


def first_line(error):
    """The first line of an exception's message, or its class's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    """The checkpoint's model (a UNet or a ResNetUNet, from its model_args), in eval mode."""
    from model import build_model

    try:
        model = build_model(state["model_args"])
    except (TypeError, ValueError) as error:  # model arguments of another project's network
        reason = first_line(error)
        raise CheckpointError(f"not a checkpoint of this project's UNet or ResNetUNet (its model "
                              f"arguments {state['model_args']} do not fit: {reason})") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        name = type(model).__name__
        raise CheckpointError(f"checkpoint weights do not fit {name}{state['model_args']}: "
                              f"{first_line(error)}") from error
    return model.to(device).eval()


@torch.no_grad()
def save_predictions_as_imgs(dataset, model, folder="saved_images", device="cpu", indices=range(4),
                             threshold=0.5, amp_dtype=None):
    """For the samples at `indices`: one PNG each of image | true mask | predicted mask under their
    titles (classes in their colours), named pred_<source image>.png; earlier pred_*.png in the
    folder that this call did not write (another split's images) are removed. Returns the paths
    written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    colours = class_colours(dataset.classes)
    written = []
    for index in indices:
        x, y = dataset[index]
        prediction, truth, _ = class_masks(forward(model, x[None], device, amp_dtype), y[None].to(device), threshold)
        # Car: every pixel with some car share, as the true masks look at this size.
        truth = (y[0] > 0).numpy() if colours is None else as_labels(truth)[0].cpu().numpy()
        image = (x.permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)
        name = Path(dataset.samples[index].image).name
        path = folder / f"pred_{Path(name).stem}.png"
        draw_panels([((image, mask_to_rgb(truth, colours), mask_to_rgb(as_labels(prediction)[0].cpu().numpy(), colours)),
                      (name, "true mask", "predicted mask"))], path)
        written.append(path)
    for stale in set(folder.glob("pred_*.png")) - set(written):
        stale.unlink(missing_ok=True)
    model.train(was_training)
    return written


def class_colours(classes):
    """The colour of each label in pictures: white car on black, or each class's (classes.Classes)."""
    return None if classes is None else classes.colours()
