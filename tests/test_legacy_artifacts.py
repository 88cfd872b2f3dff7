"""Artifacts saved by the v0.1 layout (tests/fixtures/legacy_v0_1, made by its make_fixtures.py) still load.

Each method's folder is loaded three ways after ``import elitekv_peft``, and each must generate the greedy tokens
recorded when it was saved: with `AutoModelForCausalLM`, the same with ``trust_remote_code=True``, and as a PEFT
adapter on a fresh base model.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import elitekv_peft  # noqa: F401  (registers the EliteKV classes)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_v0_1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
METHODS = sorted(EXPECTED["tokens"])


def _maker():
    spec = importlib.util.spec_from_file_location("legacy_v0_1_maker", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()


def _generate(model: torch.nn.Module) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MAKER.greedy(model.eval())


def test_fixtures_cover_every_method():
    assert METHODS == sorted(MAKER.METHODS)
    for method in METHODS:
        names = {p.name for p in (FIXTURES / method).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "modeling_elitekv.py"} <= names


@pytest.mark.parametrize("method", METHODS)
def test_legacy_folder_loads_with_automodel(method):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / method)
    assert type(model).__module__.startswith("elitekv_peft")
    assert _generate(model) == EXPECTED["tokens"][method]


@pytest.mark.parametrize("method", METHODS)
def test_legacy_folder_loads_with_remote_code_allowed(method):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / method, trust_remote_code=True)
    assert type(model).__name__ == "EliteKVLlamaForCausalLM"
    assert _generate(model) == EXPECTED["tokens"][method]


@pytest.mark.parametrize("method", METHODS)
def test_legacy_folder_loads_as_peft_adapter(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(MAKER.base_model(), FIXTURES / method)
    assert _generate(model) == EXPECTED["tokens"][method]


def test_legacy_adapter_file_is_still_checked_against_its_checksum(tmp_path):
    """v0.1 folders hold the weights in ``adapter_model.safetensors``: an altered byte there is refused."""
    import shutil

    copy = tmp_path / "elitekv"
    shutil.copytree(FIXTURES / "elitekv", copy)
    adapter = copy / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum.*Save the model again"):
        PeftModel.from_pretrained(MAKER.base_model(), copy)
