"""Masks of more than one class (NUM_CLASSES of 2 or more): the label values or colours of the
training masks as classes, kept in the checkpoint; masks read as class indices and shrunk to each
class's share of a pixel; predictions written back in the training masks' own encoding; the colour
each class is drawn in."""
import io
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from image_files import label_codes, palette_codes, shrink_image

# Classes whose masks hold label values, not colours, are drawn in these (background is black).
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (245, 130, 48), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


@dataclass(frozen=True)
class Classes:
    """The classes of a run: background (code 0: black, zero or transparent) and one class per other
    label value or colour of the training masks, in the order of their codes."""

    kind: str            # "values" (label numbers, grey levels) or "colours" (RGB or palette entries)
    codes: tuple         # each class's code (a value, or a colour as 0xRRGGBB), ascending: 0 first
    palette: tuple = ()  # the training masks' palette (768 numbers) where they have one, for writing
    indices: tuple = ()  # each class's index in that palette
    wide: bool = False   # label values written with 16 bits, as the training masks were

    def __len__(self):
        return len(self.codes)

    def name(self, index):
        """How a class is shown: "background", "value 3" or "colour (0, 128, 0)"."""
        code = self.codes[index]
        if index == 0:
            return "background"
        return f"value {code}" if self.kind == "values" else f"colour ({code >> 16}, {code >> 8 & 255}, {code & 255})"

    def colours(self):
        """(classes, 3) uint8 RGB: the masks' own colours, or COLOURS for label values."""
        if self.kind == "colours":
            codes = np.array(self.codes, np.int64)
            return np.stack((codes >> 16, codes >> 8 & 255, codes & 255), 1).astype(np.uint8)
        table = [(0, 0, 0)] + [COLOURS[i % len(COLOURS)] for i in range(len(self) - 1)]
        return np.array(table, np.uint8)

    def as_dict(self):
        """What a checkpoint keeps (plain lists: torch.load's weights_only reads them)."""
        return {"kind": self.kind, "codes": list(self.codes), "palette": list(self.palette),
                "indices": list(self.indices), "wide": self.wide}

    @classmethod
    def from_dict(cls, stored):
        return cls(stored["kind"], tuple(stored["codes"]), tuple(stored.get("palette", ())),
                   tuple(stored.get("indices", ())), bool(stored.get("wide", False)))

    def read(self, path):
        """A mask file as uint8 class indices; ValueError naming the file where it cannot be read,
        is of the other kind, or holds a code that is none of the classes."""
        decoded = label_codes(path)
        if decoded.problem:
            raise ValueError(f"{path}: {decoded.problem}")
        if decoded.kind != self.kind and decoded.codes.any():  # all background fits either kind
            raise ValueError(f"{path}: holds {KIND_NAMES[decoded.kind]}, the classes are {KIND_NAMES[self.kind]}")
        return self.labels(decoded.codes, path)

    def labels(self, codes, path):
        codes = np.asarray(codes)
        known = np.array(self.codes, np.int64)
        index = np.searchsorted(known, codes).clip(0, len(known) - 1)
        stray = codes != known[index]
        if stray.any():
            shown = ", ".join(self.code_name(code) for code in np.unique(codes[stray])[:4])
            raise ValueError(f"{path}: holds {shown}, none of the classes ({self.listed()})")
        return index.astype(np.uint8)

    def code_name(self, code):
        code = int(code)
        return str(code) if self.kind == "values" else f"({code >> 16}, {code >> 8 & 255}, {code & 255})"

    def listed(self):
        return ", ".join(self.code_name(code) for code in self.codes)

    def png(self, labels):
        """Class indices as PNG bytes in the training masks' encoding: their label values (8 or 16
        bits), their palette and indices, or their RGB colours."""
        labels = np.asarray(labels, np.intp)
        options = {}
        if self.kind == "values":
            codes = np.array(self.codes)
            image = Image.fromarray(codes[labels].astype(np.uint16 if self.wide else np.uint8))
        elif self.palette:
            image = Image.fromarray(np.array(self.indices, np.uint8)[labels], "P")
            image.putpalette(list(self.palette))
            background = self.indices[0]
            if any(self.palette[3 * background:3 * background + 3]):  # background by transparency
                options["transparency"] = background
        else:
            image = Image.fromarray(self.colours()[labels], "RGB")
        stream = io.BytesIO()
        image.save(stream, format="PNG", **options)
        return stream.getvalue()


