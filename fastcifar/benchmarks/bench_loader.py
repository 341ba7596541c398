"""Loader benchmark, two ways, every pipeline from `fastcifar.data.make_loaders` (nothing implemented twice):

  isolated     images/s of ready-to-train batches of the train split on the device, after a warm-up
               epoch: what each pipeline can deliver with nothing else running; and its headroom:
               those images/s over the model's compute-only training images/s on the same device
               (`--compute-steps` steps on one fixed batch), i.e. how many times faster the model
               could get before that pipeline becomes the bottleneck
  --end-to-end `--warm-up-steps` untimed steps and `--repeats` timed training epochs of the spec model
               per pipeline (the trainer's own loop, `--compile` as given; whole epochs, the last
               partial batch included, unless --max-steps cuts them for a smoke run), in rounds: each
               round times one epoch of every pipeline, in an order drawn from --order-seed (recorded
               as `order`), so that neither a drifting machine nor a place in the round favours one,
               and no pipeline always follows the same one. Reported: the median epoch's seconds,
               images/s, data and compute time, data fraction; the overhead over `synthetic` and the
               ratio to `memory` *paired by round* (the mean over rounds of epoch / synthetic's epoch
               of the same round, minus 1, with its 95 % confidence interval); and the CPU seconds the
               process used per epoch (all its threads; not worker processes'), paired the same way, with
               the process's minor page faults and involuntary context switches (a thread preempted by
               another that wanted its core) per epoch: what a loader costs a step besides its own work

Pipelines: ffcv, torch, memory, dali (when installed), and synthetic (the compute-only floor, end
to end only); and, end to end only, two forced variants of ffcv that separate where its overhead comes
from: ffcv-inline (no loader thread: each batch made in the training thread between steps) and
ffcv-parallel (its numba-compiled passes on --workers threads even where the model's threads leave no
core idle: FFCV's own default, which fastcifar's is not on such a CPU; see ffcv_loader.pipeline_threads).
Usage: python -m fastcifar.bench_loader --data-dir data [--end-to-end] [--loaders ffcv,torch]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import LOADERS, make_loaders
from ..devices import device_name, resolve_device, synchronize
from ..env import environment, set_cudnn, set_float32_precision
from ..flops import attainable_probe, flops_record, utilisation
from ..loaders.spdl_loader import spdl_version
from ..model import resnetv2_20
from ..optim import adamw
from ..precompile import batch_sizes, compile_model, frozen, graphs, warm_up_run
from ..profiling import StepTimer
from ..reporting.stats import describe, percent_interval
from ..train import train_epoch
from ..utils import ArgumentParser, UserError, run_cli, writable_file, write_json_atomic

# Forced variants of `ffcv` (end to end only): the pipeline and what make_loaders is given.
VARIANTS = {"ffcv-inline": ("ffcv", {"ffcv_inline": True}), "ffcv-parallel": ("ffcv", {"ffcv_parallel": True}),
            "spdl-per-image": ("spdl", {"spdl_per_image": True})}


def spdl_installed() -> bool:
    return spdl_version() != "absent"


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def isolated(loader, device: torch.device, epochs: int, name: str) -> dict:
    """One warm-up epoch, then `epochs` timed epochs of the train loader; the clock stops after the
    device is done."""
    seconds, total = [], 0
    for e in range(epochs + 1):
        synchronize(device)
        t0 = time.perf_counter()
        seen = 0
        for images, _, _ in tqdm(loader, total=len(loader), leave=False, desc=f"{name} {'warm-up' if e == 0 else e}"):
            seen += images.shape[0]
        synchronize(device)
        if e:
            seconds.append(time.perf_counter() - t0)
            total += seen
    return {"images_per_s": total / sum(seconds), "seconds_per_epoch": sum(seconds) / len(seconds),
            "epoch_seconds": seconds, "images_per_epoch": total // epochs, **stages(loader)}


def stages(loader) -> dict:
    """A pipeline's own per-stage statistics where it keeps them (`spdl`: each stage's tasks and seconds, summed
    over every epoch it ran here, warm-up included), as `stages`."""
    epochs = getattr(getattr(loader, "stats", None), "epochs", None)
    if not epochs:
        return {}
    total: dict[str, dict[str, float]] = {}
    for epoch in epochs:
        for stage, row in epoch.items():
            into = total.setdefault(stage, {"tasks": 0, "seconds": 0.0})
            into["tasks"] += row["tasks"]
            into["seconds"] += row["seconds"]
    return {"stages": total}


class EndToEnd:
    """One pipeline's training set-up, kept alive so that timed epochs of all pipelines can be
    interleaved: compile and warm up as `train --compile` does, then one untimed epoch (FFCV's JIT,
    caches) before any timed one."""

    def __init__(self, loaders: dict, device: torch.device, args: argparse.Namespace, name: str):
        torch.manual_seed(args.seed)
        self.model = resnetv2_20().to(device=device, memory_format=torch.channels_last)
        self.optimizer, _ = adamw(self.model.parameters(), device, lr=1e-3, weight_decay=1e-4)  # as the trainer's
        self.net = compile_model(self.model) if args.compile else self.model
        self.train, self.device, self.max_steps, self.name = loaders["train"], device, args.max_steps, name
        self.sizes = warm_up_run(self.net, self.model, {"train": self.train}, device, args.batch_size,
                                 args.max_steps, None)["train"]  # the batch sizes compiled: static graphs
        self.epochs: list[dict] = []
        untimed = [s for s in (args.warm_up_steps, args.max_steps) if s]  # the fewer; none: a whole epoch
        self.epoch(timed=False, steps=min(untimed) if untimed else None)

    def epoch(self, timed: bool = True, steps: int | None = None) -> None:
        """One epoch (timed: `max_steps` steps, whole by default), or an untimed one of `steps` steps."""
        cpu0 = time.process_time()  # CPU seconds of every thread of this process (not of worker processes)
        use0 = resource.getrusage(resource.RUSAGE_SELF)
        with frozen():
            stats = train_epoch(self.net, self.train, self.optimizer, self.device, StepTimer(self.device),
                                self.max_steps if timed else steps, desc=f"{self.name}{'' if timed else ' warm-up'}")
        cpu_s = time.process_time() - cpu0
        use = resource.getrusage(resource.RUSAGE_SELF)
        if timed:
            self.epochs.append({**{k: stats[k] for k in ("seconds", "images_per_s", "train_images", "data_time_s",
                                                         "compute_time_s", "data_fraction")}, "cpu_s": cpu_s,
                                "minor_faults": use.ru_minflt - use0.ru_minflt,
                                "involuntary_switches": use.ru_nivcsw - use0.ru_nivcsw})

    def result(self) -> dict:
        """The median epoch's seconds and images/s (of an even count, the mean of the two middle epochs), the
        data/compute split of the epoch nearest it, and every epoch's seconds."""
        seconds = statistics.median(e["seconds"] for e in self.epochs)
        nearest = min(self.epochs, key=lambda e: abs(e["seconds"] - seconds))
        cpu = statistics.median(e["cpu_s"] for e in self.epochs)
        counts = {k: statistics.median(e[k] for e in self.epochs) for k in ("minor_faults", "involuntary_switches")}
        return {**nearest, **counts, "seconds": seconds, "images_per_s": nearest["train_images"] / seconds,
                "cpu_s": cpu,
                "epoch_seconds": [e["seconds"] for e in self.epochs],
                "epoch_cpu_s": [e["cpu_s"] for e in self.epochs], "epochs_timed": len(self.epochs),
                **stages(self.train)}


