"""From a checkout: `python tools/gpu_check.py` runs `python -m fastcifar.gpu_check`, the command of an
installed fastcifar."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcifar.benchmarks.gpu_check import cli  # noqa: E402

if __name__ == "__main__":
    cli()
