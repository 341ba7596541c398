"""Where a profiled run's steps went, read from its trace file: `train --profile` and `step_breakdown` both
end with this table, its JSON and its PNG, readable without TensorBoard (whose profiler plugin is deprecated
upstream and whose Overview needs the web) and without Perfetto.

One classifier, keyed on one set of range names (below), reads the trace torch.profiler wrote (Chrome's
trace format, `.json` or `.json.gz`), so a fixture can drive it:
- **On a CPU** each op's own time (its duration less its children's, on the thread that ran it) inside a
  step range, by its name and the ranges around it: the step ranges' own time is counted too, so the
  categories add up to the steps. Inductor's C++ kernels appear only when the run compiled with
  `torch._inductor.config.cpp.enable_kernel_profile` (a profiled run does).
- **On CUDA** a step's time is its kernels' time on the GPU: each kernel (and copy) launched inside a step
  range, on whichever CPU thread launched it (autograd runs the backward on its own thread, outside the
  step's range), is classified by its name and its launch's ranges; the time within the steps' GPU window
  that no kernel covers is "GPU idle (waiting for the host)": launches, Python, the data phase's host work.
No torch import: reading a trace needs none.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

from .utils import UserError, first_line

# The ranges the classifier keys on. torch-tb-profiler counts a range as DataLoader time when its name
# starts with "enumerate(DataLoader)#" and ends with ".__next__" (the names torch's own DataLoader uses).
DATA_RANGE = "enumerate(DataLoader)#FFCVLoader.__next__"
FORWARD_RANGE = "fastcifar#forward"
BACKWARD_RANGE = "fastcifar#backward"
OPTIMIZER_RANGE = "fastcifar#optimizer_step"
STEP_RANGE = "fastcifar#step"  # step_breakdown's step; train's steps are torch.profiler's ProfilerStep#N
PROFILER_STEP = "ProfilerStep#"

DATA = "waiting for data"
IDLE = "GPU idle (waiting for the host)"
CATEGORIES = [DATA, "convolution forward", "convolution backward", "element-wise, compiled (forward)",
              "element-wise, compiled (backward)", "optimizer", "allocation and graph overhead", "other"]
# Inductor's wrappers and the allocations its generated code makes: what the compiled graphs cost beyond
# their kernels (the `## Call CompiledFxGraph ##` range's own time is the generated code allocating buffers).
OVERHEAD_PREFIXES = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup",
                     "Pregraph bytecode", "AOTDispatcher Runtime Wrapper", "CompiledFunction",
                     "aten::empty", "aten::empty_strided", "aten::resize_", "cudaMalloc", "cudaFree")
CONV_KERNEL_MARKS = ("conv", "cudnn", "xmma", "implicit_gemm", "implicit_convolve", "wgrad", "dgrad", "winograd")


def read_trace(path: Path) -> list[dict]:
    """The trace's events; a file that cannot be read or is not a torch.profiler trace is an error."""
    path = Path(path)
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)) as f:
            trace = json.load(f)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable trace ({first_line(err)})") from None
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list):
        raise UserError(f"{path}: not a torch.profiler trace (no traceEvents list)")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
            and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))]


def _is_step(name: str) -> bool:
    return name == STEP_RANGE or name.startswith(PROFILER_STEP)


def nest(events: list[dict]) -> None:
    """Per thread, each event's enclosing events (`_up`, innermost first) and own time (`_self`, µs)."""
    threads: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        e["_self"], e["_up"] = float(e["dur"]), []
        threads[(e.get("pid"), e.get("tid"))].append(e)
    for thread in threads.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in thread:
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
                stack.pop()
            if stack:
                stack[-1]["_self"] -= min(e["dur"], stack[-1]["ts"] + stack[-1]["dur"] - e["ts"])
                e["_up"] = [s["name"] for s in reversed(stack)]
            stack.append(e)


def _phase(chain: list[str]) -> str | None:
    """data, optimizer or backward from an event's name and the ranges around it (or its launch's), innermost
    first: a range's own time counts as its phase (waiting inside the data range is waiting for data)."""
    for name in chain:
        if name.startswith("enumerate(DataLoader)#"):
            return "data"
        if name == OPTIMIZER_RANGE or name.startswith("Optimizer."):  # step and zero_grad
            return "optimizer"
        if name == BACKWARD_RANGE or "Backward" in name or name.startswith("autograd::engine"):
            return "backward"
    return None


