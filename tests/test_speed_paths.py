"""The fast paths run and keep their promises (bench.py, not tests, measures speed)."""
import torch

import bench
import train
from conftest import tiny_args


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
