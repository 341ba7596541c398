"""`python -m fastcifar.bench_setup`: the command's documented name (code: benchmarks/bench_setup.py)."""

from .benchmarks.bench_setup import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
