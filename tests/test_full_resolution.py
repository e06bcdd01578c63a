"""Training where a batch of whole images does not fit: accumulated steps, activation checkpointing,
crops, the memory count and out-of-memory errors."""
import copy
import csv
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import memory
import predict
import train
from conftest import tiny_args
from model import UNet
from utils import ExponentialMovingAverage, autocast_dtype, load_checkpoint


class Smooth(nn.Module):
    """A convolutional net without BatchNorm, whose step does not depend on how a batch is split."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x):
        return self.layers(x)


def one_epoch(model, batches, accumulate):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = train.TrainingState(model, ExponentialMovingAverage(model, 0.0), optimizer,
                                torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), None)
    config = {"NUM_EPOCHS": 1, "LEARNING_RATE": 0.5, "WARMUP": 0, "LOSS": "lovasz", "ACCUMULATE_STEPS": accumulate}
    train.train_one_epoch(batches, state, model, config, 0, 0, 100)
    return model


@pytest.mark.parametrize("images, micro, accumulate", [(8, 2, 4), (7, 2, 2), (6, 3, 2)])
def test_accumulated_micro_batches_step_as_one_batch_of_them_all(images, micro, accumulate):
    torch.manual_seed(0)
    x = torch.rand(images, 3, 16, 24)
    y = (torch.rand(images, 1, 16, 24) > 0.5).float()
    whole = DataLoader(TensorDataset(x, y), batch_size=micro * accumulate)
    split = DataLoader(TensorDataset(x, y), batch_size=micro)  # the last step of 7 images: 2 + 1
    start = Smooth()
    one, many = one_epoch(copy.deepcopy(start), whole, 1), one_epoch(copy.deepcopy(start), split, accumulate)
    for a, b, before in zip(one.parameters(), many.parameters(), start.parameters()):
        assert not torch.equal(a, before)  # the step happened
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_accumulation_counts_optimizer_steps_in_the_schedule_and_the_checkpoint(tmp_path, synthetic_root):
    def run(folder, *settings):
        result = train.main(tiny_args(tmp_path / folder, synthetic_root, 3, "--WARMUP=0.3", *settings))
        with open(tmp_path / folder / "checkpoints" / "history.csv", newline="") as stream:
            rates = [row["learning_rate"] for row in csv.DictReader(stream)]
        return result, rates, load_checkpoint(tmp_path / folder / "checkpoints" / "last.pt")

    big_result, big_rates, big_state = run("big", "--BATCH_SIZE=8")
    small_result, small_rates, small_state = run("small", "--BATCH_SIZE=2", "--ACCUMULATE_STEPS=4")
    assert abs(small_result["best_dice"] - big_result["best_dice"]) < 0.2  # the same run, BatchNorm aside
    assert small_rates == big_rates and len(set(big_rates)) == 3
    assert small_state["config"]["ACCUMULATE_STEPS"] == 4 and big_state["config"]["ACCUMULATE_STEPS"] == 1
    steps = small_state["optimizer"]["state"][0]["step"]
    assert steps == big_state["optimizer"]["state"][0]["step"] == 3 * math.ceil(12 / 8)
    assert small_state["average_steps"] == big_state["average_steps"] == steps


def gradients(model, x, dtype):
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = (model(x).float() ** 2).mean()
    loss.backward()
    return [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_activation_checkpointing_gives_the_same_gradients_and_statistics(dtype):
    torch.manual_seed(0)
    plain = UNet(features=(4, 8, 16)).to(memory_format=torch.channels_last)
    saving = copy.deepcopy(plain)
    saving.activation_checkpointing = True
    x = torch.rand(2, 3, 37, 53).contiguous(memory_format=torch.channels_last)  # odd sizes: padded levels too
    for got, want in zip(gradients(saving, x, dtype), gradients(plain, x, dtype)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for got, want in zip(saving.buffers(), plain.buffers()):  # the rerun leaves BatchNorm's statistics alone
        assert torch.equal(got, want)


def test_activation_checkpointing_needs_under_half_the_memory_of_a_step():
    plain = memory.counted_step({"features": (8, 16, 32)}, (128, 192), torch.bfloat16, checkpointing=False)
    saving = memory.counted_step({"features": (8, 16, 32)}, (128, 192), torch.bfloat16, checkpointing=True)
    assert saving < 0.6 * plain


def test_the_live_count_sees_each_tensor_until_it_is_freed():
    with memory.LiveTensors() as live:
        kept = torch.zeros(1000)            # 4,000 bytes, alive to the end
        dropped = torch.zeros(2000)         # 8,000 bytes, freed before the next one
        del dropped
        torch.zeros(500).add_(1)            # 2,000 bytes, freed at once
    assert live.peak() == 12_000
    assert live.peak(leaving_out=[kept]) == 8_000


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_memory_per_image_grows_with_the_pixels_as_counted_at_another_size(checkpointing):
    features, size = (8, 16, 32), (256, 320)
    per_step, per_image = memory.step_bytes({"features": features}, size, torch.bfloat16, checkpointing)
    counted = memory.counted_step({"features": features}, size, torch.bfloat16, checkpointing)
    assert per_step + per_image == pytest.approx(counted, rel=0.05)


def test_a_checkpointed_training_run_ends_with_the_same_weights(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path / "plain", synthetic_root, 2))
    train.main(tiny_args(tmp_path / "saving", synthetic_root, 2, "--ACTIVATION_CHECKPOINTING=true"))
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    saving = load_checkpoint(tmp_path / "saving" / "checkpoints" / "last.pt")
    for part in ("model", "training_model"):
        for name, value in plain[part].items():
            torch.testing.assert_close(saving[part][name].float(), value.float(), atol=1e-5, rtol=1e-4)


def test_a_crop_trained_checkpoint_predicts_whole_full_size_photos(tmp_path, synthetic_root, capsys):
    result = train.main(tiny_args(tmp_path, synthetic_root, 2, "--IMAGE_HEIGHT=64", "--IMAGE_WIDTH=96",
                                  "--CROP_HEIGHT=32", "--CROP_WIDTH=48"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["image_size"] == (64, 96) and state["crop_size"] == (32, 48)
    assert result["last"]["images"] == 4  # validation on the whole 64x96 images
    capsys.readouterr()
    status = predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "last.pt"), "--input",
                           str(synthetic_root / "train"), "--output", str(tmp_path / "out"), "--workers", "0"])
    assert status == 0
    import cv2

    masks = sorted((tmp_path / "out").glob("*_mask.png"))
    assert len(masks) == 16 and cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape == (128, 192)


@pytest.mark.parametrize("argument, message", [
    ("--ACCUMULATE_STEPS=0", "ACCUMULATE_STEPS must be at least 1"),
    ("--CROP_HEIGHT=32", "CROP_HEIGHT x CROP_WIDTH must both be 0"),
    ("--CROP_HEIGHT=320 --CROP_WIDTH=320", "between 16 and IMAGE_HEIGHT x IMAGE_WIDTH"),
])
def test_bad_crop_and_accumulation_settings_are_one_line_errors(argument, message):
    with pytest.raises(SystemExit, match=message) as error:
        train.parse_settings(argument.split())
    assert "\n" not in str(error.value)


def test_out_of_memory_in_a_step_names_settings_that_fit_and_keeps_the_checkpoints(tmp_path, synthetic_root,
                                                                                    monkeypatch):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "forward", out_of_memory)
    per_image = memory.step_bytes({"features": (4, 8)}, (32, 48), autocast_dtype(torch.device("cpu")))[1]  # the run's type
    fixed = memory.fixed_training_bytes(UNet(features=(4, 8)))
    monkeypatch.setattr(memory, "device_memory", lambda device: (fixed + 2.5 * per_image) / memory.HEADROOM)
    with pytest.raises(SystemExit, match=r"out of memory on cpu .* training 32x48 images in batches of 4; try "
                                         r"--BATCH_SIZE=2 --ACCUMULATE_STEPS=2 or .*--ACTIVATION_CHECKPOINTING=true;"
                                         r" the last good checkpoint is .*last\.pt") as error:
        train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    assert "\n" not in str(error.value)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_out_of_memory_in_prediction_names_a_batch_that_fits(trained, synthetic_root, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(predict, "forward", out_of_memory)
    status = predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input",
                           str(synthetic_root / "train"), "--output", str(tmp_path / "out"), "--workers", "0",
                           "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and err.startswith("error: out of memory on cpu") and "--batch-size" in err
