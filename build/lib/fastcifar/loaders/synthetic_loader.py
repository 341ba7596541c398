"""The `synthetic` pipeline: no pipeline at all. One fixed batch of random normalised images (and
fixed labels) already on the device, handed out as many times as the real split has batches (the
last one partial, as there). It trains nothing meaningful: it measures the compute-only floor, so
that epoch(pipeline) / epoch(synthetic) - 1 is what a pipeline costs in a real run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..distributed import rank_images


class FixedBatch:
    def __init__(self, images: int, device: torch.device, batch_size: int, seed: int):
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        n = min(batch_size, images)
        self.batch = (
            torch.randn(n, 3, 32, 32, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 10, (n,), generator=generator).to(device),
            torch.arange(n).to(device),
        )
        self.images, self.batch_size, self.augment = images, batch_size, None

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.images, self.batch_size):
            n = min(self.batch_size, self.images - start)
            yield tuple(t[:n] for t in self.batch)


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0,
                 world_size: int = 1) -> dict[str, FixedBatch]:
    """Each rank gets as many images as the real pipelines give it (train padded, val/test not)."""
    per_rank = {split: rank_images(n, split == "train", rank, world_size) for split, n in counts.items()}
    return {split: FixedBatch(images, device, batch_size, seed + rank) for split, images in per_rank.items()}
