"""Start-up benchmark: where the time from process start to the first training step goes.

Runs `fastcifar.train --epochs 1 --max-steps-per-epoch 1` (plus the flags given) as fresh processes:
first with an empty compile cache (cold: TORCHINDUCTOR_CACHE_DIR pointed at a new folder), then
`--repeats` times with that cache filled (warm), and reports each piece of the results' `startup`
(median over the warm runs) and the total. Figures depend on the machine: name it with them.
Usage: python -m fastcifar.bench_startup --data-dir data [--repeats 3] [--out results/bench_startup.json]
[-- trainer flags] (from a checkout also python tools/bench_startup.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..devices import resolve_device
from ..env import environment
from ..reporting.records import DATA_PIPELINE, PIECES
from ..reporting.stats import describe
from ..utils import ArgumentParser, UserError, child_env, run_cli, writable_file, write_json_atomic


def one_run(data_dir: Path, cache: Path, trainer: list[str], out: Path, name: str) -> dict:
    env = child_env(cache)
    cmd = [sys.executable, "-m", "fastcifar.train", "--data-dir", str(data_dir), "--epochs", "1",
           "--max-steps-per-epoch", "1", *trainer, "--out", str(out), "--run-name", name]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads((out / f"{name}.json").read_text())["startup"]


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="bench_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--repeats", type=int, default=3, help="warm runs after the cold one")
    p.add_argument("--out", type=Path, default=Path("results/bench_startup.json"), help="JSON results")
    p.add_argument("trainer", nargs="*", help="trainer flags after --, e.g. -- --compile --device cuda")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    writable_file(args.out, "the output file")  # now, not after minutes of runs
    trainer = args.trainer or ["--compile"]
    device = "cuda" if "cuda" in " ".join(trainer) else "auto"
    env = environment(resolve_device(device), module="fastcifar.bench_startup", trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "runs"
        cold = one_run(args.data_dir, cache, trainer, out, "cold")
        warm = [one_run(args.data_dir, cache, trainer, out, f"warm{i}") for i in range(args.repeats)]
    for run in (cold, *warm):
        run["data_pipeline_s"] = sum(run[k] for k in DATA_PIPELINE)
    median = {k: statistics.median(run[k] for run in warm) for k in (*PIECES, "data_pipeline_s")}
    stats = {k: describe([run[k] for run in warm]) for k in ("startup_s", "data_pipeline_s")}  # for the verdicts
    write_json_atomic(args.out, {"cold": cold, "warm": warm, "warm_median": median, "warm_stats": stats, "env": env})
    print(f"start-up, process start -> first training step: {env['device_name']}, trainer flags {' '.join(trainer)}")
    print(f"{'piece':<22}{'cold s':>9}{'warm s (median of ' + str(args.repeats) + ')':>26}")
    for k in PIECES:
        print(f"{k:<22}{cold[k]:>9.2f}{median[k]:>26.2f}")
    print(f"{'data pipeline':<22}{cold['data_pipeline_s']:>9.2f}{median['data_pipeline_s']:>26.2f}"
          f"   ({' + '.join(DATA_PIPELINE)})")
    print(f"compile caches: cold {cold['compile_cache']}, warm {warm[-1]['compile_cache']}")
    print(f"written to {args.out}")
    return 0


def cli() -> None:
    run_cli(main, "bench_startup")


if __name__ == "__main__":
    cli()
