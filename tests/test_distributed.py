"""train.py under torchrun with Gloo on CPU: two processes, one checkpoint format."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_folder
from conftest import LEARNS, tiny_args
from dataset import CarvanaDataset, val_transform
from utils import evaluate, load_checkpoint, model_from_checkpoint, segmentation_loss


def torchrun():
    launcher = Path(sys.executable).with_name("torchrun")
    return [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]


# Six epochs of single-image batches, no weight average and a high rate: enough steps for the
# BatchNorm running statistics to settle, so that the best model predicts some car (Dice near 0.4).
EPOCHS = 6
LEARNS_FAST = ["--BATCH_SIZE=1", "--LEARNING_RATE=0.01", "--EMA_DECAY=0"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("ddp")
    seen = tmp / "seen"
    seen.mkdir()
    # AMP off: float32 makes the single-process check below reproduce the printed Dice exactly.
    args = tiny_args(tmp, synthetic_root, EPOCHS, *LEARNS, *LEARNS_FAST, "--AMP=false", "--VAL_FRACTION=0.25")
    run = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2",
                          str(Path(__file__).with_name("ddp_probe.py")), str(seen), *args],
                         capture_output=True, text=True, timeout=120, check=False)
    return tmp, seen, run


def test_torchrun_ends_cleanly_with_one_set_of_checkpoints(two_process_run):
    tmp, _, run = two_process_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (tmp / "checkpoints").glob("*.pt")) == ["best.pt", "last.pt"]
    assert run.stdout.count(f"epoch {EPOCHS}/{EPOCHS}:") == 1  # rank 0 alone prints
    assert "x 2 processes" in run.stdout
    state = load_checkpoint(tmp / "checkpoints" / "last.pt")
    assert state["epoch"] == EPOCHS and not any(key.startswith("module.") for key in state["model"])


def test_ranks_train_on_disjoint_samples_reshuffled_each_epoch(two_process_run):
    _, seen, _ = two_process_run
    shares = {path.stem: path.read_text().split() for path in seen.glob("*.txt")}
    assert set(shares) == {f"rank{rank}_epoch{epoch}" for rank in (0, 1) for epoch in range(EPOCHS)}
    for epoch in (0, 1):
        first, second = shares[f"rank0_epoch{epoch}"], shares[f"rank1_epoch{epoch}"]
        assert first and len(first) == len(second) and not set(first) & set(second)
    assert shares["rank0_epoch0"] != shares["rank0_epoch1"]


def test_printed_scores_are_the_whole_validation_set_scores(two_process_run):
    tmp, _, run = two_process_run
    printed = {int(epoch): (float(loss), float(dice), float(accuracy)) for epoch, loss, dice, accuracy in re.findall(
        rf"epoch (\d)/{EPOCHS}: train loss [\d.]+, val loss ([\d.]+), val Dice ([\d.]+), pixel accuracy ([\d.]+)%",
        run.stdout)}
    state = load_checkpoint(tmp / "checkpoints" / "best.pt")
    loss, dice, accuracy = printed[state["epoch"]]
    assert dice > 0  # a model that predicts some car, so that the comparison means something
    config = state["config"]
    samples, _ = data_folder.scan_pairs(Path(config["DATA_DIR"]) / "train", Path(config["DATA_DIR"]) / "train_masks")
    _, val = data_folder.split_by_car(samples, config["VAL_FRACTION"], config["SEED"])
    assert len(val) == 4  # 1 of 4 cars: each process scored 2 of its images
    loader = torch.utils.data.DataLoader(CarvanaDataset(val, val_transform(), state["image_size"]),
                                         batch_size=3)
    single = evaluate(loader, model_from_checkpoint(state), torch.device("cpu"), loss_fn=segmentation_loss)
    assert single["images"] == 4
    assert abs(single["dice"] - dice) <= 5e-5 and abs(single["loss"] - loss) <= 5e-5
    assert abs(100 * single["pixel_accuracy"] - accuracy) <= 5e-3


def test_single_process_resume_from_a_torchrun_checkpoint(two_process_run, synthetic_root, tmp_path):
    tmp, _, _ = two_process_run
    shutil.copytree(tmp / "checkpoints", tmp_path / "checkpoints")
    import train

    result = train.main(tiny_args(tmp_path, synthetic_root, EPOCHS + 1, *LEARNS, *LEARNS_FAST, "--AMP=false",
                                  "--VAL_FRACTION=0.25", "--LOAD_MODEL=true"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == EPOCHS + 1
    assert result["last"]["images"] == 4


@pytest.fixture(scope="module")
def all_reduces(tmp_path_factory, synthetic_root):
    """Gradient all-reduces per process of one epoch of 6 single-image micro-batches a process, with
    ACCUMULATE_STEPS 1 and 4."""
    counts = {}
    for accumulate in (1, 4):
        tmp = tmp_path_factory.mktemp(f"accumulate{accumulate}")
        args = tiny_args(tmp, synthetic_root, 1, "--BATCH_SIZE=1", f"--ACCUMULATE_STEPS={accumulate}",
                         "--VAL_FRACTION=0.25", "--BATCHNORM_IMAGES=2")
        run = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2",
                              str(Path(__file__).with_name("ddp_probe.py")), str(tmp), *args],
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        counts[accumulate] = [int((tmp / f"all_reduces_rank{rank}.count").read_text()) for rank in (0, 1)]
    return counts


def test_accumulated_micro_batches_all_reduce_once_per_optimizer_step(all_reduces):
    """12 training images, 6 a process: 6 optimizer steps at ACCUMULATE_STEPS=1, 2 at 4 (4 + 2)."""
    assert all_reduces[1][0] == all_reduces[1][1] and all_reduces[4][0] == all_reduces[4][1]
    buckets = all_reduces[1][0] / 6
    assert buckets >= 1 and all_reduces[4][0] == 2 * buckets
