"""Perplexity of causal language models on fixed token windows, and top-1 agreement with a reference model.

:class:`RetentionReference` holds the original model's perplexity and argmax next tokens on each evaluation set
(computed once) and measures a converted model against them: how much of the original survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .progress import progress_bar


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def token_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """Sum the next-token negative log-likelihood over all predicted tokens of all windows.

    Each window ``[T]`` is one independent sequence: positions ``0..T-2`` predict tokens
    ``1..T-1`` (``T - 1`` predictions per window, no padding, no attention mask).  The model is
    called as ``model(input_ids=ids, use_cache=False)`` and must return an object with
    ``.logits`` ``[B, T, V]`` (any Hugging Face causal LM, also wrapped in a ``PeftModel``).
    Runs under ``torch.no_grad()`` in eval mode (the previous training mode is restored); logits
    are cast to float32 for the cross-entropy and the sum is accumulated in float64.

    Args:
        model: the causal LM.
        windows: LongTensor ``[N, T]`` of token ids, ``T >= 2``.
        batch_size: windows per forward pass.
        device: where to run; default the device of the model's first parameter.
        progress: show a tqdm bar.

    Returns:
        ``(total_nll, n_predicted)`` with ``n_predicted = N * (T - 1)``.
    """
    scores = score_windows(model, windows, batch_size=batch_size, device=device, progress=progress, desc="perplexity")
    return scores.total_nll, scores.count


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity ``exp(mean next-token NLL)`` over all predicted tokens of windows ``[N, T]``.

    See :func:`token_nll` for how the model is called; every window contributes ``T - 1``
    predictions with equal weight.
    """
    total, count = token_nll(model, windows, batch_size=batch_size, device=device, progress=progress)
    if count == 0:
        raise ValueError("no windows to evaluate")
    return math.exp(total / count)


def sharded_perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """`perplexity` over windows ``[N, T]`` split across the processes of a distributed run (DDP, FSDP).

    Every process must call it: each evaluates ``ceil(N / processes)`` windows (the last shard is padded with
    windows that are run but not counted), so all processes make the same number of forward calls, as FSDP's
    collective forward needs; the NLL sums are then added up across processes. With one process it equals
    `perplexity`.
    """
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    n, procs, rank = windows.shape[0], state.num_processes, state.process_index
    if n == 0:
        raise ValueError("no windows to evaluate")
    per = math.ceil(n / procs)
    own = windows[rank * per : (rank + 1) * per]
    padded = torch.cat([own, windows[: per - own.shape[0]]]) if own.shape[0] < per else own
    show = progress and state.is_main_process
    nll_own, count = token_nll(model, padded[: own.shape[0]], batch_size, progress=show) if own.shape[0] else (0.0, 0)
    if padded.shape[0] > own.shape[0]:  # the same number of forward calls on every process
        extra = math.ceil(per / batch_size) - math.ceil(own.shape[0] / batch_size)
        if extra > 0:
            token_nll(model, padded[own.shape[0] :][: extra * batch_size], batch_size, progress=False)
    totals = torch.tensor([nll_own, float(count)], dtype=torch.float64, device=state.device)
    if procs > 1:
        totals = reduce(totals, reduction="sum")
    return math.exp(float(totals[0]) / float(totals[1]))


@dataclass
class WindowScores:
    """What one pass over windows ``[N, T]`` measured (see :func:`score_windows`).

    Attributes:
        total_nll: summed next-token negative log-likelihood (nats) over ``count`` predictions.
        count: predictions scored, ``N * (T - 1)``.
        predictions: int64 ``[N, T - 1]`` on the CPU, the argmax next token at each position (when asked for).
        matches: positions whose argmax equals the reference's (when a reference was given).
    """

    total_nll: float
    count: int
    predictions: torch.Tensor | None = None
    matches: int | None = None

    @property
    def perplexity(self) -> float:
        """``exp(total_nll / count)``."""
        if self.count == 0:
            raise ValueError("no windows to evaluate")
        return math.exp(self.total_nll / self.count)

    @property
    def agreement(self) -> float:
        """Top-1 agreement with the reference: ``matches / count`` in ``[0, 1]``."""
        if self.matches is None:
            raise ValueError("no reference predictions were given to score_windows")
        return self.matches / self.count if self.count else float("nan")


