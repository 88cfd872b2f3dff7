"""What the two uptraining examples share: their common command-line options, 'auto' defaults, loading and the
``summary.json`` they write.

Imported as ``common`` by ``examples/uptrain.py`` and ``examples/uptrain_trl.py`` (run from the repository root:
Python puts the script's folder, ``examples/``, on the import path).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from elitekv_demo.testing import tiny_data, tiny_model, tiny_tokenizer
from elitekv_peft.training import logged_losses


def corpora_option(value: str) -> tuple[str, ...]:
    """``"pydocs,linuxdoc"`` -> ``("pydocs", "linuxdoc")``; a bad list is a usage error naming the corpora."""
    from elitekv_demo.corpora import parse_corpora

    try:
        return parse_corpora(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of both examples: model/data choice, conversion and the token budget."""
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic data (CPU, < 1 min)")
    parser.add_argument("--kv-ratio", type=float, default=0.25, help="fraction of the KV cache kept (default 0.25)")
    parser.add_argument("--selection", default="elite", choices=["elite", "high", "low", "uniform", "norm"])
    parser.add_argument("--trainable", default="all", choices=["all", "attention", "attention_norms"])
    parser.add_argument("--train-tokens", type=int, default=None, help="auto: 20k tiny, 30M GPU, 16k CPU (global)")
    parser.add_argument("--seq-len", type=int, default=None, help="auto: 64 tiny, 512 real")
    parser.add_argument("--batch-size", type=int, default=None, help="per device; auto: 8 tiny, 32 GPU, 4 CPU")
    parser.add_argument("--lr", type=float, default=None, help="auto: 3e-3 tiny, 2e-4 real")
    parser.add_argument("--calib-samples", type=int, default=None, help="auto: 8 tiny, 16 GPU, 4 CPU")
    parser.add_argument("--eval-windows", type=int, default=None, help="auto: 32 tiny, 200 GPU, 8 CPU")
    parser.add_argument(
        "--quantize",
        default=None,
        choices=["4bit", "8bit"],
        help="keep the frozen MLPs in bitsandbytes 4-bit (NF4) or 8-bit, QLoRA-style; needs --trainable attention "
        "or attention_norms",
    )
    parser.add_argument(
        "--check-reload",
        action="store_true",
        help="after saving, load the folder with AutoModelForCausalLM and evaluate it again (summary: 'reloaded')",
    )
    parser.add_argument(
        "--train-corpora",
        type=corpora_option,
        default="pydocs",
        help="real data: comma list of corpora to uptrain on, from pydocs, linuxdoc, pgdocs (default pydocs; "
        "held-out and calibration windows are always the Python docs'); ignored with --tiny",
    )


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject combinations of the shared options that cannot work, naming the fix."""
    if args.quantize and args.trainable == "all":
        parser.error("--quantize freezes the MLPs in 4/8-bit: add --trainable attention_norms (or attention)")
    return args


def resolve_defaults(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
    """Fill the 'auto' settings for the tiny, real-on-GPU or real-on-CPU run."""
    mode = "tiny" if args.tiny else ("gpu" if on_gpu else "cpu")
    auto = {
        "train_tokens": {"tiny": 20_000, "gpu": 30_000_000, "cpu": 16_384},
        "seq_len": {"tiny": 64, "gpu": 512, "cpu": 512},
        "batch_size": {"tiny": 8, "gpu": 32, "cpu": 4},
        "lr": {"tiny": 3e-3, "gpu": 2e-4, "cpu": 2e-4},
        "calib_samples": {"tiny": 8, "gpu": 16, "cpu": 4},
        "eval_windows": {"tiny": 32, "gpu": 200, "cpu": 8},
    }
    for name, values in auto.items():
        if getattr(args, name) is None:
            setattr(args, name, values[mode])
    return args


def load_model_and_data(args: argparse.Namespace, state: PartialState) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The model (on this process's device, so calibration runs there), its tokenizer and the token windows."""
    if args.tiny:
        model, tokenizer = tiny_model(args.seed), tiny_tokenizer()
        data = tiny_data(args.train_tokens, args.seq_len, args.eval_windows, args.calib_samples)
    else:
        from elitekv_demo.job import describe_mix, load_default_data
        from elitekv_demo.real_model import load_smollm2

        # one process per machine fills the on-disk caches (dequantised model, tokenised docs) first
        with state.local_main_process_first():
            model, tokenizer = load_smollm2()
            data = load_default_data(
                tokenizer, args.seq_len, args.eval_windows, args.calib_samples, train_corpora=args.train_corpora
            )
        if state.is_main_process:
            epochs = args.train_tokens / max(1, data["train"].numel())
            print(f"[data] train tokens: {describe_mix(data)} ({epochs:.2f} epochs of the budget)", flush=True)
    # the device the Trainer would move the model to anyway (cuda:<local rank> under accelerate launch)
    return model.to(state.device), tokenizer, data


def write_summary(
    out: Path,
    args: argparse.Namespace,
    trainer: Any,
    perplexities: dict[str, float],
    *,
    processes: int,
    train_tokens: int,
    started: float,
    say: Callable[[str], None],
    **fields: Any,
) -> dict[str, Any]:
    """Write ``<out>/summary.json`` (settings, logged losses, held-out perplexity per stage) and print its gist.

    Call on the main process after training; ``fields`` are the example's own settings (e.g. ``loss``)."""
    losses = logged_losses(trainer)
    summary = {
        "model": "tiny" if args.tiny else "SmolLM2-135M",
        "kv_ratio": args.kv_ratio,
        "selection": args.selection,
        **fields,
        "trainable": args.trainable,
        "quantize": args.quantize,
        "processes": processes,
        "train_tokens": train_tokens,
        "steps": trainer.state.global_step,
        "logged_losses": losses,
        "perplexity": perplexities,
        "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if losses:
        say(f"training loss: first {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} logged)")
    say("perplexity on held-out windows: " + ", ".join(f"{k} {v:.2f}" for k, v in perplexities.items()))
    say(f"saved to {out} ({summary['seconds']} s)")
    return summary
