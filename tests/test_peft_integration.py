"""PEFT registration, trainable scopes, saving and loading (issue 2, item 4)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from transformers import AutoConfig, AutoModelForCausalLM

from elitekv_peft import EliteKVConfig, EliteKVLlamaForCausalLM, EliteKVModel
from elitekv_peft.modeling import EliteKVAttention
from elitekv_peft.registration import ensure_peft_type

from .tiny import VOCAB, calibration_ids, convert, tiny_model


def test_peft_type_is_a_real_enum_member():
    member = ensure_peft_type()
    assert ensure_peft_type() is member  # idempotent
    assert PeftType("ELITEKV") is member is PeftType["ELITEKV"] is PeftType.ELITEKV
    assert member in list(PeftType) and member == "ELITEKV" and isinstance(member, PeftType)
    assert list(PeftType).count(member) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is EliteKVConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is EliteKVModel


def test_a_peft_whose_enum_does_not_take_the_member_fails_loudly():
    """If a peft release changes its enum internals, registration names the peft version instead of half-working."""
    import peft

    from elitekv_peft.peft_type import _check_peft_type

    _check_peft_type(PeftType.ELITEKV)  # the real member passes
    stray = str.__new__(PeftType, "ELITEKV")  # an object of the enum's class that the enum does not hold
    with pytest.raises(ImportError, match=f"peft {peft.__version__}"):
        _check_peft_type(stray)


def test_get_peft_model_converts_every_attention_layer():
    model = convert(tiny_model("llama_gqa", layers=3), kv_ratio=0.25)
    assert isinstance(model, PeftModel)
    attn = [m for m in model.modules() if isinstance(m, EliteKVAttention)]
    assert len(attn) == 3
    assert model.base_model.targeted_module_names == [f"model.layers.{i}.self_attn" for i in range(3)]
    cfg = model.peft_config["default"]
    assert cfg.is_converted and len(cfg.chunk_indices) == 3 and cfg.rope_chunks == 2


@pytest.mark.parametrize(
    ("scope", "expect"),
    [("all", "all"), ("attention", "attention"), ("attention_norms", "attention_norms"), ("none", "none")],
)
def test_trainable_scopes_and_honest_counts(scope, expect, capsys):
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25, trainable=scope)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    counted, all_params = model.get_nb_trainable_parameters()
    assert all_params == total
    assert counted == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    if expect == "all":
        assert counted == total
    elif expect == "none":
        assert counted == 0
    else:
        assert trainable and all(".self_attn." in n or (expect == "attention_norms" and "norm" in n) for n in trainable)
        assert any(".mlp." in n for n, _ in model.named_parameters()) and not any(".mlp." in n for n in trainable)
        if expect == "attention_norms":
            assert any("norm" in n for n in trainable)
    model.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out


def generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("elitekv_artifact")
    model = convert(tiny_model("qwen2_gqa", seed=3), kv_ratio=0.25)
    # change every weight a little, as uptraining would, so that loading must restore all of them
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    expected = generate(model, ids, mask)
    model.save_pretrained(path)
    return path, ids, mask, expected


def test_saved_folder_holds_adapter_and_standalone_model(saved):
    path, *_ = saved
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors.index.json"} <= names
    assert {"modeling_elitekv.py", "attention_base.py", "attention_elitekv.py", "absorbed.py", "cache.py"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "elitekv_qwen2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_elitekv.EliteKVQwen2ForCausalLM"
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "- elitekv" in card and "| rotary chunks kept per head (r) | 2 |" in card
    assert "achieved cache size | 0.2500" in card
    adapter = json.loads((path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "ELITEKV" and adapter["chunk_indices"] and "calibration_data" not in adapter


def test_automodel_loads_and_generates_the_same(saved):
    path, ids, mask, expected = saved
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "EliteKVQwen2ForCausalLM"
    assert torch.equal(generate(model, ids, mask), expected)
    assert AutoConfig.from_pretrained(path).elitekv["rope_chunks"] == 2


def test_peft_model_from_pretrained_generates_the_same(saved):
    path, ids, mask, expected = saved
    loaded = PeftModel.from_pretrained(tiny_model("qwen2_gqa", seed=3), path).eval()
    assert torch.equal(generate(loaded, ids, mask), expected)
    assert isinstance(PeftConfig.from_pretrained(path), EliteKVConfig)


def test_remote_code_loads_without_the_package(saved):
    path, ids, mask, expected = saved
    code = (
        "import sys; sys.modules['elitekv_peft'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor({ids.tolist()}); mask = torch.tensor({mask.tolist()})\n"
        "out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)\n"
        "print(type(m).__module__.startswith('transformers_modules'), out.tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"True {expected.tolist()}"


def test_a_rebuilt_model_whose_weights_were_not_loaded_refuses_to_run(saved):
    """transformers' own `load_adapter` reads only the (empty) adapter file, and a config loaded by hand brings no
    weights: the rebuilt attention would run on zero latent projections, so it raises instead, naming the loaders."""
    path, ids, *_ = saved
    base = tiny_model("qwen2_gqa", seed=3)
    base.load_adapter(str(path))
    with pytest.raises(RuntimeError, match="weights were never loaded.*PeftModel.from_pretrained"), torch.no_grad():
        base(ids)
    by_hand = get_peft_model(tiny_model("qwen2_gqa", seed=3), EliteKVConfig.from_pretrained(str(path)))
    with pytest.raises(RuntimeError, match="weights were never loaded"), torch.no_grad():
        by_hand(ids)
    loaded = PeftModel.from_pretrained(tiny_model("qwen2_gqa", seed=3), str(path))  # the loader that reads them
    with torch.no_grad():
        loaded(ids)


def test_loading_without_is_trainable_freezes_as_peft_does(saved):
    """`PeftModel.from_pretrained` loads for inference unless ``is_trainable=True`` (PEFT's convention)."""
    path, *_ = saved

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert trainable(PeftModel.from_pretrained(tiny_model("qwen2_gqa", seed=3), str(path))) == 0
    loaded = PeftModel.from_pretrained(tiny_model("qwen2_gqa", seed=3), str(path), is_trainable=True)
    assert trainable(loaded) == sum(p.numel() for p in loaded.parameters())  # the saved scope: "all"


def test_low_cpu_mem_usage_is_refused_with_the_fix(saved):
    path, *_ = saved
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported.*AutoModelForCausalLM"):
        PeftModel.from_pretrained(tiny_model("qwen2_gqa", seed=3), str(path), low_cpu_mem_usage=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), low_cpu_mem_usage=True)  # the standalone model does
    assert isinstance(model.model.layers[0].self_attn, EliteKVAttention)


