"""What ran, where and how: the process's start time from the OS, float32 precision on GPUs, and the
environment recorded with every result (versions, device, settings, git commit, command line)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .utils import device_name


def seconds_since_process_start() -> float:
    """Seconds since the OS started this process: interpreter start-up and imports included.

    The spec's total training time runs from the start of the training script, so the clock is the
    kernel's, not a timestamp taken somewhere in our imports. Linux: /proc/self/stat's start time
    (clock ticks since boot) against CLOCK_BOOTTIME, 10 ms resolution; elsewhere psutil when present,
    else the time since this module was imported (said so in the name of the fallback).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after "(comm)"
        elapsed = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= elapsed < 365 * 86400:
            return elapsed
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil missing or unsupported here
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def set_float32_precision(device: torch.device, tf32: bool) -> dict:
    """True float32 unless asked: cuDNN convolutions may use TF32 by default on Ampere and Hopper,
    which is not the spec's float32. Sets both cuDNN and matmul (legacy flags, one API: mixing the
    legacy and the fp32_precision APIs is an error in current torch); returns what is now in force."""
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return {
        "tf32": tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "applies": torch.device(device).type == "cuda",  # TF32 is a GPU format: on CPU nothing changes
    }


def set_cudnn(device: torch.device, deterministic: bool) -> dict:
    """cuDNN's autotuner on CUDA (fixed input sizes: it picks the fastest convolution algorithms once,
    as airbench does), or with `deterministic` cuDNN's deterministic algorithms and no autotuning;
    returns what is now in force. On the CPU cuDNN is not used: recorded as not applying."""
    cuda = torch.device(device).type == "cuda"
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": deterministic,
            "applies": cuda}


def adamw(params, device: torch.device, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, dict]:
    """The spec's AdamW (betas 0.9/0.999): fused into one kernel per step on CUDA (a step of many small
    kernels is launch-bound there), torch's default (foreach) implementation on the CPU. Returns the
    optimizer and what was chosen, for `env`."""
    fused = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay,
                                  **({"fused": True} if fused else {}))
    return optimizer, {"name": "AdamW", "fused": fused}


def git_commit() -> str | None:
    """HEAD of the checkout that runs, with '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if commit and git("status", "--porcelain", "--untracked-files=no") else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, module: str = "fastcifar.train", **settings: object) -> dict:
    """Versions, device, threads, the run's settings and the command line: read at start, so the
    git commit is that of the code that runs."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    try:
        ffcv_version = version("ffcv")  # ffcv.__version__ says 0.0.3rc1 in the 1.0.2 release
    except PackageNotFoundError:
        ffcv_version = None
    cuda = torch.device(device).type == "cuda"
    return {
        "fastcifar": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "ffcv": ffcv_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        **settings,
        "git_commit": git_commit(),
        # a module name runs with -m, a script (tools/...) by its path
        "command": " ".join([Path(sys.executable).name, *([module] if module.endswith(".py") else ["-m", module]),
                             *sys.argv[1:]]),
    }
