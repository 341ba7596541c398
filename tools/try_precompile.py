"""Does dynamo's AOT precompile shorten a warm start-up? The training step of the spec model, in fresh
processes: `torch.compile` as the trainer does it (Inductor's cache warm), against a step precompiled
with `torch.compile(fullgraph=True).aot_compile`, saved, and loaded by `torch.compiler.load_compiled_function`.
Each process times its compile-or-load and its first training step (forward + backward), after the
imports. Writes a JSON; the numbers behind docs/startup.md's account of the precompile cache.
Usage: python tools/try_precompile.py --out results/try_precompile.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, artifact: str) -> dict:
    import torch

    from fastcifar.model import resnetv2_20
    from fastcifar.precompile import import_compiler

    import_compiler()
    torch.manual_seed(0)
    model = resnetv2_20().to(memory_format=torch.channels_last)
    x = torch.zeros(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(128, dtype=torch.int64)
    t0 = time.perf_counter()
    if mode == "jit":
        net = torch.compile(model)
    elif mode == "save":
        net = torch.compile(model.forward, fullgraph=True).aot_compile(((x,), {}))
        net.save_compiled_function(artifact)
    else:
        with open(artifact, "rb") as f:
            net = torch.compiler.load_compiled_function(f)
    ready = time.perf_counter()
    logits = net(x) if mode == "jit" else net(model, x)  # the precompiled forward takes self explicitly
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    done = time.perf_counter()
    return {"mode": mode, "compile_or_load_s": ready - t0, "first_step_s": done - ready, "total_s": done - t0,
            "loss": float(loss.detach()), "grad": model.stem.weight.grad is not None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/try_precompile.json"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "PYTHONPATH": str(ROOT)}
        artifact = str(Path(tmp) / "step.bin")

        def run(mode: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", mode, artifact], capture_output=True,
                                 text=True, env=env, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        runs = [run("jit"), run("save")]  # fill Inductor's cache, write the artifact
        for _ in range(args.repeats):
            runs += [run("jit"), run("load")]
    import torch

    from fastcifar.env import environment

    warm = {m: statistics.median(r["total_s"] for r in runs[2:] if r["mode"] == m) for m in ("jit", "load")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "warm_median_total_s": warm,
                                    "env": environment(torch.device("cpu"), module="tools/try_precompile.py")},
                                   indent=2) + "\n")
    print(f"warm, median of {args.repeats}: torch.compile {warm['jit']:.2f} s, AOT precompile loaded "
          f"{warm['load']:.2f} s (compile-or-load + first training step); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
