"""CIFAR-10 python archive -> train / val / test FFCV betons, plus a manifest that proves them.

Why a manifest: the trainer must refuse stale or half-written data, and a rerun must be free.
The manifest is written last, so its presence (with matching hashes) means the set is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import signal
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .ffcv_threads import import_ffcv
from .utils import (
    ArgumentParser,
    UserError,
    atomic_path,
    file_digests,
    first_line,
    run_cli,
    sha256_file,
    write_json_atomic,
)

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_ENV = "FASTCIFAR_CIFAR_URL"  # overrides OFFICIAL_URL: a mirror, or an unreachable address in tests
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
NUM_CLASSES = 10
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


@dataclass
class Cifar:
    """The official 50,000 training and 10,000 test images, as N x 3072 uint8 planes (R, G, B)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# ---------------------------------------------------------------------------------------------
# Reading and validating the source


# What a CIFAR member may be: a batch is 10,000 x 3072 bytes of pixels plus labels and file names
# (about 31 MB); the whole archive decompresses to about 180 MB. Anything larger is not CIFAR-10.
MAX_MEMBER_BYTES = 64 << 20
MAX_ARCHIVE_BYTES = 1 << 30


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 uses it to write bytes into a protocol-2 pickle, and only so: a str
    of code points < 256 and 'latin1', bounded. Anything else (other codecs, bytes in, chained calls,
    which can grow the output exponentially) is refused."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or len(text) > MAX_MEMBER_BYTES:
        raise pickle.UnpicklingError("forbidden use of _codecs.encode")
    return text.encode("latin1")


def _empty_array(subtype: object, shape: object, dtype: object):
    """numpy's `_reconstruct` as numpy pickles an array: an empty (0,) array that BUILD then fills
    from bytes. A larger shape would allocate memory the pickle never paid for: refused."""
    if subtype is not np.ndarray or shape != (0,):
        raise pickle.UnpicklingError("forbidden array reconstruction")
    return np.ndarray(shape, dtype)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a CIFAR batch needs nothing else. The two
    callables a numpy pickle needs are replaced by bounded versions of themselves."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _empty_array,
        ("numpy._core.multiarray", "_reconstruct"): _empty_array,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,  # how Python 3 writes bytes in a protocol-2 pickle
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name}")
        return self._ALLOWED[module, name]


def _labels(name: str, labels: object, n: int) -> np.ndarray:
    """A flat list (or 1-d integer array) of n ints in 0-9, checked before anything is materialised:
    a nested list of repeated references costs nothing to unpickle and exponential memory to convert."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        values = labels.tolist()
    elif type(labels) is list and all(type(v) is int for v in labels):
        values = labels
    else:
        raise UserError(f"{name}: b'labels' must be a flat list of integers")
    if len(values) != n:
        raise UserError(f"{name}: {len(values)} labels for {n} images")
    for position, value in enumerate(values):
        if not 0 <= value < NUM_CLASSES:
            raise UserError(f"{name}: label {value} at position {position} is outside 0-9")
    return np.array(values, dtype=np.int64)


def _parse_batch(name: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # any unpickling failure is a bad file, whatever its kind
        raise UserError(f"{name} is not a CIFAR-10 batch pickle ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{name} is not a CIFAR-10 batch (needs the keys b'data' and b'labels')")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UserError(f"{name}: b'data' must be a uint8 array of shape (N, 3072), got {dtype} {shape}")
    return data, _labels(name, batch[b"labels"], len(data))


def _batch_folder(root: Path) -> Path:
    """An extracted copy: the cifar-10-batches-py folder itself, or the folder holding it."""
    return root / BATCH_DIR if (root / BATCH_DIR).is_dir() else root


@contextlib.contextmanager
def _reading(path: Path):
    """An OSError while reading `path` (EIO, EACCES) as one line naming the file (the one the error
    names, else `path`: a read() error carries no file name of its own)."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot read {err.filename or path}: {err.strerror or first_line(err)}") from None


