"""Reading and checking betons: the manifest that proves a set complete and current, each beton's structure
and labels (FFCV's numba readers check no bounds, so a damaged file must be refused before a Loader reads
it), and a split read whole as numpy arrays. Used by the trainer at every start and by the conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .archive import NUM_CLASSES
from .ffcv_threads import import_ffcv
from .utils import UserError, sha256_file

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


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

