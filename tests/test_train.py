import itertools
import math
from pathlib import Path

import pytest
import torch

import settings
import train
from conftest import split_of, tiny_args
from utils import load_checkpoint


def test_settings_take_typed_overrides():
    config, given = train.parse_settings(["--BATCH_SIZE=4", "--AMP=false", "--FEATURES=8,16", "--LEARNING_RATE=3e-4",
                                          "--DEVICE=cpu"])
    assert (config["BATCH_SIZE"], config["AMP"], config["FEATURES"]) == (4, False, (8, 16))
    assert config["LEARNING_RATE"] == 3e-4 and config["DEVICE"] == "cpu" and config["NUM_EPOCHS"] == train.NUM_EPOCHS
    assert given == {"BATCH_SIZE", "AMP", "FEATURES", "LEARNING_RATE", "DEVICE"}


@pytest.mark.parametrize("argument, message", [
    ("--BATCH_SIZ=4", "unknown setting --BATCH_SIZ"),
    ("--BATCH_SIZE=four", "--BATCH_SIZE expects an integer, got 'four'"),
    ("--BATCH_SIZE=1.5", "expects an integer"),
    ("--AMP=maybe", "--AMP expects true or false"),
    ("--FEATURES=8,x", "comma-separated integers"),
    ("--NUM_EPOCHS=0", "NUM_EPOCHS must be at least 1"),
    ("--VAL_FRACTION=1.5", "VAL_FRACTION must be between 0 and 1"),
    ("BATCH_SIZE=4", "expected --NAME=value"),
])
def test_bad_settings_are_one_line_errors(argument, message):
    with pytest.raises(SystemExit, match=message) as error:
        train.parse_settings([argument])
    assert "\n" not in str(error.value)


def test_every_setting_has_a_comment_in_the_fenced_block():
    source = Path(train.__file__).read_text()
    block = source.split("# ---- settings")[1].split("# ----")[0]
    for name in train.SETTING_NAMES:
        line = next(line for line in block.splitlines() if line.startswith(f"{name} ="))
        assert "#" in line, name


def test_training_writes_checkpoints_and_pictures(trained):
    tmp, result = trained
    last = load_checkpoint(tmp / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp / "checkpoints" / "best.pt")
    assert last["epoch"] == 8 and 1 <= best["epoch"] <= 8
    for state in (last, best):
        assert state["model_args"]["features"] == (8, 16, 32)
        assert state["image_size"] == (64, 96) and state["threshold"] == 0.5
        assert {"optimizer", "scaler", "best_dice", "config"} <= set(state)
        assert state["best_dice"] == pytest.approx(result["best_dice"])
    assert 0 <= result["best_dice"] <= 1 and not math.isnan(result["last"]["loss"])
    pictures = sorted((tmp / "saved_images" / "checkpoints").glob("pred_*.png"))
    assert len(pictures) == 4


def test_prediction_pictures_show_four_cars_under_titles_in_the_runs_own_folder(trained):
    import numpy as np
    from PIL import Image

    tmp, result = trained
    pictures = sorted((tmp / "saved_images" / "checkpoints").glob("pred_*.png"))
    cars = {picture.stem.removeprefix("pred_").rsplit("_", 1)[0] for picture in pictures}
    _, val = split_of(result["config"])
    assert len(cars) == min(4, len({sample.image.stem.rsplit("_", 1)[0] for sample in val}))
    with Image.open(pictures[0]) as picture:
        pixels = picture.convert("L")
        assert picture.size[1] == 64 + 26 + 8  # the panels under a title strip
        assert np.asarray(pixels.crop((0, 0, picture.size[0], 26))).min() < 100  # title text drawn


def test_a_second_run_keeps_its_pictures_apart_and_stale_ones_go(tmp_path, synthetic_root):
    pictures = tmp_path / "saved_images"
    (pictures / "checkpoints").mkdir(parents=True)
    (pictures / "checkpoints" / "pred_not_in_this_split.png").write_bytes(b"old")
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    train.main([*tiny_args(tmp_path, synthetic_root, 1), f"--CHECKPOINT_DIR={tmp_path / 'second'}", "--SEED=5"])
    assert not (pictures / "checkpoints" / "pred_not_in_this_split.png").exists()
    assert len(list((pictures / "checkpoints").glob("pred_*.png"))) == 4
    assert len(list((pictures / "second").glob("pred_*.png"))) == 4
    assert (pictures / "second" / "training_curves.png").is_file()


def test_checkpoint_and_cache_folders_stay_out_of_git(tmp_path, synthetic_root):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    train.main([*tiny_args(tmp_path, synthetic_root, 1), f"--CHECKPOINT_DIR={tmp_path / 'runs' / 'first try'}",
                f"--SAVED_IMAGES={tmp_path.parent / (tmp_path.name + '-pictures')}"])
    assert (tmp_path / "runs" / "first try" / "last.pt").is_file() and (tmp_path / "cache").is_dir()
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status == ""


