"""The CUDA lane: what only a GPU can show. Every test here is marked `cuda` and skipped, with the
reason, where torch sees no GPU (CI has none). `make gpu-check` runs them on a CUDA machine:
`python -m pytest -m cuda`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcifar.augment import IMAGENET_MEAN, IMAGENET_STD, crop_flip_normalize
from fastcifar.data import make_loader, make_loaders, read_beton
from fastcifar.model import resnetv2_20
from fastcifar.optim import adamw
from fastcifar.precompile import frozen, warm_up_run
from fastcifar.profiling import DATA_RANGE, StepTimer
from fastcifar.train import train_epoch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_device_op_on_cuda_equals_the_cpu_reference(compiled):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (100, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    offsets = torch.randint(0, 9, (100, 2))
    flips = torch.rand(100) < 0.5
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    op = torch.compile(crop_flip_normalize) if compiled else crop_flip_normalize

    def run(device, m, s):
        return op(images.to(device), offsets.to(device), flips.to(device), m.to(device), s.to(device), 4, 32).cpu()

    # the gather: with mean 0 and std 1/255 the output is the uint8 pixel itself, exactly
    unit = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 1 / 255)
    assert torch.equal(run(CUDA, *unit).round(), crop_flip_normalize(images, offsets, flips, *unit, 4, 32).round())
    torch.testing.assert_close(run(CUDA, mean, std), run(CPU, mean, std), atol=1e-6, rtol=0)


def _epoch(loader):
    xs, ys, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


def _dali_if(loader: str) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra is not installed: DALI's GPU pipeline untested")


@pytest.mark.parametrize("loader", ["ffcv", "memory", "torch", "dali"])
@pytest.mark.parametrize("batch_size", [10, 16])
def test_cuda_loaders_yield_every_image_once(small_data, batch_size, loader):
    """Every pipeline's contract on the GPU: val/test in order, train every image once per epoch."""
    _dali_if(loader)
    loaders = make_loaders(small_data, CUDA, batch_size, 2, seed=3, loader=loader)
    for split in ("val", "test"):
        beton = read_beton(small_data / f"{split}.beton", ("index",))
        images, labels, indices = _epoch(loaders[split])
        assert images.is_cuda and labels.is_cuda and indices.is_cuda
        assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.float32
        assert indices.tolist() == beton["index"].tolist()
    expected = sorted(read_beton(small_data / "train.beton", ("index",))["index"].tolist())
    for _ in range(2):
        images, _, indices = _epoch(loaders["train"])
        assert sorted(indices.tolist()) == expected and images.shape[0] == len(expected)


@pytest.mark.parametrize("loader", ["ffcv", "memory", "torch", "dali"])
def test_same_seed_same_batches_on_cuda(small_data, loader):
    _dali_if(loader)
    # 2 workers (the trainer's default; its --workers is at least 1): torch's DataLoader seeds each worker
    # from the loader's generator, while in-process (0 workers) its transforms would draw from the global RNG
    a = _epoch(make_loaders(small_data, CUDA, 64, 2, seed=7, loader=loader)["train"])
    b = _epoch(make_loaders(small_data, CUDA, 64, 2, seed=7, loader=loader)["train"])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_a_batch_kept_past_later_iterations_is_unchanged(small_data):
    """FFCV fills batches on a side stream and reuses their memory; DeviceBatches records every tensor
    on the consumer's stream, so batch k kept while the loader goes on to k+3 must not change."""
    loader = make_loader(small_data / "train.beton", CUDA, 16, 2, train=True, seed=0)
    batches = iter(loader)
    kept = next(batches)
    copies = [t.clone() for t in kept]  # taken at once, on the consumer's stream
    for _ in range(3):
        next(batches)
    batches.close()
    torch.cuda.synchronize()
    for tensor, copy in zip(kept, copies, strict=True):
        assert torch.equal(tensor, copy)


