"""Carvana images and masks: finding pairs, checking files, decoding, augmenting, splitting."""
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


def train_transform(height, width):
    return A.Compose([
        A.Resize(height, width, area_for_downscale="image"),
        A.Rotate(limit=35, border_mode=cv2.BORDER_CONSTANT, p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.1),
        A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0),
    ])


def val_transform(height, width):
    return A.Compose([
        A.Resize(height, width, area_for_downscale="image"),
        A.Normalize(mean=0.0, std=1.0, max_pixel_value=255.0),
    ])


def to_tensor(image):
    """HWC float image -> CHW float tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_pair(sample, decode_size=None):
    """(RGB image, {0,1} mask) of a sample; with decode_size, JPEGs are decoded at reduced size."""
    image = read_image(sample.image, reduced_decode_flag(sample.width, sample.height, decode_size))
    mask = read_mask(sample.mask)
    if image.shape[:2] != mask.shape:
        mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    return image, mask


def resize_pair(image, mask, size):
    """Both to (height, width) as the transforms' Resize does it: area for images, nearest for masks."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, mask
    return (cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA),
            cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST))


class ResizedCache:
    """Images and masks decoded once and resized to the training size, kept as uint8 arrays in
    .npy files that every loader worker memory-maps. The file names carry a key made from the
    size and each source file's path, byte size and modification time: any change rebuilds."""

    VERSION = 1

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
        from tqdm import tqdm

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
            return (row, *resize_pair(*load_pair(self.samples[row], self.size), self.size), None)
        except (OSError, ValueError, cv2.error) as error:
            return row, None, None, str(error)


class CarvanaDataset(Dataset):
    """Image/mask pairs through a transform. A file that fails to decode is reported once and
    replaced by the next sample, so a bad file found mid-epoch never stops training.
    decode_size (height, width) allows reduced JPEG decoding; a ResizedCache skips decoding."""

    def __init__(self, samples, transform, decode_size=None, cache=None):
        self.samples = list(samples)
        self.transform = transform
        self.decode_size = decode_size
        self.cache = cache
        self.failed = set()

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        if self.cache is not None:
            return self.cache.get(self.samples[index])
        return load_pair(self.samples[index], self.decode_size)

    def __getitem__(self, index):
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
        return to_tensor(out["image"]), torch.from_numpy(out["mask"]).float().unsqueeze(0)


