"""Small CIFAR-10 archives in the exact official layout, with random pixels: what the tests and
`tools/gpu_check.py --smoke` train on, so neither needs the real data set."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def make_batches(per_batch: int = 100, n_test: int = 110, seed: int = 0) -> dict[str, dict]:
    """Pickle-ready dicts for data_batch_1..5 and test_batch: balanced labels, random pixels."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        labels = rng.permutation(np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batches[name] = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)],
        }
    return batches


def write_archive(path: Path, batches: dict[str, dict], skip: tuple[str, ...] = ()) -> Path:
    """Write batches as cifar-10-python.tar.gz: a cifar-10-batches-py/ folder of protocol-2 pickles."""
    meta = {b"label_names": LABEL_NAMES, b"num_cases_per_batch": 10000, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [("batches.meta", meta), *batches.items()]:
            if name in skip:
                continue
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path
