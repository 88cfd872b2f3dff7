"""Every decoding mode of `generate()` gives what the converted model itself computes without a cache.

A cache that is reordered (beam search), cropped (prompt lookup and assisted decoding), pre-allocated
(``cache_implementation="static"``) or handed back and continued must not change the tokens: each mode is compared
with the same converted model's own uncached (or plain greedy) result. Tiny random models, every method, a full
attention family and a sliding-window one whose window the prompt exceeds.
"""

from __future__ import annotations

import pytest
import torch

from elitekv_peft import set_attention_path
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
        first = model.generate(input_ids=prompt, return_dict_in_generate=True, **dict(GREEDY, max_new_tokens=4))
        cache = output_cache(first)
        rest = model.generate(input_ids=first.sequences, **cache_kwargs(cache), **dict(GREEDY, max_new_tokens=6))
    assert torch.equal(rest, uncached)
