import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import synthetic
import train

REAL_SAMPLES = ROOT.parent / "shared" / "carvana_samples"
# On the CPU: tests compare exact repeats, and a GPU's kernels need not repeat bit for bit.
TINY = ["--FEATURES=4,8", "--IMAGE_HEIGHT=32", "--IMAGE_WIDTH=48", "--BATCH_SIZE=4", "--NUM_WORKERS=0", "--DEVICE=cpu",
        "--LEARNING_RATE=0.01"]


def tiny_args(tmp, data_dir, epochs=1, *extra):
    """train.py arguments for a seconds-long run writing everything under tmp."""
    return [f"--DATA_DIR={data_dir}", f"--CHECKPOINT_DIR={tmp / 'checkpoints'}", f"--CACHE_DIR={tmp / 'cache'}",
            f"--SAVED_IMAGES={tmp / 'saved_images'}", f"--NUM_EPOCHS={epochs}", *TINY, *extra]


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_it_was():
    """Nothing the tests run writes into the checkout's run folders (a predict.py without --output,
    a train.py with its default folders)."""
    folders = [ROOT / name for name in ("saved_images", "checkpoints", "cache", "data")]
    before = {path for folder in folders for path in folder.rglob("*")}
    yield
    left = sorted(str(path.relative_to(ROOT)) for folder in folders for path in folder.rglob("*") if path not in before)
    assert not left, f"the tests left files in the checkout: {', '.join(left[:5])}"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """4 cars x 4 angles in Carvana's layout and formats, at 192x128."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(root, cars=4, angles=4, size=(192, 128), progress=False)
    return root


LEARNS = ["--FEATURES=8,16,32", "--IMAGE_HEIGHT=64", "--IMAGE_WIDTH=96", "--BATCH_SIZE=2", "--LEARNING_RATE=0.005"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synthetic_root):
    """A checkpoint from 8 real epochs of train.py (about 3 s): it predicts car-shaped masks."""
    tmp = tmp_path_factory.mktemp("trained")
    result = train.main(tiny_args(tmp, synthetic_root, 8, *LEARNS))
    assert result["best_dice"] > 0.5, "the fixture model should have learnt something"
    return tmp, result


def split_of(config):
    """The (training, validation) samples that train.py splits config's DATA_DIR into."""
    import data_folder

    return data_folder.training_split(config["DATA_DIR"], config["VAL_FRACTION"], config["SEED"])


def read_only(monkeypatch, folder):
    """Make every attempt to create or write a file or folder under `folder` fail as on a read-only
    file system (the tests run as root, whom chmod does not stop)."""
    import builtins
    import errno
    import io
    import os

    folder = os.path.abspath(folder)

    def refused(path):
        return os.path.abspath(os.fspath(path)).startswith(folder)

    def failing(real, writes):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and refused(path) and writes(path, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    def opens_to_write(path, mode="r", *args, **kwargs):
        return any(letter in mode for letter in "wax+")

    def os_open_writes(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def new_folder(path, *args, **kwargs):
        return not os.path.exists(path)  # an existing one: FileExistsError, as on a read-only mount

    monkeypatch.setattr(builtins, "open", failing(builtins.open, opens_to_write))
    monkeypatch.setattr(io, "open", failing(io.open, opens_to_write))
    monkeypatch.setattr(os, "open", failing(os.open, os_open_writes))
    monkeypatch.setattr(os, "mkdir", failing(os.mkdir, new_folder))


def damage(path):
    """Change 4 bytes inside the largest weight of a checkpoint, as a disk or copy error would."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(path.read_bytes())
    middle = start + member.file_size // 2
    data[middle:middle + 4] = bytes(255 - value for value in data[middle:middle + 4])
    path.write_bytes(bytes(data))
