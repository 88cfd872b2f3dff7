"""What both of transformers' server designs need to load an EliteKV folder (`elitekv_peft.serving` before 5.25,
`elitekv_peft.serving_loader` from 5.25 on): the EliteKV model types and the load itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from elitekv_peft.modeling.modeling_elitekv import ELITEKV_CLASSES

# every family that converts (one config class per base model_type: `modeling_elitekv.ELITEKV_CLASSES`)
ELITEKV_MODEL_TYPES = frozenset(config_cls.model_type for config_cls, _ in ELITEKV_CLASSES.values())


def load_elitekv_model(
    loader: Any, model_id: str, name: str, revision: str | None, config: Any, progress_callback: Callable | None
) -> Any:
    """An EliteKV model through ``AutoModelForCausalLM``, with the server's options held by ``loader`` (its
    ``ModelManager`` before transformers 5.25, its ``ModelLoader`` after): dtype, device, attention, quantization.

    Args:
        model_id: the model as the server names it (reported to ``progress_callback``).
        name, revision: the folder or repo, and its revision.
        config: the folder's config, already loaded.
    """
    from transformers import AutoModelForCausalLM

    if progress_callback is not None:
        progress_callback({"status": "loading", "model": model_id, "stage": "config"})
    options: dict[str, Any] = {
        "revision": revision,
        "attn_implementation": loader.attn_implementation,
        "dtype": loader.dtype,
        "device_map": loader.device,
        "trust_remote_code": loader.trust_remote_code,
    }
    quantization_config = loader.get_quantization_config()
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(name, config=config, **options).eval()
