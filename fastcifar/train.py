"""Train ResNetV2-20 on CIFAR-10 from FFCV betons: `python -m fastcifar.train --compile`.

Defaults are the benchmark's recipe: AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-4), 10 epochs,
batch 128, constant learning rate, float32 (no autocast, no TF32 unless --tf32), channels_last. Reads top to bottom:
flags, one training epoch, evaluation, timed inference, then `main` which runs them and writes
the six metrics (see README) to <out>/<run-name>.json and the weights to <out>/<run-name>.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function
from tqdm import tqdm

from . import __version__, distributed, trace_breakdown
from .data import LOADERS, make_loaders, split_sizes
from .devices import device_name, synchronize
from .env import environment, seconds_since_process_start, set_cudnn, set_float32_precision
from .flops import attainable_probe, run_utilisation
from .model import count_parameters, resnetv2_20
from .optim import adamw
from .precompile import compile_model, frozen, graphs, import_compiler, mark_step, warm_up_evaluation, warm_up_run
from .profiling import (
    BACKWARD_RANGE,
    DATA_RANGE,
    FORWARD_RANGE,
    OPTIMIZER_RANGE,
    ScalarLog,
    StepTimer,
    TraceProfiler,
    data_fraction,
    parse_profile_steps,
)
from .results import collect, epoch_line, summary_table, warm_up_line
from .utils import (
    ArgumentParser,
    UserError,
    atomic_path,
    plain_name,
    run_cli,
    writable_file,
    writable_folder,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="fastcifar.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per batch (train and eval); under torchrun the global batch, split evenly over "
                        "the processes, so the recipe is the same whatever their number")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW (decoupled) weight decay")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and augmentation")
    p.add_argument("--loader", default="ffcv", choices=LOADERS,
                   help="data pipeline (synthetic: one fixed batch, the compute-only floor; trains nothing)")
    p.add_argument("--workers", type=int, default=2,
                   help="loader threads or processes (ffcv on a CPU device: at most the cores torch leaves idle, "
                        "at least 1)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda, cuda:N; under torchrun: cuda (each "
                        "process its cuda:LOCAL_RANK) or cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (train and eval) and the on-device augmentation")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode of the model, with --compile (the device op always uses default)")
    p.add_argument("--memory-format", default="channels-last", choices=["channels-last", "contiguous"],
                   help="model and batches channels-last (the spec's) or contiguous NCHW (plain PyTorch: the ladder)")
    p.add_argument("--tf32", action="store_true",
                   help="let cuDNN convolutions and matmuls use TF32 on GPUs (not float32: off by default)")
    p.add_argument("--deterministic", action="store_true",
                   help="on CUDA: cuDNN's deterministic algorithms, no autotuning (default: cudnn.benchmark)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="N",
                   help="stop each epoch (and each evaluation) after N batches: for smoke runs")
    p.add_argument("--warm-up-steps", type=int, default=0, metavar="N",
                   help="benchmarks (the ladder): N untimed training steps before the first epoch, so its clock starts "
                        "warm (FFCV's JIT, the DataLoader's workers); they train the model too")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    p.add_argument("--run-name", default=None, help="name of the results files; None: <date>-<time>-<device>")
    p.add_argument("--profile", action="store_true",
                   help="write a torch.profiler trace and TensorBoard scalars to <profile-dir>/<run-name>/")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"), help="where --profile writes")
    p.add_argument("--profile-steps", default="5,3,10", metavar="WAIT,WARMUP,ACTIVE",
                   help="profiler schedule within the profiled epoch")
    p.add_argument("--profile-epoch", type=int, default=2,
                   help="epoch to profile (2: after FFCV's first-epoch JIT; capped at --epochs)")
    args = p.parse_args(argv)
    args.profile_schedule = parse_profile_steps(args.profile_steps)
    workers_low = 0 if args.loader == "torch" else 1  # the DataLoader's 0: transforms in the training process
    for name, low in [("epochs", 1), ("batch_size", 1), ("workers", workers_low), ("max_steps_per_epoch", 1),
                      ("warm_up_steps", 0),
                      ("profile_epoch", 1)]:
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.compile and args.memory_format == "contiguous":  # its warm-up compiles for the loaders' NHWC batches
        raise UserError("--memory-format contiguous runs eager (plain PyTorch's layout); drop it or --compile")
    return args


def compiled(model: nn.Module, compile_mode: str | None) -> nn.Module:
    """The module the training loop calls: `torch.compile(model)` under --compile (eager otherwise).
    Under torchrun the inner module is compiled in place (`model.compile()`), which DDP then wraps
    (`distributed.wrap`), as PyTorch's documentation for torch 2.13 recommends ("Where to apply
    torch.compile?"): Dynamo then never traces DDP's own hooks."""
    if not compile_mode:
        return model
    return compile_model(model, compile_mode, in_place=distributed.active())


