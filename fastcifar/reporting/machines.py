"""A machine as its results JSONs record it (`env.machine`), in words and as a folder name: pure functions
of a recorded dict, so that reading results never needs torch."""

from __future__ import annotations

import os
import re


def isa_tag(flags: dict) -> str:
    """The widest vector unit the flags name: amx, avx512, avx2, neon/sve, or sse."""
    for tag, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"), ("sve", "sve"),
                      ("neon", "asimd")):
        if flags.get(flag):
            return tag
    return "sse"


def machine_name(env: dict) -> str:
    """A short, stable folder name for a machine: the GPU's model (and its count) where a GPU ran, else the
    CPU's model with its widest vector unit; then the logical CPUs. 'amd-epyc-avx512-2c', 'nvidia-h200-16c'."""
    mach = env.get("machine") or {}
    gpu = (env.get("gpu") or {}).get("name")
    if gpu:
        base = re.sub(r"\b(nvidia|geforce|tesla)\b", "", gpu.lower())
        base = "nvidia-" + base if "nvidia" in gpu.lower() else base
    else:
        base = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*|\d+-core", "", (mach.get("cpu_model") or "cpu").lower())
        base += " " + isa_tag(mach.get("cpu_flags") or {})
    slug = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    return f"{slug}-{mach.get('usable_cpus') or mach.get('logical_cpus') or os.cpu_count()}c"


def machine_line(env: dict) -> str | None:
    """One line for a report: the CPU as the OS names it, its flags, CPUs, memory, OS, the GPU, the stack's
    versions (None for an env recorded before `machine` was)."""
    mach, v, gpu = env.get("machine"), env.get("versions"), env.get("gpu")
    if not mach or not v:
        return None
    flags = ", ".join(k for k, on in mach["cpu_flags"].items() if on) or "none recorded"
    gpu_text = (f"; GPU {gpu['name']} ({gpu['memory_gib']} GiB), driver {gpu['driver']}, CUDA {gpu['cuda']}, "
                f"cuDNN {gpu['cudnn']}") if gpu else "; no GPU"
    return (f"{mach['cpu_model']} ({mach['cpu_vendor']}, family {mach['cpu_family']} model {mach['cpu_model_number']}),"
            f" {mach['logical_cpus']} logical CPUs, {mach['logical_cpus_are']}, {mach['memory_gib']} GiB; flags: "
            f"{flags}; {mach['os']}, kernel {mach['kernel']}{gpu_text}. Python {v['python']}, torch {v['torch']} "
            f"({v['torch_build']}), numpy {v['numpy']}, numba {v['numba']}, ffcv {v['ffcv']}, DALI {v['dali']}, "
            f"torchvision {v['torchvision']}, tensorboard {v['tensorboard']}, "
            f"torch-tb-profiler {v['torch-tb-profiler']}")
