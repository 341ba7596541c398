"""Batched on-device augmentation: the last stage of the FFCV pipeline, after `ToDevice`.

Why one module and not per-image transforms: a batch of 128 CIFAR images is a single small tensor
on the device, so normalise + pad + crop + flip become one gather with no Python loop per image and
no trip back to the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std: the spec's order of operations, so results match it exactly."""
    return (images.float() / 255 - mean) / std


class Normalize(nn.Module):
    """uint8 NCHW -> normalised float32 channels_last: val/test's whole device op (RandomCropFlip
    uses its mean/std buffers)."""

    def __init__(self, device: torch.device | str = "cpu", mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        opts = dict(dtype=torch.float32, device=torch.device(device))
        self.register_buffer("mean", torch.tensor(mean, **opts).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, **opts).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)


def crop_flip_normalize(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mean: torch.Tensor,
                        std: torch.Tensor, pad: int, size: int) -> torch.Tensor:
    """uint8 NCHW -> float32 channels_last: normalise, zero-pad `pad`, crop `size` at each image's
    (top, left) offset into the padded image, mirror where `flips`. One gather, no per-image loop."""
    n, c, h, w = images.shape
    # Output pixel (i, j) reads source pixel (i + top - pad, j + left - pad), j mirrored when
    # flipped; a coordinate outside the source is padding.
    ar = torch.arange(size, device=images.device)
    rows = offsets[:, 0, None] - pad + ar  # (N, size)
    cols = offsets[:, 1, None] - pad + torch.where(flips[:, None], size - 1 - ar, ar)
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    # Gather the uint8 pixels first (4x less memory than float), then normalise only the crop.
    pixels = images.reshape(n, c, h * w).gather(2, flat.view(n, 1, -1).expand(n, c, -1))
    out = normalize(pixels.view(n, c, size, size), mean, std)
    # Padding is exactly 0 after normalisation: the mean colour, as in the spec's reference.
    return torch.where(inside, out, 0.0).contiguous(memory_format=torch.channels_last)


def normalize_table(mean: torch.Tensor, std: torch.Tensor):
    """(C, 256) float32 numpy: every uint8 value of every channel through `normalize` itself, so a pass
    that looks values up (cpu_augment.FusedCropFlip) gives the torch op's numbers bit for bit."""
    import numpy as np

    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, mean.shape[1], 1, 256)
    return np.ascontiguousarray(normalize(values, mean.cpu(), std.cpu())[0, :, 0, :].numpy())


def _ms_per_call(op, args: tuple, calls: int = 10, rounds: int = 3) -> float:
    """Milliseconds per call, the best of `rounds` rounds of `calls` calls after one untimed call, the
    device synchronised at both ends of each round (one round of 5 calls picked the slower op once)."""
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    op(*args)
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            op(*args)
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1e3 * best


# FASTCIFAR_DEVICE_OP_CACHE=0: time the candidates in every run (the tests do, so each test measures).
CHOICE_CACHE_ENV = "FASTCIFAR_DEVICE_OP_CACHE"


def _choice_file() -> Path | None:
    """Where measured device-op choices are kept: beside Inductor's own cache (TORCHINDUCTOR_CACHE_DIR),
    so a cold compile cache is also a cold choice."""
    if os.environ.get(CHOICE_CACHE_ENV, "1") == "0":
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fastcifar" / "device_op_choice.json"


