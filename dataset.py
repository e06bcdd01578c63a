"""Carvana images and masks: finding pairs, checking files, decoding, caching, augmenting, splitting."""
import errno
import hashlib
import json
import os
import random
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from files import hold_shared, in_use, make_run_folder, write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# Carvana names masks <stem>_mask.gif; other datasets keep the image's stem.
MASK_TAGS = ("_mask", "")
MASK_SUFFIXES = (".gif", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Bytes a complete file of each format ends with: a cheap first test for truncated downloads.
FILE_ENDINGS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
# DATA_DIR layouts, the first whose image folder holds images wins:
# (training images, training masks) or (..., validation images, validation masks).
LAYOUTS = (("train_images", "train_masks", "val_images", "val_masks"), ("train", "train_masks"),
           ("images", "masks"), ("imgs", "masks"))
ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> (swap rows and columns, then flip the rows, flip the columns) that shows the
# stored pixels as displayed: what PIL's ImageOps.exif_transpose does.
UPRIGHT = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
           6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}
# Mask formats with compression noise: thresholded instead of read colour by colour.
LOSSY_FORMATS = {"JPEG", "MPO", "WEBP"}
JPEG_NOISE = 12  # how far compression noise moves a black pixel of a JPEG mask
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path
    width: int
    height: int
    digest: str = ""  # of both files' bytes (file_digest): what the cache and the mask checks are keyed to


def file_digest(path):
    """A digest of a file's bytes: a replaced file is told apart even where its size and modification
    time are kept (cp -p, rsync -a, coarse-time file systems). About 0.2 ms for a Carvana photo."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha1").hexdigest()[:20]


def visible_files(folder):
    """Image files in a folder, sorted; hidden files and sub-folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def exif_orientation(image):
    """EXIF orientation (1-8) of an opened PIL image, from its header alone: PIL's PNG getexif would
    decode the pixels to look for a late eXIf chunk. Size checks and decoders here turn by it (TIFFs
    excepted: Pillow turns those itself)."""
    try:
        orientation = Image.Image.getexif(image).get(ORIENTATION, 1)
    except (*DECODE_ERRORS, KeyError, IndexError, TypeError, struct.error):
        return 1  # a malformed EXIF block counts as none, for size checks and decoders alike
    return orientation if orientation in UPRIGHT else 1


def displayed_size(image):
    """(width, height) of an opened PIL image as displayed: EXIF orientations 5-8 turn it a quarter.
    Pillow turns TIFFs itself when loading them (and in its newer versions reports .size turned
    already), so a TIFF is loaded and asked."""
    if image.format == "TIFF":
        return ImageOps.exif_transpose(image).size
    width, height = image.size
    return (height, width) if exif_orientation(image) >= 5 else (width, height)


def pil_rgb(image):
    """RGB uint8 array of a PIL image; 16-bit grey scaled down as cv2 does, not clipped."""
    if image.mode.startswith("I"):
        grey = (np.asarray(image, np.float32) / 257).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def turn_upright(array, orientation):
    """An (H, W[, C]) array of stored pixels as displayed under an EXIF orientation."""
    if orientation not in UPRIGHT:
        return array
    swap, flip_rows, flip_columns = UPRIGHT[orientation]
    if swap:
        array = array.swapaxes(0, 1)
    return np.ascontiguousarray(array[::-1 if flip_rows else 1, ::-1 if flip_columns else 1])


def decodes_whole(image, path):
    """Whether the decoder reads a file to its end. Most files end with their format's end marker
    (one read of the tail); others hold data after it, such as the trailers phones append to JPEGs,
    or are truncated: those the decoder reads (JPEGs at 1/8 scale, which still reads all the data)."""
    ending = FILE_ENDINGS.get(image.format)
    if ending is None:
        return True
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        if handle.read().rstrip(b"\x00").endswith(ending):
            return True
    if image.format in ("JPEG", "MPO"):
        image.draft(image.mode, (1, 1))
    try:
        image.load()
    except OSError as error:
        if "truncated" in str(error):
            return False
        raise
    return True


