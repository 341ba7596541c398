"""tools/make_beton.py: splits, determinism, pixel fidelity, bad input and atomic output."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    PIXEL_COL,
    PIXEL_RGB,
    PIXEL_ROW,
    SMALL,
    SMALL_COUNTS,
    build_small,
    write_archive,
)

from fastcifar import betons
from fastcifar.data import read_beton

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_beton.py"


def source_arrays(batches: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_x = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_y = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    return train_x, train_y, batches["test_batch"][b"data"], np.array(batches["test_batch"][b"labels"])


def run_tool(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_counts_and_exact_stratification(small_data, small_batches):
    manifest = json.loads((small_data / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 450, "val": 50, "test": 110}
    assert manifest["splits"]["val"]["per_class"] == [SMALL["val_per_class"]] * 10
    assert manifest["splits"]["train"]["per_class"] == [45] * 10
    train, val = read_beton(small_data / "train.beton"), read_beton(small_data / "val.beton")
    assert np.bincount(val["label"], minlength=10).tolist() == [5] * 10
    # train and val partition the 500 official training images
    assert not set(train["index"]) & set(val["index"])
    assert sorted([*train["index"], *val["index"]]) == list(range(500))


def test_pixels_labels_and_index_trace_back_to_source(small_data, small_batches):
    train_x, train_y, test_x, test_y = source_arrays(small_batches)
    for split, (xs, ys) in {"train": (train_x, train_y), "val": (train_x, train_y),
                            "test": (test_x, test_y)}.items():
        beton = read_beton(small_data / f"{split}.beton")
        src = xs[beton["index"]].reshape(-1, 3, 32, 32)  # R, G, B planes
        assert beton["image"].shape == (len(beton["index"]), 32, 32, 3)
        for channel in range(3):
            np.testing.assert_array_equal(beton["image"][..., channel], src[:, channel])
        np.testing.assert_array_equal(beton["label"], ys[beton["index"]])
    assert sorted(read_beton(small_data / "test.beton")["index"]) == list(range(SMALL["n_test"]))


def test_plane_layout_puts_known_pixel_in_place(small_data):
    for split in ("train", "val"):
        beton = read_beton(small_data / f"{split}.beton")
        hit = np.flatnonzero(beton["index"] == 0)
        if hit.size:
            pixel = beton["image"][hit[0], PIXEL_ROW, PIXEL_COL]
            assert tuple(int(v) for v in pixel) == PIXEL_RGB
            return
    pytest.fail("training image 0 is in neither split")


def test_same_source_and_seed_give_identical_betons_other_seed_differs(tmp_path, small_archive, small_data):
    a = build_small(tmp_path / "a", small_archive)
    b = build_small(tmp_path / "b", small_archive, seed=1)
    reference = json.loads((small_data / "manifest.json").read_text())
    for split in betons.SPLITS:
        assert a["splits"][split]["sha256"] == reference["splits"][split]["sha256"]
        assert betons.sha256_file(tmp_path / "a" / f"{split}.beton") == reference["splits"][split]["sha256"]
    assert b["splits"]["val"]["sha256"] != a["splits"]["val"]["sha256"]


def test_rerun_does_nothing_and_force_rebuilds(tmp_path, small_archive, capsys):
    build_small(tmp_path, small_archive)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()
    build_small(tmp_path, small_archive)
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    build_small(tmp_path, small_archive, force=True)
    assert (tmp_path / "train.beton").stat().st_mtime_ns != stamp["train.beton"]
    # a modified beton is noticed and rebuilt
    with open(tmp_path / "val.beton", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    assert betons.manifest_problem(tmp_path) is not None
    build_small(tmp_path, small_archive)
    assert betons.manifest_problem(tmp_path) is None


def test_interrupted_write_leaves_no_beton_and_no_manifest(tmp_path, small_archive, monkeypatch):
    build_small(tmp_path, small_archive)  # a complete set, then an interrupted --force rebuild
    real_write, calls = betons.write_beton, []

    def write_then_interrupt(path, *args):
        calls.append(path)
        real_write(path, *args)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(betons, "write_beton", write_then_interrupt)
    fresh = tmp_path / "fresh"
    for data_dir, force in [(fresh, False), (tmp_path, True)]:
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            build_small(data_dir, small_archive, force=force)
        names = sorted(p.name for p in data_dir.iterdir() if p.is_file())
        assert "manifest.json" not in names
        assert not [n for n in names if n.endswith(".tmp")]
        if data_dir == fresh:
            assert not [n for n in names if n.endswith(".beton")]
        assert betons.manifest_problem(data_dir) is not None


def _bad_archive(tmp_path: Path, small_batches: dict, change: dict) -> Path:
    batches = {k: dict(v) for k, v in small_batches.items()}
    for key, value in change.items():
        batches["data_batch_2"][key] = value
    return write_archive(tmp_path / "bad.tar.gz", batches)


@pytest.mark.parametrize("case, message", [
    ("missing", "source not found"),
    ("not_gzip", "is not a gzip file"),
    ("gzip_not_tar", "is not a tar archive"),
    ("truncated", "truncated or corrupt"),
    ("missing_batch", "has no cifar-10-batches-py/data_batch_4"),
    ("wrong_dtype", "must be a uint8 array of shape (N, 3072), got float32"),
    ("wrong_shape", "must be a uint8 array of shape (N, 3072), got uint8 (100, 3000)"),
    ("bad_label", "label 10 at position 0 is outside 0-9"),
    ("counts", "expected 50000 training and 10000 test images, found 500 and 110"),
    ("unwritable", "cannot write to data dir"),
    ("download", "no network"),
])
def test_bad_input_one_line_nonzero_exit_no_output(tmp_path, small_archive, small_batches, case, message):
    data_dir = tmp_path / "out"
    args = ["--data-dir", str(data_dir), "--expect-counts", SMALL_COUNTS,
            "--val-per-class", str(SMALL["val_per_class"])]
    env = {"FASTCIFAR_CIFAR_URL": "http://127.0.0.1:9/cifar-10-python.tar.gz"}
    source: Path | None = tmp_path / "src.tar.gz"
    if case == "missing":
        source = tmp_path / "nope.tar.gz"
    elif case == "not_gzip":
        source.write_text("hello")
    elif case == "gzip_not_tar":
        source.write_bytes(gzip.compress(b"just some text, not a tar archive" * 100))
    elif case == "truncated":
        raw = small_archive.read_bytes()
        source.write_bytes(raw[: len(raw) // 2])
    elif case == "missing_batch":
        write_archive(source, small_batches, skip=("data_batch_4",))
    elif case == "wrong_dtype":
        source = _bad_archive(tmp_path, small_batches, {b"data": np.zeros((100, 3072), np.float32)})
    elif case == "wrong_shape":
        source = _bad_archive(tmp_path, small_batches, {b"data": np.zeros((100, 3000), np.uint8)})
    elif case == "bad_label":
        source = _bad_archive(tmp_path, small_batches, {b"labels": [10] + [0] * 99})
    elif case == "counts":
        source = small_archive
        args = ["--data-dir", str(data_dir)]
    elif case == "unwritable":
        source = small_archive
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        data_dir = blocker / "data"
        args[1] = str(data_dir)
    elif case == "download":
        source = None
    result = run_tool(*args, *(["--source", str(source)] if source else []), env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if data_dir.is_dir():
        assert not [p.name for p in data_dir.iterdir() if p.suffix in (".beton", ".json")]


def test_unofficial_archive_is_named_but_accepted(tmp_path, small_archive):
    result = run_tool("--source", str(small_archive), "--data-dir", str(tmp_path), "--expect-counts",
                      SMALL_COUNTS, "--val-per-class", "5")
    assert result.returncode == 0, result.stderr
    assert "is not the official archive" in result.stdout
    assert "class min/max" in result.stdout  # the summary table
    assert betons.manifest_problem(tmp_path) is None


@pytest.mark.skipif(not os.environ.get("FASTCIFAR_CIFAR_ARCHIVE"), reason="FASTCIFAR_CIFAR_ARCHIVE not set")
def test_real_archive(tmp_path):
    source = Path(os.environ["FASTCIFAR_CIFAR_ARCHIVE"])
    manifest = betons.build(source, tmp_path)
    assert manifest["counts"] == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert manifest["splits"]["val"]["per_class"] == [500] * 10
    cifar = betons.load_cifar(source)
    for split, labels in [("train", cifar.train_y), ("val", cifar.train_y), ("test", cifar.test_y)]:
        beton = read_beton(tmp_path / f"{split}.beton", fields=("label", "index"))
        np.testing.assert_array_equal(beton["label"], labels[beton["index"]])
        assert len(np.unique(beton["index"])) == manifest["counts"][split]


@pytest.mark.skipif(not os.environ.get("FASTCIFAR_CIFAR_ARCHIVE"), reason="FASTCIFAR_CIFAR_ARCHIVE not set")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_real_signal_mid_write_leaves_nothing_complete(tmp_path, sig):
    """A real Ctrl-C (to the process group, as a terminal sends it) or kill while train.beton is written."""
    args = [sys.executable, str(TOOL), "--source", os.environ["FASTCIFAR_CIFAR_ARCHIVE"], "--data-dir", str(tmp_path)]
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    # SIGINT at its default in the child, as a terminal starts a foreground job: a process started with
    # SIGINT ignored keeps ignoring it (Python then installs no KeyboardInterrupt), and a library loaded
    # earlier in this test process may have set SIG_IGN at the C level, where signal.getsignal can't see.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".train.beton.*.tmp")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)  # well inside the ~4 s write of train.beton
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    names = [p.name for p in tmp_path.iterdir()]
    assert not [n for n in names if n.endswith(".beton") or n == "manifest.json"], (names, proc.returncode, stderr)
    if sig == signal.SIGINT:  # one line: the writer runs in the process, no worker prints its traceback
        assert proc.returncode == 130 and stderr.strip().splitlines() == ["make_beton: interrupted"], stderr
        assert names == []
    else:
        assert proc.returncode == -signal.SIGKILL
    # nothing left in /dev/shm either (FFCV's writer kept its metadata there)
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {n for n in shm_after - shm_before if n.startswith(("psm_", "wnsm_"))}
    # the next run removes any leftover temporary file and completes
    assert run_tool(*args[2:]).returncode == 0
    assert betons.manifest_problem(tmp_path) is None and not list(tmp_path.glob("*.tmp"))


def test_ctrl_c_during_ffcv_import_is_delivered_after_it():
    """A Ctrl-C landing inside torch's import (where torch's C++ may be running Python code, and a
    KeyboardInterrupt there aborts the process) is held and raised once the import has returned."""
    child = (
        "import signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch.version':\n"  # imported from inside torch's own import
        "            signal.raise_signal(signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from fastcifar.ffcv_threads import import_ffcv\n"
        "try:\n"
        "    import_ffcv()\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted after', 'ffcv.fields.rgb_image' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.stdout.strip() == "interrupted after True", result.stderr[-2000:]
