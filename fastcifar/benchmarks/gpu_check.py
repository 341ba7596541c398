"""The whole GPU proof in one command: `make gpu-check OUT=...` (this module, wrapped by make), made for
a GPU rented for a short time, under a time limit: nothing to bring but the checkout and its wheels,
a time budget it keeps, and a report that is current after every stage.

Data: without --data (or --data synthetic) a full-size CIFAR-shaped archive of seeded random pixels
(50,000 + 10,000 images, `fastcifar.synthetic`) is written and converted there; betons hold raw
pixels, so every speed figure is what CIFAR-10 gives, and the accuracies are chance (said so in the
summary). --data DIR|ARCHIVE: betons, or the real archive converted, for the accuracy check.

Stages, in order of value, each a separate process with its own log under OUT/logs/:
  spec             python -m fastcifar.train --compile (the full spec run, 10 epochs)
  cuda-tests       the CUDA test lane: python -m pytest -m cuda (skipped with the reason without pytest,
                   or outside a checkout)
  step-breakdown   fastcifar.step_breakdown: where a compiled step's time goes (the CUDA kernels'
                   categories), its own limit, and the compute-only floor
  bench-loader     fastcifar.bench_loader: images/s of each pipeline on the device, and its headroom
  bench-end-to-end fastcifar.bench_loader --end-to-end --repeats 5: each pipeline's training epoch,
                   paired by round with synthetic's (the overhead and its 95 % interval)
  reduce-overhead  the spec run with --compile-mode reduce-overhead (CUDA graphs)
  tf32             the spec run with --tf32
  max-autotune     the spec run with --compile-mode max-autotune (its compile time reported apart)
  profile          a short --profile run (1 epoch, 30 steps, window 5,3,10)
  timer-overhead   cost of the step timer's CUDA events: steps with and without it
--budget-s (default: the whole command within 8 minutes): a stage is started only if its estimate
(the spec run's measured time for the variants, fixed estimates otherwise) fits in what is left, and
runs under a time limit of what is left; a stage that does not fit is reported as skipped.
--stages a,b runs only those (a second call, say). OUT/stages.json and OUT/summary.md are rewritten
after every stage, so a command killed mid-stage still reports everything that ran. Exit code 1
when any stage failed.

--smoke runs the same sequence on CPU on tiny synthetic data, few steps (CI runs it so the module
never rots); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..reporting.stats import percent_interval
from ..utils import PACKAGE_ROOT, ArgumentParser, UserError, atomic_path, child_env, run_cli, write_json_atomic
from .stages import StageRunner, check_budget, parse_stages

VARIANTS = {  # name -> extra trainer flags; every variant is the spec run with --compile
    "spec": [],
    "reduce-overhead": ["--compile-mode", "reduce-overhead"],
    "tf32": ["--tf32"],
    "max-autotune": ["--compile-mode", "max-autotune"],
}
STAGES = ["spec", "cuda-tests", "step-breakdown", "bench-loader", "bench-end-to-end", "reduce-overhead", "tf32",
          "max-autotune", "profile", "timer-overhead"]
# Seconds a stage is expected to take on a GPU machine, before anything is measured; the variants'
# estimates are replaced by the spec stage's measured time (x2 for max-autotune's longer compile).
ESTIMATE_S = {"spec": 150, "cuda-tests": 120, "step-breakdown": 90, "bench-loader": 60, "bench-end-to-end": 120,
              "profile": 45, "timer-overhead": 30}
VARIANT_FACTOR = {"reduce-overhead": 1.0, "tf32": 1.0, "max-autotune": 2.0}
BUDGET_S = 480  # 8 minutes: the whole command, imports and compilation included
# Smoke: batches of 25 so that train (450), val (50) and test (capped at 3 batches) each yield one
# batch size: one train and one eval graph to compile per run, on CPU, where compiling dominates.
SMOKE_TRAIN = ["--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "25"]
PROFILE = ["--epochs", "1", "--max-steps-per-epoch", "30", "--profile", "--profile-epoch", "1",
           "--profile-steps", "5,3,10"]
SMOKE_PROFILE = ["--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "25", "--profile",
                 "--profile-epoch", "1", "--profile-steps", "0,1,1"]


class Check(StageRunner):
    """The GPU check's stages on the shared runner: its estimates, and its report (stages.json,
    summary.md: rewritten after every stage)."""

    def __init__(self, out: Path, budget_s: float | None, smoke: bool, device: str, synthetic: bool):
        self.smoke, self.device, self.synthetic = smoke, device, synthetic
        super().__init__(out, budget_s, self.report, self.estimate)

    def report(self, stages: dict | None = None) -> Path:
        write_json_atomic(self.out / "stages.json", self.stages)
        return write_summary(self.out, self.stages, self.smoke, self.device, self.synthetic)

    def estimate(self, name: str) -> float:
        """Seconds the stage is expected to take: the spec run's measured time for a variant of it;
        under --smoke (CPU, a few steps) 10 s for anything not yet measured."""
        if name in VARIANT_FACTOR and self.stages.get("spec", {}).get("rc") == 0:
            return VARIANT_FACTOR[name] * self.stages["spec"]["seconds"]
        if self.smoke:
            return 10.0
        return ESTIMATE_S.get(name, ESTIMATE_S["spec"] * VARIANT_FACTOR.get(name, 1.0))

    def run(self, name: str, cmd: list[str], timeout_s: float, budgeted: bool = True) -> bool:  # type: ignore[override]
        return super().run(name, cmd, child_env(), timeout_s, budgeted)


def synthetic_archive(out: Path, smoke: bool) -> tuple[Path, list[str]]:
    """A CIFAR-shaped archive of seeded random pixels written here (tiny under --smoke, else full size)
    and the make_beton flags its counts need."""
    from ..synthetic import make_batches, write_archive

    if smoke:
        archive = write_archive(out / "smoke-cifar.tar.gz", make_batches(per_batch=100, n_test=110))
        return archive, ["--val-per-class", "5", "--expect-counts", "500,110"]
    with atomic_path(out / "synthetic-cifar.tar.gz") as tmp:
        write_archive(tmp, make_batches(per_batch=10_000, n_test=10_000))
    return out / "synthetic-cifar.tar.gz", []


def prepare_data(data: str | None, check: Check) -> Path:
    """A folder of betons: DATA itself, betons built from the archive DATA, or synthetic ones."""
    out = check.out
    if data is not None and data != "synthetic":
        path = Path(data)
        if path.is_dir() and (path / "manifest.json").is_file():
            check.note("data", 0, 0.0, f"betons in {path}")
            return path
        if not path.is_file():
            raise UserError(f"DATA must be a betons folder (with manifest.json), a CIFAR-10 archive or 'synthetic', "
                            f"got {data}")
        archive, extra = path, []
    else:
        t0 = time.perf_counter()
        archive, extra = synthetic_archive(out, check.smoke)
        print(f"[data] wrote {archive} (random pixels) in {time.perf_counter() - t0:.0f} s", flush=True)
    data_dir = out / "data"
    check.run("data", [sys.executable, "-m", "fastcifar.make_beton", "--source", str(archive),
                       "--data-dir", str(data_dir), *extra], timeout_s=600, budgeted=False)
    return data_dir


def timer_overhead(device_name: str, smoke: bool, steps: int, out_json: Path) -> dict:
    """Mean step time of the spec model on one fixed batch, with and without StepTimer's marks,
    alternating 3 rounds each, each round timed with a synchronise at both ends."""
    import torch

    from ..devices import synchronize
    from ..env import set_cudnn
    from ..model import resnetv2_20
    from ..optim import adamw
    from ..precompile import compile_model
    from ..profiling import StepTimer

    device = torch.device(device_name)
    set_cudnn(device, deterministic=False)  # the trainer's defaults
    torch.manual_seed(0)
    model = resnetv2_20().to(device, memory_format=torch.channels_last)
    net = model if smoke else compile_model(model)
    optimizer, _ = adamw(model.parameters(), device, lr=1e-3, weight_decay=1e-4)  # the trainer's
    x = torch.randn(128, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device=device)

    def round_(timer: StepTimer | None) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if timer:
                timer.data_start()
                timer.data_end()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if timer:
                timer.compute_end()
        synchronize(device)
        return (time.perf_counter() - t0) / steps

    round_(None)  # compile and warm up
    plain, timed = [], []
    for _ in range(3):
        plain.append(round_(None))
        timer = StepTimer(device)
        timed.append(round_(timer))
        timer.totals()
    result = {"steps_per_round": steps, "step_ms_without": 1e3 * min(plain), "step_ms_with": 1e3 * min(timed),
              "overhead_fraction": min(timed) / min(plain) - 1}
    write_json_atomic(out_json, result)
    print(json.dumps(result))
    return result


CHANCE = " (chance: synthetic data)"


def _row(name: str, r: dict | None, stage: dict | None, synthetic: bool) -> str:
    if r is None:
        verdict = "not run" if stage is None else {"skipped": "skipped"}.get(stage["rc"], "failed")
        return f"| {name} | {verdict} | | | | | | | | | | | |"
    chance = CHANCE if synthetic else ""
    startup = r.get("startup") or {}
    warm = {True: "warm", False: "cold"}.get(startup.get("compile_cache_warm"), "")
    return (f"| {name} | {r['total_training_time_s']:.1f} | {r.get('startup_s', float('nan')):.1f} {warm}"
            f" | {r['epoch_time_s']:.2f} | {r['epoch_time_excl_first_s']:.2f} | {r['inference_time_per_batch_ms']:.3f}"
            f" | {r['last_epoch_train_loss']:.4f}"
            f" | {100 * r['val_accuracy']:.2f}{chance} | {100 * r['test_accuracy']:.2f}{chance}"
            f" | {r['data_fraction']:.4f} | {r.get('warm_up_s', float('nan')):.1f} | {_util(r)} |")


def _util(r: dict) -> str:
    """'41.2 % (1234 GFLOP/s)': the mean epoch's share of the device's attainable fp32 rate."""
    u = (r.get("utilisation") or {}).get("mean_epoch")
    return f"{100 * u['utilisation']:.1f} % ({u['gflops']:,.0f} GFLOP/s)" if u else "-"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_summary(out: Path, stages: dict, smoke: bool, device: str, synthetic: bool = False) -> Path:
    import torch

    runs = {name: _load(out / "runs" / f"{name}.json") for name in [*VARIANTS, "profile"]}
    env = next((r["env"] for r in runs.values() if r), {})
    data = ("synthetic: random pixels, full size (every speed figure as on CIFAR-10; accuracies are chance)"
            if synthetic and not smoke else "CIFAR-10" if not smoke else "tiny synthetic")
    lines = [
        f"# fastcifar GPU check{' (SMOKE: CPU, synthetic data, few steps: figures mean nothing)' if smoke else ''}",
        "",
        f"- device: {env.get('device_name', device)} ({env.get('device', device)})",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.cuda.is_available() else None}, Python {sys.version.split()[0]}",
        f"- fastcifar commit {env.get('git_commit')}",
        f"- data: {data}",
        f"- cuDNN: {env.get('cudnn')}; optimizer: {env.get('optimizer')}",
        "",
        "## The six metrics per variant (ResNetV2-20, CIFAR-10, --compile)",
        "",
        "start-up: process start to the first training step (compile caches warm or cold); warm-up: every "
        "compilation of the run (the training step's inside start-up, the eval graph's after epoch 1), inside total",
        "",
        "| variant | total s | start-up s | mean epoch s | epoch s excl. 1st | inference ms/batch | last train loss"
        " | val acc % | test acc % | data fraction | warm-up (compile) s | utilisation, mean epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(name, runs[name], stages.get(name), synthetic) for name in VARIANTS),
        "",
    ]
    probe = env.get("attainable_fp32")
    if probe:
        flops = next((r["flops_per_image"] for r in runs.values() if r and "flops_per_image" in r), None)
        lines += [f"Utilisation: a training step's {flops / 1e6:.0f} MFLOP per image (FlopCounterMode) x images/s over "
                  f"the device's attainable fp32 rate, {probe['gflops']:,.0f} GFLOP/s ({probe['method']}; "
                  f"TF32 {'on' if probe.get('tf32') else 'off'})", ""]
    bench = _load(out / "bench_loader.json")
    if bench:
        compute = bench.get("compute_only") or {}
        lines += ["## Loader throughput, isolated (fastcifar.bench_loader)", "",
                  f"headroom: images/s over the model's compute-only training images/s "
                  f"({compute.get('images_per_s', float('nan')):,.0f} on this device): how many times faster the "
                  "model could get before the pipeline is the bottleneck", "",
                  "| pipeline | images/s | vs torch | headroom | utilisation |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['images_per_s']:,.0f} | {v.get('ratio_to_torch', float('nan')):.2f}x | "
                  f"{v.get('headroom', float('nan')):.1f}x | |"
                  for k, v in bench.items() if isinstance(v, dict) and "images_per_s" in v and k != "compute_only"]
        if "utilisation" in compute:
            lines.append(f"| compute-only floor | {compute['images_per_s']:,.0f} | | | "
                         f"{100 * compute['utilisation']:.1f} % ({compute['gflops']:,.0f} GFLOP/s) |")
        lines.append("")
    e2e = _load(out / "bench_end_to_end.json")
    if e2e:
        lines += ["## Loaders end to end: training epochs of the spec model in rotated rounds "
                  "(fastcifar.bench_loader --end-to-end; median epoch, ratios paired by round)",
                  "", "| pipeline | epoch s | images/s | data fraction | vs synthetic | 95 % CI | vs memory |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {k} | {v['seconds']:.2f} | {v['images_per_s']:,.0f} | {v['data_fraction']:.3f} | "
                  f"{100 * v['overhead_vs_synthetic']:+.1f} % | "
                  f"{percent_interval(v.get('overhead_vs_synthetic_ci95'))} | "
                  f"{v.get('ratio_to_memory', float('nan')):.3f}x |"
                  for k, v in e2e.items() if isinstance(v, dict) and "seconds" in v]
        lines.append("")
    breakdown = _load(out / "step_breakdown.json")
    if breakdown:
        from .step_breakdown import summary as breakdown_summary

        lines += ["## Where a compiled step goes (fastcifar.step_breakdown)", "", "```",
                  breakdown_summary(breakdown), "```", ""]
    overhead = _load(out / "timer_overhead.json")
    if overhead:
        lines += [f"Step timer (CUDA events): {overhead['step_ms_with']:.3f} ms per step with it, "
                  f"{overhead['step_ms_without']:.3f} ms without: "
                  f"overhead {100 * overhead['overhead_fraction']:+.2f} %", ""]
    if runs["profile"] and runs["profile"].get("profile"):
        lines += [f"Profile trace: {', '.join(runs['profile']['profile']['traces']) or 'none written'}", ""]
    lines += ["## Stages", "", "| stage | result | seconds | last line |", "|---|---|---:|---|"]
    for name, stage in stages.items():
        verdict = {0: "ok", "skipped": "skipped"}.get(stage["rc"], f"FAILED ({stage['rc']})")
        lines.append(f"| {name} | {verdict} | {stage['seconds']} | {stage['last_line'][:100].replace('|', '/')} |")
    lines += ["", f"Total: {sum(v['seconds'] for v in stages.values()):.0f} s of stages"]
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def stage_commands(name: str, args: argparse.Namespace, data_dir: Path, device: str) -> list[str] | None:
    """The command line of one stage (None: the CUDA test lane, which needs a checkout and pytest)."""
    py, out, smoke = sys.executable, args.out, args.smoke
    train = [py, "-m", "fastcifar.train", "--data-dir", str(data_dir), "--device", device, "--compile",
             "--out", str(out / "runs")]
    if name in VARIANTS:
        return [*train, *VARIANTS[name], "--run-name", name, *(SMOKE_TRAIN if smoke else [])]
    if name == "step-breakdown":
        return [py, "-m", "fastcifar.step_breakdown", "--device", device, "--out", str(out / "step_breakdown.json"),
                *(["--batch-size", "8", "--rounds", "2", "--steps", "1", "--profile-steps", "1", "--calls", "1",
                   "--distinct-batches", "2"] if smoke else [])]
    if name == "bench-loader":
        return [py, "-m", "fastcifar.bench_loader", "--data-dir", str(data_dir), "--device", device,
                "--out", str(out / "bench_loader.json"),
                *(["--epochs", "1", "--no-compile", "--compute-steps", "2"] if smoke else [])]
    if name == "bench-end-to-end":
        return [py, "-m", "fastcifar.bench_loader", "--data-dir", str(data_dir), "--device", device, "--end-to-end",
                "--out", str(out / "bench_end_to_end.json"),
                *(["--max-steps", "2", "--no-compile"] if smoke else ["--repeats", "5"])]
    if name == "profile":
        return [*train, "--run-name", "profile", "--profile-dir", str(out / "profiles"),
                *(SMOKE_PROFILE if smoke else PROFILE)]
    if name == "timer-overhead":
        return [py, "-m", "fastcifar.gpu_check", "--device", device, *(["--smoke"] if smoke else []),
                "--timer-overhead-only", str(out / "timer_overhead.json")]
    return None


def cuda_tests(check: Check, timeout_s: float) -> None:
    tests = PACKAGE_ROOT / "tests" / "test_cuda.py"  # in a checkout; an installed package ships no tests
    try:
        import pytest  # noqa: F401
    except ImportError:
        return check.skip("cuda-tests", "pytest not installed")
    if not tests.is_file():
        return check.skip("cuda-tests", "no tests/ beside an installed fastcifar: run it from a checkout")
    check.run("cuda-tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                             "--rootdir", str(PACKAGE_ROOT), str(tests.parent)], timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="betons folder, CIFAR-10 archive, or synthetic (default: synthetic, full size; "
                        "tiny with --smoke)")
    p.add_argument("--out", type=Path, default=Path("results/gpu-check"), help="where results and summary.md go")
    p.add_argument("--smoke", action="store_true", help="CPU, synthetic data, few steps: proves the module runs")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds the whole command may take: stages that do not fit in what is left are skipped "
                        f"(default {BUDGET_S}; none under --smoke, so that CI runs every stage; 0: none)")
    p.add_argument("--stages", default=None, help=f"comma-separated, from {', '.join(STAGES)} (default: all)")
    p.add_argument("--stage-timeout", type=int, default=600, help="seconds each stage may take at most")
    p.add_argument("--timer-overhead-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if args.timer_overhead_only:  # the timer-overhead stage, run by this module as its own process
        timer_overhead(device, args.smoke, 3 if args.smoke else 200, args.timer_overhead_only)
        return 0
    stages = parse_stages(args.stages, STAGES)
    if args.smoke and args.data not in (None, "synthetic"):
        raise UserError("--smoke runs on its own tiny synthetic data: leave out --data")
    if args.budget_s is None:
        args.budget_s = 0 if args.smoke else BUDGET_S
    check_budget(args.budget_s)
    if device.startswith("cuda") and not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA device here: run on a GPU machine, or with SMOKE=1 (--smoke) on CPU")
    out = args.out
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "runs").mkdir(exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror or err}") from None
    check = Check(out, args.budget_s or None, args.smoke, device, synthetic=args.data in (None, "synthetic"))
    data_dir = prepare_data(args.data, check)
    if check.stages.get("data", {}).get("rc") not in (None, 0):
        for name in stages:
            check.skip(name, "no data: the data stage failed")
    else:
        for name in stages:
            if name == "cuda-tests":
                cuda_tests(check, args.stage_timeout)
            else:
                check.run(name, stage_commands(name, args, data_dir, device), args.stage_timeout)
    summary = check.report()
    failed, skipped = check.failed(), check.skipped()
    print(f"\n{summary.read_text()}\ngpu-check: {len(check.stages) - len(failed) - len(skipped)}/{len(check.stages)} "
          f"stages ok, {len(skipped)} skipped, in {time.perf_counter() - check.started:.0f} s; summary: {summary}")
    if failed:
        print(f"gpu-check: failed stages: {', '.join(failed)} (logs in {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    run_cli(main, "gpu_check")


if __name__ == "__main__":
    cli()
