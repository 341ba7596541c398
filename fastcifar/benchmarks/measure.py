"""Every published figure, re-measured in one command at one commit: `make results` (this module, then
`fastcifar.render`), from a checkout or an installed fastcifar.

Stages, in order, each a separate process with its log under OUT/<machine>/logs/ (not committed):
  warm-up     one epoch of `fastcifar.train --compile` with empty compile caches: the cold start (its
              start-up is reported as such) and the caches every later stage starts from; not a seed
  spec        `fastcifar.bench --seeds N --compile --export wat`: the spec's six metrics, mean ± sd
  breakdown   `fastcifar.step_breakdown`: the compute-only floor in its own process, where its step's time
              goes, and the step's limit from its own parts
  floor       `fastcifar.step_breakdown --processes N`: the compute-only floor and the step's own limit in N
              more processes, the floors pooled (the interval a training run, one more process, is compared
              with), the step against its limit a ratio per process, judged between them
  loader      `fastcifar.bench_loader`, isolated (5 timed epochs each, the compute-only floor in 3 rounds)
  loader-2, loader-3
              the same, each in a process of its own (loader-processes/): the loader ratio judged between
              three processes
  end-to-end  `fastcifar.bench_loader --end-to-end`: whole training epochs of ffcv, memory, torch, dali and
              spdl where installed with spdl's per-image variant, synthetic, and ffcv's two forced variants,
              ffcv-inline and ffcv-parallel; --e2e-repeats rounds, each in an order drawn from the stage's
              own seed (recorded)
  end-to-end-2, end-to-end-3
              the same without the forced variants, each in a process of its own with its own order
              (end-to-end-processes/): every loader's overhead, and training against its floor (synthetic,
              the same loop and graphs in the same process), judged between three processes
  startup     `fastcifar.bench_startup -- --compile` (one cold run, then --startup-repeats warm ones)
  probe       the device's attainable fp32 rate (the median of 5 matmul-and-conv probes: the column's one
              rate) and the step's FLOPs, alone (probe.json)
  ladder      `fastcifar.ladder --processes 3`: plain PyTorch to fastcifar, one change per rung, each rung in
              3 processes timing a whole epoch after an untimed one (ladder/)
Everything goes to OUT/<machine>/ (default docs/results/<machine>/, the machine named from its CPU or GPU
model and core count: `env.machine_name`), with the commit in every JSON. Resumable: a stage whose
output exists from this commit is not redone (a run of the spec seeds likewise); one from another commit
is measured again. A dirty tree is refused (--allow-dirty to measure it anyway, marked +dirty). With
--budget-s a stage is started only when its estimate fits in what is left; --stages picks stages.
Both compile caches (Inductor's, numba's) live in results/.cache/<machine>/, emptied by the warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..reporting import records
from ..reporting.ladder import LadderFile
from ..reporting.machines import belongs, machine_name
from ..utils import ArgumentParser, UserError, child_env, plain_name, run_cli, write_json_atomic
from .stages import StageRunner, check_budget, parse_stages

STAGES = ["warm-up", "spec", "breakdown", "floor", "loader", "loader-2", "loader-3", "end-to-end", "end-to-end-2",
          "end-to-end-3", "startup", "probe", "ladder"]
# Seconds per stage before anything is measured here (a 2-core CPU); the spec's is replaced by the
# warm-up epoch's measured time x 10 epochs x seeds once the warm-up ran.
ESTIMATE_S = {"warm-up": 300, "spec": 3 * 2500, "breakdown": 300, "floor": 300, "loader": 240, "loader-2": 240,
              "loader-3": 240, "end-to-end": 9 * 200, "end-to-end-2": 6 * 200, "end-to-end-3": 6 * 200, "startup": 300,
              "probe": 30, "ladder": 18 * 200}
OUTPUT = {"warm-up": "cold-start.json", "spec": "spec/summary.json", "breakdown": "step_breakdown.json",
          "floor": "floor.json",
          "loader": "bench_loader.json", "loader-2": "loader-processes/process-2.json",
          "loader-3": "loader-processes/process-3.json",
          "end-to-end": "bench_end_to_end.json", "end-to-end-2": "end-to-end-processes/process-2.json",
          "end-to-end-3": "end-to-end-processes/process-3.json", "startup": "bench_startup.json", "probe": "probe.json",
          "ladder": "ladder/ladder.json"}


# What each stage's output must pass to count as done: the record the renderer reads it as.
MODELS = {"warm-up": records.Run, "spec": records.SpecSummary, "breakdown": records.BreakdownFile,
          "floor": records.FloorFile, "loader": records.LoaderFile, "loader-2": records.LoaderFile,
          "loader-3": records.LoaderFile, "end-to-end": records.EndToEndFile,
          "end-to-end-2": records.EndToEndFile, "end-to-end-3": records.EndToEndFile,
          "startup": records.StartupFile, "probe": records.ProbeFile, "ladder": LadderFile}
RUN_ID = "FASTCIFAR_RUN_ID"  # set for every stage's process; recorded as env.run_id (env.environment)


def valid_record(path: Path, model: type) -> tuple[object | None, str | None]:
    """(the record, None), or (None, why it is not one) for a file that is missing or fails the renderer's checks."""
    try:
        record = records.read_record(path, model, path.parent)
    except UserError as err:
        return None, str(err)
    return (record, None) if record is not None else (None, f"{path} does not exist")


