"""Checks against real Carvana files in ../shared/carvana_samples (skipped where that is absent)."""
import numpy as np
import pytest
from PIL import Image

import data_folder
import image_files
import predict
from conftest import REAL_SAMPLES
from dataset import CarvanaDataset, load_training_pair, train_transform
from utils import resize_probability

pytestmark = pytest.mark.skipif(not REAL_SAMPLES.is_dir(), reason="../shared/carvana_samples is absent")


def test_real_layout_scans_clean():
    samples, problems = data_folder.scan_pairs(REAL_SAMPLES / "train", REAL_SAMPLES / "train_masks")
    assert problems.skipped == [] and len(samples) == 16
    assert {(s.width, s.height) for s in samples} == {(1918, 1280)}
    cars = {data_folder.car_id(s.image) for s in samples}
    assert cars == {"0795e132d090", "1ae8a68a40e4", "2faf504842df", "3d7a1030deeb"}


def test_real_masks_read_as_zero_one_matching_the_raw_gif():
    path = REAL_SAMPLES / "train_masks" / "1ae8a68a40e4_01_mask.gif"
    mask = image_files.read_mask(path)
    raw = np.array(Image.open(path))
    assert mask.shape == (1280, 1918) and np.array_equal(mask, raw)
    assert 0.05 < mask.mean() < 0.5


def test_real_images_through_the_training_pipeline():
    samples, _ = data_folder.scan_pairs(REAL_SAMPLES / "train", REAL_SAMPLES / "train_masks")
    train, val = data_folder.split_by_car(samples, 0.25, seed=42)
    assert len(val) == 4 and len({data_folder.car_id(s.image) for s in val}) == 1
    dataset = CarvanaDataset(train, train_transform(), (160, 240))
    x, y = dataset[0]
    assert x.shape == (3, 160, 240) and y.shape == (1, 160, 240) and 0.03 < y.mean() < 0.6


def test_predict_on_real_images_writes_full_size_masks(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("0795e132d090_01.jpg", "3d7a1030deeb_05.jpg"):
        (inputs / name).symlink_to(REAL_SAMPLES / "train" / name)
    status = predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input", str(inputs),
                           "--output", str(tmp_path / "out"), "--masks", str(REAL_SAMPLES / "train_masks")])
    assert status == 0
    for name in ("0795e132d090_01", "3d7a1030deeb_05"):
        with Image.open(tmp_path / "out" / f"{name}_mask.png") as mask:
            assert mask.size == (1918, 1280)
    assert "full-resolution Dice" in capsys.readouterr().out


def test_submission_rows_for_real_images_decode_to_the_written_masks(trained, tmp_path):
    import csv

    from submission import rle_decode

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("1ae8a68a40e4_01.jpg", "2faf504842df_05.jpg", "3d7a1030deeb_09.jpg"):
        (inputs / name).symlink_to(REAL_SAMPLES / "train" / name)
    status = predict.main(["--checkpoint", str(trained[0] / "checkpoints" / "best.pt"), "--input", str(inputs),
                           "--output", str(tmp_path / "out"), "--submission", str(tmp_path / "sub.csv")])
    assert status == 0
    rows = list(csv.reader((tmp_path / "sub.csv").read_text().splitlines()))
    assert rows[0] == ["img", "rle_mask"] and sorted(r[0] for r in rows[1:]) == sorted(p.name for p in inputs.iterdir())
    for name, text in rows[1:]:
        written = np.array(Image.open(tmp_path / "out" / name.replace(".jpg", "_mask.png"))) > 0
        assert written.shape == (1280, 1918)
        assert np.array_equal(rle_decode(text, (1280, 1918)).astype(bool), written)


def test_a_model_that_outputs_the_targets_scores_near_one_at_full_resolution():
    """The 160x240 training targets (each pixel's car share), upsampled as predict.py upsamples a
    prediction, against the full-size masks: the ceiling the targets put on any model's score."""
    import torch
    import torch.nn.functional as F

    samples, _ = data_folder.scan_pairs(REAL_SAMPLES / "train", REAL_SAMPLES / "train_masks")
    scores = []
    for sample in samples:
        _, share = load_training_pair(sample, (160, 240))
        probability = share.astype(np.float32) / 255
        truth = image_files.read_mask(sample.mask).astype(bool)
        on_cpu = resize_probability(probability, truth.shape) > 0.5
        on_gpu = F.interpolate(torch.from_numpy(probability)[None, None], size=truth.shape, mode="bilinear",
                               align_corners=False)[0, 0].numpy() > 0.5  # the path predict.py takes on a GPU
        assert (on_cpu != on_gpu).mean() < 1e-4
        scores.append(2 * (on_cpu & truth).sum() / (on_cpu.sum() + truth.sum()))
    assert np.mean(scores) >= 0.997 and np.min(scores) >= 0.994, (np.mean(scores), np.min(scores))
