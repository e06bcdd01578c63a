"""UNet for binary segmentation (Ronneberger et al. 2015), with same-size padding."""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_FEATURES = (64, 128, 256, 512)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU."""

    def __init__(self, in_channels, out_channels):
        # No conv bias: BatchNorm's shift makes it redundant.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; returns logits of the input's height and width.

    With the default features (64, 128, 256, 512) and a 1024-channel bottleneck the model has
    about 31M parameters.
    """

    def __init__(self, in_channels=3, out_channels=1, features=DEFAULT_FEATURES, matmul_upsampling=True,
                 activation_checkpointing=False):
        super().__init__()
        # Speed and memory paths, not part of the architecture: the same weights and values either way.
        self.matmul_upsampling = matmul_upsampling
        self.activation_checkpointing = activation_checkpointing
        features = tuple(int(f) for f in features)
        if not features or min(features) < 1:
            raise ValueError(f"features must be positive channel counts, got {features}")
        self.model_args = {"in_channels": in_channels, "out_channels": out_channels, "features": features}
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        channels = in_channels
        for width in features:
            self.downs.append(DoubleConv(channels, width))
            channels = width
        self.bottleneck = DoubleConv(features[-1], features[-1] * 2)
        channels = features[-1] * 2
        for width in reversed(features):  # widths need not double from level to level
            self.ups.append(nn.ConvTranspose2d(channels, width, kernel_size=2, stride=2))
            self.up_convs.append(DoubleConv(width * 2, width))
            channels = width
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x):
        smallest = 2 ** len(self.downs)
        if x.shape[-2] < smallest or x.shape[-1] < smallest:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than {smallest}x{smallest}, "
                             f"the least this {len(self.downs)}-level UNet can pool")
        skips = []
        for index, down in enumerate(self.downs):
            x = self.level(self.down_level, down, x, index > 0)
            skips.append(x)
        x = self.level(self.down_level, self.bottleneck, x, True)
        for up, block, skip in zip(self.ups, self.up_convs, reversed(skips)):
            if self.activation_checkpointing and up is self.ups[-1]:
                # The top level has the most pixels and sets the peak of the backward pass: run it again
                # in two halves, so that only one half's tensors are alive at once.
                x = self.level(self.up_level, up, block, x, skip, slice(0, 3))
                x = self.level(run_layers, block, x, slice(3, None))
            else:
                x = self.level(self.up_level, up, block, x, skip)
        return self.head(x)

    def down_level(self, block, x, pooled):
        """The level's features, kept for its skip connection: from the input, or from the level
        above's features pooled (inside the level, so checkpointing need not keep the pooled map)."""
        return block(self.pool(x) if pooled else x)

    def up_level(self, up, block, x, skip, layers=None):
        """Upsample x, join it to the skip connection and run block on both (or only its `layers`)."""
        x = transposed_conv_as_matmul(up, x) if self.matmul_upsampling else up(x)
        # Pooling floors odd sizes, so the upsampled map can be one row or column short.
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, (0, dx, 0, dy))
        joined = torch.cat((skip, x), dim=1)
        return block(joined) if layers is None else run_layers(block, joined, layers)

    def level(self, function, *args):
        return run_level(self.activation_checkpointing, function, *args)


def run_level(checkpointing, function, *args):
    """function(*args); with activation checkpointing the backward pass keeps only the level's
    inputs and runs it again to get the rest (its BatchNorm statistics left alone the second time).
    The level's modules are function and those among args."""
    if not (checkpointing and torch.is_grad_enabled()):
        return function(*args)
    if torch.compiler.is_compiling():  # the compiled backward recomputes without the forward's side effects
        return checkpoint(function, *args, use_reentrant=False)
    modules = [part for part in (function, *args) if isinstance(part, nn.Module)]
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), running_stats_kept(modules)))


def run_layers(block, x, layers):
    """The layers (a slice) of the Sequential block applied to x."""
    for layer in list(block)[layers]:
        x = layer(x)
    return x


@contextmanager
def running_stats_kept(blocks):
    """BatchNorm layers whose running statistics do not move (momentum 0) while blocks run again."""
    norms = [module for block in blocks for module in block.modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    kept = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, batches) in zip(norms, kept):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(batches)


def transposed_conv_as_matmul(up, x):
    """up(x) for the 2x2, stride-2 ConvTranspose2d `up`. On a CPU with channels-last input, as one
    matrix product (each input pixel becomes a 2x2 block of outputs): the same weights and values,
    but oneDNN's transposed convolution is slow for these shapes, its backward pass most of all
    (README: Performance)."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return up(x)
    batch, channels, height, width = x.shape
    outputs = up.out_channels
    weight = up.weight.permute(0, 2, 3, 1).reshape(channels, 4 * outputs)  # columns: row, column, channel
    bias = None if up.bias is None else up.bias.repeat(4)
    y = F.linear(x.permute(0, 2, 3, 1), weight.t(), bias)  # x is NHWC in memory: no copy
    y = y.view(batch, height, width, 2, 2, outputs).transpose(2, 3).reshape(batch, 2 * height, 2 * width, outputs)
    return y.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory, like up(x)
