"""Repeated runs as a benchmark: `python -m fastcifar.bench --seeds 5 [--loaders ffcv,torch] [trainer flags]`.

Each (loader, seed) is a normal `fastcifar.train` run in its own process, writing its JSON, weights
and log into results/bench/NAME/runs/, one after another. Resumable: a run whose JSON exists is
skipped. A failed run is reported with its log's last line and the benchmark goes on, then exits 1
naming it. `--shard I/N` runs only the jobs whose position is I mod N, so N processes (one per GPU,
one per machine on shared storage, or a SLURM array) split one benchmark. After running, and alone
with `--aggregate-only`, it writes summary.json, report.md and the plots (fastcifar/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..data import LOADERS
from ..reporting.bench_report import aggregate
from ..utils import ArgumentParser, UserError, plain_name, run_cli, writable_folder, write_json_atomic

# Trainer flags that vary between a benchmark's runs or only say where files go: not the recipe.
NOT_RECIPE = {"seed", "loader", "run_name", "out", "profile", "profile_dir", "profile_steps", "profile_epoch"}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = ArgumentParser(prog="fastcifar.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                       epilog="Any other flag is passed to every fastcifar.train run (e.g. --compile --epochs 10).")
    p.add_argument("--seeds", type=int, default=3, help="runs per loader, seeds 0..N-1")
    p.add_argument("--seed-list", default=None, help="comma-separated seeds instead of 0..N-1")
    p.add_argument("--loaders", default="ffcv", help=f"comma-separated, from {', '.join(LOADERS)}")
    p.add_argument("--name", default="default", help="the benchmark's folder name under --root")
    p.add_argument("--root", type=Path, default=Path("results/bench"), help="where benchmarks live")
    p.add_argument("--shard", default="0/1", metavar="I/N|auto",
                   help="run only the jobs whose position is I mod N; auto: I and N of a SLURM job array "
                        "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild summary, report and plots")
    p.add_argument("--export", choices=["wat"], default=None, help="also write each run in the benchmark's format")
    p.add_argument("--reference", type=Path, default=None,
                   help="JSON with the same metric names (e.g. docs/reference-pytorch.json), shown beside ours")
    args, trainer = p.parse_known_args(argv)
    if args.shard == "auto":
        args.shard = shard_from_env(os.environ)
    try:
        args.shard_index, args.shard_count = (int(v) for v in args.shard.split("/"))
        assert 0 <= args.shard_index < args.shard_count
    except (ValueError, AssertionError):
        raise UserError(f"--shard expects I/N with 0 <= I < N, got {args.shard!r}") from None
    try:
        args.seed_values = ([int(v) for v in args.seed_list.split(",")] if args.seed_list
                            else list(range(args.seeds)))
    except ValueError:
        raise UserError(f"--seed-list expects comma-separated integers, got {args.seed_list!r}") from None
    if not args.seed_values or min(args.seed_values) < 0 or len(set(args.seed_values)) != len(args.seed_values):
        raise UserError("need at least one seed, all >= 0 and distinct (--seeds N or --seed-list)")
    args.loader_list = args.loaders.split(",")
    for loader in args.loader_list:
        if loader not in LOADERS:
            raise UserError(f"unknown loader {loader!r}: choose from {', '.join(LOADERS)}")
    plain_name(args.name, "--name")
    for flag in ("--seed", "--loader", "--run-name", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in trainer):
            raise UserError(f"{flag} is set by the benchmark for each run; use --seeds/--seed-list, --loaders, --name")
    return args, trainer


def shard_from_env(environ) -> str:
    """'I/N' of a SLURM job array: the task's place in the array (IDs may start at any
    SLURM_ARRAY_TASK_MIN, e.g. --array=1-4) and the number of tasks; the job script needs no arithmetic."""
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    missing = [name for name in names if name not in environ]
    if missing:
        raise UserError(f"--shard auto needs a SLURM job array ({', '.join(missing)} not set): "
                        "run it under sbatch --array, or pass --shard I/N")
    try:
        task, count = int(environ[names[0]]), int(environ[names[1]])
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    except ValueError:
        raise UserError(f"--shard auto: {names[0]}, {names[1]} and SLURM_ARRAY_TASK_MIN must be integers") from None
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    if step != 1:
        raise UserError(f"--shard auto needs an array of consecutive IDs (SLURM_ARRAY_TASK_STEP={step}): "
                        "pass --shard I/N")
    return f"{task - first}/{count}"


def recipe_of(trainer: list[str]) -> dict:
    """The trainer's full configuration for these flags (defaults included), without what varies per run.
    Parsing them here also rejects a bad trainer flag before any run starts."""
    from ..train import parse_args as train_args

    config = vars(train_args(trainer))
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()
            if k not in NOT_RECIPE and k != "profile_schedule"}


def check_recipe(bench_dir: Path, recipe: dict) -> None:
    """Refuse to mix: the folder's recipe (bench.json) and every existing run must match this one."""
    def differing(other: dict) -> list[str]:
        return sorted(k for k in set(recipe) | set(other) if k not in NOT_RECIPE and recipe.get(k) != other.get(k))

    stored = bench_dir / "bench.json"
    if stored.is_file():
        keys = differing(json.loads(stored.read_text())["recipe"])
        if keys:
            raise UserError(f"{bench_dir} holds runs of another recipe (differing: {', '.join(keys)}); "
                            "use another --name")
    for path in sorted((bench_dir / "runs").glob("*.json")):
        keys = differing(json.loads(path.read_text())["config"])
        if keys:
            raise UserError(f"{path} was run with another recipe (differing: {', '.join(keys)}); use another --name")


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def main(argv: Sequence[str] | None = None) -> int:
    args, trainer = parse_args(argv)
    bench_dir = args.root / args.name
    runs_dir = writable_folder(bench_dir / "runs", "the benchmark folder")
    command = " ".join(["python -m fastcifar.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    reference = None
    if args.reference:
        try:
            reference = json.loads(args.reference.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--reference {args.reference}: not a readable JSON file ({err})") from None

    failed: list[str] = []
    if not args.aggregate_only:
        recipe = recipe_of(trainer)
        check_recipe(bench_dir, recipe)
        write_json_atomic(bench_dir / "bench.json", {"recipe": recipe, "trainer_flags": trainer})
        jobs = [(loader, seed) for loader in args.loader_list for seed in args.seed_values]
        mine = [job for position, job in enumerate(jobs) if position % args.shard_count == args.shard_index]
        todo = [(loader, seed) for loader, seed in mine if not (runs_dir / f"{loader}-seed{seed}.json").is_file()]
        print(f"benchmark {bench_dir}: {len(jobs)} runs ({len(args.loader_list)} loaders x "
              f"{len(args.seed_values)} seeds), shard {args.shard}: {len(mine)} mine, {len(mine) - len(todo)} done, "
              f"{len(todo)} to run", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for loader, seed in tqdm(todo, desc="runs", unit="run", disable=not todo):
            name = f"{loader}-seed{seed}"
            t0 = time.perf_counter()
            with open(runs_dir / f"{name}.log", "w") as log:
                rc = subprocess.run([sys.executable, "-m", "fastcifar.train", *trainer, "--loader", loader,
                                     "--seed", str(seed), "--out", str(runs_dir), "--run-name", name],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
            if rc == 0 and (runs_dir / f"{name}.json").is_file():
                r = json.loads((runs_dir / f"{name}.json").read_text())
                tqdm.write(f"  {name}: test accuracy {100 * r['test_accuracy']:.2f} %, "
                           f"epoch {r['epoch_time_s']:.1f} s, total {r['total_training_time_s']:.0f} s")
            else:
                failed.append(name)
                tqdm.write(f"  {name}: FAILED after {time.perf_counter() - t0:.0f} s (exit {rc}): "
                           f"{last_line(runs_dir / f'{name}.log')}")
    summary = aggregate(bench_dir, command, reference, export_wat=args.export == "wat")
    if summary:
        for loader, s in summary.items():
            m = s["metrics"]
            print(f"{loader}: n={len(s['runs'])}  test accuracy {100 * m['test_accuracy']['mean']:.2f} ± "
                  f"{100 * m['test_accuracy']['sd']:.2f} %  epoch {m['epoch_time_s']['mean']:.2f} ± "
                  f"{m['epoch_time_s']['sd']:.2f} s")
        print(f"report: {bench_dir / 'report.md'}  summary: {bench_dir / 'summary.json'}")
    else:
        print(f"no finished runs in {runs_dir} yet")
    if failed:
        print(f"fastcifar.bench: error: {len(failed)} run(s) failed: {', '.join(failed)} "
              f"(logs in {runs_dir})", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.bench")


if __name__ == "__main__":
    cli()