def test_killed_run_resumes_where_it_stopped(tmp_path, synthetic_root, capsys):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    first = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    result = train.main(tiny_args(tmp_path, synthetic_root, 2, "--LOAD_MODEL=true"))
    out = capsys.readouterr().out
    assert "resumed from" in out and "1 epoch done" in out
    assert "epoch 1/2:" not in out and "epoch 2/2:" in out
    second = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert second["epoch"] == 2 and second["best_dice"] >= first["best_dice"]
    assert second["optimizer"]["state"][0]["step"] == 2 * first["optimizer"]["state"][0]["step"]
    assert result["best_dice"] == second["best_dice"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, synthetic_root):
    with pytest.raises(SystemExit, match="cannot resume.*holds no checkpoint \\(last.pt or best.pt\\)"):
        train.main(tiny_args(tmp_path, synthetic_root, 1, "--LOAD_MODEL=true"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_root, monkeypatch):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    monkeypatch.setattr(train, "segmentation_loss", lambda logits, target, *kind: logits.sum() * math.nan)
    with pytest.raises(SystemExit, match=r"loss became nan at epoch 2, step 1.*Last good checkpoint: .*last\.pt"):
        train.main(tiny_args(tmp_path, synthetic_root, 2, "--LOAD_MODEL=true"))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1


def test_empty_data_dir_runs_the_demo_on_generated_cars(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "DEMO_DATA", {"cars": 3, "size": (96, 64), "seed": 0})
    monkeypatch.setattr(train, "DEMO_SETTINGS", {"FEATURES": (4, 8), "NUM_EPOCHS": 1})
    monkeypatch.chdir(tmp_path)  # DATA_DIR left at its default, data/: the demo runs only there
    args = [a for a in tiny_args(tmp_path, "data", 1) if not a.startswith(("--DATA_DIR", "--FEATURES", "--NUM_EPOCHS"))]
    result = train.main(args)
    out = capsys.readouterr().out
    assert "No training images" in out and "kaggle competitions download" in out
    assert "Demo settings in use: FEATURES=(4, 8), NUM_EPOCHS=1" in out
    assert len(list((tmp_path / "data" / "synthetic" / "train").glob("*.jpg"))) == 48
    assert result["config"]["FEATURES"] == (4, 8)
    mtime = (tmp_path / "data" / "synthetic" / "train_masks").stat().st_mtime_ns
    train.main([*args, "--LOAD_MODEL=true"])  # generated once: the second run reuses it
    assert "Generating" not in capsys.readouterr().out
    assert (tmp_path / "data" / "synthetic" / "train_masks").stat().st_mtime_ns == mtime


def test_the_demo_of_a_resnet_keeps_its_own_widths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "DEMO_DATA", {"cars": 1, "size": (96, 64), "seed": 0})
    monkeypatch.chdir(tmp_path)
    config = train.prepare_data(*train.parse_settings(["--ENCODER=resnet18", "--ENCODER_WEIGHTS=none"]))
    assert "FEATURES" not in capsys.readouterr().out.split("Demo settings in use:")[1]
    assert config["FEATURES"] == train.FEATURES and config["BATCH_SIZE"] == train.DEMO_SETTINGS["BATCH_SIZE"]


def test_no_data_without_demo_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_args(tmp_path, "data", 1) if not a.startswith("--DATA_DIR")]
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match=r"no data in data \(found: 0 folders, 0 images\)"):
        train.main([*args, "--DEMO=false"])


def test_learning_rate_decays_from_peak_to_one_percent():
    config = {"LEARNING_RATE": 1e-3, "WARMUP": 0}
    rates = [train.learning_rate(config, step, 100) for step in (0, 50, 100)]
    assert rates == pytest.approx([1e-3, 0.505e-3, 1e-5])


def test_learning_rate_rises_linearly_over_the_warmup_then_follows_the_cosine():
    config = {"LEARNING_RATE": 1e-3, "WARMUP": 0.1}
    rates = [train.learning_rate(config, step, 200) for step in range(200)]
    assert rates[0] == pytest.approx(1e-3 / 20 * train.learning_rate({**config, "WARMUP": 0}, 0, 200) / 1e-3)
    assert all(later > earlier for earlier, later in itertools.pairwise(rates[:20]))  # rising for 20 steps
    assert rates[19:] == pytest.approx([train.learning_rate({**config, "WARMUP": 0}, step, 200) for step in range(19, 200)])


