"""The data pipelines behind one function: `make_loaders(..., loader=NAME)`.

Every pipeline returns {'train', 'val', 'test'} loaders with the same contract: an iterable with
len() yielding (images, labels, indices) — float32 channels_last images, int64 labels and int64
source indices (the beton's `index` field), all on the device; `images` (the split's image count)
and `augment` (the device op, when the pipeline has one) as attributes. Train order is reshuffled
every epoch from the seed, val/test come in order, every image exactly once per epoch (the last
partial batch included), and only train is augmented — with the spec's normalise, pad 4 (with 0
after normalisation), random 32x32 crop and horizontal flip. One module per pipeline:

  ffcv       loaders/ffcv_loader.py       FFCV, batched device op in its pipeline (the default)
  torch      loaders/torch_loader.py      torch DataLoader, per-image CPU transforms (the conventional way)
  memory     loaders/memory_loader.py     the whole split on the device, the same device op (the upper bound)
  dali       loaders/dali_loader.py       NVIDIA DALI, its fused operators (optional extra)
  spdl       loaders/spdl_loader.py       Meta's SPDL pipeline, thread stages, the same device op (optional extra)
  synthetic  loaders/synthetic_loader.py  one fixed batch on the device: the compute-only floor
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .beton_check import MANIFEST, SPLITS, manifest_problem, read_split
from .loaders.ffcv_loader import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, LoaderThreadDied, make_loader
from .manifest import read_manifest
from .utils import UserError

__all__ = ["LOADERS", "LoaderThreadDied", "check_betons", "make_loader", "make_loaders", "read_beton",
           "split_sizes"]

LOADERS = ("ffcv", "torch", "memory", "dali", "spdl", "synthetic")


def check_betons(data_dir: Path) -> dict[str, int]:
    """Fail with one line naming the missing, stale or damaged file and the command that rebuilds it;
    return each split's image count. Hashes every beton against the manifest (under a second for the
    full set): a same-size beton of another split seed would otherwise leak validation images into
    training, silently."""
    problem = manifest_problem(Path(data_dir), check_hashes=True)
    if problem:
        raise UserError(
            f"{problem}; build the betons with: python tools/make_beton.py --data-dir {data_dir} "
            "[--source PATH/cifar-10-python.tar.gz] --force"
        )
    return split_sizes(data_dir)


def split_sizes(data_dir: Path) -> dict[str, int]:
    """Each split's image count, from the manifest (that `check_betons` has verified)."""
    manifest = read_manifest(Path(data_dir) / MANIFEST)
    return {split: manifest.split(split).images for split in SPLITS}


def read_beton(path: Path, fields: tuple[str, ...] = ("image", "label", "index")) -> dict[str, np.ndarray]:
    """Every record of a beton as numpy arrays, in file order (image: N x 32 x 32 x 3 uint8)."""
    return {f: v for f, v in read_split(path).items() if f in fields}


def make_loaders(
    data_dir: Path,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    seed: int = 0,
    compile_augment: bool = False,
    loader: str = "ffcv",
    rank: int = 0,
    world_size: int = 1,
    timings: dict | None = None,
    ffcv_inline: bool = False,
    ffcv_parallel: bool = False,
    spdl_per_image: bool = False,
) -> dict:
    """{'train', 'val', 'test'} loaders of pipeline `loader` over `data_dir`, after checking the betons.
    A batch larger than the training split is refused (a pipeline would allocate buffers for it).

    world_size > 1 (under torchrun): `batch_size` is this rank's share of the global batch; train
    yields this rank's share of the epoch's order (`distributed.train_shard`: the same order on every
    rank, padded so every rank takes as many steps), val/test this rank's images only
    (`distributed.eval_shard`: each image scored once), and the augmentation draws from seed + rank.
    ffcv_inline: FFCV's batches made in the training thread, not in its loader thread
    (`loaders.ffcv_loader._inline_epoch`); ffcv_parallel: FFCV's passes on `workers` threads even on a
    CPU device with no idle core (`loaders.ffcv_loader.pipeline_threads`); spdl_per_image: SPDL's per-image CPU
    augmentation instead of the batched device op (`loaders.spdl_loader`); all three for bench_loader.
    `timings`, when given, receives the seconds spent checking the betons and building the loaders."""
    if loader not in LOADERS:
        raise UserError(f"unknown loader {loader!r}: choose one of {', '.join(LOADERS)}")
    t0 = time.perf_counter()
    counts = check_betons(data_dir)
    checked = time.perf_counter()
    if batch_size > counts["train"]:
        raise UserError(f"--batch-size {batch_size} is larger than the training split ({counts['train']:,} images)")
    device = torch.device(device)
    args = (Path(data_dir), device, batch_size, workers, seed, compile_augment, counts, rank, world_size)
    if loader == "ffcv":
        from .loaders import ffcv_loader as module
    elif loader == "torch":
        from .loaders import torch_loader as module
    elif loader == "memory":
        from .loaders import memory_loader as module
    elif loader == "dali":
        from .loaders import dali_loader as module
    elif loader == "spdl":
        from .loaders import spdl_loader as module
    else:
        from .loaders import synthetic_loader as module
    forced = ({"inline": ffcv_inline, "parallel": ffcv_parallel} if loader == "ffcv" else
              {"per_image": spdl_per_image} if loader == "spdl" else {})
    loaders = module.make_loaders(*args, **forced)
    if timings is not None:  # start-up pieces, for the results JSON's `startup`
        timings.update(betons_check_s=checked - t0, loaders_s=time.perf_counter() - checked)
    return loaders
