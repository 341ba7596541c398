"""What the trainer keeps between runs or reads from its environment can cost a re-measurement at most,
never the run: the device-op choice cache, damaged in every way; a cache variable naming a file."""

from __future__ import annotations

import json

import pytest
import torch

from fastcifar import augment
from fastcifar.utils import UserError, check_cache_folders

CANDIDATES = ["compiled", "eager", "fused"]
GOOD = {"op": "fused", "batch": 8, "compiled_ms": 0.3, "eager_ms": 0.9, "fused_ms": 0.2}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(augment.CHOICE_CACHE_ENV, "1")
    path = augment._choice_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("content", ["[]", '"str"', '{"KEY": "fused"}', '{"KEY": {"op": "fused"}}',
                                     '{"KEY": {"op": "magic", "batch": 8}}', '{"KEY": {"op": "fused", "batch": 7}}',
                                     '{"KEY": ' + json.dumps({**GOOD, "eager_ms": "fast"}) + "}", "{", "\xff"])
def test_an_unusable_cache_entry_is_no_choice(cache, content):
    cache.write_bytes(content.encode("latin-1"))
    assert augment.read_choice("KEY", CANDIDATES, 8) is None
    augment.write_choice("KEY", GOOD)  # and the next measurement replaces the damage
    assert augment.read_choice("KEY", CANDIDATES, 8) == GOOD


def test_a_damaged_cache_costs_the_warm_up_a_measurement_not_the_run(cache):
    op = augment.RandomCropFlip(seed=0, device="cpu", compile=True)
    key = augment.choice_key(torch.device("cpu"), 8, torch.get_num_threads())
    cache.write_text(json.dumps({key: "fused"}))
    op.warm_up([8])
    assert op.choice["measured"] == "now" and op.choice["op"] in CANDIDATES
    assert augment.read_choice(key, CANDIDATES, 8)["op"] == op.choice["op"]  # the cache repaired


@pytest.mark.parametrize("variable", ["TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR"])
def test_a_cache_variable_naming_a_file_is_refused_by_name(tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=f"{variable}=.*a-file is not a folder"):
        check_cache_folders()
    monkeypatch.setenv(variable, str(tmp_path / "absent"))  # an absent folder is made by its tool
    check_cache_folders()
