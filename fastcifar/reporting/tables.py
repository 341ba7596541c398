"""The per-machine tables of docs/benchmarks.md and docs/startup.md, from one column's checked files."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .columns import Machine
from .machines import machine_line as env_machine_line
from .records import DATA_PIPELINE, PIECES
from .stats import describe


def pm(stats: dict, fmt: str, scale: float = 1.0) -> str:
    """'mean ± sd'; one value alone is said to be one ('± 0' would claim a spread that was never measured)."""
    if stats["n"] == 1:
        return f"{format(scale * stats['mean'], fmt)} (1 run)"
    return f"{format(scale * stats['mean'], fmt)} ± {format(scale * stats['sd'], fmt)}"


def ci95(ci: Sequence[float] | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if not ci or any(math.isnan(v) for v in ci):
        return "–"
    return f"{format(scale * ci[0], fmt)} … {format(scale * ci[1], fmt)}{unit}"


def spec_stats(m: Machine, key: str) -> dict | None:
    values = [r[key] for r in m.runs if key in r]
    return describe(values) if values else None


def startup_stats(m: Machine, key: str) -> dict | None:
    if not m.startup:
        return None
    return describe([_piece(run, key) for run in m.startup["warm"]])


def machine_line(m: Machine) -> str:
    note = m.note.get("note", "no record")
    return env_machine_line(m.env) or f"{m.label()}, {m.note.get('memory_gib', '?')} GiB ({note})"


def spec_table(m: Machine) -> list[str]:
    if not m.runs:
        return []
    rows = [("total training time (s)", "total_training_time_s", ".1f", 1),
            ("mean epoch time (s)", "epoch_time_s", ".1f", 1),
            ("inference per batch, forward alone (ms)", "inference_time_per_batch_ms", ".1f", 1),
            ("inference per batch, forward + wait for data (ms)", "inference_time_per_batch_incl_data_ms", ".1f", 1),
            ("last-epoch train loss", "last_epoch_train_loss", ".4f", 1),
            ("validation accuracy (%)", "val_accuracy", ".2f", 100),
            ("test accuracy (%)", "test_accuracy", ".2f", 100), ("data fraction", "data_fraction", ".4f", 1),
            ("start-up (s)", "startup_s", ".1f", 1), ("compile warm-up, all graphs (s)", "warm_up_s", ".1f", 1)]
    runs = sorted(m.runs, key=lambda r: r["config"]["seed"])
    out = [f"The spec, {len(runs)} seeds (`python -m fastcifar.bench --seeds {len(runs)} --name spec --compile "
           f"--export wat`; [results/{m.name}/spec/](results/{m.name}/spec/)):", "",
           f"| metric | mean ± sd | 95 % CI | per seed ({', '.join(str(r['config']['seed']) for r in runs)}) |",
           "|---|---:|---:|---:|"]
    for label, key, fmt, scale in rows:
        if not all(key in r for r in runs):
            continue
        stats = describe([r[key] for r in runs])
        out.append(f"| {label} | {pm(stats, fmt, scale)} | {ci95(stats['ci95'], fmt, scale)} | "
                   + " / ".join(format(scale * r[key], fmt) for r in runs) + " |")
    ops = [r.get("device_op") for r in runs]
    if any(ops):
        out += ["", "Device op kept per seed: " + "; ".join(_op_text(op) for op in ops if op) + "."]
    return out + [""]


def _op_text(op: dict) -> str:
    times = ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in op.items() if k.endswith("_ms"))
    return f"{op['op']} ({times})"


def loader_table(m: Machine) -> list[str]:
    if not m.loader:
        return []
    rows = m.loader.pipelines
    base = rows.get("torch", {}).get("images_per_s")
    out = [f"Loaders, isolated (`python -m fastcifar.bench_loader`; [results/{m.name}/bench_loader.json]"
           f"(results/{m.name}/bench_loader.json)):", "",
           "| pipeline | images/s | vs `torch` | s / epoch (45,000) | headroom | device op kept |",
           "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        op = r.get("device_op")
        out.append(f"| {name} | {r['images_per_s']:,.0f} | {r['images_per_s'] / base:.2f}× | "
                   f"{r['seconds_per_epoch']:.2f} | "
                   f"{r.get('headroom', float('nan')):.0f}× | {_op_text(op) if op else '–'} |" if base else
                   f"| {name} | {r['images_per_s']:,.0f} | – | {r['seconds_per_epoch']:.2f} | – | – |")
    compute = m.loader.get("compute_only") or {}
    if compute:
        # over the column's one rate (probe.json) where it has one, else the probe of bench_loader's own run
        probe = m.probe["attainable_fp32"] if m.probe else m.loader["env"].get("attainable_fp32")
        where = "the column's rate" if m.probe else "the attainable fp32 rate"
        out += ["", f"Compute-only rounds after the loaders, in the same process (for the headroom column): "
                    f"{compute['images_per_s']:.0f} images/s"
                    + (f" ({ci95(compute.get('images_per_s_ci95'), '.0f')}), {compute['gflops']:.1f} GFLOP/s = "
                       f"{100 * compute['gflops'] / probe['gflops']:.1f} % of {where} ({_probe_text(probe)})"
                       if "gflops" in compute and probe else "")
                + f"; {compute['steps']} steps x {compute.get('rounds', 1)} round(s)."]
    return out + [""]


def _probe_text(probe: dict) -> str:
    """'449 GFLOP/s, the conv probe (matmul 176, conv 449 GFLOP/s): <method>'."""
    if probe.get("kernel") is None or probe.get("conv") is None or probe.get("matmul") is None:
        return f"{probe['gflops']:.0f} GFLOP/s, the matmul probe of its time"
    return (f"{probe['gflops']:.0f} GFLOP/s, the {probe['kernel']} probe; matmul {probe['matmul']['gflops']:.0f}, "
            f"conv {probe['conv']['gflops']:.0f} GFLOP/s: {probe['method']}")


COUNTS = ("minor_faults", "involuntary_switches")  # bench_loader's per-epoch medians


def overhead(r: dict) -> str:
    """A pipeline's epoch over `synthetic`'s of the same round, with its 95 % interval."""
    return f"{100 * r['overhead_vs_synthetic']:+.1f} % ({ci95(r.get('overhead_vs_synthetic_ci95'), '+.1f', 100)})"


def counts(r: dict) -> list[str]:
    """Its page faults and preemptions per epoch; '–' in a file that predates them."""
    return [f"{r[k]:,.0f}" if k in r else "–" for k in COUNTS]


def e2e_table(m: Machine) -> list[str]:
    if not m.e2e:
        return []
    out = [f"Loaders, end to end (`python -m fastcifar.bench_loader --end-to-end`; "
           f"[results/{m.name}/bench_end_to_end.json]"
           f"(results/{m.name}/bench_end_to_end.json)):", "",
           "| pipeline | median epoch s | images/s | data fraction | vs synthetic (95 % CI) | vs memory (95 % CI) "
           "| page faults / epoch | preempted / epoch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in m.e2e.pipelines.items():
        memory = (f"{r['ratio_to_memory']:.3f}× ({ci95(r.get('ratio_to_memory_ci95'), '.3f')})"
                  if "ratio_to_memory" in r else "–")
        median = statistics.median(r["epoch_seconds"])  # of every round's epoch
        out.append(f"| {name} | {median:.2f} | {r['train_images'] / median:,.0f} | {r['data_fraction']:.3f} | "
                   f"{overhead(r)} | {memory} | {' | '.join(counts(r))} |")
    return out + [""]


def e2e_processes_table(m: Machine) -> list[str]:
    """`ffcv` over `synthetic` in each separate process: the column's end-to-end run and any further ones
    in end-to-end-processes/ (an interval from one process is an interval for that process only)."""
    if not (m.e2e and m.e2e_processes):
        return []
    files = [("bench_end_to_end.json", m.e2e)] + [(f"end-to-end-processes/{p.name}", d) for p, d in m.e2e_processes]
    names = [n for n in m.e2e.pipelines if n != "synthetic"]
    out = [f"End to end, each process apart ({len(files)} processes; each pipeline's epoch over `synthetic`'s, "
           "95 % CI):", "", "| process | rounds | " + " | ".join(f"`{n}`" for n in names) + " |",
           "|---|---:|" + "---:|" * len(names)]
    for label, data in files:
        cells = [overhead(data.pipelines[n]) if n in data.pipelines else "–" for n in names]
        rounds = data.pipelines["ffcv"]["epochs_timed"] if "ffcv" in data.pipelines else "–"
        out.append(f"| [{label}](results/{m.name}/{label}) | {rounds} | " + " | ".join(cells) + " |")
    return out + [""]


def e2e_candidates_table(m: Machine) -> list[str]:
    """End to end under settings that force one candidate cause each (end-to-end-candidates/): each
    process's settings, and each pipeline's epoch over `synthetic`'s with its page faults and preemptions."""
    runs = m.candidates
    if not runs:
        return []
    names = list(dict.fromkeys(n for _, d in runs for n in d.pipelines))
    commits = sorted({(d["env"].get("git_commit") or "?")[:7] for _, d in runs})
    out = [f"End to end with one candidate forced per process ([results/{m.name}/end-to-end-candidates/]"
           f"(results/{m.name}/end-to-end-candidates/), commit {', '.join(commits)}): each pipeline's epoch over "
           "`synthetic`'s of the same process (95 % CI), then its minor page faults and involuntary context "
           "switches per epoch (median).", "",
           "| settings | rounds | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|---:|" + "---|" * len(names)]
    for path, data in runs:
        cells = ["; ".join([overhead(data.pipelines[n]), *counts(data.pipelines[n])]) if n in data.pipelines else "–"
                 for n in names]
        rounds = data.pipelines["synthetic"]["epochs_timed"] if "synthetic" in data.pipelines else "–"
        out.append(f"| [{_settings(data)}](results/{m.name}/end-to-end-candidates/{path.name}) | {rounds} | "
                   + " | ".join(cells) + " |")
    return out + [""]


