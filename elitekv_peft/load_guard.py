"""A model rebuilt from a saved conversion refuses to run until its converted attention weights are loaded.

Rebuilding (`PeftModel.from_pretrained`, a `Trainer` resuming, transformers' ``model.load_adapter``) puts new attention
modules in place whose latent projections start at zero; their weights are in the standalone model files beside the
adapter config, which only this library's loaders read (the adapter file holds no tensors). A loader that reads only
the adapter file would leave a model that runs and answers wrong. So every rebuilt module gets a forward pre-hook
that raises (`guard_until_loaded`), and a ``load_state_dict`` that brings all of the module's parameters removes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

LOAD_FIX = (
    "Load the saved folder with `AutoModelForCausalLM.from_pretrained(folder)` or "
    "`PeftModel.from_pretrained(base_model, folder)` (a Hub repository uploaded as saved: download it first with "
    "`huggingface_hub.snapshot_download(repo_id)`, or upload it with `elitekv_peft.push_to_hub`)."
)


def _refuse_unloaded(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"This EliteKV attention (layer {getattr(module, 'layer_idx', '?')}) was rebuilt from a saved conversion "
        "(adapter_config.json) but its weights were never loaded: they are in the standalone model files "
        "(model*.safetensors) beside the adapter config, which transformers' `model.load_adapter(...)` does not read "
        "(nor `AutoModelForCausalLM.from_pretrained` of a Hub repository whose adapter config names another base "
        f"model). {LOAD_FIX}"
    )


def _release_when_loaded(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
    """``load_state_dict`` pre-hook: once a state dict holds every parameter of ``module``, let it run."""
    if all(prefix + name in state_dict for name, _ in module.named_parameters()):
        release(module)


def release(module: nn.Module) -> None:
    """Remove the guard of `guard_until_loaded` from ``module`` (its weights are in place)."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _refuse_unloaded:
            del module._forward_pre_hooks[key]


def guard_until_loaded(modules: Iterable[nn.Module]) -> None:
    """Make each rebuilt attention module raise on use until a ``load_state_dict`` brings all its parameters."""
    for module in modules:
        module.register_forward_pre_hook(_refuse_unloaded)
        module.register_load_state_dict_pre_hook(_release_when_loaded)


def is_guarded(module: nn.Module) -> bool:
    """Whether ``module`` still waits for its weights."""
    return any(hook is _refuse_unloaded for hook in module._forward_pre_hooks.values())
