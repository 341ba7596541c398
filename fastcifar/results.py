"""A run's results: the six metrics and what backs them, as one dict (the JSON file), one epoch line
and the summary table. Kept apart from the training loop so that train.py reads as a loop."""

from __future__ import annotations

from .profiling import data_fraction


def epoch_line(stats: dict, epochs: int, loader: str) -> str:
    return (f"[{loader}] epoch {stats['epoch']:>2}/{epochs}  train loss {stats['train_loss']:.4f}  "
            f"train acc {100 * stats['train_acc']:.2f}%  val loss {stats['val_loss']:.4f}  "
            f"val acc {100 * stats['val_acc']:.2f}%  {stats['seconds']:.1f} s  "
            f"{stats['images_per_s']:.0f} img/s  data {100 * stats['data_fraction']:.1f}%")


def warm_up_line(train_sizes: list[int], seconds: float, device_op: dict | None) -> str:
    """The line after the start-up warm-up: the training graphs (the eval graph follows the first epoch)."""
    line = f"compiled the training step for batch sizes {train_sizes} in {seconds:.1f} s"
    if device_op:
        times = ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in device_op.items() if k.endswith("_ms"))
        line += f"; device op: {device_op['op']} ({times} per batch of {device_op['batch']})"
    return line


def collect(run_name: str, total_training_time_s: float, epochs: list[dict], test: dict, config: dict,
            env: dict, profile: dict | None = None) -> dict:
    """The results JSON. total_training_time_s: process start (from the OS) to the end of the last
    epoch's validation; epoch times: each training loop, device-synchronised at both ends."""
    times = [e["seconds"] for e in epochs]
    data_s = sum(e["data_time_s"] for e in epochs)
    compute_s = sum(e["compute_time_s"] for e in epochs)
    per_rank = {}
    if "data_time_s_per_rank" in epochs[0]:  # under torchrun: every rank's totals, and the worst
        for key in ("data_time_s", "compute_time_s"):
            totals = [sum(values) for values in zip(*(e[f"{key}_per_rank"] for e in epochs), strict=True)]
            per_rank |= {f"{key}_per_rank": totals, f"{key}_max_rank": max(totals)}
    return {
        "run_name": run_name,
        "total_training_time_s": total_training_time_s,
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
        **per_rank,
        "epochs": epochs,
        "profile": profile,
        "config": config,
        "env": env,
    }


def startup_text(startup: dict) -> str:
    """'12.3 s (compile caches warm)': the process start to the first training step."""
    warm = startup.get("compile_cache_warm")
    cache = "" if warm is None else f" (compile caches {'warm' if warm else 'cold'})"
    return f"{startup['startup_s']:.1f} s{cache}"


def summary_table(results: dict) -> str:
    rows = [
        ("data pipeline (--loader)", results["config"]["loader"]),
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
    if "startup" in results:
        rows.insert(2, ("start-up (to the first step)", startup_text(results["startup"])))
    world = results["env"].get("world_size", 1)
    if world > 1:
        per_process = results["config"]["batch_size"] // world
        rows.insert(1, ("processes (torchrun)", f"{world} x {per_process} images per step"))
        rows[-1] = ("data / compute time, mean rank", rows[-1][1])
        rows.append(("  slowest rank", f"{results['data_time_s_max_rank']:.1f} s / "
                                        f"{results['compute_time_s_max_rank']:.1f} s"))
    if "utilisation" in results:
        u = results["utilisation"]
        rows.append(("utilisation (of the attainable fp32 rate)",
                     f"{100 * u['mean_epoch']['utilisation']:.1f} % over the mean epoch "
                     f"({u['mean_epoch']['gflops']:.1f} GFLOP/s), {100 * u['compute_time']['utilisation']:.1f} % "
                     f"of the compute time; attainable {u['attainable_gflops']:.0f} GFLOP/s, "
                     f"{results['flops_per_image'] / 1e6:.0f} MFLOP per image"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
