"""The resized cache: every photo and mask decoded once at the training size into memory-mapped
arrays, shared safely by runs side by side."""
import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import load_training_pair
from files import hold_shared, in_use, make_run_folder
from image_files import file_digest
from utils import wait_for_other_processes


class ResizedCache:
    """Images and masks decoded once and resized to the training size, kept as uint8 arrays in
    .npy files that every loader worker memory-maps. The file names carry a key made from the size
    and each source file's bytes (Sample.digest): any change is a new entry. Runs sharing the folder
    never touch each other's entries: a run holds a shared lock on the entries it reads, and an
    entry of another key is removed only when nobody holds one."""

    VERSION = 3  # 3: keyed to the files' bytes; 2: masks stored as area-averaged car shares

    def __init__(self, folder, name, samples, size, classes=None):
        self.samples, self.size, self.classes = list(samples), tuple(size), classes
        digests = [(Path(s.image).name, s.digest or file_digest(s.image) + file_digest(s.mask)) for s in self.samples]
        # Masks read as classes (NUM_CLASSES) are other arrays than the same files read as car.
        labels = () if classes is None else (classes.kind, classes.codes)
        key = hashlib.sha1(repr((self.VERSION, self.size, digests, *labels)).encode()).hexdigest()[:12]
        self.prefix = f"{name}-{size[0]}x{size[1]}-"
        self.folder = Path(folder)
        self.paths = {part: self.folder / f"{self.prefix}{key}-{part}.npy" for part in ("images", "masks", "ok")}
        self.rows = {s.image: row for row, s in enumerate(self.samples)}
        self.arrays, self.lock = None, None

    def __getstate__(self):  # loader workers open their own memory maps; the lock stays here
        return {**self.__dict__, "arrays": None, "lock": None}

    def ready(self):
        return all(path.is_file() for path in self.paths.values())

    def hold(self):
        """Mark this entry as read by this process, as long as the cache object lives."""
        if self.lock is None:
            self.lock = hold_shared(self.paths["images"])
        return self

    def bytes_needed(self):
        height, width = self.size
        return len(self.samples) * height * width * (4 + self.channels())

    def channels(self):
        """A mask's shares per pixel: car, or each class."""
        return 1 if self.classes is None else len(self.classes)

    def build(self, workers=0):
        """Decode every sample once (in `workers` processes), with a progress bar. The disk space is
        reserved first, so a full disk is an OSError here, never a crash while the arrays are filled;
        whatever stops the build, its temporary files go (or, after kill -9, with the next build)."""
        from numpy.lib.format import open_memmap

        from progress import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        count, (height, width) = len(self.samples), self.size
        tag = f"{os.getpid()}-{os.urandom(4).hex()}"  # machines sharing one CACHE_DIR may build at once
        temporary = {part: path.with_name(f".{path.name}.{tag}.tmp") for part, path in self.paths.items()}
        locks = []
        try:
            images = open_memmap(temporary["images"], "w+", np.uint8, (count, height, width, 3))
            shape = (count, height, width) + ((self.channels(),) if self.classes is not None else ())
            masks = open_memmap(temporary["masks"], "w+", np.uint8, shape)
            locks = [hold_shared(temporary["images"]), hold_shared(temporary["masks"])]  # in use: not a leftover
            for array in (images, masks):
                reserve(array.filename, array.offset + array.nbytes)
            ok = np.zeros(count, np.uint8)
            loader = torch.utils.data.DataLoader(_Decoded(self.samples, self.size, self.classes), batch_size=None,
                                                 num_workers=workers)
            for row, image, mask, problem in tqdm(loader, total=count, desc=f"caching {self.prefix[:-1]}",
                                                  unit="img"):
                if problem:
                    print(f"warning: skipping {problem}", file=sys.stderr)
                    continue
                images[row], masks[row], ok[row] = image, mask, 1
            images.flush()
            masks.flush()
            del images, masks
            with open(temporary["ok"], "wb") as stream:  # a handle: np.save would add .npy to the name
                np.save(stream, ok)
            for part in ("masks", "ok", "images"):  # images last: its name is what ready() trusts most
                os.replace(temporary[part], self.paths[part])
        except BaseException:
            for path in temporary.values():
                path.unlink(missing_ok=True)
            raise
        self.lock = locks[0]  # the same file, now under its own name: held from its first instant
        self.remove_unused()

    def remove_unused(self):
        """Remove the entries of this split and size with another key that no process reads, and the
        temporary files of builds killed outright."""
        for leftover in self.folder.glob(f".{self.prefix}*.tmp"):
            if not in_use(leftover):
                leftover.unlink(missing_ok=True)
        for images in self.folder.glob(f"{self.prefix}*-images.npy"):
            if images != self.paths["images"] and not in_use(images):
                entry = images.name.removesuffix("images.npy")
                for part in ("images", "masks", "ok"):
                    (self.folder / f"{entry}{part}.npy").unlink(missing_ok=True)

    def get(self, sample):
        if self.arrays is None:
            self.arrays = {part: np.load(path, mmap_mode="r") for part, path in self.paths.items()}
        row = self.rows[sample.image]
        if not self.arrays["ok"][row]:
            raise ValueError(f"{sample.image}: could not be decoded when the cache was built")
        return np.array(self.arrays["images"][row]), np.array(self.arrays["masks"][row])


