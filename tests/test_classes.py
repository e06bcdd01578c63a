"""More than one class (NUM_CLASSES): masks read as label values, palette entries or colours, trained,
scored per class and written back in the training masks' encoding."""
import csv
import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_distributed import torchrun
from torch.utils.data import DataLoader

import classes
import data_folder
import image_files
import predict
import synthetic
import train
import utils
from conftest import LEARNS, ROOT, tiny_args
from dataset import CarvanaDataset, val_transform
from memory import step_bytes

LABELS = np.zeros((40, 60), np.uint8)
LABELS[10:30, 10:50], LABELS[25:30, 10:50] = 1, 2  # a body, and its lowest rows a second class
PALETTE = [0, 0, 0, 0, 128, 0, 200, 0, 0]


def save_labels(path, labels=LABELS, kind="palette"):
    if kind == "palette":
        image = Image.fromarray(labels, "P")
        image.putpalette(PALETTE)
    elif kind == "values":
        image = Image.fromarray(labels * 7)
    else:
        image = Image.fromarray(np.array(PALETTE, np.uint8).reshape(-1, 3)[labels])
    image.save(path)
    return path


@pytest.fixture(scope="module")
def labelled_root(tmp_path_factory):
    """4 cars x 4 angles whose masks are palette PNGs of background, body, windows and wheels."""
    root = tmp_path_factory.mktemp("classes")
    synthetic.make_synthetic(root, cars=4, angles=4, size=(192, 128), progress=False, classes=True)
    return root


@pytest.mark.parametrize("kind, codes", [("palette", (0, 0x008000, 0xC80000)), ("values", (0, 7, 14)),
                                         ("colours", (0, 0x008000, 0xC80000))])
def test_masks_of_each_encoding_are_read_as_classes_and_written_back_alike(tmp_path, kind, codes):
    path = save_labels(tmp_path / "mask.png", kind=kind)
    checked = image_files.mask_problem(path, classes=3)
    assert checked.problem is None and checked.codes == codes and checked.size == (60, 40)
    assert checked.kind == ("values" if kind == "values" else "colours")
    found = classes.encoding(checked.kind, codes, path)
    assert np.array_equal(found.read(path), LABELS)
    (tmp_path / "out.png").write_bytes(found.png(LABELS))
    with Image.open(tmp_path / "out.png") as written, Image.open(path) as original:
        assert written.mode == original.mode
        assert np.array_equal(np.asarray(written), np.asarray(original))
        if kind == "palette":
            assert written.getpalette()[:9] == PALETTE
    # Read as car and background, the same file is refused with the way out.
    assert "set NUM_CLASSES" in image_files.mask_problem(path).problem


@pytest.mark.parametrize("kind", ["transparent palette", "16-bit values"])
def test_masks_are_written_back_with_their_transparency_and_bit_depth(tmp_path, kind):
    if kind == "16-bit values":
        Image.fromarray(LABELS.astype(np.uint16)).save(tmp_path / "mask.png")  # 0, 1, 2 in 16 bits
    else:  # a white background that the file declares transparent
        image = Image.fromarray(LABELS, "P")
        image.putpalette([255, 255, 255, *PALETTE[3:]])
        image.save(tmp_path / "mask.png", transparency=0)
    checked = image_files.mask_problem(tmp_path / "mask.png", classes=3)
    found = classes.encoding(checked.kind, checked.codes, tmp_path / "mask.png")
    (tmp_path / "out.png").write_bytes(found.png(LABELS))
    with Image.open(tmp_path / "out.png") as written, Image.open(tmp_path / "mask.png") as original:
        assert written.mode == original.mode and written.info.get("transparency") == original.info.get("transparency")
    assert np.array_equal(found.read(tmp_path / "out.png"), LABELS)


def test_lossy_masks_and_stray_values_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.array(PALETTE, np.uint8).reshape(-1, 3)[LABELS]).save(tmp_path / "mask.jpg")
    assert "JPEG mask" in image_files.mask_problem(tmp_path / "mask.jpg", classes=3).problem
    stray = LABELS.copy()
    stray[0, 0] = 3
    path = save_labels(tmp_path / "stray.png", stray, "values")
    with pytest.raises(ValueError, match=r"stray.png: holds 21, none of the classes \(0, 7, 14\)"):
        classes.Classes("values", (0, 7, 14)).read(path)