def probe(out: Path, device: str) -> None:
    """The probe stage, in its own process: the attainable rate on the run's threads, and the FLOPs."""
    import torch

    from ..devices import resolve_device
    from ..env import environment, set_float32_precision
    from ..flops import attainable_probe, flops_record

    dev = resolve_device(device)
    set_float32_precision(dev, tf32=False)
    env = environment(dev, module="fastcifar.measure")
    # Five probes of 4 s each; the column's rate is their median, all five kept (probes_gflops): every
    # utilisation of the column divides by this one rate, so its figures compare with each other.
    rates = sorted((attainable_probe(dev, seconds=4.0) for _ in range(5)), key=lambda r: r["gflops"])
    record = flops_record(128)
    write_json_atomic(out, {"attainable_fp32": {**rates[2], "of": "the median of 5 probes"},
                            "probes_gflops": [r["gflops"] for r in rates], "flops_per_image": record["flops_per_image"],
                            "flops": record, "torch_threads": torch.get_num_threads(), "env": env})


def stale_runs(runs: Path, same_code) -> list[Path]:
    """Remove the spec runs not measured by this code (another commit, or another run id outside git) or that
    fail the renderer's checks (fastcifar.bench then runs those seeds again); returns what was removed."""
    removed = []
    for path in sorted(runs.glob("*.json")):
        record, _ = valid_record(path, records.Run)
        if record is None or not same_code(record.env):
            for f in runs.glob(path.stem + ".*"):
                f.unlink()
                removed.append(f)
    return removed


