"""Guard tests: decoding with the cache gives what decoding without it gives, on the installed transformers.

transformers 5.24 renamed the cache argument (``past_key_values`` -> ``cache``); converted attention that read only the
old name cached nothing and decoded without context, silently. These tests fail in that case. They run in both CI
tiers (the locked versions and the newest versions pyproject.toml allows), for every method, on an MHA and a GQA
model, in every form a user holds the model:

* ``peft``: the model `get_peft_model` returned;
* ``merged``: ``merge_and_unload()``, the standalone transformers model;
* ``reloaded``: the folder of ``save_pretrained`` loaded with ``AutoModelForCausalLM`` (after ``import elitekv_peft``);
* ``remote``: the same folder's own modeling files, as ``trust_remote_code=True`` loads them without the package.

Checked, each with the cache the model makes by itself (the path that broke): greedy ``generate()`` with the cache ==
without it; prefill + one-token steps == one full forward (float32, ``atol = rtol = 1e-4``); the cache's bytes are
within ``[0.9, 1] x kv_ratio`` of the original model's. Also `EliteKVStaticCache` and the absorbed attention path, and
the clear error when a layer is asked to cache but gets no cache.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from elitekv_peft import EliteKVStaticCache, cache_nbytes, set_attention_path
from elitekv_peft.compat import cache_kwargs, output_cache

from .tiny import VOCAB, convert, tiny_model

METHODS = {"elitekv": 0.25, "lorc": 0.25, "kv_latent": 0.25, "gqa": 0.5}
FAMILIES = ["llama_mha", "llama_gqa"]
FORMS = ["peft", "merged", "reloaded", "remote"]
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NEW_TOKENS = 8


def ids_of(batch: int, length: int, seed: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``get(method, family, form)`` -> the converted model in that form (built once per module)."""
    built: dict[tuple[str, str], torch.nn.Module] = {}
    folders: dict[tuple[str, str], str] = {}
    forms: dict[tuple[str, str, str], torch.nn.Module] = {}

    def peft_model(method: str, family: str) -> torch.nn.Module:
        if (method, family) not in built:
            model = convert(tiny_model(family, seed=2), method=method, kv_ratio=METHODS[method])
            with torch.no_grad():  # simulated uptraining, so that no form equals the untouched conversion by chance
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 1e-2)
            built[method, family] = model
        return built[method, family]

    def folder(method: str, family: str) -> str:
        if (method, family) not in folders:
            path = tmp_path_factory.mktemp(f"{method}_{family}")
            peft_model(method, family).save_pretrained(path)
            folders[method, family] = str(path)
        return folders[method, family]

    def get(method: str, family: str, form: str) -> torch.nn.Module:
        key = (method, family, form)
        if key in forms:
            return forms[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if form == "peft":
                model = peft_model(method, family)
            elif form == "merged":
                model = convert(tiny_model(family, seed=2), method=method, kv_ratio=METHODS[method])
                model.load_state_dict(peft_model(method, family).state_dict())
                model = model.merge_and_unload()
            elif form == "reloaded":
                model = AutoModelForCausalLM.from_pretrained(folder(method, family))
            else:  # what trust_remote_code=True loads where elitekv_peft is not installed: the folder's own files
                path = folder(method, family)
                config = AutoConfig.from_pretrained(path)
                model_class = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], path)
                model = model_class.from_pretrained(path)
                assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        forms[key] = model.eval()
        return forms[key]

    return get


def static_cache_class(model: torch.nn.Module) -> type:
    """`EliteKVStaticCache` of the code ``model`` runs: the package's, or that of the folder's own files (remote)."""
    package = type(model).__module__.rpartition(".")[0]
    if not package.startswith("transformers_modules"):
        return EliteKVStaticCache
    found = {
        getattr(module, "EliteKVStaticCache", None)
        for name, module in list(sys.modules.items())
        if name.startswith(package + ".") and module is not None
    }
    found.discard(None)
    assert len(found) == 1, found
    return found.pop()


