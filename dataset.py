"""Carvana images and masks: finding pairs, checking files, decoding, caching, augmenting, splitting."""
import hashlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# Carvana names masks <stem>_mask.gif; other datasets keep the image's stem.
MASK_TAGS = ("_mask", "")
# Bytes a complete file of each kind ends with: a cheap test for truncated downloads.
FILE_ENDINGS = {".jpg": ("JPEG", b"\xff\xd9"), ".jpeg": ("JPEG", b"\xff\xd9"),
                ".png": ("PNG", b"IEND\xaeB`\x82"), ".gif": ("GIF", b";")}


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path
    width: int
    height: int


def visible_files(folder):
    """Image files in a folder, sorted; hidden files and sub-folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def image_problem(path):
    """Why a file cannot be used as an image, or None. Returns (problem, (width, height))."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        with Image.open(path) as image:
            size = image.size
        kind, ending = FILE_ENDINGS.get(path.suffix.lower(), (None, None))
        if ending:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - 64))
                tail = handle.read().rstrip(b"\x00")
            if not tail.endswith(ending):
                return f"truncated {kind} (file ends early)", None
        return None, size
    except UnidentifiedImageError:
        return "not an image (no known image format inside)", None
    except OSError as error:
        return f"unreadable ({error})", None


def image_size(path):
    """(width, height) of an image file as the decoder will return it."""
    with Image.open(path) as image:
        return image.size


def mask_stem(path):
    """Image stem a mask belongs to: `abc_01_mask.gif` -> `abc_01`."""
    stem = path.stem
    return stem.removesuffix("_mask")


