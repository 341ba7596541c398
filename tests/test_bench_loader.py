"""tools/bench_loader.py: runs on betons, writes the three pipelines' images/s, and its conventional
per-image transforms compute the same thing as the spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from test_data import reference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_loader import PlainTorchTransforms  # noqa: E402


def test_plain_conventional_transforms_match_the_spec():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = PlainTorchTransforms()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        torch.manual_seed(seed)  # replay the same draws: flip, then (top, left)
        flip = torch.rand(1).item() < 0.5
        top, left = torch.randint(0, 9, (2,)).tolist()
        # it flips the padded image before cropping (torchvision's order): a crop at `left` of the
        # flipped image is the mirror of a crop at 8 - left
        offsets = torch.tensor([top, 8 - left if flip else left])
        expected = reference(torch.from_numpy(image).permute(2, 0, 1)[None], offsets[None], torch.tensor([flip]))
        assert torch.equal(out, expected[0])


def test_bench_runs_and_writes_json(small_data, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_loader.py"), "--data-dir", str(small_data), "--device", "cpu",
         "--epochs", "1", "--batch-size", "64", "--no-compile", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for name in ("ffcv", "conventional", "in_memory"):
        assert data[name]["images_per_s"] > 0 and data[name]["images_per_epoch"] == 450
        assert name in result.stdout
    assert data["conventional"]["ratio_to_conventional"] == 1.0
    assert "vs conventional" in result.stdout
