"""The jobs behind the command line: convert -> uptrain -> evaluate -> save.

* `convert_job` (``elitekv convert MODEL --data DATA``): the user's model (`elitekv_peft.user_model`) and text
  (`elitekv_peft.user_data`: training windows, a held-out split of DATA for evaluation, a sample for calibration).
The embedded default job (``elitekv run``: SmolLM2-135M on the Debian documentation corpora) is a client of this
module and lives in the demo package, `elitekv_demo.job`.

Both go through `convert_and_evaluate`: perplexity of the original, conversion, perplexity training-free, uptraining
(LM loss or distillation), perplexity again, ``save_pretrained`` with the tokenizer, ``summary.json`` and a summary
table. Every stage shows a progress bar.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class JobSettings:
    """Settings of one convert -> uptrain -> evaluate -> save run (defaults: the embedded SmolLM2 job)."""

    kv_ratio: float = 0.25
    method: str = "elitekv"
    rope_chunks: int | None = None
    latent_dim: int | None = None
    key_share: float | None = None
    selection: str = "elite"
    decomposition: str = "joint"
    latent_allocation: str = "uniform"
    rope_allocation: str = "uniform"
    selection_objective: str = "scores"
    lowrank_init: str | None = None  # None: the method's default (activation; weight for lorc; none for gqa)
    loss: str = "distill"  # "distill" (KL to the original: keeps general ability), "lm" or "none" (training-free)
    teacher: str | None = None  # distillation teacher (a model folder, GGUF or Hub id); None: the original model
    distill_weight: float = 1.0
    hidden_weight: float = 0.0
    latent_lr_ratio: float = 1.0
    progressive_stages: int = 1  # distill only: converted layers start in that many groups (elitekv_peft.progressive)
    torch_compile: bool = False  # uptrain the student (and the teacher) compiled: `TrainingArguments.torch_compile`
    train_tokens: int | None = None  # None: 30M on a GPU, 16k on a CPU (a smoke run: real uptraining needs a GPU)
    seq_len: int = 512
    batch_size: int | None = None  # None: 32 on a GPU, 4 on a CPU
    grad_accum: int = 1
    learning_rate: float = 1e-4
    eval_windows: int | None = None  # None: 200 (102k tokens) on a GPU, 24 on a CPU
    calib_samples: int | None = None  # None: 16 on a GPU, 4 on a CPU
    trainable: str = "all"
    output_dir: str = "out/elitekv-smollm2"
    device: str | None = None
    seed: int = 0
    progress: bool = True
    train_corpora: tuple[str, ...] = ("pydocs",)  # `run` only: training mix (elitekv_demo.corpora.CORPORA)
    extra: dict[str, Any] = field(default_factory=dict)

    def peft_kwargs(self) -> dict[str, Any]:
        """The `EliteKVConfig` fields these settings choose (calibration data aside)."""
        names = "kv_ratio method rope_chunks latent_dim key_share selection selection_objective decomposition".split()
        kwargs = {name: getattr(self, name) for name in names}
        kwargs.update(latent_allocation=self.latent_allocation, rope_allocation=self.rope_allocation)
        kwargs.update(trainable=self.trainable, seed=self.seed)
        if self.lowrank_init is not None:
            kwargs["lowrank_init"] = self.lowrank_init
        return kwargs

    def check(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the fix for settings that cannot work (cheap: no model).

        The conversion fields are checked by constructing the `EliteKVConfig` itself."""
        from . import EliteKVConfig

        if self.loss not in ("lm", "distill", "none"):
            raise ValueError(f"loss={self.loss!r}: choose 'lm', 'distill' or 'none'.")
        if self.loss != "distill":
            for name, value, default in (
                ("teacher", self.teacher, None),
                ("hidden_weight", self.hidden_weight, 0.0),
                ("distill_weight", self.distill_weight, 1.0),
                ("progressive_stages", self.progressive_stages, 1),
            ):
                if value != default:
                    raise ValueError(f"{name} applies to distillation: add loss='distill' or drop {name}.")
        positive = {"seq_len": self.seq_len, "grad_accum": self.grad_accum, "batch_size": self.batch_size}
        positive.update(eval_windows=self.eval_windows, calib_samples=self.calib_samples)
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer.")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len}: a window needs at least 2 tokens.")
        if self.train_tokens is not None and self.train_tokens < 0:
            raise ValueError(f"train_tokens={self.train_tokens} must be >= 0 (0 or loss='none': training-free).")
        if self.progressive_stages > 1 and self.teacher is not None:
            raise ValueError(
                "progressive_stages runs the original's attention until each layer's turn, taken from the teacher: "
                "drop teacher (distill from the original) or set progressive_stages=1."
            )
        if self.torch_compile and (self.loss == "none" or self.train_tokens == 0):
            raise ValueError("torch_compile applies to uptraining: drop torch_compile or train (loss='distill').")
        if self.progressive_stages < 1:
            raise ValueError(f"progressive_stages={self.progressive_stages} must be >= 1 (1: every layer at once).")
        if not self.learning_rate > 0 or not self.latent_lr_ratio > 0:
            raise ValueError("learning_rate and latent_lr_ratio must be > 0.")
        if not 0.0 <= self.distill_weight <= 1.0 or self.hidden_weight < 0:
            raise ValueError("distill_weight must be in [0, 1] and hidden_weight >= 0.")
        EliteKVConfig(**self.peft_kwargs())

    def resolved(self) -> JobSettings:
        """A checked copy with the device-dependent defaults filled in."""
        on_gpu = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        settings = copy.copy(self)
        settings.device = "cuda" if on_gpu and self.device is None else (self.device or "cpu")
        defaults = {"train_tokens": (30_000_000, 16_384), "eval_windows": (200, 24), "calib_samples": (16, 4)}
        defaults["batch_size"] = (32, 4)
        for name, (gpu, cpu) in defaults.items():
            if getattr(settings, name) is None:
                setattr(settings, name, gpu if on_gpu else cpu)
        settings.check()
        return settings


