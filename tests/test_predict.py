import shutil

import cv2
import numpy as np
import pytest

import predict
import synthetic
from utils import dice_numpy


@pytest.fixture(scope="module")
def full_size_set(tmp_path_factory):
    """Two synthetic cars at Carvana's full 1918x1280."""
    root = tmp_path_factory.mktemp("full")
    synthetic.make_synthetic(root, cars=1, angles=2, size=(1918, 1280), progress=False)
    return root


def independent_dice(output, mask_dir):
    """Dice recomputed from the mask files predict.py wrote, with PIL instead of the code under test."""
    from PIL import Image

    scores, correct, pixels = [], 0, 0
    for path in sorted(output.glob("*_mask.png")):
        predicted = np.array(Image.open(path)) > 127
        truth = np.array(Image.open(mask_dir / f"{path.stem}.gif")) > 0
        scores.append(dice_numpy(predicted, truth))
        correct += (predicted == truth).sum()
        pixels += truth.size
    return np.mean(scores), correct / pixels


def test_masks_come_out_at_full_resolution_with_scores(trained, full_size_set, tmp_path, capsys):
    checkpoint = trained[0] / "checkpoints" / "best.pt"
    status = predict.main(["--checkpoint", str(checkpoint), "--input", str(full_size_set / "train"),
                           "--output", str(tmp_path), "--masks", str(full_size_set / "train_masks")])
    assert status == 0
    masks = sorted(tmp_path.glob("*_mask.png"))
    assert [m.name for m in masks] == [p.stem + "_mask.png" for p in sorted((full_size_set / "train").iterdir())]
    for mask in masks:
        pixels = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (1280, 1918) and set(np.unique(pixels)) <= {0, 255}
        assert (tmp_path / mask.name.replace("_mask.png", "_overlay.jpg")).is_file()
    out = capsys.readouterr().out
    dice, accuracy = independent_dice(tmp_path, full_size_set / "train_masks")
    assert f"full-resolution Dice {dice:.4f} (mean over 2 images)" in out
    assert f"pixel accuracy {100 * accuracy:.2f}%" in out


def test_threshold_changes_the_masks(trained, full_size_set, tmp_path):
    checkpoint = str(trained[0] / "checkpoints" / "best.pt")
    image = str(min((full_size_set / "train").iterdir()))
    areas = []
    for threshold in ("0.2", "0.8"):
        predict.main(["--checkpoint", checkpoint, "--input", image, "--output", str(tmp_path / threshold),
                      "--threshold", threshold])
        areas.append((cv2.imread(str(next((tmp_path / threshold).glob("*_mask.png"))), 0) > 0).sum())
    assert areas[0] >= areas[1]


def test_unreadable_inputs_are_skipped_with_a_warning(trained, synthetic_root, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_root / "train", inputs)
    (inputs / "broken.jpg").write_bytes(b"")
    (inputs / "notes.png").write_text("not an image")
    status = predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "last.pt"), "--input", str(inputs),
                           "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 0 and "broken.jpg: empty file" in err and "notes.png: not an image" in err
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 16


def test_nothing_predictable_exits_non_zero(trained, tmp_path, capsys):
    (tmp_path / "only.jpg").write_bytes(b"junk")
    args = ["--checkpoint", str(trained[0] / "checkpoints" / "last.pt"), "--output", str(tmp_path / "o")]
    assert predict.main([*args, "--input", str(tmp_path / "only.jpg")]) == 1
    assert predict.main([*args, "--input", str(tmp_path / "missing")]) == 1
    assert "no images found" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "no such checkpoint file"), (b"garbage", "not a readable")])
def test_unusable_checkpoint_is_a_one_line_error(tmp_path, synthetic_root, capsys, content, message):
    checkpoint = tmp_path / "x.pt"
    if content is not None:
        checkpoint.write_bytes(content)
    status = predict.main(["--checkpoint", str(checkpoint), "--input", str(synthetic_root / "train")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and str(checkpoint) in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_command_line_runs_as_a_script(trained, synthetic_root, tmp_path):
    import subprocess
    import sys

    image = min((synthetic_root / "train").iterdir())
    run = subprocess.run([sys.executable, predict.__file__, "--checkpoint", str(trained[0] / "checkpoints" / "best.pt"),
                          "--input", str(image), "--output", str(tmp_path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / f"{image.stem}_mask.png").is_file()
