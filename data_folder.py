"""Finding and checking a data folder: its layout, each photo paired with its mask, the files that
cannot be used (reported once, with the reason), and the car-grouped split into training and
validation photos."""
import json
import os
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from files import make_run_folder, write_text
from image_files import IMAGE_SUFFIXES, MaskCheck, file_digest, image_problem, mask_problem

# Carvana names masks <stem>_mask.gif; other datasets keep the image's stem.
MASK_TAGS = ("_mask", "")


MASK_SUFFIXES = (".gif", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# DATA_DIR layouts, the first whose image folder holds images wins:
# (training images, training masks) or (..., validation images, validation masks).
LAYOUTS = (("train_images", "train_masks", "val_images", "val_masks"), ("train", "train_masks"),
           ("images", "masks"), ("imgs", "masks"))


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path
    width: int
    height: int
    digest: str = ""  # of both files' bytes (file_digest): what the cache and the mask checks are keyed to
    codes: tuple = ()  # with several classes (NUM_CLASSES): the label codes its mask holds
    kind: str = ""     # with several classes: "values" or "colours"


def visible_files(folder):
    """Image files in a folder, sorted; hidden files and sub-folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


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


@dataclass
class ScanReport:
    """What a scan of a folder found besides its usable pairs."""

    skipped: list = field(default_factory=list)      # (path, reason) of each file that cannot be used
    empty_masks: list = field(default_factory=list)  # masks kept that have no car pixels

    def extend(self, other):
        self.skipped += other.skipped
        self.empty_masks += other.empty_masks
        return self


class PairCheck(NamedTuple):
    sample: Sample | None
    skipped: tuple | None  # (path, reason) when the pair cannot be used
    empty_mask: bool


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

    def check(self, path, digest=None, classes=1):
        """mask_problem(path, classes), from the stored results where the file's bytes are unchanged.
        A mask read as labels (classes > 1) is stored apart from the same file read as car/background."""
        labels = classes > 1
        key = f"{'labels:' * labels}{digest or file_digest(path)}:{os.path.abspath(path)}"
        result = self.used.get(key) or self.stored.get(key)
        if not (isinstance(result, list) and len(result) == (4 if labels else 2)):  # none, or not this version's
            checked = mask_problem(path, classes)
            if checked.problem:  # not kept: a read error may pass, and the few bad files cost little to check again
                return checked
            result = [list(checked.size), checked.has_car, *([list(checked.codes), checked.kind] * labels)]
        self.used[key] = result  # dict assignment: safe from the scan's threads
        return MaskCheck(None, tuple(result[0]), result[1], *((tuple(result[2]), result[3]) if labels else ()))

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


def check_pair(image_path, mask_path, checks=None, classes=1):
    """A PairCheck of a photo and its mask. checks: a MaskChecks that may already know the mask;
    classes: NUM_CLASSES."""
    image = image_problem(image_path)
    if image.problem:
        return PairCheck(None, (image_path, image.problem), False)
    mask_digest = file_digest(mask_path)
    mask = (checks or MaskChecks()).check(mask_path, mask_digest, classes)
    if mask.problem:
        return PairCheck(None, (mask_path, mask.problem), False)
    if mask.size != image.size:
        (mask_width, mask_height), (width, height) = mask.size, image.size
        reason = f"mask is {mask_width}x{mask_height} but its image {image_path.name} is {width}x{height}"
        if mask.size == image.size[::-1]:
            reason += " (sizes as displayed, EXIF orientation applied: draw masks on the photo as it is shown)"
        return PairCheck(None, (mask_path, reason), False)
    sample = Sample(image_path, mask_path, width=image.size[0], height=image.size[1],
                    digest=file_digest(image_path) + mask_digest, codes=mask.codes, kind=mask.kind)
    return PairCheck(sample, None, not mask.has_car)


def scan_pairs(image_dir, mask_dir, progress=True, checks=None, classes=1):
    """Pair images with masks and check both: each image's header and end, each mask decoded (in
    threads; a progress bar on large folders) to see that it is a mask of its image's displayed
    size; checks (a MaskChecks) skips the decoding of masks checked in an earlier run; classes:
    NUM_CLASSES. Returns (samples, a ScanReport)."""
    from progress import tqdm

    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, report = visible_files(image_dir), ScanReport()
    if not mask_dir.is_dir():
        report.skipped.append((mask_dir, f"no such folder: the {len(images)} images in {image_dir} have no masks"))
        return [], report
    names = mask_names(mask_dir)
    pairs = [(image, find_mask(image, mask_dir, names)) for image in images]
    claimed = Counter(mask for _, mask in pairs if mask is not None)
    shared = {mask: [image.name for image, other in pairs if other == mask] for mask, count in claimed.items() if count > 1}
    found = [pair for pair in pairs if pair[1] is not None and pair[1] not in shared]
    checks = checks or MaskChecks()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        results = pool.map(check_pair, [image for image, _ in found], [mask for _, mask in found],
                           [checks] * len(found), [classes] * len(found))
        results = iter(list(tqdm(results, total=len(found), desc="checking masks", unit="mask",
                                 disable=not progress or len(found) < 500)))
    samples = []
    for image_path, mask_path in pairs:
        if mask_path is None:
            report.skipped.append((image_path, f"no mask for it in {mask_dir}"))
            continue
        if mask_path in shared:  # x.jpg and x.png: which photo the mask was drawn on cannot be told
            others = ", ".join(name for name in shared[mask_path] if name != image_path.name)
            reason = f"its mask {mask_path.name} is also the mask of {others}: rename the photo that is not its own"
            report.skipped.append((image_path, reason))
            continue
        checked = next(results)
        if checked.skipped:
            report.skipped.append(checked.skipped)
            continue
        samples.append(checked.sample)
        if checked.empty_mask:
            report.empty_masks.append(mask_path)
    used, stems, mask_of = {mask for _, mask in pairs}, {p.stem: p for p in images}, dict(found)
    for mask_path in visible_files(mask_dir):
        if mask_path in used:
            continue
        image = stems.get(mask_stem(mask_path)) or stems.get(mask_path.stem)
        mask = mask_of.get(image)
        if mask is not None:  # x_mask.GIF beside x_mask.gif, or x.png beside x_mask.gif
            report.skipped.append((mask_path, f"not used: {image.name} has another mask, {mask.name}"))
        elif image is None:
            report.skipped.append((mask_path, f"no image for this mask in {image_dir}"))
    for folder in (image_dir, mask_dir):
        report.skipped += [(link, f"a symbolic link to {os.readlink(link)}, which does not exist")
                           for link in broken_links(folder)]
    return samples, report


def broken_links(folder):
    """Symbolic links in a folder whose targets are gone (a moved or unmounted data set)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_symlink() and not p.exists()
                  and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def print_report(report):
    """Print the skipped files with their reasons, and the count of masks with no car pixels."""
    if report.skipped:
        print(f"Skipping {len(report.skipped)} file(s) that cannot be used:", file=sys.stderr)
        for path, reason in report.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    empty = report.empty_masks
    if empty:
        names = ", ".join(path.name for path in empty[:5]) + (", ..." if len(empty) > 5 else "")
        count = f"{len(empty)} masks have" if len(empty) > 1 else "1 mask has"
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
                "val_masks/, images/ + masks/, or imgs/ + masks/ (see README, Your data)")
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


