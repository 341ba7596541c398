"""ResNetV2-20, the training loop, the CLI's six metrics, evaluate, and bad flags."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcifar.data import make_loader
from fastcifar.model import count_parameters, resnetv2_20
from fastcifar.profiling import StepTimer
from fastcifar.train import evaluate, train_epoch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_parameter_count_and_output_shape():
    model = resnetv2_20()
    assert count_parameters(model) == 281_610
    out = model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, 10)
    # the shortcut is a 1x1 conv exactly where the shape changes
    shortcuts = [b.shortcut is not None for b in model.blocks]
    assert shortcuts == [True, False, False, True, False, False, True, False, False]


def test_one_train_step_changes_every_parameter():
    torch.manual_seed(0)
    model = resnetv2_20().to(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
    loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def _losses(small_data: Path, compiled: bool, epochs: int) -> tuple[list[float], list[int]]:
    """Per-step losses from seed 0 and dynamo's graph count after each epoch."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnetv2_20().to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4)
    loader = make_loader(small_data / "train.beton", CPU, batch_size=128, workers=2, train=True, seed=0)
    val = make_loader(small_data / "val.beton", CPU, batch_size=32, workers=2)  # 50 = 32 + 18
    losses, graphs = [], []
    for _ in range(epochs):
        train_epoch(net, loader, optimizer, CPU, StepTimer(CPU), on_step=lambda loss: losses.append(loss.item()))
        evaluate(net, val, CPU)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return losses, graphs


def test_eager_and_compiled_agree_and_partial_batch_compiles_once(small_data):
    eager, _ = _losses(small_data, compiled=False, epochs=1)
    compiled, graphs = _losses(small_data, compiled=True, epochs=3)
    steps_per_epoch = 4  # 450 images: three batches of 128 and a last one of 66
    assert len(eager) == steps_per_epoch and len(compiled) == 3 * steps_per_epoch
    assert all(math.isfinite(v) for v in compiled)
    for a, b in zip(eager, compiled[:steps_per_epoch], strict=True):
        assert abs(a - b) < 1e-3, (eager, compiled)
    # the partial last batches (train and eval) compile in epoch 1; later epochs reuse the cached graphs
    assert graphs[0] > 0 and graphs[0] == graphs[1] == graphs[2], graphs


