"""`python -m fastcifar.bench_startup`: the command's documented name (code: benchmarks/bench_startup.py)."""

from .benchmarks.bench_startup import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
