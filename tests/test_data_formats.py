"""Real-world data folders: every mask encoding, phone photos with EXIF orientation, odd formats and
names, other repositories' layouts, one-car folders, misspelt folders, JPEG trailers."""
import re
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import data_folder
import image_files
import predict
import synthetic
import train
from conftest import REAL_SAMPLES, tiny_args
from dataset import load_training_pair

SIZE = (480, 320)  # (width, height): real photos are shrunk to this to keep the tests fast
# EXIF orientation -> the transpose that stores a displayed picture so that the tag shows it upright.
STORED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def real_pairs():
    """The 16 real Carvana pairs at 480x320: (RGB photo, bool mask)."""
    pairs = []
    for photo in sorted((REAL_SAMPLES / "train").glob("*.jpg")):
        image = cv2.resize(image_files.read_image(photo), SIZE, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(image_files.read_mask(REAL_SAMPLES / "train_masks" / f"{photo.stem}_mask.gif").astype(np.float32),
                          SIZE, interpolation=cv2.INTER_AREA) > 0.5
        pairs.append((image, mask))
    return pairs


def synthetic_pairs():
    """The twin where ../shared is absent: 4 synthetic cars x 4 angles at 480x320."""
    pairs = [synthetic.synthetic_pair(np.random.default_rng([7, car]), np.random.default_rng([7, car, angle]), angle,
                                      *SIZE) for car in range(4) for angle in (1, 5, 9, 13)]
    return [(image, mask.astype(bool)) for image, mask in pairs]


# ---- writers: (picture as displayed, path) -> the file a user would have -----------------------
def jpeg(image, path):
    Image.fromarray(image).save(path, "JPEG", quality=92)


def phone(orientation):
    """A phone photo: pixels stored turned, with the EXIF tag that shows them upright."""
    def write(image, path):
        exif = Image.Exif()
        exif[image_files.ORIENTATION] = orientation
        Image.fromarray(image).transpose(STORED[orientation]).save(path, "JPEG", quality=92, exif=exif.tobytes())
        with Image.open(path) as check:  # the file displays as the picture it was made from
            assert ImageOps.exif_transpose(check).size == Image.fromarray(image).size
    return write


def turned_png_mask(orientation):
    def write(mask, path):
        exif = Image.Exif()
        exif[image_files.ORIENTATION] = orientation
        Image.fromarray(mask.astype(np.uint8) * 255).transpose(STORED[orientation]).save(path, exif=exif.tobytes())
    return write


def grey_photo(image, path):
    Image.fromarray(image).convert("L").save(path, "JPEG", quality=92)


def cmyk_photo(image, path):
    Image.fromarray(image).convert("CMYK").save(path, "JPEG", quality=92)


def rgba_photo(image, path):
    Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])).save(path)


def plain(image, path):  # BMP, TIFF, PNG by the suffix
    Image.fromarray(image).save(path)


def gif_mask(mask, path):
    synthetic.save_gif_mask(mask.astype(np.uint8), path)


def colour_mask(colour, **options):
    def write(mask, path):
        pixels = np.zeros((*mask.shape, 3), np.uint8)
        pixels[mask] = colour
        Image.fromarray(pixels).save(path, **options)
    return write


def rgba_mask(mask, path):
    """Car opaque blue on transparent white, as some drawing programs export."""
    pixels = np.zeros((*mask.shape, 4), np.uint8)
    pixels[:] = (255, 255, 255, 0)
    pixels[mask] = (0, 160, 255, 255)
    Image.fromarray(pixels).save(path)


def grey_mask(value, dtype=np.uint8, **options):
    def write(mask, path):
        if dtype == np.uint16:
            cv2.imencode(path.suffix, mask.astype(np.uint16) * value)[1].tofile(path)
        else:
            Image.fromarray(mask.astype(np.uint8) * value).save(path, **options)
    return write


def one_bit_mask(mask, path):
    Image.fromarray(mask).save(path)


