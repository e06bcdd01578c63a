"""train.py under torchrun, recording which training images each process was given and how many
times DDP all-reduced gradients.

Used by test_distributed.py: torchrun --nproc_per_node=2 tests/ddp_probe.py SEEN_DIR --NAME=value ...
"""
import atexit
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

import train

seen_dir, arguments = Path(sys.argv[1]), sys.argv[2:]
original_iter = DistributedSampler.__iter__
original_init = DistributedDataParallel.__init__
all_reduces = [0]


def recording_iter(sampler):
    indices = list(original_iter(sampler))
    with open(seen_dir / f"rank{os.environ['RANK']}_epoch{sampler.epoch}.txt", "w") as record:
        record.write("".join(f"{sampler.dataset.samples[i].image.name}\n" for i in indices))
    return iter(indices)


def counting_hook(process_group, bucket):
    all_reduces[0] += 1
    return allreduce_hook(process_group, bucket)


def counting_init(model, *args, **kwargs):
    original_init(model, *args, **kwargs)
    model.register_comm_hook(None, counting_hook)


def write_count():
    (seen_dir / f"all_reduces_rank{os.environ['RANK']}.count").write_text(str(all_reduces[0]))


DistributedSampler.__iter__ = recording_iter
DistributedDataParallel.__init__ = counting_init
atexit.register(write_count)
train.main(arguments)
