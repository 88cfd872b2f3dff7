"""bitsandbytes support: QLoRA-style uptraining with the frozen linear layers kept in 4-bit or 8-bit.

Two ways in, both ending with dense (trainable) EliteKV attention and quantized, frozen MLPs:

* load the base model quantized (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``) and
  convert it: the conversion reads the attention projections through `dense_weight`, so the new attention
  is built from the dequantized weights;
* convert a full-precision model, then call `quantize_frozen` to swap the frozen linear layers (MLPs) for
  bitsandbytes layers.

Quantized weights cannot be trained, so such a model trains with ``trainable="attention"`` or
``"attention_norms"``. The standalone artifact written by ``save_pretrained`` holds the dequantized weights
(what the model computed with during training), so it loads with ``AutoModelForCausalLM`` without bitsandbytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")
BITS = ("4bit", "8bit")


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or raise an ``ImportError`` that says how to get it."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or a backend that fails to load on this platform
        raise ImportError(
            "Quantized (4-bit / 8-bit) uptraining needs bitsandbytes, which could not be imported here "
            f"({type(err).__name__}: {err}). Install it with `pip install 'elitekv-peft[quant]'` on a platform "
            "bitsandbytes supports (Linux x86-64 CPU or CUDA), or train without quantization."
        ) from err
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True if ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (checked without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in QUANTIZED_PARAM_TYPES


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a float32 ``[out_features, in_features]`` tensor (dequantized if needed)."""
    weight = linear.weight
    if not is_quantized(linear):
        return weight.detach().float()
    bnb = require_bitsandbytes()
    if type(weight).__name__ == "Params4bit":
        if weight.quant_state is None:
            raise RuntimeError("This 4-bit layer is not quantized yet: move the model to its device first.")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(linear, "state", None), "SCB", None)
    if scale is None:
        raise RuntimeError("This 8-bit layer has no scale (SCB): move the model to its device first.")
    return weight.data.float() * scale.float().unsqueeze(1) / 127.0


def dense_dtype(linear: nn.Module, model: nn.Module) -> torch.dtype:
    """The floating dtype a dense replacement of ``linear`` should have: its own, or else the model's.

    For a quantized layer the model's first floating parameter (normally the input embeddings) decides, since
    the hidden states have that dtype.
    """
    if linear.weight.is_floating_point():
        return linear.weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes-quantized linear layers of ``model``."""
    return [name for name, module in model.named_modules() if is_quantized(module)]


def check_trainable_scope(model: nn.Module, scope: str) -> None:
    """Refuse ``trainable="all"`` on a model whose frozen parts are quantized (they cannot take gradients)."""
    if scope != "all":
        return
    names = [name for name in quantized_modules(model) if ".self_attn." not in name]  # attention is rebuilt dense
    if names:
        raise ValueError(
            f"trainable='all' cannot train bitsandbytes-quantized weights ({len(names)} layers, e.g. {names[0]}). "
            "Use EliteKVConfig(trainable='attention_norms') (or 'attention') for QLoRA-style uptraining, or load "
            "the base model without quantization to train everything."
        )


def quantize_frozen(model: nn.Module, bits: str = "4bit", compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every frozen ``nn.Linear`` outside the attention (the MLPs) by a bitsandbytes layer, in place.

    Call it after conversion with ``trainable="attention"`` or ``"attention_norms"``: trainable layers, the
    attention and ``lm_head`` (often tied to the embeddings) stay in full precision.

    Args:
        model: A converted model (or a `PeftModel` wrapping one).
        bits: ``"4bit"`` (NF4, as QLoRA) or ``"8bit"`` (LLM.int8()).
        compute_dtype: dtype of the 4-bit matmuls; defaults to the replaced layer's dtype.
    Returns:
        The names of the replaced layers.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {BITS}.")
    bnb = require_bitsandbytes()
    from .modeling.modeling_elitekv import CONVERTED_ATTENTION

    attention = {id(m) for a in model.modules() if isinstance(a, CONVERTED_ATTENTION) for m in a.modules()}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and id(module) not in attention
        and not name.endswith("lm_head")
        and not any(p.requires_grad for p in module.parameters())
    ]
    if not targets:
        raise ValueError(
            "No frozen linear layer to quantize: convert with EliteKVConfig(trainable='attention_norms') (or "
            "'attention') first, so that the MLPs are frozen."
        )
    for name, linear in targets:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], _quantized_copy(bnb, linear, bits, compute_dtype))
    return [name for name, _ in targets]


def _quantized_copy(bnb: Any, linear: nn.Linear, bits: str, compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantized on ``linear``'s device."""
    device, dtype = linear.weight.device, linear.weight.dtype
    weight = linear.weight.detach().to("cpu")
    if bits == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype or dtype,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to the device


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantized linear layer's entries replaced by its dequantized weight."""
    state = model.state_dict()
    for name in quantized_modules(model):
        module = model.get_submodule(name)
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix) and k != f"{prefix}bias"]:
            del state[key]
        state[f"{prefix}weight"] = dense_weight(module).to(dense_dtype(module, model))
    return state
