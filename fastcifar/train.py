"""Train ResNetV2-20 on CIFAR-10 from FFCV betons: `python -m fastcifar.train --compile`.

Defaults are the benchmark's recipe: AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-4), 10 epochs,
batch 128, constant learning rate, float32 (no autocast), channels_last. Reads top to bottom:
flags, one training epoch, evaluation, timed inference, then `main` which runs them and writes
the six metrics (see README) to <out>/<run-name>.json and the weights to <out>/<run-name>.pt.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before importing torch: total_training_time_s starts here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import __version__  # noqa: E402
from .data import make_loaders  # noqa: E402
from .model import count_parameters, resnetv2_20  # noqa: E402
from .profiling import (  # noqa: E402
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
from .utils import (  # noqa: E402
    ArgumentParser,
    UserError,
    atomic_path,
    device_name,
    resolve_device,
    run_cli,
    synchronize,
    write_json_atomic,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="fastcifar.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (train and eval)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, constant")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW (decoupled) weight decay")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and augmentation")
    p.add_argument("--workers", type=int, default=2, help="FFCV loader threads")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (train and eval) and the on-device augmentation")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode, with --compile")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="N",
                   help="stop each epoch (and each evaluation) after N batches: for smoke runs")
    p.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    p.add_argument("--run-name", default=None, help="name of the results files; None: <date>-<time>-<device>")
    p.add_argument("--profile", action="store_true",
                   help="write a torch.profiler trace and TensorBoard scalars to <profile-dir>/<run-name>/")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"), help="where --profile writes")
    p.add_argument("--profile-steps", default="5,3,10", metavar="WAIT,WARMUP,ACTIVE",
                   help="profiler schedule within the profiled epoch")
    p.add_argument("--profile-epoch", type=int, default=2,
                   help="epoch to profile (after compilation; capped at --epochs)")
    args = p.parse_args(argv)
    args.profile_schedule = parse_profile_steps(args.profile_steps)
    for name, low in [("epochs", 1), ("batch_size", 1), ("workers", 1), ("max_steps_per_epoch", 1),
                      ("profile_epoch", 1)]:
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UserError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    return args


def _progress(total: int, desc: str) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 30)


def _batches(loader, max_steps: int | None) -> int:
    return len(loader) if max_steps is None else min(len(loader), max_steps)


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, device: torch.device,
                timer: StepTimer, max_steps: int | None = None, desc: str = "train",
                on_step=None) -> dict:
    """One pass over the train loader. Loss and accuracy are summed on the device (no per-step sync).

    on_step(loss), when given, runs after every optimizer step (the profiler's step, tests' spies).
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
        if batch is None:
            break
        images, labels, _ = batch
        timer.data_end()
        with record_function(FORWARD_RANGE):
            logits = model(images)
            loss = nn.functional.cross_entropy(logits, labels)
        with record_function(BACKWARD_RANGE):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function(OPTIMIZER_RANGE):
            optimizer.step()
        timer.compute_end()
        n = labels.shape[0]
        seen += n
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == labels).sum()
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
    data_s, compute_s = timer.totals()
    return {
        "train_loss": loss_sum.item() / max(seen, 1),
        "train_acc": correct.item() / max(seen, 1),
        "train_images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "data_time_s": data_s,
        "compute_time_s": compute_s,
        "data_fraction": data_fraction(data_s, compute_s),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, max_steps: int | None = None,
             desc: str = "eval", timed: bool = False) -> dict:
    """Loss and accuracy over a loader, eval mode. timed=True also times each batch's forward pass
    (CUDA events, or wall clock after the work is done on CPU) and forward plus the wait for the batch."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen, forward_s, with_data_s = 0, [], []
    cuda = device.type == "cuda"
    bar = _progress(_batches(loader, max_steps), desc)
    batches = iter(loader)
    while max_steps is None or bar.n < max_steps:
        waited_from = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        images, labels, _ = batch
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t_ready = time.perf_counter()
        logits = model(images)
        if timed:
            if cuda:
                end.record()
                end.synchronize()
                forward_s.append(start.elapsed_time(end) / 1e3)
            else:
                forward_s.append(time.perf_counter() - t_ready)
            with_data_s.append(time.perf_counter() - waited_from)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
        bar.update()
    bar.close()
    if hasattr(batches, "close"):
        batches.close()
    out = {"loss": loss_sum.item() / max(seen, 1), "accuracy": correct.item() / max(seen, 1), "images": seen}
    if timed:
        out["forward_ms_per_batch"] = 1e3 * sum(forward_s) / len(forward_s)
        out["forward_incl_data_ms_per_batch"] = 1e3 * sum(with_data_s) / len(with_data_s)
    return out


def _git_commit() -> str | None:
    """HEAD of the checkout that runs, with '+dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if commit and git("status", "--porcelain", "--untracked-files=no") else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    from importlib.metadata import version

    import numpy

    return {
        "fastcifar": __version__,
        "torch": torch.__version__,
        "ffcv": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in the 1.0.2 release
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "seed": args.seed,
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, "-m", "fastcifar.train", *sys.argv[1:]]),
    }


