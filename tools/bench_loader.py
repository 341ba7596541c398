"""Loader benchmark: images/s of ready-to-train batches on the device, after a warm-up epoch.

  ffcv          fastcifar's FFCV pipeline (raw pixels -> device -> batched crop/flip/normalise)
  conventional  torch DataLoader over the same decoded uint8 images with per-image transforms
                ToTensor -> Normalize -> Pad(4) -> RandomHorizontalFlip -> RandomCrop(32), then .to(device)
                (torchvision's transforms when installed, else the same steps in plain torch)
  in_memory     upper bound: the whole split as one uint8 tensor on the device, batches by index,
                then the same batched device op as ffcv

Usage: python tools/bench_loader.py --data-dir data [--device auto] [--workers 2] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fastcifar.augment import IMAGENET_MEAN, IMAGENET_STD, RandomCropFlip  # noqa: E402
from fastcifar.data import check_betons, make_loader, read_beton  # noqa: E402
from fastcifar.precompile import batch_sizes, frozen  # noqa: E402
from fastcifar.utils import (  # noqa: E402
    ArgumentParser,
    UserError,
    device_name,
    resolve_device,
    run_cli,
    synchronize,
    write_json_atomic,
)


class PlainTorchTransforms:
    """torchvision's ToTensor -> Normalize -> Pad(4) -> RandomHorizontalFlip -> RandomCrop(32), per image."""

    def __init__(self):
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, image_hwc):
        x = torch.from_numpy(image_hwc).permute(2, 0, 1).float().div(255)
        x = (x - self.mean) / self.std
        x = torch.nn.functional.pad(x, (4, 4, 4, 4))
        if torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        top, left = torch.randint(0, 9, (2,)).tolist()
        return x[:, top:top + 32, left:left + 32]


def conventional_transforms():
    try:
        from torchvision import transforms as T
    except Exception:  # not installed, or a build that fails to import beside this torch
        return PlainTorchTransforms(), "plain torch"
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD), T.Pad(4),
                      T.RandomHorizontalFlip(), T.RandomCrop(32)]), "torchvision"


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def conventional_batches(images, labels, device, batch_size, workers):
    transform, _ = conventional_transforms()
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, labels, transform), batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=False, persistent_workers=workers > 0)

    def epoch():
        for x, y in loader:
            yield (x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   y.to(device, non_blocking=True))

    return epoch, len(loader)


def in_memory_batches(images, labels, device, batch_size, seed, compile_augment):
    all_images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # uint8, channels_last view
    all_labels = torch.from_numpy(labels).to(device)
    augment = RandomCropFlip(seed, device, compile=compile_augment)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    n = len(all_images)
    if compile_augment:
        augment.warm_up(batch_sizes(n, batch_size))

    def epoch():
        order = torch.randperm(n, device=device, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield augment(all_images[idx]), all_labels[idx]

    return epoch, (n + batch_size - 1) // batch_size


def ffcv_batches(path, device, batch_size, workers, seed, compile_augment):
    loader = make_loader(path, device, batch_size, workers, train=True, seed=seed, compile_augment=compile_augment)
    if compile_augment:  # compile on this thread, never in FFCV's (see fastcifar/precompile.py)
        loader.augment.warm_up(batch_sizes(loader.images, batch_size))

    def epoch():
        for images, labels, _ in loader:
            yield images, labels

    return epoch, len(loader)


def measure(name: str, epoch, n_batches: int, epochs: int, device) -> dict:
    """One warm-up epoch, then `epochs` timed epochs; the clock stops after the device is done."""
    seconds, total = [], 0
    for e in range(epochs + 1):
        warm = e == 0
        synchronize(device)
        t0 = time.perf_counter()
        seen = 0
        desc = f"{name} {'warm-up' if warm else f'epoch {e}'}"
        for batch, _labels in tqdm(epoch(), total=n_batches, leave=False, desc=desc):
            seen += batch.shape[0]
        synchronize(device)
        if not warm:
            seconds.append(time.perf_counter() - t0)
            total += seen
    return {"images_per_s": total / sum(seconds), "seconds_per_epoch": sum(seconds) / len(seconds),
            "epoch_seconds": seconds, "images_per_epoch": total // epochs}


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="betons from tools/make_beton.py")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=2, help="FFCV threads and DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    p.add_argument("--seed", type=int, default=0, help="order and augmentation seed")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the batched device op, as `train --compile` does")
    p.add_argument("--out", type=Path, default=Path("results/bench_loader.json"), help="JSON results")
    args = p.parse_args(argv)
    if args.workers < 1 or args.batch_size < 1 or args.epochs < 1:
        raise UserError("--workers, --batch-size and --epochs must be at least 1")
    device = resolve_device(args.device)
    check_betons(args.data_dir)
    path = args.data_dir / "train.beton"
    data = read_beton(path, ("image", "label"))
    images, labels = data["image"], data["label"]
    _, conventional_kind = conventional_transforms()

    pipelines = {
        "ffcv": ffcv_batches(path, device, args.batch_size, args.workers, args.seed, args.compile),
        "conventional": conventional_batches(images, labels, device, args.batch_size, args.workers),
        "in_memory": in_memory_batches(images, labels, device, args.batch_size, args.seed, args.compile),
    }
    with frozen():
        results = {name: measure(name, epoch, n, args.epochs, device) for name, (epoch, n) in pipelines.items()}
    base = results["conventional"]["images_per_s"]
    for r in results.values():
        r["ratio_to_conventional"] = r["images_per_s"] / base

    results["config"] = {"device": str(device), "device_name": device_name(device), "workers": args.workers,
                         "batch_size": args.batch_size, "timed_epochs": args.epochs,
                         "images": len(images), "conventional_transforms": conventional_kind,
                         "compiled_device_op": args.compile, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, results)

    print(f"loader benchmark: {len(images):,} train images, batch {args.batch_size}, {args.workers} workers, "
          f"{results['config']['device_name']} ({device}), device op {'compiled' if args.compile else 'eager'}")
    header = f"{'pipeline':<14}{'images/s':>12}{'vs conventional':>17}{'s / epoch':>11}"
    print(header + "\n" + "-" * len(header))
    for name in ("ffcv", "conventional", "in_memory"):
        r = results[name]
        print(f"{name:<14}{r['images_per_s']:>12,.0f}{r['ratio_to_conventional']:>16.2f}x"
              f"{r['seconds_per_epoch']:>11.2f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main, "bench_loader")
