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

from elitekv_peft.serving_models import ELITEKV_MODEL_TYPES, load_elitekv_model


class EliteKVModelLoader(model_manager.ModelLoader):
    """transformers' ``ModelLoader`` with one change: EliteKV folders load through ``AutoModelForCausalLM`` (with the
    loader's dtype, device, attention and quantization); every other model loads as transformers loads it."""

    def _load_model(
        self, model_id: str, tqdm_class: type | None = None, progress_callback: Callable | None = None
    ) -> Any:
        from transformers import AutoConfig

        repo, revision, gguf_file = model_manager.parse_model_id(model_id)
        config = None
        if gguf_file is None:
            config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=self.trust_remote_code)
        if config is None or config.model_type not in ELITEKV_MODEL_TYPES:
            return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)
        return load_elitekv_model(self, model_id, repo, revision, config, progress_callback)
