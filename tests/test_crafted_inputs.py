"""Files a user may be handed (a beton set, a manifest, an archive) crafted to lie, and outputs that cannot be
written: each is one line and exit 2 before any work, with nothing written. Fixtures are built here from the
session's small set (conftest); crafted betons are vouched for by a rewritten manifest, as anyone handing over
a data folder can do, so only the structure check stands between them and FFCV."""

from __future__ import annotations

import _codecs
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_batches, write_archive
from test_hardening import SMALL_FLAGS, Call, copy_betons, make_beton, make_beton_peak, one_line, run, vouch_for

from fastcifar import betons, data
from fastcifar.utils import UserError


def _rows(beton: Path):
    """The beton's field descriptors and metadata rows, writable in place."""
    from ffcv.reader import Reader
    from ffcv.types import FieldDescType, HeaderType

    reader = Reader(str(beton))
    fields = np.memmap(beton, dtype=FieldDescType, mode="r+", shape=(3,), offset=HeaderType.itemsize)
    meta = np.memmap(beton, dtype=reader.metadata_type, mode="r+", shape=(len(reader.metadata),),
                     offset=HeaderType.itemsize + reader.field_descriptors.nbytes)
    return fields, meta


def _image_16x16(beton: Path) -> None:  # FFCV would copy 3,072-byte images into 768-byte slots
    _, meta = _rows(beton)
    meta["f0"]["height"] = 16
    meta["f0"]["width"] = 16


def _jpeg_mode(beton: Path) -> None:  # FFCV would decode raw pixels as JPEG: black images, exit 0
    _, meta = _rows(beton)
    meta["f0"]["mode"] = 0


def _label_float(beton: Path) -> None:  # the label field's type turned IntField -> FloatField
    fields, _ = _rows(beton)
    fields["type_id"][1] = 0


def _index_repeated(beton: Path) -> None:
    _, meta = _rows(beton)
    meta["f2"][1] = meta["f2"][0]


CRAFTED = {
    "image-16x16": (_image_16x16, "image 0's metadata says width 16, not 32"),
    "image-jpeg-mode": (_jpeg_mode, "image 0's metadata says mode 0, not 1"),
    "label-float-field": (_label_float, "field 'label' is FFCV's FloatField, not IntField"),
    "index-repeated": (_index_repeated, "index field is not"),
}


@pytest.fixture
def crafted(request, tmp_path, small_data) -> tuple[Path, str]:
    """A copy of the small set whose train.beton was crafted by `request.param`, the manifest vouching for it."""
    damage, message = CRAFTED[request.param]
    folder = copy_betons(small_data, tmp_path / request.param)
    damage(folder / "train.beton")
    vouch_for(folder, "train")
    return folder, message


@pytest.mark.parametrize("crafted", list(CRAFTED), indirect=True)
def test_a_crafted_beton_is_refused_before_ffcv_is_given_it(crafted, monkeypatch):
    """Every loader goes through `make_loaders`, which checks the set before it builds any loader: FFCV's
    Loader (and the numba readers behind it) is never constructed on the crafted file."""
    import ffcv.loader

    folder, message = crafted

    def never(*args, **kwargs):
        raise AssertionError("FFCV's Loader was given a crafted beton")

    monkeypatch.setattr(ffcv.loader.Loader, "__init__", never)
    for loader in ("ffcv", "torch"):
        with pytest.raises(UserError, match=message):
            data.make_loaders(folder, "cpu", loader=loader)
    assert message in betons.manifest_problem(folder)


@pytest.mark.parametrize("crafted", ["image-16x16"], indirect=True)
def test_the_trainer_refuses_a_crafted_beton_in_one_line_and_writes_nothing(crafted, tmp_path):
    folder, message = crafted
    out = tmp_path / "out"
    result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(folder), "--device", "cpu",
                  "--out", str(out), "--run-name", "r"])
    one_line(result, message)
    assert not (out / "r.json").exists() and not (out / "r.pt").exists()


def _manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(edit(manifest) if callable(edit) else edit)


