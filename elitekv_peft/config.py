"""`EliteKVConfig`: the PEFT config of the EliteKV conversion."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

from .artifact import ADAPTER_WEIGHTS, check_adapter_file, file_sha256
from .peft_type import ensure_peft_type

SELECTIONS = ("elite", "high", "low", "uniform", "norm")
DECOMPOSITIONS = ("joint", "separate")
LATENT_ALLOCATIONS = ("uniform", "energy")
ROPE_ALLOCATIONS = ("uniform", "sensitivity")
SELECTION_OBJECTIVES = ("scores", "attention")
LOWRANK_INITS = ("activation", "weight")
TRAINABLE = ("all", "attention", "attention_norms", "none")
METHODS = ("elitekv", "kv_latent", "lorc", "gqa")
# lowrank_init when not given: the activation-aware SVD, except LoRC's plain weight SVD (data-free, as the paper)
DEFAULT_LOWRANK_INIT = {"elitekv": "activation", "kv_latent": "activation", "lorc": "weight", "gqa": None}

ensure_peft_type()


@dataclass
class EliteKVConfig(PeftConfig):
    """Configuration of an EliteKV conversion (RoPElite chunk selection + J-LRD latent).

    Args:
        kv_ratio: Fraction of the original KV cache kept, in (0, 1] (bytes of cache per token against the original
            ``DynamicCache``, for every method). With only ``kv_ratio`` given, ``rope_chunks`` follows the rule in
            `elitekv_peft.budget` and ``latent_dim`` takes the rest of the budget.
        method: ``"elitekv"`` (RoPElite + J-LRD, the default), ``"kv_latent"`` (smaller key/value head dims with
            frequency-aware RoPE, `elitekv_peft.methods.kv_latent`), ``"lorc"`` (training-free low-rank K/V with a
            progressive per-layer rank schedule, `elitekv_peft.methods.lorc`) or ``"gqa"`` (mean-pooled key/value
            heads, `elitekv_peft.methods.gqa`; ``kv_ratio`` must be ``groups / num_key_value_heads``).
        key_share: ``kv_latent`` and ``lorc`` only: the part of the cache budget that goes to keys (default 0.5;
            the values get the rest).
        rope_chunks: ``r``, rotary chunks kept per key/value head (out of ``head_dim / 2``).
        latent_dim: ``d_c``, size of the shared latent per token and layer.
        selection: How the ``r`` chunks are chosen: ``"elite"`` (greedy search on calibration data, the default),
            ``"high"`` / ``"low"`` (highest / lowest frequencies), ``"uniform"``, or ``"norm"`` (largest mean
            query-norm x key-norm per chunk).
        selection_objective: What the ``"elite"`` search minimises at each pick: ``"scores"`` (the mean absolute
            error of the pre-softmax scores, the paper's) or ``"attention"`` (the mean total-variation distance
            between each query's attention row and the original's: errors count where attention goes).
        decomposition: ``"joint"`` (J-LRD: one latent for NoPE keys and values) or ``"separate"`` (S-LRD: keys
            and values in their own parts of a latent of the same size). Same cache bytes; J-LRD shares one latent
            (the paper's), while with S-LRD the decode kernel reads each cache byte once (the measured trade:
            ``docs/decoding.md`` and ``benchmarks/results/``).
        latent_allocation: How the latent budget is spread over layers: ``"uniform"`` (every layer ``d_c``, the
            paper's) or ``"energy"`` (the same total, split so that the summed relative error of the layers'
            activation-weighted factorizations is smallest; each layer between ``d_c / 2`` and ``2 d_c``; joint
            decomposition only). The cache size is the same; ``kv_ratio`` counts the whole model's cache.
        rope_allocation: How the rotary chunks are spread over layers: ``"uniform"`` (every layer ``r`` per head, the
            paper's) or ``"sensitivity"`` (the same total, more chunks where dropping RoPE changes the scores most:
            the RoPElite search's error per layer, each layer between ``r / 2`` and ``2 r``; ``selection="elite"``
            only). The latent stays ``d_c`` per layer, so the cache size is the same.
        lowrank_init: ``"activation"`` (SVD of the calibration activations times the weight, i.e. a whitened SVD)
            or ``"weight"`` (plain SVD of the weight, as the public EliteKV code). Default: ``"activation"``, except
            ``"weight"`` for ``lorc`` (the paper's data-free SVD); not used by ``gqa``.
        calibration_samples / calibration_seq_len: Size of the calibration set when none is given; then text is
            sampled from the model itself (a warning says so: pass real text for best results).
        calibration_batch_size: Sequences per forward pass during calibration.
        calibration_device: Device that runs calibration and the factorization (e.g. ``"cuda"``); default: the
            model's device.
        calibration_layerwise: Run calibration one decoder layer at a time (each layer moved to
            ``calibration_device`` in turn, only that layer's input hidden states kept), so a model larger than one
            GPU converts with the model itself on the CPU. ``None`` (default): layerwise exactly when
            ``calibration_device`` differs from the model's device.
        calibration_data: Token ids ``[N, T]`` (tensor or list of lists) used for calibration. Not saved.
        trainable: Parameters left trainable after conversion: ``"all"`` (the paper's uptraining), ``"attention"``,
            ``"attention_norms"`` or ``"none"``. All trainable parameters are saved with the adapter.
        seed: Seed of the calibration sampling.
        The fields below are not settings: the conversion writes them (`elitekv_peft.plan.ConversionPlan.fill`, the
        plan being their single source) so that ``adapter_config.json`` holds the conversion, and ``save_pretrained``
        the checksums.

        chunk_indices: Filled in by the conversion: ``[layer][kv_head][r]`` chosen chunk indices. A config that
            has them (e.g. loaded with `PeftModel.from_pretrained`) skips calibration.
        latent_dims: Filled in by the conversion: ``d_c`` per layer.
        key_latent_dims: Filled in for ``decomposition="separate"``: key part of the latent per layer.
        base_shape: Filled in by the conversion: the base model's attention shape, checked on load.
        method_plan: Filled in by the conversion for ``kv_latent`` / ``lorc`` / ``gqa``: the method's per-layer
            choices (kept chunks and value dims, ranks, or pooled heads). A config that has it skips calibration.
        report: Filled in by the conversion: calibration errors (``selection_errors`` ``[layer][kv_head]``,
            ``lowrank_errors`` ``[layer]``), plus what `elitekv_peft.record_evaluation` / `record_training` add;
            shown in the model card and by ``elitekv inspect``.
        adapter_sha256: Filled in by ``save_pretrained``: checksum of the saved adapter weights, verified on load.
        standalone_weights: Filled in by ``save_pretrained``: ``{file: SHA-256}`` of the standalone model's weight
            files, which hold the only copy of the weights (`elitekv_peft.artifact`); verified on load.
        save_id: Filled in by ``save_pretrained``: a random id, also stored in the adapter file, so that loading an
            adapter file with a config read from another folder is refused (`tuner.check_save_id`).
    """

    kv_ratio: float | None = field(default=0.25, metadata={"help": "Fraction of the KV cache kept, in (0, 1]."})
    rope_chunks: int | None = field(default=None, metadata={"help": "r: rotary chunks kept per key/value head."})
    latent_dim: int | None = field(default=None, metadata={"help": "d_c: latent size per token and layer."})
    method: str = field(default="elitekv", metadata={"help": "Compression method."})
    selection: str = field(default="elite", metadata={"help": f"Chunk selection strategy, one of {SELECTIONS}."})
    selection_objective: str = field(default="scores", metadata={"help": f"One of {SELECTION_OBJECTIVES}."})
    decomposition: str = field(default="joint", metadata={"help": f"One of {DECOMPOSITIONS}."})
    latent_allocation: str = field(default="uniform", metadata={"help": f"One of {LATENT_ALLOCATIONS}."})
    rope_allocation: str = field(default="uniform", metadata={"help": f"One of {ROPE_ALLOCATIONS}."})
    lowrank_init: str | None = field(default=None, metadata={"help": f"One of {LOWRANK_INITS} (method default)."})
    key_share: float | None = field(default=None, metadata={"help": "kv_latent/lorc: keys' share of the budget."})
    calibration_samples: int = field(default=16, metadata={"help": "Calibration sequences."})
    calibration_seq_len: int = field(default=512, metadata={"help": "Calibration sequence length."})
    calibration_batch_size: int = field(default=4, metadata={"help": "Calibration batch size."})
    calibration_device: str | None = field(default=None, metadata={"help": "Calibration device (default: model's)."})
    calibration_layerwise: bool | None = field(default=None, metadata={"help": "Calibrate one layer at a time."})
    calibration_data: Any = field(default=None, metadata={"help": "Token ids [N, T] for calibration (not saved)."})
    trainable: str = field(default="all", metadata={"help": f"One of {TRAINABLE}."})
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling."})
    chunk_indices: list | None = field(default=None, metadata={"help": "Filled in by the conversion."})
    latent_dims: list | None = field(default=None, metadata={"help": "Filled in by the conversion."})
    key_latent_dims: list | None = field(default=None, metadata={"help": "Filled in by the conversion."})
    base_shape: dict | None = field(default=None, metadata={"help": "Filled in by the conversion."})
    method_plan: dict | None = field(default=None, metadata={"help": "Filled in by the conversion (not elitekv)."})
    report: dict | None = field(default=None, metadata={"help": "Filled in: calibration errors, evaluations."})
    adapter_sha256: str | None = field(default=None, metadata={"help": "Filled in by save_pretrained."})
    standalone_weights: dict | None = field(default=None, metadata={"help": "Filled in by save_pretrained."})
    save_id: str | None = field(default=None, metadata={"help": "Filled in by save_pretrained."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Unused: all attention layers."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ELITEKV
        if self.lowrank_init is None and self.method in DEFAULT_LOWRANK_INIT:
            self.lowrank_init = DEFAULT_LOWRANK_INIT[self.method]
        self.validate()

    def validate(self) -> None:
        """Check types and ranges; raise ``ValueError`` / ``TypeError`` naming the fix."""
        if self.kv_ratio is not None:
            if isinstance(self.kv_ratio, bool) or not isinstance(self.kv_ratio, (int, float)):
                raise TypeError(f"kv_ratio must be a float in (0, 1], got {type(self.kv_ratio).__name__}.")
            if not (0.0 < float(self.kv_ratio) <= 1.0):
                raise ValueError(f"kv_ratio={self.kv_ratio} must be in (0, 1]: the fraction of the KV cache kept.")
        elif self.rope_chunks is None or self.latent_dim is None:
            raise ValueError("Give `kv_ratio`, or both `rope_chunks` and `latent_dim`.")
        for name in ("rope_chunks", "latent_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer (or None to derive it).")
        choices = {
            "method": METHODS,
            "selection": SELECTIONS,
            "selection_objective": SELECTION_OBJECTIVES,
            "decomposition": DECOMPOSITIONS,
            "latent_allocation": LATENT_ALLOCATIONS,
            "rope_allocation": ROPE_ALLOCATIONS,
            "trainable": TRAINABLE,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one of {allowed}.")
        self.validate_method_fields()
        for name in ("calibration_samples", "calibration_seq_len", "calibration_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed={self.seed!r} must be an integer, e.g. seed=0.")
        if self.calibration_layerwise is not None and not isinstance(self.calibration_layerwise, bool):
            raise TypeError(f"calibration_layerwise={self.calibration_layerwise!r} must be True, False or None.")
        if self.calibration_device is not None:
            import torch

            try:
                torch.device(self.calibration_device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"calibration_device={self.calibration_device!r} is not a device; use e.g. 'cpu', 'cuda' or "
                    "'cuda:1'."
                ) from error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load ``adapter_config.json``; in a local folder, also check the adapter weights against their checksum.

        The config remembers where it came from, so that loading the adapter can read the standalone weights saved
        beside it (see ``standalone_weights``).
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._weights_source = (str(pretrained_model_name_or_path), subfolder, kwargs)
        check_adapter_file(os.path.join(pretrained_model_name_or_path, subfolder or ""), config.adapter_sha256)
        return config

    def validate_method_fields(self) -> None:
        """Raise ``ValueError`` for a field set that the chosen ``method`` does not use (naming the right method)."""
        if self.lowrank_init is not None and self.lowrank_init not in LOWRANK_INITS:
            raise ValueError(f"lowrank_init={self.lowrank_init!r} is not supported; choose one of {LOWRANK_INITS}.")
        if self.method == "elitekv":
            if self.key_share is not None:
                raise ValueError("key_share applies to method='kv_latent' or 'lorc' only; drop it for EliteKV.")
            if self.lowrank_init is None:
                raise ValueError(f"lowrank_init must be one of {LOWRANK_INITS} for method='elitekv'.")
            if self.latent_allocation == "energy" and self.decomposition == "separate":
                raise ValueError(
                    "latent_allocation='energy' spreads one joint latent over the layers; with "
                    "decomposition='separate' use latent_allocation='uniform' (or decomposition='joint')."
                )
            if self.rope_allocation == "sensitivity" and self.latent_allocation != "uniform":
                raise ValueError(
                    "rope_allocation='sensitivity' keeps d_c per layer and spreads the chunks; combine it with "
                    "latent_allocation='uniform' (or use rope_allocation='uniform')."
                )
            if self.selection_objective != "scores" and self.selection != "elite":
                raise ValueError(
                    f"selection_objective={self.selection_objective!r} is the objective of the RoPElite search: use "
                    f"selection='elite' (not {self.selection!r}) or drop selection_objective."
                )
            if self.rope_allocation == "sensitivity" and self.selection != "elite":
                raise ValueError(
                    "rope_allocation='sensitivity' spreads the chunks by the RoPElite search's errors: use "
                    f"selection='elite' (not {self.selection!r}) or rope_allocation='uniform'."
                )
            return
        if self.kv_ratio is None:
            raise ValueError(f"method={self.method!r} needs kv_ratio (the fraction of the KV cache kept).")
        elitekv_only = {
            "rope_chunks": self.rope_chunks is not None,
            "latent_dim": self.latent_dim is not None,
            "selection": self.selection != "elite",
            "selection_objective": self.selection_objective != "scores",
            "decomposition": self.decomposition != "joint",
            "latent_allocation": self.latent_allocation != "uniform",
            "rope_allocation": self.rope_allocation != "uniform",
        }
        for name, is_set in elitekv_only.items():
            if is_set:
                raise ValueError(
                    f"{name} applies to method='elitekv' only; drop it for method={self.method!r} (set kv_ratio)."
                )
        if self.key_share is not None:
            if self.method not in ("kv_latent", "lorc"):
                raise ValueError(f"key_share applies to method='kv_latent' or 'lorc' only, not {self.method!r}.")
            if isinstance(self.key_share, bool) or not isinstance(self.key_share, (int, float)):
                raise TypeError(f"key_share must be a float in (0, 1), got {type(self.key_share).__name__}.")
            if not 0.0 < float(self.key_share) < 1.0:
                raise ValueError(f"key_share={self.key_share} must be in (0, 1): the keys' part of the cache budget.")
        if self.method == "gqa" and self.lowrank_init is not None:
            raise ValueError("lowrank_init does not apply to method='gqa' (no factorization); drop it.")
        if self.method != "gqa" and self.lowrank_init is None:
            raise ValueError(f"lowrank_init must be one of {LOWRANK_INITS} for method={self.method!r}.")

    def conversion_choices(self) -> dict[str, Any]:
        """What the conversion chose (chunks, latent sizes, the method's plan); two configs with equal choices
        describe models of the same layout."""
        names = ("method", "chunk_indices", "latent_dims", "key_latent_dims", "method_plan")
        return {name: getattr(self, name) for name in names}

    @property
    def is_converted(self) -> bool:
        """True once the conversion has filled in its choices (chunks and latent sizes, or the method's plan)."""
        if self.method != "elitekv":
            return self.method_plan is not None
        return self.chunk_indices is not None and self.latent_dims is not None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("calibration_data", None)  # token ids are not part of the saved config
        return data

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save ``adapter_config.json``, after the model's own export when `PeftModel.save_pretrained` runs.

        PEFT calls this last, once the adapter file is written. The EliteKV tuner leaves its export on the config
        when PEFT asks it for the adapter's state dict (`EliteKVModel._get_adapter_state_dict`); it is run here
        (the standalone model, its weights and the card, `EliteKVModel.export`) and its checksums recorded.
        """
        export = self.__dict__.pop("_pending_export", None)
        if export is not None:
            self.standalone_weights = export(save_directory)
            self.save_id = self.__dict__.pop("_pending_save_id", self.save_id)
            self._weights_source = (str(save_directory), None, {})  # the weights now live there
        self.adapter_sha256 = file_sha256(os.path.join(save_directory, ADAPTER_WEIGHTS))
        super().save_pretrained(save_directory, **kwargs)
