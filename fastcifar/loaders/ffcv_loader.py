"""The FFCV pipeline (the default): raw uint8 pixels are read on the CPU, copied to the device, and
augmented there in one batched op (see `augment.py`).

What runs where:
  CPU (FFCV worker threads, compiled by numba): read raw pixels from the memory-mapped beton, batch.
  (device = CPU: torch ops in FFCV's thread on one thread, see OneTorchThread.)
  copy: `ToDevice(non_blocking=True)` moves the uint8 batch (4x smaller than float32).
  device: NHWC -> NCHW view (already channels_last in memory), /255, normalise, pad, crop, flip.
"""

from __future__ import annotations

import atexit
import functools
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..augment import Normalize, RandomCropFlip
from ..distributed import eval_shard, rank_images
from ..ffcv_threads import import_ffcv
from ..utils import usable_cpus

DEFAULT_BATCH_SIZE = 128
DEFAULT_WORKERS = 2
THREAD_STOP_S = 30.0  # the longest we wait for FFCV's thread to stop after leaving an epoch early


class FlatInt64(nn.Module):
    """(N, 1) integer column -> a fresh (N,) int64 tensor, which cross-entropy wants.

    Not FFCV's `Squeeze`: that squeezes a last batch of one image to a 0-d tensor. And a copy,
    because FFCV reuses its output buffers a few batches later: a kept label tensor would change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1).to(torch.int64, copy=True)


class OneTorchThread(nn.Module):
    """On the CPU, the first torch stage of FFCV's image pipeline: the torch ops in FFCV's thread
    (ToDevice's copy, the device op) run on one thread.

    Why, measured on 2 cores: otherwise the copy's parallel loop starts a second OpenMP team in FFCV's
    thread; libgomp then manages more threads than there are cores and cuts its threads' spinning
    from 300,000 spins to 100 (GOMP_SPINCOUNT's documented rule), so the model's worker sleeps
    between parallel regions and every region waits for it to wake: the model's
    two threads used 1.75 cores instead of 1.99 and FFCV's epochs ran ~10 % slower than `synthetic`'s,
    with FFCV's own thread busy under 1 %. torch.set_num_threads also sets the count that new threads
    start with; the threads started after this are FFCV's own, where one is what we want."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        return x


def pipeline_threads(device: torch.device, workers: int, parallel: bool = False) -> int:
    """How many threads FFCV's numba-compiled passes get (its `num_workers`): `workers` on a GPU device;
    on a CPU device only the cores the model's torch threads leave idle, and at least one (its own).

    Why, measured end to end on 2 cores (docs/benchmarks.md, "Where ffcv's overhead came from"): with a
    second thread, each batch's parallel loop wakes numba's worker thread (TBB), which spins after the
    loop on a core the model's two OpenMP threads are using: the model's threads were preempted several
    times as often per epoch as beside `synthetic` or `memory`, and `ffcv`'s epochs were longer by that.
    `parallel=True` forces `workers` threads anyway (bench_loader's ffcv-parallel)."""
    if device.type != "cpu" or parallel:
        return workers
    return max(1, min(workers, usable_cpus() - torch.get_num_threads()))


class LoaderThreadDied(RuntimeError):
    """FFCV's EpochIterator thread ended without finishing the epoch (its traceback is printed above)."""


_thread_errors: dict[int, BaseException] = {}
_previous_excepthook = threading.excepthook


def _note_thread_error(args) -> None:
    """Keep what killed a loader thread, so the consumer can name it (and chain it) when it fails."""
    if args.thread is not None and args.exc_value is not None:
        _thread_errors[id(args.thread)] = args.exc_value
    _previous_excepthook(args)


threading.excepthook = _note_thread_error


def _wait_for_batch(epoch_iterator, poll_s: float = 1.0) -> None:
    """Block until FFCV's thread has queued a batch (or the end marker), or fail if it died.

    FFCV's own __next__ waits on its queue forever, so an exception inside its thread (ours in the
    device op, or its own) would hang the run. Waiting on the queue's condition wakes at once when a
    batch arrives; the poll only looks whether the thread is still alive.
    """
    queue = epoch_iterator.output_queue
    with queue.not_empty:
        while not queue._qsize():
            if not epoch_iterator.is_alive():
                error = _thread_errors.pop(id(epoch_iterator), None)
                cause = f": {type(error).__name__}: {error}" if error else " (see its traceback above)"
                raise LoaderThreadDied(f"FFCV's loader thread died mid-epoch{cause}") from error
            queue.not_empty.wait(poll_s)  # Queue.get's own wait; _qsize because the lock is held


# Every FFCV epoch thread started through DeviceBatches and not yet joined.
_live_epochs: weakref.WeakSet = weakref.WeakSet()


def _stop(epoch) -> None:
    """Ask FFCV's epoch thread to stop and wait for it: close() alone only asks. Within FFCV's 0.5 s
    queue timeout once its queue is full (a few batches ahead)."""
    epoch.close()
    epoch.join(THREAD_STOP_S)
    _live_epochs.discard(epoch)


@atexit.register
def _stop_live_epochs() -> None:
    """At interpreter exit, stop the epochs nobody closed: `it = iter(loader); next(it)` at the end of a
    script (or a notebook's kernel shutting down) leaves its generator unfinished, and Python would
    end FFCV's daemon thread mid-batch, unwinding numba's C++ frames: exit 134 ("terminate called
    without an active exception"). atexit runs before daemon threads are torn down."""
    for epoch in list(_live_epochs):
        _stop(epoch)


def _inline_epoch(loader) -> Iterator[tuple]:
    """One epoch of FFCV's Loader without its thread: each batch is made in the caller's thread when
    it is asked for, between training steps. Loader.__iter__'s steps (the epoch's order, its code),
    then EpochIterator's own per-batch work (`run_pipeline`) with its buffers, its thread never
    started."""
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class Unthreaded(EpochIterator):
        def start(self) -> None:  # EpochIterator.__init__ starts its thread: not this one
            pass

    Compiler.set_num_threads(loader.num_workers)  # numba's threads for this thread (import_ffcv's patch)
    order = loader.next_traversal_order()[:len(loader) * loader.batch_size]
    loader.next_epoch += 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    epoch = Unthreaded(loader, order)
    try:
        for b_ix, indices in enumerate(epoch.iter_ixes):
            slot = b_ix % (loader.batches_ahead + 2)
            batch = epoch.run_pipeline(b_ix, indices, slot, None)
            if IS_CUDA:
                epoch.current_stream.wait_stream(epoch.cuda_streams[slot])
            yield batch
    finally:
        epoch.close()  # its memory context


class DeviceBatches:
    """What `make_loader` returns: an iterable with len() over (images, labels, indices) on the device.

    Wraps FFCV's Loader against two hazards of its threads:
    - Streams: FFCV makes the batch on a side CUDA stream and makes the consumer's stream wait for it
      (`wait_stream`), but never calls `record_stream`. The caching allocator would then hand a
      freed batch's memory back to the side stream for the next batch while the consumer's kernels
      may still read it. Every tensor of a batch is recorded on the consumer's current stream here,
      so a batch may be kept past the next iteration safely.
    - A dead thread: see `_wait_for_batch`.
    - A thread left running: when the consumer leaves an epoch early (--max-steps, a break), FFCV's
      close() only asks its thread to stop; if the process then exits, Python ends that daemon
      thread mid-batch, unwinding its C++ frames (numba's TBB pool), which aborts the process
      ("terminate called without an active exception", exit 134: seen at the end of
      `bench_loader --end-to-end --max-steps` runs). So leaving an epoch waits for the thread, and
      an epoch never left (a generator not closed) is stopped at interpreter exit.
    `augment` is the device op (compiled ahead by precompile.py); `images` the split's image count.
    """

    def __init__(self, loader, images: int, augment: nn.Module | None = None, inline: bool = False):
        self.loader, self.images, self.augment, self.inline = loader, images, augment, inline

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.inline:
            yield from _inline_epoch(self.loader)
            return
        epoch = iter(self.loader)
        _live_epochs.add(epoch)
        try:
            while True:
                _wait_for_batch(epoch)
                batch = next(epoch, None)
                if batch is None:
                    return
                for tensor in batch:
                    if tensor.is_cuda:
                        tensor.record_stream(torch.cuda.current_stream(tensor.device))
                yield batch
        finally:
            _stop(epoch)  # stops FFCV's prefetch when the consumer leaves early


def make_loader(
    path: Path,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = DEFAULT_WORKERS,
    train: bool = False,
    seed: int = 0,
    augment: nn.Module | None = None,
    compile_augment: bool = False,
    rank: int = 0,
    world_size: int = 1,
    inline: bool = False,
    parallel: bool = False,
) -> DeviceBatches:
    """One FFCV Loader over a beton, yielding (images, labels, indices), all on `device`.

    train=True: random order reshuffled every epoch from `seed`, and `augment` (default
    RandomCropFlip seeded from `seed + rank`, torch.compiled when compile_augment) as the image
    pipeline's last stage. Otherwise: sequential order, only normalisation. Never drops the last
    partial batch. With world_size > 1 (a process group is running) `batch_size` is this rank's:
    train uses FFCV's `distributed=True` (the order from `seed` on every rank, split as
    `distributed.train_shard` does), val/test this rank's `distributed.eval_shard`, unpadded.
    inline=True: no loader thread; each batch is made in the caller's thread (`_inline_epoch`).
    FFCV's passes run on `pipeline_threads(device, workers, parallel)` threads.
    """
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    device = torch.device(device)
    total = int(Reader(str(path)).num_samples)
    shard = None if train or world_size == 1 else eval_shard(total, rank, world_size)
    images = rank_images(total, train, rank, world_size)
    if not train:  # one batch holds a whole eval split; FFCV allocates buffers for the full batch size
        batch_size = max(1, min(batch_size, images))
    if augment is None:
        augment = RandomCropFlip(seed + rank, device, compile=compile_augment) if train else Normalize(device)
    in_ffcv_thread = device.type == "cpu" and not inline  # torch ops in FFCV's thread: on one torch thread
    if in_ffcv_thread and hasattr(augment, "threads"):
        augment.threads = 1  # it will run behind OneTorchThread: compile it for one thread
    image = [
        SimpleRGBImageDecoder(),
        ToTensor(),
        *([OneTorchThread()] if in_ffcv_thread else []),
        ToDevice(device, non_blocking=True),
        ToTorchImage(channels_last=True, convert_back_int16=False),
        augment,
    ]

    def column() -> list:
        return [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True), FlatInt64()]

    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=pipeline_threads(device, workers, parallel),
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        seed=seed,
        drop_last=False,
        os_cache=True,
        distributed=train and world_size > 1,
        indices=shard,
        pipelines={"image": image, "label": column(), "index": column()},
    )
    return DeviceBatches(loader, images, augment, inline=inline)