def test_importing_train_does_nothing(tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    importlib.reload(train)
    assert list(tmp_path.iterdir()) == []
    assert torch.is_tensor(torch.zeros(1))


def test_help_gives_every_setting_its_meaning_and_a_misspelt_name_a_suggestion(capsys):
    with pytest.raises(SystemExit) as done:
        train.parse_settings(["--help"])
    assert done.value.code == 0
    lines = {line.split()[0].split("=")[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  --")}
    assert set(lines) == {f"--{name}" for name in train.SETTING_NAMES}
    assert "passes over the training images" in lines["--NUM_EPOCHS"] and "Adam" in lines["--LEARNING_RATE"]
    with pytest.raises(SystemExit, match=r"unknown setting --NUM_EPOCH; did you mean --NUM_EPOCHS\?"):
        train.parse_settings(["--NUM_EPOCH=3"])
    with pytest.raises(SystemExit, match=r"unknown setting --learning_rate; did you mean --LEARNING_RATE\?"):
        train.parse_settings(["--learning_rate=3"])


def test_runs_whose_checkpoint_folders_share_a_name_keep_their_pictures_apart(tmp_path, synthetic_root):
    pictures = {}
    for run, seed in (("r1", 1), ("r2", 2)):
        arguments = [*tiny_args(tmp_path, synthetic_root, 1), f"--CHECKPOINT_DIR={tmp_path / run / 'checkpoints'}",
                     f"--SEED={seed}"]
        folder = settings.pictures_folder(train.parse_settings(arguments)[0])
        assert folder == tmp_path / "saved_images" / run / "checkpoints"
        train.main(arguments)
        pictures[run] = {path.name: path.read_bytes() for path in folder.glob("*.png")}
    assert len(pictures["r1"]) == len(pictures["r2"]) == 6  # 4 predictions, the curves, the gallery
    first = settings.pictures_folder(train.parse_settings([*tiny_args(tmp_path, synthetic_root, 1),
                                                            f"--CHECKPOINT_DIR={tmp_path / 'r1' / 'checkpoints'}"])[0])
    assert {path.name: path.read_bytes() for path in first.glob("*.png")} == pictures["r1"]  # r2 deleted nothing


def test_a_relative_and_an_absolute_checkpoint_folder_never_share_pictures(tmp_path, monkeypatch):
    """tmp/x from the current folder and /tmp/x are two runs: two picture folders."""
    monkeypatch.chdir(tmp_path)
    inside = settings.pictures_folder({"SAVED_IMAGES": "saved_images", "CHECKPOINT_DIR": "tmp/x"})
    elsewhere = settings.pictures_folder({"SAVED_IMAGES": "saved_images", "CHECKPOINT_DIR": "/tmp/x"})
    assert inside == Path("saved_images/tmp/x") and elsewhere == Path("saved_images/elsewhere/tmp/x")


def test_a_newcomers_commands_in_order_demo_predict_own_folder_its_predict(tmp_path, monkeypatch, synthetic_root):
    import shutil

    import predict

    monkeypatch.setattr(train, "DEMO_DATA", {"cars": 3, "size": (96, 64), "seed": 0})
    monkeypatch.setattr(train, "DEMO_SETTINGS", {**train.DEMO_SETTINGS, "FEATURES": (8, 16), "NUM_EPOCHS": 4})
    monkeypatch.chdir(tmp_path)  # a fresh clone: data/ empty, nothing trained yet
    small = ["--IMAGE_HEIGHT=32", "--IMAGE_WIDTH=48", "--NUM_WORKERS=0"]
    train.main(small)  # python train.py: the demo
    assert (tmp_path / "checkpoints" / "demo" / "best.pt").is_file()
    assert predict.main(["--checkpoint", "checkpoints/demo/best.pt", "--input", "checkpoints/demo/val_files.txt",
                         "--masks", "data/synthetic/train_masks", "--workers", "0"]) == 0
    shutil.copytree(synthetic_root, tmp_path / "photos")
    own = ["--DATA_DIR=photos", "--FEATURES=8,16", "--NUM_EPOCHS=4", "--BATCH_SIZE=4", "--LEARNING_RATE=0.005"]
    train.main([*own, *small])  # your own folder, right after the demo
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["config"]["DATA_DIR"] == "photos"
    assert predict.main(["--checkpoint", "checkpoints/best.pt", "--input", "photos/train", "--workers", "0"]) == 0
    assert len(list((tmp_path / "saved_images" / "checkpoints" / "best_predictions").glob("*_mask.png"))) == 16
    assert train.main(["--LOAD_MODEL=true", "--NUM_EPOCHS=5", *small])["config"]["DATA_DIR"] == "photos"  # its resume


def test_every_readme_section_the_code_points_to_exists():
    import re

    from conftest import ROOT

    headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("#")}
    pointed = {match for path in [*ROOT.glob("*.py"), ROOT / "Carvana_UNet.ipynb"]
               for match in re.findall(r"README[:,] ([A-Z][\w ',-]*\w)", path.read_text())}
    assert "Your data" in pointed and pointed <= headings, pointed - headings
