import numpy as np
import pytest
import torch

import utils
from model import UNet
from utils import CheckpointError, dice_numpy, dice_per_image, load_checkpoint, save_checkpoint


def test_dice_is_per_image_then_averaged_and_empty_on_empty_is_one():
    prediction = torch.zeros(3, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    prediction[1, :2] = True  # 8 pixels
    target[1, :1] = True  # 4 pixels, all inside the prediction
    target[2, 0, 0] = True  # missed entirely
    scores = dice_per_image(prediction, target)
    assert scores.tolist() == pytest.approx([1.0, 2 * 4 / 12, 0.0])
    assert dice_numpy(prediction[1].numpy(), target[1].numpy()) == pytest.approx(2 / 3)
    assert dice_numpy(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


class Echo(torch.nn.Module):
    """Returns large logits of a fixed answer, whatever the input."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (self.answer[: x.shape[0]] * 2 - 1) * 20 + self.dummy


def test_check_accuracy_counts_dice_and_pixels_over_a_loader():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1
    answer = target.clone()
    answer[0, 0, 0] = 0  # 4 of 8 car pixels found in image 0; image 1 empty and predicted empty
    loader = [(torch.zeros(2, 3, 4, 4), target)]
    result = utils.evaluate(loader, Echo(answer), torch.device("cpu"))
    assert result["dice"] == pytest.approx((2 * 4 / 12 + 1.0) / 2)
    assert result["pixel_accuracy"] == pytest.approx(28 / 32)


def small_state(features=(2, 4)):
    model = UNet(features=features)
    return {"model": model.state_dict(), "model_args": {"features": features}, "epoch": 3,
            "image_size": (32, 48), "threshold": 0.5, "config": {"FEATURES": features}}


def test_checkpoint_round_trip_with_prefixes_from_ddp_and_compile(tmp_path):
    state = small_state()
    state["model"] = {f"module._orig_mod.{k}": v for k, v in state["model"].items()}
    save_checkpoint(state, tmp_path / "x.pt")
    loaded = load_checkpoint(tmp_path / "x.pt")
    model = utils.model_from_checkpoint(loaded)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in loaded["model"])
    assert isinstance(model, UNet) and loaded["epoch"] == 3


def test_a_save_that_dies_midway_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(small_state(), path)
    real_save = torch.save

    def dies_midway(obj, stream):
        real_save(obj, stream)
        stream.seek(100)
        stream.truncate()
        raise KeyboardInterrupt  # Colab disconnect / Ctrl-C during the write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({**small_state(), "epoch": 99}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_leftovers_of_killed_saves_are_cleared_by_the_next_save(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".best.pt.def456.tmp").write_bytes(b"another file's")
    save_checkpoint(small_state(), tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.def456.tmp", "last.pt"]


@pytest.mark.parametrize("links", [True, False])
def test_last_shares_best_bytes_and_a_later_save_leaves_best_alone(tmp_path, monkeypatch, links):
    """An improved epoch writes best.pt once and names it last.pt too (or copies it where the file
    system refuses hard links); the next epoch's last.pt replaces the name, never best.pt's bytes."""
    if not links:
        def refuse(*args):
            raise PermissionError("Operation not permitted")

        monkeypatch.setattr(utils.os, "link", refuse)
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    save_checkpoint(small_state(), last)
    save_checkpoint({**small_state(), "epoch": 4}, best)
    utils.link_checkpoint(best, last, {**small_state(), "epoch": 4})
    assert load_checkpoint(last)["epoch"] == 4
    assert best.samefile(last) == links
    save_checkpoint({**small_state(), "epoch": 5}, last)
    assert load_checkpoint(best)["epoch"] == 4 and load_checkpoint(last)["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.parametrize("content, reason", [(b"", "not a readable checkpoint"), (b"hello", "not a readable"),
                                             (None, "no such checkpoint")])
def test_unusable_checkpoints_raise_one_clear_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_foreign_pickles_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_args": {}, "payload": object()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_device_and_mixed_precision_choice():
    assert utils.get_device("cpu").type == "cpu"
    assert utils.get_device().type in {"cuda", "mps", "cpu"}
    dtype = utils.autocast_dtype(torch.device("cpu"))
    assert dtype in (None, torch.bfloat16)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_cuda_mixed_precision_follows_native_support(monkeypatch, capability, dtype):
    """A T4 (7.5) emulates bfloat16 slowly: it gets float16 (with a GradScaler in train.py)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert utils.autocast_dtype(torch.device("cuda")) == dtype


def test_seed_everything_repeats_random_draws():
    utils.seed_everything(7)
    first = (np.random.rand(), torch.rand(1).item())
    utils.seed_everything(7)
    assert (np.random.rand(), torch.rand(1).item()) == first


def test_lovasz_hinge_is_zero_for_sure_right_masks_and_grows_with_the_wrong_pixels():
    target = torch.zeros(3, 1, 20, 30)
    target[0, :, 5:15, 5:25] = 1
    target[2] = 1  # image 1 has no car, image 2 is all car
    sure = (2 * target - 1) * 30
    assert utils.lovasz_hinge(sure, target).item() < 1e-6
    losses = []
    for wrong in (10, 40, 120):  # pixels of image 0's car called background
        logits = sure.clone()
        logits[0, 0].view(-1)[(target[0, 0].view(-1) > 0).nonzero()[:wrong, 0]] = -30
        losses.append(utils.lovasz_hinge(logits, target).item())
    assert 0 < losses[0] < losses[1] < losses[2]
    logits = torch.zeros(3, 1, 20, 30, requires_grad=True)
    utils.lovasz_hinge(logits, target * 0.9).backward()  # soft targets are binarised at a half
    assert torch.isfinite(logits.grad).all() and (logits.grad[target > 0] < 0).all()
    assert torch.isfinite(utils.segmentation_loss(logits, target, "dice"))


@pytest.mark.parametrize("paint", [(200, 20, 20), (20, 180, 30), (30, 40, 200), (240, 240, 240)],
                         ids=["red", "green", "blue", "white"])
def test_the_overlay_shows_on_a_car_of_any_colour(paint):
    from pictures import overlay

    image = np.full((120, 180, 3), 110, np.uint8)
    mask = np.zeros((120, 180), np.uint8)
    mask[30:90, 40:140] = 1
    image[mask > 0] = paint
    tinted = overlay(image, mask).astype(int)
    change = np.abs(tinted - image.astype(int))[mask > 0].sum(axis=1)
    assert change.mean() > 100  # the tint shows inside (a red tint moved a red car by 35 levels)
    assert (tinted[mask == 0] == image[mask == 0]).all()  # the background as it was
    edge = tinted[30, 60]
    assert np.abs(edge - np.array(paint)).sum() > 200  # the outline in full colour
