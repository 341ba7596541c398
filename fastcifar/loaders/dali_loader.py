"""The `dali` pipeline: NVIDIA DALI over the same uint8 images, with its fused operators, on the GPU
when the device is CUDA and as a CPU-only pipeline (`device_id=None`) otherwise, wrapped for
PyTorch with DALI's own iterator. An optional extra: `pip install "fastcifar[dali]"` (`-e ".[dali]"` in a checkout).

The spec's augmentation in DALI's terms: `crop_mirror_normalize` anchors its crop window inside the
image, so a 32x32 crop of a 32x32 image never moves. So: normalise first (float, HWC), then `slice`
a 32x32 window at a per-image anchor in [-4, 4]^2 with out_of_bounds_policy="pad" and fill 0 — the
padding is the mean colour, exactly 0 after normalisation, as the spec pads — then mirror with
probability 0.5. The output stays HWC, so the NCHW view of it is channels_last for free.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..beton_check import read_split
from ..distributed import eval_shard, train_shard
from ..utils import UserError

INSTALL = 'pip install "fastcifar[dali]" (or -e ".[dali]" in a checkout; NVIDIA DALI, nvidia-dali-cuda120)'


def _dali():
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise UserError(f"--loader dali needs NVIDIA DALI, which is not installed: {INSTALL}") from None
    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


class _Source:
    """DALI's external source: each call returns the next batch (a list of HWC images, labels and
    indices); at the end of the split it raises StopIteration and draws the next epoch's order."""

    def __init__(self, data: dict, batch_size: int, train: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        """The epoch's order (the same on every rank), then this rank's share of it."""
        n = len(self.data["label"])
        if not self.train:
            return eval_shard(n, self.rank, self.world_size)
        return train_shard(np.random.default_rng(self.seed + self.epoch).permutation(n), self.rank, self.world_size)

    def __call__(self):
        if self.position >= len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._order()
            raise StopIteration
        take = self.order[self.position:self.position + self.batch_size]
        self.position += len(take)
        return ([self.data["image"][i] for i in take], [self.data["label"][i:i + 1] for i in take],
                [self.data["index"][i:i + 1] for i in take])


class DaliBatches:
    def __init__(self, path: Path, device: torch.device, batch_size: int, workers: int, train: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy = _dali()
        data = read_split(path)
        source = _Source(data, batch_size, train, seed, rank, world_size)
        self.device, self.images, self.batch_size, self.augment = device, len(source.order), batch_size, None
        gpu = device.type == "cuda"
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]

        device_id = (device.index or 0) if gpu else None  # None: DALI's CPU-only pipeline

        @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id, seed=seed + rank,
                      prefetch_queue_depth=2)
        def pipeline():
            images, labels, indices = fn.external_source(source=source, num_outputs=3,
                                                         layout=["HWC", "", ""], batch=True)
            if gpu:
                images = images.gpu()
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std)
            if train:
                anchor = fn.random.uniform(values=list(range(-4, 5)), shape=[2], dtype=types.INT32)
                images = fn.slice(images, start=anchor, shape=[32, 32], axis_names="HW", out_of_bounds_policy="pad",
                                  fill_values=0.0)
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            return images, labels, indices

        self.iterator = DALIGenericIterator([pipeline()], ["images", "labels", "indices"],
                                            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self.finished = True

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.finished:  # the last epoch was left early (--max-steps-per-epoch): finish it
            for _ in self.iterator:
                pass
        self.finished = False
        for (out,) in self.iterator:
            images = out["images"].to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory: channels_last
            yield (images, out["labels"].view(-1).to(self.device, torch.int64, non_blocking=True),
                   out["indices"].view(-1).to(self.device, torch.int64, non_blocking=True))
        self.finished = True


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0,
                 world_size: int = 1) -> dict[str, DaliBatches]:
    return {split: DaliBatches(data_dir / f"{split}.beton", device, batch_size, workers, split == "train", seed,
                               rank, world_size)
            for split in counts}