def image_problem(path):
    """Why a file cannot be used as an image, or None. Returns (problem, (width, height) as displayed)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        with Image.open(path) as image:
            size = displayed_size(image)
            if not decodes_whole(image, path):
                kind = "JPEG" if image.format == "MPO" else image.format
                return f"truncated {kind} (file ends early)", None
        return None, size
    except UnidentifiedImageError:
        return "not an image (no known image format inside)", None
    except DECODE_ERRORS as error:
        return f"unreadable ({error})", None


def image_size(path):
    """(width, height) of an image file as the decoders here return it: as displayed."""
    with Image.open(path) as image:
        return displayed_size(image)


def _rgb_name(code):
    return f"({code >> 16}, {code >> 8 & 255}, {code & 255})"


def _value_name(code):
    return str(np.asarray(code).item())


def _palette_codes(image):
    """Code of each of a palette image's 256 indices: its colour as 0xRRGGBB, 0 if black or transparent."""
    colours = np.zeros((256, 3), np.uint32)
    palette = np.array(image.getpalette() or [], np.uint32).reshape(-1, 3)[:256]
    colours[: len(palette)] = palette
    codes = colours[:, 0] << 16 | colours[:, 1] << 8 | colours[:, 2]
    transparency = image.info.get("transparency")
    if isinstance(transparency, int) and transparency < 256:
        codes[transparency] = 0
    elif isinstance(transparency, bytes):
        alpha = np.frombuffer(transparency, np.uint8)[:256]
        codes[: len(alpha)][alpha == 0] = 0
    return codes


def _colour_codes(image):
    """(codes, name) of a decoded lossless mask that has no palette: an integer per pixel, 0 for
    background (black, zero or transparent) and one value per other colour, and a function naming
    a code's colour."""
    if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint8) if image.mode == "1" else np.asarray(image), _value_name
    pixels = np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGBA"))
    codes = pixels[..., 0].astype(np.uint32) << 16 | pixels[..., 1].astype(np.uint32) << 8 | pixels[..., 2]
    if pixels.shape[2] == 4:
        codes[pixels[..., 3] == 0] = 0
    return codes, _rgb_name


def _distinct(values):
    """The distinct values of an array, sorted; two cheap passes when there are at most two."""
    flat = values.ravel()
    low, high = flat.min(), flat.max()
    if low == high:
        return [low]
    if np.count_nonzero(flat == low) + np.count_nonzero(flat == high) == flat.size:
        return [low, high]
    return list(np.unique(flat))


def _colour_problem(colours, name):
    """Why a lossless file with these distinct colour codes is not a mask, or None."""
    if len(colours) > 2:
        shown = ", ".join(name(c) for c in colours[:4]) + (", ..." if len(colours) > 4 else "")
        return f"not a mask: {len(colours)} colours ({shown}); a mask has black background and one car colour"
    if len(colours) == 2 and 0 not in colours:
        return f"not a mask: neither of its colours {name(colours[0])} and {name(colours[1])} is black, the background"
    return None


def _lossless_mask(image):
    """A PNG, GIF, BMP or TIFF mask: at most two colours, background among them."""
    if image.mode == "P":  # palette entries go by their colours: Carvana's GIFs hold raw indices {0,1}
        (pixels, name), lut = (np.asarray(image), _rgb_name), _palette_codes(image)
    else:
        (pixels, name), lut = _colour_codes(image), None
    values = _distinct(pixels)
    problem = _colour_problem(values if lut is None else sorted({int(lut[v]) for v in values}), name)
    if problem:
        return None, problem
    if lut is None:
        return np.not_equal(pixels, 0).view(np.uint8), None
    if len(values) > 2:  # several indices of the same two colours
        return (lut != 0).view(np.uint8)[pixels], None
    car = [v for v in values if lut[v]]
    if len(car) < len(values):
        return ((pixels == car[0]) if car else np.zeros(pixels.shape, bool)).view(np.uint8), None
    return np.ones(pixels.shape, np.uint8), None


