"""CIFAR-10 python archive -> train / val / test FFCV betons, plus a manifest that proves them.

Why a manifest: the trainer must refuse stale or half-written data, and a rerun must be free.
The manifest is written last, so its presence (with matching hashes) means the set is complete.
This module writes (FFCV's writer, the lock, Ctrl-C held off mid-file); the archive is read by archive.py,
and betons are read and checked by beton_check.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .archive import (
    ARCHIVE_NAME,
    NUM_CLASSES,
    OFFICIAL_MD5,
    checked_source,
    download_official,
    load_cifar,
    planes_to_hwc,
    source_digests,
    stratified_split,
)
from .beton_check import FORMAT_VERSION, MANIFEST, SPLITS, manifest_problem, structure_problem  # noqa: F401
from .ffcv_threads import import_ffcv
from .manifest import Manifest, read_manifest
from .utils import (
    ArgumentParser,
    UserError,
    atomic_path,
    free_name,
    run_cli,
    sha256_file,
    signals_held,
    writable_folder,
)


class _Samples:
    """Indexable (image HWC uint8, label, index) view that FFCV's writer consumes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        return self.images[j], int(self.labels[j]), j


class _Buffer:
    """Stands in for the writer's shared-memory metadata block: in one process plain memory will do."""

    def __init__(self, size: int):
        self.buf = memoryview(bytearray(size))
        self.size = size

    def close(self) -> None:
        pass

    def unlink(self) -> None:
        pass


def _in_process_writer():
    """FFCV's DatasetWriter with its worker run in this process instead of a child process.

    Why: FFCV's main process polls a counter until the worker has written every sample, so a worker
    that dies (ENOSPC on a full disk, Ctrl-C) hangs it forever, prints the worker's traceback, and
    leaves the metadata block in /dev/shm. Here the worker's own function runs in this process: any
    failure is an ordinary exception (one line via the CLI, temporary files removed), and the shared
    memory block is swapped for plain memory and unlinked the moment FFCV creates it. Same function,
    same single worker, same pages in the same order: the betons are byte-identical.
    """
    import ctypes
    import queue
    from multiprocessing import Value

    import_ffcv()
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class InProcessWriter(DatasetWriter):
        def prepare(self) -> None:
            super().prepare()
            shared, self.metadata_sm = self.metadata_sm, _Buffer(self.metadata_sm.size)
            shared.close()
            shared.unlink()

        def finalize(self, allocations) -> None:
            """FFCV's finalize wraps its allocation table in a bare `except:`: a Ctrl-C landing there
            would be swallowed and the beton finished with an empty table, looking complete. SIGINT
            is held until it returns, then raised as usual, so the temporary file is removed."""
            with signals_held(signal.SIGINT):
                super().finalize(allocations)

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args) -> None:
            self.num_samples = num_samples
            self.prepare()
            work: queue.SimpleQueue = queue.SimpleQueue()
            for todo in queue_content:
                work.put(todo)
            work.put(None)
            allocations: queue.SimpleQueue = queue.SimpleQueue()
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            work_fn(work, self.metadata_sm, self.metadata_type, self.fields, allocator,
                    Value(ctypes.c_uint64, 0), allocations, *extra_worker_args)
            self.finalize(allocations.get())

    return InProcessWriter



