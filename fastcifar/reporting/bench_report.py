"""A benchmark's results from its run JSONs alone: statistics (mean, sd, min, max, 95 % CI), per-epoch
curves, PNG plots, a Markdown report, and the benchmark's own per-run results format ("wat").

Kept apart from `bench.py` (which runs the trainer) so that `--aggregate-only` and tests need nothing
but the JSONs each `fastcifar.train` run wrote.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..utils import atomic_path, write_json_atomic
from .machines import machine_line
from .stats import describe

# The metrics summarised per loader: the six, the data fraction and the first epoch (compilation,
# JIT) — key in the run JSON -> label.
METRICS = {
    "total_training_time_s": "total training time (s)",
    "epoch_time_s": "mean epoch time (s)",
    "epoch1_time_s": "epoch 1 time (s)",
    "inference_time_per_batch_ms": "inference time per batch (ms)",
    "last_epoch_train_loss": "last-epoch train loss",
    "val_accuracy": "validation accuracy",
    "test_accuracy": "test accuracy",
    "data_fraction": "data fraction",
}
FRAMEWORK = {"ffcv": "PyTorch+FFCV", "torch": "PyTorch DataLoader", "memory": "PyTorch+GPU-resident data",
             "dali": "PyTorch+DALI", "synthetic": "PyTorch, synthetic data"}
def load_runs(runs_dir: Path) -> list[dict]:
    """Every complete run JSON in runs_dir (a run writes its JSON last, atomically)."""
    runs = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        run = json.loads(path.read_text())
        run["epoch1_time_s"] = run["epoch_times_s"][0]
        runs.append(run)
    return runs


def summarize(runs: list[dict]) -> dict:
    """Per loader: the metrics' statistics and the per-epoch mean and sd of train loss and val accuracy."""
    by_loader: dict[str, list[dict]] = {}
    for run in runs:
        by_loader.setdefault(run["config"]["loader"], []).append(run)
    out = {}
    for loader, group in by_loader.items():
        epochs = min(len(r["epochs"]) for r in group)
        curve = {}
        for key in ("train_loss", "val_acc", "seconds", "data_time_s", "compute_time_s"):
            per_epoch = [[r["epochs"][e][key] for r in group] for e in range(epochs)]
            curve[key] = {"mean": [statistics.fmean(v) for v in per_epoch],
                          "sd": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]}
        out[loader] = {"runs": sorted(r["run_name"] for r in group),
                       "seeds": sorted(r["config"]["seed"] for r in group),
                       "metrics": {k: describe([r[k] for r in group]) for k in METRICS}, "per_epoch": curve}
    return out


def wat_record(run: dict) -> dict:
    """One run in the benchmark's own results format: seconds, milliseconds and fractions.

    The benchmark times `average_batch_inference_time` as wall clock over an evaluation loader, loading
    included, so the figure exported is ours measured the same way (`inference_time_per_batch_incl_data_ms`,
    over the test loader), not the forward pass alone.
    """
    return {
        "model_name": "ResNetV2-20",
        "framework_name": f"{FRAMEWORK.get(run['config']['loader'], run['config']['loader'])} (fastcifar)",
        "dataset": "CIFAR-10",
        "task": "classification",
        "total_training_time": run["total_training_time_s"],
        "average_epoch_training_time": run["epoch_time_s"],
        "average_batch_inference_time": run["inference_time_per_batch_incl_data_ms"],
        "final_training_loss": run["last_epoch_train_loss"],
        "final_evaluation_accuracy": run["val_accuracy"],
        "final_test_accuracy": run["test_accuracy"],
    }


def wat_name(bench_name: str, run: dict) -> str:
    """`m2-fastcifar-<bench>-<loader>-seed<N>.json`: beside the benchmark's own `m2-<framework>-...` files
    in its `output/` folder, and apart from other fastcifar benchmarks' exports, without collisions."""
    return f"m2-fastcifar-{bench_name}-{run['config']['loader']}-seed{run['config']['seed']}.json"