KIND_NAMES = {"values": "label values", "colours": "colours"}


def class_shares(labels, size, count):
    """(height, width, count) uint8: each pixel's share of each class at size (height, width), by area
    averaging as shrink_mask does for car, so edges keep their sub-pixel position."""
    one_hot = (np.asarray(labels)[..., None] == np.arange(count)).astype(np.uint8) * np.uint8(255)
    shares = shrink_image(one_hot, size)
    return shares if shares.ndim == 3 else shares[..., None]


def find_classes(train, val, count, show=True):
    """(Classes, the validation samples kept): the codes of the training masks (Sample.codes) must
    be `count` with the background; a validation mask holding another code, or of the other kind,
    is named and skipped. SystemExit with one line where the training masks do not fit `count`."""
    by_kind = defaultdict(list)
    for sample in train:
        if any(sample.codes):  # a mask of background alone fits either kind
            by_kind[sample.kind].append(sample.mask.name)
    if len(by_kind) > 1:
        shown = " and ".join(f"{KIND_NAMES[kind]} ({len(names)} masks, e.g. {names[0]})"
                             for kind, names in sorted(by_kind.items()))
        raise SystemExit(f"error: NUM_CLASSES: the training masks mix {shown}: save them all one way")
    kind = next(iter(by_kind), train[0].kind)
    holders = defaultdict(list)
    for sample in train:
        for code in sample.codes:
            holders[code].append(sample.mask.name)
    codes = tuple(sorted({0, *holders}))
    # Written as the mask holding the most classes is (its palette most likely holds them all).
    classes = encoding(kind, codes, max(train, key=lambda sample: (sample.kind == kind, len(sample.codes))).mask)
    if len(codes) != count:
        found = ", ".join(f"{classes.code_name(code)} ({len(holders[code])} mask{'s' * (len(holders[code]) != 1)}"
                          f"{': ' + holders[code][0] if 0 < len(holders[code]) <= 2 else ''})" for code in codes[:12])
        raise SystemExit(f"error: NUM_CLASSES={count}, but the {len(train)} training masks hold {len(codes)} "
                         f"classes with the background: {found}{', ...' if len(codes) > 12 else ''}; set "
                         f"NUM_CLASSES={len(codes)}, or correct the masks holding a stray value")
    kept, skipped = [], []
    for sample in val:
        if sample.kind != kind and any(sample.codes):
            skipped.append((sample.mask, f"holds {KIND_NAMES[sample.kind]}, the training masks {KIND_NAMES[kind]}"))
        elif not set(sample.codes) <= set(codes):
            stray = ", ".join(classes.code_name(code) for code in sorted(set(sample.codes) - set(codes))[:4])
            skipped.append((sample.mask, f"holds {stray}, none of the training masks' classes ({classes.listed()})"))
        else:
            kept.append(sample)
    if skipped and show:
        print(f"Skipping {len(skipped)} validation file(s) whose classes training never sees:", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if not kept:
        raise SystemExit(f"error: none of the {len(val)} validation masks holds only the training masks' classes "
                         f"({classes.listed()}), so nothing can be validated")
    return classes, kept


def encoding(kind, codes, path):
    """The Classes of these codes, written as the training mask at path was: label values with 8 or
    16 bits, or colours with its palette where it has one holding every code (else RGB)."""
    if kind == "values":
        if codes[-1] > 65535:
            raise SystemExit(f"error: NUM_CLASSES: {path} holds the label value {codes[-1]}: label values "
                             f"above 65535 cannot be written back as PNG; number the classes from 1")
        with Image.open(path) as image:
            wide = image.mode.startswith("I") or codes[-1] > 255
        return Classes(kind, codes, wide=wide)
    return Classes(kind, codes, *palette_of(path, codes))


def palette_of(path, codes):
    """(palette, each code's index in it) of a palette mask holding every code, or () where the mask
    has no palette or lacks one of them: masks are then written as RGB."""
    with Image.open(path) as image:
        if image.mode != "P":
            return ()
        by_code = palette_codes(image)
        palette = (list(image.getpalette() or []) + [0] * 768)[:768]
    indices = []
    for code in codes:
        where = np.flatnonzero(by_code == code)
        if not len(where):
            return ()
        indices.append(int(where[0]))
    return tuple(palette), tuple(indices)
