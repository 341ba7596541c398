"""How close a step comes to what the device can do: the FLOPs of a step (counted by torch), the device's
attainable float32 rate (a probe of torch's fastest fp32 kernels on the run's own threads), and their
ratio, the utilisation.

Why a probe and not the datasheet: a large fp32 matmul and a large convolution are the best-tuned
kernels the installed torch has on that device, run on the threads the run has (2 cores of a VM are
not a socket's datasheet peak, and the clock a VM gets is not the nominal one). So utilisation says
how much of what *this* torch can get out of *this* machine a training step uses; docs/benchmarks.md
gives the datasheet peak beside it where the device's model names one.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from .devices import synchronize

COUNTED_BY = "torch.utils.flop_counter.FlopCounterMode"
# Matmul sizes of the probe: big enough to reach the kernel's steady rate, small enough that one call
# is a fraction of the probe's time (2048^3 x 2 = 17 GFLOP: ~0.1 s on 2 CPU cores, microseconds on a GPU).
PROBE_N = {"cpu": 2048, "cuda": 8192}
# The convolution probe: (batch, channels, size) of a 3x3 conv, ~19 GFLOP (CPU) and ~300 GFLOP (CUDA) a call.
PROBE_CONV = {"cpu": (32, 256, 16), "cuda": (256, 256, 32)}


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


def _fastest(call, flops: float, device: torch.device, seconds: float) -> dict:
    """One untimed call (the kernel's selection, the threads' start), then calls for about `seconds`,
    each timed with the device synchronised at both ends; the fastest call's rate and the median."""
    call()
    synchronize(device)
    rates, start = [], time.perf_counter()
    while not rates or (time.perf_counter() - start < seconds and len(rates) < 1000):
        t0 = time.perf_counter()
        call()
        synchronize(device)
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return {"gflops": rates[-1], "median_gflops": rates[len(rates) // 2], "calls": len(rates),
            "seconds": round(time.perf_counter() - start, 3)}


def attainable_probe(device: torch.device, seconds: float = 1.5) -> dict:
    """The device's attainable float32 rate: the faster of torch's two best-tuned fp32 kernels on it, a
    large matmul (MKL or cuBLAS) and a large 3x3 convolution in channels-last (oneDNN or cuDNN, the
    kernels the model runs), each for half of `seconds`, on the caller's threads and under its
    precision (TF32 on CUDA only with --tf32). Why both: on an AMD EPYC with AVX-512, torch's
    matmul ran at ~190 GFLOP/s on 2 cores (about those cores' AVX2 peak) while oneDNN's convolutions
    ran at up to 479 GFLOP/s, and a training epoch reached 193 GFLOP/s: above the matmul's "peak"."""
    device = torch.device(device)
    n = PROBE_N.get(device.type, PROBE_N["cpu"])
    batch, channels, size = PROBE_CONV.get(device.type, PROBE_CONV["cpu"])
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    mm = _fastest(lambda: torch.mm(a, b), 2 * n ** 3, device, seconds / 2)
    mm["what"] = f"torch.mm of two {n}x{n} float32 matrices"
    x = torch.randn(batch, channels, size, size, device=device, generator=gen).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, device=device, generator=gen).contiguous(
        memory_format=torch.channels_last)
    conv = _fastest(lambda: nn.functional.conv2d(x, w, padding=1), 2 * batch * channels ** 2 * 9 * size ** 2,
                    device, seconds / 2)
    conv["what"] = (f"torch.nn.functional.conv2d, {batch}x{channels}x{size}x{size} channels-last float32 input, "
                    f"{channels} 3x3 filters, padding 1")
    best = max(("matmul", mm), ("conv", conv), key=lambda kv: kv[1]["gflops"])
    return {"gflops": best[1]["gflops"], "median_gflops": best[1]["median_gflops"], "kernel": best[0],
            "matmul": mm, "conv": conv,
            "method": f"the faster of {mm['what']} and {conv['what']}: each the fastest of its calls after one "
                      "untimed call, each call timed with the device synchronised",
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