def reserve(path, size):
    """Allocate a file's blocks now (OSError 'No space left on device' when they do not fit): a memory
    map over a sparse file would die of SIGBUS mid-build instead."""
    if not hasattr(os, "posix_fallocate"):
        return
    handle = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(handle, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it
            raise
    finally:
        os.close(handle)


class _Decoded(Dataset):
    """(row, image, mask, problem) at the cache's size, for ResizedCache.build's loader workers."""

    def __init__(self, samples, size, classes=None):
        self.samples, self.size, self.classes = samples, size, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, row):
        try:
            return (row, *load_training_pair(self.samples[row], self.size, classes=self.classes), None)
        except (OSError, ValueError, cv2.error) as error:
            return row, None, None, str(error)


# From this many pixels up a photo is decoded every epoch instead: there the model's step (2.7 TFLOP an
# image for the 31M UNet at 640x960, 10.8 at 1280x1918) takes longer than decoding and resizing a
# photo (20-60 ms on one core), even on a large GPU, while the cache would need 2.5 MB a photo at
# 640x960 and 9.8 MB at full size, 50 GB for Kaggle's set (docs/performance.md).
UNCACHED_PIXELS = 640 * 960


def amount(size):
    """Bytes in the unit that shows them: 1.2 GiB, 340 MiB, 96 KiB (never "0.0 GiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} bytes"


def split_cache(samples, name, folder, size, builds, workers=0, classes=None):
    """The ResizedCache of a split (name: "train" or "val") in folder, built here if `builds` (one
    process per machine) and held while this run reads it; None when it cannot be written or would
    not fit, or the images are so large that decoding is not what sets the pace (UNCACHED_PIXELS),
    and training then decodes every epoch. Under torchrun the other processes wait for the builder."""
    cache = ResizedCache(folder, name, samples, size, classes)
    if size[0] * size[1] >= UNCACHED_PIXELS:
        if builds and name == "train":
            print(f"not caching {size[0]}x{size[1]} images ({amount(cache.bytes_needed())} for the training "
                  f"ones): at this size the model, not the decoder, sets the pace", file=sys.stderr)
        return None
    if builds and not cache.ready():
        needed = cache.bytes_needed()
        try:
            make_run_folder(folder)
            free = shutil.disk_usage(folder).free
            if free < 1.2 * needed:  # a margin for the checkpoints and everything else on that disk
                raise OSError(f"{amount(free)} free, it needs {amount(needed)}")
            print(f"caching the {len(samples)} {name} images at {size[0]}x{size[1]} in {folder}: "
                  f"{amount(needed)} of its {amount(free)} free, once", file=sys.stderr)
            cache.build(workers)
        except OSError as error:
            print(f"warning: cannot cache the {name} images in {folder} ({error.strerror or error}): decoding "
                  f"every epoch instead", file=sys.stderr)
    wait_for_other_processes()
    return cache.hold() if cache.ready() else None