class Measurement:
    """The stages of one `make results`: which are done by this code on this machine (resumption), their
    estimates, and `measure.json` (the stages' results, rewritten after every stage by the runner).

    The code is identified by its commit in a checkout; in an installed copy outside git, where records carry
    no commit, by the package's version and a run id: a random id this measurement records in measure.json
    and passes to every stage's process (FASTCIFAR_RUN_ID, recorded as env.run_id). A later `make results`
    with the same version resumes that run id; a stage counts as done only when its file passes the checks
    the renderer applies, was measured on this column's machine and by this code."""

    def __init__(self, args: argparse.Namespace, folder: Path, commit: str | None, cache: Path):
        self.args, self.folder, self.commit, self.cache = args, folder, commit, cache
        previous, _ = valid_record(folder / "measure.json", records.MeasureFile)
        self.run_id = (previous.run_id if previous is not None and previous.run_id and previous.commit == commit
                       and previous.fastcifar == __version__ else uuid.uuid4().hex[:12])
        self.runner = StageRunner(folder, args.budget_s or None, self.report, self.estimate, self.done, echo=True)

    def same_code(self, env: records.Env) -> bool:
        if self.commit is not None:
            return env.git_commit == self.commit
        return env.run_id == self.run_id and env.fastcifar == __version__

    def report(self, stages: dict) -> None:
        write_json_atomic(self.folder / "measure.json", {"commit": self.commit, "fastcifar": __version__,
                                                         "run_id": self.run_id, "stages": stages})

    def done(self, name: str) -> str | None:
        """Why the stage needs no run: its output passes the renderer's checks, on this machine, by this code
        (for the spec: all --seeds runs of it too)."""
        path = self.folder / OUTPUT[name]
        if name == "spec":
            runs = [r for r in (valid_record(p, records.Run)[0] for p in (self.folder / "spec" / "runs").glob("*.json"))
                    if r is not None and self.same_code(r.env)]
            if len(runs) < self.args.seeds:
                return None
            return f"done by this code: {len(runs)} runs in {path.parent / 'runs'}"
        record, why = valid_record(path, MODELS[name])
        if record is None:
            if path.exists():
                print(f"measuring {name} again: {why}", flush=True)
            return None
        if record.env.machine is not None and not belongs(record.env, self.folder.name):
            return None
        return f"done by this code: {path}" if self.same_code(record.env) else None

    def estimate(self, name: str) -> float:
        cold, _ = valid_record(self.folder / OUTPUT["warm-up"], records.Run)
        if name == "spec" and cold is not None:
            return self.args.seeds * (10 * cold.epoch_time_s + 120)
        return ESTIMATE_S[name]

    def run(self, i: int, name: str, cmd: list[str]) -> bool:
        tag = f"[{i}/{len(self.args.stage_list)} {name}]"
        if not self.done(name):  # the runner asks again (its own check), and then says why it skips
            print(f"{tag} ~{self.estimate(name) / 60:.0f} min", flush=True)
        ok = self.runner.run(name, cmd, {**child_env(self.cache), RUN_ID: self.run_id}, tag=tag)
        return ok and (self.runner.stages[name]["rc"] == "kept" or (self.folder / OUTPUT[name]).is_file())


