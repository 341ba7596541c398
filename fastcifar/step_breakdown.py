"""`python -m fastcifar.step_breakdown`: the command's documented name (code: benchmarks/step_breakdown.py)."""

from .benchmarks.step_breakdown import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
