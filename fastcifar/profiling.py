"""Where each training step's time goes: data (waiting for the next ready batch, which includes the
on-device augmentation) versus compute (forward, backward, optimizer step).

`StepTimer` is always on and cheap: wall clock on CPU; on CUDA, events recorded at the phase
boundaries and read once per epoch, so no step waits for the device. `TraceProfiler` (--profile)
records a torch.profiler window and rewrites the trace so torch-tb-profiler 0.4.3 shows the data
phase as DataLoader time; `ScalarLog` writes per-epoch TensorBoard scalars beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .trace_breakdown import BACKWARD_RANGE, DATA_RANGE, FORWARD_RANGE, OPTIMIZER_RANGE  # noqa: F401 (named once)
from .utils import UserError, atomic_path, write_json_atomic


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


# ---------------------------------------------------------------------------------------------
# --profile: a torch.profiler trace of a short window, readable by torch-tb-profiler


def parse_profile_steps(text: str) -> tuple[int, int, int]:
    """'WAIT,WARMUP,ACTIVE' -> ints; wait/warmup >= 0, active >= 1."""
    try:
        wait, warmup, active = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--profile-steps expects WAIT,WARMUP,ACTIVE (e.g. 5,3,10), got {text!r}") from None
    if wait < 0 or warmup < 0 or active < 1:
        raise UserError(f"--profile-steps needs WAIT >= 0, WARMUP >= 0 and ACTIVE >= 1, got {text!r}")
    return wait, warmup, active


def rewrite_trace(path: Path) -> tuple[int, int]:
    """Make the ranges torch writes as `user_annotation` visible to torch-tb-profiler 0.4.3.

    That plugin (its last release) drops every `user_annotation` event except `ProfilerStep#N`,
    so the data range would not count as DataLoader time and the compute ranges would vanish.
    Relabelled `cpu_op`, they become operators: the DataLoader share shows in its Overview.
    Perfetto and chrome://tracing read either category. Atomic; returns (events, relabelled).
    """
    trace = json.loads(Path(path).read_text())
    events = trace.get("traceEvents", [])
    changed = 0
    for event in events:
        if event.get("cat") == "user_annotation" and not str(event.get("name", "")).startswith("ProfilerStep#"):
            event["cat"] = "cpu_op"
            changed += 1
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(trace))
    return len(events), changed


class TraceProfiler:
    """torch.profiler over one epoch's window (wait, warmup, active steps), written as a
    TensorBoard trace into `run_dir` and then rewritten by `rewrite_trace`; where its steps went
    (`trace_breakdown`) written beside it as breakdown.json and breakdown.png."""

    def __init__(self, run_dir: Path, device: torch.device, steps: tuple[int, int, int]):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.traces: list[Path] = []
        self.breakdown: dict | None = None
        write = tensorboard_trace_handler(str(self.run_dir), worker_name="fastcifar")

        def on_trace_ready(prof) -> None:
            before = set(self.run_dir.glob("*.pt.trace.json"))
            write(prof)
            for path in sorted(set(self.run_dir.glob("*.pt.trace.json")) - before):
                rewrite_trace(path)
                self.traces.append(path)
                self.breakdown = write_breakdown(path, self.run_dir)

        activities = [ProfilerActivity.CPU]
        if torch.device(device).type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        wait, warmup, active = steps
        self.profile = profile(activities=activities, on_trace_ready=on_trace_ready,
                               schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))

    def __enter__(self) -> TraceProfiler:
        self.profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.profile.__exit__(*exc)

    def step(self, _loss=None) -> None:
        self.profile.step()


def write_breakdown(trace: Path, folder: Path) -> dict:
    """The trace's breakdown as breakdown.json and breakdown.png in `folder`; returns it."""
    from . import trace_breakdown

    result = trace_breakdown.breakdown(trace)
    write_json_atomic(folder / "breakdown.json", result)
    trace_breakdown.plot(result, folder / "breakdown.png",
                         f"where the profiled training steps went: {result['step_ms']:.1f} ms per step ({trace.name})")
    return result


class ScalarLog:
    """Per-epoch TensorBoard scalars in the profile's run folder, beside the traces."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def epoch(self, epoch: int, stats: dict) -> None:
        self.writer.add_scalar("train/loss", stats["train_loss"], epoch)
        self.writer.add_scalar("train/accuracy", stats["train_acc"], epoch)
        self.writer.add_scalar("val/accuracy", stats["val_acc"], epoch)
        self.writer.add_scalar("val/loss", stats["val_loss"], epoch)
        self.writer.add_scalar("throughput/images_per_s", stats["images_per_s"], epoch)
        self.writer.add_scalar("time/data_fraction", stats["data_fraction"], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
