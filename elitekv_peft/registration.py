"""Registration with PEFT and transformers' Auto classes.

`ensure_peft_type` (`elitekv_peft.peft_type`) makes ``PeftType.ELITEKV`` exist first; `register_with_peft` then
registers the config and tuner classes under it, and `register_with_transformers` the Auto classes.
"""

from __future__ import annotations

from .peft_type import PEFT_TYPE_NAME, ensure_peft_type

__all__ = ["PEFT_TYPE_NAME", "ensure_peft_type", "register_with_peft", "register_with_transformers"]


def register_with_peft() -> None:
    """Register `EliteKVConfig` / `EliteKVModel` with PEFT (once)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import EliteKVConfig
    from .tuner import EliteKVModel

    peft_type = ensure_peft_type()
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name="elitekv", config_cls=EliteKVConfig, model_cls=EliteKVModel, prefix="elitekv_")


def register_with_transformers() -> None:
    """Register the EliteKV model classes with ``AutoConfig`` and ``AutoModelForCausalLM`` (once)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling.modeling_elitekv import ELITEKV_CLASSES

    for config_cls, model_cls in ELITEKV_CLASSES.values():
        if config_cls.model_type in CONFIG_MAPPING:
            continue
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModelForCausalLM.register(config_cls, model_cls)
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModelForCausalLM")
