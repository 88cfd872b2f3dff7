"""The model card (``README.md`` with Hub metadata) that ``save_pretrained`` writes next to a converted model.

One card for every method: Hub metadata (base model, library, tags, an ``elitekv`` block with the method's settings,
``model-index`` with the recorded evaluations) and a body with the conversion settings, the evaluations and how to
load the folder. Only the settings table and the ``elitekv`` block depend on the method (`card_fields`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

LOAD_SNIPPET = [
    "```python",
    "import elitekv_peft  # registers the model classes",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
    'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
    "# without the package: pass trust_remote_code=True to both (transformers reads the config for the tokenizer too)",
    "# as a PEFT adapter: PeftModel.from_pretrained(base_model, '<this folder or repo>')",
    "```",
]


@dataclass
class CardFields:
    """What a method contributes to its card."""

    achieved: float  # cached values over the original's, whole model
    summary: str  # one sentence under the title
    rows: list[tuple[str, Any]]  # the settings table
    metadata: dict[str, Any]  # the method's entries of the ``elitekv`` metadata block


def card_fields(model: nn.Module, peft_config: Any, shape: dict[str, Any]) -> CardFields:
    """The method-specific part of the card of ``model`` (converted with ``peft_config``)."""
    if peft_config.method == "elitekv":
        return _elitekv_fields(peft_config, shape)
    return _other_method_fields(model, peft_config, shape)


def _elitekv_fields(peft_config: Any, shape: dict[str, Any]) -> CardFields:
    G, D, L = shape["num_key_value_heads"], shape["head_dim"], shape["num_hidden_layers"]
    counts = [len(layer[0]) for layer in peft_config.chunk_indices]  # r per layer (rope_allocation may vary it)
    r = counts[0] if len(set(counts)) == 1 else counts
    latent = peft_config.latent_dims
    d_c = latent[0] if len(set(latent)) == 1 else latent
    values = [G * 2 * k + d for k, d in zip(counts, latent, strict=True)]
    return CardFields(
        achieved=sum(values) / (2 * G * D * L),
        summary=f"EliteKV: RoPElite keeps RoPE on {per_layer_values(0, counts)} of {D // 2} rotary chunks per "
        "key/value head, and one low-rank latent holds the NoPE keys and the values.",
        rows=[
            ("method", f"{peft_config.method} (RoPElite chunk selection + low-rank latent)"),
            ("rotary chunks kept per head (r)", per_layer_values(0, counts)),
            ("latent size per layer (d_c)", d_c),
            ("cache values per token and layer", f"{per_layer_values(0, values)} (original {2 * G * D})"),
            ("rotary chunks over layers", getattr(peft_config, "rope_allocation", "uniform")),
            ("latent allocation over layers", getattr(peft_config, "latent_allocation", "uniform")),
            ("chunk selection", _selection(peft_config)),
            ("decomposition", f"{peft_config.decomposition} (low-rank init: {peft_config.lowrank_init})"),
        ],
        metadata={
            "rope_chunks": r,
            "latent_dim": d_c,
            "selection": peft_config.selection,
            "decomposition": peft_config.decomposition,
        },
    )


def per_layer_values(rotated: int, latent_dims: list[int]) -> str:
    """``"96"`` when every layer caches the same, else ``"60-120 per layer, 96 on average"``."""
    values = [rotated + d for d in latent_dims]
    if len(set(values)) == 1:
        return str(values[0])
    return f"{min(values)}-{max(values)} per layer, {sum(values) / len(values):g} on average"


def _other_method_fields(model: nn.Module, peft_config: Any, shape: dict[str, Any]) -> CardFields:
    from .plan import ConversionPlan

    G, D, L = shape["num_key_value_heads"], shape["head_dim"], shape["num_hidden_layers"]
    per_layer = ConversionPlan.from_adapter_config(peft_config, False, False).values_per_token()
    plan = peft_config.method_plan
    if peft_config.method == "lorc":
        layout = f"key ranks per layer {plan['key_ranks']}, value ranks per layer {plan['value_ranks']}"
        summary = "LoRC: low-rank keys (cached before RoPE) and values, with a progressive per-layer rank schedule."
        metadata = {"key_ranks": plan["key_ranks"], "value_ranks": plan["value_ranks"]}
    elif peft_config.method == "gqa":
        layout = f"{plan['kv_heads']} mean-pooled key/value heads (of {G})"
        summary = "GQA: key/value heads mean-pooled into fewer groups."
        metadata = {"kv_heads": plan["kv_heads"]}
    else:
        key_dim, value_dim = 2 * len(plan["key_chunks"][0]), plan["value_dims"][0]
        layout = (
            f"key head dim {key_dim} (rotary chunks {plan['key_chunks'][0]} of {D // 2}), value head dim {value_dim}"
        )
        summary = "KV-Latent: smaller key and value head dims, the kept rotary chunks at their own frequencies."
        metadata = {"key_head_dim": key_dim, "value_head_dim": value_dim}
    return CardFields(
        achieved=sum(per_layer) / (2 * G * D * L),
        summary=summary,
        rows=[("method", peft_config.method), ("layout", layout)],
        metadata=metadata,
    )


def write_model_card(model: nn.Module, peft_config: Any, save_directory: str) -> None:
    """Write ``README.md`` into ``save_directory`` (replaces PEFT's generic card)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .conversion import base_shape, original_base_name

    shape = base_shape(model)
    fields = card_fields(model, peft_config, shape)
    G, D, L = shape["num_key_value_heads"], shape["head_dim"], shape["num_hidden_layers"]
    base = original_base_name(peft_config)
    report = peft_config.report or {}
    training = report.get("training") or {}
    evaluations = report.get("evaluations", [])
    method_tag = peft_config.method.replace("_", "-")
    name = f"{os.path.basename(str(base).rstrip('/')) if base else shape['model_type']}-{method_tag}-"
    name += f"{fields.achieved:.3g}"
    data = ModelCardData(
        base_model=base or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=sorted({"elitekv", "elitekv-peft", method_tag, "kv-cache-compression", "peft"}),
        model_name=name,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=e.get("dataset") or "custom",
                dataset_name=e.get("dataset") or "custom",
                dataset_split=e.get("split"),
                metric_type=e["metric"],
                metric_value=e["value"],
            )
            for e in evaluations
        ]
        or None,
        elitekv={
            "method": peft_config.method,
            "kv_ratio": peft_config.kv_ratio,
            "kv_ratio_achieved": round(fields.achieved, 6),
            **fields.metadata,
            "training_tokens": training.get("tokens"),
        },
    )
    rows = [
        ("base model", base or "unknown"),
        *fields.rows[:1],
        ("requested kv_ratio", peft_config.kv_ratio),
        ("achieved cache size", f"{fields.achieved:.4f} of the original ({G} KV heads x {D} dims x {L} layers)"),
        *fields.rows[1:],
        ("trainable during uptraining", peft_config.trainable),
        ("uptraining tokens", _or_not_recorded(training.get("tokens"), training.get("dataset"))),
    ]
    title = "an EliteKV" if peft_config.method == "elitekv" else f"a {peft_config.method}"
    lines = [
        f"# {shape['model_type']} with {title} cache ({fields.achieved:.1%} of the original KV cache)",
        "",
        f"Converted with elitekv-peft. {fields.summary}",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## Evaluation",
        "",
    ]
    if evaluations:
        lines += ["| metric | value | dataset | split | tokens |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['metric']} | {e['value']:.4g} | {e.get('dataset') or '-'} | {e.get('split') or '-'} | "
            f"{e.get('tokens') or '-'} |"
            for e in evaluations
        ]
    else:
        lines.append("No evaluation was recorded (`elitekv_peft.record_evaluation` adds one before saving).")
    lines += ["", "## Load", "", *LOAD_SNIPPET, ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(os.path.join(save_directory, "README.md"))


def _or_not_recorded(tokens: int | None, dataset: str | None) -> str:
    if tokens is None:
        return "not recorded (`elitekv_peft.record_training`)"
    return f"{tokens:,}" + (f" ({dataset})" if dataset else "")


def _selection(peft_config: Any) -> str:
    """``"elite"``, with the search's objective where it is not the paper's (``"elite (objective: attention)"``)."""
    objective = getattr(peft_config, "selection_objective", "scores")
    return peft_config.selection if objective == "scores" else f"{peft_config.selection} (objective: {objective})"
