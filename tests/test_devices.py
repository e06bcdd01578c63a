"""The device paths, proven on the CPU as far as they go: Apple MPS has no float64, torchrun
accumulates without all-reducing each micro-batch, SyncBatchNorm stays out of the validated model,
out-of-memory errors end in one line within seconds and free the failed step, loader processes run."""
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memory
import predict
import train
from conftest import LEARNS, tiny_args
from model import UNet
from submission import rows_on_device
from utils import forward, load_checkpoint, recompute_batchnorm, resize_on_device, segmentation_loss

CPU = torch.device("cpu")


class Float64Made(TorchDispatchMode):
    """Names the operators that produce a float64 tensor. The host's own float64 work is NumPy's, so
    on a CPU any such tensor is one that would be made on the model's device: an error on MPS."""

    def __init__(self):
        super().__init__()
        self.operators = set()

    def __torch_dispatch__(self, function, types, args=(), kwargs=None):
        result = function(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(result)[0]):
            self.operators.add(str(function))
        return result


def test_training_validation_and_prediction_make_no_float64_tensor(tmp_path, synthetic_root):
    with Float64Made() as made:
        train.main(tiny_args(tmp_path, synthetic_root, 2, "--AMP_DTYPE=float16"))
        checkpoint = tmp_path / "checkpoints" / "best.pt"
        assert predict.main(["--checkpoint", str(checkpoint), "--input", str(synthetic_root / "train"),
                             "--masks", str(synthetic_root / "train_masks"), "--output", str(tmp_path / "out"),
                             "--tta", "--workers", "0"]) == 0
        probability = torch.rand(2, 1, 32, 48)
        rows_on_device(resize_on_device(probability, (128, 192)), [(128, 192)] * 2, 0.5)
    assert made.operators == set()


def test_the_validated_average_holds_no_sync_batchnorm():
    """Rank 0 alone recomputes the average's statistics: SyncBatchNorm there would wait for the
    other processes, which wait in a broadcast (a hang under torchrun)."""
    config = {**train.defaults(), "FEATURES": (4, 8), "SYNC_BATCHNORM": True}
    state = train.new_training_state(train.build_model(config, CPU), config, CPU, None, world_size=2)
    kinds = {type(module) for module in state.model.modules()}
    assert torch.nn.SyncBatchNorm in kinds
    assert not any(isinstance(module, torch.nn.SyncBatchNorm) for module in state.average.model.modules())
    assert recompute_batchnorm(state.average.model, [(torch.rand(2, 3, 32, 48), None)], CPU) == 2
    state.average.update(state.model)  # the same names: the average follows the synchronised weights
    assert state.average.steps == 1


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train, "get_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"^error: torchrun started process 1 of this machine, which has 1 CUDA "
                                         r"device\(s\): use --nproc_per_node=1, or --DEVICE=cpu$"):
        train.setup_distributed({**train.defaults(), "DEVICE": "auto"})


def test_sync_batchnorm_under_torchrun_on_a_cpu_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="^error: SYNC_BATCHNORM needs CUDA devices"):
        train.setup_distributed({**train.defaults(), "DEVICE": "cpu", "SYNC_BATCHNORM": True})


