"""From a checkout: `python tools/bench_loader.py` runs `python -m fastcifar.bench_loader`, the command of an
installed fastcifar."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcifar.benchmarks.bench_loader import cli  # noqa: E402

if __name__ == "__main__":
    cli()
