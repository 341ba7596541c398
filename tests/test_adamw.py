"""The trainer's AdamW on a CPU is torch's fused one (optim.adamw); torch's for-loop and foreach give the same
steps within float32 rounding, and FASTCIFAR_ADAMW picks them for a process. Fixed gradients, not the model's:
AdamW's first steps move each weight by about lr * sign(gradient), so two runs whose gradients differ in the
last bit near zero drift apart by ~lr however exact the optimizer is."""

from __future__ import annotations

import pytest
import torch

from fastcifar.model import resnetv2_20
from fastcifar.optim import ADAMW, adamw
from fastcifar.utils import UserError

CPU = torch.device("cpu")


def steps(implementation: str, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("FASTCIFAR_ADAMW", implementation)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(p.detach().clone())
              for p in resnetv2_20().to(memory_format=torch.channels_last).parameters()]
    gen = torch.Generator().manual_seed(1)
    optimizer, chosen = adamw(params, CPU, lr=1e-3, weight_decay=1e-4)
    assert chosen == {"name": "AdamW", "fused": implementation == "fused", "implementation": implementation}
    for _ in range(5):
        for p in params:
            p.grad = 1e-2 * torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last
                                                                   if p.dim() == 4 else torch.contiguous_format)
        optimizer.step()
    return [p.detach() for p in params]


def test_fused_is_the_default_and_equals_torchs_other_two(monkeypatch):
    assert adamw([torch.nn.Parameter(torch.ones(2))], CPU, 1e-3, 1e-4)[1]["implementation"] == "fused"
    fused = steps("fused", monkeypatch)
    for other in set(ADAMW) - {"fused"}:
        for a, b in zip(fused, steps(other, monkeypatch), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_an_unknown_implementation_is_one_error(monkeypatch):
    monkeypatch.setenv("FASTCIFAR_ADAMW", "fast")
    with pytest.raises(UserError, match="FASTCIFAR_ADAMW=fast"):
        adamw([torch.nn.Parameter(torch.ones(2))], CPU, 1e-3, 1e-4)
