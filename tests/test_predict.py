import shutil
from pathlib import Path

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
    assert "no image could be predicted" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main([*args, "--input", str(tmp_path / "empty")]) == 1
    assert "no images found" in capsys.readouterr().err
    assert predict.main([*args, "--input", str(tmp_path / "missing")]) == 2
    assert f"error: --input {tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err


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


def predict_into(trained, inputs, output, *extra):
    return predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input", str(inputs),
                         "--output", str(output), "--workers", "0", *extra])


def read_masks(folder):
    return {path.name: cv2.imread(str(path), cv2.IMREAD_UNCHANGED) for path in sorted(folder.glob("*_mask.png"))}


def test_inputs_sharing_a_stem_or_a_file_name_keep_their_own_masks(trained, synthetic_root, tmp_path, monkeypatch,
                                                                   capsys):
    first, second, third, fourth = sorted((synthetic_root / "train").iterdir())[:4]
    for folder, image in (("left", first), ("right", second)):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "car.jpg")
    cv2.imwrite(str(tmp_path / "left" / "car.png"), cv2.imread(str(third)))
    assert predict_into(trained, tmp_path / "left", tmp_path / "folder") == 0
    assert "wrote 2 masks" in capsys.readouterr().out
    from_folder = read_masks(tmp_path / "folder")
    assert set(from_folder) == {"car.jpg_mask.png", "car.png_mask.png"}
    assert {path.name for path in (tmp_path / "folder").glob("*_overlay.jpg")} == {"car.jpg_overlay.jpg",
                                                                                  "car.png_overlay.jpg"}
    # A list read from another folder: relative paths from the list's folder (or, as val_files.txt
    # with a relative DATA_DIR, from the current folder), an absolute path, comments, a missing file.
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "inputs.txt").write_text(f"# two cars\n../left/car.jpg\n\n  ../right/car.jpg  \n"
                                                   f"../left/gone.jpg\n{third}\nlocal.jpg\n")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(fourth, tmp_path / "elsewhere" / "local.jpg")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert predict_into(trained, tmp_path / "lists" / "inputs.txt", tmp_path / "listed") == 0
    captured = capsys.readouterr()
    assert "wrote 4 masks" in captured.out and "gone.jpg" in captured.err and "do not exist" in captured.err
    listed = read_masks(tmp_path / "listed")
    assert set(listed) == {"left__car.jpg_mask.png", "right__car.jpg_mask.png", f"{third.stem}_mask.png",
                           "local_mask.png"}
    assert np.array_equal(listed["left__car.jpg_mask.png"], from_folder["car.jpg_mask.png"])
    assert not np.array_equal(listed["left__car.jpg_mask.png"], listed["right__car.jpg_mask.png"])


def test_submission_rows_only_path_decodes_reduced_and_its_rows_are_the_masks_that_masks_scores(
        trained, full_size_set, tmp_path, monkeypatch):
    import csv

    from submission import rle_decode

    inputs = full_size_set / "train"
    flags = []
    real_read = predict.image_files.read_image

    def recording(path, *flag):
        flags.append(flag[0] if flag else cv2.IMREAD_COLOR)
        return real_read(path, *flag)

    monkeypatch.setattr(predict.image_files, "read_image", recording)
    assert predict_into(trained, inputs, tmp_path / "masks", "--masks", str(full_size_set / "train_masks")) == 0
    assert sorted(flags).count(cv2.IMREAD_COLOR) == 2 and len(flags) == 4  # the photo, and what the model sees
    flags.clear()
    assert predict_into(trained, inputs, tmp_path / "none", "--submission", str(tmp_path / "fast.csv"),
                        "--no-images") == 0
    assert len(flags) == 2 and cv2.IMREAD_COLOR not in flags  # 1918x1280 JPEGs decoded at a DCT-domain reduction
    assert not (tmp_path / "none").exists()
    rows = dict(list(csv.reader((tmp_path / "fast.csv").read_text().splitlines()))[1:])
    masks = read_masks(tmp_path / "masks")
    assert len(rows) == len(masks) == 2
    for name, text in rows.items():  # the submission is exactly what --masks scored
        assert np.array_equal(rle_decode(text, (1280, 1918)) * 255, masks[f"{Path(name).stem}_mask.png"])


def test_checkpoint_written_by_older_code_still_predicts(trained, synthetic_root, tmp_path):
    import torch

    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    # The keys train.py wrote at commit 2077923; the weights named as DataParallel saves them.
    old = {key: state[key] for key in ("optimizer", "scaler", "epoch", "best_dice", "config", "model_args",
                                       "image_size", "threshold")}
    old["model"] = {f"module.{name}": value for name, value in state["model"].items()}
    torch.save(old, tmp_path / "old.pt")
    image = min((synthetic_root / "train").iterdir())
    arguments = ["--input", str(image), "--workers", "0"]
    assert predict.main(["--checkpoint", str(tmp_path / "old.pt"), "--output", str(tmp_path / "old"), *arguments]) == 0
    assert predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--output",
                         str(tmp_path / "new"), *arguments]) == 0
    old_masks, new_masks = read_masks(tmp_path / "old"), read_masks(tmp_path / "new")
    assert list(old_masks) == list(new_masks) == [f"{image.stem}_mask.png"]
    assert np.array_equal(old_masks[f"{image.stem}_mask.png"], new_masks[f"{image.stem}_mask.png"])


def test_the_default_output_takes_a_folder_of_its_own_when_the_model_changed(trained, synthetic_root, tmp_path,
                                                                            monkeypatch, capsys):
    """The README's command again after another threshold (or a retrained best.pt): the earlier masks
    stay where they are, the new ones go to <default>-2, exit 0."""
    run = tmp_path / "run"
    shutil.copytree(trained[0] / "checkpoints", run)
    monkeypatch.chdir(tmp_path)
    command = ["--checkpoint", "run/best.pt", "--input", str(synthetic_root / "train"), "--workers", "0"]
    assert predict.main(command) == 0
    first = Path("saved_images/run/best_predictions")
    before = {path.name: path.read_bytes() for path in first.glob("*_mask.png")}
    assert len(before) == 16
    assert predict.main([*command, "--threshold", "0.3"]) == 0
    assert "saved_images/run/best_predictions holds the masks of another threshold: this run's go to " \
           "saved_images/run/best_predictions-2" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in first.glob("*_mask.png")} == before
    assert len(list(Path("saved_images/run/best_predictions-2").glob("*_mask.png"))) == 16
    assert predict.main([*command, "--threshold", "0.3"]) == 0  # the same again: into its own folder
    assert not Path("saved_images/run/best_predictions-3").exists()


def test_a_submission_into_a_folder_that_does_not_exist_yet(trained, synthetic_root, tmp_path):
    submission = tmp_path / "new" / "folder" / "submission.csv"
    assert predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input",
                         str(synthetic_root / "train"), "--submission", str(submission), "--no-images",
                         "--workers", "0"]) == 0
    assert len(submission.read_text().splitlines()) == 17
