"""Hostile and unlucky input, built here: full disks, memory-bomb pickles, corrupted or mismatched
data, inputs that used to print tracebacks, two conversions into one folder, interrupts. Each must
end in one line and exit code 2 (130 for Ctrl-C), bounded in time and memory, with nothing partial
left behind."""

from __future__ import annotations

import _codecs
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, SMALL_COUNTS, build_small, make_batches, write_archive

from fastcifar import betons
from fastcifar.data import read_beton
from fastcifar.model import resnetv2_20
from fastcifar.utils import UserError

# tarfile's extraction filter where this Python has it (3.11.4+, and backported to some 3.8-3.10 patch
# releases); Debian 12's Python 3.11.2 has none, and the archives these tests extract are their own.
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

ROOT = Path(__file__).resolve().parents[1]
SMALL_FLAGS = ["--val-per-class", str(SMALL["val_per_class"]), "--expect-counts", SMALL_COUNTS]


# Runs a script and records its peak resident memory (VmHWM: this process image only, unlike
# wait4's ru_maxrss, which counts the RSS the child inherited from pytest before exec).
PEAK = """
import atexit, os, runpy, sys
def report():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
    open(os.environ["FASTCIFAR_TEST_PEAK"], "w").write(hwm)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; a hang fails the test (timeout) instead of stalling the suite."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def make_beton(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "tools/make_beton.py", *args], timeout=timeout, env=env)


def make_beton_peak(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """make_beton and its peak resident memory in MiB."""
    peak = tmp_path / "peak"
    result = run([sys.executable, "-c", PEAK, "tools/make_beton.py", *args], timeout=120,
                 env={"FASTCIFAR_TEST_PEAK": str(peak)})
    return result, int(peak.read_text()) // 1024


def one_line(result: subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 2. Small hostile pickles


class Call:
    """Pickles as `func(*args)`: how a hostile pickle spells a call of an allowed global."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def nested_labels(depth: int = 40) -> list:
    labels: list = [0]
    for _ in range(depth):
        labels = [labels, labels]  # memo references: 1 KB pickled, 2**40 entries materialised
    return labels


def chained_encode(depth: int = 40):
    value = "a"
    for _ in range(depth):
        value = Call(_codecs.encode, value, "hex")  # each call doubles; an old allow-list ran it
    return value


def hostile(tmp_path: Path, small_batches: dict, kind: str) -> Path:
    batches = {k: dict(v) for k, v in small_batches.items()}
    first = batches["data_batch_1"]
    if kind == "nested-labels":
        first[b"labels"] = nested_labels()
    elif kind == "chained-encode":
        first[b"batch_label"] = chained_encode()
    elif kind == "huge-array":
        first[b"extra"] = Call(np._core.multiarray._reconstruct, np.ndarray, (1 << 34,), b"b")
    elif kind == "huge-member":  # 65 MiB of zeros: a member no CIFAR batch can be (compresses to ~65 KB)
        path = write_archive(tmp_path / "rest.tar.gz", batches, skip=("data_batch_1",))
        with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as tar:
            with tarfile.open(path) as old:
                for member in old:
                    tar.addfile(member, old.extractfile(member))
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.size = 65 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
        return tmp_path / "bomb.tar.gz"
    return write_archive(tmp_path / f"{kind}.tar.gz", batches)


@pytest.mark.parametrize("kind, message", [
    ("nested-labels", "b'labels' must be a flat list of integers"),
    ("chained-encode", "forbidden use of _codecs.encode"),
    ("huge-array", "forbidden array reconstruction"),
    ("huge-member", "larger than any CIFAR-10 batch"),
])
def test_hostile_pickles_are_refused_in_bounded_memory(tmp_path, small_batches, kind, message):
    source = hostile(tmp_path, small_batches, kind)
    result, peak_mib = make_beton_peak(tmp_path, "--source", str(source), "--data-dir", str(tmp_path / "out"),
                                       *SMALL_FLAGS)
    one_line(result, message)
    # a real batch is ~31 MB, the interpreter with numpy ~40 MB: no hostile input may cost more than
    # a few batches (before: 4.25 GB for the nested labels)
    assert peak_mib < 160, peak_mib
    assert not [p for p in (tmp_path / "out").iterdir()]


# ---------------------------------------------------------------------------------------------
# 3. Corrupted or mismatched data


def test_a_corrupted_gzip_trailer_is_an_error(tmp_path, small_archive):
    """The CRC sits after every member: read only up to the last batch, a corruption went unseen."""
    raw = bytearray(small_archive.read_bytes())
    raw[-8] ^= 0x01  # the CRC32 of the uncompressed stream
    bad = tmp_path / "crc.tar.gz"
    bad.write_bytes(bytes(raw))
    result = make_beton("--source", str(bad), "--data-dir", str(tmp_path / "out"), *SMALL_FLAGS)
    one_line(result, "is truncated or corrupt (CRC check failed")