def _read_members_from_dir(root: Path) -> dict[str, bytes]:
    folder = _batch_folder(root)
    out = {}
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        path = folder / name
        if not path.is_file():  # also refuses a FIFO or device, which would block or never end
            raise UserError(f"{folder} has no {name} (expected an extracted {BATCH_DIR} folder)")
        if path.stat().st_size > MAX_MEMBER_BYTES:
            raise UserError(f"{path} is {path.stat().st_size:,} bytes: larger than any CIFAR-10 batch")
        with _reading(path):
            out[name] = path.read_bytes()
    return out


class _Bounded(io.RawIOBase):
    """A read-only stream that fails once more than `limit` bytes were read: a gzip bomb stops there."""

    def __init__(self, inner, limit: int, what: str):
        self.inner, self.left, self.what = inner, limit, what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.inner.readinto(buffer)
        self.left -= n
        if self.left < 0:
            raise UserError(f"{self.what} decompresses to more than {MAX_ARCHIVE_BYTES >> 20} MiB: not CIFAR-10")
        return n


def _read_members_from_tar(path: Path) -> dict[str, bytes]:
    """The six batches, read in one streaming pass that goes on to the end of the gzip stream, so its
    CRC and length are checked (a flipped bit anywhere is an error, not silently changed pixels)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise UserError(f"{path} is not a gzip file (expected the CIFAR-10 python .tar.gz)")
    wanted = {f"{BATCH_DIR}/{n}": n for n in [*TRAIN_BATCHES, TEST_BATCH]}
    out: dict[str, bytes] = {}
    try:
        with gzip.open(path, "rb") as gz:
            stream = io.BufferedReader(_Bounded(gz, MAX_ARCHIVE_BYTES, str(path)), 1 << 20)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if name in wanted and member.isfile():
                        if member.size > MAX_MEMBER_BYTES:
                            raise UserError(f"{path}: {name} is {member.size:,} bytes, larger than any CIFAR-10 batch")
                        out[wanted[name]] = tar.extractfile(member).read()
            while stream.read(1 << 20):  # the rest of the stream, to its CRC
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise UserError(f"{path} is truncated or corrupt ({err})") from None
    except tarfile.ReadError as err:
        msg = str(err)
        if "unexpected end" in msg or "truncated" in msg or "compressed file ended" in msg:
            raise UserError(f"{path} is truncated or corrupt ({msg})") from None
        raise UserError(f"{path} is not a tar archive ({msg})") from None
    for full, short in wanted.items():
        if short not in out:
            raise UserError(f"{path} has no {full}")
    return out


def _checked_source(source: Path) -> Path:
    """A regular file or a folder: anything else (a FIFO, a device) could block forever when read."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"source not found: {source}")
    if not (source.is_file() or source.is_dir()):
        raise UserError(f"{source} is neither a regular file nor a folder")
    return source


def load_cifar(source: Path, expect_counts: tuple[int, int] = (50_000, 10_000)) -> Cifar:
    """Read and validate the five training batches and the test batch of a CIFAR-10 python copy."""
    source = _checked_source(source)
    try:
        raw = _read_members_from_dir(source) if source.is_dir() else _read_members_from_tar(source)
    except OSError as err:  # unreadable file, I/O error: the source's fault, said in one line
        raise UserError(f"cannot read {err.filename or source}: {err.strerror or first_line(err)}") from None
    train = [_parse_batch(n, raw[n]) for n in TRAIN_BATCHES]
    test_x, test_y = _parse_batch(TEST_BATCH, raw[TEST_BATCH])
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    if (len(train_x), len(test_x)) != tuple(expect_counts):
        raise UserError(
            f"expected {expect_counts[0]} training and {expect_counts[1]} test images, "
            f"found {len(train_x)} and {len(test_x)}"
        )
    return Cifar(train_x, train_y, test_x, test_y)