def export_wat_files(bench_dir: Path, runs: list[dict]) -> list[Path]:
    """`export/wat/`, rebuilt: one file per run, each record on one line — the benchmark's notebook reads
    only a file's first line (`json.loads(f.readline())`). Files of an earlier export that no run
    accounts for any more are removed, so the folder holds this benchmark's runs and nothing else."""
    out = bench_dir / "export" / "wat"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        path = out / wat_name(bench_dir.name, run)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(wat_record(run)) + "\n")
        written.append(path)
    for stale in set(out.glob("*.json")) - set(written):
        stale.unlink()
    return written


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plots(summary: dict, runs: list[dict], out: Path, reference: dict | None = None) -> list[Path]:
    """The four PNGs (800x450 px at 100 dpi; headless): loss/accuracy curves, epoch times, data vs
    compute per epoch, test accuracy per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {loader: f"C{i}" for i, loader in enumerate(summary)}
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 4.5))
    for loader, s in summary.items():
        for ax, key, scale in ((ax1, "train_loss", 1), (ax2, "val_acc", 100)):
            mean = [scale * v for v in s["per_epoch"][key]["mean"]]
            sd = [scale * v for v in s["per_epoch"][key]["sd"]]
            x = range(1, len(mean) + 1)
            ax.plot(x, mean, color=colors[loader], label=f"{loader} (n={len(s['runs'])})")
            ax.fill_between(x, [m - d for m, d in zip(mean, sd, strict=True)],
                            [m + d for m, d in zip(mean, sd, strict=True)], color=colors[loader], alpha=0.2)
    ax1.set(title="train loss (mean ± sd)", xlabel="epoch")
    ax2.set(title="validation accuracy % (mean ± sd)", xlabel="epoch")
    ax1.legend()
    fig.tight_layout()
    paths.append(out / "loss_accuracy.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, loader in enumerate(summary):
        times = [t for r in runs if r["config"]["loader"] == loader for t in r["epoch_times_s"]]
        ax.scatter([i] * len(times), times, color=colors[loader], alpha=0.5, s=12)
        ax.scatter([i], [statistics.fmean(times)], color="black", marker="_", s=400)
    if reference and "epoch_time_s" in reference:
        ax.axhline(reference["epoch_time_s"], color="gray", ls="--", label=reference.get("label", "reference"))
        ax.legend()
    ax.set_xticks(range(len(summary)), list(summary))
    ax.set(title="epoch time: every epoch of every run, and the mean", ylabel="seconds")
    fig.tight_layout()
    paths.append(out / "epoch_time.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(summary)
    for i, (loader, s) in enumerate(summary.items()):
        data, compute = s["per_epoch"]["data_time_s"]["mean"], s["per_epoch"]["compute_time_s"]["mean"]
        x = [e + i * width for e in range(1, len(data) + 1)]
        ax.bar(x, compute, width, color=colors[loader], label=f"{loader} compute")
        ax.bar(x, data, width, bottom=compute, color=colors[loader], alpha=0.4, hatch="//", label=f"{loader} data")
    ax.set(title="data vs compute time per epoch (mean over runs)", xlabel="epoch", ylabel="seconds")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "data_compute.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for loader in summary:
        group = sorted((r for r in runs if r["config"]["loader"] == loader), key=lambda r: r["config"]["seed"])
        ax.plot([r["config"]["seed"] for r in group], [100 * r["test_accuracy"] for r in group], "o-",
                color=colors[loader], label=loader)
    if reference and "test_accuracy" in reference:
        ax.axhline(100 * reference["test_accuracy"], color="gray", ls="--", label=reference.get("label", "reference"))
    ax.set(title="test accuracy per run", xlabel="seed", ylabel="%")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "test_accuracy.png")
    _save(fig, paths[-1])
    plt.close("all")
    return paths


def _fmt(key: str, value: float) -> str:
    if key.endswith("accuracy"):
        return f"{100 * value:.2f} %"
    return f"{value:.4f}" if "loss" in key or "fraction" in key else f"{value:.2f}"


def markdown(summary: dict, env: dict, command: str, pngs: list[Path], reference: dict | None) -> str:
    lines = ["# fastcifar benchmark: ResNetV2-20 on CIFAR-10", "",
             f"- machine: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
             f"fastcifar {env.get('fastcifar')}, commit {env.get('git_commit')}",
             *([f"- {line}"] if (line := machine_line(env)) else []),
             f"- command: `{command}`", ""]
    for loader, s in summary.items():
        lines += [f"## loader `{loader}`: {len(s['runs'])} runs, seeds {', '.join(map(str, s['seeds']))}", "",
                  "| metric | mean ± sd | 95 % CI | min | max |" + (" reference |" if reference else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|" if reference else "")]
        for key, label in METRICS.items():
            m = s["metrics"][key]
            ci = "–" if math.isnan(m["ci95"][0]) else f"{_fmt(key, m['ci95'][0])} – {_fmt(key, m['ci95'][1])}"
            ref = f" {_fmt(key, reference[key])} |" if reference and key in reference else (" |" if reference else "")
            lines.append(f"| {label} | {_fmt(key, m['mean'])} ± {_fmt(key, m['sd'])} | {ci} | {_fmt(key, m['min'])}"
                         f" | {_fmt(key, m['max'])} |{ref}")
        lines.append("")
    if reference:
        lines += [f"Reference: {reference.get('label', 'reference')} — {reference.get('source', '')}", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def aggregate(bench_dir: Path, command: str = "", reference: dict | None = None, export_wat: bool = False) -> dict:
    """summary.json, report.md and the plots of bench_dir from its runs/*.json; `export/wat/` too."""
    bench_dir = Path(bench_dir)
    runs = load_runs(bench_dir / "runs")
    if not runs:
        return {}
    summary = summarize(runs)
    write_json_atomic(bench_dir / "summary.json", {"loaders": summary, "reference": reference})
    pngs = plots(summary, runs, bench_dir, reference)
    with atomic_path(bench_dir / "report.md") as tmp:
        tmp.write_text(markdown(summary, runs[0]["env"], command, pngs, reference))
    if export_wat:
        export_wat_files(bench_dir, runs)
    return summary
