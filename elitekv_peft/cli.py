"""The commands of ``elitekv`` (``python -m elitekv_peft``); the parser lives in the top-level `elitekv_cli`.

* ``elitekv convert MODEL --data DATA --kv-ratio R --output-dir DIR``: any model and text (`pipeline.convert_job`).
* ``elitekv run``: ``convert`` on the embedded default, SmolLM2-135M and the Python docs (`elitekv_demo.job`, a
  client of the library that ``elitekv_cli`` dispatches to).
* ``elitekv eval MODEL_OR_ARTIFACT --data DATA``: perplexity and KV cache bytes per token.
* ``elitekv generate ARTIFACT "prompt"``: streamed generation, with the chat template when the tokenizer has one.
* ``elitekv inspect <folder> [--out DIR]``: pictures of a saved conversion.

`run_command` checks every option that needs no weights (the conversion settings through `EliteKVConfig` itself,
the data files and text field, the model's config and cache budget) before loading anything heavy; a bad input
ends with exit status 2 and a message naming the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

from elitekv_cli import build_parser, main

__all__ = ["build_parser", "main", "run_command"]

_FIELDS = (
    "kv_ratio rope_chunks latent_dim key_share selection selection_objective decomposition latent_allocation "
    "rope_allocation lowrank_init trainable "
    "method loss teacher distill_weight hidden_weight latent_lr_ratio progressive_stages train_tokens seq_len "
    "batch_size grad_accum eval_windows calib_samples learning_rate torch_compile"
).split()


def flag_names(message: str) -> str:
    """``"kv_ratio=2.0 must be ..."`` -> ``"--kv-ratio=2.0 must be ..."``: the library's field names as flags."""
    pattern = r"(?<![\w./-])(" + "|".join(_FIELDS) + r")\b"
    return re.sub(pattern, lambda m: "--" + ("lr" if m[1] == "learning_rate" else m[1].replace("_", "-")), message)


def job_settings(args: argparse.Namespace) -> Any:
    """`JobSettings` from the options of ``convert`` / ``run``."""
    from .pipeline import JobSettings

    names = (
        "kv_ratio method rope_chunks latent_dim key_share selection selection_objective decomposition "
        "latent_allocation rope_allocation lowrank_init "
        "loss teacher distill_weight hidden_weight latent_lr_ratio progressive_stages train_tokens seq_len batch_size "
        "grad_accum eval_windows calib_samples trainable torch_compile output_dir device seed"
    ).split()
    settings = JobSettings(**{name: getattr(args, name) for name in names})
    settings.learning_rate = args.lr
    settings.progress = not args.no_progress
    return settings


@contextlib.contextmanager
def quiet_progress(args: argparse.Namespace) -> Iterator[None]:
    """With ``--no-progress``: transformers' and datasets' bars off (this library's follow transformers',
    `elitekv_peft.progress`) for the command, as they were afterwards (an in-process call changes nothing)."""
    if not getattr(args, "no_progress", False):
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    hf_was, datasets_was = hf_logging.is_progress_bar_enabled(), not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hf_was:
            hf_logging.enable_progress_bar()
        if datasets_was:
            datasets.enable_progress_bars()


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command; input errors exit with status 2 through ``parser.error``."""
    from .user_data import DataError
    from .user_model import ModelError

    command = {"convert": run_convert, "eval": run_eval, "generate": run_generate}
    if args.command == "inspect":
        return run_inspect(parser, args.artifact, args.out)
    with quiet_progress(args):
        if args.command == "serve":
            return run_serve(parser, args)
        try:
            return command[args.command](parser, args)
        except (DataError, ModelError) as error:
            parser.error(str(error))
    return 2


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """``--device`` names a device this machine has (cpu, cuda, cuda:N, mps): checked before any data or weights."""
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device}: not a device name; give cpu, cuda or cuda:N")
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            parser.error(
                f"--device {device}: {why}; use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if kind.index is not None and kind.index >= count:
            parser.error(f"--device {device}: this machine has {count} GPU(s); give cuda:0 to cuda:{count - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif kind.type not in ("cpu", "cuda", "mps"):
        parser.error(f"--device {device}: {kind.type} is not supported; give cpu, cuda or cuda:N")


def check_seq_len(parser: argparse.ArgumentParser, config: Any, seq_len: int) -> None:
    """``--seq-len`` fits the model's ``max_position_embeddings`` (checked before any text or weights load)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        parser.error(
            f"--seq-len {seq_len} is longer than the model's max_position_embeddings {limit}: give --seq-len {limit} "
            "or less"
        )


