"""`python -m fastcifar.measure`: the command's documented name; its code is fastcifar/benchmarks/measure.py."""

from .benchmarks.measure import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
