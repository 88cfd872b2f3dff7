"""The report of `benchmarks/quality.py`: its state file of rows, ``quality.{json,md,png}`` and the target checks.

A row is ``{"method", "kv_ratio", "stage", "train_tokens", "ppl"}`` plus, for rows of a non-default setting, a
``variant`` label (comma-separated parts such as ``train=pydocs+linuxdoc``, ``teacher=uptrained``); rows without a
variant make the main table, the others the ablations.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"
METHOD_COLORS = {
    "original": "black",
    "elitekv": "C0",
    "gqa": "C1",
    "kv_latent": "C2",
    "lorc": "C3",
}  # at RATIOS, training-free and uptrained (LM loss); gqa at feasible ratios


def load_state(path: Path) -> dict[str, Any]:
    """The rows and notes measured so far (empty when ``path`` does not exist yet)."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": [], "notes": {}}


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def add_row(state: dict[str, Any], path: Path, row: dict[str, Any]) -> None:
    """Record ``row`` (replacing the row of the same method, ratio, stage and variant), save and print it."""
    key = (row["method"], row["kv_ratio"], row["stage"], row.get("variant", ""))
    state["rows"] = [r for r in state["rows"] if (r["method"], r["kv_ratio"], r["stage"], r.get("variant", "")) != key]
    state["rows"].append(row)
    save_state(path, state)
    print(json.dumps(row), flush=True)


def report(state_path: Path, out_dir: Path, command: str, device: str | None = None, date: str | None = None) -> None:
    """Write ``quality.json``, ``quality.md`` and ``quality.png`` of the state file into ``out_dir``."""
    state = load_state(state_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_rows = [r for r in state["rows"] if not r.get("variant")]
    result = {
        "model": MODEL_NAME,
        "eval_tokens": state.get("eval_tokens"),
        "device": device or state.get("device"),
        "date": date or dt.date.today().isoformat(),
        "command": command,
        "notes": state.get("notes", {}),
        "rows": sorted(main_rows, key=lambda r: (r["method"], -r["kv_ratio"], r["stage"])),
        "ablations": [r for r in state["rows"] if r.get("variant")],
    }
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Quality: held-out Python-docs perplexity vs KV cache",
        "",
        f"Model: {result['model']}. Eval: {result['eval_tokens']:,} held-out tokens (512-token windows, files never "
        f"trained on). Device: {result['device']}. Date: {result['date']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| method | kv_ratio | stage | train tokens | perplexity |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['kv_ratio']:.3g} | {r['stage']} | {r['train_tokens']:,} | {r['ppl']:.2f} |")
    if result["ablations"]:
        lines += [
            "",
            "Ablations (same eval windows):",
            "",
            "| method | kv_ratio | stage | variant | perplexity |",
            "|---|---|---|---|---|",
        ]
        for r in result["ablations"]:
            variant = r["variant"] + (f" (on {r['device']})" if r.get("device") else "")
            lines.append(f"| {r['method']} | {r['kv_ratio']:.3g} | {r['stage']} | {variant} | {r['ppl']:.2f} |")
    by_corpus = [r for r in state["rows"] if r.get("ppl_by_corpus")]
    if by_corpus:
        lines += ["", "Rows uptrained on a larger mix, perplexity on each extra corpus's own held-out files:", ""]
        for r in by_corpus:
            shown = ", ".join(f"{name} {value:.2f}" for name, value in r["ppl_by_corpus"].items())
            lines.append(f"* {r['method']} {r['kv_ratio']:.3g} {r['stage']} ({r['variant']}): {shown}")
    lines += ["", "Targets of issue 3 (uptrained, same tokens and training set; baselines with LM loss):", ""]
    lines += target_checks(state["rows"])
    notes = result["notes"]
    if notes:
        lines += ["", "Notes: " + ", ".join(f"{k}={v}" for k, v in notes.items())]
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    plot(result, out_dir / "quality.png")
    print("\n".join(lines))


def _training_set(row: dict[str, Any]) -> str:
    """The part of a row's variant that names its training set (``train=...``), else the default (Python docs)."""
    parts = [p for p in (row.get("variant") or "").split(",") if p.startswith("train=")]
    return parts[0] if parts else "train=pydocs"


