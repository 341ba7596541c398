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
import torch._inductor.config as inductor_config

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


def test_every_compilation_runs_on_the_main_thread_while_no_ffcv_thread_runs(small_data, tmp_path, monkeypatch):
    """Two epochs of `train --compile` in this process, with any compilation after the warm-ups made an
    error (in FFCV's thread it would kill the thread: the run fails instead of hanging). The training
    graphs are compiled before the first batch, the eval graph after the first epoch, before the first
    evaluation, and never while an FFCV thread is alive."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.callback import callback_handler

    from fastcifar import augment, train

    torch._dynamo.reset()
    monkeypatch.setattr(precompile, "STANCE_AFTER_WARM_UP", "fail_on_recompile")
    threads: list[str] = []
    ffcv_alive: list[bool] = []
    compile_times: list[float] = []
    first_batch_at: list[float] = []
    first_eval_at: list[float] = []

    def on_start(_args) -> None:
        threads.append(threading.current_thread().name)
        ffcv_alive.append(any(type(t).__name__ == "EpochIterator" and t.is_alive() for t in threading.enumerate()))
        compile_times.append(time.perf_counter())

    def spy(real, times):
        def call(*args, **kwargs):
            times.append(time.perf_counter())
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(train, "train_epoch", spy(train.train_epoch, first_batch_at))
    monkeypatch.setattr(train, "evaluate", spy(train.evaluate, first_eval_at))
    callback_handler.register_start_callback(on_start)
    try:
        with inductor_config.patch({"cpp.enable_kernel_profile": False}):  # a profiled run sets it: restored
            code = train.main(["--data-dir", str(small_data), "--device", "cpu", "--compile", "--epochs", "2",
                               "--out", str(tmp_path), "--run-name", "threads", "--profile", "--profile-steps",
                               "0,1,2", "--profile-dir", str(tmp_path / "profiles")])
    finally:
        callback_handler.remove_start_callback(on_start)
    assert code == 0
    assert threads and set(threads) == {threading.main_thread().name}, threads
    assert not any(ffcv_alive), ffcv_alive
    before_training = [t for t in compile_times if t < first_batch_at[0]]
    assert before_training and len(before_training) < len(compile_times)  # the eval graph: after epoch 1
    assert max(compile_times) < first_eval_at[0]  # and before the first evaluation
    # the device op (run in FFCV's thread) was compiled, the model too
    assert len(_debug_get_cache_entry_list(augment.crop_flip_normalize.__code__)) >= 1
    results = json.loads((tmp_path / "threads.json").read_text())
    assert [e["train_images"] for e in results["epochs"]] == [450, 450]
    assert results["test_images"] == 110 and results["val_images"] == 50
    assert 0 < results["eval_warm_up_s"] < results["warm_up_s"]
    # a profiled compiled run: Inductor's kernels visible (compiled with its kernel profile), attributed by graph
    ms = results["profile"]["breakdown"]["categories_ms"]
    assert results["env"]["inductor_kernel_profile"] is True
    # static graphs, one per batch size (450 = 3 x 128 + 66), all compiled before training: the eval graph's after
    assert results["graphs"]["dynamic"] is False and results["graphs"]["batch_sizes"] == [128, 66]
    assert results["graphs"]["at_end"] > results["graphs"]["unique_graphs"] >= 2
    assert ms["element-wise, compiled (forward)"] > 0 and ms["element-wise, compiled (backward)"] > 0


@pytest.mark.parametrize("faster", ["compiled", "eager", "fused"])
def test_the_device_op_keeps_the_fastest_op_and_compiles_the_other_sizes_only_when_kept(monkeypatch, faster):
    """warm_up times compiled, eager and (on CPU) the fused numba pass on the first (full) batch size,
    keeps the fastest and records every candidate's time; the remaining sizes are compiled only when
    the compiled op wins, each being one more compilation at start-up."""
    from fastcifar import augment
    from fastcifar.cpu_augment import FusedCropFlip

    op = augment.RandomCropFlip(0, CPU, compile=True)
    called: list[int] = []

    def compiled_op(images, *rest):
        called.append(images.shape[0])
        return augment.crop_flip_normalize(images, *rest)

    op.op = compiled_op
    name = {compiled_op: "compiled", augment.crop_flip_normalize: "eager"}.get
    monkeypatch.setattr(augment, "_ms_per_call",
                        lambda f, args: 1.0 if (name(f) or "fused") == faster else 2.0)
    op.warm_up([128, 72])
    assert op.choice["op"] == faster and op.choice["batch"] == 128
    assert {k for k in op.choice if k.endswith("_ms")} == {"compiled_ms", "eager_ms", "fused_ms"}
    assert called == ([72] if faster == "compiled" else [])
    assert isinstance(op.op, FusedCropFlip) == (faster == "fused")
    assert (op.op is compiled_op) == (faster == "compiled")


def test_a_measured_device_op_choice_is_reused_and_the_losers_are_not_compiled(monkeypatch, tmp_path):
    """The second warm-up with the same machine, versions, code, batch and threads takes the first one's
    measured winner from beside Inductor's cache: nothing is timed, and a losing compiled op never runs."""
    from fastcifar import augment
    from fastcifar.cpu_augment import FusedCropFlip

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(augment.CHOICE_CACHE_ENV, "1")
    monkeypatch.setattr(augment, "_ms_per_call", lambda f, args: 1.0 if isinstance(f, FusedCropFlip) else 2.0)
    first = augment.RandomCropFlip(0, CPU, compile=True)
    first.warm_up([128, 72])
    assert first.choice["op"] == "fused" and first.choice["measured"] == "now"

    def never(*args):
        raise AssertionError("timed or compiled although the choice was cached")

    monkeypatch.setattr(augment, "_ms_per_call", never)
    second = augment.RandomCropFlip(1, CPU, compile=True)
    second.op = never  # the compiled candidate: must not run
    second.warm_up([128, 72])
    assert isinstance(second.op, FusedCropFlip) and second.choice["measured"] == "earlier (cached)"
    assert second.choice["fused_ms"] == first.choice["fused_ms"]
    other = augment.RandomCropFlip(0, CPU, compile=True)  # another batch size: another key, measured anew
    monkeypatch.setattr(augment, "_ms_per_call", lambda f, args: 1.0)
    other.warm_up([64])
    assert other.choice["measured"] == "now"


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


def test_the_recorded_command_runs_a_module_with_m_and_a_script_by_its_path():
    from fastcifar.env import environment

    module = environment(CPU)["command"].split()
    script = environment(CPU, module="tools/bench_startup.py")["command"].split()
    assert module[1:3] == ["-m", "fastcifar.train"]
    assert script[1] == "tools/bench_startup.py" and "-m" not in script[:2]