def seed_worker(worker_id):
    """Albumentations keeps its own random state; give each loader worker a different one."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(info.seed % 2**32)


# ----------------------------------------------------------------------------------------------
# Synthetic Carvana-format data: the demo's and the tests' stand-in for the real download.

CAR_COLOURS = [(235, 235, 235), (200, 200, 205), (150, 150, 155), (90, 90, 95), (30, 30, 35),
               (170, 30, 30), (30, 60, 150), (40, 110, 60), (200, 170, 60), (120, 80, 50)]


def _noise(rng, height, width, scale, amplitude):
    """Smooth random texture: coarse noise blown up to full size."""
    coarse = rng.normal(0, amplitude, (max(2, height // scale), max(2, width // scale), 3))
    return cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _car_polygons(car, scene, angle, width, height):
    """Body, cabin and wheels of one car seen from one of 16 angles, in pixel coordinates."""
    theta = 2 * np.pi * (angle - 1) / 16
    side = abs(np.sin(theta))  # 1 seen from the side, 0 from the front or back
    length = width * car.uniform(0.55, 0.75) * (0.45 + 0.55 * side)
    body_height = height * car.uniform(0.16, 0.22)
    cabin_height = body_height * car.uniform(0.6, 1.1)
    cx = width * (0.5 + scene.uniform(-0.06, 0.06))
    floor = height * scene.uniform(0.68, 0.78)
    wheel_radius = body_height * car.uniform(0.38, 0.5)
    bottom = floor - wheel_radius * 0.9
    left, right = cx - length / 2, cx + length / 2
    nose = length * 0.08
    body = [(left, bottom), (left, bottom - body_height * 0.7), (left + nose, bottom - body_height),
            (right - nose, bottom - body_height), (right, bottom - body_height * 0.6), (right, bottom)]
    cabin_start, cabin_end = car.uniform(0.18, 0.35), car.uniform(0.65, 0.85)
    if np.cos(theta) < 0:  # seen from behind the other way round: mirror the cabin
        cabin_start, cabin_end = 1 - cabin_end, 1 - cabin_start
    c0, c1 = left + length * cabin_start, left + length * cabin_end
    slope = (c1 - c0) * car.uniform(0.1, 0.25)
    top = bottom - body_height - cabin_height
    cabin = [(c0, bottom - body_height), (c0 + slope, top), (c1 - slope, top), (c1, bottom - body_height)]
    inset = length * (0.18 if side > 0.5 else 0.12)
    wheels = [(left + inset, floor - wheel_radius, wheel_radius),
              (right - inset, floor - wheel_radius, wheel_radius)]
    return np.array(body), np.array(cabin), wheels, floor


def synthetic_pair(car, scene, angle, width, height):
    """One RGB image and its {0,1} mask: `car` draws the car's own looks, `scene` the rest."""
    rng = scene
    base = rng.uniform(150, 245)
    wall = np.full((height, width, 3), base, np.float32) + _noise(rng, height, width, 24, 12)
    floor_tone = rng.uniform(80, 200)
    body, cabin, wheels, floor = _car_polygons(car, scene, angle, width, height)
    wall[int(floor) - int(rng.uniform(0, 0.1) * height):] = floor_tone
    wall += _noise(rng, height, width, 6, 8)
    # Distractors in car colours on the backdrop: no colour threshold separates car from scene.
    for _ in range(rng.integers(2, 6)):
        colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height * 0.6)))
        axes = (int(rng.uniform(0.02, 0.08) * width), int(rng.uniform(0.02, 0.08) * height))
        cv2.ellipse(wall, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    shadow = np.zeros((height, width), np.float32)
    span = body[:, 0].max() - body[:, 0].min()
    cv2.ellipse(shadow, (int(body[:, 0].mean()), int(floor)), (int(span * 0.6), int(height * 0.03)),
                0, 0, 360, 1.0, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, height * 0.015))
    image = wall * (1 - 0.6 * shadow[..., None])

    colour = np.array(CAR_COLOURS[car.integers(len(CAR_COLOURS))], np.float32)
    car = np.zeros((height, width), np.uint8)
    cv2.fillPoly(car, [body.astype(np.int32), cabin.astype(np.int32)], 1)
    glass = np.zeros((height, width), np.uint8)
    shrink = cabin.mean(axis=0) + (cabin - cabin.mean(axis=0)) * 0.8
    cv2.fillPoly(glass, [shrink.astype(np.int32)], 1)
    tyres = np.zeros((height, width), np.uint8)
    for x, y, r in wheels:
        cv2.circle(tyres, (int(x), int(y)), int(r), 1, -1)
    shading = np.linspace(1.15, 0.8, height, dtype=np.float32)[:, None, None]
    paint = colour * shading + _noise(rng, height, width, 12, 6)
    image = np.where(car[..., None] == 1, paint, image)
    image = np.where(glass[..., None] == 1, paint * 0.35 + 20, image)
    image = np.where(tyres[..., None] == 1, 25 + _noise(rng, height, width, 8, 4), image)
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    mask = car | tyres
    return np.clip(image, 0, 255).astype(np.uint8), mask


def save_gif_mask(mask, path):
    """Carvana's mask format: 2-colour palette GIF whose raw values are {0,1}."""
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(path, format="GIF", optimize=False)


def make_synthetic(root, cars=24, angles=16, size=(1918, 1280), seed=0, progress=True):
    """Write `root/train/<id>_<angle>.jpg` and `root/train_masks/<id>_<angle>_mask.gif`.

    size is (width, height), Carvana's 1918x1280 by default. Returns the number of images.
    """
    from tqdm import tqdm

    root = Path(root)
    images, masks = root / "train", root / "train_masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"{int(rng.integers(0, 2**48)):012x}" for _ in range(cars)]
    jobs = [(car, angle) for car in ids for angle in range(1, angles + 1)]
    for car, angle in tqdm(jobs, desc="synthetic data", unit="img", disable=not progress):
        # One seed per car keeps its looks across its 16 photos; one per photo varies the scene.
        looks = np.random.default_rng([seed, int(car, 16)])
        scene = np.random.default_rng([seed, int(car, 16), angle])
        image, mask = synthetic_pair(looks, scene, angle, *size)
        stem = f"{car}_{angle:02d}"
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
        temporary = images / f".{stem}.jpg.tmp"
        jpeg.tofile(temporary)
        os.replace(temporary, images / f"{stem}.jpg")
        save_gif_mask(mask, masks / f"{stem}_mask.gif")
    return len(jobs)
