"""Every data pipeline behind `make_loaders(..., loader=NAME)` keeps one contract: every image once
per epoch with its label, train reshuffled from the seed, val/test in order and only normalised, and
the spec's augmentation — each train image one of the 162 crop/flip candidates of its source, the
81 offsets uniform (chi-square) and the flip rate 0.5. DALI runs its CPU-only pipeline here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastcifar.augment import Normalize
from fastcifar.data import make_loaders, read_beton
from fastcifar.utils import UserError

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ["ffcv", "torch", "memory", "dali", "spdl", "spdl-per-image"]
EXTRA = {"dali": "nvidia.dali", "spdl": "spdl.pipeline", "spdl-per-image": "spdl.pipeline"}
FORCED = {"spdl-per-image": ("spdl", {"spdl_per_image": True})}  # bench_loader's variant: SPDL's own idiom
# chi-square, 80 degrees of freedom (81 offsets), p = 0.001: a fair draw exceeds it once in 1,000 runs
CHI2_80_P001 = 124.84


def candidates(image_hwc: torch.Tensor) -> torch.Tensor:
    """The spec's 162 possible outputs for one image: normalise, zero-pad 4, each of the 81 32x32
    crops, each unflipped (0-80) and flipped (81-161); crop k is at offset (k // 9, k % 9)."""
    x = Normalize()(image_hwc.permute(2, 0, 1)[None])[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    crops = padded.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(81, 3, 32, 32)
    return torch.cat([crops, crops.flip(-1)])


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


@pytest.fixture(scope="module")
def sources(small_data) -> dict:
    return {split: read_beton(small_data / f"{split}.beton") for split in ("train", "val", "test")}


@pytest.mark.parametrize("loader", PIPELINES)
def test_pipeline_contract_and_spec_augmentation(small_data, sources, loader):
    if loader in EXTRA:
        pytest.importorskip(EXTRA[loader], reason=f"the {loader.split('-')[0]} extra is not installed")
    base, forced = FORCED.get(loader, (loader, {}))
    loaders = make_loaders(small_data, CPU, batch_size=64, workers=2, seed=5, loader=base, **forced)
    for split in ("val", "test"):  # in order, every image once, plain normalisation
        images, labels, indices = epoch(loaders[split])
        src = sources[split]
        assert indices.tolist() == src["index"].tolist() and labels.tolist() == src["label"].tolist()
        expected = Normalize()(torch.from_numpy(src["image"]).permute(0, 3, 1, 2))
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert len(loaders[split]) == -(-len(src["index"]) // 64)

    train = sources["train"]
    position = {int(i): k for k, i in enumerate(train["index"])}
    orders, draws = [], []
    for _ in range(4):
        images, labels, indices = epoch(loaders["train"])
        assert sorted(indices.tolist()) == sorted(train["index"].tolist())  # every image once
        assert labels.tolist() == [int(train["label"][position[int(i)]]) for i in indices]
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        orders.append(indices.tolist())
        for out, index in zip(images, indices.tolist(), strict=True):
            source = torch.from_numpy(train["image"][position[index]])
            error, k = (candidates(source) - out).abs().amax((1, 2, 3)).min(0)
            assert error <= 1e-5, (loader, index, float(error))
            draws.append(int(k))
    assert len({tuple(o) for o in orders}) == 4 and orders[0] != sorted(orders[0])  # shuffled, reshuffled
    draws_t = torch.tensor(draws)
    counts = torch.bincount(draws_t % 81, minlength=81).double()
    expected = len(draws) / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_80_P001, (loader, chi2, counts.tolist())
    flip_rate = float((draws_t >= 81).double().mean())
    assert abs(flip_rate - 0.5) < 0.05, flip_rate  # 1,800 draws: sd 0.012

    again = make_loaders(small_data, CPU, batch_size=64, workers=2, seed=5, loader=base, **forced)["train"]
    first_again = epoch(again)
    assert first_again[2].tolist() == orders[0]  # same seed, same order


def test_ffcv_inline_makes_the_same_batches_in_the_callers_thread(small_data):
    """FFCV without its loader thread (bench_loader's ffcv-inline): the same batches as with it, same seed,
    and no thread started while an epoch runs."""
    threaded, inline = (make_loaders(small_data, CPU, batch_size=64, workers=2, seed=3, loader="ffcv",
                                     ffcv_inline=flag)["train"] for flag in (False, True))
    for _ in range(2):  # two epochs: the order reshuffled alike
        before = set(threading.enumerate())
        batches = iter(inline)
        first = next(batches)
        assert not set(threading.enumerate()) - before  # no thread started (FFCV's EpochIterator's never is)
        got = [first, *batches]
        want = list(threaded)
        assert len(got) == len(want) == len(inline)
        for (x, y, i), (x2, y2, i2) in zip(got, want, strict=True):
            assert torch.equal(i, i2) and torch.equal(y, y2)
            torch.testing.assert_close(x, x2, atol=1e-6, rtol=0)  # the device op may differ (measured choice)


def test_ffcv_threads_take_only_the_cores_the_model_leaves_idle_on_a_cpu(monkeypatch):
    from fastcifar.loaders.ffcv_loader import pipeline_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for cores, expected in ((2, 1), (3, 1), (4, 2), (16, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert pipeline_threads(CPU, 2) == expected, cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert pipeline_threads(CPU, 2, parallel=True) == 2  # bench_loader's ffcv-parallel: forced
    assert pipeline_threads(torch.device("cuda"), 3) == 3  # a GPU device: the model leaves the cores idle


def test_spdl_threads_are_chosen_as_ffcvs(monkeypatch):
    from fastcifar.loaders.spdl_loader import spdl_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for cores, expected in ((2, 1), (4, 2), (16, 3)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert spdl_threads(CPU, 3) == expected, cores
    assert spdl_threads(torch.device("cuda"), 3) == 3


def test_spdl_records_each_stages_tasks_per_epoch(small_data):
    pytest.importorskip("spdl.pipeline", reason="the spdl extra is not installed")
    train = make_loaders(small_data, CPU, batch_size=64, workers=2, seed=1, loader="spdl")["train"]
    for _ in range(2):
        list(train)
    assert [e["gather"]["tasks"] for e in train.stats.epochs] == [len(train)] * 2
    assert all(e["gather"]["seconds"] > 0 for e in train.stats.epochs)


def test_synthetic_is_one_fixed_batch(small_data):
    loaders = make_loaders(small_data, CPU, batch_size=128, workers=2, loader="synthetic")
    batches = list(loaders["train"])
    assert [len(b[0]) for b in batches] == [128, 128, 128, 66] and len(loaders["train"]) == 4
    assert torch.equal(batches[0][0][:66], batches[3][0]) and torch.equal(batches[0][0], batches[1][0])
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_unknown_loader_and_missing_dali(small_data, monkeypatch):
    with pytest.raises(UserError, match="unknown loader 'nope': choose one of ffcv, torch, memory, dali, spdl, "
                                        "synthetic"):
        make_loaders(small_data, CPU, loader="nope")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(UserError, match=r'--loader dali needs NVIDIA DALI.*pip install "fastcifar\[dali\]"'):
        make_loaders(small_data, CPU, loader="dali")
    monkeypatch.setitem(sys.modules, "spdl.pipeline", None)
    with pytest.raises(UserError, match=r'--loader spdl: the spdl extra is not installed: pip install "fastcifar'):
        make_loaders(small_data, CPU, loader="spdl")


@pytest.mark.parametrize("loader", ["torch", "memory", "dali", "spdl", "synthetic"])
def test_trainer_runs_every_loader(small_data, tmp_path, loader):
    if loader in EXTRA:
        pytest.importorskip(EXTRA[loader], reason=f"the {loader} extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "fastcifar.train", "--data-dir", str(small_data), "--device", "cpu", "--epochs", "1",
         "--max-steps-per-epoch", "2", "--loader", loader, "--out", str(tmp_path), "--run-name", loader],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / f"{loader}.json").read_text())
    assert results["config"]["loader"] == loader and results["env"]["loader"] == loader
    assert f"[{loader}] epoch  1/1" in result.stdout and results["epochs"][0]["train_images"] == 256
    assert ("trains nothing meaningful" in result.stdout) == (loader == "synthetic")
    # the torch pipeline names the transforms that ran (torchvision's, or the plain-torch fallback)
    assert (results["env"].get("torch_transforms") in ("torchvision", "plain torch")) == (loader == "torch")