def _settings_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    try:
        return job_settings(args).resolved()
    except (ValueError, TypeError) as error:
        parser.error(flag_names(str(error)))


def _data_source(parser: argparse.ArgumentParser, args: argparse.Namespace, values: Sequence[str] | None) -> Any:
    from .user_data import check_text_field, resolve_data

    if values is None:
        return None
    source = resolve_data(values, hub_config=args.data_config, hub_split=args.data_split)
    check_text_field(source, args.text_field)
    return source


def run_convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``elitekv convert``: check everything cheap, then `pipeline.convert_job`."""
    from .pipeline import convert_job
    from .progressive import check_stages
    from .user_data import DataError
    from .user_model import ModelError, check_convertible, load_model_config, resolve_model

    model = resolve_model(args.model)
    data = _data_source(parser, args, args.data)
    eval_data = _data_source(parser, args, args.eval_data)
    calib_data = _data_source(parser, args, args.calib_data)
    settings = _settings_or_exit(parser, args)
    if settings.teacher is not None:
        resolve_model(settings.teacher, "--teacher")
    config = load_model_config(model)
    check_seq_len(parser, config, settings.seq_len)
    try:
        check_convertible(config, settings.peft_kwargs())
    except ModelError as error:
        parser.error(flag_names(str(error)))
    try:
        check_stages(settings.progressive_stages, config.get_text_config().num_hidden_layers)
    except ValueError as error:
        parser.error(flag_names(str(error)))
    calibrates = settings.method in ("elitekv", "kv_latent") or settings.lowrank_init == "activation"
    if calibrates and settings.calib_samples * settings.seq_len < config.hidden_size:
        parser.error(
            f"--calib-samples {settings.calib_samples} x --seq-len {settings.seq_len} = "
            f"{settings.calib_samples * settings.seq_len} calibration tokens, fewer than the model's hidden size "
            f"{config.hidden_size}: raise --calib-samples to {-(-config.hidden_size // settings.seq_len)} or more"
        )
    inputs = {"model": model, "data": data, "eval_data": eval_data, "calib_data": calib_data}
    inputs.update(text_field=args.text_field, dtype=args.dtype)
    try:
        convert_job(settings, inputs)
    except (ValueError, TypeError) as error:  # the library's input checks (model family, data size): the fix
        if isinstance(error, (DataError, ModelError)) or os.environ.get("ELITEKV_VERBOSE"):
            raise
        parser.error(f"{error} (ELITEKV_VERBOSE=1 shows where)")
    return 0


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(config, tokenizer, load)`` for ``args.model``: ``load()`` gives the model (original or converted) on
    ``args.device``, so that the caller can check its flags against the config and prepare the text before the
    weights are read."""
    import torch

    from .user_model import load_model, load_model_config, load_tokenizer, resolve_model, torch_dtype

    source = resolve_model(args.model, "MODEL_OR_ARTIFACT" if args.command == "eval" else "ARTIFACT")
    config = load_model_config(source)  # a Hub id that cannot be reached fails here, before the weights
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(source)
    return config, tokenizer, lambda: load_model(source, torch_dtype(args.dtype, device), device)


