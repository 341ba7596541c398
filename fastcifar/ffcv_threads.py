"""Importing FFCV: in well under a second, and without losing torch's intra-op threads.

Threads: FFCV 1.0.2's `Compiler.set_num_threads(n)` sets numba's threads *and*
`torch.set_num_threads(n)`, and it is called (a) once when `ffcv` is imported, with n = 1, (b) by
every `Loader.__init__` and (c) by every epoch's loader thread, with n = num_workers. So merely
reading a beton left the model on one thread (a 2-core CPU training step took twice as long,
measured), and `--workers` silently became the model's thread count.

Time: `ffcv.fields.rgb_image` builds a two-entry table `IMAGE_MODES` as a numba typed `Dict` at
import, and creating a process's first typed Dict makes numba compile the dictionary's whole
implementation: ~5 s of a 5.5 s import on a 2-core AMD EPYC, the largest piece of start-up outside
torch.compile. FFCV reads that table from Python only (decoders copy its values into local
variables before their numba code is compiled; the writer stores a value into a numpy record), so
a plain dict behaves the same: it is built as one. Every FFCV import of ours goes through
`import_ffcv()`.
"""

from __future__ import annotations

import os
import signal
import sys

from .utils import signals_held


def import_ffcv() -> None:
    """Import FFCV (its image-mode table a plain dict), put torch's thread count back as it was,
    and patch FFCV's Compiler to set numba's threads only. Idempotent; call it before any
    `from ffcv... import`.

    Ctrl-C is held during the first import and delivered as it returns: one landing while torch's
    extension runs Python code from C++ aborts the process ("terminate called after throwing ...
    KeyboardInterrupt") instead of raising, so no handler or temporary-file cleanup would run."""
    with signals_held(signal.SIGINT):
        _import_ffcv()


def _import_ffcv() -> None:
    import torch

    threads = torch.get_num_threads()
    import numba
    import numba.typed

    if "ffcv.fields.rgb_image" not in sys.modules:  # the first import: the table is built now
        # numba.typed resolves Dict lazily (a module __getattr__): an attribute set here shadows it
        # for the modules FFCV imports now, and deleting it restores numba's own.
        numba.typed.Dict = dict
        try:
            import ffcv.fields.rgb_image  # noqa: F401
        finally:
            del numba.typed.Dict
    from ffcv.pipeline.compiler import Compiler

    if getattr(Compiler.set_num_threads, "_fastcifar", False):
        return

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = n if n >= 1 else os.cpu_count()
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    set_num_threads._fastcifar = True
    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)
