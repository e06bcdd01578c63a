"""How much memory a training step takes: counted from the tensors the step keeps for its backward
pass, which does not depend on the device, so that a batch size can be chosen before memory runs out
and an out-of-memory error can say which settings fit."""
import math
import os

import torch

from model import DoubleConv, UNet
from utils import autocast

HEADROOM = 0.9  # share of a device's memory a run may plan to fill (the allocator and the rest need some)


def parameter_bytes(model):
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def fixed_training_bytes(model):
    """Weights, their gradients, Adam's two moments and the weight average: five float32 copies."""
    return 5 * parameter_bytes(model)


class SavedTensors:
    """Counts the bytes of the distinct tensors that autograd keeps for the backward pass while it is
    active; `blocks` records what each UNet level keeps inside it (what checkpointing recomputes)."""

    def __init__(self, model):
        self.storages, self.blocks, self.model = {}, [], model

    def pack(self, tensor):
        try:
            key = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            key = id(tensor)
        self.storages[key] = max(self.storages.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    @property
    def total(self):
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        self.handles = []
        for block in self.model.modules():
            if isinstance(block, (DoubleConv, torch.nn.MaxPool2d, torch.nn.ConvTranspose2d)):
                self.handles.append(block.register_forward_pre_hook(lambda module, args: self.start_block(args[0])))
                self.handles.append(block.register_forward_hook(lambda module, args, out: self.end_block()))
        return self

    def start_block(self, x):
        self.blocks.append(-self.total)

    def end_block(self):
        self.blocks[-1] += self.total

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.hooks.__exit__(*exc)


def counted_step(features, size, amp_dtype=None, checkpointing=False):
    """Bytes a training step on one image of size (height, width) keeps for its backward pass (with
    activation checkpointing, plus the largest level that the backward pass runs again), counted on
    the CPU."""
    model = UNet(features=features, activation_checkpointing=checkpointing).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, *size).contiguous(memory_format=torch.channels_last)
    with SavedTensors(model) as counted, autocast(torch.device("cpu"), amp_dtype):
        model(x)
    kept = counted.total
    if checkpointing:  # the backward pass runs each level again, one at a time
        model.activation_checkpointing = False
        with SavedTensors(model) as full, autocast(torch.device("cpu"), amp_dtype):
            model(x)
        kept += max(full.blocks)
    return kept


def step_bytes(features, size, amp_dtype=None, checkpointing=False):
    """(bytes per step, bytes per image) of a training step at size (height, width), beyond
    fixed_training_bytes. Per step: the low-precision copies of the weights that mixed precision
    keeps; per image: the activations, which grow with the pixels. Both from counted_step at two
    small sizes (the per-pixel share is the same at any size), so any size is cheap to ask about."""
    unit = 2 ** (len(features) + 1)
    small, large = (unit, 2 * unit), (2 * unit, 4 * unit)
    low, high = (counted_step(features, probe, amp_dtype, checkpointing) for probe in (small, large))
    per_pixel = (high - low) / (large[0] * large[1] - small[0] * small[1])
    per_step = max(0.0, low - per_pixel * small[0] * small[1])
    return per_step, per_pixel * size[0] * size[1]


def device_memory(device):
    """Bytes of memory the device has: a GPU's own, or this machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def largest_batch(capacity, per_image, fixed):
    """The most images per step that fit in `capacity` bytes (0 when not even one does)."""
    return max(0, math.floor((HEADROOM * capacity - fixed) / per_image))


def fitting_settings(config, capacity, amp_dtype):
    """Settings that fit a training step into `capacity` bytes, as --NAME=value text, keeping the
    effective batch (BATCH_SIZE x ACCUMULATE_STEPS); None when nothing at this size fits."""
    features = tuple(config["FEATURES"])
    size = (config["CROP_HEIGHT"] or config["IMAGE_HEIGHT"], config["CROP_WIDTH"] or config["IMAGE_WIDTH"])
    effective = config["BATCH_SIZE"] * config["ACCUMULATE_STEPS"]
    fixed = fixed_training_bytes(UNet(features=features))
    choices = []
    for checkpointing in sorted({config["ACTIVATION_CHECKPOINTING"], True}):
        per_step, per_image = step_bytes(features, size, amp_dtype, checkpointing)
        batch = min(effective, largest_batch(capacity, per_image, fixed + per_step))
        if batch:
            flags = f"--BATCH_SIZE={batch} --ACCUMULATE_STEPS={math.ceil(effective / batch)}"
            choices.append(flags + (" --ACTIVATION_CHECKPOINTING=true" if checkpointing else ""))
    return " or ".join(choices) or None


def out_of_memory_advice(config, device, amp_dtype):
    """One line for an out-of-memory error in training: what fits on this device, from the count above."""
    capacity = device_memory(device)
    size = (config["CROP_HEIGHT"] or config["IMAGE_HEIGHT"], config["CROP_WIDTH"] or config["IMAGE_WIDTH"])
    where = f"{device}" + (f" ({capacity / 2**30:.1f} GiB)" if capacity else "")
    fits = fitting_settings(config, capacity, amp_dtype) if capacity else None
    advice = (f"try {fits}" if fits else
              "not even one image of this size fits: lower IMAGE_HEIGHT/IMAGE_WIDTH or train on crops "
              "(CROP_HEIGHT, CROP_WIDTH)")
    return (f"out of memory on {where} training {size[0]}x{size[1]} images in batches of {config['BATCH_SIZE']}; "
            f"{advice}")


def prediction_bytes_per_image(features, size, element_size=2):
    """Bytes one image takes at the peak of a forward pass without gradients at size (height, width):
    the skip connections of every level, alive until the decoder uses them, and the tensors of the
    top level at work (the upsampled map, the concatenation, two convolutions' outputs)."""
    pixels = size[0] * size[1]
    skips = sum(width * pixels / 4**level for level, width in enumerate(features))
    return element_size * (skips + 5 * features[0] * pixels)


def out_of_memory_in_prediction(model, device, image_size, batch_size, amp_dtype):
    """One line for an out-of-memory error in predict.py: a --batch-size that fits, from the count above."""
    capacity = device_memory(device)
    per_image = prediction_bytes_per_image(model.model_args["features"], image_size, 2 if amp_dtype else 4)
    weights = 1.5 * parameter_bytes(model)  # and their low-precision copies
    fits = largest_batch(capacity, per_image, weights) if capacity else 0
    where = f"{device}" + (f" ({capacity / 2**30:.1f} GiB)" if capacity else "")
    advice = (f"try --batch-size {min(fits, batch_size - 1)}" if fits >= 1 and batch_size > 1 else
              "not even one image fits: predict on a device with more memory, or with --device cpu")
    return (f"out of memory on {where} predicting batches of {batch_size} at {image_size[0]}x{image_size[1]}; "
            f"{advice}")
