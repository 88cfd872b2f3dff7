"""Upload a converted model to the Hugging Face Hub with its EliteKV model card.

`PeftModel.push_to_hub` (transformers' `PushToHubMixin`) replaces the ``README.md`` that ``save_pretrained`` writes
with a generic card (or the one already on the Hub). `push_to_hub` here saves the folder exactly as
``save_pretrained`` does (adapter, standalone model, modeling code, EliteKV model card) and uploads it as it is,
through huggingface_hub's ordinary `HfApi.create_repo` and `HfApi.upload_folder`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from torch import nn


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload EliteKV model",
    revision: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
) -> Any:
    """Save ``model`` (a PEFT model with an EliteKV adapter) and upload the folder to ``repo_id``.

    ``tokenizer``, when given, is saved into the same folder. Returns `HfApi.upload_folder`'s commit info.
    """
    from huggingface_hub import HfApi

    from .tuner import _elitekv_config

    config = _elitekv_config(model)
    if not config.is_converted:
        raise ValueError("This model's EliteKV adapter is not converted yet; nothing to upload.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