def test_masks_without_black_or_of_background_alone_are_judged_in_one_line(labelled_root, tmp_path):
    train_samples, val_samples = data_folder.training_split(labelled_root, 0.25, 1, classes=4)
    # A mask of background alone saved as grey, among colour masks, is of either kind.
    empty = save_labels(tmp_path / "empty.png", np.zeros((128, 192), np.uint8), "values")
    blank = data_folder.check_pair(train_samples[0].image, empty, classes=4)
    assert blank.sample.kind == "values" and blank.empty_mask
    found, _ = classes.find_classes([*train_samples, blank.sample], val_samples, 4)
    assert np.array_equal(found.read(empty), np.zeros((128, 192)))
    # Masks with no background colour: background is counted, and the line says what was found.
    no_black = [dataclasses.replace(s, codes=tuple(c for c in s.codes if c)) for s in train_samples]
    with pytest.raises(SystemExit, match=r"hold 4 classes with the background: \(0, 0, 0\) \(0 masks\)"):
        classes.find_classes(no_black, val_samples, 5)


def test_class_shares_are_area_averages_that_add_up_to_one():
    shares = classes.class_shares(LABELS, (20, 30), 3)
    assert shares.shape == (20, 30, 3) and shares.dtype == np.uint8
    assert np.abs(shares.astype(int).sum(2) - 255).max() <= 2
    assert shares[7, 15, 1] == 255 and shares[0, 0, 0] == 255  # inside the body; background
    assert 0 < shares[12, 15, 2] < 255  # the row where the second class starts: half of each


def test_classes_must_number_num_classes_and_validation_keeps_only_known_ones(labelled_root, capsys):
    train_samples, val_samples = data_folder.training_split(labelled_root, 0.25, 1, classes=4)
    found, kept = classes.find_classes(train_samples, val_samples, 4)
    assert found.codes == (0, 0x008000, 0x800000, 0x808000) and found.indices == (0, 2, 1, 3)
    assert len(kept) == len(val_samples)
    with pytest.raises(SystemExit) as error:
        classes.find_classes(train_samples, val_samples, 3)
    message = str(error.value)
    assert "NUM_CLASSES=3, but the 12 training masks hold 4 classes" in message and "set NUM_CLASSES=4" in message
    assert "\n" not in message
    odd = dataclasses.replace(val_samples[0], codes=(0, 0x123456))
    _, kept = classes.find_classes(train_samples, [odd, *val_samples[1:]], 4)
    assert odd not in kept and len(kept) == len(val_samples) - 1
    assert f"{odd.mask}: holds (18, 52, 86), none of the training masks' classes" in capsys.readouterr().err


def test_multiclass_loss_is_low_for_the_truth_and_trains_every_class():
    labels = torch.from_numpy(LABELS.astype(np.int64))[None]
    shares = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    right, wrong = shares * 20 - 10, shares.flip(1) * 20 - 10
    for kind in ("lovasz", "dice"):
        assert utils.segmentation_loss(right, shares, kind) < 0.01
        assert utils.segmentation_loss(wrong, shares, kind) > 1
    logits = torch.zeros_like(shares, requires_grad=True)
    utils.segmentation_loss(logits, shares).backward()
    assert all(logits.grad[:, k].abs().sum() > 0 for k in range(3))


class LabelModel(torch.nn.Module):
    """Logits that pick the class written in channel 0 of the input (label / 10)."""

    def __init__(self):
        super().__init__()
        self.model_args = {"out_channels": 3}
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        labels = (x[:, 0] * 10).round().long()
        return torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 10 + self.weight


def test_evaluation_scores_each_class_and_their_mean():
    truth = torch.from_numpy(LABELS.astype(np.int64))
    predicted = truth.clone()
    predicted[25:30, 10:30] = 1  # half of class 2 taken for class 1
    x = torch.zeros(1, 3, 40, 60)
    x[0, 0] = predicted / 10
    y = torch.nn.functional.one_hot(truth, 3).permute(2, 0, 1).float()[None]

    class Loader(list):
        dataset = None

    metrics = utils.evaluate(Loader([(x, y)]), LabelModel(), torch.device("cpu"))
    class1 = 2 * 600 / (600 + 700)  # 15 x 40 true pixels, plus 5 x 20 more predicted
    class2 = 2 * 100 / (200 + 100)
    assert metrics["class_dice"] == pytest.approx([class1, class2])
    assert metrics["class_iou"] == pytest.approx([600 / 700, 100 / 200])
    assert metrics["dice"] == pytest.approx((class1 + class2) / 2)
    assert metrics["pixel_accuracy"] == pytest.approx(1 - 100 / 2400)


