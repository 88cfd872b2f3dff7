"""Perplexity of causal language models on fixed token windows."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


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
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    n = windows.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="perplexity", unit="win", leave=False)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                ids = windows[start : start + batch_size].to(dev, dtype=torch.long)  # [B, T]
                logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
                pred = logits[:, :-1, :].float()  # [B, T-1, V]
                target = ids[:, 1:]  # [B, T-1]
                nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
                total += nll.double().cpu()
                count += target.numel()
                if bar is not None:
                    bar.update(ids.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return float(total), count


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
