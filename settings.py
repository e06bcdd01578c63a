"""train.py's settings: the UPPER_CASE constants at the top of the script, overridden by --NAME=value
arguments (each read as its default's type), all checked before anything runs; one line names any
setting that is wrong."""
import difflib
import math
import os
import re
from pathlib import Path

from files import not_a_folder
from image_files import MOST_CODES
from model import RESNETS
from utils import get_device

TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
AUTO_OR_COUNT = ("NUM_WORKERS", "BATCHNORM_IMAGES")  # settings that take "auto" or a count


def parse(argv, defaults, script, usage):
    """(config, the names given in argv) from the defaults and --NAME=value arguments; --help prints
    `usage` and every setting with its default and the comment beside it in `script`."""
    config, named = dict(defaults), set()
    for argument in argv:
        if argument in ("-h", "--help"):
            print_help(config, script, usage)
            raise SystemExit(0)
        name, equals, text = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise SystemExit(f"error: expected --NAME=value, got {argument!r}")
        if name not in config:
            close = difflib.get_close_matches(name.upper(), config, n=1)
            hint = f"did you mean --{close[0]}?" if close else "python train.py --help lists them"
            raise SystemExit(f"error: unknown setting --{name}; {hint}")
        config[name] = convert(name, text, config[name])
        named.add(name)
    check(config)
    if ("ENCODER_WEIGHTS" in named and config["ENCODER"] == "unet" and config["ENCODER_WEIGHTS"] != "none"
            and not config["LOAD_MODEL"]):  # a resume takes its run's ENCODER
        raise SystemExit("error: ENCODER_WEIGHTS: the plain UNet (ENCODER=unet) has no pretrained weights; "
                         "choose a ResNet ENCODER, e.g. --ENCODER=resnet34")
    if "FEATURES" in named and config["ENCODER"] != "unet" and not config["LOAD_MODEL"]:
        raise SystemExit(f"error: FEATURES: sets the plain UNet's widths; the {config['ENCODER']} UNet's "
                         "are fixed: leave FEATURES out, or use --ENCODER=unet")
    return config, named


def shown(value):
    """A setting as it is typed after --NAME=: 64,128,256 for a sequence."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def meanings(script):
    """{name: its comment} from the settings block of a script, the one place they are written."""
    block = Path(script).read_text().split("# ---- settings")[1].split("\n# ----")[0]
    found = (re.match(r"([A-Z_]+) = .*?  # (.*)", line) for line in block.splitlines())
    return {match[1]: match[2].strip() for match in found if match}


def print_help(config, script, usage):
    print(usage)
    comments = meanings(script)
    width = max(len(f"--{name}={shown(value)}") for name, value in config.items())
    for name, value in config.items():
        print(f"  {f'--{name}={shown(value)}':<{width}}  {comments.get(name, '')}")


def convert(name, text, default):
    """A command-line value in the type of the setting's default, or SystemExit saying why."""
    kind = type(default)
    counts = name in AUTO_OR_COUNT
    if counts:
        if text.strip().lower() == "auto":
            return "auto"
        kind = int
    try:
        if kind is bool:
            if text.lower() not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError
            return text.lower() in TRUE_WORDS
        if kind is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number",
                  tuple: "comma-separated integers"}.get(kind, "a value")
        wanted = "auto or a count" if counts else wanted
        raise SystemExit(f"error: --{name} expects {wanted}, got {text!r}") from None


def pictures_folder(config):
    """SAVED_IMAGES/<CHECKPOINT_DIR's path from the folder SAVED_IMAGES is in> (the whole path where
    CHECKPOINT_DIR is elsewhere): each run's pictures apart from every other run's, as r1/checkpoints
    and r2/checkpoints share a name but not a path."""
    saved = Path(config["SAVED_IMAGES"])
    checkpoints = Path(os.path.abspath(config["CHECKPOINT_DIR"]))
    try:
        parts = checkpoints.relative_to(Path(os.path.abspath(saved)).parent).parts
    except ValueError:  # elsewhere: the whole path under a folder of its own, apart from relative ones
        parts = ("elsewhere", *checkpoints.parts[1:])
    return saved.joinpath(*parts) if parts else saved / checkpoints.name


