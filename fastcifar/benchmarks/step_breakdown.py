"""Where every millisecond of a training step goes, against the step's own limit:
`python -m fastcifar.step_breakdown` (a stage of `make results` and `make gpu-check`).

The step is the spec's: ResNetV2-20, channels-last, torch.compile, cross-entropy, AdamW, batch 128,
its inputs cycling through distinct pre-made batches (no loading, no augmentation) — the compute-only
floor. Measured in its own process, before anything else has run in it:
1. the floor: rounds of steps, each round timed with the device synchronised at both ends;
2. one profile of a few steps with torch.profiler, Inductor's kernels made visible (on a CPU by
   `torch._inductor.config.cpp.enable_kernel_profile`, which wraps each generated C++ kernel in a
   profiler range; that build of the step is timed unprofiled too, to say what it costs), every event
   attributed by its own name and the compiled graph it runs in (forward / backward): convolutions,
   the compiled element-wise kernels, the optimizer, the other ATen ops, and the time inside a step
   that no op covers (Python, dispatch). Nothing is a remainder: the categories are the trace's;
3. the step's limit from its own parts: every distinct convolution alone (forward and exactly the
   backward kernels the step runs: the stem computes no input gradient), the element-wise kernels'
   bytes of each activation size at the bandwidth a triad reaches with arrays of that size, and the
   optimizer step alone.
Writes a JSON, a PNG (readable without TensorBoard, whose Overview needs the internet) and the
trace (TensorBoard's profiler plugin and Perfetto open it).

`--processes N`: this command in N separate processes one after another (each with --processes 1, its
JSON under OUT's stem + '-processes/'; with --floor-only the floor alone, else each process its floor and
its own limit, without trace or picture), and OUT their pooled floor: the mean of the processes' floors
and the 95 % prediction interval of one more process. Why: a step's time moves between processes (where
its memory lands, what the machine does meanwhile) more than between rounds of one, and a training run is
one more process: an interval from one process's rounds is one that training can beat without beating
the floor. The step against its limit is then a ratio per process (each over the limit it measured),
judged between processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import precompile, trace_breakdown
from ..devices import resolve_device, synchronize
from ..env import environment, set_cudnn, set_float32_precision
from ..model import resnetv2_20
from ..optim import adamw
from ..reporting import records as typed
from ..reporting.stats import describe, prediction95
from ..reporting.tables import bandwidth_text, convolutions_line
from ..trace_breakdown import STEP_RANGE
from ..utils import ArgumentParser, UserError, run_cli, writable_file, writable_folder, write_json_atomic
from .step_limit import bandwidth_by_size, bandwidth_gbs, best_ms, conv_limit, conv_shapes, elementwise_bytes, in_step
from .step_limit import elementwise_ms as elementwise_limit_ms


def make_batches(n: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` distinct batches (seeded), made before timing: what the model reads is fresh each step, as a
    real loader's batches are (one fixed batch would stay in the caches)."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (batch,), generator=gen).to(device)) for _ in range(n)]


def spec_step(device: torch.device, compile_model: bool) -> tuple[nn.Module, torch.optim.Optimizer, Callable]:
    torch.manual_seed(0)
    model = resnetv2_20().to(device=device, memory_format=torch.channels_last)
    optimizer, _ = adamw(model.parameters(), device, lr=1e-3, weight_decay=1e-4)  # the trainer's
    net = precompile.compile_model(model) if compile_model else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, optimizer, step


def time_rounds(step: Callable, batches: list, device: torch.device, rounds: int, steps: int) -> list[float]:
    """Milliseconds per step of each round (`steps` steps, synchronised at both ends), after one warm round."""
    out = []
    for r in range(rounds + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(*batches[(r * steps + i) % len(batches)])
        synchronize(device)
        if r:
            out.append(1e3 * (time.perf_counter() - t0) / steps)
    return out


def profile(step: Callable, batches: list, device: torch.device, steps: int,
            trace_dir: Path | None) -> tuple[dict, list[dict]]:
    """A profile of `steps` steps, each in the shared step range, classified from its trace file by the
    classifier `train --profile` uses (`trace_breakdown`), and the trace's events (recorded with the ops'
    shapes: each convolution's time in the step); the trace kept in `trace_dir` when given."""
    import tempfile

    from torch.profiler import ProfilerActivity, record_function, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(trace_dir or scratch)
        before = set(folder.glob("*.pt.trace.json.gz"))
        handler = tensorboard_trace_handler(str(folder), worker_name="step_breakdown", use_gzip=True)
        with torch.profiler.profile(activities=activities, on_trace_ready=handler, record_shapes=True):
            for i in range(steps):
                with record_function(STEP_RANGE):
                    step(*batches[i % len(batches)])
            synchronize(device)
        (trace,) = set(folder.glob("*.pt.trace.json.gz")) - before
        events = trace_breakdown.read_trace(trace)  # read once: classified here, its convolutions by shape later
        return {"trace": trace.name, **trace_breakdown.classify(events)}, events


