"""The `memory` pipeline, the upper bound for a loader: the whole split as one uint8 tensor on the
device, batches by index from a seeded permutation, then the same batched device op as `ffcv` (the
approach of the fastest CIFAR trainers, e.g. airbench). No thread, no copy per batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..augment import Normalize, RandomCropFlip
from ..beton_check import read_split
from ..distributed import eval_shard, rank_images, train_shard


class DeviceSplit:
    """One split resident on the device; yields (images, labels, indices) like every loader."""

    def __init__(self, path: Path, device: torch.device, batch_size: int, train: bool, seed: int,
                 compile_augment: bool, rank: int = 0, world_size: int = 1):
        data = read_split(path)
        total = len(data["label"])
        if not train and world_size > 1:  # this rank's val/test images only (distributed.eval_shard)
            data = {k: v[eval_shard(total, rank, world_size)] for k, v in data.items()}
        self.pixels = torch.from_numpy(data["image"]).to(device).permute(0, 3, 1, 2)  # uint8, channels_last view
        self.labels = torch.from_numpy(data["label"]).to(device)
        self.indices = torch.from_numpy(data["index"]).to(device)
        self.batch_size, self.train, self.rank, self.world_size = batch_size, train, rank, world_size
        self.images = rank_images(total, train, rank, world_size)  # this rank's, per epoch
        self.augment = RandomCropFlip(seed + rank, device, compile=compile_augment) if train else Normalize(device)
        self.generator = torch.Generator(device=device)  # the order's: same seed on every rank
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        if self.train:
            order = torch.randperm(len(self.labels), device=device, generator=self.generator)
            if self.world_size > 1:
                order = torch.from_numpy(train_shard(order.cpu().numpy(), self.rank, self.world_size)).to(device)
        else:
            order = torch.arange(self.images, device=device)
        for start in range(0, self.images, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.augment(self.pixels[idx]), self.labels[idx], self.indices[idx]


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0,
                 world_size: int = 1) -> dict[str, DeviceSplit]:
    return {split: DeviceSplit(data_dir / f"{split}.beton", device, batch_size, split == "train", seed,
                               compile_augment, rank, world_size) for split in counts}
