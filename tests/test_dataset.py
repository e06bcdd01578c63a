import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import data_folder
import image_files
import synthetic
from dataset import CarvanaDataset, EpochSampler, train_transform, val_transform


def copy_set(source, target):
    shutil.copytree(source, target)
    return target


def test_synthetic_set_is_in_carvana_format(synthetic_root):
    images = sorted(p.name for p in (synthetic_root / "train").iterdir())
    masks = sorted(p.name for p in (synthetic_root / "train_masks").iterdir())
    assert len(images) == 16 and len(masks) == 16
    assert all(re.fullmatch(r"[0-9a-f]{12}_0[1-4]\.jpg", name) for name in images)
    assert masks == [name.replace(".jpg", "_mask.gif") for name in images]
    with Image.open(synthetic_root / "train" / images[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (192, 128)
    with Image.open(synthetic_root / "train_masks" / masks[0]) as mask:
        assert mask.format == "GIF" and mask.mode == "P" and mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
        raw = np.array(mask)
    assert set(np.unique(raw)) == {0, 1} and 0.05 < raw.mean() < 0.6


def car_width(mask):
    return int(np.ptp(np.flatnonzero(mask.any(0))))


def test_synthetic_cars_keep_their_looks_and_change_with_the_angle():
    first, again = (synthetic.synthetic_pair(np.random.default_rng([0, 1]), np.random.default_rng(scene), 3, 192, 128)
                    for scene in (1, 2))
    assert not np.array_equal(first[0], again[0])  # another photo: the scene differs
    assert abs(car_width(first[1]) - car_width(again[1])) <= 1  # the same car: the same length
    side, front = (synthetic.synthetic_pair(np.random.default_rng(5), np.random.default_rng(6), angle, 192, 128)[1]
                   for angle in (5, 1))
    assert car_width(side) > car_width(front) * 1.3  # longer seen from the side than from the front


def test_no_colour_threshold_separates_synthetic_cars(synthetic_root):
    """The best single threshold on any channel or on grey stays far below a trained model."""
    samples, _ = data_folder.scan_pairs(synthetic_root / "train", synthetic_root / "train_masks")
    images = [image_files.read_image(s.image).astype(np.int16) for s in samples]
    masks = [image_files.read_mask(s.mask).astype(bool) for s in samples]
    best = 0.0
    for channel in range(4):
        values = [im.mean(2) if channel == 3 else im[..., channel] for im in images]
        for cut in range(10, 250, 10):
            for side in (1, -1):
                scores = [data_dice(side * v > side * cut, m) for v, m in zip(values, masks)]
                best = max(best, float(np.mean(scores)))
    assert best < 0.7


def data_dice(prediction, truth):
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else 2 * (prediction & truth).sum() / total


def test_scan_pairs_the_carvana_layout(synthetic_root):
    samples, problems = data_folder.scan_pairs(synthetic_root / "train", synthetic_root / "train_masks")
    assert problems.skipped == [] and len(samples) == 16
    assert all(s.mask.name == f"{s.image.stem}_mask.gif" and (s.width, s.height) == (192, 128) for s in samples)


def test_four_folder_layout_is_found(tmp_path, synthetic_root):
    for split in ("train", "val"):
        (tmp_path / f"{split}_images").mkdir()
        (tmp_path / f"{split}_masks").mkdir()
    for index, image in enumerate(sorted((synthetic_root / "train").iterdir())):
        split = "val" if index < 4 else "train"
        shutil.copy(image, tmp_path / f"{split}_images" / image.name)
        shutil.copy(synthetic_root / "train_masks" / f"{image.stem}_mask.gif", tmp_path / f"{split}_masks")
    splits = data_folder.find_splits(tmp_path)
    assert set(splits) == {"train", "val"}
    assert len(data_folder.scan_pairs(*splits["train"])[0]) == 12 and len(data_folder.scan_pairs(*splits["val"])[0]) == 4


@pytest.mark.parametrize("suffix, noise", [(".png", 0), (".jpg", 1), (".gif", 0)])
def test_masks_become_zero_one_in_every_storage_format(tmp_path, suffix, noise):
    truth = np.zeros((40, 60), np.uint8)
    truth[10:30, 15:45] = 1
    path = tmp_path / f"m{suffix}"
    if suffix == ".gif":
        synthetic.save_gif_mask(truth, path)
    else:
        cv2.imwrite(str(path), truth * 255, [cv2.IMWRITE_JPEG_QUALITY, 60])
    mask = image_files.read_mask(path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    if noise:  # JPEG noise: the stored values are not exactly {0,255}, and edges blur a little
        assert len(np.unique(np.array(Image.open(path)))) > 2
        assert (mask != truth).mean() < 0.01
    else:
        assert np.array_equal(mask, truth)


def test_raw_zero_one_png_masks_are_read_as_such(tmp_path):
    truth = np.zeros((20, 20), np.uint8)
    truth[5:10] = 1
    cv2.imwrite(str(tmp_path / "raw.png"), truth)
    assert np.array_equal(image_files.read_mask(tmp_path / "raw.png"), truth)


def seed_bad_files(root):
    """One of every kind of unusable file, plus hidden files and a stray folder."""
    images, masks = root / "train", root / "train_masks"
    names = sorted(p.stem for p in images.iterdir())
    (images / f"{names[0]}.jpg").write_bytes(b"")  # zero bytes
    jpeg = (images / f"{names[1]}.jpg").read_bytes()
    (images / f"{names[1]}.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (images / f"{names[2]}.jpg").write_text("this is not a picture")  # non-image
    (masks / f"{names[3]}_mask.gif").unlink()  # image without mask
    shutil.copy(masks / f"{names[4]}_mask.gif", masks / "0123456789ab_01_mask.gif")  # mask without image
    small = np.zeros((10, 10), np.uint8)
    synthetic.save_gif_mask(small, masks / f"{names[5]}_mask.gif")  # wrong size
    (images / ".DS_Store").write_bytes(b"\x00\x01")
    (images / "._hidden.jpg").write_bytes(b"junk")
    (images / "extra_folder").mkdir()
    return names


def test_every_kind_of_bad_file_is_skipped_and_named_once(tmp_path, synthetic_root, capsys):
    root = copy_set(synthetic_root, tmp_path / "data")
    names = seed_bad_files(root)
    samples, problems = data_folder.scan_pairs(root / "train", root / "train_masks")
    reasons = {path.name: reason for path, reason in problems.skipped}
    assert reasons == {
        f"{names[0]}.jpg": "empty file (0 bytes)",
        f"{names[1]}.jpg": "truncated JPEG (file ends early)",
        f"{names[2]}.jpg": "not an image (no known image format inside)",
        f"{names[3]}.jpg": f"no mask for it in {root / 'train_masks'}",
        "0123456789ab_01_mask.gif": f"no image for this mask in {root / 'train'}",
        f"{names[5]}_mask.gif": f"mask is 10x10 but its image {names[5]}.jpg is 192x128",
    }
    assert len(samples) == 16 - 5
    data_folder.print_report(problems)
    err = capsys.readouterr().err
    assert err.count("\n") == 7 and "Skipping 6 file(s)" in err


def test_a_file_that_fails_mid_epoch_is_replaced_not_fatal(tmp_path, synthetic_root, capsys):
    root = copy_set(synthetic_root, tmp_path / "data")
    samples, _ = data_folder.scan_pairs(root / "train", root / "train_masks")
    dataset = CarvanaDataset(samples, val_transform(), (32, 48))
    samples[0].image.write_bytes(b"\xff\xd8" + b"\x00" * 500 + b"\xff\xd9")  # broken after the check
    x, y = dataset[0]
    assert x.shape == (3, 32, 48) and y.shape == (1, 32, 48)
    assert torch.equal(x, dataset[1][0])  # the next sample stands in
    assert samples[0].image.name in capsys.readouterr().err
    dataset[0]
    assert capsys.readouterr().err == ""  # said once


def test_transforms_give_normalised_tensors_and_car_share_masks(synthetic_root):
    samples, _ = data_folder.scan_pairs(synthetic_root / "train", synthetic_root / "train_masks")
    dataset = CarvanaDataset(samples, train_transform(), (32, 48))
    x, y = dataset[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 48) and 0 <= x.min() and x.max() <= 1
    assert 0 <= y.min() and y.max() <= 1 and (y == 1).sum() > 0 and (y == 0).sum() > 0  # car shares
    augmented = {dataset[3][1].sum().item() for _ in range(6)}
    assert len(augmented) > 1  # random rotation and flips


def test_augmentations_depend_on_seed_and_epoch_not_on_workers(synthetic_root):
    """A resumed run must draw what the uninterrupted run drew: the same batches for the same epoch,
    with or without loader processes; another epoch draws others."""

    samples, _ = data_folder.scan_pairs(synthetic_root / "train", synthetic_root / "train_masks")
    dataset = CarvanaDataset(samples[:6], train_transform(), (32, 48))

    def epoch_batches(epoch, workers):
        sampler = EpochSampler(dataset, seed=5)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    first = epoch_batches(1, 0)
    assert torch.equal(first, epoch_batches(1, 2))
    assert not torch.equal(first, epoch_batches(2, 0))


def test_split_holds_out_whole_cars_with_a_fixed_seed(synthetic_root):
    samples, _ = data_folder.scan_pairs(synthetic_root / "train", synthetic_root / "train_masks")
    train, val = data_folder.split_by_car(samples, 0.25, seed=1)
    train_cars = {data_folder.car_id(s.image) for s in train}
    val_cars = {data_folder.car_id(s.image) for s in val}
    assert len(val_cars) == 1 and len(train_cars) == 3 and not train_cars & val_cars
    assert len(val) == 4 and len(train) == 12
    assert data_folder.split_by_car(samples, 0.25, seed=1) == (train, val)
    one_car_train, one_car_val = data_folder.split_by_car(val, 0.25, seed=1)  # one car: split by photo
    assert len(one_car_val) == 1 and set(one_car_train + one_car_val) == set(val)
    with pytest.raises(ValueError, match="at least 2 photos"):
        data_folder.split_by_car(val[:1], 0.25, seed=1)


def test_reduced_decode_never_goes_below_the_target():
    real_jpeg = np.zeros((1280, 1918, 3), np.uint8)
    encoded = cv2.imencode(".jpg", real_jpeg)[1]
    for target, flag in [((160, 240), cv2.IMREAD_REDUCED_COLOR_8), ((320, 480), cv2.IMREAD_REDUCED_COLOR_4),
                         ((640, 959), cv2.IMREAD_REDUCED_COLOR_2), ((640, 960), cv2.IMREAD_COLOR)]:
        assert image_files.reduced_decode_flag(1918, 1280, target) == flag
        decoded = cv2.imdecode(encoded, flag)
        assert decoded.shape[0] >= target[0] and decoded.shape[1] >= target[1]
    assert image_files.reduced_decode_flag(192, 128, (160, 240)) == cv2.IMREAD_COLOR
