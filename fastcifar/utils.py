"""Small helpers shared by every command: one-line errors, atomic files, hashes, child processes. No torch
here (devices are devices.py's), so the reading half (fastcifar.reporting) imports it on any Python."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: printed as one line, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (via UserError), not usage text plus an error; --help
    shows every default (they are the spec's recipe)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(message)


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main: Callable[[Sequence[str] | None], int], prog: str) -> None:
    """Run `main`; every failure a user can cause becomes one stderr line and exit code 2.

    The one place for it: UserError (what we validate), OSError (files, folders, disks, devices:
    what the machine or the user's paths did) and MemoryError. Anything else is a bug of ours and
    keeps its traceback.
    """
    try:
        check_cache_folders()
        code = main(None)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"{prog}: error: {err.strerror or first_line(err)}{where}", file=sys.stderr)
        code = 2
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


# Folders that torch (Inductor, even imported by an eager run) and numba create and write on import or first use.
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "Inductor's compile cache", "NUMBA_CACHE_DIR": "numba's compile cache"}


def check_cache_folders() -> None:
    """A cache variable naming something that is not a folder is refused up front, with the variable's name:
    torch would stop every run, with or without --compile, with 'File exists (<path>)'."""
    for name, what in CACHE_VARIABLES.items():
        value = os.environ.get(name)
        if value and os.path.lexists(value) and not os.path.isdir(value):
            raise UserError(f"{name}={value} is not a folder: point it at a folder for {what}, or unset it")


def file_digests(*paths: Path, chunk: int = 1 << 20,
                 algorithms: tuple[str, ...] = ("md5", "sha256")) -> tuple[str, ...]:
    """The hex digests (default md5, sha256) of one file, or of several read one after another in the
    given order; read once."""
    hashes = [hashlib.new(name) for name in algorithms]
    for path in paths:
        try:
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    for h in hashes:
                        h.update(block)
        except OSError as err:
            if err.filename is None:  # a read() error (EIO) names no file: name the one being read
                raise OSError(err.errno, err.strerror, str(path)) from err
            raise
    return tuple(h.hexdigest() for h in hashes)


def sha256_file(path: Path) -> str:
    """sha256 alone: the beton check runs it at every start, and md5 beside it took 3x as long (AMD EPYC)."""
    return file_digests(path, algorithms=("sha256",))[0]


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block completes.

    An interrupted block (exception, Ctrl-C) removes the temporary file, so nothing that
    looks complete is ever left behind. A hard kill can leave a `*.tmp` file, never `final`.
    An OSError on the temporary file (no space, no inode) or on the rename names `final`, the file
    the user asked for, never the temporary.
    """
    final = Path(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(final)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, final)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        if err.filename in (tmp, str(tmp_path)) or err.filename2 == str(final):
            raise OSError(err.errno, err.strerror, str(final)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def writable_folder(folder: Path, what: str) -> Path:
    """Create `folder` and prove a file can be written there now, before hours of training, not after."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {what} {folder}: {err.strerror or err}") from None
    return folder


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes (`what` names the kind of file
    in the error). Opened without blocking and checked again once open: a FIFO would block forever, a device
    such as /dev/zero never end. One line naming the file otherwise (UserError)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing" if not os.path.lexists(path) else
                        f"{path}: not a regular file (a FIFO, device or folder is never read as {what})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{path}: not a regular file")
            raw = f.read(limit + 1)
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(raw) > limit:
        raise UserError(f"{path}: larger than {what} ({limit:,} bytes at most)")
    return raw


@contextlib.contextmanager
def signals_held(*signums: int) -> Iterator[None]:
    """The given signals held inside the block and delivered, to the handlers they had, as soon as it ends.
    Python-level handlers that record each signal, not a blocked mask: blocking it in the main thread alone
    would let the kernel hand it to another thread of the process (numba's, FFCV's), and Python would then
    raise it in the main thread inside the block all the same. In the main thread only (signal handlers can
    be set nowhere else); elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in got:
            signal.raise_signal(s)


def free_name(path: Path, what: str) -> None:
    """Refuse a name taken by anything but a regular file (a folder, FIFO, device or link), which the final
    rename of an output would fail on, or a FIFO block, after the work."""
    path = Path(path)
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        kind = "a folder" if path.is_dir() else "a link" if path.is_symlink() else "not a regular file"
        raise UserError(f"{what} {path} is {kind}: move it away or choose another name")


def writable_file(path: Path, what: str) -> Path:
    """Prove now, before the work, that `path` can be written: its folder is writable (`writable_folder`) and
    the name is free or a regular file, never a folder, FIFO or device that the final rename would fail on
    (or a FIFO would block) after minutes or hours of work."""
    path = Path(path)
    writable_folder(path.parent, "the output folder")
    free_name(path, what)
    return path


def plain_name(name: str, what: str) -> str:
    """A name that becomes a file name: letters, digits, '.', '_' and '-', not '.' or '..'."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name) or name in (".", ".."):
        raise UserError(f"{what} must be a plain file name (letters, digits, '.', '_', '-'), got {name!r}")
    return name


def write_json_atomic(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# The folder holding this fastcifar (a checkout or site-packages): every child process imports the same one.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; every logical CPU where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def child_env(caches: Path | None = None) -> dict[str, str]:
    """The environment of a fastcifar command run as a child process: unbuffered output, this fastcifar
    first on PYTHONPATH and, with `caches`, Inductor's and numba's compile caches under that folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    if caches is not None:
        env |= {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "NUMBA_CACHE_DIR": str(caches / "numba")}
    return env