def compute_only(args: argparse.Namespace, device: torch.device) -> dict:
    """The model's training throughput with no data pipeline at all (the `synthetic` loader: one fixed
    batch on the device), set up, compiled and warmed up as end to end, then `--compute-rounds` timed
    epochs of `--compute-steps` steps: the denominator of the headroom, and the compute-only floor
    whose utilisation says how close a step comes to the device's attainable fp32 rate."""
    loaders = make_loaders(args.data_dir, device, args.batch_size, args.workers, args.seed,
                           compile_augment=args.compile, loader="synthetic")
    steps = argparse.Namespace(**{**vars(args), "max_steps": args.compute_steps})
    setup = EndToEnd(loaders, device, steps, "compute-only")
    for _ in range(args.compute_rounds):
        setup.epoch()
    rates = [e["images_per_s"] for e in setup.epochs]
    stats = describe(rates)
    return {"images_per_s": stats["mean"], "images_per_s_ci95": stats["ci95"] if len(rates) > 1 else None,
            "images_per_s_per_round": rates, "rounds": len(rates),
            "steps": min(args.compute_steps, len(loaders["train"])), "seconds": sum(e["seconds"] for e in setup.epochs)}


def add_utilisation(results: dict, compute: dict | None, probe: dict, batch: int) -> dict:
    """flops_per_image, and each row's achieved GFLOP/s and utilisation: the compute-only floor's
    (isolated), every pipeline's training epoch (end to end). Returns the FLOP record."""
    flops = flops_record(batch)
    per_image, attainable = flops["flops_per_image"], probe["gflops"]
    if compute:
        compute.update(utilisation(compute["images_per_s"], per_image, attainable))
        if compute.get("images_per_s_ci95"):
            compute["utilisation_ci95"] = [utilisation(v, per_image, attainable)["utilisation"]
                                           for v in compute["images_per_s_ci95"]]
    for r in results.values():
        if "seconds" in r:  # end to end: a training epoch
            r.update(utilisation(r["images_per_s"], per_image, attainable))
    return flops


