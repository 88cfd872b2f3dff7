"""The user's model for ``elitekv convert`` / ``eval`` / ``generate``: a local folder, a GGUF file, or a Hub id.

`resolve_model` looks only at the file system (standard library), so the command line can check ``MODEL`` before
anything heavy is imported; `load_model_config` reads the config alone (no weights: for a Hub id, one small
download), so the model family and the cache budget are checked before the weights are loaded; `load_model` loads
weights and tokenizer with the ``Auto*`` classes (GGUF files dequantised by transformers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = ("float32", "bfloat16", "float16", "auto")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.index.json", "adapter_config.json")
"""Files of which a model folder holds at least one: weights, a sharded index, or a PEFT adapter."""


class ModelError(ValueError):
    """``MODEL`` cannot be used; the message names the fix."""


@dataclass(frozen=True)
class ModelSource:
    """``path``: a folder, the folder of a GGUF file (then ``gguf_file`` is its name) or a Hub id (``hub``)."""

    path: str
    gguf_file: str | None = None
    hub: bool = False

    @property
    def label(self) -> str:
        return self.gguf_file or (self.path if self.hub else Path(self.path).name)

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(value: str, flag: str = "MODEL") -> ModelSource:
    """A `ModelSource` for a folder with ``config.json``, a ``.gguf`` file (or a folder holding exactly one), or a
    Hub id; raises `ModelError` naming the fix."""
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{flag} {value} is a file but not a .gguf; give a model folder, a .gguf file or a Hub id")
        return ModelSource(str(path.resolve().parent), gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
                hint = "pass the .gguf file itself" if next(path.glob("*.gguf"), None) else "copy the weights in"
                raise ModelError(
                    f"{flag} {value}: the folder holds config.json but no weights (model*.safetensors or "
                    f"pytorch_model*.bin): {hint}, or give the folder `save_pretrained` wrote"
                )
            return ModelSource(str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path.resolve()), gguf_file=ggufs[0].name)
        found = f"several .gguf files ({', '.join(p.name for p in ggufs)}): pass one" if ggufs else "no config.json"
        raise ModelError(f"{flag} {value}: the folder holds {found}; give a folder saved by `save_pretrained`")
    if path.suffix.lower() == ".gguf" or value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise ModelError(f"{flag} {value}: no such file or folder; check the path")
    if not _HUB_ID.match(value):
        raise ModelError(f"{flag} {value}: not a folder, a .gguf file or a Hub id such as 'org/name'")
    return ModelSource(value, hub=True)


def hub_offline() -> bool:
    """Whether the Hub is switched off for this process (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(source: ModelSource, flag: str, error: Exception) -> ModelError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if hub_offline():
        return ModelError(
            f"{flag} {source.path} is not a local folder or .gguf file and is not in the local Hugging Face cache, "
            "and the Hub is offline (HF_HUB_OFFLINE=1): download it where the Hub is reachable "
            f"(`hf download {source.path} --local-dir DIR`) and pass DIR"
        )
    return ModelError(
        f"{flag} {source.path}: could not get it from the Hugging Face Hub ({reason}); check the id and the network, "
        f"or download it where the Hub is reachable (`hf download {source.path} --local-dir DIR`) and pass DIR"
    )


def load_model_config(source: ModelSource, flag: str = "MODEL") -> Any:
    """The transformers config of ``source`` (no weights); a Hub id that cannot be fetched raises `ModelError`.

    A Hub id is read from the local cache when it is there; otherwise the Hub is asked once (`HfApi.model_info`,
    no retries) so that an unreachable Hub or an unknown id fails in seconds."""
    from transformers import AutoConfig

    if source.hub:
        try:
            return AutoConfig.from_pretrained(source.path, local_files_only=True)
        except (OSError, ValueError):
            pass
        if hub_offline():
            raise _hub_error(source, flag, OSError("offline"))
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(source.path, timeout=15)
        except Exception as error:  # unreachable, unknown id, gated: all end here
            raise _hub_error(source, flag, error) from error
    try:
        return AutoConfig.from_pretrained(source.path, **source.load_kwargs())
    except (OSError, ValueError) as error:
        if source.hub:
            raise _hub_error(source, flag, error) from error
        raise ModelError(f"{flag} {source.path}: cannot read its config ({error})") from error


def check_convertible(config: Any, peft_kwargs: dict[str, Any], flag: str = "MODEL") -> None:
    """Raise `ModelError` when the model family or the cache budget cannot work, before any weight is loaded.

    Checks the family (Llama, Mistral, Qwen2), that the model is not converted already, and the ``kv_ratio`` /
    ``rope_chunks`` / ``latent_dim`` against its attention shape (`elitekv_peft.resolve_budget`; for ``gqa`` the
    ratios that pooling heads can reach)."""
    from .conversion import SUPPORTED_MODEL_TYPES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "elitekv", None) is not None:
        raise ModelError(f"{flag} is already converted by elitekv; give the original model it was converted from")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{flag} is a {model_type!r} model; EliteKV converts {', '.join(SUPPORTED_MODEL_TYPES)} models (RoPE "
            "attention): give one of those"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    method = peft_kwargs.get("method", "elitekv")
    try:
        if method == "elitekv":
            from . import resolve_budget

            resolve_budget(
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                hidden_size=config.hidden_size,
                kv_ratio=peft_kwargs.get("kv_ratio"),
                rope_chunks=peft_kwargs.get("rope_chunks"),
                latent_dim=peft_kwargs.get("latent_dim"),
            )
        elif method == "gqa":
            from .methods.gqa import group_count

            group_count(peft_kwargs["kv_ratio"], kv_heads, heads)
    except ValueError as error:
        raise ModelError(f"{error} ({flag}: {kv_heads} key/value heads of dim {head_dim})") from error


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer saved with the model (from the GGUF file for GGUF models)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, **source.load_kwargs())


def torch_dtype(name: str, device: str) -> Any:
    """``"float32"`` etc. as a torch dtype; ``"auto"``: bfloat16 on a GPU that supports it, else float32."""
    import torch

    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_model(source: ModelSource, dtype: Any, device: str) -> Any:
    """The causal LM of ``source`` on ``device`` in eval mode (converted models too, after ``import elitekv_peft``).

    A GGUF model is dequantised by transformers; its quantizer state is dropped so that it trains and saves as an
    ordinary float model."""
    from transformers import AutoModelForCausalLM

    import elitekv_peft  # noqa: F401  (registers the EliteKV model classes)

    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.load_kwargs())
    if source.gguf_file:
        strip_gguf_quantizer(model)
    return model.to(device).eval()


def strip_gguf_quantizer(model: Any) -> None:
    """Drop the GGUF quantizer state that ``from_pretrained(gguf_file=...)`` attaches.

    The weights are already dequantised floats, but the model otherwise reports
    ``is_quantized=True`` and saves a ``quantization_config`` (the Trainer refuses to fine-tune
    "purely quantized" models).
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
