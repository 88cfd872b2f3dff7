"""Retention: how much of the original model survives conversion, on text never trained on (issue 18).

Every row (method, kv_ratio, recipe) is converted from the original SmolLM2-135M, uptrained by its recipe
(``benchmarks/retention_recipes.py``) and measured on every evaluation set of
:func:`elitekv_demo.corpus_sets.retention_eval_sets`: ``"indomain"`` (the Python docs' held-out files) and the unseen
corpora (man pages, the GNU manuals in info, fortunes; never trained or calibrated on). Per set: perplexity and
top-1 next-token agreement with the original (its argmax computed once, :class:`~elitekv_peft.evaluation.
RetentionReference`). ``gpu_minutes`` is the wall clock of conversion + uptraining (+ generating the self-generated
text, when a recipe uses it), not of the evaluation.

Rows merge into ``<out>/retention.json`` (same method, kv_ratio, recipe and ``--tag`` replace the old row), so a
GPU budget can be split over several calls; ``retention.md`` and ``retention.png`` are rewritten from it each time.
With ``--time-limit`` a row whose training would run past it saves a checkpoint under ``<out>/checkpoints`` and
stops; the same command resumes it (``benchmarks/retention_gpu_job.sh`` runs the parts on the GPU machine).

Usage::

    python benchmarks/retention.py run --rows original,elitekv:0.25:none,elitekv:0.25:default --out DIR
    python benchmarks/retention.py run --rows elitekv:0.25:selfgen --set selfgen_tokens=2000000 --tag gen2M --out DIR
    python benchmarks/retention.py merge DIR1/retention.json DIR2/retention.json --out benchmarks/results
    python benchmarks/retention.py report --out benchmarks/results      # rewrite .md/.png from the .json
    python benchmarks/retention.py manifest                             # benchmarks/results/retention_corpora.*

Row specs: ``METHOD:KV_RATIO:RECIPE`` with METHOD one of original, elitekv, gqa, kv_latent, lorc and RECIPE one of
default, lm, distill, selfgen, broad, none (``original`` alone is ``original:1:none``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from retention_recipes import RECIPES, Recipe, generate_text, make_recipe, uptrain_row  # noqa: E402
from retention_report import MODEL_NAME, load_result, merge_results, row_key, write_report  # noqa: E402

STARTED = time.time()
METHODS = ("original", "elitekv", "gqa", "kv_latent", "lorc")
EVAL_WINDOWS = 200  # per set, 512 tokens each (a set with fewer windows is used whole)
EVAL_BATCH = 16


def parse_row(spec: str) -> tuple[str, float, str]:
    """``"elitekv:0.25:distill"`` -> ``("elitekv", 0.25, "distill")``; ``"original"`` -> ``("original", 1.0, "none")``.

    Raises:
        ValueError: unknown method or recipe, or a ratio outside (0, 1].
    """
    parts = [p.strip() for p in spec.split(":")]
    method = parts[0]
    if method not in METHODS:
        raise ValueError(f"row {spec!r}: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "original" and len(parts) == 1:
        return "original", 1.0, "none"
    if len(parts) != 3:
        raise ValueError(f"row {spec!r}: write METHOD:KV_RATIO:RECIPE, e.g. elitekv:0.25:distill")
    ratio, recipe = float(parts[1]), parts[2]
    if not 0.0 < ratio <= 1.0 or (method == "original") != (ratio == 1.0):
        raise ValueError(f"row {spec!r}: kv_ratio must be in (0, 1), and 1 only for the original")
    if recipe not in RECIPES:
        raise ValueError(f"row {spec!r}: unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    return method, ratio, recipe


@dataclass
class Bench:
    """What every row shares: the original model, the evaluation sets and their reference, and the data.

    Attributes:
        base: the original model (never modified; rows work on copies).
        device: ``"cuda"`` or ``"cpu"`` (the device of ``base``).
        reference: the original's perplexity and argmax on each set (``RetentionReference``).
        calib: every calibration window ``[C, T]`` (the Python docs' calib split); a recipe takes
            ``calib_samples`` of them evenly spaced.
        train_windows: ``corpora tuple -> LongTensor [N, T]`` training windows of that mix.
        selfgen_dir: cache folder of self-generated text (None: the library cache).
    """

    base: torch.nn.Module
    device: str
    reference: Any
    calib: torch.Tensor
    train_windows: Any
    selfgen_dir: Path | None = None
    progress: bool = False
    work_dir: str = "/tmp/elitekv_retention_trainer"
    deadline: float | None = None  # time.time() after which training checkpoints and stops (resumed later)
    ckpt_root: Path | None = None  # where stopped rows keep their checkpoints
    _train_cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)

    def train_data(self, corpora: tuple[str, ...]) -> torch.Tensor:
        if corpora not in self._train_cache:
            self._train_cache[corpora] = self.train_windows(corpora)
        return self._train_cache[corpora]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def convert(bench: Bench, method: str, kv_ratio: float, recipe: Recipe) -> torch.nn.Module:
    """A copy of the original converted by ``get_peft_model`` with the recipe's EliteKV settings (for ``elitekv``)
    or the method's defaults (others, as ``benchmarks/quality.py`` converts them); the original: a plain copy."""
    model = copy.deepcopy(bench.base)
    if method == "original":
        return model
    from peft import get_peft_model

    from elitekv_demo.tokens import windows_from_stream
    from elitekv_peft import EliteKVConfig

    job = recipe.job
    # evenly spaced over the calibration split, as `elitekv run` picks them (load_corpus_data)
    calib = windows_from_stream(bench.calib.reshape(-1), bench.calib.shape[1], job.calib_samples)
    if method == "elitekv":
        if hasattr(job, "peft_kwargs"):
            kwargs = {**job.peft_kwargs(), "kv_ratio": kv_ratio, "method": "elitekv"}
        else:
            names = ("rope_chunks", "selection", "decomposition", "lowrank_init", "trainable", "seed")
            kwargs = {"kv_ratio": kv_ratio, **{n: getattr(job, n) for n in names}}
    else:
        kwargs = {"kv_ratio": kv_ratio, "method": method, "trainable": job.trainable, "seed": job.seed}
    return get_peft_model(model, EliteKVConfig(calibration_data=calib, **kwargs))


def row_slug(method: str, kv_ratio: float, recipe: str, tag: str) -> str:
    """A folder name for a row's checkpoints: ``elitekv-0.25-distill`` (``-<tag>`` with a tag)."""
    text = f"{method}-{kv_ratio:g}-{recipe}" + (f"-{tag}" if tag else "")
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def measure_row(bench: Bench, method: str, kv_ratio: float, recipe: Recipe, tag: str = "") -> dict[str, Any] | None:
    """Convert, uptrain and measure one row; returns it (see the module docstring for the fields), or ``None``
    when ``bench.deadline`` stopped its training (a checkpoint and the time spent so far are kept under
    ``bench.ckpt_root``; the same row in a later call resumes). ``gpu_minutes``: conversion (counted once) plus
    training across calls plus the generation of self-generated text (counted once)."""
    ref = bench.reference
    gen_seconds, resumed_from = 0.0, 0
    if method == "original" and recipe.name == "none":  # the reference itself: its own pass, agreement 1 by definition
        ppl, agreement, tokens, seconds = dict(ref.ppl), dict.fromkeys(ref.ppl, 1.0), 0, 0.0
    else:
        ckpt_dir = bench.ckpt_root / row_slug(method, kv_ratio, recipe.name, tag) if bench.ckpt_root else None
        spent_file = ckpt_dir / "spent.json" if ckpt_dir is not None else None
        earlier = json.loads(spent_file.read_text()) if spent_file is not None and spent_file.is_file() else None
        _sync(bench.device)
        start = time.time()
        model = convert(bench, method, kv_ratio, recipe)
        _sync(bench.device)
        convert_seconds = time.time() - start
        outcome = uptrain_row(bench, model, recipe, ckpt_dir)
        _sync(bench.device)
        wall = time.time() - start - outcome.gen_wall  # conversion + training of this call
        if earlier is not None:  # resumed: this call's conversion repeats the first call's
            wall = earlier["seconds"] + wall - convert_seconds
            resumed_from = int(earlier["step"])
        if not outcome.finished:
            assert spent_file is not None
            spent_file.parent.mkdir(parents=True, exist_ok=True)
            spent_file.write_text(json.dumps({"seconds": wall, "step": outcome.step}))
            print(
                f"[retention] {method} {kv_ratio} {recipe.name}: stopped at step {outcome.step} of "
                f"{outcome.max_steps} (time limit); run the same rows again to resume from {ckpt_dir}",
                flush=True,
            )
            return None
        tokens, gen_seconds = outcome.tokens, outcome.gen_seconds
        seconds = wall + gen_seconds
        print(f"[retention] {method} {kv_ratio} {recipe.name}: converted and trained in {seconds:.0f} s", flush=True)
        ppl, agreement = ref.measure(model)
        del model
        if ckpt_dir is not None and ckpt_dir.is_dir():
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if bench.device.startswith("cuda"):
            torch.cuda.empty_cache()
    row: dict[str, Any] = {
        "method": method,
        "kv_ratio": kv_ratio,
        "recipe": recipe.name,
        "train_tokens": int(tokens),
        "gpu_minutes": round(seconds / 60.0, 3),
        "ppl": {k: float(v) for k, v in ppl.items()},
        "top1_agreement": {k: float(v) for k, v in agreement.items()},
        "knobs": recipe.knobs(),
        "eval_tokens": {k: int(v.numel()) for k, v in ref.eval_sets.items()},
        "device": bench.device if not bench.device.startswith("cuda") else torch.cuda.get_device_name(),
    }
    if gen_seconds:
        row["selfgen_minutes"] = round(gen_seconds / 60.0, 3)  # part of gpu_minutes
    if tag:
        row["tag"] = tag
    if resumed_from:
        row["resumed_from_step"] = resumed_from  # trained over more than one call
    print(json.dumps({k: row[k] for k in ("method", "kv_ratio", "recipe", "gpu_minutes", "ppl")}), flush=True)
    return row


def run_rows(
    bench: Bench,
    specs: list[str],
    out_dir: Path,
    *,
    command: str,
    overrides: dict[str, str] | None = None,
    tag: str = "",
    model_name: str = MODEL_NAME,
    plot: bool = True,
    skip_done: bool = False,
) -> dict[str, Any]:
    """Measure each row spec and merge it into ``out_dir/retention.json`` (written after every row, with .md/.png).
    ``skip_done``: rows already there (same method, kv_ratio, recipe and tag) are not measured again."""
    parsed = [parse_row(s) for s in specs]  # all checked before any work
    recipes = {r: make_recipe(r, bench.device, overrides) for r in {p[2] for p in parsed}}
    path = out_dir / "retention.json"
    device = bench.device if not bench.device.startswith("cuda") else torch.cuda.get_device_name()
    unseen = [name for name in bench.reference.eval_sets if name != "indomain"]
    result = load_result(path)
    done = {row_key(r) for r in result.get("rows", [])} if skip_done else set()
    for method, ratio, recipe in parsed:
        if (method, float(ratio), recipe, tag) in done:
            print(f"[retention] {method} {ratio} {recipe} is in {path} already: skipped", flush=True)
            continue
        row = measure_row(bench, method, ratio, recipes[recipe], tag)
        if row is None:  # stopped by the time limit: the rest waits for the next call
            break
        this_run = {
            "model": model_name,
            "device": device,
            "date": dt.date.today().isoformat(),
            "command": command,
            "unseen_corpora": unseen,
            "rows": [row],
        }
        result = merge_results([result, this_run])
        write_report(result, out_dir, plot=plot)
    return result


def pregenerate(bench: Bench, specs: list[str], overrides: dict[str, str] | None = None) -> None:
    """Generate and cache the self-generated training text of the rows' recipes (a call of its own when one call
    cannot hold both generation and training); the rows later read the cache and still count its minutes."""
    for recipe_name in sorted({parse_row(s)[2] for s in specs}):
        recipe = make_recipe(recipe_name, bench.device, overrides)
        if recipe.selfgen.fraction <= 0:
            continue
        job = recipe.job
        windows = bench.train_data(tuple(job.train_corpora))
        generated, seconds = generate_text(
            bench.base, windows, recipe.selfgen, job.seq_len, job.seed, bench.selfgen_dir, bench.progress
        )
        print(f"[retention] {recipe_name}: {generated.shape[0]:,} windows in {seconds / 60:.1f} min", flush=True)


def real_bench(eval_windows: int, device: str, progress: bool) -> Bench:
    """SmolLM2-135M and the Debian corpora (all must be installed or staged)."""
    from elitekv_demo.corpus_sets import corpus_windows, load_corpus_data, retention_eval_sets
    from elitekv_demo.real_model import load_smollm2
    from elitekv_peft.evaluation import RetentionReference

    base, tokenizer = load_smollm2(device=device)
    seq_len = 512
    sets = retention_eval_sets(tokenizer, seq_len, eval_windows)
    print({name: tuple(w.shape) for name, w in sets.items()}, flush=True)
    start = time.time()
    reference = RetentionReference(base, sets, batch_size=EVAL_BATCH, progress=progress)
    print(f"original scored in {time.time() - start:.0f} s: {reference.ppl}", flush=True)

    def train_windows(corpora: tuple[str, ...]) -> torch.Tensor:
        return load_corpus_data(tokenizer, seq_len, 1, 1, train_corpora=corpora)["train"]

    calib = corpus_windows(tokenizer, "pydocs", "calib", seq_len)
    return Bench(base, device, reference, calib, train_windows, progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure rows and merge them into OUT/retention.json")
    run.add_argument("--rows", required=True, help="comma list of METHOD:KV_RATIO:RECIPE (or original)")
    run.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="change a recipe knob")
    run.add_argument("--tag", default="", help="label rows of changed knobs (they then never replace plain rows)")
    run.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS)
    run.add_argument("--no-plot", action="store_true")
    run.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="after this many minutes since the start, a row's training saves a checkpoint in OUT/checkpoints and "
        "stops (no row is written); the same command later resumes it",
    )
    run.add_argument("--skip-done", action="store_true", help="skip rows already in OUT/retention.json")
    run.add_argument(
        "--pregenerate",
        action="store_true",
        help="only generate (and cache) the self-generated text of the rows' recipes; no row is measured",
    )
    merge = sub.add_parser("merge", help="merge retention.json files into OUT")
    merge.add_argument("inputs", nargs="+", type=Path)
    report = sub.add_parser("report", help="rewrite OUT/retention.md and .png from OUT/retention.json")
    manifest = sub.add_parser("manifest", help="write OUT/retention_corpora.{json,md} (this machine's packages)")
    for p in (run, merge, report, manifest):
        p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    args = parser.parse_args()
    if args.cmd == "run":
        overrides = dict(item.split("=", 1) for item in args.set)
        specs = [s for s in args.rows.split(",") if s.strip()]
        for spec in specs:
            parse_row(spec)
        if overrides and not args.tag:
            parser.error("--set changes a recipe: label the rows with --tag (e.g. --tag tokens=10M)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bench = real_bench(args.eval_windows, device, progress=False)
        bench.ckpt_root = args.out / "checkpoints"
        bench.deadline = STARTED + 60.0 * args.time_limit if args.time_limit else None
        if args.pregenerate:
            pregenerate(bench, specs, overrides)
            return
        command = "python benchmarks/retention.py " + " ".join(sys.argv[1:])
        run_rows(
            bench,
            specs,
            args.out,
            command=command,
            overrides=overrides,
            tag=args.tag,
            plot=not args.no_plot,
            skip_done=args.skip_done,
        )
    elif args.cmd == "merge":
        write_report(merge_results([load_result(p) for p in args.inputs]), args.out)
    elif args.cmd == "report":
        write_report(load_result(args.out / "retention.json"), args.out)
    else:
        from retention_corpora import write_manifest

        write_manifest(args.out, args.eval_windows if hasattr(args, "eval_windows") else EVAL_WINDOWS)
        return
    print((args.out / "retention.md").read_text() if (args.out / "retention.md").is_file() else "")


if __name__ == "__main__":
    main()
