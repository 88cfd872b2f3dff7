"""The rows of `benchmarks/quality.py`: one call of a part (``--part training_free`` or ``--part uptrain``).

`Bench` holds the original model, its windows and the state file, and the steps every row is made of, each a
library call: ``get_peft_model`` with an `EliteKVConfig`, `elitekv_peft.training.uptrain_tokens`,
`elitekv_peft.evaluation.perplexity`, ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from quality_report import add_row, load_state, save_state

RATIOS = (0.5, 0.25, 0.125)
OTHER_METHODS = ("kv_latent", "lorc")


def selected(only: set[str] | None, name: str, group: str | None = None) -> bool:
    """Whether ``--only`` (None: everything) names the row ``name`` or its ``group``."""
    return only is None or name in only or (group is not None and group in only)


def mix_label(corpora: tuple[str, ...]) -> str:
    """``"train=pydocs+linuxdoc"``: the variant label of rows uptrained on a mix other than the Python docs alone."""
    return "train=" + "+".join(corpora)


def gqa_ratios(config: Any) -> list[float]:
    """Cache ratios mean-pooling can reach below 1: ``groups / G`` for group counts dividing ``G`` and ``H``."""
    G, H = config.num_key_value_heads, config.num_attention_heads
    return [n / G for n in range(1, G) if G % n == 0 and H % n == 0]


class Bench:
    """One call of parts: the original model, its windows and the state file, and the steps every row is made of
    (convert with ``get_peft_model``, uptrain for the budget, perplexity on the held-out windows, record)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_path = Path(args.state)
        self.state = load_state(self.state_path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.only = set(args.only.split(",")) if args.only else None
        if args.tiny:
            from elitekv_demo.testing import tiny_data, tiny_model, tiny_tokenizer

            self.base, self.tokenizer = tiny_model(0).to(self.device), tiny_tokenizer()
            self.corpora: tuple[str, ...] = ("pydocs",)
            self.data = tiny_data(args.train_tokens, args.seq_len, args.eval_windows, args.calib_samples)
        else:
            from elitekv_demo.corpora import parse_corpora
            from elitekv_demo.job import load_default_data
            from elitekv_demo.real_model import load_smollm2

            self.base, self.tokenizer = load_smollm2(device=self.device)
            self.corpora = parse_corpora(args.train_corpora)
            self.data = load_default_data(
                self.tokenizer, args.seq_len, args.eval_windows, args.calib_samples, train_corpora=self.corpora
            )
        self.default_mix = self.corpora == ("pydocs",)

    def wanted(self, name: str, group: str | None = None) -> bool:
        return selected(self.only, name, group)

    def add(self, **row: Any) -> None:
        """Record a row; rows of a labelled run (``--variant``, another mix, ``--quantize``) carry the label."""
        if self.args.variant and not row.get("variant"):
            row["variant"] = self.args.variant
        add_row(self.state, self.state_path, row)

    def ppl(self, model: torch.nn.Module) -> float:
        from elitekv_peft.evaluation import perplexity

        return perplexity(model, self.data["eval"], batch_size=16, progress=False)

    def corpus_ppl(self, model: torch.nn.Module) -> dict[str, Any]:
        """Uptrained rows of a larger mix: perplexity on each extra corpus's own held-out files too."""
        from elitekv_peft.evaluation import perplexity

        if self.default_mix:
            return {}
        extra = [name for name in self.corpora if name != "pydocs"]
        windows = {name: self.data[f"eval/{name}"] for name in extra}
        return {"ppl_by_corpus": {n: perplexity(model, w, batch_size=16, progress=False) for n, w in windows.items()}}

    def convert(self, kv_ratio: float, source: torch.nn.Module | None = None, **kwargs: Any) -> tuple[Any, float]:
        """``source`` (default: the original model as loaded) converted at ``kv_ratio``; returns (model, seconds)."""
        from peft import get_peft_model

        from elitekv_peft import EliteKVConfig

        kwargs = {**self.args.config_overrides, **kwargs}
        config = EliteKVConfig(kv_ratio=kv_ratio, calibration_data=self.data["calib"], **kwargs)
        start = time.time()
        model = get_peft_model(copy.deepcopy(self.base if source is None else source), config)
        if self.args.quantize:  # QLoRA-style: frozen MLPs in bitsandbytes 4/8-bit (needs trainable != "all")
            from elitekv_peft.quantization import quantize_frozen

            quantize_frozen(model, self.args.quantize)
        return model.eval(), time.time() - start

    def train(self, model: torch.nn.Module, tokens: int, teacher: Any = None, latent_lr_ratio: float = 1.0) -> int:
        """Uptrain ``model`` on ``tokens`` of the train split (with ``teacher``: distillation, ``--distill-weight``
        and ``--hidden-weight``); returns the tokens actually trained."""
        from elitekv_peft.training import logged_losses, uptrain_tokens

        args = self.args
        start = time.time()
        trainer, _ = uptrain_tokens(
            model,
            self.data["train"],
            tokens,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            learning_rate=args.lr,
            teacher=teacher,
            distill_weight=args.distill_weight,
            hidden_weight=args.hidden_weight if teacher is not None else 0.0,
            latent_lr_ratio=latent_lr_ratio,
            progress=False,
        )
        seconds = time.time() - start
        trained = int(trainer.state.num_input_tokens_seen)
        print(f"trained {trained:,} tokens in {seconds:.0f} s ({trained / seconds:,.0f} tok/s)", flush=True)
        print("losses:", [round(x, 3) for x in logged_losses(trainer)], flush=True)
        return trained

    def load_saved(self, folder: Path) -> torch.nn.Module:
        """A folder written by ``save_pretrained``, loaded back as a user would."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder).to(self.device).eval()


def training_free_part(bench: Bench) -> None:
    """The original as is; every method converted at every ratio; the selection / low-rank ablations at 25%."""
    wanted, add, convert, ppl = bench.wanted, bench.add, bench.convert, bench.ppl
    if wanted("original"):
        add(method="original", kv_ratio=1.0, stage="as_is", train_tokens=0, ppl=ppl(bench.base))
    main_rows = [("elitekv", ratio) for ratio in RATIOS if wanted(f"elitekv{ratio}")]
    ablations: list[dict[str, Any]] = []  # conversion keywords; the last one names the variant
    if wanted("ablations"):
        ablations += [{"selection": name} for name in ("norm", "high", "low", "uniform")]
        ablations += [{"lowrank_init": "weight"}, {"decomposition": "separate"}]
    if wanted("lorc_activation", "ablations"):
        ablations.append({"method": "lorc", "lowrank_init": "activation"})
    later = [("gqa", ratio) for ratio in gqa_ratios(bench.base.config)] if wanted("gqa") else []
    later += [(method, ratio) for method in OTHER_METHODS for ratio in RATIOS if wanted(f"{method}{ratio}", method)]
    for method, ratio in main_rows:
        convert_row(bench, method, ratio)
    for kwargs in ablations:
        model, _ = convert(0.25, **kwargs)
        name, value = list(kwargs.items())[-1]
        add(
            method=kwargs.get("method", "elitekv"), kv_ratio=0.25, stage="training_free", train_tokens=0,
            variant=f"{name}={value}", ppl=ppl(model),
        )  # fmt: skip
    for method, ratio in later:
        convert_row(bench, method, ratio)


def convert_row(bench: Bench, method: str, ratio: float) -> None:
    """The training-free row of ``method`` at ``ratio``, with its conversion time."""
    model, seconds = bench.convert(ratio, **({} if method == "elitekv" else {"method": method}))
    bench.add(
        method=method, kv_ratio=round(ratio, 4), stage="training_free", train_tokens=0, ppl=bench.ppl(model),
        convert_seconds=round(seconds, 1),
    )  # fmt: skip


def uptrain_part(bench: Bench) -> None:
    """The original, GQA, KV-Latent and LoRC uptrained with LM loss; EliteKV with LM loss and distillation; all
    on the same tokens of the same training set."""
    args, wanted, add, ppl, train = bench.args, bench.wanted, bench.add, bench.ppl, bench.train
    tokens = args.train_tokens
    uptrained_original = None  # the teacher of the distill rows with --teacher uptrained or --teacher-dir
    if args.teacher_dir:  # the original uptrained by an earlier run (its --save-dir), same tokens and data
        uptrained_original = bench.load_saved(Path(args.teacher_dir))

    def uptrain_original(budget: int, source_row: bool = False) -> tuple[torch.nn.Module, int]:
        """The original uptrained on ``budget`` tokens, its row recorded; returns (model, tokens used).
        ``source_row``: the start of --convert-from uptrained (variant ``tokens=...,source``, never a baseline)."""
        model = copy.deepcopy(bench.base)
        used = train(model, budget)
        labels = {}
        if source_row:
            labels["variant"] = ",".join(v for v in (args.variant, f"tokens={used / 1e6:.1f}M", "source") if v)
        add(
            method="original", kv_ratio=1.0, stage="uptrained_lm", train_tokens=used, ppl=ppl(model), **labels,
            **bench.corpus_ppl(model),
        )  # fmt: skip
        return model, used

    source, source_tokens = None, 0  # with --convert-from uptrained: EliteKV starts from the adapted original
    if args.convert_from == "uptrained":
        source, source_tokens = uptrain_original(args.source_tokens or tokens // 2, source_row=True)
        if source_tokens >= tokens:
            raise SystemExit(f"--source-tokens {source_tokens:,} leaves nothing of --train-tokens {tokens:,}")
    if wanted("original"):
        model, _ = uptrain_original(tokens)
        if args.teacher == "uptrained":
            uptrained_original = model
        if args.save_dir:  # a later run's --teacher-dir
            model.save_pretrained(Path(args.save_dir) / "original-uptrained")
    baselines = [("gqa", ratio) for ratio in gqa_ratios(bench.base.config)] if wanted("gqa") else []
    baselines += [(m, r) for m in OTHER_METHODS for r in RATIOS if wanted(f"{m}{r}:lm", m)]
    for method, ratio in baselines:
        model, _ = bench.convert(ratio, method=method)
        used = train(model, tokens)
        add(
            method=method, kv_ratio=round(ratio, 4), stage="uptrained_lm", train_tokens=used, ppl=ppl(model),
            **bench.corpus_ppl(model),
        )  # fmt: skip
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for ratio, loss in [(r, loss) for r in RATIOS for loss in ("lm", "distill") if wanted(f"elitekv{r}:{loss}")]:
        model, _ = bench.convert(ratio, source=source)
        teacher = None
        if loss == "distill":
            if args.teacher == "uptrained" and uptrained_original is None:
                uptrained_original = source  # the adapted original this row started from
            teacher = copy.deepcopy(uptrained_original if uptrained_original is not None else bench.base)
        # with --convert-from uptrained the row's tokens are the source's plus its own: the same budget
        used = source_tokens + train(model, tokens - source_tokens, teacher, latent_lr_ratio=args.latent_lr_ratio)
        tags = [args.variant]
        if source is not None:
            tags.append(f"from=uptrained({source_tokens / 1e6:.1f}M)")
        if loss == "distill" and uptrained_original is not None:
            tags.append("teacher=uptrained")
        labels = {"variant": ",".join(t for t in tags if t)} if any(tags) else {}
        add(
            method="elitekv", kv_ratio=ratio, stage=f"uptrained_{loss}", train_tokens=used, ppl=ppl(model),
            **labels, **bench.corpus_ppl(model),
        )  # fmt: skip
        if args.save_dir and ratio == 0.25 and loss == "lm":  # the saved folder, loaded back, evaluated again
            out = Path(args.save_dir) / "elitekv-0.25-lm"
            model.save_pretrained(out)
            bench.tokenizer.save_pretrained(out)
            add(
                method="elitekv", kv_ratio=ratio, stage="uptrained_lm", variant="reloaded_automodel",
                train_tokens=used, ppl=ppl(bench.load_saved(out)),
            )  # fmt: skip
        del model, teacher
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def run_parts(args: argparse.Namespace) -> None:
    """Measure the rows of ``args.part`` and add them to the state file."""
    bench = Bench(args)
    state, data = bench.state, bench.data
    state["eval_tokens"] = int(data["eval"].numel())
    epochs = args.train_tokens / data["train"].numel()
    if bench.default_mix:
        state["train_split_tokens"] = int(data["train"].numel())
        state["notes"]["epochs"] = round(epochs, 2)
    else:  # rows of this mix carry its label in `variant`; the note says what the mix held
        from elitekv_demo.job import describe_mix

        state["notes"][f"mix {mix_label(bench.corpora)}"] = (
            f"{data['train'].numel():,} train tokens ({describe_mix(data)}), "
            f"{epochs:.2f} epochs of {args.train_tokens:,}"
        )
    if args.part == "training_free":
        training_free_part(bench)
    else:
        uptrain_part(bench)
    state["notes"].update(train_tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, seq_len=args.seq_len)
    state["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    save_state(bench.state_path, state)