def test_a_labelled_folder_trains_predicts_in_its_own_palette_and_scores_per_class(labelled_root, tmp_path, capsys):
    result = train.main(tiny_args(tmp_path, labelled_root, 8, *LEARNS, "--NUM_CLASSES=4"))
    printed = capsys.readouterr().out
    assert "per class: colour (0, 128, 0) Dice" in printed and "colour (128, 128, 0) Dice" in printed
    assert len(result["last"]["class_dice"]) == 3
    # 8 short epochs of 12 photos at 64x96 (here 0.71, 0.46 and 0.86): every class is being learnt.
    assert result["best_dice"] > 0.5 and min(result["last"]["class_dice"]) > 0.3
    state = utils.load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["classes"]["codes"] == [0, 0x008000, 0x800000, 0x808000]
    assert state["model_args"]["out_channels"] == 4
    rows = list(csv.DictReader((tmp_path / "checkpoints" / "history.csv").open()))
    assert all(len(row["class_dice"].split()) == 3 for row in rows)

    output = tmp_path / "predictions"
    assert predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "best.pt"), "--input",
                         str(tmp_path / "checkpoints" / "val_files.txt"), "--masks", str(labelled_root / "train_masks"),
                         "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "of the classes' mean" in printed and "per class: colour (0, 128, 0) Dice" in printed
    masks = sorted(output.glob("*_mask.png"))
    assert masks
    with Image.open(masks[0]) as written:
        assert written.mode == "P" and written.size == (192, 128)
        assert written.getpalette()[:12] == synthetic.CLASS_PALETTE
        assert set(np.unique(np.asarray(written))) <= {0, 1, 2, 3}

    # True masks of another kind are named with the reason.
    grey = tmp_path / "grey"
    grey.mkdir()
    for mask in (labelled_root / "train_masks").glob("*.png"):
        save_labels(grey / mask.name, np.zeros((128, 192), np.uint8) + 1, "values")
    predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "best.pt"), "--input",
                  str(tmp_path / "checkpoints" / "val_files.txt"), "--masks", str(grey), "--no-images",
                  "--output", str(tmp_path / "grey_scores")])
    assert "(holds label values, the classes are colours)" in capsys.readouterr().err

    # A resume keeps the run's NUM_CLASSES without being told.
    resumed = train.main(tiny_args(tmp_path, labelled_root, 9, *LEARNS, "--LOAD_MODEL=true"))
    assert resumed["config"]["NUM_CLASSES"] == 4 and len(resumed["last"]["class_dice"]) == 3
    capsys.readouterr()

    # A Kaggle submission holds car masks: one line, nothing written.
    status = predict.main(["--checkpoint", str(tmp_path / "checkpoints" / "best.pt"), "--input",
                           str(labelled_root / "train"), "--submission", str(tmp_path / "s.csv"), "--no-images"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "predicts 4 classes" in error and "\n" not in error
    assert not (tmp_path / "s.csv").exists()


def test_a_folder_with_another_count_of_classes_stops_in_one_line(labelled_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        train.main(tiny_args(tmp_path, labelled_root, 1, "--NUM_CLASSES=3"))
    assert "set NUM_CLASSES=4" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_the_memory_count_knows_the_output_classes():
    one = step_bytes({"features": (4, 8)}, (32, 48))[1]
    four = step_bytes({"features": (4, 8), "out_channels": 4}, (32, 48))[1]
    assert four > one


def test_torchrun_scores_each_class_as_one_process_does(labelled_root, tmp_path):
    args = tiny_args(tmp_path, labelled_root, 2, "--NUM_CLASSES=4", "--AMP=false", "--VAL_FRACTION=0.25")
    run = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *args],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = [float(dice) for dice in re.findall(r"Dice (\d\.\d{4}) IoU", run.stdout)[-3:]]
    state = utils.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    found = classes.Classes.from_dict(state["classes"])
    _, val_samples = data_folder.training_split(labelled_root, 0.25, 42, classes=4)
    images = CarvanaDataset(val_samples, val_transform(), (32, 48), classes=found)
    metrics = utils.evaluate(DataLoader(images, batch_size=4), utils.model_from_checkpoint(state), torch.device("cpu"))
    assert printed == pytest.approx(metrics["class_dice"], abs=1e-4)


def test_the_class_split_tool_gives_the_lowest_third_of_each_car_its_own_class(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from class_split import three_classes

    mask = np.zeros((40, 60), np.uint8)
    mask[10:40, 5:20] = 1  # 30 rows: the last 10 are its lowest third
    labels = three_classes(mask)
    assert (labels[10:30, 5:20] == 1).all() and (labels[30:40, 5:20] == 2).all()
    assert (labels[mask == 0] == 0).all()