def _progress(total: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 30, disable=not distributed.is_main())


def _batches(loader, max_steps: int | None) -> int:
    return len(loader) if max_steps is None else min(len(loader), max_steps)


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device,
                timer: StepTimer, max_steps: int | None = None, desc: str = "train",
                on_step=None, compile_mode: str | None = None, on_first_batch=None, contiguous: bool = False) -> dict:
    """One pass over the train loader. Loss and accuracy are summed on the device (no per-step sync).
    Under torchrun the sums and counts are added over the ranks, the epoch takes as long as the
    slowest rank, and the data/compute split is each rank's (their mean here, every rank's in *_per_rank).

    on_step(loss), when given, runs after every optimizer step (the profiler's step, tests' spies);
    on_first_batch(), when the first batch is in hand, before its step (the run's start-up ends there).
    Under --compile-mode reduce-overhead the model's outputs are CUDA-graph buffers that the next
    step overwrites: they are folded into the sums before the next step is launched, never kept.
    """
    model.train()
    timer.reset()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    bar = _progress(_batches(loader, max_steps), desc)
    synchronize(device)
    t0 = time.perf_counter()
    batches = None
    while max_steps is None or timer.steps < max_steps:
        timer.data_start()
        with record_function(DATA_RANGE):
            if batches is None:  # FFCV starts its prefetch (and on epoch 1 compiles) here: data time
                batches = iter(loader)
            batch = next(batches, None)
            if contiguous and batch is not None:
                batch = (batch[0].contiguous(), *batch[1:])
        if batch is None:
            break
        images, labels, _ = batch
        timer.data_end()
        if on_first_batch is not None and timer.steps == 0:
            on_first_batch()
        mark_step(compile_mode)
        with record_function(FORWARD_RANGE):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
        with record_function(BACKWARD_RANGE):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function(OPTIMIZER_RANGE):
            optimizer.step()
        n = labels.shape[0]
        seen += n
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        timer.compute_end()  # after the sums: on CUDA every kernel of the step falls inside a phase
        bar.update()
        if timer.steps % 50 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if on_step is not None:
            on_step(loss.detach())
    synchronize(device)
    seconds = time.perf_counter() - t0
    bar.close()
    if batches is not None and hasattr(batches, "close"):
        batches.close()  # stop FFCV's prefetch thread when --max-steps-per-epoch cut the epoch short
    loss_sum, correct, seen = distributed.sum_over_ranks(loss_sum, correct, seen, device=device)
    rank_seconds, rank_data_s, rank_compute_s = distributed.gather_over_ranks(seconds, *timer.totals(), device=device)
    seconds, data_s, compute_s = max(rank_seconds), _mean(rank_data_s), _mean(rank_compute_s)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "train_images": int(seen),
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "data_time_s": data_s,
        "compute_time_s": compute_s,
        "data_fraction": data_fraction(data_s, compute_s),
        **({"data_time_s_per_rank": rank_data_s, "compute_time_s_per_rank": rank_compute_s}
           if len(rank_seconds) > 1 else {}),
    }


