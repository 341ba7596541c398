"""The training step's limit from its own parts (`step_breakdown`'s part 3): every distinct convolution of
the model alone at its shape, forward and exactly the backward kernels the step runs (the stem computes no
input gradient); the memory bandwidth the element-wise kernels can reach; the bytes they must move, derived
from the activations' sizes. Each measured alone, as the best of `calls` calls on the run's threads."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .. import trace_breakdown
from ..devices import synchronize


def conv_shapes(model: nn.Module, batch: int, device: torch.device) -> list[dict]:
    """Every convolution of the model with the shape it sees, counted per distinct shape."""
    seen: dict[tuple, dict] = {}
    hooks = []
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

    def hook(module: nn.Conv2d, inputs, output) -> None:
        key = (tuple(inputs[0].shape), module.out_channels, module.kernel_size, module.stride, module.padding,
               module is first)
        entry = seen.setdefault(key, {"input": list(inputs[0].shape), "out_channels": module.out_channels,
                                      "kernel": list(module.kernel_size), "stride": list(module.stride),
                                      "padding": list(module.padding), "input_grad": module is not first,
                                      "count": 0})
        entry["count"] += 1

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return list(seen.values())


def best_ms(call: Callable, device: torch.device, calls: int) -> float:
    call()
    best = float("inf")
    for _ in range(calls):
        synchronize(device)
        t0 = time.perf_counter()
        call()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def _one_conv(s: dict, device: torch.device, calls: int) -> dict:
    """One convolution shape alone: its forward, and the backward kernels the step runs, the best of `calls`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*s["input"], generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(s["out_channels"], s["input"][1], *s["kernel"], generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    y = nn.functional.conv2d(x, w, stride=s["stride"], padding=s["padding"])
    g = torch.randn(y.shape, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    mask = [s["input_grad"], True, False]  # no input gradient for the stem; no bias
    fwd = best_ms(lambda: nn.functional.conv2d(x, w, stride=s["stride"], padding=s["padding"]), device, calls)
    bwd = best_ms(lambda: torch.ops.aten.convolution_backward(
        g, x, w, None, s["stride"], s["padding"], [1, 1], False, [0, 0], 1, mask), device, calls)
    flops = 2 * y.numel() * s["input"][1] * s["kernel"][0] * s["kernel"][1]
    return {**s, "forward_ms": fwd, "backward_ms": bwd, "forward_flops": flops,
            "backward_flops": flops * (2 if s["input_grad"] else 1)}


def conv_limit(shapes: list[dict], device: torch.device, calls: int) -> list[dict]:
    """Each distinct convolution alone."""
    return [_one_conv(s, device, calls) for s in shapes]


def _triad(nbytes: int, device: torch.device, calls: int) -> dict:
    """A triad a = b + 2c over float32 arrays of `nbytes` each, best of `calls` on the run's threads: its ms and
    GB/s (bytes moved: two reads and one write)."""
    n = max(1, nbytes // 4)
    b, c = torch.rand(n, device=device), torch.rand(n, device=device)
    a = torch.empty_like(b)
    ms = best_ms(lambda: torch.add(b, c, alpha=2.0, out=a), device, calls)
    return {"gbs": 3 * n * 4 / (ms / 1e3) / 1e9, "ms": ms}


def bandwidth_gbs(device: torch.device, mib: int = 256, calls: int = 30) -> dict:
    """Memory bandwidth on the run's threads: the triad over `mib` MiB per array (DRAM's, for a large `mib`)."""
    triad = _triad(mib * 2**20, device, calls)
    return {"gbs": triad["gbs"], "what": f"triad a = b + 2c over {mib} MiB float32 arrays, best of {calls}",
            "ms": triad["ms"]}


def elementwise_bytes(model: nn.Module, batch: int, device: torch.device) -> dict:
    """The compiled element-wise kernels' memory traffic, derived from the activations' sizes (a lower
    bound: what they must move at least). Forward: each BatchNorm'd activation read twice (its statistics,
    then normalise + ReLU) and written once; each block's residual add two reads and one write. Backward:
    each BatchNorm'd activation's gradient, input and output read and one gradient written (4 passes);
    each add's gradient read once and written twice. `by_size`: the same bytes per activation size, the size
    its kernels stream through (a 2 MiB activation moves at cache speed, a 32 MiB one at DRAM's)."""
    sizes: dict[int, list[int]] = {}  # activation bytes -> [forward bytes, backward bytes]

    def count(forward: int, backward: int):
        def hook(mod, i, o) -> None:
            n = o.numel() * o.element_size()
            entry = sizes.setdefault(n, [0, 0])
            entry[0] += forward * n
            entry[1] += backward * n
        return hook

    hooks = [m.register_forward_hook(count(3, 4)) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks += [m.register_forward_hook(count(3, 3)) for m in model.modules() if type(m).__name__ == "PreActBlock"]
    with torch.no_grad():
        model(torch.zeros(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return {"forward": sum(f for f, _ in sizes.values()), "backward": sum(b for _, b in sizes.values()),
            "by_size": [{"activation_bytes": n, "forward": f, "backward": b} for n, (f, b) in sorted(sizes.items())],
            "how": " ".join(elementwise_bytes.__doc__.split())}


def bandwidth_by_size(sizes: list[int], device: torch.device, calls: int = 30) -> list[dict]:
    """The triad's bandwidth with arrays of each activation size: what the element-wise kernels can reach on
    tensors that size (the larger sizes stream from DRAM, the smaller stay in the caches)."""
    return [{"activation_bytes": nbytes, **_triad(nbytes, device, calls)} for nbytes in sizes]


def elementwise_ms(traffic: dict, bandwidths: list[dict]) -> float:
    """The element-wise part of the limit: each activation size's bytes at that size's bandwidth."""
    gbs = {b["activation_bytes"]: b["gbs"] for b in bandwidths}
    return sum(1e3 * (t["forward"] + t["backward"]) / (gbs[t["activation_bytes"]] * 1e9) for t in traffic["by_size"])


LAYOUT_COPIES = ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")
LAYOUT_COPIES_SET = frozenset(LAYOUT_COPIES)
BACKWARD = "aten::convolution_backward"


def in_step(events: list[dict], shapes: list[dict], steps: int) -> dict:
    """Each convolution shape's time inside the profiled steps (ms per step, from a trace recorded with shapes),
    beside its time alone: where a step's convolutions lose against the limit; and the layout conversions inside
    `convolution_backward` (the copies a channels-last backward would need when its operands' layouts differ),
    own time per step: whether those are the loss."""
    def key(dims: list, w: int) -> tuple | None:
        return (tuple(dims[w - 1][1:]), tuple(dims[w])) if len(dims) > w and dims[w] and dims[w - 1] else None

    forward: dict[tuple, float] = {}
    backward: dict[tuple, float] = {}
    for e in events:
        dims = (e.get("args") or {}).get("Input Dims") or []
        if e["name"] == "aten::convolution" and (k := key(dims, 1)):
            forward[k] = forward.get(k, 0.0) + e["dur"] / 1e3 / steps
        elif e["name"] == BACKWARD and (k := key(dims, 2)):
            backward[k] = backward.get(k, 0.0) + e["dur"] / 1e3 / steps
    rows = []
    for s in shapes:
        k = (tuple(s["input"][1:]), (s["out_channels"], s["input"][1], *s["kernel"]))
        if k in forward and k in backward:
            rows.append({"input": s["input"], "out_channels": s["out_channels"], "kernel": s["kernel"],
                         "stride": s["stride"], "count": s["count"], "step_forward_ms": forward[k],
                         "step_backward_ms": backward[k], "alone_forward_ms": s["forward_ms"] * s["count"],
                         "alone_backward_ms": s["backward_ms"] * s["count"]})

    # each event's enclosing ranges, innermost first, by the classifier's own nesting: a copy counts when a
    # convolution_backward encloses it and no other copy lies between them (to > _to_copy > copy_ once)
    trace_breakdown.nest(events)
    copies_ms = sum(e["dur"] for e in events if e["name"] in LAYOUT_COPIES and BACKWARD in e["_up"]
                    and not LAYOUT_COPIES_SET.intersection(e["_up"][:e["_up"].index(BACKWARD)])) / 1e3
    return {"shapes": rows, "layout_copies_in_backward_ms": copies_ms / steps,
            "how": " ".join(in_step.__doc__.split())}
