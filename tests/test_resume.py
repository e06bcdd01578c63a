"""Nothing lost: resumes that continue the same run, checkpoints that stay good, settings checked up front."""
import math
import subprocess
import sys

import pytest
import torch

import resume
import train
from conftest import damage, tiny_args
from utils import all_finite, load_checkpoint


def killed_after_first_epoch(monkeypatch):
    """Make the next train.main die right after epoch 1's checkpoints are on disk, as kill -9 would."""
    real = train.record_epoch

    def record_then_die(config, epoch, *args):
        real(config, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "record_epoch", record_then_die)


def weights(path):
    state = load_checkpoint(path)
    return state["training_model"], state["model"]


def assert_same_weights(first, second):
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_weights(tmp_path, synthetic_root, monkeypatch):
    whole = tiny_args(tmp_path / "whole", synthetic_root, 3)
    train.main(whole)
    pieces = tiny_args(tmp_path / "pieces", synthetic_root, 3)
    with monkeypatch.context() as patch:
        killed_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train.main(pieces)
    assert load_checkpoint(tmp_path / "pieces" / "checkpoints" / "last.pt")["epoch"] == 1
    train.main([*pieces, "--LOAD_MODEL=true"])
    assert_same_weights(weights(tmp_path / "whole" / "checkpoints" / "last.pt"),
                        weights(tmp_path / "pieces" / "checkpoints" / "last.pt"))
    rows = (tmp_path / "pieces" / "checkpoints" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2", "3"]


def test_a_run_killed_after_its_first_best_pt_and_before_last_pt_resumes_from_best_pt(tmp_path, synthetic_root, capsys):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    (tmp_path / "checkpoints" / "last.pt").unlink()  # the kill: best.pt saved, last.pt not yet linked
    train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    assert f"resumed from {tmp_path / 'checkpoints' / 'best.pt'}: 1 epoch done" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2
    rows = (tmp_path / "checkpoints" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]


def test_a_fresh_run_into_an_earlier_runs_folder_stops_and_keeps_it(tmp_path, synthetic_root):
    args = tiny_args(tmp_path, synthetic_root, 1)
    train.main(args)
    best = tmp_path / "checkpoints" / "best.pt"
    before = best.read_bytes()
    with pytest.raises(SystemExit, match="holds an earlier run.*--LOAD_MODEL=true.*another --CHECKPOINT_DIR") as error:
        train.main(args)
    assert "\n" not in str(error.value)
    assert best.read_bytes() == before and len((tmp_path / "checkpoints" / "history.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("first, second", [(["--AMP_DTYPE=bfloat16"], ["--AMP_DTYPE=float16"]),
                                           (["--AMP=false"], ["--AMP=true", "--AMP_DTYPE=float16"]),
                                           (["--AMP_DTYPE=float16"], ["--AMP=false"])])
def test_resume_across_mixed_precision_types_continues(tmp_path, synthetic_root, first, second, capsys):
    train.main([*tiny_args(tmp_path, synthetic_root, 1), *first])
    result = train.main([*tiny_args(tmp_path, synthetic_root, 2), *second, "--LOAD_MODEL=true"])
    assert "now" in capsys.readouterr().out  # says the type changed
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2 and result["last"]["images"] > 0


def test_non_finite_weights_are_never_saved(tmp_path, synthetic_root, monkeypatch):
    """The loss check runs before each update, so an update that overflows on an epoch's last step
    is caught by the check of the weights before anything is saved."""
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    real = train.train_one_epoch

    def last_update_overflows(loader, state, *args):
        loss = real(loader, state, *args)
        with torch.no_grad():
            next(state.model.parameters()).fill_(math.inf)
        return loss

    monkeypatch.setattr(train, "train_one_epoch", last_update_overflows)
    with pytest.raises(SystemExit, match=r"weights became non-finite during epoch 2.*Last good checkpoint: .*last\.pt"):
        train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / "checkpoints" / name)
        assert state["epoch"] == 1 and all_finite(state["model"].values())
        assert all_finite(state["training_model"].values())


