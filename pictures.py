"""Pictures of masks: overlays, titled sheets of panels, the training curves and the gallery of the
worst validation images."""
from pathlib import Path

import numpy as np

from files import replacing


def mask_to_rgb(mask, colours=None):
    """A mask as RGB: car white on black, or with colours ((classes, 3) uint8) each label in its own."""
    if colours is not None:
        return np.asarray(colours, np.uint8)[np.asarray(mask, np.intp)]
    return np.repeat((np.asarray(mask) > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)


TINTS = ((255, 0, 0), (0, 255, 0), (0, 90, 255), (255, 0, 255))  # red, green, blue, magenta


def overlay(image, mask, colour=None, strength=0.45):
    """The image with the mask tinted and outlined in a colour (RGB uint8 in and out); by default the
    one of TINTS farthest from the masked pixels' mean colour, since a red tint vanishes on a red car."""
    import cv2

    where = np.asarray(mask) > 0
    if colour is None:
        mean = image[where].mean(axis=0) if where.any() else np.zeros(3)
        colour = max(TINTS, key=lambda tint: float(((np.array(tint) - mean) ** 2).sum()))
    out = image.astype(np.float32)
    out[where] = out[where] * (1 - strength) + np.array(colour, np.float32) * strength
    thickness = max(1, round(min(where.shape) / 400))  # 3 pixels on a 1280-high photo
    inside = cv2.erode(where.view(np.uint8), np.ones((3, 3), np.uint8), iterations=thickness) > 0
    out[where & ~inside] = colour  # the outline in full colour: the edge shows on any photo
    return out.astype(np.uint8)


def overlay_classes(image, labels, colours, names, strength=0.45):
    """The image with each class of a label map tinted and outlined in its colour, and a legend of
    the classes present (names[k] in colours[k]) in the top left corner."""
    import cv2

    out = image
    present = [k for k in range(1, len(colours)) if (labels == k).any()]
    for k in present:
        out = overlay(out, labels == k, tuple(int(c) for c in colours[k]), strength)
    scale, thickness = max(0.4, image.shape[0] / 600), max(1, round(image.shape[0] / 400))
    (_, height), _ = cv2.getTextSize("Mg", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    line, margin = height * 2, height // 2 + 2
    for row, k in enumerate(present):
        top = margin + row * line
        cv2.rectangle(out, (margin, top), (margin + height, top + height), tuple(int(c) for c in colours[k]), -1)
        cv2.putText(out, names[k], (margin + 2 * height, top + height), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def draw_panels(rows, path, gap=8, title_height=26):
    """Save a sheet of pictures: each row a list of equally tall RGB panels and their titles, each
    title above its panel. Drawn with Pillow, which is far quicker here than matplotlib."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=18)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the small bitmap font
        font = ImageFont.load_default()
    width = max(sum(panel.shape[1] for panel in panels) + gap * (len(panels) - 1) for panels, _ in rows)
    heights = [max(panel.shape[0] for panel in panels) + title_height + gap for panels, _ in rows]
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (panels, titles), height in zip(rows, heights):
        left = 0
        for panel, title in zip(panels, titles):
            while len(title) > 1 and draw.textlength(title, font=font) > panel.shape[1] - 4:  # never over the next
                title = title[:-2] + "…"
            draw.text((left + 2, top + 4), title, fill="black", font=font)
            sheet.paste(Image.fromarray(np.ascontiguousarray(panel)), (left, top + title_height))
            left += panel.shape[1] + gap
        top += height
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as stream:  # whole or absent
        sheet.save(stream, format="PNG")
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_training_curves(rows, path):
    """Loss and validation scores per epoch from history rows (dicts as in history.csv)."""
    plt = _pyplot()
    epochs = [int(row["epoch"]) for row in rows]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train loss")
    losses.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="validation loss")
    losses.set(xlabel="epoch", ylabel="loss", title="Loss")
    scores.plot(epochs, [float(r["dice"]) for r in rows], "o-", label="Dice")
    per_class = [r.get("class_dice", "").split() for r in rows]
    if len(per_class[-1]) > 1 and all(len(dice) == len(per_class[-1]) for dice in per_class):
        for k in range(len(per_class[-1])):
            scores.plot(epochs, [float(dice[k]) for dice in per_class], ".--", label=f"Dice of class {k + 1}")
    scores.plot(epochs, [float(r["pixel_accuracy"]) for r in rows], "o-", label="pixel accuracy")
    scores.set(xlabel="epoch", title="Validation")
    from matplotlib.ticker import MaxNLocator

    for axes in (losses, scores):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(path) as stream:  # whole or absent
            figure.savefig(stream, format="png", dpi=100)
    finally:
        plt.close(figure)


def difference_picture(truth, prediction):
    """Black where right, red for false positives (car predicted on background), blue for misses,
    yellow for a pixel given the wrong one of several classes."""
    picture = np.zeros((*truth.shape, 3), np.uint8)
    picture[(prediction > 0) & (truth == 0)] = (230, 40, 40)
    picture[(prediction == 0) & (truth > 0)] = (40, 90, 230)
    picture[(prediction > 0) & (truth > 0)] = (70, 70, 70)
    picture[(prediction > 0) & (truth > 0) & (prediction != truth)] = (240, 200, 30)
    return picture


class WorstImages:
    """Keeps the `count` lowest-Dice (name, dice, image, truth, prediction), each scaled to `width`
    pixels wide for drawing; truth and prediction are masks, or labels drawn in `colours`."""

    def __init__(self, count=6, width=480, colours=None):
        self.count, self.width, self.items, self.colours = count, width, [], colours

    def add(self, name, dice, image, truth, prediction):
        if len(self.items) == self.count and dice >= self.items[-1][1]:
            return
        import cv2

        scale = self.width / image.shape[1]
        size = (self.width, max(1, round(image.shape[0] * scale)))

        def scaled(picture, interpolation):
            return cv2.resize(np.ascontiguousarray(picture, np.uint8), size, interpolation=interpolation)

        self.items.append((name, dice, scaled(image, cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR),
                           scaled(truth, cv2.INTER_NEAREST), scaled(prediction, cv2.INTER_NEAREST)))
        self.items = sorted(self.items, key=lambda item: item[1])[: self.count]

    def save(self, path):
        """One row per image: image, truth, prediction, differences, each under its title (the file
        name and Dice on the first)."""
        if not self.items:
            return None
        legend = "red: false car, blue: missed car" if self.colours is None else \
            "red: false, blue: missed, yellow: wrong class"
        return draw_panels([((image, mask_to_rgb(truth, self.colours), mask_to_rgb(prediction, self.colours),
                              difference_picture(truth, prediction)),
                             (f"{name}  Dice {dice:.4f}", "truth", "prediction", legend))
                            for name, dice, image, truth, prediction in self.items], path)
