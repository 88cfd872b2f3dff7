"""The saved folder: one copy of the weights, loadable as a standalone model and as a PEFT adapter.

What `PeftModel.save_pretrained` writes for an EliteKV model (`write_artifact`, called by the tuner):

* ``config.json``, ``model-00001-of-00001.safetensors`` + ``model.safetensors.index.json`` and the modeling files
  named in ``auto_map``: the standalone model, for ``AutoModelForCausalLM.from_pretrained(folder)``;
* ``adapter_config.json``: the PEFT config; its ``standalone_weights`` maps each standalone weight file to its
  SHA-256, which tells the PEFT loader that the weights are there;
* ``adapter_model.safetensors``: no tensors (PEFT requires the file). `PeftModel.from_pretrained` reads the
  standalone weights instead (`read_standalone_weights`, under PEFT's ``base_model.model.`` key prefix);
* ``README.md``: the model card.

Folders of version 0.1 hold the trainable weights a second time in ``adapter_model.safetensors`` and no
``standalone_weights``; they load as before.

Standalone weights use the sharded file name even for one shard: a plain ``model.safetensors`` would make a
`Trainer` resume by loading it into the `PeftModel` (whose keys differ); with the sharded name the Trainer resumes
through the adapter, as for any PEFT model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
ONE_SHARD = "model-00001-of-00001.safetensors"
PEFT_PREFIX = "base_model.model."
FIX_RESAVE = "Save the model again (`save_pretrained`) or copy/download the folder again."


def file_sha256(path: str) -> str | None:
    """SHA-256 of the file at ``path`` (None if it is not there)."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_safetensors_complete(path: str) -> None:
    """Raise if the safetensors file at ``path`` is truncated or its header is unreadable (no-op if absent)."""
    if not os.path.isfile(path):
        return
    size = os.path.getsize(path)
    problem = None
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            problem = "its header is cut off or unreadable"
        else:
            try:
                header = json.loads(handle.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "its header is not valid safetensors"
            else:
                if 8 + length + end != size:
                    problem = f"it has {size} bytes where its header announces {8 + length + end}"
    if problem:
        raise ValueError(f"{path} is truncated or corrupt ({problem}). {FIX_RESAVE}")


def check_adapter_file(folder: str, checksum: str | None) -> None:
    """In a local ``folder``, raise naming the fix if ``adapter_model.safetensors`` is truncated, or differs from
    ``checksum`` (the adapter config's ``adapter_sha256``; None: not checked). No-op for a Hub id."""
    if not os.path.isdir(folder):
        return
    check_safetensors_complete(os.path.join(folder, ADAPTER_WEIGHTS))
    if checksum is not None:
        actual = file_sha256(os.path.join(folder, ADAPTER_WEIGHTS))
        if actual != checksum:
            found = "is missing" if actual is None else "does not match the checksum saved with it"
            raise ValueError(
                f"The adapter weights in {folder} ({ADAPTER_WEIGHTS}) {found}: the file is truncated, corrupt or "
                f"was replaced. {FIX_RESAVE}"
            )


def weight_files(folder: str) -> list[str]:
    """The standalone model's safetensors files in ``folder`` (from its index, else ``model.safetensors``)."""
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    return [SINGLE_WEIGHTS] if os.path.isfile(os.path.join(folder, SINGLE_WEIGHTS)) else []


def write_artifact(standalone: nn.Module, save_directory: str) -> dict[str, str]:
    """Save ``standalone`` (an ``EliteKV*ForCausalLM``) into ``save_directory`` in the sharded layout.

    Returns ``{weight file name: SHA-256}``, which the adapter config keeps as ``standalone_weights``.
    """
    from safetensors import safe_open

    standalone.save_pretrained(save_directory)
    single = os.path.join(save_directory, SINGLE_WEIGHTS)
    if os.path.isfile(single):  # one file: rename it to the sharded layout (see the module docstring)
        os.replace(single, os.path.join(save_directory, ONE_SHARD))
        with safe_open(os.path.join(save_directory, ONE_SHARD), framework="pt") as handle:
            keys = list(handle.keys())
        index = {
            "metadata": {"total_size": os.path.getsize(os.path.join(save_directory, ONE_SHARD))},
            "weight_map": dict.fromkeys(sorted(keys), ONE_SHARD),
        }
        with open(os.path.join(save_directory, WEIGHTS_INDEX), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
    return {name: file_sha256(os.path.join(save_directory, name)) for name in weight_files(save_directory)}


def local_folder(name_or_path: str, subfolder: str | None, files: list[str], **hub_kwargs: Any) -> str:
    """The local folder holding ``files`` of a saved model: ``name_or_path`` itself, or a Hub download of them."""
    folder = os.path.join(name_or_path, subfolder or "")
    if os.path.isdir(folder):
        return folder
    from huggingface_hub import hf_hub_download

    allowed = ("revision", "token", "cache_dir", "local_files_only", "force_download")
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    paths = [hf_hub_download(name_or_path, name, subfolder=subfolder, **kwargs) for name in files]
    return os.path.dirname(paths[0])


def check_standalone_weights(folder: str, checksums: dict[str, str]) -> None:
    """Raise, naming the fix, if a standalone weight file in ``folder`` is missing, truncated or altered."""
    for name, expected in checksums.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the folder is incomplete. {FIX_RESAVE}")
        check_safetensors_complete(path)
        if expected is not None and file_sha256(path) != expected:
            raise ValueError(
                f"{path} does not match the checksum saved with the adapter: the file is corrupt or was replaced. "
                f"{FIX_RESAVE}"
            )


def read_standalone_weights(folder: str, checksums: dict[str, str], skip: tuple[str, ...] = ()) -> dict:
    """The standalone weights in ``folder`` under PEFT's keys (``base_model.model.`` + name), checksums verified.

    Args:
        skip: module names (without the PEFT prefix) whose weights are not taken, e.g. bitsandbytes-quantized
            frozen layers of the base model that the adapter never held.
    """
    from safetensors.torch import load_file

    check_standalone_weights(folder, checksums)
    state: dict[str, torch.Tensor] = {}
    for name in checksums:
        for key, tensor in load_file(os.path.join(folder, name)).items():
            if not any(key.startswith(f"{module}.") for module in skip):
                state[PEFT_PREFIX + key] = tensor
    return state
