"""The fast paths run and keep their promises (bench.py, not tests, measures speed)."""
import re
import sys
import time

import pytest
import torch

import bench
import train
from conftest import LEARNS, ROOT, tiny_args


def test_compiled_training_saves_clean_parameter_names(tmp_path, synthetic_root):
    train.main(tiny_args(tmp_path, synthetic_root, 1, "--COMPILE=true"))
    raw = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)  # not through load_checkpoint
    assert raw["model"] and not any(key.startswith(("_orig_mod.", "module.")) for key in raw["model"])


def test_channels_last_off_trains_in_the_standard_format(tmp_path, synthetic_root):
    result = train.main(tiny_args(tmp_path, synthetic_root, 1, "--CHANNELS_LAST=false", "--AMP=false"))
    assert result["last"]["images"] > 0


def test_bench_prints_every_row(capsys):
    bench.main(["--height", "32", "--width", "48", "--batch", "2", "--steps", "1", "--images", "3",
                "--features", "4,8", "--no-compile"])
    table = capsys.readouterr().out
    for row in ("data full decode + resize", "data reduced JPEG decode", "data cache (", "train float32, NCHW",
                ", channels-last |", "share of torch.float32 matmul ceiling", "peak memory",
                "matmul ceiling torch.float32", "inference"):
        assert row in table, row
    assert table.count("\n| ") >= 11


def test_bench_epoch_rows_compare_the_whole_loop_with_the_step(capsys, synthetic_root):
    bench.main(["--height", "32", "--width", "48", "--batch", "2", "--steps", "1", "--images", "3",
                "--features", "4,8", "--no-compile", "--epoch", str(synthetic_root)])
    table = capsys.readouterr().out
    for row in ("train.py 1-epoch run, before", "train.py 1-epoch run, after, cache ready",
                "training loop of that run (cache ready), share of the step rate"):
        assert row in table, row
    assert "COMPILE=true" not in table  # --no-compile skips the compiled epoch too
    share = next(line for line in table.splitlines() if "share of the step rate" in line)
    assert float(share.split("|")[-2].strip().rstrip("%")) > 0
    parts = {line.split("|")[1].strip().removeprefix("part: "): float(line.split("|")[-2].strip().rstrip("%"))
             for line in table.splitlines() if "|   part: " in line}
    assert {"training steps", "BatchNorm recompute", "validation", "checkpoints and history", "pictures",
            "cache and loaders", "photo checks", "model", "other"} <= set(parts)
    assert 95 <= sum(parts.values()) <= 105  # the parts are the whole run
    assert "weight average, 6 updates of" in table and "building the cache" in table


def test_bench_epoch_runs_a_resnet_unet(tmp_path, synthetic_root):
    args = bench.parse_args(["--height", "64", "--width", "96", "--batch", "4", "--encoder", "resnet18",
                             "--device", "cpu", "--epoch", str(synthetic_root)])
    seconds, result = bench.epoch_run(args, [f"--CACHE_DIR={tmp_path / 'cache'}", "--NUM_WORKERS=0"], tmp_path)
    assert seconds > 0 and result["config"]["ENCODER"] == "resnet18" and result["seconds"]["training steps"] > 0


def test_a_run_says_where_its_time_went(tmp_path, synthetic_root):
    started = time.perf_counter()
    result = train.main(tiny_args(tmp_path, synthetic_root, 2))
    wall = time.perf_counter() - started
    seconds = result["seconds"]
    assert all(value >= 0 for value in seconds.values()) and seconds["training steps"] > 0
    assert seconds["BatchNorm recompute"] > 0 and seconds["validation"] > 0
    assert sum(seconds.values()) == pytest.approx(wall, rel=0.1)
    assert result["optimizer_steps"] == 2 * 3  # 12 training images in batches of 4, two epochs


def test_bench_memory_prints_a_row_per_model_size_and_checkpointing_with_the_batches_that_fit(capsys):
    bench.main(["--memory", "--features", "4,8"])
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    sized = [row for row in rows if row[0][-1].isdigit() and ", " in row[0]]
    models = ["UNet(4, 8)", "resnet18 UNet", "resnet34 UNet", "resnet50 UNet"]
    assert [(row[0], row[1]) for row in sized] == [(f"{model}, {h}x{w}", mode) for model in models
                                                   for h, w in bench.MEMORY_SIZES for mode in ("off", "on")]
    fits = {}
    for row in sized:
        batches = [int(b) for b in row[3].split(" / ")]
        assert len(batches) == 3 and batches == sorted(batches) and batches[0] >= 1
        fits[row[0], row[1]] = batches[0]
    # checkpointing lets more images fit at every size, and the count agrees with a real step
    assert all(fits[name, "on"] > fits[name, "off"] for name, _ in fits)
    checks = [line for line in lines if line.startswith("| check: one real step")]
    assert len(checks) == 2


@pytest.mark.parametrize("widths", ["4,x", ",", "0", "4,-8"])
def test_bench_refuses_widths_that_are_not_positive_counts_in_one_line(widths, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--memory", "--features", widths])
    assert exit.value.code == 2
    assert "error: argument --features: " in capsys.readouterr().err.strip().splitlines()[-1]


def test_batchnorm_images_tool_scores_each_count_on_the_runs_own_weights(tmp_path, synthetic_root,
                                                                         capsys):
    """tools/batchnorm_images.py: a count of at least the training images is the run's own validation,
    and a smaller count gives other statistics (the Dice of docs/performance.md's table)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import batchnorm_images

    settings = tiny_args(tmp_path, synthetic_root, 2, *LEARNS)
    batchnorm_images.main(["--counts", "0,2,1000", "--", *settings])
    out = capsys.readouterr().out
    printed = re.findall(r"val Dice (\d\.\d{4})", out)
    table = [line.split("\t") for line in out.splitlines() if re.match(r"^\d\t", line)]
    assert [row[0] for row in table] == ["1", "2"] and len(printed) == 2
    assert [row[3] for row in table] == printed  # k=1000: all the training images, as the run did
    assert all(0 <= float(value) <= 1 for row in table for value in row[1:])
    assert re.search(r"^best\t", out, re.MULTILINE)
    assert re.search(r"^recompute s\t0\.0\t", out, re.MULTILINE)
