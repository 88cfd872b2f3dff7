"""Quality benchmark on SmolLM2-135M: held-out Python-docs perplexity against KV-cache size.

Rows (method, kv_ratio, stage):

* original: as is, and uptrained on the same tokens as the compressed models (domain adaptation is not recovery);
* gqa (``method="gqa"``): key/value heads mean-pooled, at every feasible ratio below 1 (SmolLM2 has 3 KV heads, so
  only 1 head = 33%);
* elitekv at 50% / 25% / 12.5%: training-free, uptrained with LM loss, uptrained with distillation;
* kv_latent and lorc (``method="kv_latent"`` / ``"lorc"``) at 50% / 25% / 12.5%: training-free and uptrained with LM
  loss on the same tokens as EliteKV;
* selection / low-rank ablations at 25%, training-free: elite vs norm vs high; activation vs weight SVD.

Every row is evaluated on the same held-out windows. Runs are split into parts (``--part``) so each fits one
device call; each part appends its rows to ``--state`` (JSON). ``--report`` turns the state into
``benchmarks/results/quality.{json,md,png}``.

Usage::

    python benchmarks/quality.py --part training_free --state /root/bench/quality_state.json
    python benchmarks/quality.py --part uptrain --only original,gqa --state ...
    python benchmarks/quality.py --part training_free --only kv_latent,lorc,gqa --state ...
    python benchmarks/quality.py --part uptrain --only kv_latent0.25:lm,lorc0.25:lm --state ...
    # uptrain on a larger mix (rows get variant "train=pydocs+linuxdoc+pgdocs"; eval set unchanged)
    python benchmarks/quality.py --part uptrain --only original,elitekv0.25:lm --train-corpora pydocs,linuxdoc,pgdocs
    # distillation from the original uptrained in the same run on the same tokens (a domain-adapted teacher)
    python benchmarks/quality.py --part uptrain --only original,elitekv0.25:distill --teacher uptrained
    # EliteKV converted from the original uptrained on half the tokens, then trained on the other half (same budget),
    # distilled from that adapted original
    python benchmarks/quality.py --part uptrain --only elitekv0.25:lm,elitekv0.25:distill --convert-from uptrained \
        --teacher uptrained
    # distillation from an original uptrained by an earlier run (saved by its --save-dir), with the hidden-state
    # term and a learning rate of their own for the latent projections
    python benchmarks/quality.py --part uptrain --only original --save-dir /root/saved
    python benchmarks/quality.py --part uptrain --only elitekv0.25:distill \
        --teacher-dir /root/saved/original-uptrained --hidden-weight 1 --latent-lr-ratio 0.25 \
        --variant hidden=1,latent_lr=0.25x
    # CPU smoke run (tiny budget): --eval-windows 2 --calib-samples 2 --train-tokens 2048 --batch-size 2
    # CPU test of every step in seconds: a tiny random Llama on synthetic windows (tests/test_quality_tiny.py)
    python benchmarks/quality.py --tiny --part training_free --state /tmp/q.json --eval-windows 8 --calib-samples 8

``--only`` takes row names (``elitekv0.25``, ``kv_latent0.5``, ``lorc0.125:lm``, ``gqa``, ``original``, ``ablations``,
``lorc_activation``) or a method name for all of its rows of the part (``kv_latent``, ``lorc``).
    python benchmarks/quality.py --report --state quality_state.json --command "..." --device "..."

Every row goes through the library: ``get_peft_model`` with an `EliteKVConfig`, `elitekv_peft.training.uptrain_tokens`,
`elitekv_peft.evaluation.perplexity`; the report (tables, plot, target checks) is `benchmarks/quality_report.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality_parts import RATIOS, mix_label, run_parts, selected  # noqa: E402
from quality_report import report  # noqa: E402

SEQ_LEN = 512
TINY_SEQ_LEN = 64  # --tiny: the tiny random Llama on synthetic windows (elitekv_demo.testing)
EVAL_WINDOWS = 200  # 102,400 tokens
CALIB_SAMPLES = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked; ``args.variant`` becomes the full label of this run's rows."""
    parser = argparse.ArgumentParser(description="Quality benchmark: held-out perplexity against KV-cache size.")
    parser.add_argument("--part", choices=["training_free", "uptrain"])
    parser.add_argument(
        "--only",
        default=None,
        help="comma list of rows or methods: original,gqa,ablations,elitekv0.25,elitekv0.25:lm,kv_latent,lorc0.5:lm",
    )
    parser.add_argument("--state", default=str(ROOT / "benchmarks" / "results" / "quality_state.json"))
    parser.add_argument("--train-tokens", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per window (default {SEQ_LEN}; --tiny 64)")
    parser.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS)
    parser.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES, help="calibration windows (CPU: 2)")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random Llama on synthetic windows instead of SmolLM2 (CPU test)"
    )
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--variant", default="", help="label for rows of a non-default setting, e.g. tokens=20M")
    parser.add_argument(
        "--config-overrides",
        type=json.loads,
        default={},
        help="JSON of EliteKVConfig fields for every conversion of this run, e.g. '{\"rope_chunks\": 8}' "
        "(use with --variant and --only)",
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=1.0,
        help="distill rows: weight of the KL term, the rest is LM loss (e.g. 0.5; use with --variant)",
    )
    parser.add_argument(
        "--teacher",
        choices=["original", "uptrained"],
        default="original",
        help="teacher of the distill rows: the original model as is, or the original uptrained in this run on the "
        "same tokens (needs `original` in --only; rows get variant teacher=uptrained)",
    )
    parser.add_argument(
        "--convert-from",
        choices=["base", "uptrained"],
        default="base",
        help="what the EliteKV rows convert: the original as loaded, or the original first uptrained on "
        "--source-tokens of the same data (a domain-adapted start); the row then trains the rest of --train-tokens, "
        "so its budget matches the original's (rows get variant from=uptrained(...))",
    )
    parser.add_argument(
        "--teacher-dir",
        default=None,
        help="distill rows: the teacher is the original uptrained by an earlier run of the same --train-tokens, "
        "saved by its --save-dir (DIR/original-uptrained); rows get variant teacher=uptrained",
    )
    parser.add_argument(
        "--hidden-weight",
        type=float,
        default=0.0,
        help="distill rows: add this weight times the hidden-state loss (every layer's output against the "
        "teacher's; use with --variant)",
    )
    parser.add_argument(
        "--latent-lr-ratio",
        type=float,
        default=1.0,
        help="EliteKV rows: learning rate of the low-rank projections over the rest's (use with --variant)",
    )
    parser.add_argument("--source-tokens", type=int, default=None, help="with --convert-from uptrained (default half)")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], default=None, help="frozen MLPs in bitsandbytes")
    parser.add_argument(
        "--train-corpora",
        default="pydocs",
        help="comma list of corpora to uptrain on (pydocs, linuxdoc, pgdocs; default pydocs). Another mix adds "
        "'train=<mix>' to every row's variant and a 'mix ...' note; eval and calibration stay the Python docs'",
    )
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--command", default=" ".join(sys.argv))
    parser.add_argument("--device", default=None)
    parser.add_argument("--date", default=None)
    args = parser.parse_args(argv)
    if args.report:
        return args
    from elitekv_demo.corpora import parse_corpora

    corpora = parse_corpora(args.train_corpora)
    if args.part is None:
        parser.error("choose --part training_free or --part uptrain (or --report)")
    if args.tiny and corpora != ("pydocs",):
        parser.error("--tiny trains on synthetic windows: drop --train-corpora")
    if args.seq_len is None:
        args.seq_len = TINY_SEQ_LEN if args.tiny else SEQ_LEN
    quantized = ""
    if args.quantize:  # the frozen MLPs go to bitsandbytes: only attention (+ norms) may train
        trainable = args.config_overrides.get("trainable", "all")
        if trainable == "all":
            parser.error(
                "--quantize freezes the MLPs in bitsandbytes, so the whole model cannot train: add "
                """--config-overrides '{"trainable": "attention_norms"}' (or "attention")"""
            )
        quantized = f"quantize={args.quantize},trainable={trainable}"
    elif (
        args.config_overrides or args.distill_weight != 1.0 or args.hidden_weight or args.latent_lr_ratio != 1.0
    ) and not args.variant:
        parser.error(
            "--config-overrides, --distill-weight, --hidden-weight and --latent-lr-ratio change the recipe: label "
            "the rows with --variant (e.g. --variant rope_chunks=8), or they would replace the main rows of the "
            "same method and ratio"
        )
    if args.part == "uptrain":
        only = set(args.only.split(",")) if args.only else None
        if args.teacher == "uptrained" and not args.teacher_dir and args.convert_from != "uptrained":
            if not selected(only, "original"):
                parser.error(
                    "--teacher uptrained trains the original first: add `original` to --only (or give --teacher-dir)"
                )
        elitekv_rows = [f"elitekv{r}:{loss}" for r in RATIOS for loss in ("lm", "distill")]
        if args.convert_from == "uptrained" and not any(selected(only, name) for name in elitekv_rows):
            parser.error("--convert-from uptrained applies to EliteKV rows: name them in --only (elitekv0.25:lm)")
    mix = "" if corpora == ("pydocs",) else mix_label(corpora)
    args.variant = ",".join(v for v in (args.variant, mix, quantized) if v)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        report(Path(args.state), ROOT / "benchmarks" / "results", args.command, args.device, args.date)
    else:
        run_parts(args)


if __name__ == "__main__":
    main()
