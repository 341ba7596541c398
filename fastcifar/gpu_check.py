"""`python -m fastcifar.gpu_check`: the command's documented name; its code is fastcifar/benchmarks/gpu_check.py."""

from .benchmarks.gpu_check import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
