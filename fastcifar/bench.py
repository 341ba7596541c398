"""`python -m fastcifar.bench`: the command's documented name; its code is fastcifar/benchmarks/bench.py."""

from .benchmarks.bench import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
