"""Shared fixtures: small synthetic CIFAR archives in the exact official layout, and betons built
once per session from them (importing ffcv and JIT-compiling a Loader are the slow parts)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

# A pixel with distinct R, G, B values at a known place, planted in training image 0.
PIXEL_ROW, PIXEL_COL, PIXEL_RGB = 3, 7, (11, 22, 33)
SMALL = dict(per_batch=100, n_test=110, val_per_class=5)  # 500 train -> 450 + 50; 110 test
SMALL_COUNTS = "500,110"


def make_batches(per_batch: int = 100, n_test: int = 110, seed: int = 0) -> dict[str, dict]:
    """Pickle-ready dicts for data_batch_1..5 and test_batch, balanced labels, random pixels."""
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
    first = batches["data_batch_1"][b"data"]
    for channel, value in enumerate(PIXEL_RGB):
        first[0, channel * 1024 + PIXEL_ROW * 32 + PIXEL_COL] = value
    return batches


def write_archive(path: Path, batches: dict[str, dict], skip: tuple[str, ...] = ()) -> Path:
    """Write batches as cifar-10-python.tar.gz: a cifar-10-batches-py/ folder of protocol-2 pickles."""
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                             b"horse", b"ship", b"truck"], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [("batches.meta", meta), *batches.items()]:
            if name in skip:
                continue
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def build_small(data_dir: Path, archive: Path, **kwargs):
    from fastcifar.betons import build

    return build(archive, data_dir, val_per_class=SMALL["val_per_class"],
                 expect_counts=(5 * SMALL["per_batch"], SMALL["n_test"]), **kwargs)


@pytest.fixture(scope="session")
def small_batches() -> dict[str, dict]:
    return make_batches(SMALL["per_batch"], SMALL["n_test"])


@pytest.fixture(scope="session")
def small_archive(tmp_path_factory, small_batches) -> Path:
    return write_archive(tmp_path_factory.mktemp("src") / "cifar-10-python.tar.gz", small_batches)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_archive) -> Path:
    """A data dir with train/val/test betons and manifest built from the small archive."""
    data_dir = tmp_path_factory.mktemp("data")
    build_small(data_dir, small_archive)
    return data_dir


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache(tmp_path_factory):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