def test_a_save_that_writes_no_model_files_is_refused(monkeypatch, tmp_path):
    """transformers writes model files on global rank 0 only: a save on another rank must not leave a folder that
    looks saved but holds no weights."""
    import elitekv_peft.tuner

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    monkeypatch.setattr(elitekv_peft.tuner, "write_artifact", lambda standalone, folder: {})  # what rank 1 gets
    with pytest.raises(RuntimeError, match="not global rank 0.*main process only"):
        model.save_pretrained(tmp_path)


def test_merge_and_unload_returns_a_plain_transformers_model():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
    merged = model.merge_and_unload()
    assert isinstance(merged, EliteKVLlamaForCausalLM)
    with torch.no_grad():
        after = merged(ids).logits
    assert torch.equal(before, after)


def test_there_is_no_switch_back_to_the_original():
    """The original attention is gone: `disable_adapter()` (which TRL's DPO uses for a reference model when none is
    given) and `unload()` raise instead of silently running the converted model as if it were the original."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    ids = torch.randint(3, VOCAB, (1, 12))
    with pytest.raises((ValueError, NotImplementedError)), model.disable_adapter(), torch.no_grad():
        model(ids)
    with pytest.raises(NotImplementedError, match="separately loaded base model"):
        model.base_model.disable_adapter_layers()
    with pytest.raises(NotImplementedError, match="reload the base model"):
        model.unload()


def test_loading_into_a_mismatched_base_names_the_fix(saved):
    path, *_ = saved
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(tiny_model("qwen2_gqa", layers=3), path)


def test_failed_conversion_leaves_the_model_untouched():
    model = tiny_model("llama_gqa")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        get_peft_model(model, EliteKVConfig(kv_ratio=0.25, calibration_data=torch.full((2, 32), VOCAB + 5)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model.config, "elitekv")
    assert not any(isinstance(m, EliteKVAttention) for m in model.modules())
    # and it still converts afterwards
    convert(model, kv_ratio=0.25, calibration_data=calibration_ids())


def test_save_with_a_given_state_dict_exports_those_weights(tmp_path):
    """Under FSDP the Trainer passes the gathered full state dict to `save_pretrained` while the live parameters are
    shards: the standalone export must use the given state dict, like the adapter does."""
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.5)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    full = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # stand-in for sharded live parameters
        for param in model.parameters():
            param.zero_()
    model.save_pretrained(tmp_path, state_dict=full)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    assert not hasattr(model.peft_config["default"], "_pending_export")  # not kept after the save
