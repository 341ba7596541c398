"""How close a step comes to what the device can do: the FLOPs of a step (counted by torch), the device's
attainable float32 rate (a matmul probe on the run's own threads), and their ratio, the utilisation.

Why a matmul and not the datasheet: a large fp32 matmul is the best-tuned kernel the installed torch
has on that device, run on the threads the run has (2 cores of a VM are not a socket's datasheet
peak, and the clock a VM gets is not the nominal one). So utilisation says how much of what *this*
torch can get out of *this* machine a training step uses; docs/benchmarks.md gives the datasheet
peak beside it where the device's model names one.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from .utils import synchronize

COUNTED_BY = "torch.utils.flop_counter.FlopCounterMode"
# Matmul sizes of the probe: big enough to reach the kernel's steady rate, small enough that one call
# is a fraction of the probe's time (2048^3 x 2 = 17 GFLOP: ~0.1 s on 2 CPU cores, microseconds on a GPU).
PROBE_N = {"cpu": 2048, "cuda": 8192}


@functools.cache
def step_flops(batch: int, num_classes: int = 10) -> dict[str, int]:
    """FLOPs of one training step (forward + backward of the loss; the optimizer's few element-wise
    FLOPs are not counted) and of one inference forward, for a batch of `batch` images of the spec
    model. Counted on the meta device: shapes only, no arithmetic, the same counts as on any device.
    Cached per (batch, classes) within the process."""
    from torch.utils.flop_counter import FlopCounterMode

    from .model import resnetv2_20

    model = resnetv2_20(num_classes).to(device="meta", memory_format=torch.channels_last)
    images = torch.zeros(batch, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(batch, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss = nn.functional.cross_entropy(model(images), labels)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return {"forward": int(forward), "backward": int(counter.get_total_flops()),
            "train_step": int(forward + counter.get_total_flops())}


def flops_record(batch: int) -> dict:
    """What the results JSONs hold: per image (train step and inference) and per batch, and how counted."""
    counts = step_flops(batch)
    return {"flops_per_image": counts["train_step"] / batch, "inference_flops_per_image": counts["forward"] / batch,
            "batch": batch, **{f"{k}_flops": v for k, v in counts.items()}, "counted_by": COUNTED_BY,
            "excludes": "the optimizer step (a few FLOPs per parameter)"}


def matmul_probe(device: torch.device, seconds: float = 1.5, n: int | None = None) -> dict:
    """The device's attainable float32 rate: an n x n fp32 matmul, one untimed call (warm-up: the
    kernel's selection, the threads' start), then calls for about `seconds`, each timed with the device
    synchronised at both ends. Attainable = the fastest call's rate (the median is kept beside it).
    Runs under the precision the caller set (TF32 on CUDA only with --tf32) and on its torch threads."""
    device = torch.device(device)
    n = n or PROBE_N.get(device.type, PROBE_N["cpu"])
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    torch.mm(a, b)
    synchronize(device)
    rates, start = [], time.perf_counter()
    while not rates or (time.perf_counter() - start < seconds and len(rates) < 1000):
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return {"gflops": rates[-1], "median_gflops": rates[len(rates) // 2], "calls": len(rates),
            "seconds": round(time.perf_counter() - start, 3), "n": n,
            "method": f"torch.mm of two {n}x{n} float32 matrices: the fastest of {len(rates)} calls after one "
                      "untimed call, each timed with the device synchronised",
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}


def utilisation(images_per_s: float, flops_per_image: float, attainable_gflops: float) -> dict:
    """Achieved GFLOP/s at `images_per_s` and its fraction of the attainable rate."""
    achieved = images_per_s * flops_per_image / 1e9
    return {"gflops": achieved, "utilisation": achieved / attainable_gflops}


def run_utilisation(results: dict, probe: dict, batch: int, devices: int = 1) -> dict:
    """The train results' `flops` and `utilisation`: the mean epoch (every second of it, the wait for
    data included) and its compute time alone (the steps without the wait), over the probe's rate
    times `devices` (under torchrun every process has its own device and threads)."""
    flops = flops_record(batch)
    attainable = probe["gflops"] * devices
    images = sum(e["train_images"] for e in results["epochs"])
    seconds = sum(e["seconds"] for e in results["epochs"])
    return {"flops_per_image": flops["flops_per_image"], "flops": flops,
            "utilisation": {"attainable_gflops": attainable, "devices": devices,
                            "mean_epoch": utilisation(images / seconds, flops["flops_per_image"], attainable),
                            "compute_time": utilisation(images / max(results["compute_time_s"], 1e-9),
                                                        flops["flops_per_image"], attainable)}}
