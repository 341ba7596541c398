"""Reload trained weights and measure accuracy on a split:
`python -m fastcifar.evaluate --weights results/RUN.pt --split test`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import check_betons, make_loader
from .devices import resolve_device
from .model import resnetv2_20
from .train import evaluate
from .utils import ArgumentParser, UserError, first_line, run_cli


def load_model(weights: Path, device: torch.device) -> torch.nn.Module:
    if not Path(weights).is_file():
        raise UserError(f"weights file not found: {weights}")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        model = resnetv2_20()
        model.load_state_dict(state)
    except Exception as err:  # a wrong or damaged file, whatever the exact failure
        raise UserError(f"{weights} is not a ResNetV2-20 state dict ({first_line(err)})") from None
    return model.to(device=device, memory_format=torch.channels_last)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="a .pt file written by fastcifar.train")
    p.add_argument("--split", choices=["val", "test"], default="test", help="which beton to evaluate")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="FFCV loader threads")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    device = resolve_device(args.device)
    model = load_model(args.weights, device)
    check_betons(args.data_dir)
    loader = make_loader(args.data_dir / f"{args.split}.beton", device, args.batch_size, args.workers)
    result = evaluate(model, loader, device, desc=args.split)
    if args.json:
        print(json.dumps({"split": args.split, **result}))
    else:
        print(f"{args.split}: accuracy {100 * result['accuracy']:.2f}% ({result['images']:,} images), "
              f"loss {result['loss']:.4f}")
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.evaluate")


if __name__ == "__main__":
    cli()
