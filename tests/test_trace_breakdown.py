"""The breakdown every --profile run ends with, driven by trace fixtures in torch.profiler's own format: on a
CPU each op's own time inside the steps, by its name and its ranges; on CUDA the kernels on the GPU's timeline,
the backward's counted though another thread launched them, the GPU's idle time a category of its own."""

from __future__ import annotations

import gzip
import json

import pytest

from fastcifar import trace_breakdown as tb
from fastcifar.utils import UserError


def X(name, ts, dur, tid=1, cat="cpu_op", pid=10, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def write(path, events):
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": [{"ph": "M", "name": "process_name"}, *events]}))
    return path


def test_cpu_steps_split_by_own_time(tmp_path):
    step = [
        X("ProfilerStep#7", 0, 1000, cat="user_annotation"),
        X(tb.DATA_RANGE, 0, 100), X("aten::copy_", 10, 50),  # the range's own 50 µs: waiting, for data too
        X(tb.FORWARD_RANGE, 100, 300), X("aten::mkldnn_convolution", 110, 100),
        X("graph_0_cpp_fused_relu_0", 220, 50),
        X("## Call CompiledFxGraph abc ##", 280, 110), X("aten::empty_strided", 300, 10),
        X(tb.BACKWARD_RANGE, 400, 400), X("autograd::engine::evaluate_function: ConvolutionBackward0", 410, 290),
        X("aten::convolution_backward", 420, 230), X("graph_1_cpp_fused_threshold_backward_1", 700, 60),
        X(tb.OPTIMIZER_RANGE, 800, 150), X("aten::_fused_adamw_", 810, 90),
        X("EpochIterator.run", 0, 1000, tid=2),  # a loader thread: outside the steps
        X("aten::add_", 5000, 10),  # after the profiled steps
    ]
    second = [{**e, "ts": e["ts"] + 2000} for e in step[:-2]]
    second[0]["name"] = "ProfilerStep#8"
    result = tb.breakdown(write(tmp_path / "t.pt.trace.json", step + second))
    ms = result["categories_ms"]
    assert result["device"] == "cpu" and result["steps"] == 2 and result["step_ms"] == pytest.approx(1.0)
    assert list(ms) == tb.CATEGORIES
    assert ms == pytest.approx({
        tb.DATA: 0.100, "convolution forward": 0.100, "convolution backward": 0.230,
        "element-wise, compiled (forward)": 0.050, "element-wise, compiled (backward)": 0.060,
        "optimizer": 0.150, "allocation and graph overhead": 0.110,
        # the ranges' and the step's own time: 1000 - 100 - 100 - 50 - 110 - 290 - 60 - 150 + the engine's 60
        "other": 0.200})
    assert result["sum_ms"] == pytest.approx(result["step_ms"])  # nothing is a remainder: the parts are the steps


def test_cuda_kernels_on_the_gpu_timeline_whichever_thread_launched_them(tmp_path):
    launch = lambda ts, corr, tid=1: X("cudaLaunchKernel", ts, 5, tid=tid, cat="cuda_runtime", correlation=corr)  # noqa: E731
    kernel = lambda name, ts, dur, corr: X(name, ts, dur, tid=7, pid=0, cat="kernel", correlation=corr, stream=7)  # noqa: E731
    events = [
        X("ProfilerStep#3", 0, 1000, cat="user_annotation"),
        X("ProfilerStep#3", 90, 920, tid=7, pid=0, cat="gpu_user_annotation"),  # the GPU's copy: not a step
        X(tb.FORWARD_RANGE, 0, 300), launch(10, 1), launch(30, 2),
        # autograd's device thread: no step range around it
        X("autograd::engine::evaluate_function: ConvolutionBackward0", 400, 200, tid=2), launch(410, 3, tid=2),
        launch(430, 4, tid=2),
        X(tb.OPTIMIZER_RANGE, 700, 100), launch(710, 5),
        X(tb.DATA_RANGE, 900, 100), launch(905, 6),
        launch(2000, 8),  # after the step: its kernel does not count
        kernel("sm90_xmma_fprop_implicit_gemm_f32f32", 100, 100, 1), kernel("triton_poi_fused_relu_0", 200, 50, 2),
        kernel("sm90_xmma_dgrad_implicit_gemm_f32f32", 500, 150, 3),
        kernel("triton_red_fused_native_batch_norm_backward_1", 650, 50, 4),
        kernel("multi_tensor_apply_kernel", 800, 50, 5), kernel("triton_poi_fused_crop_flip_0", 950, 50, 6),
        kernel("triton_poi_fused_add_9", 2100, 50, 8),
    ]
    path = tmp_path / "t.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    result = tb.breakdown(path)
    assert result["device"] == "cuda" and result["steps"] == 1
    assert result["categories_ms"] == pytest.approx({
        tb.DATA: 0.05, "convolution forward": 0.1, "convolution backward": 0.15,
        "element-wise, compiled (forward)": 0.05, "element-wise, compiled (backward)": 0.05, "optimizer": 0.05,
        "allocation and graph overhead": 0.0, "other": 0.0, tb.IDLE: 0.45})
    assert result["step_ms"] == pytest.approx(0.9) == pytest.approx(result["sum_ms"])  # the GPU window: 100-1000


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"traceEvents": 3}', b"[]"])
def test_an_unreadable_trace_is_one_error(tmp_path, content):
    (tmp_path / "t.json").write_bytes(content)
    with pytest.raises(UserError, match="t.json"):
        tb.breakdown(tmp_path / "t.json")


def test_a_trace_without_steps_is_refused(tmp_path):
    with pytest.raises(UserError, match="no step range"):
        tb.breakdown(write(tmp_path / "t.json", [X("aten::add_", 0, 10)]))


def test_table_and_picture(tmp_path):
    result = {"device": "cpu", "steps": 2, "step_ms": 2.0, "sum_ms": 2.0,
              "categories_ms": {c: 2.0 / len(tb.CATEGORIES) for c in tb.CATEGORIES}}
    text = tb.table(result)
    assert "where the 2 profiled steps went" in text and all(c in text for c in tb.CATEGORIES)
    tb.plot(result, tmp_path / "b.png", "t")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