def greedy(model: torch.nn.Module, ids: torch.Tensor, use_cache: bool, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            **kwargs,
        )


def stepwise_logits(model: torch.nn.Module, ids: torch.Tensor, prefill: int, cache=None) -> torch.Tensor:
    """Logits ``[B, T, V]`` from a prefill of ``prefill`` tokens then one-token steps, on the model's own cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True, **({} if cache is None else cache_kwargs(cache)))
        cache = output_cache(out)
        assert cache is not None and cache.get_seq_length() == prefill
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], use_cache=True, **cache_kwargs(cache))
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_greedy_generate_equals_uncached(models, method, family, form):
    model = models(method, family, form)
    ids = ids_of(2, 10)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_incremental_steps_equal_the_full_forward(models, method, family, form):
    model = models(method, family, form)
    ids = ids_of(2, 18)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert torch.allclose(stepwise_logits(model, ids, prefill=11), full, **TOLERANCE)


@pytest.mark.parametrize("form", ["peft", "reloaded"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_cache_bytes_match_the_configured_ratio(models, method, family, form):
    ids = ids_of(2, 24)
    with torch.no_grad():
        original = cache_nbytes(output_cache(tiny_model(family, seed=2)(ids, use_cache=True)))
        converted = cache_nbytes(output_cache(models(method, family, form)(ids, use_cache=True)))
    assert original > 0
    assert 0.9 * METHODS[method] * original <= converted <= METHODS[method] * original


@pytest.mark.parametrize("form", ["peft", "reloaded", "remote"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_decodes_like_no_cache(models, family, form):
    model = models("elitekv", family, form)
    ids = ids_of(2, 10)
    cache = static_cache_class(model)(model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)
    assert torch.equal(greedy(model, ids, use_cache=True, **cache_kwargs(cache)), greedy(model, ids, use_cache=False))
    assert int(cache.get_seq_length()) == ids.shape[1] + NEW_TOKENS - 1  # the last token is produced, not cached


@pytest.mark.parametrize("family", FAMILIES)
def test_absorbed_path_steps_equal_the_full_forward(models, family):
    model = convert(tiny_model(family, seed=2), method="elitekv", kv_ratio=0.25)
    ids = ids_of(2, 18)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    set_attention_path(model, "absorbed")
    assert torch.allclose(stepwise_logits(model, ids, prefill=11), full, **TOLERANCE)
    static = EliteKVStaticCache(model.config, max_cache_len=ids.shape[1])
    assert torch.allclose(stepwise_logits(model, ids, prefill=11, cache=static), full, **TOLERANCE)


def call_first_attention(model: torch.nn.Module, length: int, **kwargs) -> None:
    """Call layer 0's converted attention directly on ``length`` embedded tokens, with ``kwargs`` as a decoder
    layer of some transformers version would pass them (``use_cache=True`` and the cache under some name)."""
    decoder = model.model
    hidden = decoder.embed_tokens(ids_of(1, length))
    position_embeddings = decoder.rotary_emb(hidden, torch.arange(length).unsqueeze(0))
    with torch.no_grad():
        decoder.layers[0].self_attn(
            hidden, position_embeddings=position_embeddings, attention_mask=None, use_cache=True, **kwargs
        )


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("method", list(METHODS))
def test_attention_takes_the_cache_under_either_name(models, method, name):
    """Whichever name a transformers version uses, the converted attention layer fills the cache it is given."""
    from transformers import DynamicCache

    cache = DynamicCache()
    call_first_attention(models(method, "llama_gqa", "merged"), 6, **{name: cache})
    assert cache.get_seq_length() == 6


@pytest.mark.parametrize("method", list(METHODS))
def test_asked_to_cache_without_a_cache_raises_naming_the_version(models, method):
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}"):
        call_first_attention(models(method, "llama_gqa", "merged"), 6, kv_states=object())
