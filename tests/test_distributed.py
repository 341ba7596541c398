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
from conftest import free_port

from fastcifar import distributed
from fastcifar.distributed import Ranks, eval_shard, gpu_shortage, ranks_from_env, train_shard
from fastcifar.model import resnetv2_20
from fastcifar.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, nproc: int = 2, timeout: int = 600, logs: Path | None = None,
             launch: tuple[str, ...] = ("--standalone",)) -> subprocess.CompletedProcess:
    """torchrun on this machine. With `logs`, every rank's stdout and stderr go to files of their own
    under it (`rank_output` reads them): several processes writing into one pipe interleave, so
    nothing is ever parsed from torchrun's merged output."""
    redirect = ["--log-dir", str(logs), "--redirects", "3"] if logs else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
                           *redirect, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def rank_output(logs: Path) -> dict[int, tuple[str, str]]:
    """{rank: (stdout, stderr)} from torchrun's --log-dir (DIR/<run id>/attempt_0/<rank>/std*.log)."""
    out = {}
    for stdout in sorted(logs.glob("*/attempt_0/*/stdout.log")):
        out[int(stdout.parent.name)] = (stdout.read_text(), (stdout.parent / "stderr.log").read_text())
    return out


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
    out, logs = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp-logs")
    proc = torchrun("-m", "fastcifar.train", "--device", "cpu", "--compile", "--epochs", "2",
                    "--max-steps-per-epoch", "3", "--data-dir", str(small_data), "--out", str(out),
                    "--run-name", "ddp", "--workers", "1", logs=logs)
    return proc, out, rank_output(logs)


def test_torchrun_trains_and_rank_0_alone_reports(ddp_run):
    proc, out, ranks = ddp_run
    assert proc.returncode == 0, {r: err[-3000:] for r, (_, err) in ranks.items()}
    assert sorted(p.name for p in out.iterdir()) == ["ddp.json", "ddp.pt"]
    result = json.loads((out / "ddp.json").read_text())
    assert result["env"]["world_size"] == 2
    assert (result["val_images"], result["test_images"]) == (50, 110)  # every image exactly once
    assert all(e["train_images"] == 3 * 128 for e in result["epochs"])  # 3 global batches of 128
    assert all(len(e["data_time_s_per_rank"]) == 2 for e in result["epochs"])
    assert sorted(ranks) == [0, 1]
    assert ranks[0][0].count("epoch  1/2") == 1 and ranks[0][0].count("processes (torchrun)") == 1
    assert ranks[1][0] == ""  # rank 1 prints nothing


def test_torchrun_test_accuracy_is_that_of_the_saved_weights(ddp_run, small_data):
    proc, out, _ = ddp_run
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


@pytest.fixture(scope="module")
def one_process_step(small_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The parameters after the first optimizer step of one process (tests/helpers/ddp_first_step.py)."""
    one = tmp_path_factory.mktemp("one") / "one.pt"
    alone = subprocess.run([sys.executable, str(HELPERS / "ddp_first_step.py"), str(small_data), str(one)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert alone.returncode == 0, alone.stderr[-2000:]
    a = torch.load(one)
    torch.manual_seed(0)
    initial = dict(resnetv2_20().named_parameters())
    assert a.keys() == initial.keys()
    assert all(not torch.equal(a[n], initial[n]) for n in a)  # the step moved every parameter
    return a


def assert_same_step(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-5


def test_first_step_of_two_processes_equals_one_process(small_data, tmp_path, one_process_step):
    """DDP averages the ranks' gradients: one global batch of 128 split 64 + 64 takes the same AdamW
    step as 128 in one process (BatchNorm on running statistics: see the helper's docstring)."""
    two = tmp_path / "two.pt"
    pair = torchrun(str(HELPERS / "ddp_first_step.py"), str(small_data), str(two))
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert_same_step(one_process_step, torch.load(two))


def two_nodes(*args: str, logs: Path, timeout: int = 600) -> list[int]:
    """Two torchrun launches of one process each, as two machines would start them (docs/distributed.md):
    --nnodes 2, c10d rendezvous on 127.0.0.1, node 0 hosting it (is_host), gloo."""
    port = free_port()
    procs = []
    for node in (0, 1):
        folder = logs / f"node{node}"
        folder.mkdir(parents=True)
        launch = ("--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastcifar-test",
                  "--rdzv-conf", f"is_host={int(node == 0)}", "--log-dir", str(folder), "--redirects", "3")
        with open(folder / "agent.log", "w") as agent:  # a file, not a pipe: nothing blocks on a full pipe
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch,
                                           "--nproc_per_node=1", *args], stdout=agent, stderr=subprocess.STDOUT,
                                          cwd=ROOT, env=ENV))
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # a no-op for a process that has exited
    for node, code in enumerate(codes):
        folder = logs / f"node{node}"
        workers = "".join(err[-2000:] for _, err in rank_output(folder).values())
        assert code == 0, (node, (folder / "agent.log").read_text()[-2000:], workers)
    return codes


