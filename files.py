"""Files that survive a kill at any instant: each is written whole under a temporary name beside it
and renamed over the old one, so a reader sees the old file or the new one, never a mix; the
temporary files of writers killed outright (kill -9, a Colab disconnect) are cleared by the next
write of the same name. Locks tell whether another process is using a file, and keep a second
writer out of a run's folders and a submission file."""
import errno
import glob
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; leftovers are judged by their age instead
    fcntl = None

ABANDONED_AFTER = 24 * 3600  # seconds: where locks are missing, a temporary file this old is a leftover


@contextmanager
def replacing_path(path):
    """Yield a temporary path beside `path` to write (a file the caller fills, a memory map, ...); when
    the block ends without error the temporary becomes `path` in one rename, else it is removed. It is
    locked while written, so that clear_leftovers in another process leaves it alone."""
    path = Path(path)
    clear_leftovers(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        if fcntl:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield temporary
        os.replace(temporary, path)  # before the lock goes with the handle: nobody clears it meanwhile
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(handle)


@contextmanager
def replacing(path, mode="wb", **open_arguments):
    """Yield a file opened on a temporary name; when the block ends it is flushed to disk and renamed
    over `path` (see replacing_path)."""
    with replacing_path(path) as temporary, open(temporary, mode, **open_arguments) as stream:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())


def write_text(path, text):
    with replacing(path, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)


def write_bytes(path, data):
    with replacing(path) as stream:
        stream.write(data)


class WriteError(Exception):
    """An output that could not be written (a full disk, a lost mount); the message names it and why."""


class InUse(Exception):
    """Another process holds what exclusive() was asked for; the message names it."""


def lock_file(path):
    """The lock file of a folder (inside it) or of a file (beside it, hidden)."""
    path = Path(path)
    return path / ".lock" if path.is_dir() else path.parent / f".{path.name}.lock"


@contextmanager
def exclusive(path, what):
    """Hold `path` (an existing folder, or a file that may not exist yet) for this process alone
    while the block runs: an advisory lock on its lock_file, which names the holder (its process id
    and `what` it is doing) for the InUse message another process gets. The lock dies with its
    process, kill -9 included, so a killed holder never blocks; the lock file goes at the end. An
    OSError means that nothing can be written there (a read-only or full disk). Where locks are
    missing (Windows, some network mounts) the block runs unlocked."""
    path, name = Path(path), lock_file(path)
    while True:
        handle = os.open(name, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(handle)
            raise InUse(f"{path} is in use by {holder}") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(handle)
                raise
        try:  # a holder that ended between our open and our lock removed that file: lock the new one
            current = os.path.samestat(os.fstat(handle), os.stat(name))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"process {os.getpid()} ({what})\n".encode())
        yield
    finally:
        name.unlink(missing_ok=True)  # while still locked: nobody else holds this file meanwhile
        os.close(handle)


def in_use(path, shared_ok=False):
    """Whether another open handle holds a lock on the file (with shared_ok, only an exclusive lock
    counts). Without locks (Windows), files younger than ABANDONED_AFTER count as in use."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if fcntl is None:
            return time.time() - os.fstat(handle).st_mtime < ABANDONED_AFTER
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared_ok else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(handle)


def clear_leftovers(path):
    """Remove the temporary files that writers of `path` killed outright left behind."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not in_use(leftover):
            leftover.unlink(missing_ok=True)


def hold_shared(path):
    """An open handle with a shared lock on `path`, for as long as the handle lives: another process
    asking in_use(path) learns that it is being read. None where locks are missing."""
    if fcntl is None:
        return None
    try:
        handle = open(path, "rb")  # noqa: SIM115  (held open on purpose; closed with its owner)
    except OSError:
        return None
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def not_a_folder(path):
    """The part of `path` (itself or a folder above it) that exists as a file, or None: a folder
    cannot be made there."""
    for part in (Path(path), *Path(path).parents):
        if part.exists():
            return part if not part.is_dir() else None
    return None


def make_run_folder(folder):
    """Create a folder for a run's files (checkpoints, caches) that git leaves out wherever it is: a
    new folder gets a .gitignore of "*", as a virtual environment does; an existing one is left as it is."""
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".gitignore").write_text("# made by train.py: git leaves this run's files out\n*\n")
    return folder
