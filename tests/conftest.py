"""Shared fixtures: small synthetic CIFAR archives in the exact official layout, and betons built
once per session from them (importing ffcv and JIT-compiling a Loader are the slow parts)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fastcifar import synthetic
from fastcifar.synthetic import write_archive  # noqa: F401  (re-exported for the tests)

# A pixel with distinct R, G, B values at a known place, planted in training image 0.
PIXEL_ROW, PIXEL_COL, PIXEL_RGB = 3, 7, (11, 22, 33)
SMALL = dict(per_batch=100, n_test=110, val_per_class=5)  # 500 train -> 450 + 50; 110 test
SMALL_COUNTS = "500,110"


def free_port() -> int:
    """A TCP port free on 127.0.0.1, chosen below the kernel's ephemeral range. A port from bind(0)
    lies inside that range, from which the kernel also hands ports to every outgoing connection, so
    it can be taken before the server binds it; one below it only by an explicit bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    start = 10_000 + os.getpid() % max(1, low - 11_000)  # spread concurrent test runs apart
    for port in [*range(start, low), *range(10_000, start)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port below {low}")


def make_batches(per_batch: int = 100, n_test: int = 110, seed: int = 0) -> dict[str, dict]:
    """Synthetic batches with PIXEL_RGB planted in training image 0 at (PIXEL_ROW, PIXEL_COL)."""
    batches = synthetic.make_batches(per_batch, n_test, seed)
    first = batches["data_batch_1"][b"data"]
    for channel, value in enumerate(PIXEL_RGB):
        first[0, channel * 1024 + PIXEL_ROW * 32 + PIXEL_COL] = value
    return batches


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
    os.environ.setdefault("FASTCIFAR_DEVICE_OP_CACHE", "0")  # every test times its device op's candidates
