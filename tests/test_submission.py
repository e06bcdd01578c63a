"""Kaggle run-length encoding, submission files, test-time flips, threshold choice, figures."""
import csv

import cv2
import numpy as np
import pytest
from PIL import Image

import predict
import submission
from conftest import REAL_SAMPLES
from submission import rle_decode, rle_encode, rle_encode_batch


def naive_rle(mask):
    """Runs found pixel by pixel, row-major, 1-indexed: the competition's definition spelled out."""
    runs, flat, start = [], mask.reshape(-1), None
    for index, value in enumerate(flat):
        if value and start is None:
            start = index
        if not value and start is not None:
            runs += [start + 1, index - start]
            start = None
    if start is not None:
        runs += [start + 1, flat.size - start]
    return " ".join(map(str, runs))


@pytest.mark.parametrize("name", ["empty", "full", "first_pixel", "last_pixel", "both_ends", "random"])
def test_rle_edge_cases_round_trip_and_match_the_definition(name):
    mask = np.zeros((5, 7), np.uint8)
    if name == "full":
        mask[:] = 1
    elif name in ("first_pixel", "both_ends"):
        mask[0, 0] = 1
    if name in ("last_pixel", "both_ends"):
        mask[-1, -1] = 1
    if name == "random":
        mask = (np.random.default_rng(3).random((5, 7)) > 0.5).astype(np.uint8)
    text = rle_encode(mask)
    assert text == naive_rle(mask)
    assert rle_encode(mask.astype(bool)) == encoded_where_it_is(mask) == text
    assert rle_encode(mask * 255) == text  # mask files hold 0 and 255
    assert np.array_equal(rle_decode(text, mask.shape), mask)
    expected = {"empty": "", "full": "1 35", "first_pixel": "1 1", "last_pixel": "35 1", "both_ends": "1 1 35 1"}
    assert text == expected.get(name, text)


def encoded_where_it_is(mask):
    """rle_encode_batch, the encoder that runs on a GPU, here on a CPU tensor."""
    import torch

    return rle_encode_batch(torch.as_tensor(np.asarray(mask))[None] != 0)[0]


def test_rle_is_row_major():
    mask = np.zeros((2, 3), np.uint8)
    mask[0, 2] = mask[1, 0] = 1  # adjacent in row-major order: one run
    assert rle_encode(mask) == "3 2"


@pytest.mark.parametrize("text", ["1", "0 3", "5 0", "30 10", "1 5 3 2"])
def test_rle_decode_refuses_text_that_does_not_fit(text):
    with pytest.raises(ValueError):
        rle_decode(text, (5, 7))


@pytest.mark.skipif(not REAL_SAMPLES.is_dir(), reason="../shared/carvana_samples is absent")
def test_rle_round_trips_every_real_mask():
    for path in sorted((REAL_SAMPLES / "train_masks").glob("*.gif")):
        mask = np.array(Image.open(path))
        text = rle_encode(mask)
        assert encoded_where_it_is(mask) == text, path.name
        assert np.array_equal(rle_decode(text, mask.shape), mask), path.name
        starts = np.array(text.split(), dtype=np.int64)[0::2]
        assert (np.diff(starts) > 0).all()


def test_rows_made_on_the_device_and_by_cpu_threads_match_rle_encode():
    import torch
    import torch.nn.functional as F

    smooth = F.interpolate(torch.rand(3, 1, 4, 6, generator=torch.Generator().manual_seed(0)), size=(16, 24),
                           mode="bilinear")
    probability = torch.cat((smooth, torch.zeros(1, 1, 16, 24), torch.ones(1, 1, 16, 24)))  # empty, full
    sizes = [(50, 70), (33, 41), (50, 70), (50, 70), (33, 41)]
    rows = submission.rows_on_device(probability, sizes, 0.5)  # the GPU path's code, here on CPU tensors
    for index, size in enumerate(sizes):
        upsampled = F.interpolate(probability[index:index + 1], size=size, mode="bilinear", align_corners=False)
        expected = rle_encode(upsampled[0, 0].numpy() > 0.5)
        assert rows[index] == expected
        assert submission.row_text(probability[index, 0].numpy(), size, 0.5) == expected
    assert rows[3] == "" and rows[4] == f"1 {33 * 41}"


def run_submission(trained, inputs, tmp_path, *extra):
    return predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input", str(inputs),
                         "--output", str(tmp_path / "masks"), "--submission", str(tmp_path / "sub.csv"),
                         "--workers", "0", *extra])


def read_rows(path):
    with open(path, newline="") as stream:
        return list(csv.reader(stream))


