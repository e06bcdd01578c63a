"""Continuing a run (LOAD_MODEL) and never overwriting one: which checkpoint a resume reads, which
settings come from it, that its photos are the same, and the history up to where it stopped."""
import csv
import io
from pathlib import Path
from typing import NamedTuple

from settings import shown
from utils import CheckpointError, all_finite, load_checkpoint

# These settings shape the split, the model or the optimizer: a resume takes them from the
# checkpoint, and one given with another value is refused. DATA_DIR and NUM_EPOCHS come from it unless
# given (the data may move; a run may be lengthened). The rest (NUM_WORKERS, DEVICE, AMP, AMP_DTYPE,
# PIN_MEMORY, CACHE_DIR, COMPILE, ACTIVATION_CHECKPOINTING, SAVED_IMAGES, ...) are the session's own.
RUN_SETTINGS = ("IMAGE_HEIGHT", "IMAGE_WIDTH", "BATCH_SIZE", "ACCUMULATE_STEPS", "CROP_HEIGHT", "CROP_WIDTH",
                "LEARNING_RATE", "WARMUP", "HEAD_LR_FACTOR", "LOSS", "SEED", "VAL_FRACTION", "FEATURES", "THRESHOLD",
                "EMA_DECAY", "BATCHNORM_IMAGES", "CHANNELS_LAST", "SYNC_BATCHNORM", "ENCODER", "ENCODER_WEIGHTS",
                "ENCODER_LR_FACTOR", "NUM_CLASSES")
STEP_SETTINGS = ("BATCH_SIZE", "ACCUMULATE_STEPS")
# Checkpoints from before a setting existed ran with what is now its default.
EARLIER_DEFAULTS = {"ENCODER": "unet", "ENCODER_WEIGHTS": "none", "NUM_CLASSES": 1}
CONTINUED_SETTINGS = ("DATA_DIR", "NUM_EPOCHS")
# A folder holds an earlier run when it holds one of its checkpoints: history.csv and val_files.txt
# are written before the first one, and without it they are of a run that saved nothing.
EARLIER_RUN_FILES = ("last.pt", "best.pt")


class Resumed(NamedTuple):
    path: Path   # the checkpoint read
    state: dict  # its contents


def refuse_to_overwrite(checkpoints):
    """A fresh run never replaces an earlier run's checkpoints (it takes over a folder without any)."""
    earlier = [name for name in EARLIER_RUN_FILES if (checkpoints / name).is_file()]
    if earlier:
        raise SystemExit(f"error: {checkpoints} holds an earlier run ({', '.join(earlier)}): continue it with "
                         f"--LOAD_MODEL=true, or start a new run with another --CHECKPOINT_DIR")


def resume_file(checkpoints):
    """last.pt; or best.pt where a run was killed after its first best.pt and before any last.pt
    (best.pt holds the same complete state, so continuing from it loses nothing)."""
    last, best = checkpoints / "last.pt", checkpoints / "best.pt"
    return best if best.is_file() and not last.is_file() else last


def how_to_go_on(checkpoints):
    """After a run stopped: its last good checkpoint and how to continue it, or that none was saved
    (a resume would find nothing: the same command starts the run again)."""
    kept = resume_file(checkpoints)
    if not kept.is_file():
        return "no checkpoint was saved yet, so the same command (with the settings that fit) starts the run again"
    return (f"the last good checkpoint is {kept} (continue with --LOAD_MODEL=true and the same run settings; "
            f"BATCH_SIZE and ACCUMULATE_STEPS may change if their product stays)")


def read(checkpoints, device, log=print):
    """The Resumed state that a LOAD_MODEL run continues from, or SystemExit saying why there is none.
    A damaged last.pt (its checksums, utils.load_checkpoint) falls back to best.pt, saying so: it
    holds a complete state too, of the same run, an epoch or more earlier."""
    candidates = [path for path in dict.fromkeys((resume_file(checkpoints), checkpoints / "best.pt")) if path.is_file()]
    if not candidates:
        saved_nothing = " (its history.csv is of a run killed before it saved an epoch)" if (
            checkpoints / "history.csv").is_file() else ""
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {checkpoints} holds no checkpoint (last.pt or best.pt)"
                         f"{saved_nothing}: start the run without --LOAD_MODEL=true")
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path, device)
        except CheckpointError as error:
            problems.append(str(error).splitlines()[0])
            continue
        if problems:
            log(f"warning: {problems[0]}; resuming from {path} instead ({state.get('epoch')} epochs done)")
        break
    else:
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {'; '.join(problems)}; start a new run with another "
                         f"--CHECKPOINT_DIR")
    if not all(all_finite(state.get(part, {}).values()) for part in ("model", "training_model")):
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {path} holds NaN or infinite weights (not written by "
                         f"this version, which never saves them); start a new run with another --CHECKPOINT_DIR")
    return Resumed(path, state)


