"""ImageNet weights for the ResNet encoders (ENCODER_WEIGHTS) and the input normalisation they
were trained with. Every failure is a one-line PretrainedWeightsError, never random weights."""
import http.client
import os
import pickle
import socket
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

import torch

from model import IMAGENET_NORMALIZATION
from utils import damaged_member, first_line

# torchvision's IMAGENET1K_V1 files; the 8 hex digits after the '-' begin the file's SHA-256.
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
DOWNLOAD_TIMEOUT = 60  # seconds without a byte before a download gives up, instead of hanging
IGNORED_PREFIXES = ("fc.",)  # torchvision's classifier, which the encoder does not have


class PretrainedWeightsError(Exception):
    """Weights that cannot be loaded; the one-line message says which and what to do."""


def normalization(encoder):
    """(mean, std) per RGB channel of [0, 1] images that the encoder's weights were trained with:
    ImageNet's for the ResNets; (0, 1), none, for the plain UNet, as it has always been trained."""
    if encoder == "unet":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if encoder in IMAGENET_URLS:
        return IMAGENET_NORMALIZATION
    raise ValueError(f"unknown encoder {encoder!r}: use unet, {', '.join(IMAGENET_URLS)}")


def load_pretrained(model, weights):
    """Load `weights` into a ResNetUNet's encoder: "imagenet" (torchvision's file, downloaded once
    into torch's hub cache), "none" (the random initialisation kept) or the path of a .pth state
    dict. Returns where the weights came from: the URL, the path or "none"."""
    if weights == "none":
        return "none"
    encoder = model.model_args.get("encoder")
    if encoder is None:
        raise PretrainedWeightsError(f"the plain UNet has no pretrained weights ({weights!r} "
                                     f"given): use weights none, or a ResNet encoder")
    if weights == "imagenet":
        source, state_dict = IMAGENET_URLS[encoder], downloaded(IMAGENET_URLS[encoder])
    else:
        advice = f"download {IMAGENET_URLS[encoder]} again"
        source, state_dict = str(weights), read_file(Path(weights).expanduser(), advice)
    load_into(model.encoder, state_dict, source, encoder)
    return source


def downloaded(url):
    """The state dict at url through torch's hub cache: downloaded and hash-checked only once."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    damaged = damaged_member(cached) if cached.is_file() else None  # torch checks the hash of downloads only
    if damaged:
        raise PretrainedWeightsError(f"{cached} is damaged: {damaged} no longer matches the "
                                     f"checksum stored when it was written; delete it to download it again")
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout or DOWNLOAD_TIMEOUT)  # torch.hub sets none: it could hang
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True,
                                                  map_location="cpu", weights_only=True)
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, socket errors
        if isinstance(error, URLError) and not isinstance(error, HTTPError):
            error = error.reason  # "<urlopen error ...>" without its wrapping
        raise PretrainedWeightsError(
            f"cannot download {url} ({first_line(error)}): download it on a machine with internet "
            f"and pass the file's path as ENCODER_WEIGHTS, or copy it to {cached}") from None
    except Exception as error:  # torch: RuntimeError for a wrong hash, many for a damaged cache
        if "invalid hash value" in str(error):  # torch deleted the download: nothing is cached
            raise PretrainedWeightsError(
                f"{url}: the downloaded file is not the expected one ({first_line(error)}): try "
                f"again later, or download it elsewhere and pass its path as ENCODER_WEIGHTS"
            ) from None
        raise unreadable(cached, error, "delete it to download it again") from error
    finally:
        socket.setdefaulttimeout(timeout)


def read_file(path, advice):
    """The state dict in the .pth file at path."""
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: no such weights file (ENCODER_WEIGHTS is imagenet, "
                                     f"none or the path of a .pth file)")
    damaged = damaged_member(path)
    if damaged:
        raise PretrainedWeightsError(f"{path} is damaged: {damaged} no longer matches the checksum stored when it "
                                     f"was written (a disk or copy error); {advice}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign: torch raises many kinds
        raise unreadable(path, error, advice) from error


def unreadable(path, error, advice):
    reason = first_line(error)
    if isinstance(error, pickle.UnpicklingError):  # torch's first line advises weights_only=False
        reason = "not written by torch.save, or holding more than tensors"
    return PretrainedWeightsError(f"{path}: not a readable weights file ({reason}); {advice}")


def load_into(encoder, state_dict, source, name):
    """Copy state_dict into the encoder once its names and shapes are checked to be the encoder's:
    nothing is copied from a file that does not fit."""
    if not (isinstance(state_dict, dict) and all(map(torch.is_tensor, state_dict.values()))):
        raise PretrainedWeightsError(f"{source}: holds a {type(state_dict).__name__} that is not a "
                                     f"state dict of tensors, as torchvision's {name} file is")
    given = {key: value for key, value in state_dict.items()
             if not key.startswith(IGNORED_PREFIXES)}
    expected = encoder.state_dict()
    # A counter, not a weight: files saved before BatchNorm had it lack it, as BatchNorm allows.
    missing = [key for key in expected
               if key not in given and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in given if key not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} (such as {', '.join(keys[:3])})"
                 for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
        raise PretrainedWeightsError(f"{source}: not torchvision's {name} weights: names "
                                     f"{'; names '.join(parts)}")
    for key, value in given.items():
        if value.shape != expected[key].shape:
            raise PretrainedWeightsError(
                f"{source}: {key} has shape {tuple(value.shape)} where {name} has "
                f"{tuple(expected[key].shape)}: not torchvision's {name} weights")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise PretrainedWeightsError(f"{source}: {key} holds NaN or infinite values")
    encoder.load_state_dict(given, strict=False)  # all but num_batches_tracked checked above
