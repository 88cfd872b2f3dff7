"""Weights once (issue #19): a saved folder holds one copy of the weights and loads both ways."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from .tiny import convert, tiny_model

VOCAB = 2048  # large enough that the weights, not the modeling code and configs, make up the folder


def generate(model, ids):
    return model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["elitekv", "lorc"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"once_{request.param}")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    calibration = torch.randint(3, VOCAB, (4, 64), generator=torch.Generator().manual_seed(5))
    model = convert(
        tiny_model("llama_gqa", vocab_size=VOCAB), kv_ratio=0.25, method=request.param, calibration_data=calibration
    )
    with torch.no_grad():  # as uptraining would: every weight differs from the base
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
    expected = generate(model, ids)
    model.save_pretrained(path)
    return path, ids, expected


def test_folder_holds_the_weights_once(saved):
    path, *_ = saved
    with safe_open(path / "adapter_model.safetensors", framework="pt") as handle:
        assert list(handle.keys()) == ["elitekv_save_id"]  # 16 bytes naming the save; no weights
        save_id = bytes(handle.get_tensor("elitekv_save_id").tolist()).hex()
    assert json.loads((path / "adapter_config.json").read_text())["save_id"] == save_id
    weights = sum(p.stat().st_size for p in path.glob("model*.safetensors"))
    folder = sum(p.stat().st_size for p in path.iterdir())
    assert weights > 0 and folder <= 1.1 * weights, (folder, weights)
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert sorted(adapter["standalone_weights"]) == sorted(p.name for p in path.glob("model*.safetensors"))


def test_both_loaders_generate_what_was_saved(saved):
    path, ids, expected = saved
    assert torch.equal(generate(AutoModelForCausalLM.from_pretrained(path).eval(), ids), expected)
    loaded = PeftModel.from_pretrained(tiny_model("llama_gqa", vocab_size=VOCAB, seed=9), path).eval()
    assert torch.equal(generate(loaded, ids), expected)


def test_altered_standalone_weights_are_refused(saved, tmp_path):
    import shutil

    path, *_ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    shard = next(copy.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum.*Save the model again"):
        PeftModel.from_pretrained(tiny_model("llama_gqa", vocab_size=VOCAB), copy)
