"""The CIFAR-10 python archive: downloaded with its checksum, or read from the user's copy, through a bounded
tar reader and an allow-list unpickler (a pickle from the internet must not run code or fill the memory);
and the seeded, stratified train / validation split.

Kept apart from betons.py: this is what the source may be and how it is read safely; writing and
checking betons is what fastcifar makes of it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .utils import UserError, atomic_path, file_digests, first_line

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_ENV = "FASTCIFAR_CIFAR_URL"  # overrides OFFICIAL_URL: a mirror, or an unreachable address in tests
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
NUM_CLASSES = 10




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


class _Budget:
    """What the pickles of one archive may produce, in total: decoded bytes (from `_codecs.encode` and the
    arrays they fill) at most the bytes of the pickles themselves, and a few arrays per batch. A pickle
    references any object again for a few bytes (its memo), so bounding each call alone is not enough:
    1,500 calls on one shared 1 MiB string would decode 1.5 GB from a 2 MB file."""

    ARRAYS_PER_BATCH = 2  # b'data', and b'labels' where a copy stores them as an array

    def __init__(self, limit: int):
        self.bytes_left = limit
        self.arrays_left = 0

    def start_batch(self) -> None:
        self.arrays_left = self.ARRAYS_PER_BATCH

    def spend(self, n: int, what: str) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise pickle.UnpicklingError(f"{what}: the pickles decode to more bytes than they hold")


class _NdarrayClass:
    """What `numpy.ndarray` unpickles to: only a name `_reconstruct` accepts, never a callable (called, numpy's
    constructor takes any shape and strides: a zero-stride array of 300,000 images from a 3 KB pickle)."""


_NDARRAY = _NdarrayClass()
# The dtypes a CIFAR batch's arrays may have: plain numbers (an object dtype would unpickle a list of references).
_DTYPES = {f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8)} | {"f4", "f8", "b1"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a CIFAR batch needs nothing else. The callables a
    numpy pickle needs are replaced by bounded versions of themselves, charged to the archive's `_Budget`."""

    def __init__(self, file, budget: _Budget, **kwargs):
        super().__init__(file, **kwargs)
        self.budget = budget
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): self._empty_array,
            ("numpy._core.multiarray", "_reconstruct"): self._empty_array,
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._latin1_bytes,  # how Python 3 writes bytes in a protocol-2 pickle
        }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name}")
        return self._allowed[module, name]

    def _latin1_bytes(self, text: object, encoding: object = "latin1") -> bytes:
        """`_codecs.encode` as Python 3 uses it to write bytes into a protocol-2 pickle, and only so: a str of
        code points < 256 and 'latin1', its output charged to the budget. Anything else (other codecs, bytes
        in, chained calls, which can grow the output exponentially) is refused."""
        if type(text) is not str or encoding not in ("latin1", "latin-1") or len(text) > MAX_MEMBER_BYTES:
            raise pickle.UnpicklingError("forbidden use of _codecs.encode")
        self.budget.spend(len(text), "_codecs.encode")
        return text.encode("latin1")

    def _empty_array(self, subtype: object, shape: object, dtype: object) -> np.ndarray:
        """numpy's `_reconstruct` as numpy pickles an array: an empty (0,) array of a plain dtype that BUILD
        then fills from bytes the budget has paid for (its size must match them). A larger shape would
        allocate memory the pickle never paid for: refused, as is more than a batch's arrays."""
        placeholder = dtype in (b"b", "b")  # numpy's own: the real dtype comes with BUILD, through `_dtype`
        if subtype is not _NDARRAY or shape != (0,) or not (
                placeholder or isinstance(dtype, np.dtype) and dtype.str[1:] in _DTYPES):
            raise pickle.UnpicklingError("forbidden array reconstruction")
        self.budget.arrays_left -= 1
        if self.budget.arrays_left < 0:
            raise pickle.UnpicklingError(f"more than {_Budget.ARRAYS_PER_BATCH} arrays in one batch")
        return np.ndarray(shape, "b" if placeholder else dtype)

    @staticmethod
    def _dtype(spec: object, align: object = False, copy: object = True) -> np.dtype:
        if type(spec) is not str or spec.lstrip("<>|=") not in _DTYPES:
            raise pickle.UnpicklingError(f"forbidden dtype {spec!r}")
        return np.dtype(spec, bool(align), bool(copy))


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


def _parse_batch(name: str, raw: bytes, budget: _Budget) -> tuple[np.ndarray, np.ndarray]:
    budget.start_batch()
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), budget, encoding="bytes").load()
    except Exception as err:  # any unpickling failure is a bad file, whatever its kind
        raise UserError(f"{name} is not a CIFAR-10 batch pickle ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{name} is not a CIFAR-10 batch (needs the keys b'data' and b'labels')")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UserError(f"{name}: b'data' must be a uint8 array of shape (N, 3072), got {dtype} {shape}")
    if not data.flags.c_contiguous:
        raise UserError(f"{name}: b'data' is not one contiguous array")
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


def _gzip_header(path: Path) -> None:
    with _reading(path), open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise UserError(f"{path} is not a gzip file (expected the CIFAR-10 python .tar.gz)")


def checked_source(source: Path) -> Path:
    """A regular file or a folder: anything else (a FIFO, a device) could block forever when read. A file's
    gzip header is checked here, first: before it is hashed (20 GiB of something else took a minute)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"source not found: {source}")
    if not (source.is_file() or source.is_dir()):
        raise UserError(f"{source} is neither a regular file nor a folder")
    if source.is_file():
        _gzip_header(source)
    return source


def load_cifar(source: Path, expect_counts: tuple[int, int] = (50_000, 10_000)) -> Cifar:
    """Read and validate the five training batches and the test batch of a CIFAR-10 python copy."""
    source = checked_source(source)
    try:
        raw = _read_members_from_dir(source) if source.is_dir() else _read_members_from_tar(source)
    except OSError as err:  # unreadable file, I/O error: the source's fault, said in one line
        raise UserError(f"cannot read {err.filename or source}: {err.strerror or first_line(err)}") from None
    # Counted as each batch is parsed, before any is copied: a batch of more images than the split may hold
    # is refused before the concatenation that would copy it out.
    budget = _Budget(sum(len(r) for r in raw.values()))
    train, seen = [], 0
    for n in TRAIN_BATCHES:
        train.append(_parse_batch(n, raw[n], budget))
        seen += len(train[-1][0])
        if seen > expect_counts[0]:
            raise UserError(f"expected {expect_counts[0]} training images, found more ({seen} by {n})")
    test_x, test_y = _parse_batch(TEST_BATCH, raw[TEST_BATCH], budget)
    if (seen, len(test_x)) != tuple(expect_counts):
        raise UserError(
            f"expected {expect_counts[0]} training and {expect_counts[1]} test images, "
            f"found {seen} and {len(test_x)}"
        )
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
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