# (image name, image writer, mask name, mask writer, in validation)
FORMATS = [
    ("carvana_01.jpg", jpeg, "carvana_01_mask.gif", gif_mask, False),
    ("red.jpg", jpeg, "red_mask.png", colour_mask((255, 0, 0)), True),
    ("rgba_mask.jpg", jpeg, "rgba_mask.png", rgba_mask, False),
    ("label38.jpg", jpeg, "label38.png", grey_mask(38), False),
    ("sixteen_bit.jpg", jpeg, "sixteen_bit_mask.png", grey_mask(65535, np.uint16), False),
    ("sixteen_bit_raw.jpg", jpeg, "sixteen_bit_raw_mask.png", grey_mask(1, np.uint16), False),
    ("grey_jpeg_mask.jpg", jpeg, "grey_jpeg_mask_mask.jpg", grey_mask(255, quality=90), False),
    ("red_jpeg_mask.jpg", jpeg, "red_jpeg_mask_mask.jpg", colour_mask((220, 0, 0), quality=90), False),
    ("phone_6.jpg", phone(6), "phone_6_mask.png", grey_mask(255), True),
    ("phone_8.jpg", phone(8), "phone_8_mask.png", one_bit_mask, False),
    ("phone_3.jpg", phone(3), "phone_3_mask.gif", gif_mask, False),
    ("phone_mask_turned.jpg", phone(6), "phone_mask_turned_mask.png", turned_png_mask(6), False),
    ("grey_photo.jpg", grey_photo, "grey_photo_mask.png", grey_mask(1), False),
    ("cmyk_photo.jpg", cmyk_photo, "cmyk_photo_mask.gif", gif_mask, True),
    ("rgba_photo.png", rgba_photo, "rgba_photo_mask.png", colour_mask((0, 255, 0)), False),
    ("bitmap.bmp", plain, "bitmap_mask.bmp", grey_mask(255), False),
    ("scan.tif", plain, "scan_mask.tif", grey_mask(255), True),
    ("my car (1).final.JPG", jpeg, "my car (1).final_mask.PNG", colour_mask((255, 0, 0)), False),
    ("voiture é ü.jpeg", jpeg, "voiture é ü.gif", gif_mask, True),
]


def build_formats(root, pairs):
    """The four-folder layout with one pair in each format of FORMATS. Returns {image name: (the
    picture as displayed, its true mask)}."""
    truth = {}
    for index, (image_name, write_image, mask_name, write_mask, val) in enumerate(FORMATS):
        image, mask = pairs[index % len(pairs)]
        split = "val" if val else "train"
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_masks").mkdir(parents=True, exist_ok=True)
        write_image(image, root / f"{split}_images" / image_name)
        write_mask(mask, root / f"{split}_masks" / mask_name)
        shown = np.asarray(Image.fromarray(image).convert("L").convert("RGB")) if write_image is grey_photo else image
        truth[image_name] = (shown, mask)
    return truth


SOURCES = [pytest.param(real_pairs, id="real", marks=pytest.mark.skipif(not REAL_SAMPLES.is_dir(),
                                                                        reason="../shared/carvana_samples is absent")),
           pytest.param(synthetic_pairs, id="synthetic")]


def scan_all(root):
    samples, problems = [], data_folder.ScanReport()
    for images, masks in data_folder.find_splits(root).values():
        found, skipped = data_folder.scan_pairs(images, masks)
        samples += found
        problems.extend(skipped)
    return samples, problems


def only_along_edges(mask, truth):
    """Whether every pixel where mask and truth differ lies on the truth's outline (JPEG's halved
    colour resolution moves coloured edges by a pixel)."""
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(truth.astype(np.uint8), kernel) != cv2.erode(truth.astype(np.uint8), kernel)
    return not ((mask != truth) & ~edge).any()


@pytest.mark.parametrize("source", SOURCES)
def test_every_format_reads_as_drawn(tmp_path, source):
    truth = build_formats(tmp_path, source())
    samples, problems = scan_all(tmp_path)
    assert problems.skipped == [] and problems.empty_masks == []
    assert sorted(s.image.name for s in samples) == sorted(truth)
    for sample in samples:
        picture, true_mask = truth[sample.image.name]
        image, mask = image_files.read_image(sample.image), image_files.read_mask(sample.mask)
        assert (sample.width, sample.height) == SIZE, sample.image.name  # displayed size, EXIF applied
        assert image.dtype == np.uint8 and image.shape == (*true_mask.shape, 3), sample.image.name
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        if sample.mask.name.startswith("red_jpeg"):
            assert only_along_edges(mask.astype(bool), true_mask) and (mask != true_mask).mean() < 0.001
        else:
            assert np.array_equal(mask, true_mask), sample.mask.name
        # Upright: a turned or mirrored photo would differ by tens of grey levels.
        assert np.abs(image.astype(int) - picture).mean() < 4, sample.image.name
        small_image, small_mask = load_training_pair(sample, (160, 240))  # the reduced JPEG decode
        assert small_image.shape == (160, 240, 3) and small_mask.shape == (160, 240)
        expected = cv2.resize(picture, (240, 160), interpolation=cv2.INTER_AREA)
        assert np.abs(small_image.astype(int) - expected).mean() < 4, sample.image.name
        assert np.abs(small_mask.astype(int) - image_files.shrink_mask(true_mask, (160, 240))).mean() < 1, sample.mask.name