def _summary_table(results: dict) -> str:
    rows = [
        ("total training time", f"{results['total_training_time_s']:.1f} s"),
        ("mean epoch time", f"{results['epoch_time_s']:.1f} s"),
        ("mean epoch time, excl. epoch 1", f"{results['epoch_time_excl_first_s']:.1f} s"),
        ("inference time per batch", f"{results['inference_time_per_batch_ms']:.2f} ms"),
        ("  incl. waiting for data", f"{results['inference_time_per_batch_incl_data_ms']:.2f} ms"),
        ("last-epoch train loss", f"{results['last_epoch_train_loss']:.4f}"),
        (f"validation accuracy ({results['val_images']:,})", f"{100 * results['val_accuracy']:.2f} %"),
        (f"test accuracy ({results['test_images']:,})", f"{100 * results['test_accuracy']:.2f} %"),
        ("data / compute time", f"{results['data_time_s']:.1f} s / {results['compute_time_s']:.1f} s "
                                f"(data fraction {results['data_fraction']:.3f})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    run_name = args.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{device.type}"
    profile_dir = args.profile_dir / run_name
    for folder in [args.out, *([profile_dir] if args.profile else [])]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create folder {folder}: {err.strerror or err}") from None

    env = environment(args, device)  # now, so git_commit is the code that runs
    torch.manual_seed(args.seed)
    loaders = make_loaders(args.data_dir, device, args.batch_size, args.workers, args.seed,
                           compile_augment=args.compile)
    model = resnetv2_20().to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    # Under --compile the last, partial batch of an epoch triggers one recompile with a dynamic batch
    # dimension (dynamo's automatic dynamic shapes); both graphs stay cached, so later epochs reuse them.
    net = torch.compile(model, mode=args.compile_mode) if args.compile else model
    print(f"fastcifar {__version__}: ResNetV2-20 ({count_parameters(model):,} parameters) on "
          f"{device_name(device)}, {'torch.compile ' + args.compile_mode if args.compile else 'eager'}, "
          f"train {len(loaders['train'])} batches of {args.batch_size}")

    timer = StepTimer(device)
    profile_epoch = min(args.profile_epoch, args.epochs)
    scalars = ScalarLog(profile_dir) if args.profile else None
    traces: list[Path] = []
    epochs = []
    for epoch in range(1, args.epochs + 1):
        profiler = TraceProfiler(profile_dir, device, args.profile_schedule) if (
            args.profile and epoch == profile_epoch) else None
        with profiler or contextlib.nullcontext():
            stats = train_epoch(net, loaders["train"], optimizer, device, timer, args.max_steps_per_epoch,
                                desc=f"epoch {epoch}/{args.epochs}" + (" (profiling)" if profiler else ""),
                                on_step=profiler.step if profiler else None)
        traces = profiler.traces if profiler else traces
        val = evaluate(net, loaders["val"], device, args.max_steps_per_epoch, desc="val")
        stats = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_acc": val["accuracy"],
                 "val_images": val["images"]}
        epochs.append(stats)
        if scalars is not None:
            scalars.epoch(epoch, stats)
        print(f"epoch {epoch:>2}/{args.epochs}  train loss {stats['train_loss']:.4f}  "
              f"train acc {100 * stats['train_acc']:.2f}%  val loss {stats['val_loss']:.4f}  "
              f"val acc {100 * stats['val_acc']:.2f}%  {stats['seconds']:.1f} s  "
              f"{stats['images_per_s']:.0f} img/s  data {100 * stats['data_fraction']:.1f}%", flush=True)
    total_training_time = time.perf_counter() - PROCESS_START

    if scalars is not None:
        scalars.close()
    test = evaluate(net, loaders["test"], device, args.max_steps_per_epoch, desc="test", timed=True)
    times = [e["seconds"] for e in epochs]
    data_s = sum(e["data_time_s"] for e in epochs)
    compute_s = sum(e["compute_time_s"] for e in epochs)
    results = {
        "run_name": run_name,
        "total_training_time_s": total_training_time,
        "epoch_time_s": sum(times) / len(times),
        "epoch_times_s": times,
        "epoch_time_excl_first_s": sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0],
        "inference_time_per_batch_ms": test["forward_ms_per_batch"],
        "inference_time_per_batch_incl_data_ms": test["forward_incl_data_ms_per_batch"],
        "last_epoch_train_loss": epochs[-1]["train_loss"],
        "val_accuracy": epochs[-1]["val_acc"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_images": epochs[-1]["val_images"],
        "test_images": test["images"],
        "data_time_s": data_s,
        "compute_time_s": compute_s,
        "data_fraction": data_fraction(data_s, compute_s),
        "epochs": epochs,
        "profile": {"dir": str(profile_dir), "epoch": profile_epoch, "traces": [str(t) for t in traces]}
        if args.profile else None,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                   if k != "profile_schedule"},
        "env": env,
    }
    weights = args.out / f"{run_name}.pt"
    with atomic_path(weights) as tmp:
        torch.save(model.state_dict(), tmp)
    write_json_atomic(args.out / f"{run_name}.json", results)
    print(f"\nResNetV2-20 on CIFAR-10, {len(epochs)} epochs, {results['env']['device_name']}:")
    print(_summary_table(results))
    print(f"results: {args.out / (run_name + '.json')}  weights: {weights}")
    if args.profile:
        print(f"profile: {', '.join(map(str, traces)) or 'no trace (window longer than the epoch?)'}; "
              f"view with: tensorboard --logdir {args.profile_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main, "fastcifar.train")
