"""train.py and predict.py with a ResNet encoder: the weights file in the checkpoint, one-line
refusals that train nothing, ImageNet normalisation inside the model, and no flag to predict."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import predict
import pretrained
import train
from conftest import ROOT, damage, split_of, tiny_args
from dataset import CarvanaDataset, val_transform
from model import ResNetEncoder, ResNetUNet
from submission import rle_decode
from utils import evaluate, load_checkpoint, model_from_checkpoint

RESNET = ["--ENCODER=resnet18", "--IMAGE_HEIGHT=64", "--IMAGE_WIDTH=96", "--BATCH_SIZE=4"]


def resnet_args(tmp, data_dir, epochs, *extra):
    """tiny_args without FEATURES, which only the plain UNet takes."""
    return [argument for argument in tiny_args(tmp, data_dir, epochs, *extra) if not argument.startswith("--FEATURES=")]


def weights_file(path, seed=1):
    """A file as torchvision's resnet18 one is: its names and shapes (fc.* included), trained-like
    values of their own (not this project's initialisation)."""
    torch.manual_seed(seed)
    weights = ResNetEncoder("resnet18").state_dict()
    for value in weights.values():
        if value.is_floating_point():
            value.mul_(0.9).add_(0.01)
    torch.save({**weights, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    return weights


def test_the_weights_file_is_what_training_starts_from(tmp_path, synthetic_root):
    """At a rate of 1e-9 for one epoch every convolution of the file is in the checkpoint as it was."""
    weights = weights_file(tmp_path / "resnet18.pth")
    train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, f"--ENCODER_WEIGHTS={tmp_path / 'resnet18.pth'}",
                         "--LEARNING_RATE=1e-9"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["model_args"]["encoder"] == "resnet18"
    convolutions = [key for key, value in weights.items() if value.dim() == 4]
    assert len(convolutions) == 20
    for key in convolutions:
        torch.testing.assert_close(state["model"][f"encoder.{key}"], weights[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("problem", ["wrong shape", "no internet", "truncated"])
def test_weights_that_cannot_load_stop_before_training_in_one_line(tmp_path, synthetic_root, monkeypatch, problem,
                                                                 capsys):
    path = tmp_path / "resnet18.pth"
    weights = weights_file(path)
    if problem == "wrong shape":
        torch.save({**weights, "layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)}, path)
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    choice = str(path)
    if problem == "no internet":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setitem(pretrained.IMAGENET_URLS, "resnet18", "http://127.0.0.1:9/resnet18-f37072fd.pth")
        choice = "imagenet"
    with pytest.raises(SystemExit) as stopped:
        train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, f"--ENCODER_WEIGHTS={choice}"))
    message = str(stopped.value)
    assert message.startswith("error: ENCODER_WEIGHTS: ") and "\n" not in message
    assert {"wrong shape": "layer2.0.conv1.weight", "no internet": "http://127.0.0.1:9/resnet18-f37072fd.pth",
            "truncated": str(path)}[problem] in message
    assert not list(tmp_path.glob("checkpoints/*.pt"))  # nothing trained from random weights
    assert "epoch 1/1" not in capsys.readouterr().out


def test_a_resnet_checkpoint_predicts_with_no_other_flag_and_scores_what_training_printed(tmp_path, synthetic_root,
                                                                                          capsys):
    result = train.main(resnet_args(tmp_path, synthetic_root, 3, *RESNET, "--ENCODER_WEIGHTS=none", "--AMP=false",
                                  "--LEARNING_RATE=1e-3"))
    capsys.readouterr()
    checkpoint = tmp_path / "checkpoints" / "best.pt"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "checkpoints" / "val_files.txt"),
                         "--output", str(tmp_path / "masks"), "--workers", "0"]) == 0
    assert len(list((tmp_path / "masks").glob("*_mask.png"))) == 4
    state = load_checkpoint(checkpoint)
    _, validation = split_of(result["config"])
    loader = DataLoader(CarvanaDataset(validation, val_transform(), state["image_size"]), batch_size=4)
    model = model_from_checkpoint(state).to(memory_format=torch.channels_last)
    scores = evaluate(loader, model, torch.device("cpu"), state["threshold"])  # as predict.py runs it
    assert scores["dice"] == pytest.approx(result["best_dice"], abs=1e-4) and result["best_dice"] > 0


def test_a_resumed_resnet_run_needs_no_weights_file(tmp_path, synthetic_root):
    path = tmp_path / "resnet18.pth"
    weights_file(path)
    train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, f"--ENCODER_WEIGHTS={path}"))
    path.unlink()  # the run's weights are in its checkpoint now
    train.main(resnet_args(tmp_path, synthetic_root, 2, *RESNET, "--LOAD_MODEL=true"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_the_encoder_learns_at_its_own_rate():
    config = {**train.defaults(), "ENCODER": "resnet18", "ENCODER_LR_FACTOR": 0.1}
    model = train.build_model(config, torch.device("cpu"))
    groups = train.make_optimizer(model, config).param_groups
    assert [group["rate_factor"] for group in groups] == [1.0, config["HEAD_LR_FACTOR"], 0.1]
    encoder = {id(parameter) for parameter in model.encoder.parameters()}
    assert {id(parameter) for parameter in groups[2]["params"]} == encoder
    plain = train.make_optimizer(train.build_model(train.defaults(), torch.device("cpu")), train.defaults())
    assert len(plain.param_groups) == 2  # the plain UNet's checkpoints resume as before


def test_the_model_normalises_its_inputs_as_imagenet_weights_expect():
    torch.manual_seed(0)
    model = ResNetUNet("resnet18").eval()
    plain = ResNetUNet("resnet18", normalization=((0, 0, 0), (1, 1, 1))).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 64, 96)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - mean) / std))
    assert model.model_args["normalization"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("argument, message", [
    ("--ENCODER=vgg11", "ENCODER must be one of unet, resnet18, resnet34, resnet50, got 'vgg11'"),
    ("--ENCODER_WEIGHTS=imagenet", "ENCODER_WEIGHTS: the plain UNet (ENCODER=unet) has no pretrained weights"),
    ("--ENCODER_LR_FACTOR=0", "ENCODER_LR_FACTOR must be above 0 and at most 1, got 0.0"),
    ("--ENCODER=resnet34 --ENCODER_WEIGHTS=nowhere.pth",
     "ENCODER_WEIGHTS must be imagenet, none or the path of a .pth file, got 'nowhere.pth' (no such file)"),
    ("--ENCODER=resnet34 --IMAGE_HEIGHT=32 --IMAGE_WIDTH=32", "leaves the resnet34 UNet's bottleneck one pixel"),
    ("--ENCODER=resnet18 --FEATURES=32,64", "FEATURES: sets the plain UNet's widths; the resnet18 UNet's are fixed"),
])
def test_encoder_settings_that_cannot_work_are_one_line(argument, message):
    with pytest.raises(SystemExit, match="^error: " + ".*" + message.replace("(", r"\(").replace(")", r"\)")):
        train.parse_settings(argument.split())


def test_out_of_memory_advice_counts_a_resnet_unet(tmp_path, synthetic_root, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "forward", out_of_memory)
    with pytest.raises(SystemExit, match=r"^error: out of memory on cpu .* training 64x96 images in batches of 4; "
                                         r"try --BATCH_SIZE=2 --ACCUMULATE_STEPS=2"):
        train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, "--ENCODER_WEIGHTS=none"))