class DeferredBatches:
    """A val/test loader whose FFCV Loader is built when it is first iterated, not at start-up.

    Why: nothing of val or test is needed before the first training step, and building an FFCV
    Loader compiles its pipeline with numba (the first one of a process in ~2 s on a loaded 2-core
    CPU, later ones in 0.2-0.9 s: numba reuses what it compiled), so start-up is shorter by the two.
    Built on first `iter()` — on the calling (main) thread and before the caller's first `next()`,
    so no timed batch includes it.
    Same contract as DeviceBatches: len(), `images`, `augment` (None until built: eval's is not compiled)."""

    def __init__(self, build, images: int, batch_size: int):
        self.build, self.images, self.batch_size = build, images, max(1, min(batch_size, images))
        self.inner: DeviceBatches | None = None

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    @property
    def augment(self) -> nn.Module | None:
        return self.inner.augment if self.inner is not None else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.inner is None:
            self.inner = self.build()
        return iter(self.inner)


def make_loaders(data_dir: Path, device: torch.device, batch_size: int, workers: int, seed: int,
                 compile_augment: bool, counts: dict[str, int], rank: int = 0,
                 world_size: int = 1, inline: bool = False,
                 parallel: bool = False) -> dict[str, DeviceBatches | DeferredBatches]:
    """train built now (its device op is compiled before the first batch); val and test deferred."""
    def loader(split: str) -> DeviceBatches:
        return make_loader(Path(data_dir) / f"{split}.beton", device, batch_size, workers, train=split == "train",
                           seed=seed, compile_augment=compile_augment, rank=rank, world_size=world_size,
                           inline=inline, parallel=parallel)

    return {split: loader(split) if split == "train" else
            DeferredBatches(functools.partial(loader, split), rank_images(counts[split], False, rank, world_size),
                            batch_size)
            for split in counts}
