"""`EliteKVModel`: the PEFT tuner that rewrites a model's attention into EliteKV attention.

Unlike LoRA it does not wrap layers with adapters beside frozen base weights: the conversion replaces every
attention module (RoPElite + J-LRD), and uptraining then trains the parameters named by ``config.trainable``.
The adapter saved by `PeftModel.save_pretrained` therefore holds every converted attention weight and every
trainable parameter, and `PeftModel.from_pretrained(base, path)` rebuilds the conversion from the saved chunk
choices (no calibration) before loading them. Next to the adapter, ``save_pretrained`` also writes a standalone
transformers model (``config.json`` + ``model.safetensors`` + code) that loads with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .adapter_source import SAVE_ID_BYTES, SAVE_ID_KEY, check_save_id, require_attention_weights, standalone_state_dict
from .artifact import write_artifact
from .config import EliteKVConfig
from .conversion import convert, decoder_of
from .distributed import check_same_conversion
from .load_guard import guard_until_loaded
from .model_card import write_model_card
from .modeling.attention_elitekv import EliteKVAttention
from .modeling.modeling_elitekv import CONVERTED_ATTENTION, ELITEKV_CLASSES, GENERATION_OVERRIDES
from .quantization import check_trainable_scope, dense_state_dict, quantized_modules

logger = logging.getLogger(__name__)


class EliteKVLayer(BaseTunerLayer):
    """The tuner-layer class PEFT's `BaseTuner` requires (``tuner_layer_cls``). No module is an instance of it: the
    converted attention replaces the attention module instead of wrapping a base layer (docs/architecture.md)."""


class EliteKVModel(BaseTuner):
    """Creates an EliteKV model (compressed KV cache) from a pretrained transformers causal LM.

    Example::

        >>> from peft import get_peft_model
        >>> from elitekv_peft import EliteKVConfig
        >>> model = get_peft_model(base_model, EliteKVConfig(kv_ratio=0.25, calibration_data=token_ids))
        >>> model.print_trainable_parameters()
    """

    prefix: str = "elitekv_"
    tuner_layer_cls = EliteKVLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Convert ``model``'s attention (calibration, chunk search, SVD) and set trainable parameters."""
        if low_cpu_mem_usage or nn.Linear(1, 1, bias=False).weight.is_meta:  # PeftModel: modules built on meta
            raise ValueError(
                "low_cpu_mem_usage=True is not supported for EliteKV adapters: the converted attention is built from "
                "the base model's weights (or rebuilt and then loaded) on the base's own device, not on the meta "
                "device. Load without low_cpu_mem_usage (PeftModel.from_pretrained(base, folder)), or load the "
                "standalone model with AutoModelForCausalLM.from_pretrained(folder), which supports it."
            )
        if len(self.peft_config) > 1:
            raise ValueError(
                "An EliteKV conversion rewrites the model's attention, so a model takes only one EliteKV adapter. "
                "Convert a fresh copy of the base model for another setting."
            )
        peft_config: EliteKVConfig = self.peft_config[adapter_name]
        filled = (
            "chunk_indices",
            "latent_dims",
            "key_latent_dims",
            "base_shape",
            "rope_chunks",
            "latent_dim",
            "method_plan",
            "report",
        )
        saved = {name: getattr(peft_config, name) for name in filled}
        check_trainable_scope(model, peft_config.trainable)
        try:
            self.conversion_report = convert(model, peft_config)
        except Exception:
            for name, value in saved.items():  # the config is left as it was given
                setattr(peft_config, name, value)
            raise
        peft_config.calibration_data = None  # used; do not keep token ids alive
        if self.conversion_report is not None:
            check_same_conversion(peft_config)  # DDP: every rank calibrated alike
        converted = [
            (name, module) for name, module in model.named_modules() if isinstance(module, CONVERTED_ATTENTION)
        ]
        if self.conversion_report is None:  # rebuilt from saved choices: the checkpoint must supply the weights
            self._awaiting_checkpoint = True
            self.register_load_state_dict_post_hook(require_attention_weights)
            guard_until_loaded(module for _, module in converted)  # whichever loader runs, none runs on zeros
        self.targeted_module_names = [name for name, _ in converted]
        for name, override in GENERATION_OVERRIDES.items():  # what the standalone class says in `generate()`
            setattr(model, name, override)
        self._mark_only_adapters_as_trainable(model)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - not used
        raise NotImplementedError("EliteKV converts whole attention modules in `inject_adapter`.")

    def _prepare_adapter_config(self, peft_config: EliteKVConfig, model_config: dict) -> EliteKVConfig:
        return peft_config

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """``config.trainable``; nothing in inference mode (`PeftModel.from_pretrained` without ``is_trainable``)."""
        config = self.peft_config[self.active_adapter]
        set_trainable(model, "none" if config.inference_mode else config.trainable)

    def _check_new_adapter_config(self, config: EliteKVConfig) -> None:
        pass

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: EliteKVConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Nothing for the adapter file when saving an EliteKV `PeftModel`: its weights go to the standalone model.

        PEFT asks for the adapter's state dict first when saving; the export of the whole folder (`export`, with
        ``state_dict``: under FSDP the gathered full state dict the Trainer passes, while the live parameters are
        shards) is left on ``config``, whose ``save_pretrained`` PEFT calls with the folder next. For any other
        model (no EliteKV tuner inside), the converted attention weights plus every trainable parameter.
        """
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, EliteKVModel) and config.is_converted:
            config._pending_export = functools.partial(tuner.export, peft_config=config, state_dict=state_dict)
            config._pending_save_id = secrets.token_hex(SAVE_ID_BYTES)  # the config takes it when it is saved
            return {SAVE_ID_KEY: torch.tensor(list(bytes.fromhex(config._pending_save_id)), dtype=torch.uint8)}
        keep: set[str] = set()
        for module_name, module in model.named_modules():
            if isinstance(module, CONVERTED_ATTENTION):
                prefix = module_name.removeprefix("_fsdp_wrapped_module.") + "."
                keep.update(k for k in state_dict if k.startswith(prefix))
        for name, param in model.named_parameters():
            if param.requires_grad:
                keep.add(name.removeprefix("_fsdp_wrapped_module."))
        return {k: v for k, v in state_dict.items() if k in keep}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: EliteKVConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """An adapter saved with its weights in the standalone model (an adapter file holding only the save id)
        reads them from there, after checking that the config was read from the same save (`check_save_id`)."""
        state_dict = dict(state_dict)
        saved_id = state_dict.pop(SAVE_ID_KEY, None)
        if not state_dict and config.is_converted:
            check_save_id(config, saved_id)
            state_dict = standalone_state_dict(model, config)
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def export(
        self, save_directory: str, peft_config: EliteKVConfig, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, str]:
        """Write the standalone model (its weights are the folder's only copy) and the model card.

        Returns ``{weight file: SHA-256}`` (the adapter config's ``standalone_weights``).
        """
        checksums = write_artifact(to_standalone(self.model, peft_config, state_dict), save_directory)
        if not checksums:  # transformers writes model files on global rank 0 only
            raise RuntimeError(
                f"save_pretrained({save_directory!r}) ran on a process that is not global rank 0, where transformers "
                "writes no model files, so this folder would hold an EliteKV adapter without its weights. Save on the "
                "main process only (`if trainer.is_world_process_zero():`, `accelerator.is_main_process`), and do not "
                "use save_on_each_node across machines."
            )
        write_model_card(self.model, peft_config, save_directory)
        return checksums

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise NotImplementedError(
                "EliteKV replaces the attention modules, so they cannot be disabled; compare against a separately "
                "loaded base model instead."
            )

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        pass

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.active_adapter = adapter_name
        if inference_mode:
            set_trainable(self.model, "none")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Return a standalone transformers model (``EliteKV*ForCausalLM``) sharing this model's weights."""
        return to_standalone(self.model, self.peft_config[self.active_adapters[0]])

    def unload(self) -> nn.Module:
        raise NotImplementedError(
            "EliteKV rewrites attention in place and does not keep the original weights; reload the base model "
            "to get it back, or use `merge_and_unload()` for a standalone EliteKV model."
        )


def _elitekv_config(model: nn.Module) -> EliteKVConfig:
    """The `EliteKVConfig` of a PEFT model (`get_peft_model` / `PeftModel.from_pretrained`) or an `EliteKVModel`."""
    configs = getattr(model, "peft_config", None)
    found = [c for c in configs.values() if isinstance(c, EliteKVConfig)] if isinstance(configs, dict) else []
    if not found:
        raise TypeError(
            f"{type(model).__name__} holds no EliteKV adapter; pass the model returned by `get_peft_model(model, "
            "EliteKVConfig(...))` or `PeftModel.from_pretrained`."
        )
    return found[0]


def record_evaluation(
    model: nn.Module,
    value: float,
    *,
    metric: str = "perplexity",
    dataset: str | None = None,
    split: str | None = None,
    tokens: int | None = None,
) -> None:
    """Record a measured result (e.g. held-out perplexity) so that ``save_pretrained`` puts it in the model card.

    Stored in the adapter config's ``report["evaluations"]`` (saved with it); a result for the same metric,
    dataset and split replaces the earlier one.
    """
    value = float(value)
    if value != value:
        raise ValueError(f"{metric} is NaN; record a finite measurement.")
    config = _elitekv_config(model)
    report = dict(config.report or {})
    entry = {"metric": metric, "value": value, "dataset": dataset, "split": split, "tokens": tokens}
    keep = [
        e
        for e in report.get("evaluations", [])
        if (e["metric"], e.get("dataset"), e.get("split")) != (metric, dataset, split)
    ]
    report["evaluations"] = keep + [entry]
    config.report = report


def record_training(model: nn.Module, tokens: int, *, dataset: str | None = None) -> None:
    """Record the uptraining token budget (total tokens trained on) for the model card."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r} must be a non-negative integer (the number of tokens trained on).")
    config = _elitekv_config(model)
    config.report = {**(config.report or {}), "training": {"tokens": tokens, "dataset": dataset}}


def set_trainable(model: nn.Module, scope: str) -> None:
    """Set ``requires_grad`` by scope: ``all``, ``attention``, ``attention_norms`` or ``none``."""
    check_trainable_scope(model, scope)
    attention_params = {id(p) for m in model.modules() if isinstance(m, CONVERTED_ATTENTION) for p in m.parameters()}
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if scope == "all":
            param.requires_grad_(True)
        elif scope == "attention":
            param.requires_grad_(id(param) in attention_params)
        elif scope == "attention_norms":
            param.requires_grad_(id(param) in attention_params or id(param) in norm_params)
        else:
            param.requires_grad_(False)


def to_standalone(
    model: nn.Module, peft_config: EliteKVConfig, state_dict: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """A registered ``EliteKV*ForCausalLM`` holding (sharing) ``model``'s weights, ready for `save_pretrained`.

    Args:
        state_dict: the weights to use instead of ``model``'s own, keyed as ``model`` or as its `PeftModel`
            (``base_model.model.`` prefix), e.g. the full state dict gathered from FSDP shards.
    """
    base_type = model.config.model_type
    if base_type not in ELITEKV_CLASSES:
        raise TypeError(f"no standalone EliteKV class for model_type={base_type!r}")
    config_cls, model_cls = ELITEKV_CLASSES[base_type]
    data = model.config.to_dict()
    data.update(model_type=config_cls.model_type, architectures=[model_cls.__name__])
    quantized = bool(quantized_modules(model))
    if quantized:  # the artifact holds the dequantized weights (see `dense_state_dict`)
        data.pop("quantization_config", None)
        data.pop("_pre_quantization_dtype", None)
        logger.info("bitsandbytes layers are saved dequantized: the artifact loads without bitsandbytes.")
    if peft_config.report and isinstance(data.get("elitekv"), dict):  # calibration errors travel with config.json
        data["elitekv"] = {**data["elitekv"], "report": peft_config.report}
    config = config_cls.from_dict(data)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        standalone = model_cls(config)
    if state_dict is None or quantized:
        state = dense_state_dict(model)  # bitsandbytes layers are written dequantized
    else:
        state = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    missing, unexpected = standalone.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(standalone, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"standalone export mismatch: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" not in state or getattr(config, "tie_word_embeddings", False):
        standalone.tie_weights()
    _materialize_buffers(standalone, decoder_of(model))
    standalone.generation_config = model.generation_config
    standalone.eval()
    return standalone


def _materialize_buffers(standalone: nn.Module, source_decoder: nn.Module) -> None:
    """The rotary tables are non-persistent buffers, not in the state dict: share the source model's."""
    decoder_of(standalone).rotary_emb = source_decoder.rotary_emb


def set_attention_path(model: nn.Module, path: str) -> None:
    """Choose how EliteKV layers attend: ``"reconstruct"``, ``"absorbed"``, ``"auto"`` (absorbed decode steps) or
    ``"absorbed_reference"`` (absorbed, in PyTorch even where the fused kernel runs: comparisons). Unset: ``"auto"``
    on CUDA, ``"reconstruct"`` elsewhere.

    Also recorded in the model config (``elitekv["attention_path"]``), so a saved model keeps the choice.
    """
    from .modeling.attention_elitekv import ATTENTION_PATHS

    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path {path!r}: choose one of {ATTENTION_PATHS}")
    found = False
    for module in model.modules():
        if isinstance(module, EliteKVAttention):
            module.attention_path = path
            module.config.elitekv["attention_path"] = path
            found = True
    if not found:
        raise ValueError("no EliteKV attention layers in this model: convert it first")
