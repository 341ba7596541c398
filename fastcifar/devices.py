"""The device a command runs on: resolved from --device, synchronised for timings, named for reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .utils import UserError


def resolve_device(name: str):
    """'auto' -> cuda when available, else cpu; anything else must be a valid, available device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def synchronize(device) -> None:
    """Wait for queued device work so that wall-clock timings cover it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """The GPU's name, or the CPU model and core count: the 'machine' every figure is quoted with."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