# variant parts that only say how many tokens of which set a row trained on (EliteKV rows may also name their
# teacher, distillation weights or starting point: ways of spending the same budget)
SAME_BUDGET = ("train=", "tokens=", "mix")
DISTILL_BUDGET = (*SAME_BUDGET, "from=", "teacher=", "distill_", "hidden=")  # distillation rows: also the loss's terms


def target_checks(rows: list[dict[str, Any]]) -> list[str]:
    """One line per comparison the issue asks for, between rows trained on the same tokens of the same set.

    EliteKV 25% against the original (target: at most 5% higher perplexity), EliteKV 12.5% against GQA (target: no
    worse than GQA at 50%; SmolLM2's 3 KV heads only allow GQA at 33%, which is compared instead and said so).
    The baselines are their LM-loss rows; EliteKV rows of either loss count (distillation is a way of uptraining),
    each with its own line. Rows with other variants (lr, rope_chunks, ...) are not paired.
    """

    def key(r: dict[str, Any]) -> tuple[int, str]:
        return r["train_tokens"], _training_set(r)

    def plain(r: dict[str, Any], allowed: tuple[str, ...] = SAME_BUDGET) -> bool:
        parts = [part for part in (r.get("variant") or "").split(",") if part]
        return all(part.startswith(allowed) for part in parts)

    baselines = {
        (r["method"], r["kv_ratio"], key(r)): r
        for r in rows
        if r["method"] in ("original", "gqa") and r["stage"] == "uptrained_lm" and plain(r)
    }
    ours = [
        r
        for r in rows
        if r["method"] == "elitekv"
        and r["kv_ratio"] in (0.25, 0.125)
        and (
            (r["stage"] == "uptrained_lm" and plain(r, (*SAME_BUDGET, "from=")))
            or (r["stage"] == "uptrained_distill" and plain(r, DISTILL_BUDGET))
        )
    ]
    lines = []
    for r in sorted(ours, key=lambda r: (key(r), -r["kv_ratio"], r["stage"] != "uptrained_lm", r.get("variant") or "")):
        tokens, train = key(r)
        how = r["stage"].removeprefix("uptrained_") + (f", {r['variant']}" if r.get("variant") else "")
        how += f", on {r['device']}" if r.get("device") else ""
        if r["kv_ratio"] == 0.25 and ("original", 1.0, key(r)) in baselines:
            base = baselines[("original", 1.0, key(r))]["ppl"]
            gap = r["ppl"] / base - 1
            verdict = "reached" if gap <= 0.05 else "NOT reached"
            lines.append(
                f"* {tokens:,} tokens, {train}: EliteKV 25% ({how}) {r['ppl']:.2f} vs original {base:.2f}: "
                f"{gap:+.1%} (target <= +5%): {verdict}"
            )
        if r["kv_ratio"] == 0.125:
            for gqa_ratio in (0.5, 0.3333):
                if ("gqa", gqa_ratio, key(r)) in baselines:
                    base = baselines[("gqa", gqa_ratio, key(r))]["ppl"]
                    verdict = "reached" if r["ppl"] <= base else "NOT reached"
                    note = "" if gqa_ratio == 0.5 else " (GQA at 33%: 50% is not possible with 3 KV heads)"
                    lines.append(
                        f"* {tokens:,} tokens, {train}: EliteKV 12.5% ({how}) {r['ppl']:.2f} vs GQA {base:.2f}{note}: "
                        f"{verdict}"
                    )
                    break
    return lines or ["* no pair of rows trained on the same tokens"]


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity vs cache ratio, one line per method: training-free (left) and uptrained (right) panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("training-free", ("as_is", "training_free")), ("uptrained", ("uptrained_lm", "uptrained_distill")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (title, stages) in zip(axes, panels, strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            if r["stage"] not in stages:
                continue
            label = r["method"] + (" (distillation)" if r["stage"] == "uptrained_distill" else "")
            series.setdefault(label, []).append((r["kv_ratio"], r["ppl"]))
        for label, points in sorted(series.items()):
            points.sort()
            xs, ys = zip(*points, strict=True)
            method = label.split(" ")[0]
            ax.plot(
                xs,
                ys,
                "--" if "distillation" in label else "-",
                color=METHOD_COLORS.get(method),
                marker="*" if method == "original" else "o",
                markersize=10 if method == "original" else 5,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV cache size (fraction of original)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out perplexity (log)")
    fig.suptitle("SmolLM2-135M on Python docs: quality vs cache, per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