def held_out_seed(parser: argparse.ArgumentParser, args: argparse.Namespace, data_label: str) -> int:
    """The split seed of ``eval --held-out``: the one ``convert`` recorded in MODEL's summary.json, else ``--seed``
    (default 0). Another ``--seed``, other DATA, or a conversion evaluated on ``--eval-data`` exit with status 2:
    their "held-out" windows would hold text the model was trained on."""
    path = os.path.join(args.model, "summary.json")
    summary: Any = {}
    if os.path.isfile(path):
        with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    summary = summary if isinstance(summary, dict) else {}
    recorded, data = (summary.get("settings") or {}).get("seed"), summary.get("data") or {}
    if recorded is None:
        return 0 if args.seed is None else args.seed
    if args.seed is not None and args.seed != recorded:
        parser.error(
            f"--seed {args.seed}: {args.model} was converted with --seed {recorded}, and --held-out must split DATA "
            f"the same way (another seed mixes in training text): drop --seed or pass --seed {recorded}"
        )
    if str(data.get("split", "")).startswith("embedded corpora"):
        parser.error(
            f"--held-out: {args.model} was made by `elitekv run`, which splits its embedded text by file with its "
            "own rule (its held-out results are in its summary.json); DATA split here would hold text the model was "
            "trained on: evaluate on other text without --held-out"
        )
    if str(data.get("split", "")).startswith("held-out text"):
        parser.error(
            f"--held-out: {args.model} was trained on all of its DATA ({data.get('data')}) and evaluated on separate "
            "text; evaluate on that text without --held-out"
        )
    if data.get("data") not in (None, data_label):
        parser.error(
            f"--held-out: {args.model} was converted on {data['data']}, not {data_label}; its held-out split is of "
            "that data: pass the same --data, or drop --held-out (all of DATA)"
        )
    return int(recorded)


def run_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``elitekv eval``: perplexity on DATA (or its held-out split) and KV cache bytes per token."""
    from .evaluation import perplexity
    from .pipeline import cache_bytes_per_token
    from .user_data import evaluation_windows, held_out_windows

    source = _data_source(parser, args, args.data)
    config, tokenizer, load = _model_and_tokenizer(args)
    check_seq_len(parser, config, args.seq_len)
    seed = held_out_seed(parser, args, source.label) if args.held_out else None
    if seed is not None:
        windows = held_out_windows(source, tokenizer, args.seq_len, args.eval_windows, args.text_field, seed)
    else:
        windows = evaluation_windows(source, tokenizer, args.seq_len, args.eval_windows, args.text_field)
    model = load()
    ppl = perplexity(model, windows, batch_size=args.batch_size, progress=not args.no_progress)
    result = {
        "model": args.model,
        "data": source.label,
        "split": "held-out" if args.held_out else "all",
        "seed": seed,
        "perplexity": ppl,
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "cache_bytes_per_token": cache_bytes_per_token(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    shown = f"{ppl:.3f}" if math.isfinite(ppl) else "inf"
    print(f"\n| model | data | perplexity | tokens | KV cache bytes/token ({result['dtype']}, all layers) |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.model} | {result['data']} ({result['split']}) | {shown} | {result['tokens']:,} | "
        f"{result['cache_bytes_per_token']:,} |"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


def run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``elitekv generate``: stream the completion with `transformers.TextStreamer`."""
    import torch
    from transformers import TextStreamer

    _, tokenizer, load = _model_and_tokenizer(args)
    if getattr(tokenizer, "chat_template", None) and not args.no_chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        if args.system:
            parser.error("--system needs a tokenizer with a chat template; drop it or put it in the prompt")
        inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].numel() == 0:
        parser.error("PROMPT is empty and there is no chat template around it: give text to continue")
    model = load()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=pad,
            do_sample=args.do_sample,
            **sampling,
        )
    return 0


def run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``elitekv serve``: `elitekv_peft.serving.serve` until SIGINT/SIGTERM; bad input exits 2 with the fix."""
    from .serving import serve

    try:
        serve(args.artifact, args.host, args.port, device=args.device, dtype=args.dtype)
    except (ImportError, ValueError) as error:
        parser.error(str(error))
    return 0


def run_inspect(parser: argparse.ArgumentParser, artifact: str, out: str | None) -> int:
    """``elitekv inspect``: write the PNGs and list them; a bad folder exits with status 2 and the fix."""
    from .inspection import inspect_artifact, read_artifact
    from .model_card import per_layer_values

    try:
        info = read_artifact(artifact)
        written = inspect_artifact(artifact, out)
    except (OSError, ValueError) as error:
        parser.exit(2, f"elitekv inspect: error: {error}\n")
    r = per_layer_values(0, [len(layer[0]) for layer in info.chunk_indices])
    print(
        f"{artifact}: {len(info.latent_dims)} layers, {info.num_kv_heads} KV heads of dim {info.head_dim}, "
        f"r = {r} rotary chunks per head, latent d_c = {per_layer_values(0, info.latent_dims)}"
    )
    for name, path in written.items():
        print(f"  {name}: {path}")
    if "calibration_errors" not in written:
        print("  calibration errors: not recorded in this folder (saved by an older version or rebuilt adapter)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
