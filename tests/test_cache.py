"""The cache of decoded, resized images: built once, keyed to size and sources, same tensors."""
import os
import shutil

import torch

import dataset as data
import train
from conftest import tiny_args


def scan(root):
    return data.scan_pairs(root / "train", root / "train_masks")[0]


def test_cached_samples_equal_decoded_ones_and_augment_differently(synthetic_root, tmp_path):
    samples = scan(synthetic_root)
    cache = data.ResizedCache(tmp_path, "train", samples, (32, 48))
    assert not cache.ready()
    cache.build()
    assert cache.ready() and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in cache.paths.values())
    cached = data.CarvanaDataset(samples, data.val_transform(), (32, 48), cache=cache)
    decoded = data.CarvanaDataset(samples, data.val_transform(), (32, 48))
    for index in (0, 7, 15):
        assert all(torch.equal(a, b) for a, b in zip(cached[index], decoded[index]))
    augmented = data.CarvanaDataset(samples, data.train_transform(), (32, 48), cache=cache)
    assert len({augmented[2][0].sum().item() for _ in range(5)}) > 1


def test_cache_key_follows_size_and_source_files(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    first = data.ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48))
    first.build()
    assert data.ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48)).ready()
    assert not data.ResizedCache(tmp_path / "cache", "train", scan(root), (40, 48)).ready()
    image = scan(root)[0].image
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    changed = data.ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48))
    assert not changed.ready()
    changed.build()
    assert not any(path.exists() for path in first.paths.values())  # the stale copy is gone


def test_file_that_fails_while_caching_is_skipped_everywhere(synthetic_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    samples = scan(root)
    samples[0].image.write_bytes(b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9")  # passes the cheap checks
    cache = data.ResizedCache(tmp_path / "cache", "train", samples, (32, 48))
    cache.build()
    assert samples[0].image.name in capsys.readouterr().err
    dataset = data.CarvanaDataset(samples, data.val_transform(), (32, 48), cache=cache)
    assert torch.equal(dataset[0][0], dataset[1][0])  # replaced by the next sample


def test_training_fills_the_cache_once(synthetic_root, tmp_path, capsys):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert [f.name.split("-")[0] for f in files] == ["train"] * 3 + ["val"] * 3
    assert "caching train-32x48" in capsys.readouterr().err
    stamps = [f.stat().st_mtime_ns for f in files]
    train.main([*tiny_args(tmp_path, synthetic_root, 1), f"--CHECKPOINT_DIR={tmp_path / 'second'}"])
    assert "caching" not in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").glob("*.npy"))] == stamps


def test_empty_cache_dir_decodes_every_epoch(synthetic_root, tmp_path):
    train.main([*tiny_args(tmp_path, synthetic_root, 1), "--CACHE_DIR="])
    assert not (tmp_path / "cache").exists()
