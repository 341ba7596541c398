"""CIFAR-10 archives in the exact official layout, with seeded random pixels and labels: what the
tests and `gpu_check --smoke` train on, so neither needs the real data set. Also a command, for a
machine without the data (an offline GPU box, a first try of an installed fastcifar):
`python -m fastcifar.synthetic OUT.tar.gz` writes a full-size one (50,000 + 10,000 images); betons of
it load and train at CIFAR's speed (raw pixels of the same size), at chance accuracy."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .utils import ArgumentParser, UserError, atomic_path, run_cli

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
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:  # random pixels do not compress: be quick
        for name, obj in [("batches.meta", meta), *batches.items()]:
            if name in skip:
                continue
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.synthetic", description="Write a CIFAR-10 python archive of random images.")
    p.add_argument("out", type=Path, help="the .tar.gz to write (convert it with make_beton --source OUT)")
    p.add_argument("--per-batch", type=int, default=10_000, help="images in each of the five training batches")
    p.add_argument("--n-test", type=int, default=10_000, help="images in the test batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixels and labels")
    args = p.parse_args(argv)
    if args.per_batch < 10 or args.n_test < 1 or args.seed < 0:
        raise UserError("--per-batch must be >= 10 (a validation image of every class), --n-test >= 1, --seed >= 0")
    if not args.out.parent.is_dir():
        raise UserError(f"no such folder: {args.out.parent}")
    with atomic_path(args.out) as tmp:
        write_archive(tmp, make_batches(args.per_batch, args.n_test, args.seed))
    print(f"wrote {args.out}: {5 * args.per_batch:,} training and {args.n_test:,} test images of random pixels "
          f"(convert: make_beton --source {args.out} --expect-counts {5 * args.per_batch},{args.n_test})")
    return 0


if __name__ == "__main__":
    run_cli(main, "fastcifar.synthetic")
