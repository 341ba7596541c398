"""`python -m fastcifar.ladder`: the command's documented name (code: benchmarks/ladder.py)."""

from .benchmarks.ladder import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
