"""A three-class data set made from car masks, to measure NUM_CLASSES=3 on real photos: background,
the car, and the lowest third of each car's height (wheels, sills, bumpers) as a second class, saved
as palette PNGs beside links to the photos.

python tools/class_split.py ../shared/carvana_real /tmp/carvana_3   # then
python train.py --DATA_DIR=/tmp/carvana_3 --NUM_CLASSES=3 --VAL_FRACTION=0.25 --SEED=1
"""
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_folder
from image_files import read_mask

PALETTE = [0, 0, 0, 0, 128, 0, 200, 0, 0]  # background black, car green, its lowest third red


def three_classes(mask):
    """0 background, 1 car, 2 the car's pixels in the lowest third of its rows."""
    labels = mask.astype(np.uint8)
    rows = np.flatnonzero(mask.any(1))
    if len(rows):
        lowest = rows[-1] - (rows[-1] - rows[0] + 1) // 3
        labels[lowest + 1:][mask[lowest + 1:] > 0] = 2
    return labels


def main(argv=None):
    source, target = (Path(arg) for arg in (sys.argv[1:] if argv is None else argv))
    splits = data_folder.find_splits(source)
    if not splits:
        raise SystemExit(f"error: {data_folder.layout_error(source)}")
    images, masks = splits["train"]
    (target / "train").mkdir(parents=True, exist_ok=True)
    (target / "train_masks").mkdir(parents=True, exist_ok=True)
    made = 0
    for image in data_folder.visible_files(images):
        mask = data_folder.find_mask(image, masks)
        if mask is None:
            continue
        link = target / "train" / image.name
        if not link.exists():
            os.symlink(image.resolve(), link)
        labels = Image.fromarray(three_classes(read_mask(mask)), "P")
        labels.putpalette(PALETTE)
        labels.save(target / "train_masks" / f"{image.stem}_mask.png")
        made += 1
    print(f"{made} photos with three-class masks in {target}")


if __name__ == "__main__":
    main()