def _lossy_mask(image):
    """A JPEG or WebP mask: car where the strongest channel passes half the brightest pixel's."""
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    strength = pixels if pixels.ndim == 2 else pixels[..., :3].max(axis=2)
    if image.mode == "RGBA":
        strength = np.where(pixels[..., 3] == 0, 0, strength)
    brightest = int(strength.max())
    if brightest > 2 * JPEG_NOISE:  # two levels with noise around them, not a photo
        between = ((strength > brightest / 4) & (strength < brightest * 3 / 4)).mean()
        if between > 0.1:
            return None, f"not a mask: {between:.0%} of its pixels are between background and car colour"
    return (strength > max(brightest / 2, JPEG_NOISE)).astype(np.uint8), None


def decode_mask(path):
    """(mask, None) with the mask as uint8 {0,1} as displayed, or (None, why it is not a mask).
    Background is black, zero or transparent; car is every other colour or value. A lossless file
    holds at most two colours, background among them; a JPEG or WebP mask is thresholded at half
    its brightest colour, which absorbs compression noise."""
    try:
        with Image.open(path) as image:
            orientation = exif_orientation(image)
            if image.format == "TIFF":  # turned upright as Pillow's version loads it
                image, orientation = ImageOps.exif_transpose(image), 1
            image.load()
            mask, problem = (_lossy_mask if image.format in LOSSY_FORMATS else _lossless_mask)(image)
    except DECODE_ERRORS as error:
        return None, f"cannot decode mask ({error})"
    return (None, problem) if problem else (turn_upright(mask, orientation), None)


def mask_problem(path):
    """Why a file cannot be used as a mask, or None. Returns (problem, (width, height) as
    displayed, whether it has car pixels): the file is decoded."""
    problem, _ = image_problem(path)
    if problem:
        return problem, None, False
    mask, problem = decode_mask(path)
    if problem:
        return problem, None, False
    return None, (mask.shape[1], mask.shape[0]), bool(mask.any())


def mask_stem(path):
    """Image stem a mask belongs to: `abc_01_mask.gif` -> `abc_01`."""
    stem = path.stem
    return stem.removesuffix("_mask")


def mask_names(mask_dir):
    """{(stem, lower-case suffix): path} of a mask folder, for find_mask."""
    return {(p.stem, p.suffix.lower()): p for p in visible_files(mask_dir)}


def find_mask(image_path, mask_dir, names=None):
    """An image's mask in mask_dir: `<stem>_mask.<ext>`, else `<stem>.<ext>`, for any mask
    extension. names (mask_names(mask_dir)) matches extensions in any case and saves a file-system
    look-up per candidate; without it lower- and upper-case extensions are tried."""
    stem = Path(image_path).stem
    for tag in MASK_TAGS:
        for suffix in MASK_SUFFIXES:
            if names is not None:
                found = names.get((f"{stem}{tag}", suffix))
                if found is not None:
                    return found
                continue
            for spelled in (suffix, suffix.upper()):
                candidate = Path(mask_dir) / f"{stem}{tag}{spelled}"
                if candidate.is_file():
                    return candidate
    return None


class Problems(list):
    """(path, reason) pairs of skipped files; no_car: the masks kept that have no car pixels."""

    def __init__(self, items=(), no_car=()):
        super().__init__(items)
        self.no_car = list(no_car)

    def __iadd__(self, other):
        super().__iadd__(other)
        self.no_car += getattr(other, "no_car", [])
        return self


