"""Where a loaded EliteKV adapter reads its weights: the standalone model files saved beside its config.

`EliteKVModel` saves an adapter file that holds only the save's id (`SAVE_ID_KEY`); the weights are the standalone
model's (`elitekv_peft.artifact`). Loading the adapter reads them from the folder the config was read from
(``EliteKVConfig._weights_source``, `standalone_state_dict`), after checking that the adapter file comes from the same
save (`check_save_id`); `read_weights_from` points a live config at another folder (a `Trainer` resuming or loading
its best checkpoint), and `require_attention_weights` refuses a load that lacks converted attention weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .artifact import local_folder, read_standalone_weights
from .config import EliteKVConfig
from .quantization import quantized_modules

SAVE_ID_KEY = "elitekv_save_id"
"""The adapter file's only tensor: the save's id (uint8 bytes), matched against ``EliteKVConfig.save_id``."""
SAVE_ID_BYTES = 16


def require_attention_weights(module: nn.Module, incompatible_keys: Any) -> None:
    """Post-hook of the first ``load_state_dict`` after a rebuild: every EliteKV attention weight must be loaded.

    A rebuilt model's latent projections start at zero; PEFT loads adapters with ``strict=False`` and does not report
    missing keys of this tuner, so an incomplete adapter file would otherwise load silently.
    """
    if not getattr(module, "_awaiting_checkpoint", False):
        return
    module._awaiting_checkpoint = False
    missing = [k for k in incompatible_keys.missing_keys if ".self_attn." in k and not k.endswith("chunk_index")]
    if missing:
        raise ValueError(
            f"The EliteKV adapter checkpoint lacks {len(missing)} converted attention weights (e.g. {missing[0]}): "
            "the file is incomplete or corrupt. Save the model again (`save_pretrained`) or copy/download the "
            "folder again."
        )


def standalone_state_dict(model: nn.Module, config: EliteKVConfig) -> dict[str, torch.Tensor]:
    """The weights of the standalone model saved beside ``config``'s adapter, under PEFT's keys.

    Bitsandbytes-quantized layers of ``model`` keep their own weights (the adapter never held them).
    """
    source = getattr(config, "_weights_source", None)
    if source is None or not config.standalone_weights:
        raise ValueError(
            "This EliteKV adapter file holds no weights: they are in the standalone model files (model*.safetensors) "
            "beside adapter_config.json, and this loader did not say which folder it read. Load the folder with "
            "`PeftModel.from_pretrained(base_model, folder)` or `AutoModelForCausalLM.from_pretrained(folder)`; to "
            "resume training from a checkpoint use `elitekv_peft.training.uptrain` (or `EliteKVTrainer`)."
        )
    name_or_path, subfolder, hub_kwargs = source
    folder = local_folder(name_or_path, subfolder, sorted(config.standalone_weights), **hub_kwargs)
    skip = tuple(name.removeprefix("base_model.model.") for name in quantized_modules(model))
    return read_standalone_weights(folder, config.standalone_weights, skip)


def check_save_id(config: EliteKVConfig, saved_id: torch.Tensor | None) -> None:
    """Refuse an adapter file written by another save than the one ``config`` describes.

    PEFT re-reads the adapter config only for a new adapter name: ``model.load_adapter(folder, "default")`` (what a
    `Trainer` does to resume or to load the best checkpoint) keeps the live config, so the weights would be read from
    the folder that config came from, not from ``folder``. Files saved before save ids existed are not checked.
    """
    if saved_id is None or config.save_id is None or bytes(saved_id.tolist()).hex() == config.save_id:
        return
    source = (getattr(config, "_weights_source", None) or ("another folder",))[0]
    raise ValueError(
        "This EliteKV adapter file was saved with another folder than the one this model's adapter config was read "
        f"from ({source}); its weights would be read from there. Call "
        "`elitekv_peft.adapter_source.read_weights_from(model, folder)` before `load_adapter(folder, ...)`, as "
        "`elitekv_peft.training.EliteKVTrainer` does when it resumes or loads the best checkpoint, or load the "
        "folder into a fresh base with `PeftModel.from_pretrained`."
    )


def read_weights_from(model: nn.Module, folder: str) -> None:
    """Make the next adapter load of ``model`` (e.g. a `Trainer` resuming) read the weights saved in ``folder``.

    No-op for a model without an EliteKV adapter or a folder without an EliteKV adapter config.
    """
    configs = getattr(model, "peft_config", None)
    found = [c for c in configs.values() if isinstance(c, EliteKVConfig)] if isinstance(configs, dict) else []
    if not found or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return
    saved = EliteKVConfig.from_pretrained(folder)
    if saved.is_converted and saved.conversion_choices() != found[0].conversion_choices():
        raise ValueError(
            f"{folder} holds a conversion other than this model's (other chunks, latent sizes or plan: converted "
            "anew from other calibration text or settings), so its weights do not fit this model's layout. Load the "
            "checkpoint itself: PeftModel.from_pretrained(base_model, folder, is_trainable=True)."
        )
    found[0]._weights_source = saved._weights_source
    found[0].standalone_weights = saved.standalone_weights
    found[0].save_id = saved.save_id