def score_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    keep_predictions: bool = False,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> WindowScores:
    """One forward pass per batch of windows ``[N, T]``: summed NLL, argmax predictions, agreement with a reference.

    Each window is an independent sequence; positions ``0..T-2`` predict tokens ``1..T-1`` (:func:`token_nll`
    and :func:`perplexity` are built on it). The argmax is taken over the logits in float32 (ties: lowest token id).

    Args:
        model: causal LM returning ``.logits`` ``[B, T, V]`` for ``model(input_ids=ids, use_cache=False)``.
        windows: LongTensor ``[N, T]``, ``T >= 2``.
        reference: int ``[N, T - 1]``, another model's argmax on the same windows (e.g. the original's, from
            ``keep_predictions=True``); ``matches`` counts the positions where this model's argmax equals it.
        keep_predictions: return this model's argmax ``[N, T - 1]`` (int64, CPU).
        batch_size: windows per forward pass.
        device: where to run; default the device of the model's first parameter.
        progress: show a tqdm bar named ``desc``.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
    n, t = windows.shape
    if reference is not None and tuple(reference.shape) != (n, t - 1):
        raise ValueError(
            f"reference predictions must be [N, T-1] = {(n, t - 1)} for windows {tuple(windows.shape)}, got "
            f"{tuple(reference.shape)}: compute them on the same windows (score_windows(..., keep_predictions=True))"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    matches = 0
    kept: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    bar = progress_bar(total=n, desc=desc, unit="win", leave=False, enabled=progress)  # disabled: a no-op
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                ids = windows[start : start + batch_size].to(dev, dtype=torch.long)  # [B, T]
                pred = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()  # [B, T-1, V]
                target = ids[:, 1:]  # [B, T-1]
                nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
                total += nll.double().cpu()
                top1 = pred.argmax(dim=-1)  # [B, T-1]
                if reference is not None:
                    ref = reference[start : start + ids.shape[0]].to(dev, dtype=torch.long)  # [B, T-1]
                    matches += int((top1 == ref).sum())
                if keep_predictions:
                    kept.append(top1.cpu())
                bar.update(ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    predictions = torch.cat(kept) if keep_predictions and kept else None
    if keep_predictions and predictions is None:
        predictions = torch.empty(0, t - 1, dtype=torch.long)
    return WindowScores(float(total), n * (t - 1), predictions, matches if reference is not None else None)


def top1_agreement(
    model: torch.nn.Module, windows: torch.Tensor, reference: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> float:
    """Fraction of the ``N * (T - 1)`` positions of windows ``[N, T]`` where the model's argmax next token equals
    ``reference`` ``[N, T - 1]`` (see :func:`score_windows`)."""
    return score_windows(model, windows, reference=reference, batch_size=batch_size, progress=progress).agreement


class RetentionReference:
    """The original model's perplexity and argmax predictions on each evaluation set, computed once and reused.

    Args:
        original: the model before conversion (or any reference model).
        eval_sets: ``{name: LongTensor [N, T]}`` (e.g. :func:`elitekv_demo.corpus_sets.retention_eval_sets`).
        batch_size: windows per forward pass.
        progress: tqdm bars.

    Attributes:
        ppl: ``{name: float}``, the original's perplexity.
        predictions: ``{name: int64 [N, T - 1]}`` (CPU), the original's argmax next tokens.
    """

    def __init__(
        self,
        original: torch.nn.Module,
        eval_sets: dict[str, torch.Tensor],
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        self.eval_sets = dict(eval_sets)
        self.batch_size = batch_size
        self.progress = progress
        self.ppl: dict[str, float] = {}
        self.predictions: dict[str, torch.Tensor] = {}
        for name, windows in self.eval_sets.items():
            scores = score_windows(
                original, windows, keep_predictions=True, batch_size=batch_size, progress=progress, desc=name
            )
            self.ppl[name] = scores.perplexity
            self.predictions[name] = scores.predictions  # type: ignore[assignment]

    def measure(self, model: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """``(ppl, top1_agreement)`` of ``model``, each ``{name: float}`` over the same sets (same order)."""
        ppl: dict[str, float] = {}
        agreement: dict[str, float] = {}
        for name, windows in self.eval_sets.items():
            scores = score_windows(
                model,
                windows,
                reference=self.predictions[name],
                batch_size=self.batch_size,
                progress=self.progress,
                desc=name,
            )
            ppl[name], agreement[name] = scores.perplexity, scores.agreement
        return ppl, agreement