class MaskChecks:
    """mask_problem's results for usable masks, which a caller may keep between runs in a JSON file
    so that only new or changed masks are decoded again: each is keyed by its path and the digest of
    its bytes. Without a file, a memo of one scan."""

    VERSION = 2  # bump whenever decode_mask's rule or the key changes: stored results are then redone

    def __init__(self, path=None):
        self.path, self.stored, self.used = Path(path) if path else None, {}, {}
        try:
            content = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}
        except (OSError, ValueError):
            content = {}  # unreadable: check everything again
        if isinstance(content, dict) and content.get("version") == self.VERSION:
            self.stored = content.get("masks", {})

    def check(self, path, digest=None):
        """mask_problem(path), from the stored results where the file's bytes are unchanged."""
        key = f"{digest or file_digest(path)}:{os.path.abspath(path)}"
        result = self.used.get(key) or self.stored.get(key)
        if not (isinstance(result, list) and len(result) == 2):  # none, or not as this version writes them
            problem, size, car = mask_problem(path)
            if problem:  # not kept: a read error may pass, and the few bad files cost little to check again
                return problem, size, car
            result = [list(size), car]
        self.used[key] = result  # dict assignment: safe from the scan's threads
        return None, tuple(result[0]), result[1]

    def save(self):
        """Write the results of the masks checked this run (others dropped), atomically."""
        if self.path is None:
            return
        try:
            make_run_folder(self.path.parent)
            write_text(self.path, json.dumps({"version": self.VERSION, "masks": self.used}))
        except OSError as error:  # a read-only or full CACHE_DIR: the checks are redone next time
            print(f"warning: cannot keep the mask checks in {self.path} ({error.strerror or error}): "
                  f"the next run checks every mask again", file=sys.stderr)


def check_pair(image_path, mask_path, checks=None):
    """(sample or None, (path, reason) or None, whether the mask has no car pixels). checks: a
    MaskChecks that may already know the mask."""
    problem, size = image_problem(image_path)
    if problem:
        return None, (image_path, problem), False
    mask_digest = file_digest(mask_path)
    problem, mask_size, car = (checks or MaskChecks()).check(mask_path, mask_digest)
    if problem:
        return None, (mask_path, problem), False
    if mask_size != size:
        reason = f"mask is {mask_size[0]}x{mask_size[1]} but its image {image_path.name} is {size[0]}x{size[1]}"
        if mask_size == size[::-1]:
            reason += " (sizes as displayed, EXIF orientation applied: draw masks on the photo as it is shown)"
        return None, (mask_path, reason), False
    return Sample(image_path, mask_path, *size, file_digest(image_path) + mask_digest), None, not car


def scan_pairs(image_dir, mask_dir, progress=True, checks=None):
    """Pair images with masks and check both: each image's header and end, each mask decoded (in
    threads; a progress bar on large folders) to see that it is a mask of its image's displayed
    size; checks (a MaskChecks) skips the decoding of masks checked in an earlier run. Returns
    (samples, problems): problems holds the skipped files as (path, reason) pairs, and
    problems.no_car the masks kept that have no car pixels."""
    from tqdm.auto import tqdm

    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, problems = visible_files(image_dir), Problems()
    if not mask_dir.is_dir():
        problems.append((mask_dir, f"no such folder: the {len(images)} images in {image_dir} have no masks"))
        return [], problems
    names = mask_names(mask_dir)
    pairs = [(image, find_mask(image, mask_dir, names)) for image in images]
    found = [pair for pair in pairs if pair[1] is not None]
    checks = checks or MaskChecks()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        results = pool.map(check_pair, [image for image, _ in found], [mask for _, mask in found],
                           [checks] * len(found))
        results = iter(list(tqdm(results, total=len(found), desc="checking masks", unit="mask",
                                 disable=not progress or len(found) < 500)))
    samples = []
    for image_path, mask_path in pairs:
        if mask_path is None:
            problems.append((image_path, f"no mask for it in {mask_dir}"))
            continue
        sample, problem, no_car = next(results)
        if problem:
            problems.append(problem)
            continue
        samples.append(sample)
        if no_car:
            problems.no_car.append(mask_path)
    used, stems, mask_of = {mask for _, mask in found}, {p.stem: p for p in images}, dict(found)
    for mask_path in visible_files(mask_dir):
        if mask_path in used:
            continue
        image = stems.get(mask_stem(mask_path)) or stems.get(mask_path.stem)
        mask = mask_of.get(image)
        if mask is not None:  # x_mask.GIF beside x_mask.gif, or x.png beside x_mask.gif
            problems.append((mask_path, f"not used: {image.name} has another mask, {mask.name}"))
        elif image is None:
            problems.append((mask_path, f"no image for this mask in {image_dir}"))
    for folder in (image_dir, mask_dir):
        problems += [(link, f"a symbolic link to {os.readlink(link)}, which does not exist")
                     for link in broken_links(folder)]
    return samples, problems