def check(config):
    """Every value in range before anything runs: SystemExit with one line naming the setting."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    for name in ("IMAGE_HEIGHT", "IMAGE_WIDTH", "BATCH_SIZE", "NUM_EPOCHS", "ACCUMULATE_STEPS"):
        if config[name] < 1:
            fail(f"{name} must be at least 1, got {config[name]}")
    for name in AUTO_OR_COUNT:
        if config[name] != "auto" and (not isinstance(config[name], int) or config[name] < 0):
            fail(f"{name} must be auto or a count of 0 or more, got {config[name]!r}")
    if not 1 <= config["NUM_CLASSES"] <= MOST_CODES:
        fail(f"NUM_CLASSES must be 1 (car and background) or 2 to {MOST_CODES} (background and the masks' "
             f"classes), got {config['NUM_CLASSES']}")
    for name in ("VAL_FRACTION", "THRESHOLD"):
        if not 0 < config[name] < 1:
            fail(f"{name} must be between 0 and 1, got {config[name]}")
    if not 0 <= config["WARMUP"] < 1:
        fail(f"WARMUP must be at least 0 and below 1, got {config['WARMUP']}")
    if not 0 <= config["EMA_DECAY"] < 1:
        fail(f"EMA_DECAY must be at least 0 and below 1, got {config['EMA_DECAY']}")
    if not config["LEARNING_RATE"] > 0 or not math.isfinite(config["LEARNING_RATE"]):
        fail(f"LEARNING_RATE must be a positive number, got {config['LEARNING_RATE']}")
    if not 1 <= config["HEAD_LR_FACTOR"] < math.inf:
        fail(f"HEAD_LR_FACTOR must be a number of at least 1, got {config['HEAD_LR_FACTOR']}")
    if not 0 <= config["SEED"] < 2**32:
        fail(f"SEED must be between 0 and 2**32 - 1, got {config['SEED']}")
    if not config["FEATURES"] or min(config["FEATURES"]) < 1:
        fail(f"FEATURES must be one or more positive channel counts such as 64,128,256,512, got {config['FEATURES']}")
    encoders = ("unet", *RESNETS)
    if config["ENCODER"] not in encoders:
        fail(f"ENCODER must be one of {', '.join(encoders)}, got {config['ENCODER']!r}")
    if not 0 < config["ENCODER_LR_FACTOR"] <= 1:
        fail(f"ENCODER_LR_FACTOR must be above 0 and at most 1, got {config['ENCODER_LR_FACTOR']}")
    weights = config["ENCODER_WEIGHTS"]
    if weights not in ("imagenet", "none") and not Path(weights).expanduser().is_file():
        fail(f"ENCODER_WEIGHTS must be imagenet, none or the path of a .pth file, got {weights!r} (no such file)")
    if config["LOSS"] not in ("lovasz", "dice"):
        fail(f"LOSS must be lovasz or dice, got {config['LOSS']!r}")
    if config["AMP_DTYPE"] not in ("auto", "float16", "bfloat16"):
        fail(f"AMP_DTYPE must be auto, float16 or bfloat16, got {config['AMP_DTYPE']!r}")
    for name in ("DATA_DIR", "CHECKPOINT_DIR", "SAVED_IMAGES"):
        if not config[name]:
            fail(f"{name} must name a folder")
    for name, folder in (("CHECKPOINT_DIR", config["CHECKPOINT_DIR"]), ("SAVED_IMAGES", pictures_folder(config))):
        if not_a_folder(folder):
            fail(f"{name}: {not_a_folder(folder)} is a file, so no folder can be made at {folder}")
    try:
        get_device(config["DEVICE"])
    except ValueError as error:
        fail(f"DEVICE: {error}")
    if not config.get("LOAD_MODEL"):  # a resume's sizes and model are its run's: checked once they are known
        check_sizes(config)


def check_sizes(config):
    """The image, crop and model sizes fit each other: SystemExit with one line naming them."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    # A ResNet encoder halves the size five times, as a 5-level UNet does.
    levels = len(config["FEATURES"]) if config["ENCODER"] == "unet" else 5
    model = f"{levels}-level UNet" if config["ENCODER"] == "unet" else f"{config['ENCODER']} UNet"
    if min(config["IMAGE_HEIGHT"], config["IMAGE_WIDTH"]) < 2**levels:
        fail(f"IMAGE_HEIGHT and IMAGE_WIDTH must be at least {2**levels} for a {model}, "
             f"got {config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']}")
    crop = config["CROP_HEIGHT"], config["CROP_WIDTH"]
    if crop != (0, 0):
        if min(crop) < 2**levels or crop[0] > config["IMAGE_HEIGHT"] or crop[1] > config["IMAGE_WIDTH"]:
            fail(f"CROP_HEIGHT x CROP_WIDTH must both be 0 (whole images) or between {2**levels} and "
                 f"IMAGE_HEIGHT x IMAGE_WIDTH ({config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']}), got {crop[0]}x{crop[1]}")
        if (crop[0] >> levels) * (crop[1] >> levels) < 2:
            fail(f"CROP_HEIGHT x CROP_WIDTH {crop[0]}x{crop[1]} leaves the {model}'s bottleneck one "
                 f"pixel: make one side at least {2 ** (levels + 1)}")
    if (config["IMAGE_HEIGHT"] >> levels) * (config["IMAGE_WIDTH"] >> levels) < 2:
        fail(f"IMAGE_HEIGHT x IMAGE_WIDTH {config['IMAGE_HEIGHT']}x{config['IMAGE_WIDTH']} leaves the {model}'s "
             f"bottleneck one pixel, where BatchNorm has one value per channel from a 1-image batch: "
             f"make one side at least {2 ** (levels + 1)}")