def test_fused_adamw_equals_the_unfused_steps():
    """The trainer's AdamW on CUDA is fused=True (optim.adamw): five steps from the same parameters with
    the same gradients equal torch's foreach steps within float32 rounding. Fixed gradients, not
    the model's: AdamW's first steps move each weight by about lr * sign(gradient), so two runs of
    the model whose gradients differ in the last bit near zero drift apart by ~lr however exact
    the optimizer is. (Checked on the CPU, whose fused AdamW gives 3e-8.)"""
    torch.manual_seed(0)
    start = [p.detach().to(CUDA) for p in resnetv2_20().to(memory_format=torch.channels_last).parameters()]
    grads = [[1e-2 * torch.randn_like(p) for p in start] for _ in range(5)]  # laid out like the params
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        if fused:
            optimizer, chosen = adamw(params, CUDA, lr=1e-3, weight_decay=1e-4)
            assert chosen == {"name": "AdamW", "fused": True, "implementation": "fused"}
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, foreach=True)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _train(*args: str, helper: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    head = [str(ROOT / "tests" / "helpers" / helper)] if helper else ["-m", "fastcifar.train"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_trainer_records_the_cuda_defaults(small_data, tmp_path):
    result = _train("--data-dir", str(small_data), "--device", "cuda", "--epochs", "1", "--max-steps-per-epoch",
                    "2", "--out", str(tmp_path), "--run-name", "defaults")
    assert result.returncode == 0, result.stderr[-3000:]
    env = json.loads((tmp_path / "defaults.json").read_text())["env"]
    assert env["cudnn"] == {"cudnn_benchmark": True, "cudnn_deterministic": False, "applies": True}
    assert env["optimizer"] == {"name": "AdamW", "fused": True}
    result = _train("--data-dir", str(small_data), "--device", "cuda", "--epochs", "1", "--max-steps-per-epoch",
                    "2", "--out", str(tmp_path), "--run-name", "det", "--deterministic")
    assert result.returncode == 0, result.stderr[-3000:]
    env = json.loads((tmp_path / "det.json").read_text())["env"]
    assert env["cudnn"]["cudnn_benchmark"] is False and env["cudnn"]["cudnn_deterministic"] is True


def test_nccl_with_one_process_under_torchrun(small_data, tmp_path):
    """torchrun --nproc_per_node=1 takes the distributed path on the one GPU: an NCCL process group,
    DDP around the compiled model, one results JSON, every val/test image scored once."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "fastcifar.train",
         "--device", "cuda", "--compile", "--epochs", "1", "--max-steps-per-epoch", "3", "--data-dir",
         str(small_data), "--out", str(tmp_path), "--run-name", "nccl"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nccl.json", "nccl.pt"]
    run = json.loads((tmp_path / "nccl.json").read_text())
    assert run["env"]["process_group"] == "nccl" and run["env"]["world_size"] == 1
    assert (run["val_images"], run["test_images"]) == (50, 110)


def test_running_out_of_gpu_memory_is_one_line(small_data, tmp_path):
    """The GPU capped to a sliver of its memory (tests/helpers/small_gpu.py), a batch that cannot fit:
    one line naming the batch size and the device's memory, exit 2, no results written."""
    result = _train("0.002", "--data-dir", str(small_data), "--device", "cuda", "--batch-size", "450",
                    "--epochs", "1", "--out", str(tmp_path), "--run-name", "oom", helper="small_gpu.py")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "out of GPU memory" in lines[0] and "--batch-size 450" in lines[0] and "GiB" in lines[0]
    assert not list(tmp_path.glob("oom.*"))


def _first_steps(small_data: Path, mode: str | None, steps: int = 3, batch_size: int = 64):
    """Losses of the first steps from seed 0 and the epoch's stats, the trainer's way (warm-up, frozen)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnetv2_20().to(CUDA, memory_format=torch.channels_last)
    net = torch.compile(model, mode=mode) if mode else model
    optimizer, _ = adamw(model.parameters(), CUDA, lr=1e-3, weight_decay=1e-4)  # the trainer's: fused
    loaders = make_loaders(small_data, CUDA, batch_size, 2, seed=0, compile_augment=mode is not None)
    warm_up_run(net, model, loaders, CUDA, batch_size, steps, mode)
    losses: list[float] = []
    with frozen():
        stats = train_epoch(net, loaders["train"], optimizer, CUDA, StepTimer(CUDA), max_steps=steps,
                            on_step=lambda loss: losses.append(loss.item()), compile_mode=mode)
    return losses, stats


def test_eager_and_compiled_agree_on_cuda(small_data):
    eager, _ = _first_steps(small_data, None)
    compiled, _ = _first_steps(small_data, "default")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (eager, compiled)


def test_reduce_overhead_trains_and_matches_default_first_step(small_data):
    default, _ = _first_steps(small_data, "default")
    graphs, stats = _first_steps(small_data, "reduce-overhead")
    assert all(math.isfinite(v) for v in graphs) and math.isfinite(stats["train_loss"])
    assert abs(graphs[0] - default[0]) < 1e-3 * max(1.0, abs(default[0])), (default, graphs)


def test_data_plus_compute_adds_up_to_the_epoch_on_cuda(small_data):
    torch.manual_seed(0)
    model = resnetv2_20().to(CUDA, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(small_data / "train.beton", CUDA, 16, 2, train=True)
    train_epoch(model, loader, optimizer, CUDA, StepTimer(CUDA))  # FFCV's first-epoch JIT: untimed
    stats = train_epoch(model, loader, optimizer, CUDA, StepTimer(CUDA))
    measured = stats["data_time_s"] + stats["compute_time_s"]
    assert abs(measured - stats["seconds"]) <= 0.02 * stats["seconds"], stats


def test_profile_trace_holds_cuda_kernels_and_the_data_range(small_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastcifar.train", "--data-dir", str(small_data), "--device", "cuda", "--epochs", "1",
         "--batch-size", "32", "--profile", "--profile-epoch", "1", "--profile-steps", "1,1,3",
         "--profile-dir", str(tmp_path / "profiles"), "--out", str(tmp_path), "--run-name", "cudaprof"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    (trace,) = (tmp_path / "profiles" / "cudaprof").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    assert any(e.get("name") == DATA_RANGE for e in events)