@pytest.fixture(scope="module")
def formats_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    build_formats(root, real_pairs() if REAL_SAMPLES.is_dir() else synthetic_pairs())
    return root


def test_training_and_prediction_run_on_every_format(formats_root, tmp_path, capsys):
    result = train.main(tiny_args(tmp_path, formats_root, 1))
    assert "Skipping" not in capsys.readouterr().err and 0 <= result["best_dice"] <= 1
    status = predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "best.pt"),
                           "--input", str(formats_root / "val_images"), "--output", str(tmp_path / "out")])
    assert status == 0
    for image in data_folder.visible_files(formats_root / "val_images"):
        with Image.open(tmp_path / "out" / f"{image.stem}_mask.png") as written:
            assert written.size == SIZE, image.name  # the photo as displayed


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_every_exif_orientation_is_decoded_as_displayed(tmp_path, orientation, suffix):
    rng = np.random.default_rng(orientation)
    stored = cv2.resize(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8), (96, 64), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[image_files.ORIENTATION] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **({"quality": 98} if suffix == ".jpg" else {}),
                                 **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB")).astype(int)
    assert image_files.image_size(path) == (shown.shape[1], shown.shape[0])
    assert np.abs(image_files.read_image(path) - shown).mean() < 3
    reduced = image_files.read_image(path, image_files.reduced_decode_flag(*image_files.image_size(path), (16, 16)))
    expected = cv2.resize(shown.astype(np.uint8), (reduced.shape[1], reduced.shape[0]), interpolation=cv2.INTER_AREA)
    assert reduced.shape[:2] in ((shown.shape[0] // 2, shown.shape[1] // 2), (shown.shape[0] // 4, shown.shape[1] // 4),
                                 (shown.shape[0] // 8, shown.shape[1] // 8), shown.shape[:2])
    assert np.abs(reduced - expected.astype(int)).mean() < 6


@pytest.mark.skipif(not REAL_SAMPLES.is_dir(), reason="../shared/carvana_samples is absent")
@pytest.mark.parametrize("orientation", [6, 8])
def test_a_full_size_real_photo_turned_by_exif_trains_upright(tmp_path, orientation):
    """1918x1280 as displayed, stored 1280x1918: the reduced decode (1/8) then the turn."""
    photo = REAL_SAMPLES / "train" / "0795e132d090_01.jpg"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    phone(orientation)(image_files.read_image(photo), tmp_path / "images" / "phone.jpg")
    shutil.copy(REAL_SAMPLES / "train_masks" / "0795e132d090_01_mask.gif", tmp_path / "masks" / "phone_mask.gif")
    [sample], problems = data_folder.scan_pairs(tmp_path / "images", tmp_path / "masks")
    assert problems.skipped == [] and (sample.width, sample.height) == (1918, 1280)
    image, mask = load_training_pair(sample, (160, 240))
    original = data_folder.Sample(photo, REAL_SAMPLES / "train_masks" / "0795e132d090_01_mask.gif", 1918, 1280)
    expected_image, expected_mask = load_training_pair(original, (160, 240))
    assert np.abs(image.astype(int) - expected_image).mean() < 3 and np.array_equal(mask, expected_mask)


def test_turn_upright_matches_pil_for_every_orientation():
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    transposes = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                  7: "TRANSVERSE", 8: "ROTATE_90"}  # what PIL's ImageOps.exif_transpose applies
    assert image_files.turn_upright(stored, 1) is stored
    for orientation, name in transposes.items():
        expected = np.asarray(Image.fromarray(stored).transpose(Image.Transpose[name]))
        assert np.array_equal(image_files.turn_upright(stored, orientation), expected), orientation


def test_a_mask_drawn_on_the_unturned_photo_is_named_with_a_hint(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, mask = synthetic_pairs()[0]
    phone(6)(image, tmp_path / "images" / "p.jpg")
    grey_mask(255)(np.rot90(mask), tmp_path / "masks" / "p.png")  # the stored orientation, not the displayed one
    samples, problems = data_folder.scan_pairs(tmp_path / "images", tmp_path / "masks")
    assert samples == [] and len(problems.skipped) == 1
    assert "mask is 320x480 but its image p.jpg is 480x320 (sizes as displayed" in problems.skipped[0][1]


def mask_folder(tmp_path, masks):
    """A folder of 96x64 photos, one per mask given as {file name: pixels}."""
    images, mask_dir = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    mask_dir.mkdir()
    for name, pixels in masks.items():
        jpeg(np.full((64, 96, 3), 128, np.uint8), images / f"{name.rsplit('.', 1)[0]}.jpg")
        if name.endswith(".jpg"):
            Image.fromarray(pixels).save(mask_dir / name, quality=90)
        else:
            Image.fromarray(pixels).save(mask_dir / name)
    return images, mask_dir


def test_files_that_cannot_be_binary_masks_are_skipped_with_the_reason(tmp_path, capsys):
    three = np.zeros((64, 96), np.uint8)
    three[10:30, 10:40], three[35:50, 50:90] = 128, 255  # anti-aliased, or two classes
    no_black = np.full((64, 96, 3), (0, 0, 255), np.uint8)
    no_black[10:30, 10:40] = (255, 255, 255)
    photo = cv2.resize(np.random.default_rng(0).integers(0, 255, (8, 12), dtype=np.uint8), (96, 64),
                       interpolation=cv2.INTER_CUBIC)
    empty = np.zeros((64, 96), np.uint8)
    good = empty.copy()
    good[20:40, 30:60] = 255
    images, masks = mask_folder(tmp_path, {"three.png": three, "no_black.png": no_black, "photo.jpg": photo,
                                           "empty.png": empty, "good.png": good})
    samples, problems = data_folder.scan_pairs(images, masks)
    reasons = {path.name: reason for path, reason in problems.skipped}
    assert reasons["three.png"] == ("not a mask: 3 colours (0, 128, 255); a mask has black background and one "
                                    "car colour (masks of several classes: set NUM_CLASSES)")
    assert reasons["no_black.png"] == ("not a mask: neither of its colours (0, 0, 255) and (255, 255, 255) is "
                                       "black, the background")
    assert re.fullmatch(r"not a mask: \d+% of its pixels are between background and car colour", reasons["photo.jpg"])
    assert sorted(s.image.name for s in samples) == ["empty.jpg", "good.jpg"]  # all-black masks are kept...
    assert problems.empty_masks == [masks / "empty.png"]
    data_folder.print_report(problems)
    err = capsys.readouterr().err
    assert "Skipping 3 file(s)" in err and "1 mask has no car pixels (kept, all background): empty.png" in err
    with pytest.raises(ValueError, match="three.png: not a mask: 3 colours"):  # never decoded as a mask
        image_files.read_mask(masks / "three.png")


def test_palette_masks_go_by_colour_not_index(tmp_path):
    truth = np.zeros((20, 30), bool)
    truth[5:15, 5:20] = True
    inverted = Image.fromarray(np.where(truth, 0, 1).astype(np.uint8), "P")
    inverted.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white: the car; index 1 black
    inverted.save(tmp_path / "inverted.gif")
    assert np.array_equal(image_files.read_mask(tmp_path / "inverted.gif"), truth)
    transparent = Image.fromarray(truth.astype(np.uint8), "P")
    transparent.putpalette([255, 255, 255, 255, 0, 0])
    transparent.save(tmp_path / "transparent.png", transparency=0)  # index 0 white but transparent: background
    assert np.array_equal(image_files.read_mask(tmp_path / "transparent.png"), truth)


def test_one_car_folder_trains_with_a_warned_split_by_photo(tmp_path, capsys):
    synthetic.make_synthetic(tmp_path / "data", cars=1, angles=5, size=(96, 64), progress=False)
    result = train.main(tiny_args(tmp_path, tmp_path / "data", 1))
    err = capsys.readouterr().err
    assert "warning: all 5 photos in" in err and "are of one car" in err and "validation holds out 1 of them" in err
    assert result["last"]["images"] == 1 and 0 <= result["last"]["dice"] <= 1  # trained and validated


def test_a_folder_with_one_usable_photo_is_a_one_line_error(tmp_path):
    synthetic.make_synthetic(tmp_path / "data", cars=1, angles=2, size=(96, 64), progress=False)
    next((tmp_path / "data" / "train").iterdir()).write_bytes(b"")
    with pytest.raises(SystemExit, match="has 1 usable image/mask pair .*training needs at least 2") as error:
        train.main(tiny_args(tmp_path, tmp_path / "data", 1))
    assert "\n" not in str(error.value)


def test_a_misspelt_data_dir_is_a_one_line_error_and_is_not_created(tmp_path):
    with pytest.raises(SystemExit, match=r"DATA_DIR: .*dtaa does not exist; it must hold train/ \+ train_masks/"
                       ) as error:
        train.main(tiny_args(tmp_path, tmp_path / "dtaa", 1))
    assert "\n" not in str(error.value) and not (tmp_path / "dtaa").exists()
    for name in ("a", "b", "c"):
        (tmp_path / "other" / name).mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no data in .*other \(found: 3 folders \(a, b, c\), 0 images\)"):
        train.main(tiny_args(tmp_path, tmp_path / "other", 1))
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["a", "b", "c"]  # nothing written


@pytest.mark.parametrize("images, masks, mask_name", [("images", "masks", "{}.png"), ("imgs", "masks", "{}_mask.gif"),
                                                      ("imgs", "masks", "{}.gif")])
def test_other_repositories_layouts_are_found(tmp_path, images, masks, mask_name):
    for index, (image, mask) in enumerate(synthetic_pairs()[:3]):
        (tmp_path / images).mkdir(exist_ok=True)
        (tmp_path / masks).mkdir(exist_ok=True)
        jpeg(image, tmp_path / images / f"photo{index}.jpg")
        path = tmp_path / masks / mask_name.format(f"photo{index}")
        (gif_mask if path.suffix == ".gif" else grey_mask(255))(mask, path)
    assert data_folder.find_splits(tmp_path) == {"train": (tmp_path / images, tmp_path / masks)}
    samples, problems = data_folder.scan_pairs(tmp_path / images, tmp_path / masks)
    assert problems.skipped == [] and len(samples) == 3


def test_jpeg_with_a_trailer_is_accepted_and_a_cut_one_is_not(tmp_path):
    image = synthetic_pairs()[0][0]
    jpeg(image, tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "trailer.jpg").write_bytes(whole + b"SEFH" + bytes(range(256)) * 8 + b"\xff\xd8SEFT")  # as phones append
    assert image_files.image_problem(tmp_path / "trailer.jpg")[:2] == (None, SIZE)
    assert np.array_equal(image_files.read_image(tmp_path / "trailer.jpg"), image_files.read_image(tmp_path / "whole.jpg"))
    for name, cut in (("half.jpg", whole[: len(whole) // 2]), ("no_end.jpg", whole[:-2])):
        (tmp_path / name).write_bytes(cut)
        assert image_files.image_problem(tmp_path / name)[:2] == ("truncated JPEG (file ends early)", None)


def test_mask_checks_are_kept_between_runs_until_a_mask_changes(tmp_path, synthetic_root, monkeypatch):
    root = shutil.copytree(synthetic_root, tmp_path / "data")
    stored = tmp_path / "cache" / "mask_checks.json"
    checks = data_folder.MaskChecks(stored)
    first = data_folder.scan_pairs(root / "train", root / "train_masks", checks=checks)
    checks.save()
    decoded, decode = [], image_files.decode_mask

    def counted(path):
        decoded.append(path)
        return decode(path)

    monkeypatch.setattr(image_files, "decode_mask", counted)
    assert data_folder.scan_pairs(root / "train", root / "train_masks", checks=data_folder.MaskChecks(stored)) == first
    assert decoded == []  # every mask known: none decoded again
    changed = first[0][0].mask
    gif_mask(np.zeros((128, 192), bool), changed)  # redrawn, all background: another size
    _, problems = data_folder.scan_pairs(root / "train", root / "train_masks", checks=data_folder.MaskChecks(stored))
    assert decoded == [changed] and problems.empty_masks == [changed]


@pytest.mark.parametrize("suffix", [".png", ".gif", ".bmp"])
def test_reduced_decoding_is_for_jpeg_only(tmp_path, suffix):
    image, _ = synthetic_pairs()[0]
    path = tmp_path / f"car{suffix}"
    Image.fromarray(image).save(path)
    whole = image_files.shrink_image(image_files.read_image(path), (40, 60))
    assert np.array_equal(image_files.load_image(path, (40, 60)), whole)  # not cv2's reduced read and its filter
    jpeg = tmp_path / "car.jpg"
    Image.fromarray(image).save(jpeg, quality=95)
    reduced = image_files.load_image(jpeg, (40, 60))
    assert not np.array_equal(reduced, image_files.shrink_image(image_files.read_image(jpeg), (40, 60)))


def test_a_32_bit_float_photo_is_refused_naming_why_not_read_as_black(tmp_path):
    image, mask = synthetic_pairs()[0]
    path = tmp_path / "car.tif"
    Image.fromarray(image.mean(axis=2).astype(np.float32) / 255, mode="F").save(path)
    assert image_files.image_problem(path).problem == ("a 32-bit floating-point TIFF: save it with 8 or 16 bits per "
                                                       "channel")
    Image.fromarray(mask.astype(np.float32), mode="F").save(tmp_path / "mask.tif")  # a float mask still reads
    assert np.array_equal(image_files.read_mask(tmp_path / "mask.tif"), mask.astype(np.uint8))
