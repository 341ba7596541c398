"""Reading a results file: only a regular file inside the results root, of bounded size, parsed by the standard
library with what JSON parsers let through refused (duplicate keys, 1e999 as infinity, NaN, integers too large
to format, nesting too deep), then validated as a typed record (records.py). Every refusal is one line naming
the file (and the field), exit 2."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..utils import UserError, read_bounded

MAX_FILE_BYTES = 8 << 20  # the largest committed results file is ~0.1 MB




class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} is not a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise _Refused(f"the integer {text[:20]}... has more than 19 digits")
    return int(text)


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a number JSON allows")


def inside(path: Path, root: Path | None) -> None:
    """Refuse, by name, a path that leads out of `root` (through a link): only the results are read."""
    if root is not None:
        real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
        if base != real and base not in real.parents:
            raise UserError(f"{path}: a link leading out of {root}")


def read_json(path: Path, root: Path | None = None) -> object | None:
    """The parsed file; None only when nothing exists at `path` ("not measured"). Not a regular file, a link
    out of `root`, over the size bound, unreadable, not UTF-8, not JSON, duplicate keys, NaN/Infinity or
    1e999, an integer of more than 19 digits, nested too deeply, null: refused in one line naming the file."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    inside(path, root)
    raw = read_bounded(path, MAX_FILE_BYTES, "a results file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_constant, parse_float=_finite,
                          parse_int=_bounded_int)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply") from None
    except _Refused as err:
        raise UserError(f"{path}: {err}") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if data is None:  # null is no results file, and None must keep meaning "absent"
        raise UserError(f"{path}: must be a JSON object, got null")
    return data


def _where(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {got!r}"[:80]
    return (f" field {loc!r}" if loc else "") + f": {first['msg']}{shown}"


def parse(path: Path, data: object, model: type[BaseModel]) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{path}:{_where(err)}") from None


def read_record(path: Path, model: type[BaseModel], root: Path | None = None) -> Any:
    """A results file read (`read_json`) and validated as `model`; None only when it does not exist."""
    data = read_json(path, root)
    return None if data is None else parse(path, data, model)
