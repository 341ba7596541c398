"""Convert the CIFAR-10 python archive into train/val/test FFCV betons, from a checkout (see README);
an installed fastcifar runs the same as `python -m fastcifar.make_beton` or `fastcifar-make-beton`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcifar.betons import cli  # noqa: E402

if __name__ == "__main__":
    cli()