def copy_betons(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("train.beton", "val.beton", "test.beton", "manifest.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_trainer_refuses_a_same_size_beton_from_another_split_seed(tmp_path, small_data, small_archive):
    other = tmp_path / "seed1"
    build_small(other, small_archive, seed=1)
    data = copy_betons(small_data, tmp_path / "mixed")
    shutil.copy(other / "train.beton", data / "train.beton")  # same size: only the hash tells
    assert (data / "train.beton").stat().st_size == (small_data / "train.beton").stat().st_size
    result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), "--device", "cpu"])
    one_line(result, "train.beton does not match")
    assert "make_beton.py --data-dir" in result.stderr


def test_a_beton_with_a_label_outside_0_9_is_refused(tmp_path, small_data):
    """Even with a manifest that vouches for it (rewritten to match), in train and evaluate."""
    data = copy_betons(small_data, tmp_path / "labels")
    beton = read_beton(data / "val.beton")
    labels = beton["label"].copy()
    labels[3] = 12
    betons.write_beton(data / "val.beton", beton["image"], labels, np.arange(len(labels)))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"].update(sha256=betons.sha256_file(data / "val.beton"),
                                     bytes=(data / "val.beton").stat().st_size)
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), "--device", "cpu"])
    one_line(result, "holds label 12 (record 3), outside 0-9")
    weights = tmp_path / "w.pt"
    torch.save(resnetv2_20().state_dict(), weights)
    result = run([sys.executable, "-m", "fastcifar.evaluate", "--weights", str(weights), "--data-dir", str(data),
                     "--device", "cpu"])
    one_line(result, "holds label 12")


def vouch_for(data: Path, split: str) -> None:
    """Rewrite the manifest's hash and size of one beton to match it, as an attacker would."""
    manifest = json.loads((data / "manifest.json").read_text())
    beton = data / f"{split}.beton"
    manifest["splits"][split].update(sha256=betons.sha256_file(beton), bytes=beton.stat().st_size)
    (data / "manifest.json").write_text(json.dumps(manifest))


