"""How much memory a training step takes: counted from the tensors its operators create and free,
which does not depend on the device, so that a batch size can be chosen before memory runs out
and an out-of-memory error can say which settings fit."""
import math
import os
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model import build_model, model_arguments
from utils import forward, segmentation_loss

HEADROOM = 0.9  # share of a device's memory a run may plan to fill (the allocator and the rest need some)


def parameter_bytes(model):
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def fixed_training_bytes(model):
    """Weights, their gradients, Adam's two moments and the weight average: five float32 copies."""
    return 5 * parameter_bytes(model)


class LiveTensors(TorchDispatchMode):
    """Follows every tensor storage that an operator creates while it is active, on any device, and
    when each is freed: the most bytes alive at once is what the step needs, the backward pass's
    gradients and recomputed levels included (which a count of saved tensors misses)."""

    def __init__(self):
        super().__init__()
        self.alive, self.changes, self.sizes = {}, [], {}  # storage id -> serial; (serial, +-bytes)

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        result = function(*args, **(kwargs or {}))
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in self.alive:
                storage = tensor.untyped_storage()
                serial = len(self.changes)
                self.alive[id(storage)], self.sizes[serial] = serial, storage.nbytes()
                self.changes.append((serial, storage.nbytes()))
                weakref.finalize(storage, self.freed, id(storage), serial)
        return result

    def freed(self, identity, serial):
        self.alive.pop(identity, None)
        self.changes.append((serial, -self.sizes[serial]))

    def peak(self, leaving_out=()):
        """The most bytes alive at once, not counting the storages of `leaving_out` (tensors alive now)."""
        left_out = {self.alive.get(id(tensor.untyped_storage())) for tensor in leaving_out}
        alive = most = 0
        for serial, change in self.changes:
            if serial not in left_out:
                alive += change
                most = max(most, alive)
        return most


def fake_model(model_args, checkpointing=False):
    """The model of model_args as train.py builds it (channels-last), made of fake tensors: call
    inside FakeTensorMode."""
    model = build_model(model_args, activation_checkpointing=checkpointing)
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    return model


def counted_step(model_args, size, amp_dtype=None, checkpointing=False, batch=1, training=True):
    """Bytes alive at the peak of a training step's forward and backward pass on `batch` images of
    size (height, width), beyond the weights and their gradients (without `training`: of a forward
    pass alone, as predict.py runs it). Counted on fake tensors, which have shapes, types and
    storages but no numbers: about a second at any size and in any type, with no device at all
    (float16 convolutions on a CPU would take minutes)."""
    with FakeTensorMode():
        model = fake_model(model_args, checkpointing).train(training)
        channels = model_args.get("out_channels", 1)  # car, or each class's share
        x, target = torch.rand(batch, 3, *size), (torch.rand(batch, channels, *size) > 0.5).float()
        with LiveTensors() as live, torch.set_grad_enabled(training):
            logits = forward(model, x, torch.device("cpu"), amp_dtype)  # alive to the end, as in train.py
            if training:
                segmentation_loss(logits, target).backward()
        return live.peak(leaving_out=[parameter.grad for parameter in model.parameters() if training])


def step_bytes(model_args, size, amp_dtype=None, checkpointing=False, training=True):
    """(bytes per step, bytes per image) of a training step (or a forward pass) at size (height,
    width), beyond fixed_training_bytes. Per step: the low-precision copies of the weights that
    mixed precision keeps; per image: the activations. From counted_step at batches of 1 and 2."""
    one, two = (counted_step(model_args, size, amp_dtype, checkpointing, batch, training) for batch in (1, 2))
    return max(0, one - (two - one)), two - one


def device_memory(device):
    """Bytes of memory this process may fill on the device: on a GPU what is free plus what its
    allocator holds already (other processes' share left out), or this machine's for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def largest_batch(capacity, per_image, fixed):
    """The most images per step that fit in `capacity` bytes (0 when not even one does)."""
    return max(0, math.floor((HEADROOM * capacity - fixed) / per_image))


def training_size(config):
    """(height, width) of what a training step sees: the crops, or the whole images."""
    return (config["CROP_HEIGHT"] or config["IMAGE_HEIGHT"], config["CROP_WIDTH"] or config["IMAGE_WIDTH"])


def fitting_settings(config, capacity, amp_dtype):
    """Settings that fit a training step into `capacity` bytes, as --NAME=value text, keeping the
    effective batch (BATCH_SIZE x ACCUMULATE_STEPS: the batch a divisor of it); None when nothing at
    this size fits."""
    model_args = model_arguments(config["ENCODER"], config["FEATURES"], config.get("NUM_CLASSES", 1))
    size = training_size(config)
    effective = config["BATCH_SIZE"] * config["ACCUMULATE_STEPS"]
    with FakeTensorMode():
        fixed = fixed_training_bytes(fake_model(model_args))
    choices = []
    for checkpointing in sorted({config["ACTIVATION_CHECKPOINTING"], True}):
        per_step, per_image = step_bytes(model_args, size, amp_dtype, checkpointing)
        batch = min(effective, largest_batch(capacity, per_image, fixed + per_step))
        if checkpointing == config["ACTIVATION_CHECKPOINTING"]:
            batch = min(batch, config["BATCH_SIZE"] - 1)  # the batch that just failed fits only on paper
        batch = max((size for size in range(1, batch + 1) if effective % size == 0), default=0)
        if batch:
            flags = f"--BATCH_SIZE={batch} --ACCUMULATE_STEPS={effective // batch}"
            choices.append(flags + (" --ACTIVATION_CHECKPOINTING=true" if checkpointing else ""))
    return " or ".join(choices) or None


def out_of_memory_advice(config, device, amp_dtype):
    """One line for an out-of-memory error in training: what fits on this device, from the count above."""
    capacity = device_memory(device)
    size = training_size(config)
    where = f"{device}" + (f" ({capacity / 2**30:.1f} GiB)" if capacity else "")
    fits = fitting_settings(config, capacity, amp_dtype) if capacity else None
    advice = (f"try {fits}" if fits else
              "not even one image of this size fits: lower IMAGE_HEIGHT/IMAGE_WIDTH or train on crops "
              "(CROP_HEIGHT, CROP_WIDTH)")
    return (f"out of memory on {where} training {size[0]}x{size[1]} images in batches of {config['BATCH_SIZE']}; "
            f"{advice}")


def out_of_memory_in_prediction(model, device, image_size, batch_size, amp_dtype):
    """One line for an out-of-memory error in predict.py: a --batch-size that fits, from the count above."""
    capacity = device_memory(device)
    per_step, per_image = step_bytes(model.model_args, image_size, amp_dtype, training=False)
    weights = parameter_bytes(model) + per_step
    fits = largest_batch(capacity, per_image, weights) if capacity else 0
    where = f"{device}" + (f" ({capacity / 2**30:.1f} GiB)" if capacity else "")
    advice = (f"try --batch-size {min(fits, batch_size - 1)}" if fits >= 1 and batch_size > 1 else
              "not even one image fits: predict on a device with more memory, or with --device cpu")
    return (f"out of memory on {where} predicting batches of {batch_size} at {image_size[0]}x{image_size[1]}; "
            f"{advice}")