def _category(name: str, up: list[str], cuda: bool) -> str:
    phase = _phase([name, *up])
    if phase == "data":
        return DATA
    if phase == "optimizer" or (cuda and ("multi_tensor_apply" in name or "fused_adam" in name.lower())):
        return "optimizer"
    backward = phase == "backward"
    if "cpp_fused" in name or "triton_" in name or name.startswith("graph_"):
        return f"element-wise, compiled ({'backward' if backward else 'forward'})"
    lowered = name.lower()
    if "convolution_backward" in name or (cuda and ("wgrad" in lowered or "dgrad" in lowered)):
        return "convolution backward"
    if "convolution" in name or name.startswith(("aten::cudnn_conv", "aten::mkldnn_conv")) or (
            cuda and any(mark in lowered for mark in CONV_KERNEL_MARKS)):
        return "convolution backward" if backward else "convolution forward"
    if name.startswith(OVERHEAD_PREFIXES):
        return "allocation and graph overhead"
    return "other"


def classify(events: list[dict]) -> dict:
    """ms per step per category, the steps and their mean duration; CUDA when the trace has kernels."""
    nest(events)
    steps = [e for e in events if _is_step(e["name"]) and not e["_up"] and e.get("cat") != "gpu_user_annotation"]
    if not steps:
        raise UserError(f"the trace has no step range ({PROFILER_STEP}N or {STEP_RANGE}): nothing to attribute")
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    totals: dict[str, float] = defaultdict(float)
    if kernels:
        windows = sorted((s["ts"], s["ts"] + s["dur"]) for s in steps)
        launches = {e["args"]["correlation"]: e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                    and isinstance(e.get("args"), dict) and "correlation" in e["args"]}
        ran = []
        for k in kernels:
            launch = launches.get((k.get("args") or {}).get("correlation"))
            if launch is None or not any(a <= launch["ts"] <= b for a, b in windows):
                continue  # launched outside the profiled steps
            totals[_category(k["name"], launch["_up"], cuda=True)] += k["dur"]
            ran.append((k["ts"], k["ts"] + k["dur"]))
        if not ran:
            raise UserError("the trace has kernels but none launched inside a step range")
        ran.sort()
        busy, reach = 0.0, ran[0][0]
        for a, b in ran:  # the union of the kernels' intervals: overlapping streams count once
            if b > reach:
                busy += b - max(a, reach)
                reach = b
        window = ran[-1][1] - ran[0][0]
        factor = busy / sum(totals.values())  # kernels on concurrent streams: their times shared out
        for key in list(totals):
            totals[key] *= factor
        totals[IDLE] = window - busy
        step_us, names = window, [*CATEGORIES, IDLE]
    else:
        step_ids = {id(s) for s in steps}
        for e in events:
            if id(e) in step_ids:
                totals["other"] += e["_self"]  # the step range's own time: Python between the ops
            elif any(_is_step(n) for n in e["_up"]):
                totals[_category(e["name"], e["_up"], cuda=False)] += e["_self"]
        step_us, names = sum(s["dur"] for s in steps), CATEGORIES
    n = len(steps)
    categories = {k: totals.get(k, 0.0) / 1e3 / n for k in names}
    return {"device": "cuda" if kernels else "cpu", "steps": n, "step_ms": step_us / 1e3 / n,
            "categories_ms": categories, "sum_ms": sum(categories.values())}


def breakdown(trace: Path) -> dict:
    """`classify` of one trace file, with the file's name."""
    return {"trace": Path(trace).name, **classify(read_trace(trace))}


def table(result: dict) -> str:
    step = result["step_ms"]
    where = "on the GPU's timeline" if result["device"] == "cuda" else "each op's own time on its thread"
    lines = [f"where the {result['steps']} profiled steps went ({where}): {step:.1f} ms per step",
             f"{'category':<36}{'ms/step':>9}{'share':>8}"]
    for name, ms in result["categories_ms"].items():
        lines.append(f"{name:<36}{ms:>9.2f}{100 * ms / step if step else 0:>7.1f}%")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> None:
    """One stacked bar of the categories, ms per step: a picture any image viewer opens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import atomic_path

    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for i, (name, ms) in enumerate(result["categories_ms"].items()):
        ax.barh(0, ms, left=left, color=f"C{i}", label=f"{name} ({ms:.1f} ms)")
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("ms per step")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
