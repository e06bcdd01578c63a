"""Reading one photo or mask file as it is displayed: its format, EXIF orientation and end, the mask
rule (black, zero or transparent is background, any other colour car), decoding at a reduced size for
a small target, and a digest of its bytes."""
import hashlib
import struct
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


# Bytes a complete file of each format ends with: a cheap first test for truncated downloads.
FILE_ENDINGS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


ORIENTATION = 0x0112  # the EXIF tag


# EXIF orientation -> (swap rows and columns, then flip the rows, flip the columns) that shows the
# stored pixels as displayed: what PIL's ImageOps.exif_transpose does.
UPRIGHT = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False), 5: (True, False, False),
           6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


# Mask formats with compression noise: thresholded instead of read colour by colour.
LOSSY_FORMATS = {"JPEG", "MPO", "WEBP"}


JPEG_NOISE = 12  # how far compression noise moves a black pixel of a JPEG mask


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def file_digest(path):
    """A digest of a file's bytes: a replaced file is told apart even where its size and modification
    time are kept (cp -p, rsync -a, coarse-time file systems)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha1").hexdigest()[:20]


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


class FileCheck(NamedTuple):
    problem: str | None  # why the file cannot be used; None when it can
    size: tuple | None   # (width, height) as displayed
    format: str | None = None  # Pillow's name of its format: "JPEG", "PNG", ...


# The formats decoded at a reduced size for a small target (libjpeg's DCT-domain scaling): other
# formats' decoders would decode whole and resize with another filter, 42 levels off the photo's own.
REDUCED_FORMATS = {"JPEG", "MPO"}


class MaskCheck(NamedTuple):
    problem: str | None
    size: tuple | None
    has_car: bool
    codes: tuple = ()  # with several classes: the mask's distinct label codes (label_codes), sorted
    kind: str = ""     # with several classes: "values" or "colours"


class DecodedMask(NamedTuple):
    pixels: np.ndarray | None  # uint8 {0,1} as displayed
    problem: str | None        # why the file is not a mask


def image_problem(path, photo=True):
    """A FileCheck of a photo (or, with photo=False, of a mask): its header and its end are read, not
    its pixels."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return FileCheck("empty file (0 bytes)", None)
        with Image.open(path) as image:
            size, kind = displayed_size(image), "JPEG" if image.format == "MPO" else image.format
            if photo and image.mode == "F":  # no range to scale it by: 0-1, 0-255 and HDR all occur
                return FileCheck(f"a 32-bit floating-point {kind}: save it with 8 or 16 bits per channel", None)
            if not decodes_whole(image, path):
                return FileCheck(f"truncated {kind} (file ends early)", None)
        return FileCheck(None, size, image.format)
    except UnidentifiedImageError:
        return FileCheck("not an image (no known image format inside)", None)
    except DECODE_ERRORS as error:
        return FileCheck(f"unreadable ({error})", None)


def image_size(path):
    """(width, height) of an image file as the decoders here return it: as displayed."""
    with Image.open(path) as image:
        return displayed_size(image)


def _rgb_name(code):
    return f"({code >> 16}, {code >> 8 & 255}, {code & 255})"


def _value_name(code):
    return str(np.asarray(code).item())


def palette_codes(image):
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
        return (f"not a mask: {len(colours)} colours ({shown}); a mask has black background and one car colour "
                f"(masks of several classes: set NUM_CLASSES)")
    if len(colours) == 2 and 0 not in colours:
        return f"not a mask: neither of its colours {name(colours[0])} and {name(colours[1])} is black, the background"
    return None


