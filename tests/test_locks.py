"""One writer per folder and per submission file: a second one is refused naming the first, and a
lock left by a killed process blocks nobody."""
import os
import signal
import subprocess
import sys

import pytest

import files
import train
from conftest import ROOT, read_only, tiny_args
from utils import load_checkpoint

HOLD = "import sys, time, files\nwith files.exclusive(sys.argv[1], 'holding it'):\n    print('held', flush=True)\n    time.sleep(120)\n"


def holder(path):
    """A second process that holds `path` until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_blocks_nobody(tmp_path, kind):
    path = tmp_path / "run"
    if kind == "folder":
        path.mkdir()
    first = holder(path)
    try:
        with pytest.raises(files.InUse, match=rf"{path} is in use by process {first.pid} \(holding it\)"), \
                files.exclusive(path, "second"):
            pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with files.exclusive(path, "third"):  # the killed holder's lock died with it
        assert files.lock_file(path).read_text() == f"process {os.getpid()} (third)\n"
    assert not files.lock_file(path).exists()  # a finished holder leaves nothing behind


def start_training(tmp_path, synthetic_root, seed, epochs):
    arguments = [*tiny_args(tmp_path, synthetic_root, epochs), f"--SEED={seed}"]
    return subprocess.Popen([sys.executable, "-u", "train.py", *arguments], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_training_into_one_folder_is_refused_and_a_killed_one_blocks_no_resume(tmp_path, synthetic_root):
    first = start_training(tmp_path, synthetic_root, 1, 200)
    try:
        lines = iter(first.stdout.readline, "")
        assert any(line.startswith("epoch 1/200") for line in lines)  # running, with a checkpoint saved
        second = start_training(tmp_path, synthetic_root, 2, 1)
        err = second.communicate(timeout=120)[1]
        assert second.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"is in use by process {first.pid} (train.py)" in err and "CHECKPOINT_DIR" in err
        assert first.poll() is None  # the first run goes on, its files its own
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["config"]["SEED"] == 1
    result = train.main([*tiny_args(tmp_path, synthetic_root, saved["epoch"] + 1), "--LOAD_MODEL=true"])
    assert result["config"]["SEED"] == 1  # the killed run's lock died with it


@pytest.mark.parametrize("name", ["CHECKPOINT_DIR", "SAVED_IMAGES"])
def test_a_read_only_run_folder_is_one_line_before_any_training(tmp_path, synthetic_root, monkeypatch, capsys, name):
    read_only(monkeypatch, tmp_path / {"CHECKPOINT_DIR": "checkpoints", "SAVED_IMAGES": "saved_images"}[name])
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(tmp_path, synthetic_root, 1))
    message = str(stopped.value.code)
    assert message.startswith(f"error: {name}: cannot write in ") and "Read-only file system" in message
    assert "\n" not in message and "epoch 1/" not in capsys.readouterr().out
