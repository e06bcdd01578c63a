"""Synthetic Carvana-format data: the demo's and the tests' stand-in for the real download.

Same names and formats as Kaggle's files: train/<12-hex car id>_<angle>.jpg (JPEG) and
train_masks/<car id>_<angle>_mask.gif (2-colour palette GIF, raw values {0,1}); or, with classes,
train_masks/<car id>_<angle>_mask.png (palette PNG: background, body, windows, wheels).
"""
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

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


# Palette of the masks with classes: background, body, windows, wheels (Pascal VOC's first colours).
CLASS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]


def synthetic_pair(car, scene, angle, width, height, classes=False):
    """One RGB image and its {0,1} mask (with classes: labels 0 background, 1 body, 2 windows,
    3 wheels): `car` draws the car's own looks, `scene` the rest."""
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
    if classes:
        mask = np.select([tyres == 1, glass == 1, car == 1], [3, 2, 1], 0).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def save_gif_mask(mask, path):
    """Carvana's mask format: 2-colour palette GIF whose raw values are {0,1}."""
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(path, format="GIF", optimize=False)


def make_synthetic(root, cars=24, angles=16, size=(1918, 1280), seed=0, progress=True, classes=False):
    """Write `root/train/<id>_<angle>.jpg` and `root/train_masks/<id>_<angle>_mask.gif` (with classes,
    palette PNGs of 4 classes: train.py --NUM_CLASSES=4).

    size is (width, height), Carvana's 1918x1280 by default. Returns the number of images.
    """
    from progress import tqdm

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
        image, mask = synthetic_pair(looks, scene, angle, *size, classes)
        stem = f"{car}_{angle:02d}"
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
        temporary = images / f".{stem}.jpg.tmp"
        jpeg.tofile(temporary)
        os.replace(temporary, images / f"{stem}.jpg")
        if classes:
            labels = Image.fromarray(mask, mode="P")
            labels.putpalette(CLASS_PALETTE)
            labels.save(masks / f"{stem}_mask.png")
        else:
            save_gif_mask(mask, masks / f"{stem}_mask.gif")
    return len(jobs)