def _lossless_mask(image):
    """A PNG, GIF, BMP or TIFF mask: at most two colours, background among them."""
    if image.mode == "P":  # palette entries go by their colours: Carvana's GIFs hold raw indices {0,1}
        (pixels, name), lut = (np.asarray(image), _rgb_name), palette_codes(image)
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
    """A DecodedMask: the pixels as displayed, or why the file is not a mask. Background is black, zero or transparent; car is every other colour or value. A lossless file
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
        return DecodedMask(None, f"cannot decode mask ({error})")
    return DecodedMask(None, problem) if problem else DecodedMask(turn_upright(mask, orientation), None)


class LabelCodes(NamedTuple):
    codes: np.ndarray | None  # a code per pixel as displayed: a label value, or a colour as 0xRRGGBB
    kind: str | None          # "values" (grey levels or label numbers) or "colours" (RGB or palette)
    problem: str | None       # why the file is not a mask of classes


# More codes than this in one mask: a photo or a drawing saved with smoothed edges, not labels.
MOST_CODES = 64


def label_codes(path):
    """LabelCodes of a mask with several classes: every value or colour is kept (0, black and
    transparent are background, code 0). A lossy format is refused: compression makes new colours
    at every edge between classes."""
    try:
        with Image.open(path) as image:
            if image.format in LOSSY_FORMATS:
                kind = "JPEG" if image.format == "MPO" else image.format
                return LabelCodes(None, None, f"a {kind} mask: its compression makes new colours along every "
                                              f"edge, so classes cannot be read from it; save masks as PNG")
            if image.mode == "F":
                return LabelCodes(None, None, "a 32-bit floating-point mask: save the labels as integers")
            orientation = exif_orientation(image)
            if image.format == "TIFF":
                image, orientation = ImageOps.exif_transpose(image), 1
            image.load()
            if image.mode == "P":
                codes, kind = palette_codes(image)[np.asarray(image)], "colours"
            else:
                codes, name = _colour_codes(image)
                kind = "values" if name is _value_name else "colours"
    except DECODE_ERRORS as error:
        return LabelCodes(None, None, f"cannot decode mask ({error})")
    return LabelCodes(turn_upright(np.asarray(codes, np.int64), orientation), kind, None)


def labels_problem(path):
    """A MaskCheck of a mask with several classes: its distinct codes and their kind."""
    decoded = label_codes(path)
    if decoded.problem:
        return MaskCheck(decoded.problem, None, False)
    codes = np.unique(decoded.codes)
    if len(codes) > MOST_CODES:
        return MaskCheck(f"not a mask of classes: {len(codes)} different colours or values (at most "
                         f"{MOST_CODES}); a photo, or edges smoothed when it was drawn or resized?", None, False)
    height, width = decoded.codes.shape
    return MaskCheck(None, (width, height), bool(codes[-1] > 0), tuple(int(c) for c in codes), decoded.kind)


def mask_problem(path, classes=1):
    """A MaskCheck of a mask file: it is decoded. classes: NUM_CLASSES (1: the car/background rule of
    decode_mask; more: every label code is kept, labels_problem)."""
    problem = image_problem(path, photo=False).problem
    if problem:
        return MaskCheck(problem, None, False)
    if classes > 1:
        return labels_problem(path)
    decoded = decode_mask(path)
    if decoded.problem:
        return MaskCheck(decoded.problem, None, False)
    return MaskCheck(None, (decoded.pixels.shape[1], decoded.pixels.shape[0]), bool(decoded.pixels.any()))


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
    ValueError naming the file when it cannot be decoded. flag: cv2.IMREAD_COLOR or a reduced one,
    which applies to REDUCED_FORMATS only."""
    try:
        with Image.open(path) as header:
            orientation = exif_orientation(header)
            if header.format not in REDUCED_FORMATS:
                flag = cv2.IMREAD_COLOR
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
    decoded = decode_mask(path)
    if decoded.problem:
        raise ValueError(f"{path}: {decoded.problem}")
    return decoded.pixels


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


def load_image(path, size=None, stored_size=None, reduced=True):
    """A photo as RGB uint8, shrunk to size (height, width) when given. With `reduced`, a JPEG is
    decoded at the largest DCT-domain reduction that still covers the size (stored_size: its
    (width, height)), which skips most of the decoding work."""
    if size is None:
        return read_image(path)
    if not reduced:
        return shrink_image(read_image(path), size)
    if stored_size is None:
        stored_size = image_size(path)
    return shrink_image(read_image(path, reduced_decode_flag(*stored_size, size)), size)