def test_a_damaged_weights_file_is_one_line_naming_the_damaged_part(tmp_path, synthetic_root):
    path = tmp_path / "resnet18.pth"
    weights_file(path)
    damage(path)
    with pytest.raises(SystemExit, match=r"^error: ENCODER_WEIGHTS: .*resnet18\.pth is damaged: .* no longer matches"):
        train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, f"--ENCODER_WEIGHTS={path}"))


def test_a_resume_records_the_weights_its_run_started_from(tmp_path, synthetic_root):
    path = tmp_path / "resnet18.pth"
    weights_file(path)
    train.main(resnet_args(tmp_path, synthetic_root, 1, *RESNET, f"--ENCODER_WEIGHTS={path}"))
    train.main(resnet_args(tmp_path, synthetic_root, 2, *RESNET, "--LOAD_MODEL=true"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]["ENCODER_WEIGHTS"] == str(path)


def test_a_resnet_unet_takes_every_training_path_and_its_submission_rows_are_its_masks(tmp_path, synthetic_root):
    """Accumulation, crops, checkpointing, compile and the cache together, then Kaggle's rows."""
    paths = ["--ENCODER_WEIGHTS=none", "--ACCUMULATE_STEPS=2", "--CROP_HEIGHT=64", "--CROP_WIDTH=64",
             "--ACTIVATION_CHECKPOINTING=true", "--COMPILE=true", "--AMP=false"]
    result = train.main(resnet_args(tmp_path, synthetic_root, 2, *RESNET, *paths))
    assert result["config"]["ENCODER"] == "resnet18" and result["best_dice"] > 0
    assert any((tmp_path / "cache").iterdir())  # the resized training and validation copies
    checkpoint = tmp_path / "checkpoints" / "best.pt"
    assert tuple(load_checkpoint(checkpoint)["crop_size"]) == (64, 64)
    inputs = str(tmp_path / "checkpoints" / "val_files.txt")
    assert predict.main(["--checkpoint", str(checkpoint), "--input", inputs, "--output", str(tmp_path / "masks"),
                         "--workers", "0"]) == 0
    assert predict.main(["--checkpoint", str(checkpoint), "--input", inputs, "--submission",
                         str(tmp_path / "rows.csv"), "--no-images", "--workers", "0"]) == 0
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert lines[0] == "img,rle_mask" and len(lines) == 5
    for line in lines[1:]:
        name, text = line.split(",")
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{Path(name).stem}_mask.png")) > 0
        assert np.array_equal(rle_decode(text, mask.shape), mask), name


def test_a_resnet_unet_trains_under_torchrun(tmp_path, synthetic_root):
    from test_distributed import torchrun

    args = resnet_args(tmp_path, synthetic_root, 1, *RESNET, "--ENCODER_WEIGHTS=none", "--AMP=false")
    run = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *args],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["model_args"]["encoder"] == "resnet18" and state["epoch"] == 1
