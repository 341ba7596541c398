"""Importing FFCV without losing torch's intra-op threads.

FFCV 1.0.2's `Compiler.set_num_threads(n)` sets numba's threads *and* `torch.set_num_threads(n)`,
and it is called (a) once when `ffcv` is imported, with n = 1, (b) by every `Loader.__init__` and
(c) by every epoch's loader thread, with n = num_workers. So merely reading a beton left the model
on one thread (a 2-core CPU training step took twice as long, measured), and `--workers` silently
became the model's thread count. Every FFCV import of ours goes through `import_ffcv()`.
"""

from __future__ import annotations

import os


def import_ffcv() -> None:
    """Import FFCV, put torch's thread count back as it was, and patch FFCV's Compiler to set numba's
    threads only. Idempotent; call it before any `from ffcv... import`."""
    import torch

    threads = torch.get_num_threads()
    import numba
    from ffcv.pipeline.compiler import Compiler

    if getattr(Compiler.set_num_threads, "_fastcifar", False):
        return

    def set_num_threads(cls, n: int) -> None:
        cls.num_threads = n if n >= 1 else os.cpu_count()
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    set_num_threads._fastcifar = True
    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)
