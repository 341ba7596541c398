"""fastcifar against plain PyTorch on this machine, one change at a time: `python -m fastcifar.ladder`
(a stage of `make results`; `make results STAGES=ladder` runs it alone).

The spec's model, recipe and seed, trained by `fastcifar.train` in whole processes, one change per rung
(RUNGS): plain PyTorch as a user writes it first (eager, NCHW, the DataLoader with per-image transforms and
no workers, torch's default AdamW, no huge pages), the DataLoader's workers on the cores as a user tuning
it would, channels-last, torch.compile, the FFCV loader with its augmentation on the device, and every
remaining default of `python -m fastcifar.train --compile` (fused AdamW, huge pages). Why this order: each
rung is a change a PyTorch user can make alone, cheapest first, and each later one needs the one before
(Inductor's layout choices assume channels-last; FFCV's device op ends in the compiled graph's layout).

Each process trains --warm-up-steps untimed steps (FFCV's JIT, the DataLoader's workers starting, caches;
after the compile warm-up the trainer does before its first step), then one epoch timed whole, every step
of it, the last partial batch included. --processes rounds, each
running every rung once in an order drawn from --seed (recorded), so a machine drifting over the minutes
favours no rung. Writes OUT/runs/<rung>-<round>.json (the trainer's JSON), OUT/ladder.json (each rung's
epoch time over its processes with the 95 % interval of the mean, each rung's gain over the one before and
plain -> fastcifar, each with the 95 % interval between processes) and OUT/ladder.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from ..reporting import records
from ..reporting.stats import describe, ratio95
from ..utils import ArgumentParser, UserError, child_env, run_cli, write_json_atomic
from .measure import valid_record
from .stages import StageRunner

PLAIN_ENV = {"FASTCIFAR_ADAMW": "torch-default", "THP_MEM_ALLOC_ENABLE": "0"}


def rungs(cores: int) -> list[dict]:
    """Each rung: its name, what it adds, the trainer's flags and the environment it runs in."""
    workers = ["--loader", "torch", "--workers", str(cores)]
    return [
        {"name": "plain", "adds": "plain PyTorch: eager, NCHW, the DataLoader (per-image transforms, no "
         "workers), torch's default AdamW, no huge pages",
         "flags": ["--loader", "torch", "--workers", "0", "--memory-format", "contiguous"], "env": PLAIN_ENV},
        {"name": "workers", "adds": f"+ the DataLoader's workers on the cores ({cores})",
         "flags": [*workers, "--memory-format", "contiguous"], "env": PLAIN_ENV},
        {"name": "channels-last", "adds": "+ channels-last", "flags": workers, "env": PLAIN_ENV},
        {"name": "compile", "adds": "+ torch.compile", "flags": [*workers, "--compile"], "env": PLAIN_ENV},
        {"name": "ffcv", "adds": "+ the FFCV loader, augmentation on the device", "flags": ["--compile"],
         "env": PLAIN_ENV},
        {"name": "fastcifar", "adds": "+ every remaining default (fused AdamW, huge pages): "
         "python -m fastcifar.train --compile", "flags": ["--compile"], "env": {}},
    ]


def timed_epoch(path: Path) -> tuple[dict, dict]:
    """The last epoch of one process's run (its seconds and images: a whole epoch, every step), and its env."""
    run = json.loads(path.read_text())
    last = run["epochs"][-1]
    return {"file": f"runs/{path.name}", "epoch_s": last["seconds"], "images": last["train_images"],
            "data_fraction": last["data_fraction"]}, run["env"]


def summarize(chosen: list[dict], order: list[list[str]], out: Path, seed: int, warm_up_steps: int) -> dict:
    """ladder.json from the runs in OUT/runs/: every rung's epochs over its processes, the gains between them."""
    rows, envs = [], []
    for rung in chosen:
        processes = []
        for r in range(1, len(order) + 1):
            epoch, env = timed_epoch(out / "runs" / f"{rung['name']}-{r}.json")
            processes.append({"round": r, **epoch})
            envs.append(env)
        times = [p["epoch_s"] for p in processes]
        stats = describe(times)
        stats["ci95"] = stats["ci95"] if len(times) > 1 else None  # one process: no interval (never NaN)
        rows.append({**rung, "processes": processes, "epoch_s": stats})
    for before, after in zip(rows, rows[1:], strict=False):
        after["gain"] = ratio95([p["epoch_s"] for p in before["processes"]],
                                [p["epoch_s"] for p in after["processes"]])
    return {"rungs": rows, "speedup": ratio95([p["epoch_s"] for p in rows[0]["processes"]],
                                              [p["epoch_s"] for p in rows[-1]["processes"]]),
            "order": order, "seed": seed, "warm_up_steps": warm_up_steps, "processes": len(order),
            "env": envs[0]}  # the first rung's first process's


