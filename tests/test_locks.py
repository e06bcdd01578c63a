"""One writer per folder and per submission file: a second one is refused naming the first, and a
lock left by a killed process blocks nobody."""
import os
import signal
import subprocess
import sys

import pytest

import files
from conftest import ROOT

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