def commands(name: str, args: argparse.Namespace, folder: Path) -> list[str]:
    py, data = sys.executable, str(args.data_dir)
    common = ["--data-dir", data, "--device", args.device]
    if name == "warm-up":
        return [py, "-m", "fastcifar.train", *common, "--compile", "--epochs", "1", "--out", str(folder),
                "--run-name", "cold-start"]
    if name == "spec":
        return [py, "-m", "fastcifar.bench", "--seeds", str(args.seeds), "--name", "spec", "--root", str(folder),
                "--export", "wat", "--compile", *common]
    if name == "breakdown":
        return [py, "-m", "fastcifar.step_breakdown", "--device", args.device, "--out", str(folder / OUTPUT[name])]
    if name == "floor":
        return [py, "-m", "fastcifar.step_breakdown", "--processes", str(args.floor_processes),
                "--device", args.device, "--out", str(folder / OUTPUT[name])]
    if name.startswith("loader"):
        return [py, "-m", "fastcifar.bench_loader", *common, "--epochs", "5", "--compute-rounds", "3",
                "--out", str(folder / OUTPUT[name])]
    if name.startswith("end-to-end"):
        dali = importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali")
        spdl = importlib.util.find_spec("spdl") and importlib.util.find_spec("spdl.pipeline")
        first = name == "end-to-end"  # the forced variants in the first process only
        loaders = ("ffcv,memory,torch" + (",dali" if dali else "") + (",spdl" if spdl else "")
                   + (",spdl-per-image" if spdl and first else "") + (",ffcv-inline,ffcv-parallel" if first else ""))
        return [py, "-m", "fastcifar.bench_loader", *common, "--end-to-end", "--loaders", loaders,
                "--repeats", str(args.e2e_repeats), "--order-seed", "1" if first else name.rsplit("-", 1)[1],
                *(["--max-steps", str(args.e2e_steps)] if args.e2e_steps else []), "--out", str(folder / OUTPUT[name])]
    if name == "ladder":
        return [py, "-m", "fastcifar.ladder", *common, "--processes", "3", "--out", str(folder / "ladder")]
    if name == "startup":
        return [py, "-m", "fastcifar.bench_startup", "--data-dir", data, "--repeats", str(args.startup_repeats),
                "--out", str(folder / OUTPUT["startup"]), "--", "--compile", "--device", args.device]
    return [py, "-m", "fastcifar.measure", "--probe-only", str(folder / OUTPUT["probe"]), "--device", args.device]


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="results root: OUT/<machine>/")
    p.add_argument("--machine", default=None, help="this machine's folder (derived; another's is refused)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda")
    p.add_argument("--seeds", type=int, default=3, help="spec runs, seeds 0..N-1")
    p.add_argument("--e2e-repeats", type=int, default=1, help="end to end: rounds of whole epochs per process")
    p.add_argument("--e2e-steps", type=int, default=None,
                   help="end to end: steps per timed epoch (default: whole epochs; fewer only for smoke runs)")
    p.add_argument("--floor-processes", type=int, default=5, help="floor: separate processes, pooled")
    p.add_argument("--startup-repeats", type=int, default=5, help="start-up: warm runs")
    p.add_argument("--stages", default=None, help=f"comma-separated, from {', '.join(STAGES)} (default: all)")
    p.add_argument("--budget-s", type=float, default=0, help="seconds the whole command may take (0: no limit)")
    p.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes")
    p.add_argument("--probe-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_only:
        probe(args.probe_only, args.device)
        return 0
    args.stage_list = parse_stages(args.stages, STAGES)
    check_budget(args.budget_s)
    if min(args.seeds, args.e2e_repeats, args.startup_repeats) < 1 or args.floor_processes < 2 \
            or (args.e2e_steps is not None and args.e2e_steps < 1):
        raise UserError("--seeds, --e2e-repeats, --e2e-steps and --startup-repeats must be at least 1, "
                        "--floor-processes at least 2")
    if args.machine is not None:
        plain_name(args.machine, "--machine")  # a folder under --out, never a path out of it
    from ..data import check_betons
    from ..devices import resolve_device
    from ..env import environment, git_commit

    commit = git_commit()
    if commit and commit.endswith("+dirty") and not args.allow_dirty:
        raise UserError("the tree has uncommitted changes: commit them (every figure names its commit), "
                        "or pass --allow-dirty")
    check_betons(args.data_dir)  # one line now, not a failed stage later
    env = environment(resolve_device(args.device), module="fastcifar.measure")
    name = machine_name(env)
    if args.machine is not None and args.machine != name:
        raise UserError(f"--machine {args.machine}: this machine's column is {name!r} (from its CPU or GPU, "
                        "family and model): a column holds one machine's figures")
    folder = args.out / name
    try:
        (folder / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror or err}") from None
    cache = Path("results") / ".cache" / name
    m = Measurement(args, folder, commit, cache)
    mach = env["machine"]
    print(f"measuring {name}: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs "
          f"({mach['logical_cpus_are']}), {env['device_name']}; commit {commit}; stages {', '.join(args.stage_list)}",
          flush=True)
    failed = []
    for i, stage in enumerate(args.stage_list, 1):
        if stage == "warm-up" and not m.done(stage):
            shutil.rmtree(cache, ignore_errors=True)  # a cold start is one with empty caches
        if stage == "spec" and not m.done(stage):
            stale_runs(folder / "spec" / "runs", m.same_code)
        if not m.run(i, stage, commands(stage, args, folder)):
            failed += [] if m.runner.stages[stage]["rc"] == "skipped" else [stage]
    stages = m.runner.stages
    skipped = m.runner.skipped()
    print(f"measure: {len(stages) - len(failed) - len(skipped)}/{len(stages)} stages ok"
          + (f", skipped {', '.join(skipped)}" if skipped else "") + f"; results in {folder}; "
          "render the tables with: python -m fastcifar.render")
    if failed:
        print(f"fastcifar.measure: error: failed stages: {', '.join(failed)} (logs in {folder / 'logs'})",
              file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.measure")


if __name__ == "__main__":
    cli()
