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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_base(model: str | None) -> str:
    return re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*|\d+-core", "", (model or "cpu").lower())


def _family_model(family: object, model: object) -> str:
    """'f26m2': the CPU's family and model numbers, which tell apart CPUs that share a marketing name (two AMD
    EPYC generations, 2x apart, both say 'AMD EPYC'). Empty where a record predates them."""
    return f" f{family}m{model}" if family is not None and model is not None else ""


def machine_name(env: dict) -> str:
    """A short, stable folder name for a machine: the GPU's model (and its count) where a GPU ran, else the
    CPU's model, its family and model numbers and its widest vector unit; then the usable CPUs.
    'amd-epyc-f26m2-avx512-2c', 'nvidia-h200-16c'. A record without family and model (before they were
    recorded) derives the name without them, which no machine measured since can derive."""
    mach = env.get("machine") or {}
    gpu = (env.get("gpu") or {}).get("name")
    if gpu:
        base = re.sub(r"\b(nvidia|geforce|tesla)\b", "", gpu.lower())
        base = "nvidia-" + base if "nvidia" in gpu.lower() else base
    else:
        base = _cpu_base(mach.get("cpu_model")) + _family_model(mach.get("cpu_family"), mach.get("cpu_model_number"))
        base += " " + isa_tag(mach.get("cpu_flags") or {})
    return f"{_slug(base)}-{mach.get('usable_cpus') or mach.get('logical_cpus') or os.cpu_count()}c"


def belongs(env: dict, folder: str) -> bool:
    """Whether a record was measured on the machine `folder` names: its name derives the folder's, or would
    with all the machine's logical CPUs (a process that narrowed its own affinity, as an option sweep's
    `OMP_PROC_BIND` run did, ran on the same machine)."""
    mach = env.get("machine") or {}
    return folder in (machine_name(env), machine_name({**env, "machine": {**mach, "usable_cpus": None}}))


def note_machine_name(note: dict) -> str:
    """The folder name a machine.json describes, by the same rule as `machine_name`."""
    base = _cpu_base(note.get("cpu_model")) + _family_model(note.get("cpu_family"), note.get("cpu_model_number"))
    return f"{_slug(base + ' ' + note.get('isa'))}-{note.get('logical_cpus')}c"


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
            + (f"SPDL {v['spdl']}, " if v.get("spdl") else "") +
            f"torchvision {v['torchvision']}, tensorboard {v['tensorboard']}, "
            f"torch-tb-profiler {v['torch-tb-profiler']}")
