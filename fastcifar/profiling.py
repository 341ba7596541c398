"""Where each training step's time goes: data (waiting for the next ready batch, which includes the
on-device augmentation) versus compute (forward, backward, optimizer step).

`StepTimer` is always on and cheap: wall clock on CPU; on CUDA, events recorded at the phase
boundaries and read once per epoch, so no step waits for the device.
"""

from __future__ import annotations

import time

import torch

# torch-tb-profiler's Overview counts a range as DataLoader time when its name starts with this.
DATA_RANGE = "enumerate(DataLoader)#FFCVLoader.__next__"
FORWARD_RANGE = "fastcifar#forward"
BACKWARD_RANGE = "fastcifar#backward"
OPTIMIZER_RANGE = "fastcifar#optimizer_step"


class StepTimer:
    """Marks data_start -> data_end -> compute_end for each step; totals per epoch."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._marks: list[tuple] = []  # (data_start, data_end, compute_end) per step

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def data_start(self) -> None:
        self._start = self._now()

    def data_end(self) -> None:
        self._data_end = self._now()

    def compute_end(self) -> None:
        self._marks.append((self._start, self._data_end, self._now()))

    def totals(self) -> tuple[float, float]:
        """(data seconds, compute seconds) summed over the steps since reset. Syncs once on CUDA."""
        if not self._marks:
            return 0.0, 0.0
        if self.cuda:
            torch.cuda.synchronize()
            data = sum(a.elapsed_time(b) for a, b, _ in self._marks) / 1e3
            compute = sum(b.elapsed_time(c) for _, b, c in self._marks) / 1e3
        else:
            data = sum(b - a for a, b, _ in self._marks)
            compute = sum(c - b for _, b, c in self._marks)
        return data, compute

    @property
    def steps(self) -> int:
        return len(self._marks)


def data_fraction(data_s: float, compute_s: float) -> float:
    total = data_s + compute_s
    return data_s / total if total > 0 else 0.0
