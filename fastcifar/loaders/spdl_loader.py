"""The `spdl` pipeline: Meta's SPDL (`spdl.pipeline`, the `spdl` extra) over the decoded uint8 split — the source
the `torch` and `memory` loaders read. Thread-based stages in one process: the epoch's batches of indices are
the source, a gather stage copies each batch's uint8 images into one tensor (a torch copy, which runs without
the GIL) on `threads` threads, and the same batched device op as `ffcv` then normalises, pads, crops and flips
on the device in the training thread. That is `--loader spdl`: FFCV's structure (batched, device-side
augmentation) with SPDL's scheduler, so the pair compares the loaders and not two augmentations.

`spdl-per-image` (a forced variant for bench_loader) is SPDL's own idiom instead: per image, /255, normalise, pad
4, random crop and flip on the CPU in SPDL's threads (torch ops on 3x32x32 tensors: the GIL is held for most of
each image's Python work, shared with the training thread), then batched and copied to the device.

Both keep the loader contract: every image once per epoch, the order reshuffled every epoch from the seed, val
and test in order and only normalised; under torchrun train takes `distributed.train_shard`'s share and val/test
`eval_shard`'s, like every loader. Each stage's task count and seconds per epoch are kept in `stats`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..augment import IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomCropFlip
from ..beton_check import read_split
from ..distributed import eval_shard, rank_images, train_shard
from ..utils import UserError, usable_cpus

EXTRA = 'the spdl extra is not installed: pip install "fastcifar[spdl]" (or make spdl)'


def import_spdl():
    try:
        import spdl.pipeline as pipeline
    except ImportError:
        raise UserError(f"--loader spdl: {EXTRA}") from None
    return pipeline


def spdl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spdl-core")
    except PackageNotFoundError:
        return "absent"


def spdl_threads(device: torch.device, workers: int) -> int:
    """SPDL's thread pool, chosen as `ffcv_loader.pipeline_threads` chooses FFCV's: `workers` on a GPU device;
    on a CPU device the cores the model's torch threads leave idle, and at least one (`--workers` is the most
    it takes there)."""
    if device.type != "cpu":
        return workers
    return max(1, min(workers, usable_cpus() - torch.get_num_threads()))


class StageTimes:
    """Per stage: tasks and their seconds (the time inside each task, summed), kept per epoch."""

    def __init__(self):
        self.epochs: list[dict[str, dict[str, float]]] = []

    def factory(self, info) -> list:
        from spdl.pipeline import TaskHook

        stage = str(info.stage_name)
        epoch = self.epochs[-1]

        class Hook(TaskHook):
            @contextlib.asynccontextmanager
            async def task_hook(self, input_item=None):
                t0 = time.perf_counter()
                try:
                    yield
                finally:
                    row = epoch.setdefault(stage, {"tasks": 0, "seconds": 0.0})
                    row["tasks"] += 1
                    row["seconds"] += time.perf_counter() - t0

        return [Hook()]


class PerImage:
    """SPDL's idiom, per image on the CPU: /255, normalise, pad 4 with 0 after normalisation, random 32x32 crop,
    flip; each image's draw from (seed, epoch, position), so a thread's timing never changes a draw."""

    def __init__(self, seed: int):
        self.seed = seed
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, item: tuple[torch.Tensor, int, int]) -> torch.Tensor:
        image, epoch, position = item
        x = (image.permute(2, 0, 1).float().div(255) - self.mean) / self.std
        x = torch.nn.functional.pad(x, (4, 4, 4, 4))
        rng = np.random.default_rng((self.seed, epoch, position))
        top, left = rng.integers(0, 9, size=2)
        x = x[:, top:top + 32, left:left + 32]
        return x.flip(-1) if rng.random() < 0.5 else x


class SpdlSplit:
    """One split through an SPDL pipeline; yields (images, labels, indices) like every loader."""

    def __init__(self, path: Path, device: torch.device, batch_size: int, train: bool, seed: int,
                 compile_augment: bool, threads: int, rank: int = 0, world_size: int = 1, per_image: bool = False):
        self.pipeline_module = import_spdl()
        data = read_split(path)
        total = len(data["label"])
        if not train and world_size > 1:  # this rank's val/test images only (distributed.eval_shard)
            data = {k: v[eval_shard(total, rank, world_size)] for k, v in data.items()}
        self.pixels = torch.from_numpy(data["image"])  # N x 32 x 32 x 3 uint8, on the CPU
        self.labels = torch.from_numpy(data["label"])
        self.indices = torch.from_numpy(data["index"])
        self.device, self.batch_size, self.train = torch.device(device), batch_size, train
        self.rank, self.world_size, self.threads, self.per_image = rank, world_size, threads, per_image
        self.images = rank_images(total, train, rank, world_size)  # this rank's, per epoch
        self.augment = (RandomCropFlip(seed + rank, device, compile=compile_augment) if train
                        else Normalize(device))
        self.per_image_op = PerImage(seed + rank) if per_image and train else None
        self.generator = torch.Generator()  # the order's: the same seed on every rank
        self.generator.manual_seed(seed)
        self.stats = StageTimes()
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def _order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(self.images)
        order = torch.randperm(len(self.labels), generator=self.generator)
        if self.world_size > 1:
            order = torch.from_numpy(train_shard(order.numpy(), self.rank, self.world_size))
        return order

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.index_select(self.pixels, 0, idx)  # one copy, outside the GIL
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        return pixels, self.labels[idx], self.indices[idx]

    def _per_image(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        position, index = item
        return self.per_image_op((self.pixels[index], self.epoch, position)), int(self.labels[index]), int(
            self.indices[index])

    @staticmethod
    def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, indices = zip(*items, strict=True)
        return (torch.stack(images).contiguous(memory_format=torch.channels_last),
                torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64))

    def _build(self, order: torch.Tensor):
        builder = self.pipeline_module.PipelineBuilder()
        if self.per_image_op is None:
            batches = [order[s:s + self.batch_size] for s in range(0, self.images, self.batch_size)]
            builder.add_source(batches).pipe(self._gather, concurrency=self.threads, output_order="input",
                                              name="gather")
        else:
            builder.add_source(list(enumerate(order.tolist()))).pipe(
                self._per_image, concurrency=self.threads, output_order="input", name="augment_per_image").aggregate(
                self.batch_size, drop_last=False).pipe(self._collate, name="collate")
        builder.add_sink(buffer_size=max(2, self.threads))
        return builder.build(num_threads=self.threads, task_hook_factory=self.stats.factory)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        self.stats.epochs.append({})
        pipeline = self._build(self._order())
        with pipeline.auto_stop():
            for pixels, labels, indices in pipeline:
                if self.per_image_op is not None:
                    yield (pixels.to(self.device, non_blocking=True), labels.to(self.device),
                           indices.to(self.device))
                    continue
                x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory: channels_last
                yield self.augment(x), labels.to(self.device), indices.to(self.device)


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0, world_size: int = 1,
                 per_image: bool = False) -> dict[str, SpdlSplit]:
    threads = spdl_threads(torch.device(device), workers)
    return {split: SpdlSplit(data_dir / f"{split}.beton", device, batch_size, split == "train", seed,
                             compile_augment, threads, rank, world_size, per_image) for split in counts}
