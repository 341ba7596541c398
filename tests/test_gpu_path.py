"""The GPU path's hazards, handled by design and checked on CPU: compilation only on the main thread
before the first batch, a dead loader thread fails instead of hanging, float32 by default, the total
time from the OS's process start, and the warm-up leaving the model as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from fastcifar import precompile
from fastcifar.data import LoaderThreadDied, make_loader
from fastcifar.env import seconds_since_process_start, set_float32_precision
from fastcifar.model import resnetv2_20
from fastcifar.precompile import batch_sizes, warm_up_model

CPU = torch.device("cpu")


def test_batch_sizes_of_a_loader():
    assert batch_sizes(45_000, 128) == [128, 72]  # 351 x 128 + 72
    assert batch_sizes(5_000, 128) == [128, 8]
    assert batch_sizes(10_000, 128) == [128, 16]
    assert batch_sizes(256, 128) == [128]
    assert batch_sizes(50, 128) == [50]
    assert batch_sizes(450, 128, max_steps=3) == [128]  # the cap stops before the partial batch
    assert batch_sizes(450, 128, max_steps=4) == [128, 66]


def test_every_compilation_runs_on_the_main_thread_before_the_first_batch(small_data, tmp_path, monkeypatch):
    """Two epochs of `train --compile` in this process, with any compilation after the warm-up made an
    error (in FFCV's thread it would kill the thread: the run fails instead of hanging)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.callback import callback_handler

    from fastcifar import augment, train

    torch._dynamo.reset()
    monkeypatch.setattr(precompile, "STANCE_AFTER_WARM_UP", "fail_on_recompile")
    threads: list[str] = []
    first_batch_at: list[float] = []
    compile_times: list[float] = []

    def on_start(_args) -> None:
        threads.append(threading.current_thread().name)
        compile_times.append(time.perf_counter())

    real_iter = train.train_epoch

    def spy(*args, **kwargs):
        first_batch_at.append(time.perf_counter())
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", spy)
    callback_handler.register_start_callback(on_start)
    try:
        code = train.main(["--data-dir", str(small_data), "--device", "cpu", "--compile", "--epochs", "2",
                           "--out", str(tmp_path), "--run-name", "threads"])
    finally:
        callback_handler.remove_start_callback(on_start)
    assert code == 0
    assert threads and set(threads) == {threading.main_thread().name}, threads
    assert max(compile_times) < first_batch_at[0]  # nothing compiled once the loaders started
    # the device op (run in FFCV's thread) was compiled for 128 and the last 66, the model too
    assert len(_debug_get_cache_entry_list(augment.crop_flip_normalize.__code__)) >= 1
    results = json.loads((tmp_path / "threads.json").read_text())
    assert [e["train_images"] for e in results["epochs"]] == [450, 450]
    assert results["test_images"] == 110 and results["val_images"] == 50


class Exploding(torch.nn.Module):
    """A device op that fails on the third batch, inside FFCV's thread."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom in the loader thread")
        return images.float()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_loader_thread_fails_the_epoch_instead_of_hanging(small_data):
    loader = make_loader(small_data / "train.beton", CPU, batch_size=64, workers=1, train=True,
                         augment=Exploding())
    t0 = time.perf_counter()
    seen = 0
    with pytest.raises(LoaderThreadDied, match="loader thread died mid-epoch: RuntimeError: boom in the loader thread"):
        for _ in loader:
            seen += 1
    assert seen == 2 and time.perf_counter() - t0 < 60


def test_warm_up_restores_the_model_and_touches_no_generator():
    torch.manual_seed(0)
    model = resnetv2_20().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    warm_up_model(model, model, CPU, train_sizes=[8, 3], eval_sizes=[5])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics put back
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state()) and model.training


def test_float32_by_default_and_tf32_only_when_asked():
    try:
        strict = set_float32_precision(CPU, tf32=False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert strict["float32_matmul_precision"] == "highest" and strict["tf32"] is False
        loose = set_float32_precision(CPU, tf32=True)
        assert torch.backends.cudnn.allow_tf32 and loose["float32_matmul_precision"] == "high"
    finally:
        set_float32_precision(CPU, tf32=False)


def test_total_time_counts_from_the_process_start():
    """A child that sleeps 1.5 s before importing anything of ours still reports it."""
    code = "import time; time.sleep(1.5); from fastcifar.env import seconds_since_process_start as s; print(s())"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    wall = time.perf_counter() - t0
    reported = float(out.stdout.strip())
    assert 1.5 <= reported <= wall + 0.02
    assert 0 < seconds_since_process_start() < 24 * 3600
