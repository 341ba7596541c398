"""Options for the compiled CPU step, tried by evidence: `python -m fastcifar.benchmarks.step_options`.

Each option is a setting fixed when a process starts (OpenMP's waiting and thread placement, Inductor's
code generation: its variables, or its config set by step_breakdown --inductor-config), so each is tried
in whole processes: `step_breakdown` run --processes times per option,
the options interleaved (baseline, a, b, ..., baseline, a, b, ...) so that a machine drifting over
minutes does not favour one. Every JSON records the variables it ran with (env.environment_variables);
docs/benchmarks.md renders the table from them. An option is kept only where all its processes beat
all of the baseline's; a kept one becomes a default the commands set before torch loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..utils import ArgumentParser, UserError, child_env, plain_name, run_cli, write_json_atomic
from .stages import StageRunner

OPTIONS: dict[str, dict[str, str]] = {
    "baseline": {},
    # torch's large CPU tensors in transparent huge pages: kept (fastcifar/__init__.py sets it), so tried off
    "thp-off": {"THP_MEM_ALLOC_ENABLE": "0"},
    "inductor-aggressive-fusion": {},  # set in the process: Inductor fuses kernels sharing no buffer (CONFIG)
    "inductor-no-layout-opt": {"TORCHINDUCTOR_LAYOUT_OPTIMIZATION": "0"},  # convolutions' layouts as given
    "inductor-dynamic-threads": {"TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1"},  # threads per kernel by its size
    "inductor-min-chunk-4096": {"TORCHINDUCTOR_CPP_MIN_CHUNK_SIZE": "4096"},  # small loops on one thread
    "omp-active": {"OMP_WAIT_POLICY": "ACTIVE"},  # OpenMP threads spin between parallel regions
    "omp-passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # ... or sleep at once
    "omp-bind-cores": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},  # one thread pinned per core
    "inductor-max-autotune": {"TORCHINDUCTOR_MAX_AUTOTUNE": "1"},  # Inductor's CPU autotuning
    "inductor-cpp-wrapper": {"TORCHINDUCTOR_CPP_WRAPPER": "1"},  # no Python between the step's kernels
    # the allocations inside the compiled graphs: Inductor's memory planning pools each graph's buffers into few
    # allocations (its default reuses buffers one by one; the breakdown's "allocation and graph overhead")
    "inductor-memory-planning": {"TORCHINDUCTOR_MEMORY_PLANNING": "1"},
    # AdamW fused is the default (optim.adamw): torch's other two tried against it
    "adamw-for-loop": {"FASTCIFAR_ADAMW": "for-loop"},  # torch's CPU default: six ops and an .item() per parameter
    "adamw-foreach": {"FASTCIFAR_ADAMW": "foreach"},  # one op per kind over all parameters
}
# Options that are Inductor config with no variable of its own: step_breakdown --inductor-config KEY=VALUE.
CONFIG: dict[str, list[str]] = {"inductor-aggressive-fusion": ["aggressive_fusion=True"]}


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.benchmarks.step_options", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for <option>-<i>.json (and logs/)")
    p.add_argument("--processes", type=int, default=3, help="whole processes per option")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from {', '.join(OPTIONS)}")
    p.add_argument("--device", default="cpu", help="the device of the step")
    args = p.parse_args(argv)
    chosen = [plain_name(o.strip(), "an option") for o in args.options.split(",")]
    unknown = [o for o in chosen if o not in OPTIONS]
    if unknown or args.processes < 1:
        raise UserError(f"--options from {', '.join(OPTIONS)}, --processes at least 1 "
                        f"(got {unknown or args.processes})")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    runner = StageRunner(args.out, None, lambda stages: write_json_atomic(args.out / "options.json", stages),
                         lambda name: 0.0, lambda name: "done" if (args.out / f"{name}.json").is_file() else None)
    for i in range(1, args.processes + 1):
        for option in chosen:
            name = f"{option}-{i}"
            env = {**child_env(), **OPTIONS[option]}
            for var in {v for o in OPTIONS.values() for v in o} - set(OPTIONS[option]):
                env.pop(var, None)  # only this option's settings
            runner.run(name, [sys.executable, "-m", "fastcifar.step_breakdown", "--device", args.device,
                              "--out", str(args.out / f"{name}.json"), "--no-trace", "--no-picture",
                              *(f"--inductor-config={c}" for c in CONFIG.get(option, []))], env)
    ok = len(runner.stages) - len(runner.failed())
    print(f"step options: {ok} of {len(runner.stages)} runs ok in {args.out}; the table: python -m fastcifar.render")
    return 1 if runner.failed() else 0


def cli() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_cli(main, "fastcifar.benchmarks.step_options")


if __name__ == "__main__":
    cli()
