"""The cache of decoded, resized images: built once, keyed to size and sources, same tensors."""
import os
import shutil

import torch

import cache
import data_folder
import train
from cache import ResizedCache
from conftest import tiny_args
from dataset import CarvanaDataset, train_transform, val_transform


def scan(root):
    return data_folder.scan_pairs(root / "train", root / "train_masks")[0]


def test_cached_samples_equal_decoded_ones_and_augment_differently(synthetic_root, tmp_path):
    samples = scan(synthetic_root)
    cache = ResizedCache(tmp_path, "train", samples, (32, 48))
    assert not cache.ready()
    cache.build()
    assert cache.ready() and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in cache.paths.values())
    cached = CarvanaDataset(samples, val_transform(), (32, 48), cache=cache)
    decoded = CarvanaDataset(samples, val_transform(), (32, 48))
    for index in (0, 7, 15):
        assert all(torch.equal(a, b) for a, b in zip(cached[index], decoded[index]))
    augmented = CarvanaDataset(samples, train_transform(), (32, 48), cache=cache)
    assert len({augmented[2][0].sum().item() for _ in range(5)}) > 1


def test_cache_key_follows_size_and_source_files(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    first = ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48))
    first.build()
    assert ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48)).ready()
    assert not ResizedCache(tmp_path / "cache", "train", scan(root), (40, 48)).ready()
    image = scan(root)[0].image
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48)).ready()
    replace_keeping_size_and_time(image, scan(root)[1].image)
    changed = ResizedCache(tmp_path / "cache", "train", scan(root), (32, 48))
    assert not changed.ready()
    del first  # no run reads the old entry any more
    changed.build()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3  # the stale copy is gone


def replace_keeping_size_and_time(path, other):
    """Put other's bytes into path with path's size and modification time, as cp -p or rsync -a can."""
    stat = path.stat()
    content = other.read_bytes()[: stat.st_size]
    path.write_bytes(content + b"\0" * (stat.st_size - len(content)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_replaced_file_with_the_same_size_and_time_is_never_served_stale(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    samples = scan(root)
    ResizedCache(tmp_path / "cache", "train", samples, (32, 48)).build()
    mask = samples[0].mask
    replace_keeping_size_and_time(mask, samples[5].mask)  # another car's mask, same size and time
    fresh = scan(root)
    cache = ResizedCache(tmp_path / "cache", "train", fresh, (32, 48))
    assert not cache.ready()
    cache.build()
    cached = CarvanaDataset(fresh, val_transform(), (32, 48), cache=cache)
    decoded = CarvanaDataset(fresh, val_transform(), (32, 48))
    assert torch.equal(cached[0][1], decoded[0][1])


def test_an_entry_another_run_reads_is_never_removed(synthetic_root, tmp_path):
    """Two runs with different seeds share CACHE_DIR: the second's build leaves the first's entry,
    which the first still reads; once no run holds it, a later build removes it."""
    samples = scan(synthetic_root)
    first = ResizedCache(tmp_path, "train", samples[:12], (32, 48))
    first.build()
    reading = CarvanaDataset(samples[:12], val_transform(), (32, 48), cache=first)
    second = ResizedCache(tmp_path, "train", samples[4:], (32, 48))
    second.build()
    assert first.ready() and reading[11][0].shape == (3, 32, 48)
    del first, reading
    third = ResizedCache(tmp_path, "train", samples[2:14], (32, 48))
    third.build()
    assert second.ready() and third.ready()
    assert len(list(tmp_path.glob("train-*-images.npy"))) == 2


def test_a_full_disk_during_the_build_is_a_warning_and_training_decodes(synthetic_root, tmp_path, monkeypatch, capsys):
    import errno

    def full(handle, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    result = train.main(tiny_args(tmp_path, synthetic_root, 1))
    err = capsys.readouterr().err
    assert "cannot cache the train images" in err and "No space left on device" in err and "Traceback" not in err
    assert result["last"]["images"] == 4 and not list((tmp_path / "cache").glob("*.tmp"))


def test_leftovers_of_a_killed_build_are_removed_by_the_next(synthetic_root, tmp_path):
    samples = scan(synthetic_root)
    tmp_path.mkdir(exist_ok=True)
    cache = ResizedCache(tmp_path, "train", samples, (32, 48))
    leftover = tmp_path / f".{cache.paths['images'].name}.99999-dead.tmp"
    leftover.write_bytes(b"\0" * 1000)
    ResizedCache(tmp_path, "train", samples[1:], (32, 48)).build()
    assert not leftover.exists()


def test_a_read_only_cache_dir_is_a_warning_not_a_traceback(synthetic_root, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere: stand in a file for the folder's parent instead
        (tmp_path / "blocked").write_text("a file")
        folder = tmp_path / "blocked" / "cache"
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
    result = train.main([*tiny_args(tmp_path, synthetic_root, 1), f"--CACHE_DIR={folder}"])
    err = capsys.readouterr().err
    assert "cannot keep the mask checks" in err and "decoding every epoch instead" in err
    assert result["last"]["images"] == 4


def test_file_that_fails_while_caching_is_skipped_everywhere(synthetic_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    samples = scan(root)
    samples[0].image.write_bytes(b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9")  # passes the cheap checks
    cache = ResizedCache(tmp_path / "cache", "train", samples, (32, 48))
    cache.build()
    assert samples[0].image.name in capsys.readouterr().err
    dataset = CarvanaDataset(samples, val_transform(), (32, 48), cache=cache)
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


def test_images_as_large_as_uncached_pixels_are_decoded_every_epoch_with_a_word(synthetic_root, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(cache, "UNCACHED_PIXELS", 32 * 48)  # the tiny runs' size stands in for 640x960
    result = train.main(tiny_args(tmp_path, synthetic_root, 1))
    assert result["last"]["images"] > 0
    assert not list((tmp_path / "cache").glob("*.npy"))
    assert "not caching 32x48 images" in capsys.readouterr().err


def test_a_disk_too_small_for_a_small_cache_says_how_small_in_a_unit_that_shows_it(synthetic_root, tmp_path,
                                                                                     monkeypatch, capsys):
    samples = scan(synthetic_root)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, 50_000))
    assert cache.split_cache(samples, "train", tmp_path / "cache", (32, 48), builds=True) is None
    needed = len(samples) * 32 * 48 * 5
    assert f"(49 KiB free, it needs {needed / 1024:.0f} KiB): decoding every epoch" in capsys.readouterr().err
    assert [cache.amount(n) for n in (512, 3 * 2**20 // 2, 2**31 + 2**29, 50 * 2**30)] == [
        "512 bytes", "1.5 MiB", "2.5 GiB", "50 GiB"]
