"""The `torch` pipeline, the conventional way and the benchmark's own PyTorch reference's:
`torch.utils.data.DataLoader` over the decoded uint8 images, per-image CPU transforms in `workers`
processes — torchvision's ToTensor -> Normalize -> Pad(4) -> RandomCrop(32) -> RandomHorizontalFlip
when torchvision is installed (the `vision` extra), else the same steps in plain torch — pinned
memory on CUDA, persistent workers, then `.to(device, non_blocking=True)` and channels_last."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..beton_check import read_split
from ..distributed import eval_shard


class PlainTorchTransforms:
    """torchvision's ToTensor -> Normalize [-> Pad(4) -> RandomCrop(32) -> RandomHorizontalFlip], per image."""

    def __init__(self, train: bool):
        self.train = train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image_hwc: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image_hwc).permute(2, 0, 1).float().div(255)
        x = (x - self.mean) / self.std
        if not self.train:
            return x
        x = torch.nn.functional.pad(x, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        x = x[:, top:top + 32, left:left + 32]
        return x.flip(-1) if torch.rand(1).item() < 0.5 else x


def conventional_transforms(train: bool) -> tuple[Callable[[np.ndarray], torch.Tensor], str]:
    """(transform, 'torchvision' or 'plain torch')."""
    try:
        from torchvision import transforms as T
    except Exception:  # not installed, or a build that fails to import beside this torch
        return PlainTorchTransforms(train), "plain torch"
    steps = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        steps += [T.Pad(4), T.RandomCrop(32), T.RandomHorizontalFlip()]
    return T.Compose(steps), "torchvision"


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform):
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i]), int(self.indices[i])


class TorchBatches:
    """A DataLoader whose batches arrive on the device as float32 channels_last."""

    def __init__(self, path: Path, device: torch.device, batch_size: int, workers: int, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        data = read_split(path)
        transform, self.transforms = conventional_transforms(train)
        dataset = ImageDataset(data["image"], data["label"], data["index"], transform)
        generator = torch.Generator()
        generator.manual_seed(seed + rank)  # the workers' seeds, so each rank draws its own crops
        # Under torchrun: torch's DistributedSampler for train (the order from `seed` on every rank,
        # reshuffled by set_epoch), this rank's unpadded eval shard for val/test.
        self.sampler = None
        if world_size > 1:
            self.sampler = (torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
                            if train else eval_shard(len(dataset), rank, world_size).tolist())
        self.device, self.augment, self.epoch = device, None, 0
        self.images = len(self.sampler) if self.sampler is not None else len(dataset)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=train and self.sampler is None, sampler=self.sampler,
            generator=generator, num_workers=workers, pin_memory=device.type == "cuda", drop_last=False,
            persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
        for images, labels, indices in self.loader:
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True))


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0,
                 world_size: int = 1) -> dict[str, TorchBatches]:
    return {split: TorchBatches(data_dir / f"{split}.beton", device, batch_size, workers, split == "train", seed,
                                rank, world_size)
            for split in counts}
