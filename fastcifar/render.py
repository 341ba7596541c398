"""`python -m fastcifar.render`: the command's documented name; its code is fastcifar/reporting/render.py."""

from .reporting.render import cli, main  # noqa: F401

if __name__ == "__main__":
    cli()
