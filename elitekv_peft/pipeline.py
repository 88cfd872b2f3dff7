"""The main job: convert -> uptrain -> evaluate -> save, on SmolLM2-135M and the Python docs by default.

`run_job` is what ``elitekv run`` (and ``python -m elitekv_peft run``) calls. Every stage reports progress and the
end prints a summary table (perplexity on held-out Python-docs windows and cache bytes per token).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class JobSettings:
    """Settings of one convert -> uptrain -> evaluate -> save run (defaults: the embedded SmolLM2 job)."""

    kv_ratio: float = 0.25
    rope_chunks: int | None = None
    selection: str = "elite"
    decomposition: str = "joint"
    lowrank_init: str = "activation"
    loss: str = "lm"  # "lm", "distill" or "none" (training-free)
    train_tokens: int | None = None  # None: 20M on a GPU, 16k on a CPU (a smoke run: real uptraining needs a GPU)
    seq_len: int = 512
    batch_size: int | None = None  # None: 32 on a GPU, 4 on a CPU
    learning_rate: float = 1e-4
    eval_windows: int | None = None  # None: 200 (102k tokens) on a GPU, 24 on a CPU
    calib_samples: int | None = None  # None: 16 on a GPU, 4 on a CPU
    trainable: str = "all"
    output_dir: str = "out/elitekv-smollm2"
    device: str | None = None
    seed: int = 0
    progress: bool = True
    train_corpora: tuple[str, ...] = ("pydocs",)  # training mix (elitekv_peft.data.CORPORA); eval stays pydocs
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> JobSettings:
        on_gpu = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        settings = copy.copy(self)
        settings.device = "cuda" if on_gpu and self.device is None else (self.device or "cpu")
        if settings.train_tokens is None:
            settings.train_tokens = 20_000_000 if on_gpu else 16_384
        if settings.eval_windows is None:
            settings.eval_windows = 200 if on_gpu else 24
        if settings.calib_samples is None:
            settings.calib_samples = 16 if on_gpu else 4
        if settings.batch_size is None:
            settings.batch_size = 32 if on_gpu else 4
        if settings.loss not in ("lm", "distill", "none"):
            raise ValueError(f"loss={settings.loss!r}: choose 'lm', 'distill' or 'none'.")
        from .data import parse_corpora

        settings.train_corpora = parse_corpora(settings.train_corpora)
        return settings


def load_default_data(
    tokenizer: Any,
    seq_len: int,
    eval_windows: int,
    calib_samples: int,
    train_corpora: str | tuple[str, ...] = ("pydocs",),
) -> dict[str, torch.Tensor]:
    """Windows ``[N, seq_len]``: ``train`` (the train splits of ``train_corpora``, default the Python docs),
    ``eval`` (held-out Python-docs files) and ``calib`` (a Python-docs train subset), plus ``train/<name>`` and
    ``eval/<name>`` per corpus of the mix (see :func:`elitekv_peft.data.load_corpus_data`)."""
    from .data import load_corpus_data

    return load_corpus_data(tokenizer, seq_len, eval_windows, calib_samples, train_corpora=train_corpora)


def describe_mix(data: dict[str, torch.Tensor]) -> str:
    """``"pydocs 2,669,568 + linuxdoc 6,000,128"``: train tokens per corpus of a :func:`load_default_data` result."""
    from .data import mix_tokens

    return " + ".join(f"{name} {tokens:,}" for name, tokens in mix_tokens(data).items())


def cache_values_per_token(model: torch.nn.Module) -> int:
    """Cached values per token summed over layers, for an original or converted model."""
    from .attention import EliteKVAttention

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total = 0
    for module in model.modules():
        if isinstance(module, EliteKVAttention):
            total += module.spec.cache_values_per_token()
    return total or 2 * config.num_key_value_heads * head_dim * config.num_hidden_layers


def run_job(settings: JobSettings) -> dict[str, Any]:
    """Run the main job; returns (and writes to ``<output_dir>/summary.json``) the summary."""
    from peft import get_peft_model

    from .config import EliteKVConfig
    from .data import lm_dataset
    from .evaluation import perplexity
    from .real_model import load_smollm2
    from .training import plan_steps, training_arguments, uptrain

    s = settings.resolved()
    started = time.time()
    print(f"[elitekv] loading SmolLM2-135M on {s.device}")
    model, tokenizer = load_smollm2(device=s.device)
    data = load_default_data(tokenizer, s.seq_len, s.eval_windows, s.calib_samples, s.train_corpora)
    print(
        f"[elitekv] train tokens: {describe_mix(data)}; Python docs: {data['eval'].numel():,} held-out eval "
        f"tokens, {data['calib'].numel():,} calibration tokens"
    )
    rows: list[dict[str, Any]] = []
    bytes_full = cache_values_per_token(model) * model.dtype.itemsize
    ppl = perplexity(model, data["eval"], batch_size=8, progress=s.progress)
    rows.append({"stage": "original", "ppl": ppl, "cache_bytes_per_token": bytes_full})

    teacher = copy.deepcopy(model).eval() if s.loss == "distill" else None
    config = EliteKVConfig(
        kv_ratio=s.kv_ratio,
        rope_chunks=s.rope_chunks,
        selection=s.selection,
        decomposition=s.decomposition,
        lowrank_init=s.lowrank_init,
        calibration_data=data["calib"],
        trainable=s.trainable,
        seed=s.seed,
    )
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    bytes_converted = cache_values_per_token(peft_model.base_model.model) * model.dtype.itemsize
    ppl = perplexity(peft_model, data["eval"], batch_size=8, progress=s.progress)
    rows.append({"stage": "training_free", "ppl": ppl, "cache_bytes_per_token": bytes_converted})

    trained_tokens = 0
    if s.loss != "none" and s.train_tokens > 0:
        plan = plan_steps(s.train_tokens, s.batch_size, s.seq_len)
        trained_tokens = plan.tokens
        epochs = trained_tokens / data["train"].numel()
        print(
            f"[elitekv] uptraining ({s.loss}) for {plan.max_steps} steps = {trained_tokens:,} tokens "
            f"({epochs:.2f} epochs over {'+'.join(s.train_corpora)})"
        )
        args = training_arguments(
            str(Path(s.output_dir) / "trainer"),
            max_steps=plan.max_steps,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            seed=s.seed,
            logging_steps=max(1, plan.max_steps // 20),
            disable_tqdm=not s.progress,
        )
        peft_model.train()
        uptrain(peft_model, lm_dataset(data["train"]), args, teacher=teacher)
        peft_model.eval()
        ppl = perplexity(peft_model, data["eval"], batch_size=8, progress=s.progress)
        rows.append({"stage": f"uptrained_{s.loss}", "ppl": ppl, "cache_bytes_per_token": bytes_converted})
        for name in s.train_corpora:
            if name != "pydocs":  # each extra corpus of the mix: perplexity on its own held-out files
                rows[-1][f"ppl_{name}"] = perplexity(peft_model, data[f"eval/{name}"], batch_size=8, progress=False)

    from .data import CORPORA
    from .model import record_evaluation, record_training

    packages = " + ".join(CORPORA[name].package for name in s.train_corpora)
    record_training(peft_model, trained_tokens, dataset=f"{packages} (train split{'s' * (len(s.train_corpora) > 1)})")
    if math.isfinite(rows[-1]["ppl"]):
        record_evaluation(
            peft_model,
            rows[-1]["ppl"],
            dataset="python3.11-doc",
            split="held-out files",
            tokens=int(data["eval"].numel()),
        )
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(s.output_dir)
    tokenizer.save_pretrained(s.output_dir)
    summary = {
        "settings": {k: v for k, v in asdict(s).items() if k != "extra"},
        "eval_tokens": int(data["eval"].numel()),
        "train_tokens": trained_tokens,
        "train_split_tokens": {name: int(data[f"train/{name}"].numel()) for name in s.train_corpora},
        "rows": rows,
        "seconds": round(time.time() - started, 1),
        "chunk_indices": peft_model.peft_config["default"].chunk_indices,
    }
    (Path(s.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    from .inspect import inspect_artifact

    inspect_artifact(s.output_dir)  # chunk_choices.png, cache_breakdown.png, calibration_errors.png
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown table of a job summary."""
    s = summary["settings"]
    lines = [
        f"\nEliteKV on SmolLM2-135M, kv_ratio={s['kv_ratio']}, selection={s['selection']}, "
        f"{summary['train_tokens']:,} uptraining tokens, eval on {summary['eval_tokens']:,} held-out tokens",
        "",
        "| stage | perplexity | KV cache bytes/token (all layers) |",
        "|---|---|---|",
    ]
    for row in summary["rows"]:
        ppl = row["ppl"]
        shown = f"{ppl:.2f}" if math.isfinite(ppl) else "inf"
        lines.append(f"| {row['stage']} | {shown} | {row['cache_bytes_per_token']:,} |")
    extra = {k[len("ppl_") :]: v for k, v in summary["rows"][-1].items() if k.startswith("ppl_")}
    if extra:
        shown = ", ".join(f"{name} {value:.2f}" for name, value in extra.items())
        lines.append(f"\nperplexity on the other corpora's held-out files after uptraining: {shown}")
    lines.append(f"\nsaved to {s['output_dir']} ({summary['seconds']} s)")
    return "\n".join(lines)
