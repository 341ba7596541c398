"""The device op fused for a CPU device, FFCV's way: one numba-compiled pass, parallel over the batch,
that pads (with 0 after normalisation), crops, flips and normalises uint8 NHWC pixels straight into a
float32 channels-last batch.

Why: on a CPU the torch op runs as a gather, a float conversion and three element-wise passes on one
thread inside FFCV's thread (see loaders/ffcv_loader.OneTorchThread); this writes every output value
once. Normalisation is a 256-entry table per channel that `augment.normalize_table` computes with the
torch op's own `normalize` and hands in (this module imports nothing of augment's), so each
value is the torch op's bit for bit. The random draws stay the torch generator's (`RandomCropFlip.draw`):
same seed, same crops and flips whichever op runs. A candidate of `RandomCropFlip.warm_up`, kept only
where it measures fastest.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True, nogil=True)
def _crop_flip_table(images, offsets, flips, table, pad, size, out):  # pragma: no cover (numba-compiled)
    n, h, w, c = images.shape
    for i in numba.prange(n):
        top = offsets[i, 0] - pad
        left = offsets[i, 1] - pad
        flip = flips[i]
        for r in range(size):
            row = top + r
            for j in range(size):
                col = left + (size - 1 - j if flip else j)
                if row < 0 or row >= h or col < 0 or col >= w:
                    for ch in range(c):
                        out[i, r, j, ch] = 0.0
                else:
                    for ch in range(c):
                        out[i, r, j, ch] = table[ch, images[i, row, col, ch]]


class FusedCropFlip:
    """crop_flip_normalize's signature and output (float32 NCHW, channels_last memory), on the CPU."""

    def __init__(self, table: np.ndarray):
        self.table = table  # (C, 256) float32: `augment.normalize_table`, the torch op's values

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, pad: int, size: int) -> torch.Tensor:
        nhwc = images.permute(0, 2, 3, 1)  # FFCV's NCHW view of NHWC memory: a free view back
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        n, c = images.shape[0], images.shape[1]
        out = torch.empty(n, size, size, c, dtype=torch.float32)
        _crop_flip_table(nhwc.numpy(), offsets.numpy(), flips.numpy(), self.table, pad, size, out.numpy())
        return out.permute(0, 3, 1, 2)  # NCHW, channels_last in memory
