"""How long `make setup` takes from a fresh clone, and what it installs: the checkout cloned into a temporary
folder (its committed tree, nothing else), `make setup` run there with a new `.venv/`, timed end to end; then
the size of that `.venv/`, the torch build pip chose, and the number of packages. A user reads it as "what
set-up cost on this machine". pip's cache is off (every wheel fetched, ffcv built from source, as a first
install); apt's packages, when already present, are recorded beside the time, since they change it more than
the machine does. Where pip fetches from (an index on the network or nearer) is the machine's own.

    python -m fastcifar.bench_setup --out docs/results/<machine>/setup.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..utils import PACKAGE_ROOT, ArgumentParser, UserError, run_cli, writable_file, write_json_atomic

APT_PACKAGES = ("pkg-config", "libturbojpeg0-dev", "libopencv-dev")


def _present(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and "install ok installed" in done.stdout


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="fastcifar.bench_setup", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.add_argument("--python", default="python3", help="the Python `make setup` builds .venv/ from (BASE_PYTHON)")
    args = p.parse_args(argv)
    writable_file(args.out, "the output file")
    if not (PACKAGE_ROOT / ".git").exists():
        raise UserError(f"{PACKAGE_ROOT} is not a git checkout: set-up is timed from a clone of one")
    import torch

    from ..env import environment

    env = environment(torch.device("cpu"), module="fastcifar.bench_setup")
    present = {pkg: _present(pkg) for pkg in APT_PACKAGES}
    with tempfile.TemporaryDirectory(prefix="fastcifar-setup-") as tmp:
        clone = Path(tmp) / "fastcifar"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(PACKAGE_ROOT), str(clone)], check=True)
        clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON",
                                                                   "PYTHONPATH", "MAKEFLAGS", "MAKELEVEL")}
        clean["PIP_NO_CACHE_DIR"] = "1"  # as a first install: every wheel fetched, ffcv built, nothing from pip's cache
        print(f"make setup in a fresh clone ({clone}) ...", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(["make", "setup", f"BASE_PYTHON={args.python}"], cwd=clone, env=clean,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            raise UserError(f"make setup failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        venv = clone / ".venv"
        python = venv / "bin" / "python"
        torch_info = subprocess.run([str(python), "-c", "import torch, json; print(json.dumps("
                                     "[torch.__version__, torch.version.cuda]))"], capture_output=True, text=True)
        version, cuda = json.loads(torch_info.stdout)
        packages = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True,
                                  text=True)
        record = {"seconds": round(seconds, 1), "venv_bytes": _size(venv),
                  "torch": version, "torch_build": f"cu{cuda.replace('.', '')}" if cuda else "cpu",
                  "packages": len(json.loads(packages.stdout)), "apt_packages_present_before": present,
                  "pip_cache": False,
                  "command": "make setup (a fresh clone, a new .venv/)", "env": env}
        shutil.rmtree(venv, ignore_errors=True)
    write_json_atomic(args.out, record)
    print(f"make setup: {seconds / 60:.1f} min, .venv/ {record['venv_bytes'] / 2**30:.2f} GiB "
          f"(torch {version}, {record['packages']} packages); written: {args.out}")
    return 0


def cli() -> None:
    run_cli(main, "fastcifar.bench_setup")


if __name__ == "__main__":
    sys.exit(cli())