def drawn_order(names: list[str], rounds: int, seed: int) -> list[list[str]]:
    """Each round's order of pipelines, drawn from `seed` (recorded): a rotation kept the cyclic order, so one
    pipeline always ran right after another (the machine state it leaves behind always on the same one)."""
    rng = random.Random(seed)
    return [rng.sample(names, len(names)) for _ in range(rounds)]


def paired(values: list[float], base: list[float], key: str, shift: float = 0.0) -> dict:
    """Round-by-round ratios values[i] / base[i] (the same round: the same state of the machine),
    their mean + `shift` as `key`, its 95 % confidence interval (None with one round) and every
    round's. Why not the ratio of medians: on a VM whose speed drifts by ±10 % over minutes, the
    pairing removes the drift the pipelines share, and the interval says what is left."""
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    stats = describe(ratios)
    ci = [c + shift for c in stats["ci95"]] if stats["n"] > 1 else None
    return {key: stats["mean"] + shift, f"{key}_ci95": ci, f"{key}_per_round": [r + shift for r in ratios]}


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--loaders", default=None,
                   help="comma-separated pipelines (default: all installed; synthetic only with --end-to-end)")
    p.add_argument("--workers", type=int, default=2, help="loader threads or processes")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--epochs", type=int, default=2, help="isolated: timed epochs after one warm-up epoch")
    p.add_argument("--end-to-end", action="store_true", help="time a training epoch of the spec model per pipeline")
    p.add_argument("--max-steps", type=int, default=None, help="end to end: cap each epoch (smoke runs)")
    p.add_argument("--repeats", type=int, default=1,
                   help="end to end: rounds, each one timed epoch per pipeline (order drawn); ratios paired by round")
    p.add_argument("--warm-up-steps", type=int, default=40,
                   help="end to end: untimed steps per pipeline before its timed epochs (compilation, FFCV's JIT)")
    p.add_argument("--order-seed", type=int, default=None,
                   help="end to end: the rounds' order of pipelines is drawn from it (default: --seed); one per "
                        "process where several processes are compared")
    p.add_argument("--compute-steps", type=int, default=50,
                   help="isolated: training steps of the spec model on one fixed batch (synthetic), for the "
                        "headroom column and the compute-only floor's utilisation (0: skip)")
    p.add_argument("--compute-rounds", type=int, default=1,
                   help="isolated: timed rounds of --compute-steps steps (2+: an interval for the floor)")
    p.add_argument("--seed", type=int, default=0, help="order and augmentation seed")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the device op (and, end to end, the model), as `train --compile` does")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default results/bench_loader.json, or bench_end_to_end.json)")
    args = p.parse_args(argv)
    steps = 1 if args.max_steps is None else args.max_steps  # --max-steps 0 would time empty epochs
    if min(args.workers, args.batch_size, args.epochs, args.repeats, steps, args.compute_rounds,
           args.warm_up_steps) < 1 or args.compute_steps < 0:
        raise UserError("--workers, --batch-size, --epochs, --repeats, --max-steps, --compute-rounds and "
                        "--warm-up-steps must be at least 1, --compute-steps at least 0")
    device = resolve_device(args.device)
    set_float32_precision(device, tf32=False)
    set_cudnn(device, deterministic=False)  # the trainer's defaults
    available = [n for n in LOADERS if (n != "dali" or dali_installed()) and (n != "spdl" or spdl_installed())]
    names = args.loaders.split(",") if args.loaders else [n for n in available if args.end_to_end or n != "synthetic"]
    for name in names:
        if name not in LOADERS and not (args.end_to_end and name in VARIANTS):
            raise UserError(f"unknown loader {name!r}: choose from {', '.join(LOADERS)}"
                            + (f" (end to end also {', '.join(VARIANTS)})" if args.end_to_end else ""))
    if args.end_to_end and "synthetic" not in names:
        names.append("synthetic")
    out = args.out or Path("results") / ("bench_end_to_end.json" if args.end_to_end else "bench_loader.json")
    writable_file(out, "the output file")  # now, not after minutes of benchmarking

    # The code and machine as they are at the start (a run takes minutes; a commit meanwhile is not it).
    env = environment(device, module="fastcifar.bench_loader", compile=args.compile, workers=args.workers,
                      batch_size=args.batch_size)
    results: dict = {}
    setups: dict[str, EndToEnd] = {}
    for name in names:
        base, forced = VARIANTS.get(name, (name, {}))
        loaders = make_loaders(args.data_dir, device, args.batch_size, args.workers, args.seed,
                               compile_augment=args.compile, loader=base, **forced)
        if args.end_to_end:
            setups[name] = EndToEnd(loaders, device, args, name)
        else:
            train = loaders["train"]
            if getattr(train.augment, "compiled", False):  # compiled on this thread, never in a loader's
                train.augment.warm_up(batch_sizes(train.images, args.batch_size))
            with frozen():
                results[name] = isolated(train, device, args.epochs, name)
            results[name]["device_op"] = getattr(train.augment, "choice", None)  # the op kept, every candidate's ms
        del loaders
    order_seed = args.seed if args.order_seed is None else args.order_seed
    order = drawn_order(list(setups), args.repeats, order_seed)
    for names_in_round in order:
        for name in names_in_round:
            setups[name].epoch()
    results.update({name: setup.result() for name, setup in setups.items()})
    compute = None
    if not args.end_to_end and args.compute_steps:
        compute = compute_only(args, device)
        for r in results.values():
            r["headroom"] = r["images_per_s"] / compute["images_per_s"]
    base = "torch" if "torch" in results else None
    for r in results.values():
        if args.end_to_end:
            r.update(paired(r["epoch_seconds"], results["synthetic"]["epoch_seconds"], "overhead_vs_synthetic", -1))
            r.update(paired(r["epoch_cpu_s"], results["synthetic"]["epoch_cpu_s"], "cpu_overhead_vs_synthetic", -1))
            if "memory" in results:
                r.update(paired(r["epoch_seconds"], results["memory"]["epoch_seconds"], "ratio_to_memory"))
        elif base:
            r["ratio_to_torch"] = r["images_per_s"] / results[base]["images_per_s"]
    env["attainable_fp32"] = attainable_probe(device)  # after the timed work, on the same threads
    flops = add_utilisation(results, compute, env["attainable_fp32"], args.batch_size)
    write_json_atomic(out, {**results, **({"compute_only": compute} if compute else {}),
                            "flops_per_image": flops["flops_per_image"], "flops": flops, "env": env,
                            **({"graphs": graphs({n for st in setups.values() for n in st.sizes})}
                               if args.compile and args.end_to_end else {}),
                            **({"order": order, "order_seed": order_seed, "warm_up_steps": args.warm_up_steps,
                                "max_steps": args.max_steps} if args.end_to_end else {}),
                            "mode": "end_to_end" if args.end_to_end else "isolated"})
    mode = f"end to end, {args.repeats} round(s) of one training epoch each" if args.end_to_end else "isolated"
    print(f"loader benchmark ({mode}): batch "
          f"{args.batch_size}, {args.workers} workers, {device_name(device)} ({device}), "
          f"{'compiled' if args.compile else 'eager'}")
    if args.end_to_end:
        w = max(10, *(len(n) + 1 for n in results))
        header = f"{'pipeline':<{w}}{'epoch s':>9}{'images/s':>10}{'data s':>8}{'compute s':>10}{'data frac':>10}" \
                 f"{'vs synthetic':>13}{'95 % CI':>17}{'vs memory':>10}{'CPU s':>8}{'CPU vs synth':>13}{'util.':>7}"
        rows = [f"{n:<{w}}{r['seconds']:>9.2f}{r['images_per_s']:>10,.0f}{r['data_time_s']:>8.2f}"
                f"{r['compute_time_s']:>10.2f}{r['data_fraction']:>10.3f}{100 * r['overhead_vs_synthetic']:>+12.1f}%"
                + f"{percent_interval(r['overhead_vs_synthetic_ci95']):>17}"
                + (f"{r['ratio_to_memory']:>9.3f}x" if "ratio_to_memory" in r else f"{'':>10}")
                + f"{r['cpu_s']:>8.1f}{100 * r['cpu_overhead_vs_synthetic']:>+12.1f}%{100 * r['utilisation']:>6.1f}%"
                for n, r in results.items()]
    else:
        header = f"{'pipeline':<13}{'images/s':>12}{'vs torch':>10}{'s / epoch':>11}{'headroom':>10}{'util.':>8}"
        rows = [f"{n:<13}{r['images_per_s']:>12,.0f}" + (f"{r['ratio_to_torch']:>9.2f}x" if "ratio_to_torch" in r
                                                         else f"{'':>10}") + f"{r['seconds_per_epoch']:>11.2f}"
                + (f"{r['headroom']:>9.1f}x" if "headroom" in r else f"{'':>10}") + f"{'':>8}"
                for n, r in results.items()]
        if compute:
            rows.append(f"{'compute-only':<13}{compute['images_per_s']:>12,.0f}{'':>10}{'':>11}{'':>10}"
                        f"{100 * compute['utilisation']:>7.1f}%")
    print("\n".join([header, "-" * len(header), *rows]))
    probe = env["attainable_fp32"]
    print(f"util.: a training step's {flops['flops_per_image'] / 1e6:.0f} MFLOP per image x images/s over this "
          f"device's attainable fp32 rate, {probe['gflops']:.0f} GFLOP/s (its {probe['kernel']} probe; matmul "
          f"{probe['matmul']['gflops']:.0f}, conv {probe['conv']['gflops']:.0f})")
    if compute:
        print(f"headroom: the pipeline's images/s / the model's compute-only training images/s "
              f"({compute['images_per_s']:,.0f}, {compute['steps']} steps on one fixed batch): how much faster the "
              "model could get before the pipeline is the bottleneck")
    if args.end_to_end:
        print(f"vs synthetic / vs memory: mean over {args.repeats} round(s) of the same round's epoch ratio; "
              "95 % CI of that mean (needs 2+ rounds)")
    if "dali" not in available:
        print('dali: not installed (pip install "fastcifar[dali]", or pip install -e ".[dali]" in a checkout)')
    print(f"written to {out}")
    return 0


def cli() -> None:
    run_cli(main, "bench_loader")


if __name__ == "__main__":
    cli()