@pytest.mark.parametrize("argument, message", [
    ("--THRESHOLD=1.5", "THRESHOLD must be between 0 and 1"),
    ("--THRESHOLD=0", "THRESHOLD must be between 0 and 1"),
    ("--SEED=-1", "SEED must be between 0 and 2\\*\\*32 - 1"),
    ("--NUM_WORKERS=-1", "NUM_WORKERS must be auto or a count"),
    ("--NUM_WORKERS=many", "--NUM_WORKERS expects auto or a count"),
    ("--FEATURES=", "FEATURES must be one or more positive channel counts"),
    ("--FEATURES=8,0", "FEATURES must be one or more positive channel counts"),
    ("--DEVICE=gpu", "DEVICE: unknown device 'gpu'"),
    ("--DEVICE=cuda:99", "DEVICE: device 'cuda:99' does not exist here"),
    ("--EMA_DECAY=1", "EMA_DECAY must be at least 0 and below 1"),
    ("--WARMUP=1", "WARMUP must be at least 0 and below 1"),
    ("--LOSS=focal", "LOSS must be lovasz or dice"),
    ("--AMP_DTYPE=half", "AMP_DTYPE must be auto, float16 or bfloat16"),
    ("--LEARNING_RATE=0", "LEARNING_RATE must be a positive number"),
    ("--IMAGE_HEIGHT=8", "IMAGE_HEIGHT and IMAGE_WIDTH must be at least 16 for a 4-level UNet"),
    ("--CHECKPOINT_DIR=", "CHECKPOINT_DIR must name a folder"),
])
def test_every_bad_setting_is_one_line_before_anything_runs(argument, message):
    with pytest.raises(SystemExit, match=message) as error:
        train.parse_settings([argument])
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_a_one_line_error_from_the_command_line(tmp_path):
    run = subprocess.run([sys.executable, train.__file__, "--DEVICE=cuda"], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "error: DEVICE: device 'cuda' does not exist here (no CUDA device); use auto or cpu"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_num_workers_auto_is_none_on_a_cpu_with_the_cache_and_some_for_a_gpu(monkeypatch):
    config = {"NUM_WORKERS": "auto"}
    assert train.loader_workers(config, torch.device("cpu"), cached=True) == 0
    monkeypatch.setattr(train, "available_cores", lambda: 12)
    assert train.loader_workers(config, torch.device("cuda"), cached=True) == 8
    assert train.loader_workers(config, torch.device("cpu"), cached=False) == 2
    assert train.loader_workers({"NUM_WORKERS": 3}, torch.device("cpu"), cached=True) == 3


def test_resuming_another_runs_model_says_so(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    with pytest.raises(SystemExit, match=r"cannot resume.*another run's model \(FEATURES=4,8, this run asks for 4,8,16\)"):
        train.main([*tiny_args(tmp_path, synthetic_root, 2), "--FEATURES=4,8,16", "--LOAD_MODEL=true"])


@pytest.mark.parametrize("changed", ["--SEED=7", "--HEAD_LR_FACTOR=1", "--VAL_FRACTION=0.5", "--LOSS=dice"])
def test_a_resume_that_would_change_the_split_model_or_optimizer_is_refused(tmp_path, synthetic_root, changed):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    name = changed[2:].split("=")[0]
    with pytest.raises(SystemExit, match=rf"cannot resume.*holds another run's settings \({name}=.*this run asks for"
                                         rf".*another --CHECKPOINT_DIR") as error:
        train.main([*tiny_args(tmp_path, synthetic_root, 2), changed, "--LOAD_MODEL=true"])
    assert "\n" not in str(error.value) and (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_a_resume_keeps_the_runs_own_settings_and_length_when_they_are_not_given(tmp_path, synthetic_root, capsys):
    first = tiny_args(tmp_path, synthetic_root, 2, "--SEED=3", "--EMA_DECAY=0.5")
    with pytest.MonkeyPatch.context() as patch:
        killed_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train.main(first)
    bare = [f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}", f"--CACHE_DIR={tmp_path / 'cache'}",
            f"--SAVED_IMAGES={tmp_path / 'saved_images'}", "--NUM_WORKERS=0", "--LOAD_MODEL=true"]
    result = train.main(bare)
    out = capsys.readouterr().out
    assert "with its own settings:" in out and "SEED=3" in out and "FEATURES=4,8" in out
    config = result["config"]
    assert (config["SEED"], config["EMA_DECAY"], config["NUM_EPOCHS"], config["FEATURES"]) == (3, 0.5, 2, (4, 8))
    assert config["DATA_DIR"] == str(synthetic_root) and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_resume_refuses_when_the_photos_changed(tmp_path, synthetic_root):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    train.main(tiny_args(tmp_path, data, 1))
    for path in sorted((data / "train").glob("*.jpg"))[:4]:  # one car's photos gone
        path.unlink()
    with pytest.raises(SystemExit, match=r"photos differ from .*last.pt's run \(0 new, 4 gone\)"):
        train.main([*tiny_args(tmp_path, data, 2), "--LOAD_MODEL=true"])


def test_the_notebook_can_ask_whether_a_checkpoint_holds_the_same_run(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    def conflicts(arguments):
        return resume.conflicts_with_checkpoint(*train.parse_settings(arguments))

    assert conflicts(tiny_args(tmp_path, synthetic_root, 3, "--DEVICE=cpu")) == []
    assert conflicts(tiny_args(tmp_path, synthetic_root, 1, "--FEATURES=4,8,16", "--SEED=1")) == ["SEED", "FEATURES"]
    assert conflicts(tiny_args(tmp_path / "elsewhere", synthetic_root, 1)) == []


def killed_at_the_first_save(monkeypatch):
    """Make the next train.main die while it saves its first checkpoint, as kill -9 there would."""
    def dying(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", dying)


def test_a_run_killed_at_its_first_save_leaves_a_folder_that_a_fresh_run_takes(tmp_path, synthetic_root, capsys):
    args = tiny_args(tmp_path, synthetic_root, 1)
    with pytest.MonkeyPatch.context() as patch:
        killed_at_the_first_save(patch)
        with pytest.raises(KeyboardInterrupt):
            train.main(args)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.glob("[!.]*")) == ["history.csv", "val_files.txt"]
    with pytest.raises(SystemExit) as resumed:
        train.main([*args, "--LOAD_MODEL=true"])
    message = str(resumed.value.code)
    assert "holds no checkpoint" in message and "start the run without --LOAD_MODEL" in message
    train.main(args)  # what that message says: the fresh run takes the folder
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    assert [row.split(",")[0] for row in (folder / "history.csv").read_text().splitlines()] == ["epoch", "1"]


def separate(folder):
    """Make best.pt a file of its own where it is last.pt's second name (an improved last epoch)."""
    import shutil

    shutil.copy(folder / "best.pt", folder / "copy.pt")
    (folder / "copy.pt").replace(folder / "best.pt")


def test_a_damaged_last_pt_resumes_from_best_pt_saying_so_and_two_are_one_line(tmp_path, synthetic_root, capsys):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    folder = tmp_path / "checkpoints"
    separate(folder)
    damage(folder / "last.pt")
    train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    out = capsys.readouterr().out
    assert f"warning: {folder / 'last.pt'} is damaged" in out and f"resuming from {folder / 'best.pt'} instead" in out
    assert load_checkpoint(folder / "last.pt")["epoch"] == 2
    separate(folder)
    damage(folder / "last.pt")
    damage(folder / "best.pt")
    with pytest.raises(SystemExit) as stopped:
        train.main([*tiny_args(tmp_path, synthetic_root, 3), "--LOAD_MODEL=true"])
    message = str(stopped.value.code)
    assert "\n" not in message and message.count("is damaged") == 2 and "another --CHECKPOINT_DIR" in message


def test_a_history_saved_again_by_a_spreadsheet_with_semicolons_is_read(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    history = tmp_path / "checkpoints" / "history.csv"
    rows = history.read_text().splitlines()
    history.write_text("\n".join(row.replace(",", ";").replace(".", ",") for row in rows) + "\n")
    train.main([*tiny_args(tmp_path, synthetic_root, 2), "--LOAD_MODEL=true"])
    again = history.read_text().splitlines()
    assert again[0] == rows[0] and again[1] == rows[1] and again[2].startswith("2,")
    history.write_text("not a history\n1\n")
    with pytest.raises(SystemExit, match=rf"{history} is not a history as train.py writes it"):
        train.main([*tiny_args(tmp_path, synthetic_root, 3), "--LOAD_MODEL=true"])


def test_a_resume_that_restates_its_own_crop_is_accepted(tmp_path, synthetic_root, capsys):
    folders = [a for a in tiny_args(tmp_path, synthetic_root, 1) if a.startswith(("--DATA_DIR", "--CHECKPOINT_DIR",
                                                                                  "--CACHE_DIR", "--SAVED_IMAGES"))]
    crop = ["--CROP_HEIGHT=192", "--CROP_WIDTH=256"]  # larger than the default IMAGE_HEIGHT x IMAGE_WIDTH
    train.main([*tiny_args(tmp_path, synthetic_root, 1), "--IMAGE_HEIGHT=256", "--IMAGE_WIDTH=384", *crop])
    result = train.main([*folders, "--NUM_WORKERS=0", "--LOAD_MODEL=true", "--NUM_EPOCHS=2", *crop])
    assert result["config"]["IMAGE_HEIGHT"] == 256 and result["config"]["CROP_WIDTH"] == 256
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2
    with pytest.raises(SystemExit, match="holds another run's settings"):  # another crop is still refused
        train.main([*folders, "--LOAD_MODEL=true", "--CROP_HEIGHT=128", "--CROP_WIDTH=256"])


def test_a_resume_may_split_the_batch_keeping_its_images_but_not_change_them(tmp_path, synthetic_root):
    """After an out-of-memory error: --BATCH_SIZE=2 --ACCUMULATE_STEPS=2 continues a batch-4 run with
    the same steps and schedule; --BATCH_SIZE=2 alone would halve the step's images and is refused."""
    train.main(tiny_args(tmp_path, synthetic_root, 1))
    with pytest.raises(SystemExit, match="BATCH_SIZE=4, this run asks for 2"):
        train.main(tiny_args(tmp_path, synthetic_root, 2, "--LOAD_MODEL=true", "--BATCH_SIZE=2"))
    train.main(tiny_args(tmp_path, synthetic_root, 2, "--LOAD_MODEL=true", "--BATCH_SIZE=2", "--ACCUMULATE_STEPS=2"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["BATCH_SIZE"] == 2 and state["config"]["ACCUMULATE_STEPS"] == 2
    assert state["optimizer"]["state"][0]["step"] == 2 * 3  # 3 steps of 4 images an epoch, both epochs


def test_a_run_stopped_before_any_checkpoint_is_told_to_start_again_not_to_resume(tmp_path):
    assert "the same command" in resume.how_to_go_on(tmp_path) and "LOAD_MODEL" not in resume.how_to_go_on(tmp_path)
