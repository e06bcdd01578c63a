"""Validation true to the weights: the printed Dice is what the saved checkpoint scores."""
import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import data_folder
import train
from conftest import LEARNS, split_of, tiny_args
from dataset import CarvanaDataset, val_transform
from utils import autocast_dtype, evaluate, load_checkpoint, model_from_checkpoint, recompute_batchnorm


def test_recompute_batchnorm_averages_the_batch_statistics_and_restores_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.1)).eval()
    batches = [torch.randn(2, 3, 8, 8) * scale + shift for scale, shift in ((1, 0), (3, 5))]
    loader = DataLoader(TensorDataset(torch.cat(batches), torch.zeros(4)), batch_size=2)
    assert recompute_batchnorm(model, loader, torch.device("cpu")) == 4
    with torch.no_grad():
        outputs = [model[0](batch) for batch in batches]
    means = torch.stack([out.mean((0, 2, 3)) for out in outputs]).mean(0)
    variances = torch.stack([out.var((0, 2, 3), unbiased=True) for out in outputs]).mean(0)
    norm = model[1]
    assert torch.allclose(norm.running_mean, means, atol=1e-5)
    assert torch.allclose(norm.running_var, variances, rtol=1e-4)
    assert norm.momentum == 0.1 and not model.training


def test_printed_dice_is_what_the_saved_checkpoint_scores(tmp_path, synthetic_root):
    """Every epoch's best.pt/last.pt, reloaded as predict.py loads it, scores the history's Dice on
    the validation images at the training size; also with the weight average, from epoch 1 on."""
    args = tiny_args(tmp_path, synthetic_root, 2, *LEARNS, "--EMA_DECAY=0.99")
    result = train.main(args)
    config = result["config"]
    with open(tmp_path / "checkpoints" / "history.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    model = model_from_checkpoint(state).to(memory_format=torch.channels_last)
    _, val = split_of(config)
    loader = DataLoader(CarvanaDataset(val, val_transform(), state["image_size"]), batch_size=4)
    device = torch.device("cpu")
    scores = evaluate(loader, model, device, state["threshold"], autocast_dtype(device))  # as predict.py runs
    assert scores["dice"] == pytest.approx(float(rows[-1]["dice"]), abs=1e-4)
    assert float(rows[0]["dice"]) > 0.3  # the first epoch's model already predicts car


def test_batchnorm_statistics_are_recomputed_before_each_validation(tmp_path, synthetic_root):
    """The saved model's statistics are those of its own weights over the recomputing images; without
    recomputing (BATCHNORM_IMAGES=0) they are the weight average's lagging running averages."""
    args = tiny_args(tmp_path / "on", synthetic_root, 1, *LEARNS)
    config = train.main(args)["config"]
    state = load_checkpoint(tmp_path / "on" / "checkpoints" / "last.pt")
    model = model_from_checkpoint(state)
    saved = {name: value.clone() for name, value in model.state_dict().items() if "running" in name}
    train_samples, _ = split_of(config)
    subset = train.batchnorm_set(train_samples, config, None)
    device = torch.device("cpu")
    recompute_batchnorm(model, DataLoader(subset, batch_size=config["BATCH_SIZE"]), device, autocast_dtype(device))
    for name, value in model.state_dict().items():
        if "running" in name:
            assert torch.allclose(value, saved[name], rtol=1e-3, atol=1e-4), name
    train.main(tiny_args(tmp_path / "off", synthetic_root, 1, *LEARNS, "--BATCHNORM_IMAGES=0"))
    lagging = load_checkpoint(tmp_path / "off" / "checkpoints" / "last.pt")["model"]
    assert not torch.allclose(lagging["downs.0.1.running_mean"], saved["downs.0.1.running_mean"], atol=1e-3)


def test_the_recomputing_images_are_bounded_and_the_same_every_time():
    samples = [data_folder.Sample(f"car{i:03d}_01.jpg", f"car{i:03d}_01_mask.gif", 10, 10) for i in range(500)]
    config = {**train.defaults(), "BATCHNORM_IMAGES": 256}
    first = train.batchnorm_set(samples, config, None).samples
    assert len(first) == 256 and first == train.batchnorm_set(samples, config, None).samples
    assert len(train.batchnorm_set(samples[:10], config, None)) == 10
    auto = {**config, "BATCHNORM_IMAGES": "auto"}  # a quarter of the images, 32 to 256
    counts = [len(train.batchnorm_set(samples[:n], auto, None)) for n in (10, 48, 200, 500)]
    assert counts == [10, 32, 50, 125]
    assert len(train.batchnorm_set(samples * 3, auto, None)) == 256


@pytest.mark.parametrize("value, expected",
                         [("auto", "auto"), ("Auto", "auto"), ("0", 0), ("64", 64)])
def test_batchnorm_images_is_auto_or_a_count(value, expected):
    assert train.parse_settings([f"--BATCHNORM_IMAGES={value}"])[0]["BATCHNORM_IMAGES"] == expected


@pytest.mark.parametrize("value", ["-1", "many"])
def test_batchnorm_images_refuses_what_is_not_auto_or_a_count_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_settings([f"--BATCHNORM_IMAGES={value}"])
    message = str(stop.value).strip()
    assert "BATCHNORM_IMAGES" in message and "auto or a count" in message and "\n" not in message


def test_a_model_that_predicts_no_car_is_said_so_and_never_saved_as_best(tmp_path, synthetic_root, capsys):
    # At a threshold of 0.999 a one-epoch model finds no car pixel anywhere.
    result = train.main(tiny_args(tmp_path, synthetic_root, 1, "--THRESHOLD=0.999"))
    out = capsys.readouterr().out
    assert "the model predicts no car on any of the 4 validation photos (highest car probability" in out
    assert "train longer (NUM_EPOCHS) or raise LEARNING_RATE" in out and "new best" not in out
    assert not (tmp_path / "checkpoints" / "best.pt").exists() and (tmp_path / "checkpoints" / "last.pt").exists()
    assert "no epoch's model predicted any car, so there is no best.pt" in out and result["best_dice"] < 0


def test_predict_says_when_the_model_finds_no_car(tmp_path, synthetic_root, capsys):
    import predict

    train.main(tiny_args(tmp_path, synthetic_root, 1, "--THRESHOLD=0.999"))
    capsys.readouterr()
    status = predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "last.pt"), "--input",
                           str(tmp_path / "checkpoints" / "val_files.txt"), "--masks",
                           str(synthetic_root / "train_masks"), "--no-images", "--workers=0", "--output",
                           str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0 and "the model predicts no car on any of these 4 images" in captured.err
    assert "pass --threshold" not in captured.out


def test_all_empty_validation_masks_are_an_error_not_dice_one(tmp_path, synthetic_root):
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    for side, images in (("train", sorted((synthetic_root / "train").glob("*.jpg"))[:8]),
                         ("val", sorted((synthetic_root / "train").glob("*.jpg"))[8:12])):
        (root / f"{side}_images").mkdir(parents=True)
        (root / f"{side}_masks").mkdir()
        for image in images:
            shutil.copy(image, root / f"{side}_images" / image.name)
            mask = synthetic_root / "train_masks" / f"{image.stem}_mask.gif"
            if side == "train":
                shutil.copy(mask, root / "train_masks" / mask.name)
            else:
                Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(root / "val_masks" / f"{image.stem}.png")
    with pytest.raises(SystemExit, match=r"all 4 validation masks in .* are empty \(no car pixels\), so Dice cannot tell"):
        train.main(tiny_args(tmp_path, root, 1))
    assert not (tmp_path / "checkpoints").exists()
