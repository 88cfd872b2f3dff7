"""`ConversionPlan` is the single source of a conversion's three forms (issue #17)."""

from __future__ import annotations

import pytest

from elitekv_peft import EliteKVConfig
from elitekv_peft.conversion import attention_biases
from elitekv_peft.plan import ConversionPlan
from elitekv_peft.tuner import EliteKVModel

from .tiny import convert, tiny_model

FILLED = ("chunk_indices", "latent_dims", "key_latent_dims", "rope_chunks", "latent_dim", "method_plan", "base_shape")


@pytest.mark.parametrize("method", ["elitekv", "kv_latent", "lorc", "gqa"])
def test_the_plan_read_back_from_the_config_gives_the_model_config_and_the_cache(method):
    model = convert(tiny_model("qwen2_gqa"), kv_ratio=0.5, method=method)  # qwen2: q/k/v biases
    config = model.peft_config["default"]
    base = model.base_model.model
    plan = ConversionPlan.from_adapter_config(config, *attention_biases(base))
    assert plan.model_config() == base.config.elitekv
    report = model.base_model.conversion_report
    assert plan.values_per_token() == report.values_per_token
    assert plan.achieved_ratio() == pytest.approx(report.kv_ratio) and 0 < report.kv_ratio <= 0.5
    fresh = EliteKVConfig(kv_ratio=0.5, method=method)
    plan.fill(fresh)
    assert {name: getattr(fresh, name) for name in FILLED} == {name: getattr(config, name) for name in FILLED}
    assert fresh.is_converted


def test_an_empty_adapter_file_without_its_folder_names_the_fix():
    """The weights of a saved adapter are in the standalone files beside it; a loader that does not say which folder
    it read (e.g. `load_adapter` of an adapter that is already there) gets an error, not silently no weights."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    config = model.peft_config["default"]
    config.standalone_weights = {"model-00001-of-00001.safetensors": None}
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        EliteKVModel._remap_adapter_state_dict_for_load(model, config, "default", {})