def conflicts(config, named, saved):
    """The settings named for a resume that differ from the run's own (saved: the checkpoint's config).
    BATCH_SIZE and ACCUMULATE_STEPS may change together where their product, the step's images,
    stays: the steps an epoch and the schedule are then the same (after an out-of-memory error)."""
    differ = [name for name in RUN_SETTINGS if name in named and name in saved and shown(config[name]) != shown(saved[name])]
    if set(STEP_SETTINGS) <= set(saved):
        asked = {name: config[name] if name in named else saved[name] for name in STEP_SETTINGS}
        if asked["BATCH_SIZE"] * asked["ACCUMULATE_STEPS"] == saved["BATCH_SIZE"] * saved["ACCUMULATE_STEPS"]:
            differ = [name for name in differ if name not in STEP_SETTINGS]
    return differ


def conflicts_with_checkpoint(config, named):
    """conflicts() with the run in config's CHECKPOINT_DIR ([] when it holds none): the notebook
    resumes only the same run."""
    path = resume_file(Path(config["CHECKPOINT_DIR"]))
    if not path.is_file():
        return []
    try:
        saved = {**EARLIER_DEFAULTS, **load_checkpoint(path)["config"]}
    except CheckpointError:
        return ["(unreadable checkpoint)"]
    return conflicts(config, named, saved)


def continue_settings(config, named, resumed, log):
    """The settings of a resumed run: its own (RUN_SETTINGS, CONTINUED_SETTINGS unless named) and the
    session's for the rest. A run setting named with another value is a one-line error naming it."""
    saved = {**EARLIER_DEFAULTS, **resumed.state.get("config", {})}
    refused = conflicts(config, named, saved)
    if refused:
        what = "model" if refused == ["FEATURES"] else "settings"
        listed = "; ".join(f"{name}={shown(saved[name])}, this run asks for {shown(config[name])}" for name in refused)
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {resumed.path} holds another run's {what} ({listed}); "
                         f"resume without changing them, or start a new run with another --CHECKPOINT_DIR")
    kept = {name: saved[name] for name in (*RUN_SETTINGS, *CONTINUED_SETTINGS) if name in saved and name not in named}
    changed = [f"{name}={shown(value)}" for name, value in kept.items() if shown(value) != shown(config[name])]
    if changed:
        log(f"continuing {resumed.path}'s run with its own settings: {', '.join(changed)}")
    return {**config, **kept}


def split_names(train_samples, val_samples):
    """The split as file names, as checkpoints record it: the folder may move, the photos may not change."""
    return {"train": sorted(Path(s.image).name for s in train_samples),
            "val": sorted(Path(s.image).name for s in val_samples)}


def check_same_photos(resumed, train_samples, val_samples):
    """SystemExit when the photos of a resumed run's split have changed: a new split would validate on
    photos the run trained on."""
    saved_split = resumed.state.get("split")
    if not saved_split:
        return  # checkpoints older than the split record
    now = split_names(train_samples, val_samples)
    for side in ("train", "val"):
        before = set(saved_split[side])
        if set(now[side]) != before:
            added, gone = len(set(now[side]) - before), len(before - set(now[side]))
            raise SystemExit(f"error: cannot resume (LOAD_MODEL): the {side} photos differ from {resumed.path}'s "
                             f"run ({added} new, {gone} gone): the data changed since it started, so validation "
                             f"would mix with training; restore the photos, or start a new run with another "
                             f"--CHECKPOINT_DIR")


def check_same_classes(resumed, classes):
    """SystemExit when the masks' classes (NUM_CLASSES >= 2) are not those the resumed run learned:
    its outputs would mean other classes."""
    saved, now = resumed.state.get("classes"), classes.as_dict() if classes else None
    if saved != now and (saved or now):
        from classes import Classes

        def shown(stored):
            return Classes.from_dict(stored).listed() if stored else "car and background"

        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {resumed.path}'s run learned the classes "
                         f"{shown(saved)}, the masks now hold {shown(now)}: restore the masks, or start a new "
                         f"run with another --CHECKPOINT_DIR")


# class_dice: each class's Dice (car's, or those of the classes but background), space-separated.
HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "dice", "pixel_accuracy", "learning_rate", "seconds",
                  "class_dice"]
PLOTTED_FIELDS = HISTORY_FIELDS[:5]  # what the curves need of each row


def read_history(path, epochs_done):
    """Rows of an earlier run's history.csv up to the epoch a resume starts from. A file that a
    spreadsheet saved again with ; or tab separators and decimal commas is read as well; one that
    is not a history is a one-line error (SystemExit) naming it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    header = text.partition("\n")[0]
    separator = max((",", ";", "\t"), key=header.count)
    rows = []
    try:
        for row in csv.DictReader(io.StringIO(text, newline=""), delimiter=separator):
            row = {name: (row.get(name) or "").strip() for name in HISTORY_FIELDS}
            if separator != ",":
                row = {name: value.replace(",", ".") for name, value in row.items()}
            for name in PLOTTED_FIELDS:
                float(row[name])
            if int(float(row["epoch"])) <= epochs_done:
                rows.append({**row, "epoch": int(float(row["epoch"]))})
    except (ValueError, TypeError, csv.Error):
        raise SystemExit(f"error: cannot resume (LOAD_MODEL): {path} is not a history as train.py writes it (its first "
                         f"line: {header[:70]!r}); restore it, or remove it (the curves then start at this "
                         f"session's epochs)") from None
    return rows
