"""Upload a converted model to the Hugging Face Hub with its EliteKV model card.

`PeftModel.push_to_hub` (transformers' `PushToHubMixin`) replaces the ``README.md`` that ``save_pretrained`` writes
with a generic card (or the one already on the Hub). `push_to_hub` here saves the folder exactly as
``save_pretrained`` does (adapter, standalone model, modeling code, EliteKV model card) and uploads it as it is,
through huggingface_hub's ordinary `HfApi.create_repo` and `HfApi.upload_folder`.

One change to the uploaded ``adapter_config.json``: its ``base_model_name_or_path`` names the repository itself (the
original base is kept in its ``report``). ``AutoModelForCausalLM.from_pretrained(repo_id)`` of a Hub repository that
holds an adapter config loads the model that field names and then the adapter onto it; naming the repository makes
it load the standalone EliteKV model beside the adapter (whose ``load_adapter`` then skips the adapter, already
loaded), instead of the original base with the EliteKV adapter rebuilt over it. ``PeftModel.from_pretrained(base,
repo_id)`` uses the base it is given and reads the field nowhere.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
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
        name_repository_as_base(Path(folder) / "adapter_config.json", repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


def name_repository_as_base(adapter_config: Path, repo_id: str) -> None:
    """Set ``base_model_name_or_path`` of ``adapter_config`` to ``repo_id``, keeping the original in its ``report``
    (see the module docstring)."""
    data = json.loads(adapter_config.read_text(encoding="utf-8"))
    report = dict(data.get("report") or {})
    report.setdefault("base_model_name_or_path", data.get("base_model_name_or_path"))
    data["report"], data["base_model_name_or_path"] = report, repo_id
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
