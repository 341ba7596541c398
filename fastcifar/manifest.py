"""The betons' manifest as a typed record (pydantic v2): every field the trainer, evaluate and the converter
read is declared with its type and bounds, so a manifest handed over with a field missing, mistyped or out
of range is one line naming the field, never a KeyError; its size and nesting are bounded before parsing.

Why pydantic: a well-kept validator whose errors carry the field's path, strict types (no "5" for 5, no
float for an int), and a JSON parser (jiter) with a recursion limit, so a manifest nested 100,000 deep is
a validation error, not Python's RecursionError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .archive import NUM_CLASSES
from .utils import UserError, read_bounded

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # the converter writes about 1.5 KB

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Count = Annotated[int, Field(ge=1, le=1 << 40)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class SplitRecord(_Strict):
    """One beton: its image count (what the loaders size their buffers by), its bytes and hash."""

    images: Count
    index_refers_to: str
    per_class: Annotated[list[Annotated[int, Field(ge=0, le=1 << 40)]], Field(min_length=NUM_CLASSES,
                                                                               max_length=NUM_CLASSES)]
    sha256: Hex64
    bytes: Count

    @model_validator(mode="after")
    def _classes_sum_to_images(self) -> SplitRecord:
        if sum(self.per_class) != self.images:
            raise ValueError(f"per_class sums to {sum(self.per_class)}, not its {self.images} images")
        return self


class Splits(_Strict):
    train: SplitRecord
    val: SplitRecord
    test: SplitRecord


class Manifest(_Strict):
    """What make_beton writes last: its presence, with matching hashes, means the set is complete."""

    format_version: Literal[1]
    source_sha256: Hex64
    split_seed: Annotated[int, Field(ge=0, le=(1 << 63) - 1)]
    val_per_class: Count
    fastcifar_version: str
    source: str
    source_md5: Hex32
    official_archive: bool
    counts: dict[Literal["train", "val", "test"], Count]
    splits: Splits

    @model_validator(mode="after")
    def _counts_agree(self) -> Manifest:
        split_counts = {s: getattr(self.splits, s).images for s in SPLITS}
        if self.counts != split_counts:
            raise ValueError(f"counts {self.counts} differ from the splits' images {split_counts}")
        return self

    def split(self, name: str) -> SplitRecord:
        return getattr(self.splits, name)

    def request(self) -> dict:
        """The fields that decide whether a set is the one a conversion asks for."""
        return {"format_version": self.format_version, "source_sha256": self.source_sha256,
                "split_seed": self.split_seed, "val_per_class": self.val_per_class}


def _where(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the top level"
    return f"{where}: {first['msg']}"


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`, validated, or UserError naming the file and the first bad field. Only a regular
    file of at most MAX_MANIFEST_BYTES is read (a FIFO would block, /dev/zero never end)."""
    raw = read_bounded(path, MAX_MANIFEST_BYTES, "a fastcifar manifest")
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as err:
        raise UserError(f"{path} is not a valid manifest ({_where(err)})") from None