def find_mask(image_path, mask_dir):
    for tag in MASK_TAGS:
        for suffix in (".gif", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            candidate = Path(mask_dir) / f"{image_path.stem}{tag}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def scan_pairs(image_dir, mask_dir):
    """Pair images with masks. Returns (samples, problems): problems are (path, reason) pairs."""
    samples, problems, used_masks = [], [], set()
    for image_path in visible_files(image_dir):
        mask_path = find_mask(image_path, mask_dir)
        if mask_path is None:
            problems.append((image_path, f"no mask for it in {mask_dir}"))
            continue
        used_masks.add(mask_path)
        problem, size = image_problem(image_path)
        if problem:
            problems.append((image_path, problem))
            continue
        problem, mask_size = image_problem(mask_path)
        if problem:
            problems.append((mask_path, problem))
        elif mask_size != size:
            reason = f"mask is {mask_size[0]}x{mask_size[1]} but its image {image_path.name} is {size[0]}x{size[1]}"
            problems.append((mask_path, reason))
        else:
            samples.append(Sample(image_path, mask_path, *size))
    image_stems = {p.stem for p in visible_files(image_dir)}
    for mask_path in visible_files(mask_dir):
        if mask_path not in used_masks and mask_stem(mask_path) not in image_stems:
            problems.append((mask_path, f"no image for this mask in {image_dir}"))
    return samples, problems


def report_problems(problems):
    if problems:
        print(f"Skipping {len(problems)} file(s) that cannot be used:", file=sys.stderr)
        for path, reason in problems:
            print(f"  {path}: {reason}", file=sys.stderr)


def find_splits(data_dir):
    """Folders of a data directory: {'train': (images, masks)} plus 'val' in the four-folder layout."""
    root = Path(data_dir)
    if (root / "train_images").is_dir():
        splits = {"train": (root / "train_images", root / "train_masks")}
        if (root / "val_images").is_dir():
            splits["val"] = (root / "val_images", root / "val_masks")
        return splits
    return {"train": (root / "train", root / "train_masks")}


def has_data(data_dir):
    images, _ = find_splits(data_dir)["train"]
    return bool(visible_files(images))


def car_id(path):
    """Carvana's `<car id>_<angle>` stems group all angles of one car; other stems stand alone."""
    stem = Path(path).stem
    head, _, angle = stem.rpartition("_")
    return head if head and angle.isdigit() else stem


def split_by_car(samples, val_fraction, seed):
    """Hold out val_fraction of the cars (every angle of a car on the same side)."""
    cars = sorted({car_id(s.image) for s in samples})
    if len(cars) < 2:
        raise ValueError(f"need images of at least 2 cars to hold some out for validation, found {len(cars)}")
    random.Random(seed).shuffle(cars)
    held_out = min(len(cars) - 1, max(1, round(len(cars) * val_fraction)))
    val_cars = set(cars[:held_out])
    train = [s for s in samples if car_id(s.image) not in val_cars]
    val = [s for s in samples if car_id(s.image) in val_cars]
    return train, val


def reduced_decode_flag(width, height, target):
    """Largest JPEG DCT-domain downscale that still leaves at least the target size."""
    if target is None:
        return cv2.IMREAD_COLOR
    target_height, target_width = target
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if -(-width // factor) >= target_width and -(-height // factor) >= target_height:  # libjpeg rounds up
            return flag
    return cv2.IMREAD_COLOR


def read_image(path, flag=cv2.IMREAD_COLOR):
    """RGB uint8 array; raises ValueError naming the file when it cannot be decoded."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        raise ValueError(f"{path}: cannot decode image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path):
    """Mask as uint8 {0,1}: palette GIF {0,1}, or grey/colour {0,255} with JPEG noise."""
    try:
        with Image.open(path) as mask:
            grey = np.asarray(mask.convert("L"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot decode mask ({error})") from error
    # Raw {0,1} masks would all fall under a mid-grey threshold.
    return (grey > (0 if grey.max() <= 1 else 127)).astype(np.uint8)


def train_transform():
    """Augmentations of (image, mask) pairs already at the training size."""
    return A.Compose([
        A.Rotate(limit=35, border_mode=cv2.BORDER_CONSTANT, p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.1),
        A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0),
    ])


def val_transform():
    return A.Compose([A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0)])


def to_tensor(image):
    """HWC float image -> CHW float tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_pair(sample):
    """(RGB image, {0,1} mask) of a sample at the file's own size."""
    return read_image(sample.image), read_mask(sample.mask)


def shrink_image(image, size):
    """An image at (height, width) by area averaging: no aliasing, and centred like the photo."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def shrink_mask(mask, size):
    """A {0,1} mask at (height, width) as uint8 0..255: each pixel's share of car. Area averaging
    keeps the target centred on its photo (nearest-neighbour sampling shifts it by half a pixel)
    and keeps the edge's sub-pixel position, which upsampled predictions then recover."""
    return shrink_image(np.asarray(mask, np.uint8) * np.uint8(255), size)


def load_image(path, size=None, stored_size=None):
    """A photo as RGB uint8, shrunk to size (height, width) when given; JPEGs are decoded at the
    largest DCT-domain reduction that still covers the size (stored_size: its (width, height))."""
    if size is None:
        return read_image(path)
    if stored_size is None:
        stored_size = image_size(path)
    return shrink_image(read_image(path, reduced_decode_flag(*stored_size, size)), size)


def load_training_pair(sample, size):
    """(RGB uint8 image, uint8 0..255 car share) of a sample at size (height, width)."""
    image = load_image(sample.image, size, (sample.width, sample.height))
    return image, shrink_mask(read_mask(sample.mask), size)


class ResizedCache:
    """Images and masks decoded once and resized to the training size, kept as uint8 arrays in
    .npy files that every loader worker memory-maps. The file names carry a key made from the
    size and each source file's path, byte size and modification time: any change rebuilds."""

    VERSION = 2  # 2: masks stored as area-averaged car shares, not nearest-neighbour samples

    def __init__(self, folder, name, samples, size):
        self.samples, self.size = list(samples), tuple(size)
        stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for s in self.samples for p in (s.image, s.mask)]
        key = hashlib.sha1(repr((self.VERSION, self.size, stamp)).encode()).hexdigest()[:12]
        self.prefix = f"{name}-{size[0]}x{size[1]}-"
        self.folder = Path(folder)
        self.paths = {part: self.folder / f"{self.prefix}{key}-{part}.npy" for part in ("images", "masks", "ok")}
        self.rows = {s.image: row for row, s in enumerate(self.samples)}
        self.arrays = None

    def __getstate__(self):  # loader workers open their own memory maps
        return {**self.__dict__, "arrays": None}

    def ready(self):
        return all(path.is_file() for path in self.paths.values())

    def bytes_needed(self):
        height, width = self.size
        return len(self.samples) * height * width * 5

    def build(self, workers=0):
        """Decode every sample once (in `workers` processes), with a progress bar."""
        from numpy.lib.format import open_memmap
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        count, (height, width) = len(self.samples), self.size
        # Per-process names: machines sharing one CACHE_DIR may build the same cache at once.
        temporary = {part: path.with_name(f".{path.name}.{os.getpid()}.tmp") for part, path in self.paths.items()}
        images = open_memmap(temporary["images"], "w+", np.uint8, (count, height, width, 3))
        masks = open_memmap(temporary["masks"], "w+", np.uint8, (count, height, width))
        ok = np.zeros(count, np.uint8)
        loader = torch.utils.data.DataLoader(_Decoded(self.samples, self.size), batch_size=None, num_workers=workers)
        for row, image, mask, problem in tqdm(loader, total=count, desc=f"caching {self.prefix[:-1]}", unit="img"):
            if problem:
                print(f"warning: skipping {problem}", file=sys.stderr)
                continue
            images[row], masks[row], ok[row] = image, mask, 1
        images.flush()
        masks.flush()
        del images, masks
        with open(temporary["ok"], "wb") as stream:  # a handle: np.save would add .npy to the name
            np.save(stream, ok)
        for part, path in self.paths.items():
            os.replace(temporary[part], path)
        for stale in self.folder.glob(f"{self.prefix}*.npy"):  # the same split at the same size, older data
            if stale not in self.paths.values():
                stale.unlink()

    def get(self, sample):
        if self.arrays is None:
            self.arrays = {part: np.load(path, mmap_mode="r") for part, path in self.paths.items()}
        row = self.rows[sample.image]
        if not self.arrays["ok"][row]:
            raise ValueError(f"{sample.image}: could not be decoded when the cache was built")
        return np.array(self.arrays["images"][row]), np.array(self.arrays["masks"][row])


class _Decoded(Dataset):
    """(row, image, mask, problem) at the cache's size, for ResizedCache.build's loader workers."""

    def __init__(self, samples, size):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, row):
        try:
            return (row, *load_training_pair(self.samples[row], self.size), None)
        except (OSError, ValueError, cv2.error) as error:
            return row, None, None, str(error)


class CarvanaDataset(Dataset):
    """Image/mask pairs at size (height, width), then through a transform: (image tensor in [0,1],
    mask tensor of car shares in [0,1]). A file that fails to decode is reported once and replaced
    by the next sample, so a bad file found mid-epoch never stops training. A ResizedCache skips
    decoding."""

    def __init__(self, samples, transform, size, cache=None):
        self.samples = list(samples)
        self.transform = transform
        self.size = tuple(size)
        self.cache = cache
        self.failed = set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        if self.cache is not None:
            return self.cache.get(self.samples[index])
        return load_training_pair(self.samples[index], self.size)

    def __getitem__(self, key):
        """key: an index, or (index, seed) to draw this item's augmentation from its own seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            self.transform.set_random_seed(seed)
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            if current in self.failed:
                continue
            try:
                image, mask = self.load(current)
                break
            except (OSError, ValueError, cv2.error) as error:
                self.failed.add(current)
                print(f"warning: skipping {error}", file=sys.stderr)
        else:
            raise RuntimeError("no sample in this dataset can be decoded")
        out = self.transform(image=image, mask=mask)
        return to_tensor(out["image"]), torch.from_numpy(out["mask"]).float().div_(255).unsqueeze(0)
