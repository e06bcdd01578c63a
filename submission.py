"""Kaggle's submission file: run-length rows (encoded here, with their decoder), made beside the model
and appended one by one, resumable after any interruption and never mixed with another model's rows."""
import hashlib
import itertools
import json
import re
import shutil
import sys
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from files import WriteError, replacing, write_text
from utils import resize_on_device, resize_probability

SUBMISSION_HEADER = "img,rle_mask\n"


def rle_encode(mask):
    """Kaggle's run-length text of one mask (any nonzero pixel is car): the mask flattened row-major,
    "start length" pairs with 1-indexed starts. One comparison of each pixel with the next finds
    every run's start and end."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    flat = (flat if flat.dtype == bool else flat != 0).view(np.uint8)
    if not flat.size:
        return ""
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 2  # 1-indexed first pixel after each change
    edges = np.concatenate((np.array([1] if flat[0] else [], np.int64), changes,
                            np.array([flat.size + 1] if flat[-1] else [], np.int64)))
    return runs_text(edges)


@torch.no_grad()
def rle_encode_batch(masks):
    """rle_encode of each mask of an (N, H, W) boolean tensor, with the runs found where the tensor
    is: on a GPU only the runs' ends are copied back."""
    flat = masks.flatten(1)
    border = flat.new_zeros(len(flat), 1)
    flat = torch.cat((border, flat, border), 1)  # every run starts and ends inside
    image, edge = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    counts = torch.bincount(image, minlength=len(flat)).cpu().numpy()
    return [runs_text(edges) for edges in np.split((edge + 1).cpu().numpy(), np.cumsum(counts)[:-1])]


def runs_text(edges):
    """"start length ..." from 1-indexed run edges (start, end + 1, start, end + 1, ...)."""
    edges = np.asarray(edges, np.int64)
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges.tolist()))


