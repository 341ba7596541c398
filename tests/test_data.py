"""On-device augmentation and the FFCV loaders."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar.augment import IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomCropFlip, normalize_table
from fastcifar.data import make_loader, read_beton

CPU = torch.device("cpu")


def reference(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """The spec, one image at a time: /255, normalise, zero-pad 4, crop at the offset, maybe flip."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for image, (top, left), flip in zip(images, offsets.tolist(), flips.tolist(), strict=True):
        x = (image.float() / 255 - mean) / std
        x = torch.nn.functional.pad(x, (4, 4, 4, 4), value=0.0)[:, top:top + 32, left:left + 32]
        out.append(x.flip(-1) if flip else x)
    return torch.stack(out)


def test_batched_op_equals_per_image_reference_exactly():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augment = RandomCropFlip(seed=3, device=CPU)
    out = augment(images)
    assert out.dtype == torch.float32 and out.device == CPU
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference(images, augment.last_offsets, augment.last_flips))
    # the draws are really per image, not one per batch
    assert len({tuple(o) for o in augment.last_offsets.tolist()}) > 1
    assert 0 < int(augment.last_flips.sum()) < 64


def test_fused_cpu_op_equals_the_reference_at_every_offset_and_flip():
    """The numba pass (a warm-up candidate on CPU) gives the torch op's numbers bit for bit, for each
    of the 162 crop/flip candidates, on FFCV's layout (an NCHW view of NHWC memory)."""
    from fastcifar.augment import crop_flip_normalize
    from fastcifar.cpu_augment import FusedCropFlip

    grid = torch.tensor([(top, left) for top in range(9) for left in range(9)])
    offsets = torch.cat([grid, grid])
    flips = torch.cat([torch.zeros(81, dtype=torch.bool), torch.ones(81, dtype=torch.bool)])
    images = torch.randint(0, 256, (162, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    norm = Normalize()
    fused = FusedCropFlip(normalize_table(norm.mean, norm.std))(images, offsets, flips, norm.mean, norm.std, 4, 32)
    assert fused.is_contiguous(memory_format=torch.channels_last) and fused.dtype == torch.float32
    assert torch.equal(fused, reference(images, offsets, flips))
    assert torch.equal(fused, crop_flip_normalize(images, offsets, flips, norm.mean, norm.std, 4, 32))


def test_offsets_cover_all_81_positions_and_flip_rate_is_half():
    augment = RandomCropFlip(seed=0, device=CPU)
    offsets, flips = zip(*(augment.draw(1000, CPU) for _ in range(100)), strict=True)
    offsets, flips = torch.cat(offsets), torch.cat(flips)
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    assert len(counts) == 81 and int(counts.min()) > 0
    # uniform: 100,000 draws, expected 1234.6 per cell (sd ~35); a 6-sd band
    assert int(counts.min()) > 1234 - 210 and int(counts.max()) < 1235 + 210
    # flip rate: sd of the mean over 100,000 draws is 0.0016; tolerance 0.01
    assert abs(flips.float().mean().item() - 0.5) < 0.01


def test_padding_pixels_are_exactly_zero_after_normalisation():
    images = torch.full((200, 3, 32, 32), 255, dtype=torch.uint8)  # normalised value > 0 everywhere
    augment = RandomCropFlip(seed=1, device=CPU)
    out = augment(images)
    for image, (top, left) in zip(out, augment.last_offsets.tolist(), strict=True):
        inside = (32 - abs(top - 4)) * (32 - abs(left - 4))  # pixels taken from the real image
        assert int((image == 0).sum()) == 3 * (32 * 32 - inside)
        assert bool((image != 0).sum() == 3 * inside)


def test_normalize_only_for_eval():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = Normalize()(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference(images, torch.full((5, 2), 4), torch.zeros(5, dtype=torch.bool)))


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("batch_size", [10, 16])
def test_eval_loaders_yield_every_image_once_with_its_label(small_data, split, batch_size):
    beton = read_beton(small_data / f"{split}.beton")
    loader = make_loader(small_data / f"{split}.beton", CPU, batch_size=batch_size, workers=2)
    sizes = [len(batch[0]) for batch in loader]
    n = len(beton["index"])
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    images, labels, indices = _epoch(loader)
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64 and labels.device == CPU
    assert images.dtype == torch.float32 and images.shape == (n, 3, 32, 32)
    # sequential: file order, each index exactly once, labels as written
    assert indices.tolist() == beton["index"].tolist()
    assert labels.tolist() == beton["label"].tolist()
    expected = torch.from_numpy(beton["image"]).permute(0, 3, 1, 2)
    assert torch.equal(images, Normalize()(expected))


def test_train_loader_shuffles_covers_everything_and_is_seeded(small_data):
    path, n = small_data / "train.beton", 450
    first = make_loader(path, CPU, batch_size=64, workers=2, train=True, seed=7)
    again = make_loader(path, CPU, batch_size=64, workers=2, train=True, seed=7)
    other = make_loader(path, CPU, batch_size=64, workers=2, train=True, seed=8)
    epoch1, epoch1_again, epoch1_other = _epoch(first), _epoch(again), _epoch(other)
    epoch2 = _epoch(first)
    for images, _, indices in (epoch1, epoch2):
        assert sorted(indices.tolist()) == sorted(read_beton(path, ("index",))["index"].tolist())
        assert len(indices) == n and images.shape == (n, 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last)
    assert epoch1[2].tolist() != sorted(epoch1[2].tolist())  # random order
    assert epoch1[2].tolist() != epoch2[2].tolist()  # reshuffled every epoch
    for a, b in zip(epoch1, epoch1_again, strict=True):  # same seed: identical batches
        assert torch.equal(a, b)
    assert not torch.equal(epoch1[0], epoch1_other[0])  # other seed: other batches
    # labels still belong to their images' indices
    beton = read_beton(path, ("label", "index"))
    label_of = dict(zip(beton["index"].tolist(), beton["label"].tolist(), strict=True))
    assert epoch1[1].tolist() == [label_of[i] for i in epoch1[2].tolist()]


def test_val_and_test_loaders_are_built_when_first_iterated(small_data):
    """Off the start-up path: make_loaders builds (and numba-compiles) only train's FFCV Loader; val and
    test are built by their first iter(), before any batch is asked for, with the same contract."""
    from fastcifar.data import make_loaders

    loaders = make_loaders(small_data, CPU, 16, 2, seed=0)
    for split, images in [("val", 50), ("test", 110)]:
        deferred = loaders[split]
        assert deferred.inner is None and deferred.images == images and len(deferred) == -(-images // 16)
        batches = iter(deferred)
        assert deferred.inner is not None  # built at iter(), not inside the first (timed) next()
        indices = torch.cat([b[2] for b in batches]).tolist()
        assert indices == read_beton(small_data / f"{split}.beton", ("index",))["index"].tolist()
        assert len(deferred) == len(deferred.inner)


def test_leaving_an_epoch_early_stops_ffcvs_thread(small_data):
    """A process that exits while FFCV's thread is mid-batch aborts (exit 134): leaving an epoch
    early must leave no loader thread running."""
    loader = make_loader(small_data / "train.beton", CPU, batch_size=16, workers=2, train=True)
    before = set(threading.enumerate())
    batches = iter(loader)
    next(batches)
    started = set(threading.enumerate()) - before
    assert started  # FFCV's epoch thread, prefetching
    batches.close()  # what train_epoch does when --max-steps cuts the epoch
    assert not any(t.is_alive() for t in started)


PEEK = """
import sys
from fastcifar.data import make_loaders
loaders = make_loaders(sys.argv[1], "cpu", 16, 2, seed=0)
peeks = [iter(loaders[split]) for split in ("train", "val", "test")]  # never closed
batches = [next(it) for it in peeks]
print(len(batches))
"""


def test_a_script_that_peeks_at_a_batch_and_ends_exits_cleanly(small_data):
    """The documented API in a script: take one batch of each split and simply end. The generators are
    never closed, so FFCV's threads are still prefetching when the interpreter exits: they are
    stopped at exit, not killed mid-batch (which aborted with exit 134 in 3 of 4 runs)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", PEEK, str(small_data)], capture_output=True, text=True,
                          timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0 and proc.stdout.strip() == "3", (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("op", ["eager", "compiled", "fused"])
def test_augmented_batch_matches_reference_through_the_loader(small_data, op):
    """The module inside the FFCV pipeline sees the right pixels: recompute from the beton.
    Compiled (as under `train --compile`, inside FFCV's thread) or fused (numba, FFCV's thread) it
    must give the same numbers."""
    from fastcifar.cpu_augment import FusedCropFlip

    path = small_data / "train.beton"
    augment = RandomCropFlip(seed=0, device=CPU, compile=op == "compiled")
    if op == "fused":
        augment.op = FusedCropFlip(normalize_table(augment.normalize.mean, augment.normalize.std))
    loader = make_loader(path, CPU, batch_size=450, workers=1, train=True, seed=0, augment=augment)
    images, _, indices = next(iter(loader))
    beton = read_beton(path, ("image", "index"))
    position = {int(i): k for k, i in enumerate(beton["index"])}
    raw = torch.from_numpy(np.stack([beton["image"][position[int(i)]] for i in indices])).permute(0, 3, 1, 2)
    assert torch.equal(images, reference(raw, augment.last_offsets, augment.last_flips))


def test_ffcv_leaves_torchs_threads_alone(small_data):
    """FFCV 1.0.2 sets torch.set_num_threads process-wide: to 1 when imported, to num_workers in every
    Loader and every epoch's thread. A fresh process (ffcv is already imported here) set to 2 threads
    must still have 2 after reading, loading and iterating with 1 worker.
    And inside FFCV's thread, on the CPU, torch runs on one thread (`OneTorchThread`), seen from the
    device op, the pipeline's last stage."""
    code = ("import torch; torch.set_num_threads(2); from fastcifar.data import check_betons, make_loader; "
            "from fastcifar.augment import Normalize\n"
            "class Spy(Normalize):\n"
            "    def forward(self, x): seen.add(torch.get_num_threads()); return super().forward(x)\n"
            f"seen = set(); check_betons({str(small_data)!r}); "
            f"loader = make_loader({str(small_data / 'val.beton')!r}, torch.device('cpu'), 16, workers=1, "
            "augment=Spy()); assert sum(len(b[0]) for b in loader) == 50; print(torch.get_num_threads(), seen)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "2 {1}"