def breakdown(device: torch.device, batch: int, rounds: int, steps: int, profile_steps: int, calls: int,
              trace_dir: Path | None, distinct: int) -> dict:
    """Everything the JSON holds; see the module's docstring."""
    import torch._inductor.config as inductor_config

    from ..flops import attainable_probe, step_flops

    batches = make_batches(distinct, batch, device)
    model, optimizer, step = spec_step(device, compile_model=True)
    floor = time_rounds(step, batches, device, rounds, steps)
    compiled_graphs = precompile.graphs([batch])  # before the profiled build adds its own
    # The profiled build: Inductor's kernels visible in the trace (a CPU needs its kernel profile).
    if device.type == "cpu":
        inductor_config.cpp.enable_kernel_profile = True
    torch._dynamo.reset()
    _, _, visible = spec_step(device, compile_model=True)
    visible_ms = time_rounds(visible, batches, device, 1, steps)[0]
    traced, events = profile(visible, batches, device, profile_steps, trace_dir)
    inductor_config.cpp.enable_kernel_profile = False

    flops = step_flops(batch)
    shapes = conv_limit(conv_shapes(model, batch, device), device, calls)
    convs_in_step = in_step(events, shapes, profile_steps)  # each shape in the (profiled) step against alone
    conv_fwd_flops = sum(s["forward_flops"] * s["count"] for s in shapes)
    conv_bwd_flops = sum(s["backward_flops"] * s["count"] for s in shapes)
    bandwidth = bandwidth_gbs(device)  # DRAM's, for scale: the limit takes each activation size at its own
    traffic = elementwise_bytes(model, batch, device)
    by_size = bandwidth_by_size([t["activation_bytes"] for t in traffic["by_size"]], device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt_ms = best_ms(optimizer.step, device, calls)
    limit = {"convolutions_ms": sum((s["forward_ms"] + s["backward_ms"]) * s["count"] for s in shapes),
             "elementwise_ms": elementwise_limit_ms(traffic, by_size),
             "optimizer_ms": opt_ms}
    limit["step_ms"] = sum(limit.values())
    floor_stats = describe(floor)
    cats = traced["categories_ms"]
    rates = {"convolution forward": ("gflops", conv_fwd_flops), "convolution backward": ("gflops", conv_bwd_flops),
             "element-wise, compiled (forward)": ("gbs", traffic["forward"]),
             "element-wise, compiled (backward)": ("gbs", traffic["backward"])}
    table = {}
    for name, ms in cats.items():
        row = {"ms": ms, "share": ms / traced["step_ms"]}
        if name in rates and ms > 0:
            unit, amount = rates[name]
            row[unit] = amount / (ms / 1e3) / 1e9
        table[name] = row
    probe = attainable_probe(device)
    return {
        "batch": batch, "distinct_batches": distinct, "graphs": compiled_graphs,
        "floor": floor_record(floor, batch, steps, flops["train_step"]),
        "kernel_profile_build_step_ms": visible_ms,
        "profiled": {"steps": profile_steps, "step_ms": traced["step_ms"], "categories": table,
                     "sum_ms": traced["sum_ms"], "device": traced["device"]},
        "limit": {**limit, "convolutions": shapes, "bandwidth": bandwidth, "bandwidth_by_size": by_size,
                  "elementwise_bytes": traffic,
                  "efficiency": limit["step_ms"] / floor_stats["mean"]},
        "flops": {"train_step": flops["train_step"], "convolution_forward": conv_fwd_flops,
                  "convolution_backward": conv_bwd_flops},
        "attainable_fp32": probe, "convolutions_in_step": convs_in_step,
        "trace_dir": str(trace_dir) if trace_dir else None,
    }


def floor_record(rounds_ms: list[float], batch: int, steps: int, train_step_flops: float) -> dict:
    """The floor of one process: its rounds' mean ms per step, the interval of that mean, images/s."""
    stats = describe(rounds_ms)
    ci = stats["ci95"] if len(rounds_ms) > 1 else None
    return {"step_ms": stats["mean"], "step_ms_ci95": ci, "step_ms_per_round": rounds_ms,
            "images_per_s": batch / (stats["mean"] / 1e3),
            # a step interval reaching 0 ms or below (two rounds far apart) has no images/s interval
            "images_per_s_ci95": [batch / (ci[1] / 1e3), batch / (ci[0] / 1e3)] if ci and ci[0] > 0 else None,
            "rounds": len(rounds_ms), "steps_per_round": steps,
            "gflops": train_step_flops / (stats["mean"] / 1e3) / 1e9}


def floor_only(device: torch.device, batch: int, rounds: int, steps: int, distinct: int) -> dict:
    """Part 1 alone, in this process."""
    from ..flops import step_flops

    batches = make_batches(distinct, batch, device)
    _, _, step = spec_step(device, compile_model=True)
    floor = time_rounds(step, batches, device, rounds, steps)
    flops = step_flops(batch)
    record = floor_record(floor, batch, steps, flops["train_step"])
    return {"batch": batch, "distinct_batches": distinct, "floor": record, "flops": {"train_step": flops["train_step"]},
            "graphs": precompile.graphs([batch])}


def pooled_floor(args: argparse.Namespace) -> dict:
    """The floor in `args.processes` separate processes, one after another; their pooled floor."""
    folder = args.out.parent / f"{args.out.stem}-processes"
    writable_folder(folder, "the processes' folder")
    records = []
    for k in range(1, args.processes + 1):
        out = folder / f"process-{k}.json"
        own = ["--floor-only"] if args.floor_only else ["--no-trace", "--no-picture", "--calls", str(args.calls),
                                                         "--profile-steps", str(args.profile_steps)]
        cmd = [sys.executable, "-m", "fastcifar.step_breakdown", *own, "--processes", "1",
               "--device", args.device, "--batch-size", str(args.batch_size), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--distinct-batches", str(args.distinct_batches), "--out", str(out),
               *(f"--inductor-config={pair}" for pair in args.inductor_config)]  # each process the same settings
        print(f"floor, process {k}/{args.processes}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            raise UserError(f"the floor's process {k} failed (exit {rc}); nothing pooled")
        record = typed.read_record(out, typed.FloorFile)
        if record is None:
            raise UserError(f"the floor's process {k} wrote no {out}; nothing pooled")
        records.append(record)
    steps = [r.floor.step_ms for r in records]
    pi = prediction95(steps)
    first = records[0]
    floor = {**floor_record(steps, args.batch_size, args.steps, first.flops.train_step),
             "step_ms_per_process": steps, "step_ms_pi95": pi, "processes": args.processes,
             "images_per_s_pi95": [args.batch_size / (pi[1] / 1e3), args.batch_size / (pi[0] / 1e3)]
             if pi and pi[0] > 0 else None,
             "rounds": args.rounds, "files": [f"{folder.name}/process-{k}.json" for k in range(1, args.processes + 1)]}
    del floor["step_ms_per_round"]
    return {"batch": args.batch_size, "distinct_batches": args.distinct_batches, "floor": floor,
            "flops": {"train_step": first.flops.train_step}}


def plot(result: dict, path: Path) -> None:
    """The breakdown as a picture: the measured step's categories beside the limit's parts (ms per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    fig, ax = plt.subplots(figsize=(8, 3.6))
    left = 0.0
    for i, (name, row) in enumerate(result["profiled"]["categories"].items()):
        ax.barh(1, row["ms"], left=left, color=f"C{i}", label=name)
        left += row["ms"]
    lim = result["limit"]
    left = 0.0
    for i, key in enumerate(("convolutions_ms", "elementwise_ms", "optimizer_ms")):
        ax.barh(0, lim[key], left=left, color=("C0", "C2", "C4")[i], hatch="//", alpha=0.6)
        left += lim[key]
    ax.axvline(result["floor"]["step_ms"], color="black", ls="--", label="step, unprofiled")
    ax.set_yticks([0, 1], ["limit (parts alone)", "step (profiled)"])
    ax.set_xlabel("ms per step")
    ax.set_title(f"where a training step goes (batch {result['batch']}); limit = {lim['step_ms']:.0f} ms, "
                 f"step = {result['floor']['step_ms']:.0f} ms")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summary(result: dict) -> str:
    lines = [f"step, unprofiled: {result['floor']['step_ms']:.1f} ms ({result['floor']['images_per_s']:.0f} images/s, "
             f"{result['floor']['gflops']:.0f} GFLOP/s); profiled: {result['profiled']['step_ms']:.1f} ms "
             f"(the kernel-profile build unprofiled: {result['kernel_profile_build_step_ms']:.1f} ms)",
             f"{'category':<36}{'ms/step':>9}{'share':>8}  rate"]
    for name, row in result["profiled"]["categories"].items():
        rate = f"{row['gflops']:.0f} GFLOP/s" if "gflops" in row else f"{row['gbs']:.1f} GB/s" if "gbs" in row else ""
        lines.append(f"{name:<36}{row['ms']:>9.1f}{100 * row['share']:>7.1f}%  {rate}")
    lim = result["limit"]
    lines.append(f"limit: convolutions alone {lim['convolutions_ms']:.1f} + element-wise at {bandwidth_text(lim)} "
                 f"{lim['elementwise_ms']:.1f} + optimizer {lim['optimizer_ms']:.1f}"
                 f" = {lim['step_ms']:.1f} ms; the step takes {1 / lim['efficiency']:.2f}x its limit")
    conv = result.get("convolutions_in_step")
    if conv and conv["shapes"]:
        lines.append(convolutions_line(conv))
    return "\n".join(lines)


def inductor_settings(pairs: list[str]) -> dict:
    """KEY=VALUE pairs set on torch._inductor.config (dotted keys reach its sub-configs, e.g. cpp.simdlen);
    the value read as a Python literal (1, True, 'x'), else as text. An unknown key is refused."""
    import ast

    import torch._inductor.config as config

    chosen = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        *parents, last = key.split(".")
        target = config
        for part in parents:
            target = getattr(target, part, None)
        if not sep or target is None or not hasattr(target, last):
            raise UserError(f"--inductor-config {pair!r}: not KEY=VALUE with KEY in torch._inductor.config")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        setattr(target, last, value)
        chosen[key] = value
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.step_breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (the spec's)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the unprofiled step")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--profile-steps", type=int, default=5, help="steps in the profile")
    p.add_argument("--calls", type=int, default=10, help="calls per convolution shape alone (the best counts)")
    p.add_argument("--distinct-batches", type=int, default=32, help="pre-made batches the steps cycle through")
    p.add_argument("--out", type=Path, default=Path("results/step_breakdown.json"), help="JSON (PNG and trace beside)")
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                   help="write the profile's trace (TensorBoard, Perfetto) to OUT's stem + '-trace/'")
    p.add_argument("--picture", action=argparse.BooleanOptionalAction, default=True, help="write OUT with .png")
    p.add_argument("--floor-only", action="store_true", help="only the floor: no profile, no limit")
    p.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY before compiling (repeatable; step_options' options)")
    p.add_argument("--processes", type=int, default=1,
                   help="this command in this many separate processes, their floors pooled (an interval between "
                        "processes, which is what a training run is); without --floor-only each its own limit too")
    args = p.parse_args(argv)
    for name in ("batch_size", "rounds", "steps", "profile_steps", "calls", "distinct_batches", "processes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    writable_file(args.out, "the output file")
    device = resolve_device(args.device)
    set_float32_precision(device, tf32=False)
    set_cudnn(device, deterministic=False)
    env = environment(device, module="fastcifar.step_breakdown")
    inductor = inductor_settings(args.inductor_config)
    if args.floor_only or args.processes > 1:
        result = pooled_floor(args) if args.processes > 1 else \
            floor_only(device, args.batch_size, args.rounds, args.steps, args.distinct_batches)
        write_json_atomic(args.out, {**result, "env": env, "inductor_config": inductor})
        f = result["floor"]
        spread = (f"; one more process, 95 %: {f['step_ms_pi95'][0]:.1f}-{f['step_ms_pi95'][1]:.1f} ms "
                  f"(processes: {', '.join(f'{v:.1f}' for v in f['step_ms_per_process'])})"
                  if f.get("step_ms_pi95") else "")
        print(f"floor: {f['step_ms']:.1f} ms per step, {f['images_per_s']:.0f} images/s{spread}; written: {args.out}")
        return 0
    trace_dir = args.out.parent / f"{args.out.stem}-trace" if args.trace else None
    result = breakdown(device, args.batch_size, args.rounds, args.steps, args.profile_steps, args.calls,
                       trace_dir, args.distinct_batches)
    result["trace_dir"] = trace_dir.name if trace_dir else None
    result["env"] = env
    result["inductor_config"] = inductor
    write_json_atomic(args.out, result)
    if args.picture:
        plot(result, args.out.with_suffix(".png"))
    print(summary(result))
    print(f"written: {args.out}" + (f", {args.out.with_suffix('.png')}" if args.picture else "")
          + (f", the trace in {trace_dir}/ (tensorboard --logdir {trace_dir.parent}, or the .pt.trace.json.gz in "
             "Perfetto)" if trace_dir else ""))
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.step_breakdown")


if __name__ == "__main__":
    cli()