def rle_decode(text, shape):
    """Mask of shape (height, width) as uint8 {0,1}; ValueError for text that is not valid RLE."""
    numbers = np.array(text.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError("run-length text has an odd count of numbers")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    ends = starts + lengths
    if numbers.size and (starts.min() < 0 or lengths.min() < 1 or ends.max() > shape[0] * shape[1]
                         or (starts[1:] < ends[:-1]).any()):
        raise ValueError(f"run-length text does not fit a {shape[0]}x{shape[1]} mask")
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    for start, end in zip(starts, ends):
        flat[start:end] = 1
    return flat.reshape(shape)


def row_text(probability, size, threshold):
    """A row's run-length text from one model-size probability (a pool thread's work: cv2 and numpy
    release the GIL)."""
    return rle_encode(resize_probability(probability, size) > threshold)


@torch.no_grad()
def rows_on_device(probability, sizes, threshold):
    """The rows of a batch's masks, made where the batch is: upsampled, thresholded and encoded on the
    device."""
    rows = [None] * len(sizes)
    for size in dict.fromkeys(sizes):
        chosen = [i for i, other in enumerate(sizes) if other == size]
        for i, text in zip(chosen, rle_encode_batch(resize_on_device(probability[chosen], size)[:, 0] > threshold)):
            rows[i] = text
    return rows


def source_changes(saved, source):
    """What differs between two submission_source records, in words ("" when nothing does): rows or
    masks of both do not belong in one file or folder."""
    changed = [name for name in source if name != "checkpoint" and saved.get(name) != source[name]]
    return "model" if changed == ["model"] else ", ".join(changed)


ROW = re.compile(r"[^,\r\n]+,[0-9 ]*\r?\n?")  # a row of rle_encode's text


class Submission:
    """img,rle_mask rows appended and flushed one by one, so the file only grows by whole rows; a
    resume drops a row cut off by the interruption with one atomic replacement, and puts back a
    header that a full disk kept from being written. Beside it, `<file>.source` records the model
    and options that made its rows: a resume with others is refused. The caller holds the file
    (files.exclusive) while it writes: two writers would interleave their rows."""

    def __init__(self, path, resume, source):
        self.path, self.done = Path(path), set()
        record = self.path.with_name(f"{self.path.name}.source")
        if self.path.exists() and not resume:
            raise SystemExit(f"error: {self.path} exists: pass --resume to continue it, or remove it")
        try:
            if resume and self.path.exists():
                self.check_source(record, source)
                self.done = self.complete_rows()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text(record, json.dumps(source, indent=1))
                write_text(self.path, SUBMISSION_HEADER)  # whole or absent, never a file without its header
            self.stream = open(self.path, "a", buffering=1)  # noqa: SIM115  (closed in close())
        except OSError as error:
            raise WriteError(f"cannot write {self.path} ({error.strerror or error})") from None

    def check_source(self, record, source):
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            print(f"warning: {record} is missing, so nothing tells which model wrote the rows in {self.path}: "
                  f"continuing them with {source['checkpoint']}", file=sys.stderr)
            return
        changed = source_changes(saved, source)
        if changed:
            raise SystemExit(f"error: {self.path} holds rows made with another {changed} (by {saved.get('checkpoint')}"
                             f"): resuming it with {source['checkpoint']} would mix two models; write a new file")

    def complete_rows(self):
        """Names of the complete rows; a cut-off last row is dropped, and a header lost to a full disk
        (a file empty, cut within its header, or holding rows without it) put back, in one atomic
        replacement."""
        done = set()
        with open(self.path, newline="") as stream:
            first = stream.readline()
            if first == SUBMISSION_HEADER:
                missing, lines, kept = "", stream, len(first.encode())
            elif SUBMISSION_HEADER.startswith(first):  # empty, or cut within the header: no row yet
                missing, lines, kept = SUBMISSION_HEADER, (), 0
            elif ROW.fullmatch(first):
                missing, lines, kept = SUBMISSION_HEADER, itertools.chain([first], stream), 0
            else:
                raise SystemExit(f"error: {self.path} is not a submission (its first line is not img,rle_mask)")
            for line in lines:
                if not line.endswith("\n"):
                    break
                done.add(line.split(",", 1)[0])
                kept += len(line.encode())
        if missing or kept != self.path.stat().st_size:
            with open(self.path, "rb") as source, replacing(self.path) as copy:
                copy.write(missing.encode())
                shutil.copyfileobj(LimitedReader(source, kept), copy)
        return done

    def add(self, name, text):
        """One row: the image's file name and its mask's run-length text."""
        try:
            self.stream.write(f"{name},{text}\n")
        except OSError as error:
            raise WriteError(f"cannot write {self.path} ({error.strerror or error}); its complete rows are kept") from None

    def close(self):
        try:
            self.stream.close()
        except OSError:  # the write that failed said so already; a cut row is dropped by --resume
            pass


class LimitedReader:
    """The first `limit` bytes of a binary stream."""

    def __init__(self, stream, limit):
        self.stream, self.left = stream, limit

    def read(self, size=-1):
        size = self.left if size < 0 else min(size, self.left)
        chunk = self.stream.read(size)
        self.left -= len(chunk)
        return chunk


def submission_source(checkpoint, state, threshold, tta):
    """What makes a submission's rows: the model's weights (a digest), its input size, the threshold
    and TTA. Rows made with other values do not belong in the same file."""
    digest = hashlib.sha1()
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"checkpoint": str(checkpoint), "model": digest.hexdigest(), "image_size": list(state["image_size"]),
            "threshold": threshold, "tta": tta}


def unusable_names(paths):
    """File names that cannot be a field of Kaggle's CSV rows (a comma, quote or line break)."""
    return sorted({path.name for path in paths if any(mark in path.name for mark in ',"\n\r')})


def duplicate_names(paths):
    """File names that more than one input has (Kaggle keys submission rows by file name)."""
    counts = Counter(path.name for path in paths)
    return sorted(name for name, count in counts.items() if count > 1)


class RowEncoder:
    """Submission rows from batches of model-size probabilities, written in input order. On a GPU
    the rows are made on the device (rows_on_device); on a CPU `threads` threads make them while the
    main thread runs the model, at most `ahead` images behind it."""

    def __init__(self, device, threshold, threads, ahead):
        self.threshold, self.ahead, self.pending, self.written = threshold, ahead, deque(), 0
        self.pool = ThreadPoolExecutor(threads, "encoder") if device.type == "cpu" and threads else None
        self.device = device

    def add(self, paths, probability, sizes):
        if self.device.type != "cpu":
            self.pending.extend(zip(paths, rows_on_device(probability, sizes, self.threshold)))
            return
        for path, small, size in zip(paths, probability[:, 0].numpy(), sizes):
            row = self.pool.submit(row_text, small, size, self.threshold) if self.pool else row_text(
                small, size, self.threshold)
            self.pending.append((path, row))

    def write(self, submission, everything=False):
        """Write the finished rows at the head of the queue (all of them with `everything`, and
        waiting for rows when the queue is longer than `ahead`)."""
        while self.pending and (everything or len(self.pending) > self.ahead or finished(self.pending[0][1])):
            path, row = self.pending.popleft()
            submission.add(path.name, row.result() if isinstance(row, Future) else row)
            self.written += 1

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def finished(row):
    return not isinstance(row, Future) or row.done()
