"""train.py under torchrun, recording which training images each process was given.

Used by test_distributed.py: torchrun --nproc_per_node=2 tests/ddp_probe.py SEEN_DIR --NAME=value ...
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DistributedSampler

import train

seen_dir, arguments = Path(sys.argv[1]), sys.argv[2:]
original_iter = DistributedSampler.__iter__


def recording_iter(sampler):
    indices = list(original_iter(sampler))
    with open(seen_dir / f"rank{os.environ['RANK']}_epoch{sampler.epoch}.txt", "w") as record:
        record.write("".join(f"{sampler.dataset.samples[i].image.name}\n" for i in indices))
    return iter(indices)


DistributedSampler.__iter__ = recording_iter
train.main(arguments)