MANIFESTS = {
    "split-without-images": (lambda m: (m["splits"]["val"].pop("images"), json.dumps(m))[1],
                             "splits.val.images: Field required"),
    "images-a-string": (lambda m: (m["splits"]["val"].update(images="50"), json.dumps(m))[1],
                        "splits.val.images: Input should be a valid integer"),
    "nested-100000-deep": ("[" * 100_000 + "]" * 100_000, "is not a valid manifest"),
    "counts-disagree": (lambda m: (m["counts"].update(val=49), json.dumps(m))[1], "counts"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_manifest_of_the_wrong_shape_is_one_line(case, tmp_path, small_data):
    edit, message = MANIFESTS[case]
    folder = copy_betons(small_data, tmp_path / "m")
    _manifest(folder, edit)
    with pytest.raises(UserError, match=message):
        data.check_betons(folder)


def test_train_and_evaluate_refuse_a_manifest_without_a_count_and_make_beton_rebuilds_it(
        tmp_path, small_data, small_archive):
    folder = copy_betons(small_data, tmp_path / "m")
    _manifest(folder, MANIFESTS["split-without-images"][0])
    result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(folder), "--device", "cpu",
                  "--out", str(tmp_path / "out")])
    one_line(result, "splits.val.images: Field required")
    result = run([sys.executable, "-m", "fastcifar.evaluate", "--weights", str(tmp_path / "none.pt"),
                  "--data-dir", str(folder), "--device", "cpu"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    # The converter reads it as "not up to date" and writes a whole new set.
    result = make_beton("--source", str(small_archive), "--data-dir", str(folder), *SMALL_FLAGS)
    assert result.returncode == 0, result.stderr
    assert betons.manifest_problem(folder) is None


def _batches_with(name: str, fields: dict) -> dict:
    batches = make_batches(per_batch=100, n_test=110)
    batches[name] = {**batches[name], **fields}
    return batches


def test_a_zero_stride_array_is_refused_before_any_copy(tmp_path):
    """numpy.ndarray called by the pickle with zero strides: 300,000 images from one 3 KB buffer."""
    zero_stride = Call(np.ndarray, (300_000, 3072), np.dtype("u1"), b"\0" * 3072, 0, (0, 1))
    archive = write_archive(tmp_path / "a.tar.gz", _batches_with("data_batch_2", {b"data": zero_stride}))
    result = make_beton("--source", str(archive), "--data-dir", str(tmp_path / "d"), *SMALL_FLAGS)
    one_line(result, "data_batch_2 is not a CIFAR-10 batch pickle")
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").glob("*.beton"))


def test_a_decoder_called_again_and_again_on_one_string_is_bounded_in_total(tmp_path):
    """1,500 calls of the allowed `_codecs.encode` on one memoised 1 MiB string: 1.5 GB from a 1 MB pickle."""
    shared = "x" * (1 << 20)
    names = [Call(_codecs.encode, shared, "latin1") for _ in range(1500)]
    archive = write_archive(tmp_path / "a.tar.gz", _batches_with("data_batch_1", {b"filenames": names}))
    assert archive.stat().st_size < 4 << 20
    result, peak_mib = make_beton_peak(tmp_path, "--source", str(archive), "--data-dir", str(tmp_path / "d"),
                                       *SMALL_FLAGS)
    one_line(result, "the pickles decode to more bytes than they hold")
    assert peak_mib < 800, peak_mib  # far below the 1.5 GB the calls would have decoded


def test_a_batch_of_more_images_than_the_split_holds_is_refused_as_it_is_read(tmp_path):
    big = make_batches(per_batch=600, n_test=110)["data_batch_1"]
    archive = write_archive(tmp_path / "a.tar.gz", {**make_batches(per_batch=100, n_test=110), "data_batch_1": big})
    result = make_beton("--source", str(archive), "--data-dir", str(tmp_path / "d"), *SMALL_FLAGS)
    one_line(result, "expected 500 training images, found more (600 by data_batch_1)")


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_an_output_named_by_a_folder_is_refused_before_the_first_step(suffix, tmp_path, small_data):
    out = tmp_path / "out"
    (out / f"r{suffix}").mkdir(parents=True)
    result = run([sys.executable, "-m", "fastcifar.train", "--data-dir", str(small_data), "--device", "cpu",
                  "--out", str(out), "--run-name", "r"])
    one_line(result, f"{out / ('r' + suffix)} is a folder")
    assert "epoch" not in result.stdout and ".tmp" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"r{suffix}"]


def test_a_beton_named_by_a_folder_is_refused_before_the_conversion(tmp_path, small_archive):
    folder = tmp_path / "d"
    (folder / "val.beton").mkdir(parents=True)
    result = make_beton("--source", str(small_archive), "--data-dir", str(folder), *SMALL_FLAGS)
    one_line(result, "val.beton is a folder: move it away")
    assert sorted(p.name for p in folder.iterdir()) == ["val.beton"]


@pytest.fixture
def mount(tmp_path):
    """A tmpfs of our own (root only), options given by the test; unmounted after it."""
    point = tmp_path / "mnt"
    point.mkdir()

    def mount_with(options: str) -> Path:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
        return point

    yield mount_with
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_data_folder_out_of_inodes_is_refused_up_front_and_leaves_no_partial_set(mount, small_archive):
    folder = mount("size=64m,nr_inodes=6")  # the root and a few files: fewer than the set needs
    result = make_beton("--source", str(small_archive), "--data-dir", str(folder), *SMALL_FLAGS)
    one_line(result, "no free inodes in")
    # Without the up-front check the writer runs out of inodes itself: one line naming a real output, no
    # temporary, and no beton without its manifest.
    (folder / "a").touch()
    (folder / "b").touch()
    code = ("import sys; from fastcifar import betons; betons.check_outputs = lambda *a: None; "
            "sys.argv[0] = 'make_beton'; betons.cli()")
    result = run([sys.executable, "-c", code, "--source", str(small_archive), "--data-dir", str(folder),
                  *SMALL_FLAGS])
    one_line(result, "No space left on device")
    assert ".tmp" not in result.stderr and any(f"{s}.beton" in result.stderr or "manifest.json" in result.stderr
                                                for s in ("train", "val", "test"))
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"]


def test_an_up_to_date_set_on_a_read_only_folder_is_used(mount, small_archive):
    folder = mount("size=64m")
    result = make_beton("--source", str(small_archive), "--data-dir", str(folder), *SMALL_FLAGS)
    assert result.returncode == 0, result.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    result = make_beton("--source", str(small_archive), "--data-dir", str(folder), *SMALL_FLAGS)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stderr
    assert data.check_betons(folder) == {"train": 450, "val": 50, "test": 110}


def test_a_huge_file_that_is_not_gzip_is_refused_before_it_is_hashed(tmp_path, monkeypatch):
    fake = tmp_path / "cifar-10-python.tar.gz"
    with open(fake, "wb") as f:  # 20 GiB, sparse: no disk used
        f.truncate(20 << 30)

    def never(*args, **kwargs):
        raise AssertionError("the source was hashed before its header was read")

    monkeypatch.setattr(betons, "source_digests", never)
    with pytest.raises(UserError, match="is not a gzip file"):
        betons.build(fake, tmp_path / "d")
    assert os.path.getsize(fake) == 20 << 30