@pytest.mark.parametrize("kind, message", [(torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
                                           (RuntimeError, "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                                           (RuntimeError, "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
                                           (RuntimeError, "MPS backend out of memory (MPS allocated: 9.05 GB)"),
                                           (RuntimeError, "DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_ends_in_one_line_and_frees_the_failed_step(tmp_path, synthetic_root, monkeypatch, kind,
                                                                  message):
    """The notebook keeps the SystemExit: the out-of-memory error must not ride along as its
    context, or the failed step's tensors stay alive and a smaller batch runs out too."""
    steps = []

    def out_of_memory(*args, **kwargs):
        activations = torch.zeros(1000)
        steps.append(weakref.ref(activations))
        raise kind(message)

    monkeypatch.setattr(train, "forward", out_of_memory)
    with pytest.raises(SystemExit, match=r"^error: out of memory on cpu .* training 32x48 images in batches of 4; "
                                         r"try --BATCH_SIZE=") as stopped:
        train.main(tiny_args(tmp_path, synthetic_root, 1))
    assert "\n" not in str(stopped.value)
    assert stopped.value.__context__ is None and steps[0]() is None


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, synthetic_root, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(train, "forward", broken)
    with pytest.raises(RuntimeError, match="same device"):
        train.main(tiny_args(tmp_path, synthetic_root, 1))


def test_an_out_of_memory_error_of_the_31m_unet_in_float16_names_settings_that_fit(tmp_path, synthetic_root,
                                                                                  monkeypatch):
    """A T4's failure at 640x960: the advice is counted on fake tensors, not by float16 steps on the
    CPU (minutes on 2 cores)."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.72 GiB")

    monkeypatch.setattr(train, "forward", out_of_memory)
    monkeypatch.setattr(memory, "device_memory", lambda device: 14.7 * 2**30)
    args = [f"--DATA_DIR={synthetic_root}", f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}", "--NUM_WORKERS=0",
            f"--SAVED_IMAGES={tmp_path / 'pictures'}", f"--CACHE_DIR={tmp_path / 'cache'}",
            "--IMAGE_HEIGHT=640", "--IMAGE_WIDTH=960", "--AMP_DTYPE=float16", "--DEVICE=cpu"]
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    message = str(stopped.value)
    # Per image 1.72 GiB without checkpointing, 0.66 with: 7 fit a T4 (4, keeping the batch of 8), 19 with.
    assert message.startswith("error: out of memory on cpu (14.7 GiB) training 640x960 images in batches of 8; try "
                              "--BATCH_SIZE=4 --ACCUMULATE_STEPS=2 or --BATCH_SIZE=8 --ACCUMULATE_STEPS=1 "
                              "--ACTIVATION_CHECKPOINTING=true; no checkpoint was saved yet, so the same command")
    assert "\n" not in message


def test_the_advice_never_repeats_the_batch_that_failed():
    config = {**train.defaults(), "FEATURES": (4, 8), "IMAGE_HEIGHT": 32, "IMAGE_WIDTH": 48, "BATCH_SIZE": 2}
    advice = memory.fitting_settings(config, 2**40, None)
    assert advice == "--BATCH_SIZE=1 --ACCUMULATE_STEPS=2 or --BATCH_SIZE=2 --ACCUMULATE_STEPS=1 " \
                     "--ACTIVATION_CHECKPOINTING=true"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_fake_count_equals_a_count_of_real_tensors(dtype, checkpointing):
    features, size = (4, 8, 16), (64, 96)
    model = UNet(features=features, activation_checkpointing=checkpointing).to(memory_format=torch.channels_last)
    x, target = torch.rand(2, 3, *size), (torch.rand(2, 1, *size) > 0.5).float()
    with memory.LiveTensors() as live:
        logits = forward(model, x, CPU, dtype)  # alive through the backward pass, as in train.py
        segmentation_loss(logits, target).backward()
    real = live.peak(leaving_out=[parameter.grad for parameter in model.parameters()])
    assert memory.counted_step({"features": features}, size, dtype, checkpointing, batch=2) == pytest.approx(real, rel=1e-3)


def test_loader_processes_train_as_the_main_process_does(tmp_path, synthetic_root):
    """Forked workers (Linux) with persistent training workers: each image's augmentation comes
    from its own seed, so the weights equal those of a run without workers."""
    train.main(tiny_args(tmp_path / "none", synthetic_root, 2))
    train.main(tiny_args(tmp_path / "two", synthetic_root, 2, "--NUM_WORKERS=2"))
    plain = load_checkpoint(tmp_path / "none" / "checkpoints" / "last.pt")["model"]
    workers = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    for name, value in plain.items():
        assert torch.equal(workers[name], value), name


def test_spawned_loader_processes_work_as_on_macos(tmp_path, synthetic_root):
    """macOS and Windows start loader processes by spawning: the dataset, its cache and its
    transforms are pickled and the modules imported afresh."""
    script = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
              "sys.path.insert(0, sys.argv[1]); import train; train.main(sys.argv[2:])")
    args = tiny_args(tmp_path, synthetic_root, 2, "--NUM_WORKERS=2")
    run = subprocess.run([sys.executable, "-c", script, str(Path(train.__file__).parent), *args],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_workers_are_bounded_and_validation_from_the_cache_needs_none(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.setattr(train, "available_cores", lambda: 16)
    config, _ = train.parse_settings(tiny_args(tmp_path, synthetic_root, 1, *LEARNS, "--NUM_WORKERS=auto"))
    from conftest import split_of

    training, validation = split_of(config)
    loaders = train.make_loaders(training, validation, config, torch.device("cuda"), 0, 1)
    assert loaders.train.num_workers == 8 and loaders.train.persistent_workers
    assert loaders.val.num_workers == 0 and loaders.batchnorm.num_workers == 0
    uncached = train.make_loaders(training, validation, {**config, "CACHE_DIR": ""}, torch.device("cuda"), 0, 1)
    assert uncached.val.num_workers == 8 and not uncached.val.persistent_workers


def test_the_advice_reads_a_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 14.7 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**30)
    assert memory.device_memory(torch.device("cuda")) == 12 * 2**30
