"""What only a CUDA GPU can show; skipped without one (tools/gpu_check.sh runs them where one is)."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import memory
import predict
import train
from conftest import LEARNS, tiny_args
from image_files import read_mask
from model import UNet
from submission import rle_decode
from utils import forward, load_checkpoint, segmentation_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def gpu_args(tmp, data, epochs, *extra):
    return [argument for argument in tiny_args(tmp, data, epochs, *LEARNS, *extra) if argument != "--DEVICE=cpu"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_training_learns_on_the_gpu(tmp_path, synthetic_root, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16")
    result = train.main(gpu_args(tmp_path, synthetic_root, 8, "--DEVICE=cuda", f"--AMP_DTYPE={dtype}"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["amp_dtype"] == f"torch.{dtype}" and result["best_dice"] > 0.5
    if dtype == "float16":  # the scaler ran and the fused Adam stepped
        assert state["scaler"]["scale"] > 0 and state["optimizer"]["param_groups"][0]["fused"]


def test_channels_last_with_cudnn_matches_the_plain_layout():
    torch.manual_seed(0)
    plain = UNet(features=(16, 32, 64)).to(CUDA)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 144, device=CUDA)
    torch.backends.cudnn.benchmark = True
    for got, want in zip(step_gradients(fast, x), step_gradients(plain, x)):
        assert (got - want).norm() <= 0.02 * want.norm()  # float16 sums in another order


def step_gradients(model, x, dtype=torch.float16):
    model.zero_grad(set_to_none=True)
    target = torch.zeros_like(x[:, :1])
    segmentation_loss(forward(model, x, CUDA, dtype), target).backward()
    return [parameter.grad.float() for parameter in model.parameters()]


def test_compiled_checkpointed_steps_match_eager_ones():
    torch.manual_seed(0)
    eager = UNet(features=(8, 16, 32)).to(CUDA, memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.activation_checkpointing = True
    compiled.compile()
    x = torch.rand(2, 3, 64, 96, device=CUDA)
    for got, want in zip(step_gradients(compiled, x, None), step_gradients(eager, x, None)):
        assert (got - want).norm() <= 0.01 * want.norm()  # TF32 and fused kernels


def test_full_size_prediction_on_the_gpu_matches_the_cpu_and_its_submission(trained_on_gpu, synthetic_root,
                                                                            tmp_path):
    checkpoint, photos = trained_on_gpu
    masks = {}
    for device in ("cuda", "cpu"):
        output = tmp_path / device
        assert predict.main(["--checkpoint", str(checkpoint), "--input", str(photos), "--output", str(output),
                             "--device", device, "--no-amp", "--workers", "0"]) == 0
        masks[device] = {path.name: read_mask(path) for path in output.glob("*_mask.png")}
    assert masks["cuda"].keys() == masks["cpu"].keys() and masks["cuda"]
    for name, mask in masks["cuda"].items():  # TF32 and other kernels: a few pixels at the threshold at most
        assert np.mean(mask != masks["cpu"][name]) < 1e-3, name
    submission = tmp_path / "rows.csv"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(photos), "--submission", str(submission),
                         "--no-images", "--device", "cuda", "--no-amp", "--workers", "0"]) == 0
    for line in submission.read_text().splitlines()[1:]:
        name, text = line.split(",")
        mask = masks["cuda"][f"{Path(name).stem}_mask.png"]
        assert np.mean(rle_decode(text, mask.shape) != (mask > 0)) < 1e-3, name


@pytest.fixture(scope="module")
def trained_on_gpu(tmp_path_factory, synthetic_root):
    tmp = tmp_path_factory.mktemp("gpu")
    train.main(gpu_args(tmp, synthetic_root, 4, "--DEVICE=cuda"))
    return tmp / "checkpoints" / "best.pt", synthetic_root / "train"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_memory_count_follows_the_cuda_allocator(checkpointing):
    features, size, dtype = (32, 64, 128, 256), (320, 480), torch.float16
    fixed = memory.fixed_training_bytes(UNet(features=features))
    per_step, per_image = memory.step_bytes({"features": features}, size, dtype, checkpointing)
    measured, _ = bench.real_step(features, size, 2, CUDA, dtype, checkpointing)
    assert 0.8 < measured / (fixed + per_step + 2 * per_image) < 1.3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_on_two_gpus_with_nccl(tmp_path, synthetic_root):
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    run = subprocess.run([*command, "--standalone", "--nproc_per_node=2", train.__file__,
                          *gpu_args(tmp_path, synthetic_root, 2, "--SYNC_BATCHNORM=true", "--ACCUMULATE_STEPS=2")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "x 2 processes" in run.stdout and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2