def spdl_table(m: Machine) -> list[str]:
    """`spdl` beside `ffcv` in separate processes (spdl/): isolated images/s, and end to end each pipeline's
    epoch over `synthetic`'s of the same process (95 % CI), `spdl-per-image` (SPDL's per-image CPU idiom)
    among them."""
    isolated = [(p, r) for p, r in m.spdl if p.name.startswith("isolated")]
    e2e = [(p, r) for p, r in m.spdl if not p.name.startswith("isolated")]
    if not (isolated or e2e):
        return []
    commits = sorted({(r.env.git_commit or "?")[:7] for _, r in m.spdl})
    versions = m.spdl[0][1].env.versions
    out = [f"`spdl` beside `ffcv`, one process per file ([results/{m.name}/spdl/](results/{m.name}/spdl/), commit "
           f"{', '.join(commits)}; SPDL {versions.get('spdl') if versions else '?'}).", ""]
    if isolated:
        names = [n for n in ("ffcv", "spdl", "torch", "memory") if any(n in r.pipelines for _, r in isolated)]
        out += ["Isolated, images/s (" + ", ".join(f"`{n}`" for n in names) + "):", "",
                "| process | " + " | ".join(f"`{n}`" for n in names) + " | `spdl` / `ffcv` |",
                "|---|" + "---:|" * (len(names) + 1)]
        for path, r in isolated:
            cells = [f"{r.pipelines[n].images_per_s:,.0f}" if n in r.pipelines else "–" for n in names]
            ratio = (f"{r.pipelines['spdl'].images_per_s / r.pipelines['ffcv'].images_per_s:.2f}×"
                     if "spdl" in r.pipelines and "ffcv" in r.pipelines else "–")
            out.append(f"| [{path.name}](results/{m.name}/spdl/{path.name}) | " + " | ".join(cells) + f" | {ratio} |")
        out.append("")
    if e2e:
        names = [n for n in ("ffcv", "spdl", "spdl-per-image", "memory") if any(n in r.pipelines for _, r in e2e)]
        out += ["End to end, each pipeline's epoch over `synthetic`'s (95 % CI):", "",
                "| process | rounds | " + " | ".join(f"`{n}`" for n in names) + " |",
                "|---|---:|" + "---:|" * len(names)]
        for path, r in e2e:
            cells = [overhead(r.pipelines[n]) if n in r.pipelines else "–" for n in names]
            rounds = r.pipelines["synthetic"].epochs_timed if "synthetic" in r.pipelines else "–"
            out.append(f"| [{path.name}](results/{m.name}/spdl/{path.name}) | {rounds} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def startup_table(m: Machine) -> list[str]:
    if not m.startup:
        return []
    warm, cold = m.startup["warm"], m.startup["cold"]
    out = [f"Start-up (`python -m fastcifar.bench_startup -- {' '.join(m.startup['env'].get('trainer') or [])}`; "
           f"[results/{m.name}/bench_startup.json](results/{m.name}/bench_startup.json)): one step, seconds", "",
           f"| piece | cold | warm, median of {len(warm)} |", "|---|---:|---:|"]
    out += [f"| {k} | {cold[k]:.2f} | {statistics.median(run[k] for run in warm):.2f} |" for k in PIECES if k in cold]
    return out + [""]


def breakdown_table(m: Machine) -> list[str]:
    """Where the compute-only step's time goes (step_breakdown), and its limit from its own parts."""
    b = m.breakdown
    if not b:
        return []
    name = f"results/{m.name}/step_breakdown"
    floor, prof, lim = b["floor"], b["profiled"], b["limit"]
    out = [f"Where a compute-only training step goes (`python -m fastcifar.step_breakdown`; "
           f"[{name}.json]({name}.json), "
           f"[picture]({name}.png), trace in [{name}-trace/]({name}-trace/)): the step unprofiled "
           f"{floor['step_ms']:.1f} ms ({ci95(floor.get('step_ms_ci95'), '.1f', unit=' ms')}, {floor['rounds']} rounds "
           f"of {floor['steps_per_round']} steps over {b['distinct_batches']} distinct batches); profiled "
           f"{prof['step_ms']:.1f} ms, the categories below summing to {prof['sum_ms']:.1f} ms (Inductor's kernels "
           f"made visible by its kernel profile: that build runs {b['kernel_profile_build_step_ms']:.1f} ms "
           "unprofiled).",
           "", "| category | ms / step | share of the profiled step | rate |", "|---|---:|---:|---:|"]
    for cat, row in prof["categories"].items():
        rate = (f"{row['gflops']:.0f} GFLOP/s" if "gflops" in row else f"{row['gbs']:.1f} GB/s (lower bound)"
                if "gbs" in row else "")
        out.append(f"| {cat} | {row['ms']:.1f} | {100 * row['share']:.1f} % | {rate} |")
    out += ["", f"The step's limit, {lim['step_ms']:.1f} ms: its {sum(c['count'] for c in lim['convolutions'])} "
                f"convolutions alone at their shapes, forward and the backward kernels the step runs "
                f"({lim['convolutions_ms']:.1f} ms), the element-wise kernels' bytes "
                f"({(lim['elementwise_bytes']['forward'] + lim['elementwise_bytes']['backward']) / 1e9:.2f} GB, "
                f"derived from the activations' sizes) at {bandwidth_text(lim)} "
                f"({lim['elementwise_ms']:.1f} ms), and the optimizer step alone ({lim['optimizer_ms']:.1f} ms): the "
                f"step takes {floor['step_ms'] / lim['step_ms']:.2f}× it.", ""]
    conv = b.get("convolutions_in_step")
    if conv and conv["shapes"]:
        line = convolutions_line(conv)
        out += [line[0].upper() + line[1:] + ".", ""]
    return out


def convolutions_line(conv: dict) -> str:
    """The convolutions in the (profiled) step against alone, and the layout copies inside their backward."""
    rows = conv["shapes"]
    f = sum(r["step_forward_ms"] for r in rows) / sum(r["alone_forward_ms"] for r in rows)
    b = sum(r["step_backward_ms"] for r in rows) / sum(r["alone_backward_ms"] for r in rows)
    worst = max(rows, key=lambda r: r["step_backward_ms"] + r["step_forward_ms"] - r["alone_backward_ms"]
                - r["alone_forward_ms"])
    return (f"convolutions in the profiled step against alone: forward {f:.2f}x, backward {b:.2f}x (most lost: "
            f"input {'x'.join(map(str, worst['input'][1:]))} -> {worst['out_channels']}, {worst['kernel'][0]}x"
            f"{worst['kernel'][1]} stride {worst['stride'][0]}); layout copies inside convolution_backward: "
            f"{conv['layout_copies_in_backward_ms']:.2f} ms per step")


def bandwidth_text(lim: dict) -> str:
    """The bandwidth the limit's element-wise part used: one DRAM triad, or (since) each activation size's own."""
    sizes = lim.get("bandwidth_by_size")
    if not sizes:
        return f"the measured bandwidth of {lim['bandwidth']['gbs']:.1f} GB/s"
    each = ", ".join(f"{b['activation_bytes'] / 2**20:g} MiB at {b['gbs']:.0f}" for b in sizes)
    return (f"each activation size's own bandwidth ({each} GB/s; a triad over 256 MiB: "
            f"{lim['bandwidth']['gbs']:.0f} GB/s)")


def floor_table(m: Machine) -> list[str]:
    """The compute-only floor in each of several processes (floor.json), against the spec's training."""
    f = (m.floor or {}).get("floor") or {}
    if not f.get("processes"):
        return []
    name = f"results/{m.name}/floor.json"
    spec = spec_stats(m, "epoch_time_s")
    train = [45_000 / r["epoch_time_s"] for r in m.runs if "epoch_time_s" in r]
    batch = m.floor["batch"]
    out = [f"The compute-only floor in {f['processes']} separate processes (`step_breakdown --floor-only "
           f"--processes {f['processes']}`, [{name}]({name}); each {f['rounds']} rounds of {f['steps_per_round']} "
           f"steps over {m.floor['distinct_batches']} distinct batches), beside the spec's training (each seed a "
           "process, its mean epoch):", "", "| process | ms / step | images/s |", "|---|---:|---:|"]
    out += [f"| floor {k} | {ms:.1f} | {batch / ms * 1e3:.0f} |" for k, ms in enumerate(f["step_ms_per_process"], 1)]
    out += [f"| floor, pooled | {f['step_ms']:.1f} | {f['images_per_s']:.0f} |"]
    out += [f"| spec, seed {k} | {1e3 * batch / v:.1f} | {v:.0f} |" for k, v in enumerate(train)]
    pi = f.get("images_per_s_pi95")
    if pi and spec:
        mean = 45_000 / spec["mean"]
        out += ["", f"One more process's floor lands in {ci95(pi, '.0f', unit=' images/s')} (95 % prediction "
                    f"interval); the spec's training, {mean:.0f} images/s, is "
                    + ("within or below it." if mean <= pi[1] else "**above it: training beats its floor**.")]
    return out + [""]


def details(ms: list[Machine]) -> str:
    out: list[str] = []
    for m in ms:
        commits = m.commits()
        out += [f"### {m.label()} (`{m.name}`)", "",
                f"{machine_line(m)}. Measured {m.date()} at commit{'s' if len(commits) > 1 else ''} "
                f"{', '.join(commits)}.",
                ""]
        out += (spec_table(m) + breakdown_table(m) + floor_table(m) + loader_table(m) + e2e_table(m)
                + e2e_processes_table(m) + e2e_candidates_table(m) + spdl_table(m) + startup_table(m))
    return "\n".join(out).rstrip()


def _piece(run: dict, key: str) -> float | None:
    """A start-up piece of one run; the data pipeline derived from its three pieces where a file predates it."""
    if key in run:
        return run[key]
    return sum(run[k] for k in DATA_PIPELINE) if key == "data_pipeline_s" else None


OPTION_PREFIXES = ("OMP_", "GOMP_", "KMP_", "TORCHINDUCTOR_", "NUMBA_", "THP_", "MALLOC_", "FASTCIFAR_ADAMW")
OPTION_IGNORED = ("TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS")


def settings(run: dict) -> dict[str, object]:
    """The settings a step_options run ran with, from its own record."""
    env = run["env"].get("environment_variables") or {}
    chosen = {k: v for k, v in env.items() if k.startswith(OPTION_PREFIXES) and k not in OPTION_IGNORED}
    return chosen | {f"torch._inductor.config.{k}": v for k, v in (run.get("inductor_config") or {}).items()}


def _settings(run: dict, common: dict | None = None) -> str:
    """A run's settings as a label, less those every run of its sweep shares (`common`: the defaults of the
    commit it ran at, e.g. fastcifar's own THP_MEM_ALLOC_ENABLE=1): '(defaults)' when none is left."""
    chosen = {k: v for k, v in settings(run).items() if (common or {}).get(k, object()) != v}
    return " ".join(f"`{k}={v}`" for k, v in sorted(chosen.items())) or "(defaults)"