def choice_key(device: torch.device, batch: int, threads: int) -> str:
    """What a measured choice holds for: this machine exactly (CPU model, flags, CPUs; the GPU's name),
    torch's and numba's versions, the candidates' source code, the batch size and the thread count."""
    from importlib.metadata import PackageNotFoundError, version

    from .devices import device_name
    from .env import machine

    here = Path(__file__).resolve().parent
    code = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("augment.py", "cpu_augment.py"))).hexdigest()
    try:
        numba = version("numba")
    except PackageNotFoundError:
        numba = None
    mach = machine()
    parts = [mach["cpu_model"], sorted(k for k, on in mach["cpu_flags"].items() if on), mach["usable_cpus"],
             device_name(device), torch.__version__, numba, code, batch, threads]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _known_choices(path: Path) -> dict:
    """The cache file's entries; {} for a file that is absent, unreadable or not an object of entries."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return known if isinstance(known, dict) else {}


def read_choice(key: str, candidates: list[str], batch: int) -> dict | None:
    """The measured choice kept for `key`, or None when there is none that can be used (a damaged cache,
    an entry lacking a field or naming another candidate): a cache that cannot be used costs only the
    measurement again, never the run."""
    path = _choice_file()
    entry = _known_choices(path).get(key) if path else None
    times = [f"{name}_ms" for name in candidates]
    usable = (isinstance(entry, dict) and entry.get("op") in candidates and entry.get("batch") == batch
              and all(isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool) for k in times))
    return entry if usable else None


def write_choice(key: str, choice: dict) -> None:
    """Add one measured choice (atomically: concurrent runs each leave a whole file); a read-only cache
    only costs the next run its measurement."""
    from .utils import write_json_atomic

    path = _choice_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**_known_choices(path), key: choice})
    except OSError:
        pass


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RandomCropFlip(nn.Module):
    """Normalise, zero-pad `pad` pixels, random `size` crop and random horizontal flip, per image.

    Padding happens after normalisation, so pad pixels are exactly 0 (the mean colour), as in the
    spec's reference. Each image draws its own offset (uniform over the (2*pad+1)^2 positions) and
    its own flip from a generator on the images' device, seeded once: same seed, same batches.
    compile=True runs the op through torch.compile: one fused kernel/loop, same numbers bit for bit
    (faster on some CPUs, slower on others: see warm_up, which also times the fused numba pass on a
    CPU and keeps the fastest; compiled once per batch size). The op
    runs in FFCV's thread, so it is compiled by `warm_up` on the main thread before the first batch
    (see precompile.py), in the default mode only: CUDA-graph trees fail outside the thread that
    recorded them (pytorch#123177).
    """

    def __init__(self, seed: int, device: torch.device | str, pad: int = 4, size: int = 32,
                 flip_p: float = 0.5, compile: bool = False):
        super().__init__()
        self.normalize = Normalize(device)
        self.pad, self.size, self.flip_p = pad, size, flip_p
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(seed)
        self.compiled = compile
        self.choice: dict | None = None  # set by warm_up: which of compiled and eager ran faster here
        # The torch thread count of the thread the op will run in (None: the caller's). FFCV on the
        # CPU runs it on 1 (loaders/ffcv_loader.OneTorchThread); dynamo guards on the count, so the
        # warm-up compiles and times the op with that count, or FFCV's thread would recompile.
        self.threads: int | None = None
        self.op = torch.compile(crop_flip_normalize, mode="default") if compile else crop_flip_normalize
        # For tests only. On CUDA they live on FFCV's side stream and are overwritten by the next batch.
        self.last_offsets: torch.Tensor | None = None  # (N, 2) rows, cols of the last batch
        self.last_flips: torch.Tensor | None = None  # (N,) bool

    def warm_up(self, sizes: list[int], height: int = 32, width: int = 32) -> None:
        """Compile the op for each batch size on zeros laid out as FFCV hands them over (an NCHW view
        of NHWC uint8), without drawing from the generator: the run's augmentation is unchanged.
        Keep the fastest candidate (`choice`, timed on the first size, every candidate's time in it):
        the compiled op, the eager one and, on a CPU device, the fused numba pass (cpu_augment.py).
        Measured, not chosen by CPU name: the compiled op ran faster than eager on an Intel Xeon
        (AVX-512), 1.3-2x slower on an AMD EPYC (AVX2). The measured choice is kept beside Inductor's
        cache, keyed by this machine, versions, code, batch and threads (`choice_key`); a later run with
        the same key reuses it and compiles none of the losers ("measured": "earlier (cached)")."""
        with torch_threads(self.threads):
            self._warm_up(sizes, height, width)

    def _warm_up(self, sizes: list[int], height: int, width: int) -> None:
        device = self.normalize.mean.device

        def inputs(n: int) -> tuple:
            images = torch.zeros(n, height, width, 3, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
            return (images, torch.zeros(n, 2, dtype=torch.int64, device=device),
                    torch.zeros(n, dtype=torch.bool, device=device), self.normalize.mean, self.normalize.std,
                    self.pad, self.size)

        if not (self.compiled and sizes):
            return
        # The first size (the full batch: nearly every batch of an epoch) decides; the other sizes
        # are compiled only when the compiled op is kept (each is one more compilation at start-up).
        first = inputs(sizes[0])
        candidates = {"compiled": self.op, "eager": crop_flip_normalize}
        if device.type == "cpu":  # FFCV's style on a CPU: one numba pass, parallel over the batch
            from .cpu_augment import FusedCropFlip

            candidates["fused"] = FusedCropFlip(normalize_table(self.normalize.mean, self.normalize.std))
        key = choice_key(device, sizes[0], torch.get_num_threads())
        cached = read_choice(key, list(candidates), sizes[0])
        if cached:
            # This machine measured these candidates with this code before: keep its winner, and compile
            # nothing that lost (the compiled op's trace alone is ~2 s of a 2-core CPU's start-up).
            self.choice = {**cached, "measured": "earlier (cached)"}
            best = cached["op"]
            self.op = candidates[best]
            self.op(*first)  # the kept op loaded now (numba's cache, Inductor's), not in FFCV's thread
        else:
            ms = {name: _ms_per_call(op, first) for name, op in candidates.items()}
            best = min(ms, key=ms.get)
            self.choice = {"op": best, "batch": sizes[0], **{f"{k}_ms": round(v, 4) for k, v in ms.items()}}
            write_choice(key, self.choice)
            self.choice["measured"] = "now"
            self.op = candidates[best]
        if best != "compiled":
            return
        for n in sizes[1:]:
            self.op(*inputs(n))

    def draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image crop offsets (N, 2) in [0, 2*pad] and flip flags (N,)."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), device=device, generator=self.generator)
        flips = torch.rand(n, device=device, generator=self.generator) < self.flip_p
        return offsets, flips

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        offsets, flips = self.draw(images.shape[0], images.device)
        self.last_offsets, self.last_flips = offsets, flips
        return self.op(images, offsets, flips, self.normalize.mean, self.normalize.std, self.pad, self.size)
