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
from .devices import device_name
from .utils import usable_cpus


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


# What `make results` writes into the checkout: its own output does not make the code it measures "dirty"
# (re-measuring a committed column rewrites tracked files there).
RESULTS_PATH = "docs/results"


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the checkout that runs, with '+dirty' when a tracked file outside docs/results/ has
    uncommitted changes."""
    here = where or Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                      f":(top,exclude){RESULTS_PATH}")
        return commit + ("+dirty" if commit and changed else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


# The instruction-set flags that change what this benchmark measures (vector width, bf16/AMX units).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
# Packages whose version a figure depends on ("absent" when not installed).
PACKAGES = ("numpy", "numba", "llvmlite", "ffcv", "torchvision", "tensorboard", "torch-tb-profiler", "opencv-python",
            "opencv-python-headless", "pillow")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); {} elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine() -> dict:
    """The CPU as the OS names it, its instruction-set flags, logical CPUs (and whether they are cores
    or hyper-threads), memory, OS and kernel: two machines of one model name can differ in all of
    these (an AVX2 and an AVX-512 "AMD EPYC" measured 3.8x and 7.8x on the same benchmark)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    logical = os.cpu_count() or 1
    siblings = _read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") or "0"
    per_core = sum(int(b) - int(a) + 1 if "-" in part else 1
                   for part in siblings.split(",") for a, _, b in [part.partition("-")])
    meminfo = _read("/proc/meminfo") or ""
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), None)
    os_release = _read("/etc/os-release") or ""
    pretty = next((line.split("=", 1)[1].strip('"') for line in os_release.splitlines()
                   if line.startswith("PRETTY_NAME=")), platform.system())
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "cpu_stepping": info.get("stepping"),
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS} if flags else {},
        "logical_cpus": logical,
        "usable_cpus": usable_cpus(),
        "threads_per_core": per_core,
        "logical_cpus_are": "hyper-threads (SMT)" if per_core > 1 else "cores (one thread each)",
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "architecture": platform.machine(),
        "os": pretty,
        "kernel": platform.release(),
    }


def versions() -> dict:
    """Python, torch with its build (cpu, cuXXX, rocm), and every package a figure depends on."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    dali = sorted({d.metadata["Name"] + " " + d.version for d in distributions()
                   if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")})
    build = (f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else
             "rocm" if getattr(torch.version, "hip", None) else "cpu")
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_build": build,
            **{name: of(name) for name in PACKAGES}, "dali": ", ".join(dali) or "absent", "spdl": of("spdl-core")}


def gpu(device: torch.device) -> dict | None:
    """The GPU's name, memory, driver, CUDA and cuDNN versions (None off CUDA)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "driver": driver, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


# Environment variables that change what a figure measures (threads, OpenMP waiting, compilers, caches):
# recorded in every results JSON, so that an option run says which option it was.
SETTING_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "TORCH", "NUMBA_", "FASTCIFAR_", "THP_", "MALLOC_",
                    "CUDA_VISIBLE_DEVICES")


# Variables that name a place on the measuring machine (data, caches): recorded as "set", never their
# value, because a results JSON is published and a path says nothing about what was measured.
PLACE_VARIABLES = ("FASTCIFAR_CIFAR_ARCHIVE", "TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR")


def setting_variables() -> dict[str, str]:
    return {k: "set" if k in PLACE_VARIABLES else v for k, v in sorted(os.environ.items())
            if k.startswith(SETTING_PREFIXES)}


def environment(device: torch.device, module: str = "fastcifar.train", **settings: object) -> dict:
    """Versions, device, threads, the run's settings and the command line: read at start, so the
    git commit is that of the code that runs."""
    import numpy

    stack = versions()  # ffcv's from its metadata: ffcv.__version__ says 0.0.3rc1 in the 1.0.2 release
    cuda = torch.device(device).type == "cuda"
    return {
        "fastcifar": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "ffcv": None if stack["ffcv"] == "absent" else stack["ffcv"],
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "versions": stack,
        "gpu": gpu(device),
        **settings,
        "environment_variables": setting_variables(),
        "git_commit": git_commit(),
        **({"run_id": os.environ["FASTCIFAR_RUN_ID"]} if os.environ.get("FASTCIFAR_RUN_ID") else {}),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        # a module name runs with -m, a script (tools/...) by its path
        "command": " ".join([Path(sys.executable).name, *([module] if module.endswith(".py") else ["-m", module]),
                             *sys.argv[1:]]),
    }