def _tables(beton: Path):
    """The beton's header, its image column's pointers and its allocation table, writable in place."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    reader = Reader(str(beton))
    header = np.memmap(beton, dtype=HeaderType, mode="r+", shape=(1,))
    meta = np.memmap(beton, dtype=reader.metadata_type, mode="r+", shape=(len(reader.metadata),),
                     offset=HeaderType.itemsize + reader.field_descriptors.nbytes)
    table = np.memmap(beton, dtype=ALLOC_TABLE_TYPE, mode="r+", shape=(len(reader.alloc_table),),
                      offset=int(reader.header["alloc_table_ptr"]))
    return header, meta["f0"], table


def _outside(beton: Path) -> None:  # sample 2's image, table entry and pointer alike, past the end
    _, image, table = _tables(beton)
    end = beton.stat().st_size + 4096
    image["data_ptr"][2] = end
    table["ptr"][np.flatnonzero(table["sample_id"] == 2)[0]] = end


def _header_count(beton: Path) -> None:
    header, _, _ = _tables(beton)
    header["num_samples"][0] += 1


def _another_image(beton: Path) -> None:  # inside the file, but sample 1's pixels
    _, image, _ = _tables(beton)
    image["data_ptr"][0] = image["data_ptr"][1]


def _table_moved(beton: Path) -> None:
    header, _, _ = _tables(beton)
    header["alloc_table_ptr"][0] = 10


@pytest.mark.parametrize("damage, message", [
    (_outside, "is not one image inside the data region"),
    (_header_count, "allocation table"),
    (_another_image, "image pointer"),
    (_table_moved, "does not fill the end of the file"),
], ids=["pointer-outside", "header-count", "pointer-to-another-image", "table-moved"])
def test_a_beton_read_out_of_bounds_is_refused_even_when_the_manifest_vouches(tmp_path, small_data, damage, message):
    """FFCV's readers check no bounds: a beton's structure is checked before any of it is read."""
    data = copy_betons(small_data, tmp_path / "damaged")
    damage(data / "test.beton")
    vouch_for(data, "test")
    problem = betons.structure_problem(data / "test.beton")
    assert problem is not None and message in problem, problem
    if damage is _outside:  # the trainer says so in one line before any work
        result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(data), "--device", "cpu"])
        one_line(result, message)
        assert "make_beton.py --data-dir" in result.stderr


def test_an_empty_split_is_refused_up_front(tmp_path):
    archive = write_archive(tmp_path / "no-test.tar.gz", make_batches(per_batch=200, n_test=0))
    result = make_beton("--source", str(archive), "--data-dir", str(tmp_path / "d"), "--expect-counts", "1000,0",
                        "--val-per-class", "5")
    one_line(result, "every split needs images")
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


def test_an_unreadable_member_of_a_source_folder_is_named(tmp_path, small_archive, monkeypatch):
    """A read() that fails with EIO names no file of its own: the one line must name it."""
    with tarfile.open(small_archive) as tar:
        tar.extractall(tmp_path, **SAFE_EXTRACT)
    real_open = open

    class FailingRead(io.FileIO):
        def readinto(self, buffer):
            raise OSError(5, "Input/output error")

    def failing_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "data_batch_3" and "b" in mode:
            return io.BufferedReader(FailingRead(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("fastcifar.utils.open", failing_open, raising=False)
    with pytest.raises(UserError, match="cannot read .*data_batch_3: Input/output error"):
        betons.main(["--source", str(tmp_path / "cifar-10-batches-py"), "--data-dir", str(tmp_path / "d"),
                     *SMALL_FLAGS])


# ---------------------------------------------------------------------------------------------
# 4. Inputs that printed tracebacks


@pytest.mark.parametrize("flags, message", [
    (["--val-per-class", "50"], "would leave none of them for training"),
    (["--split-seed", "-1"], "--split-seed must be >= 0"),
])
def test_make_beton_bad_numbers(tmp_path, small_archive, flags, message):
    args = ["--source", str(small_archive), "--data-dir", str(tmp_path), "--expect-counts", SMALL_COUNTS]
    result = make_beton(*args, *(SMALL_FLAGS[:2] if "--val-per-class" not in flags else []), *flags)
    one_line(result, message)


def test_malformed_download_url_and_fifo_source(tmp_path):
    result = make_beton("--data-dir", str(tmp_path / "d"), env={"FASTCIFAR_CIFAR_URL": "not a url"})
    one_line(result, "could not download not a url")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = make_beton("--source", str(fifo), "--data-dir", str(tmp_path / "d"), timeout=60)
    one_line(result, "is neither a regular file nor a folder")


def test_unreadable_batch_file_is_one_line(tmp_path, small_archive, monkeypatch):
    with tarfile.open(small_archive) as tar:
        tar.extractall(tmp_path, **SAFE_EXTRACT)
    real = Path.read_bytes

    def failing(self):
        if self.name == "data_batch_3":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(UserError, match="cannot read .*data_batch_3: Permission denied"):
        betons.load_cifar(tmp_path / "cifar-10-batches-py", (500, 110))


def test_trainer_and_evaluate_bad_input_before_any_work(tmp_path, small_data):
    t0 = time.perf_counter()
    for flags, message in [(["--run-name", "sub/r"], "--run-name must be a plain file name"),
                           (["--batch-size", "1000000000"], "--batch-size 1000000000 is larger than the training")]:
        result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(small_data), "--device", "cpu",
                         "--out", str(tmp_path), *flags])
        one_line(result, message)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    result = run([sys.executable, "-m", "fastcifar.evaluate", "--weights", str(empty), "--data-dir",
                     str(small_data), "--device", "cpu"])
    one_line(result, "is not a ResNetV2-20 state dict")
    assert time.perf_counter() - t0 < 120  # refused at start-up, not after a run


# ---------------------------------------------------------------------------------------------
# 1. A full disk; 5. two conversions; 6. interrupts


@pytest.fixture
def tiny_fs(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_refused_up_front_and_a_failing_writer_never_hangs(tiny_fs, small_archive):
    result = make_beton("--source", str(small_archive), "--data-dir", str(tiny_fs), *SMALL_FLAGS)
    one_line(result, "not enough space in")
    assert "MiB available" in result.stderr
    # without the up-front check the writer itself hits ENOSPC: one line, no temporary file, no hang
    code = ("import sys; from fastcifar import betons; betons.check_outputs = lambda *a: None; "
            "sys.argv[0] = 'make_beton'; betons.cli()")
    t0 = time.perf_counter()
    result = run([sys.executable, "-c", code, "--source", str(small_archive), "--data-dir", str(tiny_fs),
                     *SMALL_FLAGS], timeout=120)
    one_line(result, "No space left on device")
    assert time.perf_counter() - t0 < 120 and list(tiny_fs.iterdir()) == []


def test_a_second_conversion_into_the_same_folder_is_refused(tmp_path, small_archive):
    with betons.conversion_lock(tmp_path):
        result = make_beton("--source", str(small_archive), "--data-dir", str(tmp_path), *SMALL_FLAGS)
    one_line(result, f"another conversion (pid {os.getpid()}) is writing into")
    result = make_beton("--source", str(small_archive), "--data-dir", str(tmp_path), *SMALL_FLAGS)
    assert result.returncode == 0, result.stderr  # the lock went with its holder


def test_a_results_json_records_settings_but_no_place_on_the_machine(monkeypatch):
    """Published results say which settings a figure ran with, never where the data or caches lay."""
    from fastcifar.env import setting_variables

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    for name in ("FASTCIFAR_CIFAR_ARCHIVE", "TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR"):
        monkeypatch.setenv(name, f"/home/someone/private/{name.lower()}")
    recorded = setting_variables()
    assert recorded["OMP_WAIT_POLICY"] == "PASSIVE"
    assert recorded["FASTCIFAR_CIFAR_ARCHIVE"] == recorded["TORCHINDUCTOR_CACHE_DIR"] == "set"
    assert "/home/someone" not in json.dumps(recorded)