def write_beton(path: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write one beton of raw pixels, in this process (see `_in_process_writer`); one worker, so
    FFCV's page order is deterministic."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    writer = _in_process_writer()(str(path), fields, num_workers=1)
    writer.from_indexed_dataset(_Samples(images, labels, indices))


PAGE_SIZE = 8 << 20  # FFCV's default page (4 x its 2 MiB minimum); a sample never spans two pages


def beton_bytes(images: int, image_bytes: int = 32 * 32 * 3) -> int:
    """An upper bound of one raw-pixel beton's size: header and metadata padded to a page, whole
    pages of whole images, the allocation table. Measured sizes: 145.0 / 24.1 / 40.2 MiB."""
    per_page = PAGE_SIZE // image_bytes
    pages = 1 + -(-images // per_page)
    return pages * PAGE_SIZE + 64 * images


def _lock_holder(folder: Path) -> str:
    """The pid holding a flock on `folder`, from /proc/locks (Linux), or '?'."""
    try:
        st = folder.stat()
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and fields[-3] == dev:
                return fields[-4]
    except (OSError, IndexError):
        pass
    return "?"


@contextlib.contextmanager
def conversion_lock(data_dir: Path):
    """An exclusive flock on the data dir itself for the whole conversion: a second make_beton into
    the same folder is told who holds it and stops, instead of deleting the first one's live files.
    The kernel drops the lock when its holder exits, however it exits: no stale lock file."""
    import fcntl

    fd = os.open(data_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another conversion (pid {_lock_holder(data_dir)}) is writing into {data_dir}; "
                            "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _request(source_sha256: str, seed: int, val_per_class: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source_sha256": source_sha256,
        "split_seed": seed,
        "val_per_class": val_per_class,
    }



def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [line.format(*header), line.format(*["-" * w for w in widths])]
    out += [line.format(*r) for r in rows]
    return "\n".join(out)


def build(
    source: Path | None,
    data_dir: Path,
    seed: int = 0,
    val_per_class: int = 500,
    expect_counts: tuple[int, int] = (50_000, 10_000),
    force: bool = False,
) -> dict:
    """Convert the archive into the three betons and the manifest; return the manifest.
    Holds `conversion_lock` on data_dir throughout."""
    if seed < 0:
        raise UserError(f"--split-seed must be >= 0, got {seed}")
    if val_per_class < 1:
        raise UserError("--val-per-class must be at least 1")
    if min(expect_counts) < 1:
        raise UserError(f"--expect-counts {expect_counts[0]},{expect_counts[1]}: every split needs images "
                        "(FFCV cannot write a beton of none)")
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to data dir {data_dir}: {err.strerror or err}") from None
    with conversion_lock(data_dir):
        return _build(source, data_dir, seed, val_per_class, expect_counts, force)


OUTPUTS = (*(f"{split}.beton" for split in SPLITS), MANIFEST)
FILES_NEEDED = 2 * len(OUTPUTS)  # inodes: each output's temporary, plus room for the write test and the rest


def check_outputs(data_dir: Path, counts: dict[str, int]) -> None:
    """Before any work: the folder is writable, every output's name is free or a regular file (a folder named
    `train.beton` would fail the final rename after the whole conversion), and the file system has the
    bytes (`beton_bytes`) and the inodes for the set."""
    import shutil

    writable_folder(data_dir, "data dir")
    for name in OUTPUTS:
        free_name(data_dir / name, "the output")
    need = sum(beton_bytes(n) for n in counts.values())
    free = shutil.disk_usage(data_dir).free
    if free < need:
        raise UserError(f"not enough space in {data_dir}: the betons need {need / 2**20:.1f} MiB, "
                        f"{free / 2**20:.1f} MiB available")
    stats = os.statvfs(data_dir)
    if stats.f_files and stats.f_favail < FILES_NEEDED:  # f_files 0: the file system does not count inodes
        raise UserError(f"no free inodes in {data_dir}: the betons and manifest need {FILES_NEEDED} files, "
                        f"{stats.f_favail} available")


def _build(source: Path | None, data_dir: Path, seed: int, val_per_class: int, expect_counts: tuple[int, int],
           force: bool) -> dict:
    # Under the lock no other conversion is writing here: every temporary file is a dead run's.
    for name in [*OUTPUTS, ARCHIVE_NAME]:
        for stale in data_dir.glob(f".{name}.*.tmp"):  # left by a killed run (see atomic_path)
            stale.unlink()

    if source is None:
        source = download_official(data_dir)
    source = checked_source(source)  # cheap checks (a gzip header) before hashing gigabytes
    md5, sha = source_digests(source)
    request = _request(sha, seed, val_per_class)

    # An up-to-date set is used as it is, even in a folder this user cannot write.
    if not force and manifest_problem(data_dir) is None:
        manifest = read_manifest(data_dir / MANIFEST)
        if manifest.request() == request:
            print(f"{data_dir}: betons are up to date with {source} (split seed {seed}); nothing to do "
                  "(--force rebuilds)")
            return manifest.model_dump()

    cifar = load_cifar(source, expect_counts)
    if source.is_file() and md5 != OFFICIAL_MD5:
        print(f"note: {source} is not the official archive (md5 {md5}); using it since its layout is valid")
    train_idx, val_idx = stratified_split(cifar.train_y, seed, val_per_class)
    check_outputs(data_dir, {"train": len(train_idx), "val": len(val_idx), "test": len(cifar.test_y)})
    train_images = planes_to_hwc(cifar.train_x)
    test_images = planes_to_hwc(cifar.test_x)
    plan = {
        "train": (train_images, cifar.train_y, train_idx, "official training set"),
        "val": (train_images, cifar.train_y, val_idx, "official training set"),
        "test": (test_images, cifar.test_y, np.arange(len(test_images)), "official test set"),
    }

    import_ffcv()  # before the first temporary: a Ctrl-C from here on lands in the writing, not torch's import
    # The old manifest goes first: from here until the new one is written the set is incomplete.
    (data_dir / MANIFEST).unlink(missing_ok=True)
    splits, rows = {}, []
    # Every file of the set, the manifest included, is written to its temporary before any is renamed (the
    # manifest's entered first, so renamed last): a failure anywhere (no space, no inode, Ctrl-C) removes
    # them all and leaves no manifest, so the set is complete with its manifest or not written at all.
    with contextlib.ExitStack() as stack:
        manifest_tmp = stack.enter_context(atomic_path(data_dir / MANIFEST))
        for name, (images, labels, indices, origin) in plan.items():
            t0 = time.perf_counter()
            tmp = stack.enter_context(atomic_path(data_dir / f"{name}.beton"))
            try:
                write_beton(tmp, images, labels, indices)
            except OSError as err:  # name the beton, never its temporary
                raise OSError(err.errno, err.strerror, str(data_dir / f"{name}.beton")) from None
            seconds = time.perf_counter() - t0
            per_class = np.bincount(labels[indices], minlength=NUM_CLASSES)
            size = tmp.stat().st_size
            splits[name] = {
                "images": int(len(indices)),
                "index_refers_to": origin,
                "per_class": per_class.tolist(),
                "sha256": sha256_file(tmp),
                "bytes": size,
            }
            rows.append([name, f"{len(indices):,}", f"{per_class.min()}/{per_class.max()}",
                         f"{size / 2**20:.1f} MiB", f"{seconds:.1f}"])

        manifest = {
            **request,
            "fastcifar_version": __version__,
            "source": str(source),
            "source_md5": md5,
            "official_archive": md5 == OFFICIAL_MD5,
            "counts": {s: splits[s]["images"] for s in SPLITS},
            "splits": splits,
        }
        Manifest.model_validate(manifest)  # what the trainer will read back: checked before it is written
        manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    print(_table(rows, ["split", "images", "class min/max", "size", "seconds"]))
    print(f"wrote {', '.join(f'{s}.beton' for s in SPLITS)} and {MANIFEST} to {data_dir}")
    return manifest


def _counts(text: str) -> tuple[int, int]:
    try:
        train, test = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected TRAIN,TEST, e.g. 50000,10000") from None
    return train, test


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="make_beton",
        description="Convert the CIFAR-10 python archive into train/val/test FFCV betons.",
    )
    parser.add_argument("--source", type=Path, default=None,
                        help="local cifar-10-python.tar.gz or extracted cifar-10-batches-py folder "
                             "(None: download the official archive into --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="output folder")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--val-per-class", type=int, default=500,
                        help="validation images per class taken from the training set")
    parser.add_argument("--expect-counts", type=_counts, default=(50_000, 10_000), metavar="TRAIN,TEST",
                        help="image counts the source must hold (other values: for subsets)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the betons are up to date")
    args = parser.parse_args(argv)
    build(args.source, args.data_dir, args.split_seed, args.val_per_class, args.expect_counts, args.force)
    return 0


def cli() -> None:
    run_cli(main, "make_beton")
