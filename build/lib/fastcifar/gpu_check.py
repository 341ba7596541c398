"""The whole GPU proof in one command: `make gpu-check DATA=... OUT=...` (this script, wrapped by make).

Stages, in order, each a separate process with its own log under OUT/logs/ and a time limit, so one
failure neither hides the others nor hangs the check:
  data             DATA as a betons folder, or a CIFAR-10 archive made into betons in OUT/data
  cuda-tests       the CUDA test lane: python -m pytest -m cuda (skipped with a note without pytest,
                   or outside a checkout)
  bench-loader     fastcifar.bench_loader: images/s of each pipeline on the device
  bench-end-to-end fastcifar.bench_loader --end-to-end --repeats 5: each pipeline's training epoch,
                   paired by round with synthetic's (the overhead and its 95 % interval)
  spec             python -m fastcifar.train --compile (the full spec run, 10 epochs)
  reduce-overhead  the same with --compile-mode reduce-overhead (CUDA graphs)
  tf32             the same with --tf32
  profile          a short --profile run (1 epoch, 30 steps, window 5,3,10)
  timer-overhead   cost of the step timer's CUDA events: steps with and without it
Then OUT/summary.md: GPU, torch and CUDA versions, the six metrics per variant, data fraction, loader
images/s, the timer's overhead and each stage's wall time. Exit code 1 when any stage failed.

--smoke runs the same sequence on CPU on tiny synthetic data, few steps (CI runs it so the script
never rots); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .report import percent_interval
from .utils import ArgumentParser, UserError, atomic_path, run_cli, write_json_atomic

# The folder holding this fastcifar (a checkout or site-packages): every stage imports the same one.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> extra trainer flags; every variant is the spec run with --compile
    "spec": [],
    "reduce-overhead": ["--compile-mode", "reduce-overhead"],
    "tf32": ["--tf32"],
}
# Smoke: batches of 25 so that train (450), val (50) and test (capped at 3 batches) each yield one
# batch size: one train and one eval graph to compile per run, on CPU, where compiling dominates.
SMOKE_TRAIN = ["--epochs", "2", "--max-steps-per-epoch", "3", "--batch-size", "25"]
PROFILE = ["--epochs", "1", "--max-steps-per-epoch", "30", "--profile", "--profile-epoch", "1",
           "--profile-steps", "5,3,10"]
SMOKE_PROFILE = ["--epochs", "1", "--max-steps-per-epoch", "3", "--batch-size", "25", "--profile",
                 "--profile-epoch", "1", "--profile-steps", "0,1,1"]


def run_stage(name: str, cmd: list[str], out: Path, stages: dict, timeout_s: int) -> bool:
    """Run one stage as a process, log its output to OUT/logs/NAME.log, note rc and wall time."""
    log = out / "logs" / f"{name}.log"
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                stdin=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - t0
    lines = log.read_text(errors="replace").strip().splitlines()
    stages[name] = {"rc": rc, "seconds": round(seconds, 1), "log": str(log), "last_line": lines[-1] if lines else ""}
    ok = rc == 0
    print(f"[{name}] {'ok' if ok else f'FAILED ({rc})'} in {seconds:.0f} s"
          + ("" if ok else f": {stages[name]['last_line']}"), flush=True)
    return ok


def prepare_data(data: Path | None, out: Path, smoke: bool, stages: dict) -> Path:
    """A folder of betons: DATA itself, betons built from the archive DATA, or (smoke) synthetic ones."""
    if smoke:
        from .synthetic import make_batches, write_archive

        archive = write_archive(out / "smoke-cifar.tar.gz", make_batches(per_batch=100, n_test=110))
        extra = ["--val-per-class", "5", "--expect-counts", "500,110"]
    elif data is not None and data.is_dir() and (data / "manifest.json").is_file():
        stages["data"] = {"rc": 0, "seconds": 0.0, "log": None, "last_line": f"betons in {data}"}
        return data
    elif data is not None and data.is_file():
        archive, extra = data, []
    else:
        raise UserError(f"DATA must be a betons folder (with manifest.json) or a CIFAR-10 archive, got {data}")
    data_dir = out / "data"
    run_stage("data", [sys.executable, "-m", "fastcifar.make_beton", "--source", str(archive),
                       "--data-dir", str(data_dir),
                       *extra], out, stages, timeout_s=600)
    return data_dir


def timer_overhead(device_name: str, smoke: bool, steps: int, out_json: Path) -> dict:
    """Mean step time of the spec model on one fixed batch, with and without StepTimer's marks,
    alternating 3 rounds each, each round timed with a synchronise at both ends."""
    import torch

    from .model import resnetv2_20
    from .profiling import StepTimer
    from .utils import synchronize

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = resnetv2_20().to(device, memory_format=torch.channels_last)
    net = model if smoke else torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
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


def _row(name: str, r: dict | None) -> str:
    if r is None:
        return f"| {name} | failed | | | | | | | | |"
    return (f"| {name} | {r['total_training_time_s']:.1f} | {r['epoch_time_s']:.2f}"
            f" | {r['epoch_time_excl_first_s']:.2f} | {r['inference_time_per_batch_ms']:.3f}"
            f" | {r['last_epoch_train_loss']:.4f}"
            f" | {100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | {r['data_fraction']:.4f}"
            f" | {r.get('warm_up_s', float('nan')):.1f} |")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_summary(out: Path, stages: dict, smoke: bool, device: str) -> Path:
    import torch

    runs = {name: _load(out / "runs" / f"{name}.json") for name in [*VARIANTS, "profile"]}
    env = next((r["env"] for r in runs.values() if r), {})
    lines = [
        f"# fastcifar GPU check{' (SMOKE: CPU, synthetic data, few steps: figures mean nothing)' if smoke else ''}",
        "",
        f"- device: {env.get('device_name', device)} ({env.get('device', device)})",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.cuda.is_available() else None}, Python {sys.version.split()[0]}",
        f"- fastcifar commit {env.get('git_commit')}",
        "",
        "## The six metrics per variant (ResNetV2-20, CIFAR-10, --compile)",
        "",
        "| variant | total s | mean epoch s | epoch s excl. 1st | inference ms/batch | last train loss"
        " | val acc % | test acc % | data fraction | warm-up (compile) s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(name, runs[name]) for name in VARIANTS),
        "",
    ]
    bench = _load(out / "bench_loader.json")
    if bench:
        lines += ["## Loader throughput, isolated (fastcifar.bench_loader)", "", "| pipeline | images/s | vs torch |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {v['images_per_s']:,.0f} | {v.get('ratio_to_torch', float('nan')):.2f}x |"
                  for k, v in bench.items() if isinstance(v, dict) and "images_per_s" in v]
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
    lines += ["", f"Total: {sum(v['seconds'] for v in stages.values()):.0f} s"]
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="betons folder or CIFAR-10 archive (not with --smoke)")
    p.add_argument("--out", type=Path, default=Path("results/gpu-check"), help="where results and summary.md go")
    p.add_argument("--smoke", action="store_true", help="CPU, synthetic data, few steps: proves the script runs")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--stage-timeout", type=int, default=600, help="seconds each stage may take")
    p.add_argument("--timer-overhead-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if args.timer_overhead_only:  # the timer-overhead stage, run by this script as its own process
        timer_overhead(device, args.smoke, 3 if args.smoke else 200, args.timer_overhead_only)
        return 0
    if not args.smoke and args.data is None:
        raise UserError("give DATA: a betons folder or a CIFAR-10 archive (or SMOKE=1 for the CPU smoke run)")
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
    stages: dict = {}
    t0 = time.perf_counter()
    data_dir = prepare_data(args.data, out, args.smoke, stages)
    py = sys.executable
    train = [py, "-m", "fastcifar.train", "--data-dir", str(data_dir), "--device", device, "--compile",
             "--out", str(out / "runs")]
    tests = PACKAGE_ROOT / "tests" / "test_cuda.py"  # in a checkout; an installed package ships no tests
    try:
        import pytest  # noqa: F401
    except ImportError:
        stages["cuda-tests"] = {"rc": "skipped", "seconds": 0.0, "log": None, "last_line": "pytest not installed"}
    else:
        if tests.is_file():
            run_stage("cuda-tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                     "--rootdir", str(PACKAGE_ROOT), str(tests.parent)],
                      out, stages, args.stage_timeout)
        else:
            stages["cuda-tests"] = {"rc": "skipped", "seconds": 0.0, "log": None,
                                    "last_line": "no tests/ beside an installed fastcifar: run it from a checkout"}
    run_stage("bench-loader", [py, "-m", "fastcifar.bench_loader", "--data-dir", str(data_dir), "--device", device,
                               "--out", str(out / "bench_loader.json"),
                               *(["--epochs", "1", "--no-compile"] if args.smoke else [])],
              out, stages, args.stage_timeout)
    run_stage("bench-end-to-end", [py, "-m", "fastcifar.bench_loader", "--data-dir", str(data_dir), "--device", device,
                                   "--end-to-end", "--out", str(out / "bench_end_to_end.json"),
                                   *(["--max-steps", "2", "--no-compile"] if args.smoke else ["--repeats", "5"])],
              out, stages, args.stage_timeout)
    for name, flags in VARIANTS.items():
        run_stage(name, [*train, *flags, "--run-name", name, *(SMOKE_TRAIN if args.smoke else [])],
                  out, stages, args.stage_timeout)
    run_stage("profile", [*train, "--run-name", "profile", "--profile-dir", str(out / "profiles"),
                          *(SMOKE_PROFILE if args.smoke else PROFILE)], out, stages, args.stage_timeout)
    run_stage("timer-overhead", [py, "-m", "fastcifar.gpu_check", "--device", device,
                                 *(["--smoke"] if args.smoke else []),
                                 "--timer-overhead-only", str(out / "timer_overhead.json")],
              out, stages, args.stage_timeout)
    write_json_atomic(out / "stages.json", stages)
    summary = write_summary(out, stages, args.smoke, device)
    failed = [k for k, v in stages.items() if v["rc"] not in (0, "skipped")]
    print(f"\n{summary.read_text()}\ngpu-check: {len(stages) - len(failed)}/{len(stages)} stages ok in "
          f"{time.perf_counter() - t0:.0f} s; summary: {summary}")
    if failed:
        print(f"gpu-check: failed stages: {', '.join(failed)} (logs in {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    run_cli(main, "gpu_check")


if __name__ == "__main__":
    cli()
