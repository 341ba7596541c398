"""Reading and checking betons: the manifest that proves a set complete and current, each beton's structure
and labels (FFCV's numba readers check no bounds, so a damaged file must be refused before a Loader reads
it), and a split read whole as numpy arrays. Used by the trainer at every start and by the conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .archive import NUM_CLASSES
from .ffcv_threads import import_ffcv
from .manifest import FORMAT_VERSION, MANIFEST, SPLITS, read_manifest  # noqa: F401  (re-exported)
from .utils import UserError, sha256_file


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
# FFCV's type id of each field as make_beton writes it (ffcv.types.TYPE_ID_HANDLER): the id decides the
# metadata layout FFCV reads and the decoder it runs, so a label turned float or an image turned bytes is
# another file, not a variant.
FIELD_TYPES = {"image": 2, "label": 1, "index": 1}
TYPE_NAMES = {0: "FloatField", 1: "IntField", 2: "RGBImageField", 3: "BytesField", 4: "NDArrayField",
              5: "JSONField", 6: "TorchTensorField", 255: "a custom field"}
RAW_MODE = 1  # RGBImageField's 'raw' (0 is JPEG: decoded by FFCV from the bytes, black on failure)


def _header_problem(beton: Path, size: int) -> str | None:
    """The header and field descriptors, read with plain numpy before FFCV's Reader sees the file: the format
    version, three fields named and typed as make_beton writes them, and a metadata table that fits the file
    (a huge sample count would otherwise size every read that follows)."""
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType

    if size < HeaderType.itemsize + len(FIELDS) * FieldDescType.itemsize:
        return f"{beton} is too short to be a beton ({size} bytes)"
    header = np.fromfile(beton, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        return f"{beton}: FFCV format version {int(header['version'])}, need {CURRENT_VERSION}"
    if int(header["num_fields"]) != len(FIELDS):
        return f"{beton} has {int(header['num_fields'])} fields, not {len(FIELDS)} ({', '.join(FIELDS)})"
    descriptors = np.fromfile(beton, dtype=FieldDescType, count=len(FIELDS), offset=HeaderType.itemsize)
    names = [bytes(d["name"]).split(b"\0", 1)[0].decode("latin1") for d in descriptors]
    if names != FIELDS:
        return f"{beton} has the fields {names}, not {FIELDS} (rebuild it with make_beton)"
    for name, type_id in zip(names, descriptors["type_id"].tolist(), strict=True):
        if type_id != FIELD_TYPES[name]:
            return (f"{beton}: field {name!r} is FFCV's {TYPE_NAMES.get(type_id, f'type {type_id}')}, "
                    f"not {TYPE_NAMES[FIELD_TYPES[name]]}")
    n = int(header["num_samples"])
    row = _metadata_type().itemsize
    if n > (size - HeaderType.itemsize - descriptors.nbytes) // row:
        return f"{beton}: its header says {n} samples, more than its {size} bytes can hold"
    return None


def _metadata_type() -> np.dtype:
    """One sample's metadata row as FFCV lays it out for make_beton's three fields."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import get_metadata_type

    return get_metadata_type([RGBImageField(), IntField(), IntField()])


def structure_problem(beton: Path) -> str | None:
    """Why a beton's structure is not one make_beton writes (None when it is), from its header, field
    descriptors, metadata and allocation table alone (plain numpy, no JIT, milliseconds), before any FFCV
    Loader opens it: FFCV's numba readers check no bounds and trust every one of these. Checked: the
    format version; the fields image/label/index with FFCV's types RGBImageField/IntField/IntField; the
    header's sample count is the metadata table's length; every image's metadata says raw mode, 32x32
    (FFCV sizes its buffers from these and copies the allocation into them: a smaller size would write
    past them, JPEG mode would decode raw pixels into black); the index column unique and >= 0; the
    allocation table lies at the end of the file; every sample's image is one raw 32x32 allocation of
    its own, inside the data region and inside one page, no two overlapping."""
    import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    try:
        size = Path(beton).stat().st_size
        problem = _header_problem(beton, size)
        if problem:
            return problem
        reader = Reader(str(beton))
    except Exception as err:  # whatever a damaged header does to numpy's or FFCV's reader
        return f"{beton} is not a readable beton ({type(err).__name__})"
    n = int(reader.num_samples)
    page = int(reader.page_size)
    if reader.metadata.dtype != _metadata_type() or len(reader.metadata) != n:
        return f"{beton}: its header says {n} samples, its metadata table holds {len(reader.metadata)}"
    if n < 1 or page < IMAGE_BYTES or page & (page - 1):
        return (f"{beton}: {n} samples in pages of {page} bytes (need >= 1 sample, pages a power of two "
                f"that hold an image)")
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    table_at = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    if not data_start <= table_at <= size or table_at + table.nbytes != size or len(table) != n:
        return (f"{beton}: its allocation table ({len(table)} entries at byte {table_at}, "
                f"{ALLOC_TABLE_TYPE.itemsize} bytes each) does not fill the end of the file ({size} bytes) "
                f"with one entry per sample ({n})")
    ptr, length, sample = (table[k].astype(np.int64) for k in ("ptr", "size", "sample_id"))
    outside = np.flatnonzero((ptr < data_start) | (ptr + length > table_at) | (length != IMAGE_BYTES)
                             | (ptr // page != (ptr + length - 1) // page))
    if outside.size:
        i = outside[0]
        return (f"{beton}: allocation {i} ({length[i]} bytes at byte {ptr[i]}) is not one image inside the data "
                f"region (bytes {data_start}-{table_at}) and one page")
    if not np.array_equal(np.sort(sample), np.arange(n)):
        return f"{beton}: its allocation table does not hold exactly one allocation per sample"
    if (np.diff(np.sort(ptr)) < IMAGE_BYTES).any():
        return f"{beton}: two of its allocations overlap"
    image = reader.metadata["f0"]
    for field, want in (("mode", RAW_MODE), ("width", 32), ("height", 32)):
        wrong = np.flatnonzero(image[field] != want)
        if wrong.size:
            i = wrong[0]
            return (f"{beton}: image {i}'s metadata says {field} {image[field][i]}, not {want} "
                    "(make_beton writes raw 32x32 RGB images)")
    index = reader.metadata["f2"]
    if (index < 0).any() or len(np.unique(index)) != n:
        return f"{beton}: its index field is not {n} distinct non-negative source indices"
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

    The manifest is read as a typed record (`manifest.read_manifest`). Sizes are always compared; sha256
    only when check_hashes (0.5-0.8 s for the full 210 MB set on the 2-core Intel Xeon dev machine): a
    same-size beton from another split seed, or with changed pixels, differs only there. Then each beton's
    structure (`structure_problem`: a hash proves a file unchanged, not safe to read) and labels
    (`labels_problem`) are checked.
    """
    manifest_path = Path(data_dir) / MANIFEST
    try:
        manifest = read_manifest(manifest_path)
    except UserError as err:
        return str(err)
    for split in SPLITS:
        record = manifest.split(split)
        beton = Path(data_dir) / f"{split}.beton"
        if not beton.is_file():
            return f"{beton} is missing" if not beton.exists() else f"{beton} is not a regular file"
        if beton.stat().st_size != record.bytes or (check_hashes and sha256_file(beton) != record.sha256):
            return f"{beton} does not match {manifest_path} (stale or modified)"
    if check_hashes:
        for split in SPLITS:
            beton = Path(data_dir) / f"{split}.beton"
            problem = structure_problem(beton) or labels_problem(beton, manifest.split(split).images)
            if problem:
                return problem
    return None
