"""What the two uptraining examples share: their common command-line options, 'auto' defaults and loading.

Imported as ``common`` by ``examples/uptrain.py`` and ``examples/uptrain_trl.py`` (run from the repository root:
Python puts the script's folder, ``examples/``, on the import path).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from accelerate import PartialState

from elitekv_demo.testing import tiny_data, tiny_model, tiny_tokenizer


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
    parser.add_argument("--train-tokens", type=int, default=None, help="auto: 20k tiny, 20M GPU, 16k CPU (global)")
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


def reloaded_perplexity(out: str, windows: torch.Tensor, device: torch.device, progress: bool) -> float:
    """Perplexity of the saved folder ``out`` loaded back with ``AutoModelForCausalLM`` (what a user gets), on
    ``windows`` ``[N, seq_len]``; on this process alone."""
    from transformers import AutoModelForCausalLM

    from elitekv_peft.evaluation import perplexity

    reloaded = AutoModelForCausalLM.from_pretrained(out).to(device)
    return perplexity(reloaded, windows, progress=progress)


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject combinations of the shared options that cannot work, naming the fix."""
    if args.quantize and args.trainable == "all":
        parser.error("--quantize freezes the MLPs in 4/8-bit: add --trainable attention_norms (or attention)")
    return args


def resolve_defaults(args: argparse.Namespace, on_gpu: bool) -> argparse.Namespace:
    """Fill the 'auto' settings for the tiny, real-on-GPU or real-on-CPU run."""
    mode = "tiny" if args.tiny else ("gpu" if on_gpu else "cpu")
    auto = {
        "train_tokens": {"tiny": 20_000, "gpu": 20_000_000, "cpu": 16_384},
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