def cache_bytes_per_token(model: torch.nn.Module, probe_tokens: int = 8) -> int:
    """KV cache bytes per token (all layers, batch 1) of any causal LM: measured on a forward of ``probe_tokens``
    tokens with ``use_cache=True``, so every method's cache (and the original ``DynamicCache``) is counted as held."""
    from . import cache_nbytes
    from .compat import output_cache

    device = next(model.parameters()).device
    ids = torch.full((1, probe_tokens), 1, dtype=torch.long, device=device)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    return cache_nbytes(cache) // probe_tokens


def warn_small_evaluation(windows: int, asked: int) -> None:
    """Warn when the held-out text gives fewer evaluation windows than ``eval_windows`` asks for."""
    if windows < asked:
        warnings.warn(
            f"the held-out text gives {windows} evaluation window(s) of the {asked} asked for (--eval-windows): its "
            "perplexities are noisy; pass more text or held-out text of its own (--eval-data)",
            stacklevel=2,
        )


def convert_job(settings: JobSettings, inputs: dict[str, Any]) -> dict[str, Any]:
    """``elitekv convert``: ``inputs`` holds ``model`` (a `user_model.ModelSource`), ``data`` (a
    `user_data.DataSource`) and optionally ``eval_data``, ``calib_data``, ``text_field``, ``dtype``.

    The tokenizer and the text are loaded before the weights, so a data problem stops the job early."""
    from .user_data import load_user_data
    from .user_model import load_model, load_tokenizer, resolve_model, torch_dtype

    s = settings.resolved()
    source = inputs["model"]
    dtype = torch_dtype(inputs.get("dtype", "float32"), s.device)
    tokenizer = load_tokenizer(source)
    data = load_user_data(
        inputs["data"],
        tokenizer,
        s.seq_len,
        eval_windows=s.eval_windows,
        calib_samples=s.calib_samples,
        text_field=inputs.get("text_field", "text"),
        eval_source=inputs.get("eval_data"),
        calib_source=inputs.get("calib_data"),
        seed=s.seed,
    )
    info = data["info"]
    warn_small_evaluation(data["eval"].shape[0], s.eval_windows)
    print(
        f"[elitekv] {info['data']}: split {info['split']}; {info['train_tokens']:,} train tokens, "
        f"{info['eval_tokens']:,} held-out eval tokens, {info['calib_tokens']:,} calibration tokens"
    )
    print(f"[elitekv] loading {source.label} on {s.device} ({str(dtype).removeprefix('torch.')})")
    model = load_model(source, dtype, s.device)
    teacher = None
    if s.teacher is not None:
        teacher = load_model(resolve_model(s.teacher, "--teacher"), dtype, s.device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"--teacher has a vocabulary of {teacher.config.vocab_size} tokens, the model {model.config.vocab_size}"
                ": distillation needs the same tokenizer; give a teacher of the same family"
            )
    labels = {"model": source.label, "train_data": info["data"], "eval_data": info["data"], "eval_split": info["split"]}
    summary = convert_and_evaluate(model, tokenizer, data, s, labels, teacher=teacher)
    summary["settings"].pop("train_corpora")  # `run`'s embedded corpora; the user's text is `data`
    summary["data"] = info
    (Path(s.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def convert_and_evaluate(
    model: Any,
    tokenizer: Any,
    data: dict[str, Any],
    s: JobSettings,
    labels: dict[str, str],
    *,
    teacher: Any = None,
    extra_eval: dict[str, torch.Tensor] | None = None,
    retention_eval: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model``, convert it, uptrain, evaluate again and save to ``s.output_dir`` (settings resolved).

    Args:
        data: ``"train"`` (windows ``[N, T]`` or a `datasets.Dataset` with ``input_ids`` / ``labels``),
            ``"eval"`` ``[N_eval, T]`` and ``"calib"`` ``[N_calib, T]``.
        labels: ``model``, ``train_data``, ``eval_data``, ``eval_split`` (for the table and the model card).
        teacher: distillation teacher (``loss="distill"``); default a copy of the original.
        extra_eval: more held-out windows ``[N, T]`` by name, evaluated after uptraining (``ppl_<name>``).
        retention_eval: windows ``[N, T]`` by name of text never trained on: the original's perplexity there is
            measured before conversion, the final model's perplexity and top-1 agreement with the original after
            (``summary["unseen"]``, recorded for the model card).
    """
    from peft import get_peft_model

    from . import EliteKVConfig, record_evaluation, record_training
    from .evaluation import RetentionReference, perplexity
    from .progressive import check_stages
    from .training import plan_steps, process_count, uptrain_tokens

    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None:  # before any minutes of evaluation and conversion
        check_stages(s.progressive_stages, layers)
    started = time.time()
    rows: list[dict[str, Any]] = [{"stage": "original"}]
    rows[0]["cache_bytes_per_token"] = cache_bytes_per_token(model)
    rows[0]["ppl"] = perplexity(model, data["eval"], batch_size=8, progress=s.progress)
    reference = RetentionReference(model, retention_eval, progress=s.progress) if retention_eval else None
    if s.loss == "distill" and teacher is None:
        teacher = copy.deepcopy(model).eval()
    config = EliteKVConfig(**s.peft_kwargs(), calibration_data=data["calib"])
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    converted_bytes = cache_bytes_per_token(peft_model)
    ppl = perplexity(peft_model, data["eval"], batch_size=8, progress=s.progress)
    rows.append({"stage": "training_free", "ppl": ppl, "cache_bytes_per_token": converted_bytes})

    available = len(data["train"]) * s.seq_len  # windows [N, T] or a dataset of N rows
    trained_tokens = 0
    if s.loss != "none" and s.train_tokens > 0:
        plan = plan_steps(s.train_tokens, s.batch_size, s.seq_len, s.grad_accum, process_count())
        print(
            f"[elitekv] uptraining ({s.loss}) for {plan.max_steps} steps = {plan.tokens:,} tokens "
            f"({plan.tokens / available:.2f} epochs of {labels['train_data']})"
        )
        trainer, _ = uptrain_tokens(
            peft_model,
            data["train"],
            s.train_tokens,
            batch_size=s.batch_size,
            seq_len=s.seq_len,
            learning_rate=s.learning_rate,
            grad_accum=s.grad_accum,
            seed=s.seed,
            teacher=teacher if s.loss == "distill" else None,
            distill_weight=s.distill_weight,
            hidden_weight=s.hidden_weight,
            latent_lr_ratio=s.latent_lr_ratio,
            progressive_stages=s.progressive_stages,
            progress=s.progress,
            use_cpu=s.device == "cpu",
            torch_compile=s.torch_compile,
        )
        trained_tokens = int(trainer.state.num_input_tokens_seen)  # what trained, as the Trainer counted it
        ppl = perplexity(peft_model, data["eval"], batch_size=8, progress=s.progress)
        rows.append({"stage": f"uptrained_{s.loss}", "ppl": ppl, "cache_bytes_per_token": converted_bytes})
        for name, windows in (extra_eval or {}).items():  # each extra corpus of the mix: its own held-out text
            rows[-1][f"ppl_{name}"] = perplexity(peft_model, windows, batch_size=8, progress=False)

    unseen: dict[str, dict[str, Any]] = {}
    if reference is not None:  # the final model against the original, on text never trained on
        ppl_by_name, agreement = reference.measure(peft_model)
        for name, windows in reference.eval_sets.items():
            unseen[name] = {
                "original_ppl": reference.ppl[name],
                "ppl": ppl_by_name[name],
                "top1_agreement": agreement[name],
                "tokens": int(windows.numel()),
            }

    record_training(peft_model, trained_tokens, dataset=labels["train_data"])
    if math.isfinite(rows[-1]["ppl"]):
        record_evaluation(
            peft_model,
            rows[-1]["ppl"],
            dataset=labels["eval_data"],
            split=labels["eval_split"],
            tokens=int(data["eval"].numel()),
        )
    for name, scores in unseen.items():
        if math.isfinite(scores["ppl"]):
            record_evaluation(peft_model, scores["ppl"], dataset=name, split="unseen", tokens=scores["tokens"])
        record_evaluation(
            peft_model,
            scores["top1_agreement"],
            metric="top1_agreement_with_original",
            dataset=name,
            split="unseen",
            tokens=scores["tokens"],
        )
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_earlier_output(out)
    peft_model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    peft_config = peft_model.peft_config["default"]
    summary = {
        "model": labels["model"],
        "settings": {k: v for k, v in asdict(s).items() if k != "extra"},
        "eval_tokens": int(data["eval"].numel()),
        "train_tokens": trained_tokens,
        "rows": rows,
        "unseen": unseen,
        "seconds": round(time.time() - started, 1),
        "chunk_indices": peft_config.chunk_indices,
        "method_plan": peft_config.method_plan,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if s.method == "elitekv":
        from .inspection import inspect_artifact

        inspect_artifact(str(out))  # chunk_choices.png, cache_breakdown.png, calibration_errors.png
    print(format_summary(summary))
    return summary


EARLIER_OUTPUT = ("chunk_choices.png", "cache_breakdown.png", "calibration_errors.png", "model-*.safetensors")
"""What an earlier run left that this one may not rewrite: plots of another method, weight shards of another size."""


def clear_earlier_output(out: Path) -> None:
    """Remove an earlier run's files from ``out`` that this run might not overwrite (the CLI accepts only a new,
    empty or earlier-output folder), saying so."""
    stale = sorted({path for pattern in EARLIER_OUTPUT for path in out.glob(pattern)})
    if stale or (out / "summary.json").exists():
        print(f"[elitekv] {out} holds an earlier output: replacing it")
    for path in stale:
        path.unlink()


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown table of a job summary."""
    s = summary["settings"]
    lines = [
        f"\n{s.get('method', 'elitekv')} on {summary.get('model', 'SmolLM2-135M')}, kv_ratio={s['kv_ratio']}, "
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
    if summary.get("unseen"):
        lines += [
            f"\ntext never trained on, {summary['rows'][-1]['stage']} against the original:",
            "",
            "| unseen corpus | original perplexity | perplexity | top-1 agreement with the original |",
            "|---|---|---|---|",
        ]
        for name, u in summary["unseen"].items():
            shown = f"{u['ppl']:.2f}" if math.isfinite(u["ppl"]) else "inf"
            lines.append(f"| {name} | {u['original_ppl']:.2f} | {shown} | {u['top1_agreement']:.1%} |")
    lines.append(f"\nsaved to {s['output_dir']} ({summary['seconds']} s)")
    return "\n".join(lines)
