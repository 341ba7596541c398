"""`python -m fastcifar.bench_loader`: the command's documented name (code: benchmarks/bench_loader.py)."""

from .benchmarks.bench_loader import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