def test_submission_rows_decode_to_the_written_masks(trained, synthetic_root, tmp_path):
    assert run_submission(trained, synthetic_root / "train", tmp_path) == 0
    rows = read_rows(tmp_path / "sub.csv")
    assert rows[0] == ["img", "rle_mask"] and len(rows) == 17
    for name, text in rows[1:]:
        assert name.endswith(".jpg")
        written = cv2.imread(str(tmp_path / "masks" / name.replace(".jpg", "_mask.png")), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(rle_decode(text, written.shape), (written > 0).astype(np.uint8))


def test_interrupted_submission_resumes_without_repeating_rows(trained, synthetic_root, tmp_path, capsys):
    assert run_submission(trained, synthetic_root / "train", tmp_path, "--no-images") == 0
    complete = (tmp_path / "sub.csv").read_text()
    lines = complete.splitlines(keepends=True)
    (tmp_path / "sub.csv").write_text("".join(lines[:6]) + lines[6][:9])  # killed mid-row
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run_submission(trained, synthetic_root / "train", tmp_path)
    assert run_submission(trained, synthetic_root / "train", tmp_path, "--resume", "--no-images") == 0
    assert "5 rows already written, 11 images to go" in capsys.readouterr().out
    rows = read_rows(tmp_path / "sub.csv")
    assert len(rows) == 17 and len({name for name, _ in rows}) == 17
    assert sorted(rows) == sorted(read_rows_text(complete))


def read_rows_text(text):
    return list(csv.reader(text.splitlines()))


def test_two_inputs_with_one_file_name_are_refused_for_a_submission(trained, synthetic_root, tmp_path, capsys):
    image = min((synthetic_root / "train").iterdir())
    for folder in ("left", "right"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "car.jpg").write_bytes(image.read_bytes())
    (tmp_path / "both.txt").write_text("left/car.jpg\nright/car.jpg\n")
    assert run_submission(trained, tmp_path / "both.txt", tmp_path, "--no-images") == 1
    err = capsys.readouterr().err
    assert "car.jpg" in err and "Kaggle keys submission rows by file name" in err
    assert not (tmp_path / "sub.csv").exists()


def test_existing_submission_is_never_overwritten(trained, synthetic_root, tmp_path):
    (tmp_path / "sub.csv").write_text("img,rle_mask\nkeep.jpg,1 1\n")
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        run_submission(trained, synthetic_root / "train", tmp_path)
    assert (tmp_path / "sub.csv").read_text() == "img,rle_mask\nkeep.jpg,1 1\n"


def test_tta_and_threshold_search_are_reported(trained, synthetic_root, tmp_path, capsys):
    args = ["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input", str(synthetic_root / "train"),
            "--masks", str(synthetic_root / "train_masks"), "--workers", "0"]
    assert predict.main([*args, "--output", str(tmp_path / "plain")]) == 0
    plain = capsys.readouterr().out
    assert predict.main([*args, "--output", str(tmp_path / "tta"), "--tta"]) == 0
    tta = capsys.readouterr().out
    assert "flip TTA" in tta and "best threshold on these images:" in plain
    masks = [[cv2.imread(str(path), cv2.IMREAD_UNCHANGED) for path in sorted((tmp_path / run).glob("*_mask.png"))]
             for run in ("plain", "tta")]
    assert len(masks[0]) == 16 and any((a != b).any() for a, b in zip(*masks))  # the mirror image changed masks
    gallery = tmp_path / "plain" / "worst_predictions.png"
    with Image.open(gallery) as picture:
        assert picture.size[0] > 1000 and picture.size[1] > 1000  # 6 rows of 4 panels


def test_training_writes_history_curves_and_gallery(trained):
    tmp, _ = trained
    rows = list(csv.DictReader((tmp / "checkpoints" / "history.csv").read_text().splitlines()))
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(1, 9)]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "dice", "pixel_accuracy", "learning_rate", "seconds",
                            "class_dice"}
    assert all(row["class_dice"] == row["dice"] for row in rows)  # one class, car: its Dice is the Dice
    assert float(rows[0]["seconds"]) > 0
    for name in ("training_curves.png", "worst_predictions.png"):
        with Image.open(tmp / "saved_images" / "checkpoints" / name) as picture:
            assert picture.format == "PNG" and picture.size[0] >= 800
    listed = (tmp / "checkpoints" / "val_files.txt").read_text().split()
    assert listed and all(path.endswith(".jpg") for path in listed)


@pytest.mark.parametrize("images", [[], ["--no-images"]], ids=["with-images", "rows-only"])
def test_ctrl_c_keeps_the_rows_written_and_says_how_to_finish(trained, synthetic_root, tmp_path, monkeypatch, capsys,
                                                              images):
    real = submission.Submission.add
    calls = []

    def interrupted_on_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(submission.Submission, "add", interrupted_on_the_fifth)
    assert run_submission(trained, synthetic_root / "train", tmp_path, *images) == 130
    assert "interrupted after 4 images; the same command with --resume finishes" in capsys.readouterr().err
    assert len(read_rows(tmp_path / "sub.csv")) == 1 + 4
    monkeypatch.undo()
    assert run_submission(trained, synthetic_root / "train", tmp_path, "--no-images", "--resume") == 0
    assert len({name for name, _ in read_rows(tmp_path / "sub.csv")[1:]}) == 16
