"""Command line (``elitekv`` or ``python -m elitekv_peft``).

* ``elitekv run``: the main job (convert -> uptrain -> evaluate -> save).
* ``elitekv inspect <folder> [--out DIR]``: pictures of a saved conversion (chunk choices, cache bytes per layer,
  calibration errors), written next to the artifact by default.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .pipeline import JobSettings, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elitekv", description="Cut the KV cache of a RoPE LM with EliteKV.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="convert -> uptrain -> evaluate -> save on SmolLM2-135M and the Python docs",
        description="Convert SmolLM2-135M with EliteKV, uptrain it on the Python docs (train split), evaluate "
        "perplexity on held-out files, and save a folder that loads with AutoModelForCausalLM.",
    )
    run.add_argument("--kv-ratio", type=float, default=0.25, help="fraction of the KV cache kept (default 0.25)")
    run.add_argument("--rope-chunks", type=int, default=None, help="r, rotary chunks per head (default: rule)")
    run.add_argument("--selection", default="elite", choices=["elite", "high", "low", "uniform", "norm"])
    run.add_argument(
        "--decomposition",
        default="joint",
        choices=["joint", "separate"],
        help="latent layout: joint (J-LRD, default: uptrains better) or separate (S-LRD: keys and values in their "
        "own parts, the decode kernel reads each cache byte once, faster)",
    )
    run.add_argument("--lowrank-init", default="activation", choices=["activation", "weight"])
    run.add_argument("--loss", default="lm", choices=["lm", "distill", "none"], help="uptraining loss")
    run.add_argument("--train-tokens", type=int, default=None, help="default: 20M on a GPU, 16k on a CPU")
    run.add_argument("--seq-len", type=int, default=512)
    run.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 4 on a CPU")
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: 200 GPU, 24 CPU)")
    run.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: 16 GPU, 4 CPU)")
    run.add_argument("--trainable", default="all", choices=["all", "attention", "attention_norms", "none"])
    run.add_argument("--output-dir", default="out/elitekv-smollm2")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--train-corpora",
        default="pydocs",
        help="comma list of corpora to uptrain on: pydocs, linuxdoc, pgdocs (default pydocs; evaluation and "
        "calibration always use the Python docs)",
    )
    inspect = sub.add_parser(
        "inspect",
        help="plot a saved conversion: chunk choices, cache bytes per layer, calibration errors",
        description="Read a folder written by save_pretrained (PEFT adapter or standalone model) and save "
        "chunk_choices.png, cache_breakdown.png and calibration_errors.png (when the conversion recorded them).",
    )
    inspect.add_argument("artifact", help="folder written by `model.save_pretrained(...)`")
    inspect.add_argument("--out", default=None, help="folder for the PNGs (default: the artifact folder)")
    return parser


def run_inspect(parser: argparse.ArgumentParser, artifact: str, out: str | None) -> int:
    """``elitekv inspect``: write the PNGs and list them; a bad folder exits with status 2 and the fix."""
    from .inspect import inspect_artifact, read_artifact
    from .model_card import per_layer_values

    try:
        info = read_artifact(artifact)
        written = inspect_artifact(artifact, out)
    except (OSError, ValueError) as error:
        parser.exit(2, f"elitekv inspect: error: {error}\n")
    r = len(info.chunk_indices[0][0])
    print(
        f"{artifact}: {len(info.latent_dims)} layers, {info.num_kv_heads} KV heads of dim {info.head_dim}, "
        f"r = {r} rotary chunks per head, latent d_c = {per_layer_values(0, info.latent_dims)}"
    )
    for name, path in written.items():
        print(f"  {name}: {path}")
    if "calibration_errors" not in written:
        print("  calibration errors: not recorded in this folder (saved by an older version or rebuilt adapter)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return run_inspect(parser, args.artifact, args.out)
    if args.command == "run":
        from .data import parse_corpora

        try:
            train_corpora = parse_corpora(args.train_corpora)
        except ValueError as error:
            parser.exit(2, f"elitekv run: error: --train-corpora: {error}\n")
        run_job(
            JobSettings(
                kv_ratio=args.kv_ratio,
                rope_chunks=args.rope_chunks,
                selection=args.selection,
                decomposition=args.decomposition,
                lowrank_init=args.lowrank_init,
                loss=args.loss,
                train_tokens=args.train_tokens,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                eval_windows=args.eval_windows,
                calib_samples=args.calib_samples,
                trainable=args.trainable,
                output_dir=args.output_dir,
                device=args.device,
                seed=args.seed,
                progress=not args.no_progress,
                train_corpora=train_corpora,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