def test_two_nodes_train_like_two_processes(small_data, tmp_path, one_process_step):
    """Multi-node torchrun on one machine: one results JSON (node 0's rank 0), every val/test image
    scored once, and the first step equal to one process's."""
    out = tmp_path / "out"
    two_nodes("-m", "fastcifar.train", "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "2",
              "--data-dir", str(small_data), "--out", str(out), "--run-name", "nodes", "--workers", "1",
              logs=tmp_path / "train-logs")
    assert sorted(p.name for p in out.iterdir()) == ["nodes.json", "nodes.pt"]
    result = json.loads((out / "nodes.json").read_text())
    assert result["env"]["world_size"] == 2
    assert (result["val_images"], result["test_images"]) == (50, 110)
    assert result["epochs"][0]["train_images"] == 2 * 128
    step = tmp_path / "step.pt"
    two_nodes(str(HELPERS / "ddp_first_step.py"), str(small_data), str(step), logs=tmp_path / "step-logs")
    assert_same_step(one_process_step, torch.load(step))


def test_one_process_under_torchrun_takes_the_distributed_path(small_data, tmp_path):
    """torchrun --nproc_per_node=1: a process group (gloo here, NCCL on a GPU) and DDP with one rank,
    so the distributed path can be exercised on a machine with one GPU."""
    proc = torchrun("-m", "fastcifar.train", "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "2",
                    "--data-dir", str(small_data), "--out", str(tmp_path), "--run-name", "one", "--workers", "1",
                    nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "one.json").read_text())
    assert result["env"]["process_group"] == "gloo" and result["env"]["world_size"] == 1
    assert (result["val_images"], result["test_images"]) == (50, 110)


def test_a_failing_rank_ends_the_run_quickly(small_data, tmp_path):
    """Rank 1 fails inside training; the helper writes the moment into a file of its own (never into
    the output torchrun merges from both ranks), and the whole run must end within a minute of it."""
    failed_file = tmp_path / "failed_at"
    out = tmp_path / "out"
    start = time.time()
    proc = torchrun(str(HELPERS / "ddp_fail.py"), str(failed_file), "--device", "cpu", "--epochs", "1",
                    "--max-steps-per-epoch", "2", "--data-dir", str(small_data), "--out", str(out), "--workers", "1",
                    timeout=300)
    end = time.time()
    assert proc.returncode != 0 and failed_file.is_file(), proc.stderr[-3000:]
    failed_at = float(failed_file.read_text())
    assert start < failed_at < end and end - failed_at < 60, (end - failed_at, proc.stderr[-3000:])
    assert not list(out.glob("*.json")) and not list(out.glob("*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_ranks_without_gpus_each_say_one_line(small_data, tmp_path):
    """Each rank, started as torchrun starts it, says it in one line and exits 2 on its own, before any
    collective (so none waits for another). Each rank runs as its own process here: under torchrun
    the first rank to exit gets the other terminated, so which of them is reported as exiting 2 is
    a race that no assertion may depend on."""
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for rank in (0, 1):
        proc = subprocess.run([sys.executable, "-m", "fastcifar.train", "--device", "cuda", "--data-dir",
                               str(small_data)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastcifar.train: error:"), proc.stderr[-2000:]
        assert "CUDA is not available" in lines[0]
    # under torchrun: the run fails, and whatever each rank wrote before it ended is that line, no traceback
    logs = tmp_path / "logs"
    proc = torchrun("-m", "fastcifar.train", "--device", "cuda", "--data-dir", str(small_data), timeout=300, logs=logs)
    assert proc.returncode != 0
    said = [err for _, err in rank_output(logs).values()]
    assert any("CUDA is not available" in err for err in said), said
    assert not [line for err in said for line in err.splitlines() if line.strip().startswith("Traceback")], said


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
