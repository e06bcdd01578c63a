"""Seconds a training run spends in each part of its loop, for `bench.py --epoch`. A part waits
for the device at its start and end (once an epoch or less), so that a GPU's queued work is counted
in the part that queued it."""
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def synchronize(device):
    """Wait for the device's queued work, so that a time measures the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    def __init__(self, device):
        self.device, self.seconds, self.started = device, defaultdict(float), time.perf_counter()

    @contextmanager
    def part(self, name):
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - started

    def parts(self):
        """The seconds of each part, and "other" for the rest of the time since the start."""
        total = time.perf_counter() - self.started
        return {**self.seconds, "other": max(0.0, total - sum(self.seconds.values()))}
