"""Colab's T4 path, float16 autocast with a GradScaler, run for real on whatever device is here."""
import itertools
import math

import pytest
import torch

import train
from conftest import tiny_args
from model import UNet
from utils import ExponentialMovingAverage, load_checkpoint


def stepping(model, optimizer, scaler, dtype):
    """A TrainingState of these parts on the CPU."""
    return train.TrainingState(model, ExponentialMovingAverage(model, 0.9), optimizer, scaler, torch.device("cpu"), dtype)


def ten_steps(dtype):
    """Losses of ten steps on one batch with the training loop's own step."""
    torch.manual_seed(0)
    model = UNet(features=(4, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    y = torch.zeros(4, 1, 32, 48)
    y[..., 8:24, 12:36] = 1
    x = 0.5 * torch.rand(4, 3, 32, 48) + 0.5 * y  # a brighter car on a noisy background
    config = {"NUM_EPOCHS": 10, "LEARNING_RATE": 1e-2, "WARMUP": 0, "LOSS": "lovasz", "ACCUMULATE_STEPS": 1}
    state = stepping(model, optimizer, scaler, dtype)
    losses = [train.train_one_epoch([(x, y)], state, model, config, epoch, epoch, 10) for epoch in range(10)]
    return losses, scaler, optimizer.state[model.head.weight]["step"]


def test_float16_steps_with_loss_scaling_learn_as_float32_does():
    losses, scaler, steps = ten_steps(torch.float16)
    reference, _, _ = ten_steps(None)
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)) and losses[-1] < 0.85 * losses[0]
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.01
    assert scaler.is_enabled() and scaler.get_scale() > 1 and steps == 10


def test_float16_runs_save_their_loss_scale(trained_float16):
    tmp, result, _ = trained_float16
    state = load_checkpoint(tmp / "checkpoints" / "last.pt")
    assert state["amp_dtype"] == "torch.float16" and state["scaler"]["scale"] > 0 and result["last"]["images"] > 0


@pytest.fixture(scope="module")
def trained_float16(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("float16")
    return tmp, train.main(tiny_args(tmp, synthetic_root, 1, "--AMP_DTYPE=float16")), synthetic_root


def test_a_resume_restores_the_loss_scale(trained_float16, monkeypatch):
    tmp, _, synthetic_root = trained_float16
    saved = load_checkpoint(tmp / "checkpoints" / "last.pt")["scaler"]["scale"]
    seen = []
    real = train.train_one_epoch

    def record_scale(loader, state, *args):
        seen.append(state.scaler.get_scale())
        return real(loader, state, *args)

    monkeypatch.setattr(train, "train_one_epoch", record_scale)
    train.main(tiny_args(tmp, synthetic_root, 2, "--AMP_DTYPE=float16", "--LOAD_MODEL=true"))
    assert seen == [saved]


def test_overflowing_gradients_skip_the_step_and_do_not_stop_the_run():
    """Inf gradients in float16 are the scaler's business (skip, lower the scale); only a
    non-finite loss stops training."""
    torch.manual_seed(0)
    model = UNet(features=(4, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    batches = [(torch.rand(2, 3, 32, 48), (torch.rand(2, 1, 32, 48) > 0.5).float()) for _ in range(3)]
    head = model.head.weight
    calls = []
    head.register_hook(lambda grad: grad * math.inf if not calls.append(1) and len(calls) == 1 else grad)
    config = {"NUM_EPOCHS": 1, "LEARNING_RATE": 1e-3, "WARMUP": 0, "LOSS": "lovasz", "ACCUMULATE_STEPS": 1}
    loss = train.train_one_epoch(batches, stepping(model, optimizer, scaler, torch.float16), model, config, 0, 0, 3)
    assert math.isfinite(loss)
    assert optimizer.state[head]["step"] == 2  # the first of three steps was skipped
    assert scaler.get_scale() == 2.0**15  # halved once from 2**16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_loss_still_stops_the_run():
    model = UNet(features=(4, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(torch.full((2, 3, 32, 48), math.nan), torch.zeros(2, 1, 32, 48))]
    with pytest.raises(train.NonFiniteLoss, match="loss became nan at epoch 1, step 1"):
        train.train_one_epoch(batches, stepping(model, optimizer, torch.amp.GradScaler("cpu"), torch.float16), model,
                              {"NUM_EPOCHS": 1, "LEARNING_RATE": 1e-3, "WARMUP": 0, "LOSS": "lovasz", "ACCUMULATE_STEPS": 1}, 0, 0, 1)