def source_digests(source: Path) -> tuple[str, str]:
    """(md5, sha256) of an archive, or of the batch files (in fixed order) of an extracted folder."""
    source = Path(source)
    if source.is_file():
        with _reading(source):
            return file_digests(source)
    folder = _batch_folder(source)
    with _reading(folder):
        return file_digests(*(p for n in [*TRAIN_BATCHES, TEST_BATCH] if (p := folder / n).is_file()))


def download_official(data_dir: Path) -> Path:
    """Fetch the official archive into data_dir (reused when present and valid), md5-checked."""
    from tqdm import tqdm

    target = data_dir / ARCHIVE_NAME
    if target.is_file():
        if file_digests(target)[0] == OFFICIAL_MD5:
            print(f"using {target} (md5 ok)")
            return target
        print(f"{target} has the wrong md5: downloading again")
        target.unlink()
    url = os.environ.get(URL_ENV, OFFICIAL_URL)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, atomic_path(target) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar:
                while block := resp.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
            md5 = file_digests(tmp)[0]
            if md5 != OFFICIAL_MD5:
                raise UserError(f"downloaded archive has md5 {md5}, expected {OFFICIAL_MD5}: deleted it")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:  # ValueError: a malformed URL
        reason = getattr(err, "reason", err)
        raise UserError(
            f"could not download {url} (no network? {reason}); "
            "pass --source PATH to use a local copy"
        ) from None
    return target


# ---------------------------------------------------------------------------------------------
# Splitting and writing


def stratified_split(labels: np.ndarray, seed: int, val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split: exactly `val_per_class` validation images of every class.

    Returns (train_indices, val_indices), both sorted so each beton keeps the official order.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members) <= val_per_class:
            raise UserError(f"class {c} has {len(members)} training images: --val-per-class {val_per_class} "
                            "would leave none of them for training")
        val.append(rng.permutation(members)[:val_per_class])
    val_idx = np.sort(np.concatenate(val))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def planes_to_hwc(x: np.ndarray) -> np.ndarray:
    """N x 3072 (R plane, G plane, B plane, each 32x32 row-major) -> N x 32 x 32 x 3."""
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


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
            with _sigint_held():
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


