"""The spec's optimizer, in one place: the trainer, the floor and the benchmarks build it here."""

from __future__ import annotations

import os

import torch

from .utils import UserError

# FASTCIFAR_ADAMW: torch's implementations; "torch-default" is what torch picks (for-loop on a CPU, foreach on CUDA)
ADAMW = {"fused": {"fused": True}, "torch-default": {}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def adamw(params, device: torch.device, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, dict]:
    """The spec's AdamW (betas 0.9/0.999), fused: one kernel per parameter group on CUDA (a step of many
    small kernels is launch-bound there) and on a CPU, where torch's default is its per-parameter loop
    (foreach is CUDA's default only): six ops and an `.item()` per parameter per step. FASTCIFAR_ADAMW
    picks another of torch's (`ADAMW`) for a whole process, as step_options and the ladder's plain rungs do.
    Returns the optimizer and what was chosen, for `env`."""
    implementation = os.environ.get("FASTCIFAR_ADAMW", "fused")
    if implementation not in ADAMW:
        raise UserError(f"FASTCIFAR_ADAMW={implementation} is not one of {', '.join(ADAMW)}")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay,
                                  **ADAMW[implementation])
    return optimizer, {"name": "AdamW", "fused": implementation == "fused", "implementation": implementation}
