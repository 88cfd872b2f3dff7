"""Every decoding mode of `generate()` gives what the converted model itself computes without a cache.

A cache that is reordered (beam search), cropped (prompt lookup and assisted decoding), pre-allocated
(``cache_implementation="static"``) or handed back and continued must not change the tokens: each mode is compared
with the same converted model's own uncached (or plain greedy) result. Tiny random models, every method, a full
attention family and a sliding-window one whose window the prompt exceeds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from elitekv_peft import EliteKVStaticCache, set_attention_path
from elitekv_peft.compat import cache_kwargs, output_cache

from .tiny import VOCAB, convert, tiny_model

SETTINGS = [  # (method, kv_ratio, attention path or None)
    ("elitekv", 0.25, None),
    ("elitekv", 0.25, "absorbed"),
    ("kv_latent", 0.25, None),
    ("lorc", 0.25, None),
    ("gqa", 0.5, None),
]
FAMILIES = {"llama_gqa": {}, "mistral_gqa": {"sliding_window": 8}}
GREEDY = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": 10}


PARAMS = [(m, r, p, f) for m, r, p in SETTINGS for f in FAMILIES]


@pytest.fixture(scope="module", params=PARAMS, ids=["-".join(str(x) for x in p if x is not None) for p in PARAMS])
def model(request):
    method, ratio, path, family = request.param
    converted = convert(tiny_model(family, **FAMILIES[family]), method=method, kv_ratio=ratio)
    if path is not None:
        set_attention_path(converted, path)
    return converted


@pytest.fixture(scope="module")
def prompt():
    """A prompt of 2 rows x 24 tokens that repeats itself (so that prompt lookup proposes candidates)."""
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    return torch.cat([ids, ids, ids], dim=1)


@pytest.fixture(scope="module")
def uncached(model, prompt):
    with torch.no_grad():
        return model.generate(input_ids=prompt, use_cache=False, **GREEDY)


def test_greedy_with_the_default_and_the_static_cache(model, prompt, uncached):
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=prompt, **GREEDY), uncached)
        assert torch.equal(model.generate(input_ids=prompt, cache_implementation="static", **GREEDY), uncached)


def test_chunked_prefill_with_the_default_and_the_static_cache(model, prompt, uncached):
    """``prefill_chunk_size`` feeds the prompt in pieces; for a static cache transformers then allocates every layer
    early with the original's head shapes, which no converted layer stores (every method failed there)."""
    with torch.no_grad():
        for cache in (None, "static"):
            out = model.generate(input_ids=prompt, prefill_chunk_size=5, cache_implementation=cache, **GREEDY)
            assert torch.equal(out, uncached)


def test_chunked_prefill_of_the_standalone_model(prompt):
    """The saved model's class says the same (``merge_and_unload`` builds it, as loading a saved folder does)."""
    standalone = convert(tiny_model(), kv_ratio=0.25).merge_and_unload()
    with torch.no_grad():
        reference = standalone.generate(input_ids=prompt, use_cache=False, **GREEDY)
        out = standalone.generate(input_ids=prompt, prefill_chunk_size=5, cache_implementation="static", **GREEDY)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("standalone", [False, True], ids=["peft_model", "standalone"])
def test_continuous_batching_is_refused_with_the_fix(prompt, standalone):
    """transformers' continuous batching keeps a paged cache of full keys and values per head: for a converted
    model every request failed and came back as an empty result. It is refused, naming what to use instead."""
    model = convert(tiny_model(), kv_ratio=0.25)
    if standalone:
        model = model.merge_and_unload()
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match=r"model\.generate\(\)"):
        model.generate_batch([row.tolist() for row in prompt], generation_config=config)


def test_beam_search_reorders_the_cache(model, prompt):
    beams = dict(GREEDY, num_beams=3)
    with torch.no_grad():
        reference = model.generate(input_ids=prompt, use_cache=False, **beams)
        assert torch.equal(model.generate(input_ids=prompt, **beams), reference)
        assert torch.equal(model.generate(input_ids=prompt, cache_implementation="static", **beams), reference)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_candidate_decoding_crops_the_cache(model, prompt, uncached, mode):
    """Prompt lookup and assisted decoding verify candidate tokens and crop the rejected ones from the cache; the
    result must be the greedy one (transformers runs them with batch 1)."""
    extra = {"prompt_lookup_num_tokens": 3} if mode == "prompt_lookup" else {"assistant_model": tiny_model(seed=3)}
    with torch.no_grad():
        for row in range(prompt.shape[0]):
            out = model.generate(input_ids=prompt[row : row + 1], **GREEDY, **extra)
            assert torch.equal(out, uncached[row : row + 1])


def test_returned_cache_continues_the_generation(model, prompt, uncached):
    with torch.no_grad():
        first = model.generate(
            input_ids=prompt, return_dict_in_generate=True, **dict(GREEDY, max_new_tokens=4, min_new_tokens=4)
        )
        cache = output_cache(first)
        rest = model.generate(input_ids=first.sequences, **cache_kwargs(cache), **dict(GREEDY, max_new_tokens=6))
    assert torch.equal(rest, uncached)


@pytest.mark.parametrize(
    ("method", "path"), [("elitekv", None), ("elitekv", "absorbed"), ("lorc", None), ("gqa", None)]
)
def test_output_attentions_returns_each_layers_weights(method, path):
    """transformers collects attention weights with hooks on its own attention classes; the converted ones are
    hooked too (an empty tuple came back), and the latent path rebuilds keys when weights are asked for."""
    model = convert(tiny_model("llama_gqa", attn_implementation="eager"), method=method, kv_ratio=0.5)
    if path is not None:
        set_attention_path(model, path)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
        steps = model.generate(input_ids=ids, output_attentions=True, return_dict_in_generate=True, **GREEDY).attentions
    assert len(weights) == 2 and weights[0].shape == (2, 4, 9, 9)
    assert torch.allclose(weights[0].sum(-1), torch.ones(2, 4, 9), atol=1e-5)
    assert [tuple(step[0].shape) for step in steps[:3]] == [(2, 4, 9, 9), (2, 4, 1, 10), (2, 4, 1, 11)]


@pytest.mark.parametrize("method", ["elitekv", "lorc", "kv_latent", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_past_max_position_embeddings_is_refused(method, family):
    """Every method, also when layer 0 keeps only a window, and a static cache larger than the limit is fine."""
    settings = {**FAMILIES[family], "max_position_embeddings": 32}
    model = convert(tiny_model(family, **settings), method=method, kv_ratio=0.5)
    ids = torch.randint(3, VOCAB, (1, 28), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.generate(input_ids=ids, **dict(GREEDY, max_new_tokens=4, min_new_tokens=4))  # 32 tokens: within the limit
        cache = EliteKVStaticCache(model.config, max_cache_len=48) if method == "elitekv" else None
        if cache is not None:  # a buffer longer than the limit, filled within it
            model.generate(input_ids=ids, **cache_kwargs(cache), **dict(GREEDY, max_new_tokens=4, min_new_tokens=4))
        for extra in ({}, {"cache_implementation": "static"}):
            with pytest.raises(ValueError, match="more than max_position_embeddings=32"):
                model.generate(input_ids=ids, **extra, **dict(GREEDY, max_new_tokens=8, min_new_tokens=8))