def _mean(values: list[float]) -> float:
    return values[0] if len(values) == 1 else sum(values) / len(values)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, max_steps: int | None = None,
             desc: str = "eval", compile_mode: str | None = None) -> dict:
    """Loss and accuracy over a loader, eval mode, and the time of each batch's forward pass with and
    without the wait for the batch: CUDA events read once at the end (no per-batch sync), or wall
    clock on CPU, where the work is done when the call returns. Under torchrun each rank scores its
    own images: sums and counts are added over the ranks, the times are the slowest rank's."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    timer = StepTimer(device)
    bar = _progress(_batches(loader, max_steps), desc)
    batches = iter(loader)
    while max_steps is None or timer.steps < max_steps:
        timer.data_start()
        batch = next(batches, None)
        if batch is None:
            break
        images, labels, _ = batch
        timer.data_end()
        mark_step(compile_mode)
        logits = model(images)
        timer.compute_end()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
        bar.update()
    bar.close()
    if hasattr(batches, "close"):
        batches.close()
    wait_s, forward_s = timer.totals()
    steps = max(timer.steps, 1)
    loss_sum, correct, seen = distributed.sum_over_ranks(loss_sum, correct, seen, device=device)
    forward_ms, incl_data_ms = distributed.gather_over_ranks(
        1e3 * forward_s / steps, 1e3 * (wait_s + forward_s) / steps, device=device)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": int(seen),
            "forward_ms_per_batch": max(forward_ms), "forward_incl_data_ms_per_batch": max(incl_data_ms)}


def compile_cache_counts() -> dict:
    """Inductor's FX-graph cache hits and misses so far in this process: with --compile, zero misses
    means every graph came from the cache (a warm start), any miss that something was compiled anew."""
    from torch._dynamo.utils import counters

    return {"fx_graph_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def out_of_memory(device: torch.device, batch_size: int) -> str:
    """The one line for a GPU that ran out of memory: the batch size and what the device has."""
    if device.type != "cuda":
        return f"out of memory with --batch-size {batch_size} on {device_name(device)}: use a smaller --batch-size"
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return (f"out of GPU memory with --batch-size {batch_size} on {device_name(device)} ({total / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free after the failure): use a smaller --batch-size")


def main(argv: Sequence[str] | None = None) -> int:
    entered = seconds_since_process_start()  # the interpreter's start-up and our imports (torch's, FFCV's)
    args = parse_args(argv)
    try:
        code = run(args, entered)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError, which run_cli would leave as a traceback (a bug's)
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        raise UserError(out_of_memory(device, args.batch_size)) from None
    distributed.cleanup()  # under torchrun: after run's frame, and the DDP wrapper in it, are gone
    return code


def run(args: argparse.Namespace, entered: float) -> int:
    """The run `main` starts: set-up, warm-up, the epochs, the test, the results."""
    world_size = distributed.ranks_from_env().world_size
    if args.batch_size % world_size:  # before any process group: every rank says it and exits
        raise UserError(f"--batch-size {args.batch_size} (the global batch) does not split evenly over "
                        f"{world_size} processes")
    ranks, device = distributed.setup(args.device)  # one process, or this rank's under torchrun
    batch_size = args.batch_size // ranks.world_size  # this process's share
    say = print if ranks.main else (lambda *a, **k: None)  # rank 0 alone prints, writes and profiles
    run_name = plain_name(args.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{device.type}", "--run-name")
    profile_dir = args.profile_dir / run_name
    profile = args.profile and ranks.main
    if ranks.main:
        for folder, what in [(args.out, "--out"), *([(profile_dir, "--profile-dir")] if profile else [])]:
            writable_folder(folder, what)
        for suffix, what in ((".json", "the run's results"), (".pt", "the run's weights")):
            writable_file(args.out / f"{run_name}{suffix}", what)

    compile_mode = args.compile_mode if args.compile else None
    precision = set_float32_precision(device, args.tf32)
    cudnn = set_cudnn(device, args.deterministic)
    env = environment(device, loader=args.loader, compile=args.compile, compile_mode=compile_mode,
                      precision=precision, cudnn=cudnn, seed=args.seed, world_size=ranks.world_size)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    set_up = seconds_since_process_start()
    startup = {"python_and_imports_s": entered, "setup_s": set_up - entered}
    if args.compile:
        import_compiler()
        if profile and device.type == "cpu":  # Inductor's C++ kernels visible in the trace (trace_breakdown)
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = env["inductor_kernel_profile"] = True
    startup["compiler_import_s"] = seconds_since_process_start() - set_up
    loaders = make_loaders(args.data_dir, device, batch_size, args.workers, args.seed,
                           compile_augment=args.compile, loader=args.loader, rank=ranks.rank,
                           world_size=ranks.world_size, timings=startup)
    built = seconds_since_process_start()
    if hasattr(loaders["train"], "transforms"):  # --loader torch: torchvision's, or the plain-torch fallback
        env["torch_transforms"] = loaders["train"].transforms
        say(f"note: --loader torch runs {env['torch_transforms']} transforms", flush=True)
    if args.loader == "synthetic":
        say("note: --loader synthetic feeds one fixed random batch: it measures the compute-only floor "
            "and trains nothing meaningful (its accuracies are chance)", flush=True)
    contiguous = args.memory_format == "contiguous"  # batches made NCHW in the data phase (loaders give NHWC)
    layout = torch.contiguous_format if contiguous else torch.channels_last
    model = resnetv2_20().to(device=device, memory_format=layout)
    optimizer, env["optimizer"] = adamw(model.parameters(), device, args.lr, args.weight_decay)
    net = distributed.wrap(compiled(model, compile_mode), device)  # under torchrun: DDP
    env["process_group"] = distributed.backend()
    processes = ""
    if ranks.world_size > 1:  # FFCV's and torch's DistributedSampler pad the split to a multiple of N
        repeated = loaders["train"].images * ranks.world_size - split_sizes(args.data_dir)["train"]
        processes = f", {ranks.world_size} processes x {batch_size}, {repeated} train images repeated per epoch"
    say(f"fastcifar {__version__}: ResNetV2-20 ({count_parameters(model):,} parameters) on "
        f"{device_name(device)}, loader {args.loader}, "
        f"{'torch.compile ' + args.compile_mode if args.compile else 'eager'}, "
        f"{'TF32' if args.tf32 else 'float32'}, train {len(loaders['train'])} batches of {args.batch_size}{processes}",
        flush=True)
    # Every compilation on this thread while no FFCV thread runs (see precompile.py): the training
    # graphs now, the eval graph after the first epoch (the first step does not need it).
    synchronize(device)
    startup["model_s"] = seconds_since_process_start() - built
    t0 = time.perf_counter()
    sizes = warm_up_run(net, model, loaders, device, batch_size, args.max_steps_per_epoch, compile_mode,
                        compiled=args.compile, evaluation=False)
    synchronize(device)
    warm_up_s = time.perf_counter() - t0
    startup["compile_s"] = warm_up_s
    compile_cache = compile_cache_counts() if args.compile else None
    compiled_graphs = graphs(sizes["train"]) if args.compile else None  # the training graphs, before any epoch
    warm_up_done = seconds_since_process_start()

    def first_step() -> None:  # the first batch is in hand: start-up ends, training begins
        now = seconds_since_process_start()
        startup.update(first_batch_s=now - warm_up_done, startup_s=now)
    device_op = getattr(loaders["train"].augment, "choice", None)
    if args.compile:
        say(warm_up_line(sizes["train"], warm_up_s, device_op), flush=True)

    timer = StepTimer(device)
    profile_epoch = min(args.profile_epoch, args.epochs)
    scalars = ScalarLog(profile_dir) if profile else None
    traces: list[Path] = []
    breakdown = None
    epochs = []
    scorer = distributed.unwrap(net)  # evaluation runs no collective: each rank scores its own images
    eval_warm_up_s = 0.0
    with frozen():
        if args.warm_up_steps:  # untimed: the epochs' clocks start after it
            train_epoch(net, loaders["train"], optimizer, device, timer, args.warm_up_steps, desc="warm-up steps",
                        compile_mode=compile_mode, contiguous=contiguous)
        for epoch in range(1, args.epochs + 1):
            profiler = TraceProfiler(profile_dir, device, args.profile_schedule) if (
                profile and epoch == profile_epoch) else None
            with profiler or contextlib.nullcontext():
                stats = train_epoch(net, loaders["train"], optimizer, device, timer, args.max_steps_per_epoch,
                                    desc=f"epoch {epoch}/{args.epochs}" + (" (profiling)" if profiler else ""),
                                    on_step=profiler.step if profiler else None, compile_mode=compile_mode,
                                    on_first_batch=first_step if epoch == 1 else None, contiguous=contiguous)
            if profiler:
                traces, breakdown = profiler.traces, profiler.breakdown
            if epoch == 1 and args.compile:
                t0 = time.perf_counter()
                compiled_sizes = warm_up_evaluation(net, model, device, sizes, compile_mode)
                synchronize(device)
                eval_warm_up_s = time.perf_counter() - t0
                say(f"compiled the eval graph for batch sizes {compiled_sizes} in {eval_warm_up_s:.1f} s", flush=True)
            distributed.sync_buffers(model)  # every rank scores the model rank 0 saves
            val = evaluate(scorer, loaders["val"], device, args.max_steps_per_epoch, desc="val",
                           compile_mode=compile_mode)
            stats = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_acc": val["accuracy"],
                     "val_images": val["images"]}
            epochs.append(stats)
            if scalars is not None:
                scalars.epoch(epoch, stats)
            say(epoch_line(stats, args.epochs, args.loader), flush=True)
        total_training_time = max(distributed.gather_over_ranks(seconds_since_process_start(), device=device)[0])
        if scalars is not None:
            scalars.close()
        test = evaluate(scorer, loaders["test"], device, args.max_steps_per_epoch, desc="test",
                        compile_mode=compile_mode)

    if not ranks.main:
        return 0
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "profile_schedule"}
    profiled = {"dir": str(profile_dir), "epoch": profile_epoch, "traces": [str(t) for t in traces],
                "breakdown": breakdown} if profile else None
    results = collect(run_name, total_training_time, epochs, test, config, env, profiled)
    results["warm_up_s"] = warm_up_s + eval_warm_up_s  # every compilation of the run
    results["eval_warm_up_s"] = eval_warm_up_s  # of which after the first epoch, outside start-up
    results["startup_s"] = startup["startup_s"]
    results["startup"] = {**startup, "compile_cache": compile_cache,
                          "compile_cache_warm": None if compile_cache is None else
                          compile_cache["fx_graph_misses"] == 0 and compile_cache["fx_graph_hits"] > 0}
    results["device_op"] = device_op
    if compiled_graphs:  # those of the warm-up, and all of the run: the eval graph's after epoch 1, no other
        results["graphs"] = {**compiled_graphs, "at_end": graphs([])["unique_graphs"]}
    if hasattr(loaders["train"], "stats"):  # --loader spdl: each stage's tasks and seconds, per epoch
        results["loader_stages"] = {split: loaders[split].stats.epochs for split in ("train", "val", "test")
                                    if split in loaders}
    # After the clock and the test: the probe is not part of the run (1-2 s on the run's threads).
    env["attainable_fp32"] = attainable_probe(device)
    results.update(run_utilisation(results, env["attainable_fp32"], args.batch_size, ranks.world_size))
    weights = args.out / f"{run_name}.pt"
    # Both written to temporaries before either is renamed: the weights never appear without their results.
    with atomic_path(args.out / f"{run_name}.json") as results_tmp, atomic_path(weights) as weights_tmp:
        torch.save(model.state_dict(), weights_tmp)
        results_tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResNetV2-20 on CIFAR-10, {len(epochs)} epochs, {results['env']['device_name']}:")
    print(summary_table(results))
    print(f"results: {args.out / (run_name + '.json')}  weights: {weights}")
    if args.profile:
        if breakdown:
            print(trace_breakdown.table(breakdown))
        print(f"profile: {', '.join(map(str, traces)) or 'no trace (window longer than the epoch?)'}"
              + (f", breakdown.json and breakdown.png in {profile_dir}" if breakdown else "")
              + f"; view the trace with: tensorboard --logdir {args.profile_dir}, or in Perfetto")
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.train")


if __name__ == "__main__":
    cli()