def plot(ladder: dict, path: Path) -> None:
    """One bar per rung: its epoch time with the 95 % interval between processes, each gain above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    rows = ladder["rungs"]
    means = [r["epoch_s"]["mean"] for r in rows]
    errors = [[m - r["epoch_s"]["ci95"][0] if r["epoch_s"]["ci95"] else 0 for m, r in zip(means, rows, strict=True)],
              [r["epoch_s"]["ci95"][1] - m if r["epoch_s"]["ci95"] else 0 for m, r in zip(means, rows, strict=True)]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(rows))])
    for i, r in enumerate(rows):
        if "gain" in r:
            ax.annotate(f"{r['gain']['ratio']:.2f}x", (i, means[i]), ha="center", va="bottom", fontsize="small",
                        xytext=(0, 8), textcoords="offset points")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], fontsize="small")
    ax.set_ylabel("seconds per epoch")
    s = ladder["speedup"]
    ax.set_title(f"plain PyTorch -> fastcifar, same model, this machine: {s['ratio']:.2f}x per epoch "
                 f"({ladder['processes']} processes per rung)", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def table(ladder: dict) -> str:
    lines = [f"{'rung':<15}{'s/epoch':>9}  {'95 % interval':<17}{'gain':>7}  {'95 % interval':<15} adds"]
    for r in ladder["rungs"]:
        e = r["epoch_s"]
        ci = f"{e['ci95'][0]:.1f} - {e['ci95'][1]:.1f}" if e["ci95"] else "-"
        gain = r.get("gain")
        g = f"{gain['ratio']:.2f}x" if gain else ""
        gci = f"{gain['ci95'][0]:.2f} - {gain['ci95'][1]:.2f}" if gain and gain["ci95"] else ""
        lines.append(f"{r['name']:<15}{e['mean']:>9.1f}  {ci:<17}{g:>7}  {gci:<15} {r['adds']}")
    s = ladder["speedup"]
    lines.append(f"plain -> fastcifar: {s['ratio']:.2f}x per epoch"
                 + (f" (95 % interval {s['ci95'][0]:.2f} - {s['ci95'][1]:.2f})" if s["ci95"] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/ladder"), help="folder: runs/, ladder.json, ladder.png")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda")
    p.add_argument("--processes", type=int, default=3, help="rounds: processes per rung (at least 3 for a verdict)")
    p.add_argument("--warm-up-steps", type=int, default=40, help="untimed steps per process before its timed epoch")
    p.add_argument("--rungs", default=None, help="comma-separated, from the ladder's rungs in order (default: all)")
    p.add_argument("--seed", type=int, default=0, help="the rounds' order of rungs is drawn from it")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests: tiny epochs
    args = p.parse_args(argv)
    if args.processes < 1 or args.warm_up_steps < 1:
        raise UserError("--processes and --warm-up-steps must be at least 1")
    every = rungs(os.cpu_count() or 1)
    names = [r["name"] for r in every]
    wanted = names if args.rungs is None else [n.strip() for n in args.rungs.split(",")]
    if not wanted or any(n not in names for n in wanted):
        raise UserError(f"--rungs from {', '.join(names)}, got {args.rungs!r}")
    chosen = [r for r in every if r["name"] in wanted]
    from ..data import check_betons
    from ..env import git_commit

    check_betons(args.data_dir)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    order = [rng.sample([r["name"] for r in chosen], len(chosen)) for _ in range(args.processes)]
    commit = git_commit()

    def done(name: str) -> str | None:  # resumption: a run of this commit (never of a dirty tree) that passes
        path = args.out / "runs" / f"{name}.json"  # the renderer's checks is kept, as make results keeps a stage's
        record, _ = valid_record(path, records.Run)
        kept = record is not None and commit and not commit.endswith("+dirty") and record.env.git_commit == commit
        return f"done by this commit: {path}" if kept else None

    runner = StageRunner(args.out, None, lambda stages: write_json_atomic(args.out / "stages.json", stages),
                         lambda name: 0.0, done)
    by_name = {r["name"]: r for r in chosen}
    setting_vars = {v for r in every for v in r["env"]}
    for k, names_in_round in enumerate(order, 1):
        for name in names_in_round:
            rung = by_name[name]
            env = {**child_env(), **rung["env"]}
            for var in setting_vars - set(rung["env"]):
                env.pop(var, None)  # the fastcifar rung runs with the defaults
            extra = ["--max-steps-per-epoch", str(args.max_steps_per_epoch)] if args.max_steps_per_epoch else []
            runner.run(f"{name}-{k}", [sys.executable, "-m", "fastcifar.train", "--data-dir", str(args.data_dir),
                                       "--device", args.device, "--epochs", "1", "--warm-up-steps",
                                       str(args.warm_up_steps), *rung["flags"],
                                       *extra, "--out", str(args.out / "runs"), "--run-name", f"{name}-{k}"],
                       env, tag=f"[round {k}/{args.processes} {name}]")
    if runner.failed():
        raise UserError(f"ladder runs failed: {', '.join(runner.failed())} (logs in {args.out / 'logs'})")
    ladder = summarize(chosen, order, args.out, args.seed, args.warm_up_steps)
    write_json_atomic(args.out / "ladder.json", ladder)
    plot(ladder, args.out / "ladder.png")
    print(table(ladder))
    print(f"written: {args.out / 'ladder.json'}, {args.out / 'ladder.png'}")
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.ladder")


if __name__ == "__main__":
    cli()
