"""Weight absorption: attending on the latent equals rebuilding K and V (issue 5's reference path)."""

from __future__ import annotations

import pytest
import torch

from elitekv_peft import EliteKVCache, set_attention_path
from elitekv_peft.compat import cache_kwargs

from .tiny import VOCAB, convert, tiny_model


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "qwen2_gqa"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("decomposition", ["joint", "separate"])
def test_absorbed_equals_reconstruct(family, attn, decomposition):
    model = convert(tiny_model(family, attn_implementation=attn), kv_ratio=0.25, decomposition=decomposition)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        set_attention_path(model, "reconstruct")
        reference = model(ids, attention_mask=mask).logits
        set_attention_path(model, "absorbed")
        absorbed = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (absorbed - reference)[valid].abs().max().item() < 1e-4


def test_auto_path_decodes_on_the_latent_and_matches():
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.125)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    set_attention_path(model, "reconstruct")
    reference = model.generate(input_ids=ids, **kwargs)
    set_attention_path(model, "auto")
    calls = []
    attn = model.base_model.model.model.layers[0].self_attn
    original = attn.use_absorbed
    attn.use_absorbed = lambda n: calls.append(n) or original(n)
    assert torch.equal(model.generate(input_ids=ids, **kwargs), reference)
    assert calls[0] == 12 and all(n == 1 for n in calls[1:]) and not original(12) and original(1)


def test_absorbed_incremental_decode_matches_full_forward():
    model = convert(tiny_model("qwen2_gqa"), kv_ratio=0.25)
    set_attention_path(model, "absorbed")
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = model(ids).logits
        cache = EliteKVCache()
        steps = [model(ids[:, :16], **cache_kwargs(cache), use_cache=True).logits]
        for t in range(16, 24):
            steps.append(model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


def test_attention_path_is_saved_and_validated(tmp_path):
    from transformers import AutoModelForCausalLM

    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    with pytest.raises(ValueError, match="choose one of"):
        set_attention_path(model, "fast")
    set_attention_path(model, "auto")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].self_attn.attention_path == "auto"
    assert (tmp_path / "absorbed.py").is_file()


def test_an_unset_path_is_auto_on_cuda_and_reconstruct_elsewhere():
    """Plain ``generate()`` on CUDA decodes on the latent (the fused kernel) with no switch set; on a CPU the unset
    path rebuilds keys and values. ``absorbed_reference`` attends on the latent in PyTorch, equal to ``absorbed``."""
    from elitekv_peft.modeling.attention_elitekv import default_attention_path

    assert default_attention_path(torch.device("cuda")) == "auto"
    assert default_attention_path(torch.device("cpu")) == "reconstruct"
    model = convert(tiny_model("llama_gqa"), kv_ratio=0.25)
    attn = model.base_model.model.model.layers[0].self_attn
    assert "attention_path" not in attn.config.elitekv and attn.attention_path is None
    assert not attn.use_absorbed(1)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        logits = {}
        for path in ("absorbed", "absorbed_reference"):
            set_attention_path(model, path)
            assert attn.use_absorbed(16) and attn.use_absorbed(1)
            logits[path] = model(ids).logits
    assert torch.equal(logits["absorbed"], logits["absorbed_reference"])  # CPU: both the reference
