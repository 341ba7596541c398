"""Batched on-device augmentation: the last stage of the FFCV pipeline, after `ToDevice`.

Why one module and not per-image transforms: a batch of 128 CIFAR images is a single small tensor
on the device, so normalise + pad + crop + flip become one gather with no Python loop per image and
no trip back to the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 NCHW -> float32 (x / 255 - mean) / std, channels_last. Used alone for val/test."""

    def __init__(self, device: torch.device | str = "cpu", mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        opts = dict(dtype=torch.float32, device=torch.device(device))
        self.register_buffer("mean", torch.tensor(mean, **opts).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, **opts).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = (images.float() / 255 - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last)


class RandomCropFlip(nn.Module):
    """Normalise, zero-pad `pad` pixels, random `size` crop and random horizontal flip, per image.

    Padding happens after normalisation, so pad pixels are exactly 0 (the mean colour), as in the
    spec's reference. Each image draws its own offset (uniform over the (2*pad+1)^2 positions) and
    its own flip from a generator on the images' device, seeded once: same seed, same batches.
    """

    def __init__(self, seed: int, device: torch.device | str, pad: int = 4, size: int = 32,
                 flip_p: float = 0.5):
        super().__init__()
        self.normalize = Normalize(device)
        self.pad, self.size, self.flip_p = pad, size, flip_p
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)
        self.last_offsets: torch.Tensor | None = None  # (N, 2) rows, cols of the last batch
        self.last_flips: torch.Tensor | None = None  # (N,) bool

    def draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image crop offsets (N, 2) in [0, 2*pad] and flip flags (N,)."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), device=device, generator=self.generator)
        flips = torch.rand(n, device=device, generator=self.generator) < self.flip_p
        return offsets, flips

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        offsets, flips = self.draw(n, images.device)
        self.last_offsets, self.last_flips = offsets, flips
        padded = nn.functional.pad(self.normalize(images), (self.pad,) * 4)
        return crop_flip(padded, offsets, flips, self.size)


def crop_flip(padded: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Gather a size x size window at each image's offset, mirrored where `flips`; channels_last out."""
    n, c = padded.shape[:2]
    ar = torch.arange(size, device=padded.device)
    rows = offsets[:, 0, None] + ar  # (N, size)
    cols = torch.where(flips[:, None], offsets[:, 1, None] + size - 1 - ar, offsets[:, 1, None] + ar)
    batch = torch.arange(n, device=padded.device)[:, None, None, None]
    chan = torch.arange(c, device=padded.device)[None, :, None, None]
    out = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    return out.contiguous(memory_format=torch.channels_last)