@pytest.fixture(scope="module")
def cli_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = run_module("fastcifar.train", "--data-dir", str(small_data), "--epochs", "2",
                        "--max-steps-per-epoch", "3", "--out", str(out), "--run-name", "smoke", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_writes_six_metrics_and_weights(cli_run):
    out, result = cli_run
    metrics = json.loads((out / "smoke.json").read_text())
    assert (out / "smoke.pt").is_file()
    for key in ("total_training_time_s", "epoch_time_s", "inference_time_per_batch_ms", "last_epoch_train_loss",
                "val_accuracy", "test_accuracy", "epoch_time_excl_first_s", "inference_time_per_batch_incl_data_ms"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["epoch_time_s"] < metrics["total_training_time_s"]
    assert len(metrics["epoch_times_s"]) == 2
    assert metrics["epoch_time_s"] == pytest.approx(sum(metrics["epoch_times_s"]) / 2)
    assert 0 < metrics["inference_time_per_batch_ms"] <= metrics["inference_time_per_batch_incl_data_ms"]
    assert 0 < metrics["last_epoch_train_loss"] < 10
    assert 0 <= metrics["val_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert [e["train_images"] for e in metrics["epochs"]] == [3 * 128] * 2
    assert metrics["last_epoch_train_loss"] == metrics["epochs"][-1]["train_loss"]
    assert metrics["env"]["seed"] == 0 and metrics["env"]["torch"] == torch.__version__
    assert metrics["test_images"] == 110 and metrics["val_images"] == 50  # one capped batch holds each split
    assert "test accuracy (110)" in result.stdout and "epoch  2/2" in result.stdout
    # what ran: no process group without torchrun, the fused AdamW (on a CPU too), cuDNN's settings not applying
    env = metrics["env"]
    assert env["process_group"] is None
    assert env["optimizer"] == {"name": "AdamW", "fused": True, "implementation": "fused"}
    assert env["cudnn"]["applies"] is False
    # start-up: process start -> first training step, and the pieces it is made of
    startup = metrics["startup"]
    pieces = ("python_and_imports_s", "setup_s", "compiler_import_s", "betons_check_s", "loaders_s", "model_s",
              "compile_s", "first_batch_s")
    assert metrics["startup_s"] == startup["startup_s"] and 0 < metrics["startup_s"] < metrics["total_training_time_s"]
    assert all(startup[k] >= 0 for k in pieces)
    assert sum(startup[k] for k in pieces) == pytest.approx(startup["startup_s"], abs=0.3 + 0.05 * startup["startup_s"])
    assert startup["compile_cache"] is None and startup["compile_cache_warm"] is None  # eager: nothing compiled
    assert "start-up (to the first step)" in result.stdout
    # FLOPs and utilisation: torch's count, the probe's rate, their ratio; the machine recorded exactly
    assert metrics["flops_per_image"] == metrics["flops"]["train_step_flops"] / 128
    probe, util = env["attainable_fp32"], metrics["utilisation"]
    assert probe["gflops"] >= probe["median_gflops"] > 0 and probe["threads"] >= 1
    assert probe["gflops"] == max(probe["matmul"]["gflops"], probe["conv"]["gflops"])  # the faster kernel
    assert probe[probe["kernel"]]["gflops"] == probe["gflops"] and probe["conv"]["calls"] >= 1
    images = sum(e["train_images"] for e in metrics["epochs"])
    assert util["mean_epoch"]["gflops"] == pytest.approx(
        images / sum(metrics["epoch_times_s"]) * metrics["flops_per_image"] / 1e9)
    for part in ("mean_epoch", "compute_time"):
        assert 0 < util[part]["utilisation"] <= 1
        assert util[part]["utilisation"] == pytest.approx(util[part]["gflops"] / probe["gflops"])
    assert "utilisation (of the attainable fp32 rate)" in result.stdout
    assert env["machine"]["logical_cpus"] >= 1 and env["versions"]["torch"] == torch.__version__
    assert env["versions"]["torch_build"] in ("cpu", "rocm") or env["versions"]["torch_build"].startswith("cu")


def test_flops_are_torchs_count_of_a_training_step():
    """step_flops counts on the meta device; the same model on the CPU, counted by FlopCounterMode
    directly over forward and backward, gives the same total (and it scales with the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastcifar.flops import flops_record, step_flops, utilisation

    model = resnetv2_20().to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(images), torch.zeros(4, dtype=torch.int64)).backward()
    counts = step_flops(4)
    assert counts["train_step"] == counter.get_total_flops() == counts["forward"] + counts["backward"]
    assert 2 * counts["forward"] < counts["train_step"] < 4 * counts["forward"]  # backward ~ 2x forward
    assert flops_record(8)["flops_per_image"] == pytest.approx(counts["train_step"] / 4)
    assert utilisation(100.0, 1e9, 200.0) == {"gflops": 100.0, "utilisation": 0.5}


def test_running_out_of_gpu_memory_is_a_user_error(small_data, tmp_path, monkeypatch):
    """torch.cuda.OutOfMemoryError is a RuntimeError, which run_cli leaves as a traceback: the trainer
    turns it into one line naming the batch size (the CUDA lane runs a real one)."""
    from fastcifar import train
    from fastcifar.utils import UserError

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_epoch", out_of_memory)
    with pytest.raises(UserError, match="out of memory with --batch-size 64 on .*use a smaller --batch-size"):
        train.main(["--data-dir", str(small_data), "--device", "cpu", "--loader", "memory", "--batch-size", "64",
                    "--out", str(tmp_path), "--run-name", "oom"])
    assert list(tmp_path.iterdir()) == []


def test_evaluate_reproduces_the_run(cli_run, small_data):
    out, _ = cli_run
    metrics = json.loads((out / "smoke.json").read_text())
    # the small val (50) and test (110) splits fit in one batch, so the run saw every image
    for split, key in [("val", "val_accuracy"), ("test", "test_accuracy")]:
        result = run_module("fastcifar.evaluate", "--weights", str(out / "smoke.pt"), "--split", split,
                            "--data-dir", str(small_data), "--device", "cpu", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] == metrics[key]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),  # ffcv's threads; the DataLoader's 0 is --loader torch's
    (["--compile", "--memory-format", "contiguous"], "--memory-format contiguous runs eager"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--compile-mode", "fast"], "invalid choice"),
    (["--loader", "foo"], "argument --loader: invalid choice: 'foo'"),
    (["--data-dir", "MISSING"], "manifest.json is missing; build the betons with: python tools/make_beton.py"),
    (["--data-dir", "STALE"], "does not match"),
])
def test_bad_flags_and_missing_betons(args, message, tmp_path, small_data):
    if "MISSING" in args:
        args = ["--data-dir", str(tmp_path)]
    elif "STALE" in args:
        for name in ("train.beton", "val.beton", "test.beton", "manifest.json"):
            (tmp_path / name).write_bytes((small_data / name).read_bytes())
        with open(tmp_path / "val.beton", "ab") as f:
            f.write(b"\0")
        args = ["--data-dir", str(tmp_path)]
    result = run_module("fastcifar.train", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_bad_weights(tmp_path, small_data):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    result = run_module("fastcifar.evaluate", "--weights", str(bad), "--data-dir", str(small_data))
    assert result.returncode == 2 and "is not a ResNetV2-20 state dict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