def broken_links(folder):
    """Symbolic links in a folder whose targets are gone (a moved or unmounted data set)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_symlink() and not p.exists()
                  and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def report_problems(problems):
    """Print the skipped files with their reasons, and the count of masks with no car pixels."""
    if problems:
        print(f"Skipping {len(problems)} file(s) that cannot be used:", file=sys.stderr)
        for path, reason in problems:
            print(f"  {path}: {reason}", file=sys.stderr)
    no_car = getattr(problems, "no_car", [])
    if no_car:
        names = ", ".join(path.name for path in no_car[:5]) + (", ..." if len(no_car) > 5 else "")
        count = f"{len(no_car)} masks have" if len(no_car) > 1 else "1 mask has"
        print(f"{count} no car pixels (kept, all background): {names}", file=sys.stderr)


def find_splits(data_dir):
    """Folders of the first layout in LAYOUTS whose image folder holds images: {'train': (images,
    masks)}, plus 'val' in the four-folder layout when val_images/ exists; {} when there is none."""
    root = Path(data_dir)
    for folders in LAYOUTS:
        if visible_files(root / folders[0]):
            splits = {"train": (root / folders[0], root / folders[1])}
            if len(folders) == 4 and (root / folders[2]).is_dir():
                splits["val"] = (root / folders[2], root / folders[3])
            return splits
    return {}


def has_data(data_dir):
    return bool(find_splits(data_dir))


def layout_error(data_dir):
    """One line for a data_dir without data: the layouts it may hold and what it holds instead."""
    root = Path(data_dir)
    accepted = ("it must hold train/ + train_masks/ (Carvana's), train_images/ + train_masks/ + val_images/ + "
                "val_masks/, images/ + masks/, or imgs/ + masks/ (see README, Data layouts)")
    if not root.exists():
        return f"{root} does not exist; {accepted}"
    if not root.is_dir():
        return f"{root} is a file, not a folder; {accepted}"
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    shown = [f"{p.name} with {len(visible_files(p))} images" if visible_files(p) else p.name for p in folders[:6]]
    listed = f" ({', '.join(shown)}{', ...' if len(folders) > 6 else ''})" if folders else ""
    found = f"{len(folders)} folder{'s' * (len(folders) != 1)}{listed}, {len(visible_files(root))} images"
    return f"no data in {root} (found: {found}); {accepted}"


# Stems cameras and phones give their photos: IMG_0001 is a photo number, not car IMG's angle 0001.
CAMERA_PREFIXES = {"img", "dsc", "dscn", "dscf", "dcim", "pxl", "mvimg", "photo", "image", "pic", "picture", "vid",
                   "gopr", "dji", "sam", "wp", "screenshot", "snapshot", "capture", "scan"}


def car_id(path):
    """Carvana's `<car id>_<angle>` stems (an angle of 1 to 3 digits) group all angles of one car;
    camera and phone names (IMG_0001, DSC_0045, PXL_20231010_123456) and other stems stand alone."""
    stem = Path(path).stem
    head, _, angle = stem.rpartition("_")
    if head and angle.isdigit() and len(angle) <= 3 and head.lower() not in CAMERA_PREFIXES:
        return head
    return stem


def has_car_id(path):
    return car_id(path) != Path(path).stem


def split_by_car(samples, val_fraction, seed):
    """Hold out val_fraction of the cars (every angle of a car on the same side). With photos of
    fewer than 2 cars, val_fraction of the photos instead: validation then shares the car."""
    by_car = len({car_id(s.image) for s in samples}) >= 2
    group = car_id if by_car else str
    groups = sorted({group(s.image) for s in samples})
    if len(groups) < 2:
        raise ValueError(f"need at least 2 photos to hold some out for validation, found {len(groups)}")
    random.Random(seed).shuffle(groups)
    held_out = min(len(groups) - 1, max(1, round(len(groups) * val_fraction)))
    val_groups = set(groups[:held_out])
    train = [s for s in samples if group(s.image) not in val_groups]
    val = [s for s in samples if group(s.image) in val_groups]
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
    """RGB uint8 array as displayed (EXIF orientation applied, the same for every format); raises
    ValueError naming the file when it cannot be decoded. flag: cv2.IMREAD_COLOR or a reduced one."""
    try:
        with Image.open(path) as header:
            orientation = exif_orientation(header)
            if header.format == "TIFF":  # cv2's libtiff turns TIFFs by itself, at full size only: Pillow
                return pil_rgb(ImageOps.exif_transpose(header))
    except DECODE_ERRORS:
        orientation = 1  # cv2 may still read it
    data = np.fromfile(path, dtype=np.uint8)
    # cv2 would turn JPEG, PNG and WebP by its own reading of EXIF: turned here by the one above.
    image = cv2.imdecode(data, flag | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is not None:
        return turn_upright(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), orientation)
    try:  # formats this cv2 lacks (GIF before OpenCV 4.11)
        with Image.open(path) as fallback:
            return turn_upright(pil_rgb(fallback), orientation)
    except DECODE_ERRORS as error:
        raise ValueError(f"{path}: cannot decode image") from error


def read_mask(path):
    """Mask as uint8 {0,1} as displayed (decode_mask's rule); raises ValueError naming the file and
    why when it cannot be decoded or is not a mask."""
    mask, problem = decode_mask(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return mask


def train_transform():
    """Augmentations of (image, mask) pairs already at the training size: the changes real car
    photos show (position, size and a slight tilt of the car; left-right mirror; paint colour and
    light), never an upside-down car. Reflected borders instead of black corners, and car shares
    interpolated linearly so the targets stay soft. Chosen on real photos: README, Training recipe."""
    return A.Compose([
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-10, 10),
                 border_mode=cv2.BORDER_REFLECT_101, mask_interpolation=cv2.INTER_LINEAR, p=0.7),
        A.HorizontalFlip(p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
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
    .npy files that every loader worker memory-maps. The file names carry a key made from the size
    and each source file's bytes (Sample.digest): any change is a new entry. Runs sharing the folder
    never touch each other's entries: a run holds a shared lock on the entries it reads, and an
    entry of another key is removed only when nobody holds one."""

    VERSION = 3  # 3: keyed to the files' bytes; 2: masks stored as area-averaged car shares

    def __init__(self, folder, name, samples, size):
        self.samples, self.size = list(samples), tuple(size)
        digests = [(Path(s.image).name, s.digest or file_digest(s.image) + file_digest(s.mask)) for s in self.samples]
        key = hashlib.sha1(repr((self.VERSION, self.size, digests)).encode()).hexdigest()[:12]
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
        return len(self.samples) * height * width * 5

    def build(self, workers=0):
        """Decode every sample once (in `workers` processes), with a progress bar. The disk space is
        reserved first, so a full disk is an OSError here, never a crash while the arrays are filled;
        whatever stops the build, its temporary files go (or, after kill -9, with the next build)."""
        from numpy.lib.format import open_memmap
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        count, (height, width) = len(self.samples), self.size
        tag = f"{os.getpid()}-{os.urandom(4).hex()}"  # machines sharing one CACHE_DIR may build at once
        temporary = {part: path.with_name(f".{path.name}.{tag}.tmp") for part, path in self.paths.items()}
        locks = []
        try:
            images = open_memmap(temporary["images"], "w+", np.uint8, (count, height, width, 3))
            masks = open_memmap(temporary["masks"], "w+", np.uint8, (count, height, width))
            locks = [hold_shared(temporary["images"]), hold_shared(temporary["masks"])]  # in use: not a leftover
            for array in (images, masks):
                reserve(array.filename, array.offset + array.nbytes)
            ok = np.zeros(count, np.uint8)
            loader = torch.utils.data.DataLoader(_Decoded(self.samples, self.size), batch_size=None,
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
