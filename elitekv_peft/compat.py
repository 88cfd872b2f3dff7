"""The one place that knows how the transformers versions `pyproject.toml` allows differ from each other.

transformers 5.24 renamed the cache argument of models and attention modules from ``past_key_values`` to ``cache``
(and the output field likewise); the old name still works there with a deprecation warning. Library code, tests and
benchmarks pass and read the cache through `cache_kwargs` and `output_cache`, so they use the installed version's name.
The attention modules of saved models read it with `modeling.attention_base.take_cache`, which needs nothing from
this module.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from transformers.cache_utils import Cache


@cache
def cache_argument_name() -> str:
    """``"cache"`` where the installed transformers' models take the cache by that name, else ``"past_key_values"``."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache_object: Cache | None) -> dict[str, Any]:
    """Keyword arguments that hand ``cache_object`` to a model's ``forward`` or ``generate`` on this transformers."""
    return {cache_argument_name(): cache_object}


def output_cache(output: Any) -> Cache | None:
    """The cache a model's forward returned (``output.cache`` on transformers >= 5.24, else ``past_key_values``)."""
    return getattr(output, cache_argument_name(), None)
