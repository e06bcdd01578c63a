"""UNet for binary segmentation (Ronneberger et al. 2015), with same-size padding, and a UNet
decoder on a ResNet encoder (He et al. 2016) named as torchvision's, so its ImageNet files load."""
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
    (docs/performance.md)."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return up(x)
    batch, channels, height, width = x.shape
    outputs = up.out_channels
    weight = up.weight.permute(0, 2, 3, 1).reshape(channels, 4 * outputs)  # columns: row, column, channel
    bias = None if up.bias is None else up.bias.repeat(4)
    y = F.linear(x.permute(0, 2, 3, 1), weight.t(), bias)  # x is NHWC in memory: no copy
    y = y.view(batch, height, width, 2, 2, outputs).transpose(2, 3).reshape(batch, 2 * height, 2 * width, outputs)
    return y.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory, like up(x)


class BasicBlock(nn.Module):
    """ResNet-18/34's residual block: two 3x3 convolutions; torchvision's names and layout."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50's residual block: 1x1 in, 3x3 (with the stride: torchvision's "v1.5"), 1x1 out
    to four times the width; torchvision's names and layout."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNetEncoder(nn.Module):
    """torchvision's ResNet without its classifier (avgpool, fc): the same parameter and buffer
    names and shapes, so the state dict of torchvision's ImageNet files loads as it is (fc.* left
    out). forward returns the features at strides 2 (conv1, bn1, relu), 4, 8, 16 and 32."""

    def __init__(self, name="resnet34"):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown encoder {name!r}: use one of {', '.join(RESNETS)}")
        block, depths = RESNETS[name]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.channels = [64]  # of each feature map that forward returns
        for index, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            layer = self.make_layer(block, width, depth, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", layer)
        for module in self.modules():  # torchvision's initialisation, for ENCODER_WEIGHTS=none
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def make_layer(self, block, width, depth, stride):
        in_channels, out_channels = self.channels[-1], width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        blocks = [block(in_channels, width, stride, downsample)]
        blocks += [block(out_channels, width) for _ in range(depth - 1)]
        self.channels.append(out_channels)
        return nn.Sequential(*blocks)

    def stages(self):
        """(function, *modules) of each stage for run_level: the modules are arguments, so that
        checkpointing knows whose BatchNorm statistics to leave alone when it runs them again."""
        return [(stem, self.conv1, self.bn1, self.relu), (pooled, self.maxpool, self.layer1),
                (self.layer2,), (self.layer3,), (self.layer4,)]

    def forward(self, x, checkpointing=False):
        features = []
        for function, *modules in self.stages():
            x = run_level(checkpointing, function, *modules, x)
            features.append(x)
        return features


def stem(conv, norm, relu, x):
    return relu(norm(conv(x)))


def pooled(pool, layer, x):
    """layer(pool(x)): pooled inside the stage, so checkpointing need not keep the pooled map."""
    return layer(pool(x))


DECODER_WIDTHS = (256, 128, 64, 32, 16)  # segmentation_models_pytorch's Unet
# (mean, std) per RGB channel of [0, 1] images that torchvision's ImageNet weights were trained with
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ResNetUNet(nn.Module):
    """A UNet decoder on a ResNet encoder, segmentation_models_pytorch's Unet: five blocks, each
    doubling the size (nearest), joining the encoder's features of that stride (16, 8, 4, 2; none
    at full size) and running a DoubleConv, then a 1x1 `head`. Inputs of any size: padded (bottom
    and right) to a multiple of 32, the logits cropped back to the input's height and width."""

    def __init__(self, encoder="resnet34", out_channels=1, decoder_widths=DECODER_WIDTHS,
                 normalization=IMAGENET_NORMALIZATION, activation_checkpointing=False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing  # not architecture: same values
        decoder_widths = tuple(int(width) for width in decoder_widths)
        if len(decoder_widths) != 5 or min(decoder_widths) < 1:
            raise ValueError(f"decoder_widths must be 5 positive widths, got {decoder_widths}")
        # The inputs are [0, 1] RGB, as for the UNet; the model normalises them as its encoder's
        # weights were trained (ImageNet's mean and std), so the checkpoint carries the choice.
        mean, std = (tuple(float(value) for value in part) for part in normalization)
        self.model_args = {"encoder": encoder, "out_channels": out_channels,
                           "decoder_widths": decoder_widths, "normalization": (mean, std)}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.encoder = ResNetEncoder(encoder)
        skips = self.encoder.channels[-2::-1] + [0]  # strides 16, 8, 4, 2; none at full size
        channels = self.encoder.channels[-1]
        self.decoder = nn.ModuleList()
        for skip, width in zip(skips, decoder_widths):
            self.decoder.append(DoubleConv(channels + skip, width))
            channels = width
        self.head = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x):
        height, width = x.shape[-2:]
        x = padded_to_multiple((x - self.mean) / self.std, 32)
        *skips, x = self.encoder(x, self.activation_checkpointing)
        for block, skip in zip(self.decoder, [*reversed(skips), None]):
            x = run_level(self.activation_checkpointing, decoder_level, block, x, skip)
        return self.head(x)[..., :height, :width]


def decoder_level(block, x, skip):
    """block applied to x upsampled to twice its size and joined to the skip connection, if any."""
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return block(x if skip is None else torch.cat((x, skip), dim=1))


def padded_to_multiple(x, multiple):
    """x padded at the bottom and right to a multiple of `multiple` in height and width: reflected
    (replicated where the image is too small to reflect), in x's memory format."""
    pad_height, pad_width = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not (pad_height or pad_width):
        return x
    mode = "reflect" if min(x.shape[-2:]) > max(pad_height, pad_width) else "replicate"
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    x = F.pad(x, (0, pad_width, 0, pad_height), mode=mode)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def build_model(model_args, **switches):
    """The model that model_args (a checkpoint's) describe: a ResNetUNet where they name an
    encoder, else the UNet. switches: activation_checkpointing, and matmul_upsampling for the UNet
    (the ResNet decoder has no transposed convolution). TypeError or ValueError if neither fits."""
    model_args = dict(model_args)
    if "encoder" in model_args:
        switches.pop("matmul_upsampling", None)
        return ResNetUNet(**model_args, **switches)
    return UNet(**model_args, **switches)


def model_arguments(encoder, features, classes=1):
    """model_args of train.py's ENCODER: the plain UNet of FEATURES, or a ResNetUNet; one output
    channel (car) or one per class (NUM_CLASSES)."""
    channels = {"out_channels": classes} if classes > 1 else {}
    return {"features": tuple(features), **channels} if encoder == "unet" else {"encoder": encoder, **channels}


def model_for(encoder, features, classes=1, **switches):
    return build_model(model_arguments(encoder, features, classes), **switches)
