"""`python -m fastcifar.make_beton`: the CIFAR-10 python archive -> train/val/test betons (betons.py)."""

from .betons import cli

if __name__ == "__main__":
    cli()