@contextlib.contextmanager
def _sigint_held():
    """Block SIGINT in this (main) thread inside the block; a Ctrl-C that came meanwhile is delivered,
    and raised as KeyboardInterrupt, as soon as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def check_free_space(data_dir: Path, counts: dict[str, int]) -> None:
    """Refuse before writing when the betons cannot fit: FFCV would otherwise fail mid-write."""
    import shutil

    need = sum(beton_bytes(n) for n in counts.values())
    free = shutil.disk_usage(data_dir).free
    if free < need:
        raise UserError(f"not enough space in {data_dir}: the betons need {need / 2**20:.1f} MiB, "
                        f"{free / 2**20:.1f} MiB available")


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


def _columns(path: Path) -> dict[str, np.ndarray]:
    """A beton's metadata table by field name (FFCV's Reader names the columns f0, f1, ...)."""
    import_ffcv()
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}


def read_split(path: Path) -> dict[str, np.ndarray]:
    """Every record of a raw-pixel beton as numpy arrays, in file order: image (N x 32 x 32 x 3 uint8),
    label and index (int64). Read straight from the file with FFCV's Reader (its metadata table) and
    a memory map, no Loader: no JIT compilation."""
    column = _columns(path)
    image = column["image"]
    raw_32x32 = (image["mode"] == 1) & (image["height"] == 32) & (image["width"] == 32)
    if not raw_32x32.all():
        raise UserError(f"{path} does not hold raw 32x32 RGB images (rebuild it with tools/make_beton.py)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    size = 32 * 32 * 3
    images = np.empty((len(image), 32, 32, 3), dtype=np.uint8)
    flat = images.reshape(len(image), size)
    for i, ptr in enumerate(image["data_ptr"].tolist()):
        flat[i] = raw[ptr:ptr + size]
    return {"image": images, "label": np.array(column["label"], dtype=np.int64),
            "index": np.array(column["index"], dtype=np.int64)}


IMAGE_BYTES = 32 * 32 * 3
FIELDS = ["image", "label", "index"]


def structure_problem(beton: Path) -> str | None:
    """Why a beton's structure is not one make_beton writes (None when it is), from its header, metadata
    and allocation table alone (plain numpy, no JIT, milliseconds): FFCV's numba readers check no
    bounds, so a table or pointer aimed outside the file would read memory out of bounds or pixels
    that are not the image's. Checked: the fields are image/label/index; the header's sample count is
    the metadata table's length; the allocation table lies at the end of the file; every sample's
    image is one raw 32x32 allocation of its own, inside the data region."""
    import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    size = Path(beton).stat().st_size
    try:
        reader = Reader(str(beton))
    except Exception as err:  # whatever a damaged header does to FFCV's reader
        return f"{beton} is not a readable beton ({type(err).__name__})"
    n = int(reader.num_samples)
    page = int(reader.page_size)
    if reader.field_names != FIELDS:
        return f"{beton} has the fields {reader.field_names}, not {FIELDS} (rebuild it with make_beton)"
    if len(reader.metadata) != n:
        return f"{beton}: its header says {n} samples, its metadata table holds {len(reader.metadata)}"
    if n < 1 or page < 1 or page & (page - 1):
        return f"{beton}: {n} samples in pages of {page} bytes (need >= 1 sample, pages a power of two)"
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    table_at = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    if not data_start <= table_at <= size or table_at + table.nbytes != size or len(table) != n:
        return (f"{beton}: its allocation table ({len(table)} entries at byte {table_at}, "
                f"{ALLOC_TABLE_TYPE.itemsize} bytes each) does not fill the end of the file ({size} bytes) "
                f"with one entry per sample ({n})")
    ptr, length, sample = (table[k].astype(np.int64) for k in ("ptr", "size", "sample_id"))
    outside = np.flatnonzero((ptr < data_start) | (ptr + length > table_at) | (length != IMAGE_BYTES))
    if outside.size:
        i = outside[0]
        return (f"{beton}: allocation {i} ({length[i]} bytes at byte {ptr[i]}) is not one image inside the data "
                f"region (bytes {data_start}-{table_at})")
    if not np.array_equal(np.sort(sample), np.arange(n)):
        return f"{beton}: its allocation table does not hold exactly one allocation per sample"
    image = reader.metadata["f0"]
    expected = np.empty(n, dtype=np.int64)
    expected[sample] = ptr
    wrong = np.flatnonzero(image["data_ptr"].astype(np.int64) != expected)
    if wrong.size:
        return f"{beton}: sample {wrong[0]}'s image pointer ({image['data_ptr'][wrong[0]]}) is not its allocation"
    return None


def labels_problem(beton: Path, images: int) -> str | None:
    """Why a beton's label column is unusable (None when it is fine): read from its metadata table
    with FFCV's Reader (plain numpy, no JIT, milliseconds), so a label outside 0-9 is refused at
    start-up instead of failing cross-entropy mid-run."""
    try:
        labels = _columns(beton)["label"]
    except Exception as err:  # whatever a damaged header does to the reader
        return f"{beton} is not a readable beton ({type(err).__name__})"
    if len(labels) != images:
        return f"{beton} holds {len(labels)} images, its manifest says {images}"
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        return f"{beton} holds label {labels[bad[0]]} (record {bad[0]}), outside 0-9"
    return None


def manifest_problem(data_dir: Path, check_hashes: bool = True) -> str | None:
    """Why the betons in data_dir are not a complete, intact set (None when they are).

    Sizes are always compared; sha256 only when check_hashes (0.5-0.8 s for the full 210 MB set on
    the 2-core Intel Xeon dev machine): a same-size beton from another split seed, or with changed
    pixels, differs only there. Then each beton's structure (`structure_problem`: a hash proves a
    file unchanged, not safe to read) and labels (`labels_problem`) are checked.
    """
    manifest_path = Path(data_dir) / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = {s: (manifest["splits"][s]["sha256"], manifest["splits"][s]["bytes"]) for s in SPLITS}
    except (ValueError, KeyError, TypeError):
        return f"{manifest_path} is unreadable"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"{manifest_path} has format version {manifest.get('format_version')}, need {FORMAT_VERSION}"
    for split, (sha, size) in expected.items():
        beton = Path(data_dir) / f"{split}.beton"
        if not beton.is_file():
            return f"{beton} is missing"
        if beton.stat().st_size != size or (check_hashes and sha256_file(beton) != sha):
            return f"{beton} does not match {manifest_path} (stale or modified)"
    if check_hashes:
        for split in SPLITS:
            beton = Path(data_dir) / f"{split}.beton"
            problem = structure_problem(beton) or labels_problem(beton, manifest["splits"][split]["images"])
            if problem:
                return problem
    return None


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
        with atomic_path(data_dir / ".write-test"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to data dir {data_dir}: {err.strerror or err}") from None
    (data_dir / ".write-test").unlink(missing_ok=True)
    with conversion_lock(data_dir):
        return _build(source, data_dir, seed, val_per_class, expect_counts, force)


def _build(source: Path | None, data_dir: Path, seed: int, val_per_class: int, expect_counts: tuple[int, int],
           force: bool) -> dict:
    # Under the lock no other conversion is writing here: every temporary file is a dead run's.
    for name in [*(f"{split}.beton" for split in SPLITS), MANIFEST, ARCHIVE_NAME]:
        for stale in data_dir.glob(f".{name}.*.tmp"):  # left by a killed run (see atomic_path)
            stale.unlink()

    if source is None:
        source = download_official(data_dir)
    source = _checked_source(source)
    md5, sha = source_digests(source)
    request = _request(sha, seed, val_per_class)

    if not force and manifest_problem(data_dir) is None:
        manifest = json.loads((data_dir / MANIFEST).read_text())
        if {k: manifest.get(k) for k in request} == request:
            print(f"{data_dir}: betons are up to date with {source} (split seed {seed}); nothing to do "
                  "(--force rebuilds)")
            return manifest

    cifar = load_cifar(source, expect_counts)
    if source.is_file() and md5 != OFFICIAL_MD5:
        print(f"note: {source} is not the official archive (md5 {md5}); using it since its layout is valid")
    train_idx, val_idx = stratified_split(cifar.train_y, seed, val_per_class)
    check_free_space(data_dir, {"train": len(train_idx), "val": len(val_idx), "test": len(cifar.test_y)})
    train_images = planes_to_hwc(cifar.train_x)
    test_images = planes_to_hwc(cifar.test_x)
    plan = {
        "train": (train_images, cifar.train_y, train_idx, "official training set"),
        "val": (train_images, cifar.train_y, val_idx, "official training set"),
        "test": (test_images, cifar.test_y, np.arange(len(test_images)), "official test set"),
    }

    # The old manifest goes first: from here until the new one is written the set is incomplete.
    (data_dir / MANIFEST).unlink(missing_ok=True)
    splits, rows = {}, []
    # ExitStack renames the three temporary files only once all are written; any failure removes them.
    with contextlib.ExitStack() as stack:
        for name, (images, labels, indices, origin) in plan.items():
            t0 = time.perf_counter()
            tmp = stack.enter_context(atomic_path(data_dir / f"{name}.beton"))
            write_beton(tmp, images, labels, indices)
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
    write_json_atomic(data_dir / MANIFEST, manifest)
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