def training_split(data_dir, val_fraction, seed, checks_file=None, show=True, classes=1):
    """(training samples, validation samples) of a data folder, or SystemExit with one line saying
    why there are none. Validation is val_images/ where the layout has it, else val_fraction of the
    cars (split_by_car). With show, the skipped files, the masks with no car pixels and the warnings
    about the split are printed. checks_file keeps the mask checks between runs: every mask is
    decoded to be checked, and only new or changed ones again. classes: NUM_CLASSES (masks with
    several label values or colours are read as classes; classes.py maps them)."""
    splits = find_splits(data_dir)
    if not splits:
        raise SystemExit(f"error: DATA_DIR: {layout_error(data_dir)}")
    checks = MaskChecks(checks_file)
    train, report = scan_pairs(*splits["train"], progress=show, checks=checks, classes=classes)
    if "val" in splits:
        val, val_report = scan_pairs(*splits["val"], progress=show, checks=checks, classes=classes)
        report.extend(val_report)
    if show:
        print_report(report)
        if checks_file:
            checks.save()
    listed = " (the skipped files are listed above)" if report.skipped else ""
    if "val" not in splits:
        if len(train) < 2:
            raise SystemExit(f"error: {splits['train'][0]} has {len(train)} usable image/mask "
                             f"pair{'s' * (len(train) != 1)}{listed}; training needs at least 2, one to train on "
                             f"and one to validate: add photos with masks")
        cars = {car_id(s.image) for s in train}
        unnamed = [s.image.name for s in train if not has_car_id(s.image)]
        train, val = split_by_car(train, val_fraction, seed)
        if len(cars) < 2 and show:
            print(f"warning: all {len(train) + len(val)} photos in {splits['train'][0]} are of one car ({cars.pop()}): "
                  f"validation holds out {len(val)} of them, so it shares that car with training and its scores "
                  f"read high; photos of other cars (or a val_images/ folder) give a fair score", file=sys.stderr)
        elif unnamed and show:
            shown = ", ".join(unnamed[:2]) + (", ..." if len(unnamed) > 2 else "")
            print(f"warning: {len(unnamed)} of the {len(train) + len(val)} photos in {splits['train'][0]} have no car "
                  f"id in their names ({shown}; Carvana's are <car id>_<angle>), so each is held out or trained on "
                  f"alone: photos of one car may fall on both sides, and validation then shares that car with "
                  f"training and its scores read high; names such as <car>_01.jpg (or a val_images/ folder) give "
                  f"a fair score", file=sys.stderr)
    if not train or not val:
        raise SystemExit(f"error: {data_dir} has {len(train)} usable training and {len(val)} validation "
                         f"images{listed}; both must be at least 1")
    empty = set(report.empty_masks)
    why = {"training": "there is nothing to learn",
           "validation": "Dice cannot tell a model that finds cars from one that predicts nothing"}
    for name, samples in (("training", train), ("validation", val)):
        if all(sample.mask in empty for sample in samples):
            other = "" if "val" in splits else ", or hold out other cars (SEED, VAL_FRACTION)"
            raise SystemExit(f"error: all {len(samples)} {name} masks in {data_dir} are empty (no car "
                             f"pixels), so {why[name]}: add photos whose masks show the car{other}")
    return train, val
