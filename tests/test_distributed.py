"""torchrun: how the splits are shared out, the environment, and 2-process runs on the CPU (gloo)
on the small betons. One 2-process training run is shared by the tests that read its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar import distributed
from fastcifar.distributed import Ranks, eval_shard, gpu_shortage, ranks_from_env, train_shard
from fastcifar.model import resnetv2_20
from fastcifar.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_train_shard_is_torchs_distributed_sampler(world):
    """The same split as torch's DistributedSampler (FFCV's distributed loader uses it): equal steps
    per rank, every image at least once, and the padding only repeats the first few."""
    order = np.random.default_rng(0).permutation(11)
    shards = [train_shard(order, rank, world) for rank in range(world)]
    for rank, shard in enumerate(shards):
        sampler = torch.utils.data.DistributedSampler(order.tolist(), world, rank, shuffle=False)
        assert shard.tolist() == [order[i] for i in sampler]
    assert len({len(s) for s in shards}) == 1
    taken = np.concatenate(shards)
    assert set(taken.tolist()) == set(order.tolist()) and len(taken) == -(-11 // world) * world


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_shard_scores_every_image_exactly_once(world):
    shards = [eval_shard(110, rank, world) for rank in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(110))


def test_ranks_from_env():
    assert ranks_from_env({}) == Ranks()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert ranks_from_env(env) == Ranks(3, 4, 1, 2)
    for bad in [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}]:
        with pytest.raises(UserError):
            ranks_from_env(bad)


def test_gpu_shortage_is_one_line_naming_the_fix():
    assert gpu_shortage(Ranks(0, 4, 0, 4), 4) is None
    assert "--nproc_per_node=2" in gpu_shortage(Ranks(1, 4, 1, 4), 2)
    assert "--device cpu" in gpu_shortage(Ranks(0, 2, 0, 2), 0)


def test_single_process_helpers_return_their_input():
    assert not distributed.active()
    cpu = torch.device("cpu")
    assert distributed.sum_over_ranks(torch.tensor(2.5), 3, device=cpu) == [2.5, 3.0]
    assert distributed.gather_over_ranks(1.5, device=cpu) == [[1.5]]


def test_uneven_global_batch_is_refused_before_any_process_group(monkeypatch, small_data):
    from fastcifar import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="does not split evenly over 2 processes"):
        train.main(["--batch-size", "127", "--data-dir", str(small_data)])


@pytest.fixture(scope="module")
def ddp_run(small_data, tmp_path_factory):
    """`torchrun --nproc_per_node 2 -m fastcifar.train --compile` on the CPU: 2 epochs of 3 steps."""
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun("-m", "fastcifar.train", "--device", "cpu", "--compile", "--epochs", "2",
                    "--max-steps-per-epoch", "3", "--data-dir", str(small_data), "--out", str(out),
                    "--run-name", "ddp", "--workers", "1")
    return proc, out


def test_torchrun_trains_and_rank_0_alone_reports(ddp_run):
    proc, out = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["ddp.json", "ddp.pt"]
    result = json.loads((out / "ddp.json").read_text())
    assert result["env"]["world_size"] == 2
    assert (result["val_images"], result["test_images"]) == (50, 110)  # every image exactly once
    assert all(e["train_images"] == 3 * 128 for e in result["epochs"])  # 3 global batches of 128
    assert all(len(e["data_time_s_per_rank"]) == 2 for e in result["epochs"])
    assert proc.stdout.count("epoch  1/2") == 1 and proc.stdout.count("processes (torchrun)") == 1


def test_torchrun_test_accuracy_is_that_of_the_saved_weights(ddp_run, small_data):
    proc, out = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ddp.json").read_text())
    single = subprocess.run([sys.executable, "-m", "fastcifar.evaluate", "--weights", str(out / "ddp.pt"), "--split",
                             "test", "--device", "cpu", "--data-dir", str(small_data), "--json"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert single.returncode == 0, single.stderr[-2000:]
    scored = json.loads(single.stdout.strip().splitlines()[-1])
    assert scored["images"] == 110
    assert scored["accuracy"] == result["test_accuracy"]
    assert scored["loss"] == pytest.approx(result["test_loss"], rel=1e-4)


def test_first_step_of_two_processes_equals_one_process(small_data, tmp_path):
    """DDP averages the ranks' gradients: one global batch of 128 split 64 + 64 takes the same AdamW
    step as 128 in one process (BatchNorm on running statistics: see the helper's docstring)."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    alone = subprocess.run([sys.executable, str(HELPERS / "ddp_first_step.py"), str(small_data), str(one)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert alone.returncode == 0, alone.stderr[-2000:]
    pair = torchrun(str(HELPERS / "ddp_first_step.py"), str(small_data), str(two))
    assert pair.returncode == 0, pair.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    torch.manual_seed(0)
    initial = dict(resnetv2_20().named_parameters())
    assert a.keys() == b.keys() == initial.keys()
    assert all(not torch.equal(a[n], initial[n]) for n in a)  # the step moved every parameter
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-5


def test_a_failing_rank_ends_the_run_quickly(small_data, tmp_path):
    start = time.time()
    proc = torchrun(str(HELPERS / "ddp_fail.py"), "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "2",
                    "--data-dir", str(small_data), "--out", str(tmp_path), "--workers", "1", timeout=300)
    end = time.time()
    assert proc.returncode != 0 and "FAILING AT " in proc.stdout, (proc.stdout[-1000:], proc.stderr[-3000:])
    failed_at = float(proc.stdout.split("FAILING AT ")[1].split()[0])
    assert start < failed_at < end and end - failed_at < 60, (end - failed_at, proc.stderr[-3000:])
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_ranks_without_gpus_each_say_one_line(small_data):
    """Every rank says it in one line and exits 2 (torchrun then prints its own failure report)."""
    proc = torchrun("-m", "fastcifar.train", "--device", "cuda", "--data-dir", str(small_data), timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastcifar.train: error:")]
    assert len(lines) == 2 and all("CUDA is not available" in line for line in lines), proc.stderr[-2000:]
    assert proc.stderr.count("exitcode  : 2") == 2  # torchrun's report: both ranks exited 2
    assert not [line for line in proc.stderr.splitlines() if "fastcifar" in line and line.strip().startswith("File")]


@pytest.mark.parametrize("loader", ["torch", "memory", "dali", "synthetic"])
def test_every_pipeline_shares_the_splits_out(small_data, loader):
    """Two ranks, no process group needed (FFCV's distributed loader needs one: it runs in the
    torchrun tests above): train split evenly and completely, val/test each image exactly once."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from fastcifar.data import make_loaders, read_beton

    cpu = torch.device("cpu")
    ranks = [make_loaders(small_data, cpu, 64, 0 if loader == "torch" else 1, seed=0, loader=loader, rank=r,
                          world_size=2) for r in (0, 1)]
    for split, total in [("train", 450), ("val", 50), ("test", 110)]:
        seen = [torch.cat([batch[2] for batch in rank[split]]).tolist() for rank in ranks]
        expected = [225, 225] if split == "train" else [-(-total // 2), total // 2]
        assert [len(s) for s in seen] == expected
        if loader != "synthetic":  # synthetic has no images to share, only the counts
            assert sorted(seen[0] + seen[1]) == sorted(read_beton(small_data / f"{split}.beton")["index"].tolist())
