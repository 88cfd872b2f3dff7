"""k_norm designs (issue 20): the error of compressed keys before any training, cached key scale vs alternatives.

Families such as Qwen3 and OLMo2 normalise each key (head, or the whole projection) before RoPE:
``k* = w * k * s`` with ``s = rsqrt(mean(k^2) + eps)``, ``k = x W_k``. A linear latent cannot give ``s``. Designs
compared, each factoring the key dims that come from a latent (activation-aware SVD on calibration inputs):

* ``cached_scale`` (the design taken for EliteKV, `elitekv_peft.modeling.key_norm`): the latent rebuilds the
  pre-norm key with ``w`` folded in, and the exact ``s`` (computed from the full key when the token is written)
  is cached: ``n_s`` values per token (one per key/value head for per-head norms, one for a whole-projection
  norm) taken from the latent's budget, so it runs at rank ``k - n_s`` where the others have ``k``;
  ``cached_scale_same_rank`` is the same at rank ``k`` (``k + n_s`` values per token), to separate the scale's
  effect from its cache cost;
* ``normalised_fit``: no scale; the latent is fitted to the normalised keys directly (least squares on calibration,
  then the best rank-``k`` map);
* ``fold_weight``: no scale; ``w`` and a constant (the calibration RMS of ``s`` per head) folded into the factored
  map;
* ``read_norm`` (whole-key layout only; the design taken for LoRC): the rebuilt pre-norm key is normalised when
  read, no extra cache. EliteKV cannot: its rotated chunks are cached after the norm.

Layouts: ``whole_key`` (LoRC: every key dim from the latent, all rotated) and ``elitekv`` (``r`` rotary chunks per
head cached exactly after the norm; only the NoPE dims come from the latent, unrotated). Errors are relative
Frobenius norms against the exact normalised keys (``key_error``) and against the exact causal attention scores
of the same layout (``score_error``: RoPE applied to the rotated dims, so partial RoPE itself is not counted), on the
calibration windows the maps were fitted on and on held-out windows. Only the keys are compressed here; values
do not see ``k_norm``.

Models (no Qwen3 or OLMo2 checkpoint is available offline):

* ``tiny-qwen3`` / ``tiny-olmo2``: tiny random models from transformers' `Qwen3Config` / `Olmo2Config` (the test
  models of tests/test_key_norm_families.py) on random token ids: a check of the mechanics, not of quality;
* ``smollm2-head`` / ``smollm2-all``: SmolLM2-135M's real attention inputs (Python docs text) and real ``W_q`` /
  ``W_k``, with an RMSNorm of weight 1 added to its queries and keys, per head (Qwen3-like) or over all heads
  (OLMo2-like). SmolLM2 was not trained with these norms: this measures how the designs handle real key
  distributions whose norms vary per token, not a trained Qwen3.

Usage (CPU, several minutes)::

    python benchmarks/key_norm_error.py                 # writes benchmarks/results/key_norm_error.{json,md}
    python benchmarks/key_norm_error.py --quick         # tiny models only, printed, nothing written
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elitekv_peft.calibration import collect_attention_inputs  # noqa: E402
from elitekv_peft.factorization import factorize  # noqa: E402
from elitekv_peft.modeling.attention_base import rotate_half  # noqa: E402
from elitekv_peft.modeling.key_norm import normalise, rms_scale  # noqa: E402
from elitekv_peft.rope_selection import norm_chunks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DESIGNS = ("cached_scale", "cached_scale_same_rank", "normalised_fit", "fold_weight", "read_norm")


class Layer:
    """One attention layer's case: inputs ``x [N, T, d]`` (fit) and ``held [N', T, d]``, ``W_q [H*D, d]``,
    ``W_k [G*D, d]``, the norms' weights ``[H*D]`` / ``[G*D]``, group and epsilon, rotary tables ``[T, D]``."""

    def __init__(self, x, held, q_w, k_w, q_norm, k_norm, group, eps, heads, kv_heads, cos, sin):
        self.x, self.held, self.q_w, self.k_w = x.double(), held.double(), q_w.double(), k_w.double()
        self.q_norm, self.k_norm, self.group, self.eps = q_norm.double(), k_norm.double(), group, eps
        self.H, self.G, self.D = heads, kv_heads, q_w.shape[0] // heads
        self.cos, self.sin = cos.double(), sin.double()

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        return normalise(
            (x @ self.q_w.T).view(N, T, self.H, self.D), self.q_norm.view(self.H, self.D), self.group, self.eps
        ).double()

    def pre_keys(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        return (x @ self.k_w.T).view(N, T, self.G, self.D)

    def fit_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Calibration inputs ``[N*T, d]``, their Gram matrix and ``s_bar [G*D]`` (RMS of the key scale per head)."""
        if not hasattr(self, "_fit"):
            x = self.x.reshape(-1, self.x.shape[-1])
            s = rms_scale(self.pre_keys(self.x), self.group, self.eps).double()  # [N, T, G or 1]
            s_bar = s.pow(2).mean(dim=(0, 1)).sqrt().expand(self.G).repeat_interleave(self.D)
            self._fit = (x, x.T @ x, s_bar)
        return self._fit

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(self.pre_keys(x), self.k_norm.view(self.G, self.D), self.group, self.eps).double()


def rotation(layer: Layer, rotated: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[G, T, D]`` rotating only the dims where ``rotated [G, D]`` is True (cos 1, sin 0 else)."""
    cos = torch.where(rotated[:, None, :], layer.cos[None, :T], torch.ones_like(layer.cos[None, :T]))
    sin = torch.where(rotated[:, None, :], layer.sin[None, :T], torch.zeros_like(layer.sin[None, :T]))
    return cos, sin


class Scorer:
    """Relative error of the causal scores ``[N, H, T, T]`` against the exact keys ``k [N, T, G, D]`` of one set of
    windows, with RoPE on the dims where ``rotated [G, D]`` is True; the rotated queries and the exact scores' norm
    are computed once."""

    def __init__(self, layer: Layer, q: torch.Tensor, k: torch.Tensor, rotated: torch.Tensor) -> None:
        T = q.shape[1]
        self.group = layer.H // layer.G
        self.cos, self.sin = rotation(layer, rotated, T)
        cos_q, sin_q = self.cos.repeat_interleave(self.group, 0), self.sin.repeat_interleave(self.group, 0)
        q = q.transpose(1, 2)  # [N, H, T, D]
        self.q = q * cos_q + rotate_half(q) * sin_q
        self.causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.k = k
        self.den = self.norm2(k)

    def norm2(self, keys: torch.Tensor) -> float:
        keys = keys.transpose(1, 2)  # [N, G, T, D]
        keys = (keys * self.cos + rotate_half(keys) * self.sin).repeat_interleave(self.group, 1)
        return float((self.q @ keys.transpose(2, 3))[..., self.causal].pow(2).sum())

    def error(self, k_hat: torch.Tensor) -> float:
        return (self.norm2(k_hat - self.k) / self.den) ** 0.5


def design_keys(layer: Layer, design: str, rank: int, rows: torch.Tensor, n_s: int) -> tuple[object, int] | None:
    """A function ``x -> keys [N, T, G, D]`` for ``design`` with the ``rows`` (of ``[G*D]``) from a rank-``rank``
    latent (the others exact), and the cached values it spends per token; None where the design does not apply."""
    G, D = layer.G, layer.D
    x, gram, s_bar = layer.fit_statistics()
    w = layer.k_norm
    whole = rows.numel() == G * D
    if design == "read_norm" and not whole:
        return None
    if design.startswith("cached_scale"):
        latent_rank = rank - n_s if design == "cached_scale" else rank
        if latent_rank < 1:
            return None
        col = (w * s_bar)[rows]
        down, up = factorize(layer.k_w[rows].T * col, latent_rank, gram, "activation")
        up = up / s_bar[rows]

        def build(z: torch.Tensor) -> torch.Tensor:
            scale = rms_scale(layer.pre_keys(z), layer.group, layer.eps).double()  # [N, T, G or 1]
            scale = scale.expand(*z.shape[:2], G).repeat_interleave(D, dim=-1)  # [N, T, G*D]
            return (z @ down @ up) * scale[..., rows]

        return build, latent_rank + n_s
    if design == "normalised_fit":
        target = layer.keys(layer.x).reshape(x.shape[0], -1)[:, rows]
        damp = 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        fit = torch.linalg.solve(gram + damp, x.T @ target)
        down, up = factorize(fit, rank, gram, "activation")
        return (lambda z: z @ down @ up), rank
    if design == "fold_weight":
        down, up = factorize(layer.k_w[rows].T * (w * s_bar)[rows], rank, gram, "activation")
        return (lambda z: z @ down @ up), rank
    down, up = factorize(layer.k_w.T, rank, gram, "activation")  # read_norm: pre-norm factor, normalised on read

    def read(z: torch.Tensor) -> torch.Tensor:
        pre = (z @ down @ up).view(*z.shape[:2], G, D)
        return normalise(pre, w.view(G, D), layer.group, layer.eps).reshape(*z.shape[:2], -1)

    return read, rank


def measure(layer: Layer, layout: str, rank: int, rope_chunks: int) -> list[dict]:
    """Errors of every design on one layer at key-latent budget ``rank`` (cached key values per token)."""
    G, D = layer.G, layer.D
    n_s = G if layer.group == "head" else 1
    if layout == "whole_key":
        rotated = torch.ones(G, D, dtype=torch.bool)
        rows = torch.arange(G * D)
    else:
        q, k = layer.queries(layer.x), layer.keys(layer.x)
        chunks = norm_chunks(q.transpose(1, 2).float(), k.transpose(1, 2).float(), rope_chunks)  # [G, r]
        rotated = torch.zeros(G, D, dtype=torch.bool)
        for g in range(G):
            rotated[g, chunks[g]] = True
            rotated[g, chunks[g] + D // 2] = True
        rows = torch.nonzero(~rotated.reshape(-1)).flatten()
    sets = {}
    for name, x in (("calibration", layer.x), ("held_out", layer.held)):
        q, k = layer.queries(x), layer.keys(x)
        sets[name] = (x, k, Scorer(layer, q, k, rotated))
    out = []
    for design in DESIGNS:
        made = design_keys(layer, design, rank, rows, n_s)
        if made is None:
            continue
        build, values = made
        row = {"layout": layout, "design": design, "key_latent_values": values}
        for name, (x, k, scorer) in sets.items():
            k_hat = k.clone().reshape(*x.shape[:2], -1)
            k_hat[..., rows] = build(x).to(k_hat.dtype)
            k_hat = k_hat.view_as(k)
            row[f"key_error_{name}"] = float((k_hat - k).norm() / k.norm())
            row[f"score_error_{name}"] = scorer.error(k_hat)
        out.append(row)
    return out


def tiny_layers(family: str, calib: int, held: int, seq_len: int) -> tuple[list[Layer], dict]:
    """The layers of a tiny random Qwen3 / OLMo2 (tests/test_key_norm_families.py) on random ids."""
    from elitekv_peft.methods.key_norm import key_norms_of
    from tests.test_key_norm_families import family_model

    model = family_model(family)
    ids = torch.randint(3, 128, (calib + held, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recorded = collect_attention_inputs(model, model.model.layers, ids, 4, progress=False)
    return layers_of(model, recorded, calib, lambda attn: key_norms_of(attn)), {"tokens": "random ids"}


def smollm2_layers(
    group: str,
    calib: int,
    held: int,
    seq_len: int,
    step: int,
    _kept: dict = {},  # noqa: B006 - one load per run
) -> tuple[list[Layer], dict]:
    """SmolLM2-135M's layers ``0, step, 2*step, ...`` on Python docs windows, with weight-1 RMSNorms on queries and
    keys (``group``). The attention inputs do not depend on ``group`` (the norms are added at measurement time), so
    they are recorded once."""
    from elitekv_demo.job import load_default_data
    from elitekv_demo.real_model import load_smollm2
    from elitekv_peft.methods.key_norm import KeyNorms

    if "model" not in _kept:
        model, tokenizer = load_smollm2(device="cpu")
        data = load_default_data(tokenizer, seq_len, held, calib)
        ids = torch.cat((data["calib"][:calib], data["eval"][:held]))
        with torch.no_grad():
            _kept["recorded"] = collect_attention_inputs(model, model.model.layers, ids, 2, progress=False)
        _kept["model"] = model
    model = _kept["model"]
    H, G = model.config.num_attention_heads, model.config.num_key_value_heads
    D = model.config.hidden_size // H

    def norms(attn):
        return KeyNorms(group, 1e-6, torch.ones(H * D), torch.ones(G * D))

    source = {"tokens": "Python docs windows (elitekv_demo.job.load_default_data)", "layer_step": step}
    return layers_of(model, _kept["recorded"], calib, norms, step), source


def layers_of(model, recorded, calib: int, norms_of, step: int = 1) -> list[Layer]:
    """`Layer` cases of ``model``'s layers ``0, step, ...`` from recorded attention inputs (`Calibration`)."""
    layers = []
    for idx, block in enumerate(model.model.layers):
        if idx % step:
            continue
        attn = block.self_attn
        norms = norms_of(attn)
        x = recorded.inputs[idx]
        layers.append(
            Layer(
                x[:calib],
                x[calib:],
                attn.q_proj.weight.detach(),
                attn.k_proj.weight.detach(),
                norms.query,
                norms.key,
                norms.group,
                norms.eps,
                model.config.num_attention_heads,
                model.config.num_key_value_heads,
                recorded.cos,
                recorded.sin,
            )
        )
        layers[-1].index = idx
    return layers


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over layers per (model, layout, budget, design)."""
    keys = ("model", "layout", "budget", "design")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, items in groups.items():
        entry = dict(zip(keys, key, strict=True))
        for field in ("key_error_calibration", "key_error_held_out", "score_error_calibration", "score_error_held_out"):
            entry[field] = round(sum(i[field] for i in items) / len(items), 4)
        entry["layers"] = len(items)
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    lines = [
        "# k_norm designs: error of compressed keys before training",
        "",
        f"Command: `{result['command']}`; device: {result['device']}; date: {result['date']}; "
        f"{result['seconds']} s. Written by `benchmarks/key_norm_error.py` (its docstring defines every design and "
        "error).",
        "",
        "Relative error of the causal attention scores (mean over layers) when only the keys are compressed, at "
        "the same number of cached key values per token (`budget`: the latent's key share; `cached_scale` spends "
        "`n_s` of it on the scales; `cached_scale_same_rank` spends `n_s` more). `whole_key`: every key dim from "
        "the latent (LoRC's layout); `elitekv`: "
        f"{result['rope_chunks_elitekv']} rotary chunks per head exact, NoPE dims from the latent.",
        "",
        "Taken: `cached_scale` for EliteKV, `read_norm` for LoRC (`elitekv_peft/modeling/key_norm.py`).",
        "",
        "Models: `tiny-*` are tiny random Qwen3 / OLMo2 models on random ids (mechanics only); `smollm2-head` / "
        "`smollm2-all` are SmolLM2-135M's real attention inputs and weights with weight-1 RMSNorms added on queries "
        "and keys per head / over all heads: a synthetic stand-in, NOT a trained Qwen3 or OLMo2. "
        f"SmolLM2: layers {result['smollm2_layers']}, {result['windows']}.",
        "",
        "| model | layout | budget | " + " | ".join(f"`{d}` calib / held-out" for d in DESIGNS) + " |",
        "|---|---|---|" + "---|" * len(DESIGNS),
    ]
    table: dict[tuple, dict] = {}
    for entry in result["summary"]:
        table.setdefault((entry["model"], entry["layout"], entry["budget"]), {})[entry["design"]] = entry
    for (model, layout, budget), designs in table.items():
        cells = []
        for design in DESIGNS:
            e = designs.get(design)
            cells.append("-" if e is None else f"{e['score_error_calibration']:.3f} / {e['score_error_held_out']:.3f}")
        lines.append(f"| {model} | {layout} | {budget} | " + " | ".join(cells) + " |")
    lines += ["", "Key errors (relative Frobenius, held-out) are in the JSON next to this file."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    parser.add_argument("--calib", type=int, default=6, help="calibration windows")
    parser.add_argument("--held-out", type=int, default=6, help="held-out windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layer-step", type=int, default=3, help="SmolLM2: every n-th layer (0, n, 2n, ...)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    start = time.time()
    cases = [
        ("tiny-qwen3", lambda: tiny_layers("qwen3", 8, 8, 64), (8, 16, 32), 4),
        ("tiny-olmo2", lambda: tiny_layers("olmo2", 8, 8, 64), (8, 16, 32), 4),
    ]
    if not args.quick:
        for group in ("head", "all"):
            cases.append(
                (
                    f"smollm2-{group}",
                    lambda g=group: smollm2_layers(g, args.calib, args.held_out, args.seq_len, args.layer_step),
                    (24, 48, 96),
                    4,
                )
            )
    rows, sources = [], {}
    for name, load, budgets, rope_chunks in cases:
        layers, source = load()
        sources[name] = source
        for layer in layers:
            for layout in ("whole_key", "elitekv"):
                for budget in budgets:
                    for row in measure(layer, layout, budget, rope_chunks):
                        rows.append({"model": name, "layer": layer.index, "budget": budget, **row})
            print(f"{name}: layer {layer.index} ({time.time() - start:.0f} s)", flush=True)
        print(f"{name}: {len(layers)} layers done ({time.time() - start:.0f} s)", flush=True)
    result = {
        "command": "python benchmarks/key_norm_error.py " + " ".join(sys.argv[1:]),
        "device": f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "date": dt.date.today().isoformat(),
        "seconds": round(time.time() - start),
        "rope_chunks_elitekv": 4,
        "smollm2_layers": f"0, {args.layer_step}, {2 * args.layer_step}, ... (every {args.layer_step})",
        "windows": f"{args.calib} calibration and {args.held_out} held-out windows of {args.seq_len} tokens",
        "sources": sources,
        "summary": summarise(rows),
        "rows": rows,
    }
    print(markdown(result))
    if args.quick:  # a check only: nothing written
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "key_norm_error.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "key_norm_error.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
