"""The model loader of transformers' server from 5.25 on, which loads EliteKV folders.

From transformers 5.25 the server loads each model in a process of its own, started with ``spawn``: its
``ModelLoader`` travels there pickled, so the subclass lives at module level here, and importing this module (a
submodule of `elitekv_peft`) registers the EliteKV classes with the Auto classes in that process too. Imported only
where ``transformers.cli.serving.model_manager.ModelLoader`` exists (`elitekv_peft.serving.elitekv_loading`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.cli.serving import model_manager

from elitekv_peft.modeling.modeling_elitekv import ELITEKV_CLASSES

ELITEKV_MODEL_TYPES = frozenset(config_cls.model_type for config_cls, _ in ELITEKV_CLASSES.values())


class EliteKVModelLoader(model_manager.ModelLoader):
    """transformers' ``ModelLoader`` with one change: EliteKV folders load through ``AutoModelForCausalLM`` (with the
    loader's dtype, device, attention and quantization); every other model loads as transformers loads it."""

    def _load_model(
        self, model_id: str, tqdm_class: type | None = None, progress_callback: Callable | None = None
    ) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        repo, revision, gguf_file = model_manager.parse_model_id(model_id)
        config = None
        if gguf_file is None:
            config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=self.trust_remote_code)
        if config is None or config.model_type not in ELITEKV_MODEL_TYPES:
            return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id, "stage": "config"})
        options: dict[str, Any] = {
            "revision": revision,
            "attn_implementation": self.attn_implementation,
            "dtype": self.dtype,
            "device_map": self.device,
            "trust_remote_code": self.trust_remote_code,
        }
        quantization_config = self.get_quantization_config()
        if quantization_config is not None:
            options["quantization_config"] = quantization_config
        return AutoModelForCausalLM.from_pretrained(repo, config=config, **options).eval()
