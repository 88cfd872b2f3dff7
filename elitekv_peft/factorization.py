"""Low-rank factorization of projection weights (J-LRD / S-LRD).

A linear map ``y = x M`` with ``M`` of shape ``[d_in, d_out]`` (the transpose of an ``nn.Linear`` weight) is
replaced by ``y ~ (x A) B`` with ``A [d_in, k]`` (down) and ``B [k, d_out]`` (up):

* ``"weight"``: plain SVD of ``M``: ``A = U_k``, ``B = S_k Vh_k`` (what the public EliteKV code does).
* ``"activation"``: minimise ``||X M - X A B||_F`` over calibration inputs ``X``. With ``X^T X = L L^T``
  (Cholesky, damped) and the SVD ``L^T M = U S Vh``: ``A = L^{-T} U_k``, ``B = S_k Vh_k``. This is the best rank-k
  approximation of the *outputs* on the calibration data, not of the weight.

All arithmetic is in float64.
"""

from __future__ import annotations

import torch

INITS = ("activation", "weight")


def factorize(
    matrix: torch.Tensor, rank: int, gram: torch.Tensor | None = None, init: str = "activation"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``matrix [d_in, d_out]`` into ``down [d_in, k]`` and ``up [k, d_out]``, ``k = rank``.

    Args:
        matrix: the map to approximate, ``[d_in, d_out]``.
        rank: ``k``. A rank above ``min(d_in, d_out)`` pads with zero columns (exact factorization).
        gram: ``X^T X`` of the calibration inputs ``[d_in, d_in]``, needed for ``init="activation"``.
        init: ``"activation"`` or ``"weight"``.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    M = matrix.double()
    d_in, d_out = M.shape
    if init == "weight":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        down, up = U, S[:, None] * Vh
    else:
        if gram is None:
            raise ValueError("init='activation' needs the Gram matrix X^T X of the calibration inputs")
        L = _damped_cholesky(gram.double())
        U, S, Vh = torch.linalg.svd(L.T @ M, full_matrices=False)
        down = torch.linalg.solve_triangular(L.T, U, upper=True)  # L^{-T} U
        up = S[:, None] * Vh
    k = min(rank, down.shape[1])
    down, up = down[:, :k], up[:k]
    if rank > k:  # pad: extra latent dims that carry nothing
        down = torch.cat((down, down.new_zeros(d_in, rank - k)), dim=1)
        up = torch.cat((up, up.new_zeros(rank - k, d_out)), dim=0)
    return down, up


def _damped_cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Cholesky factor ``L`` of ``gram + eps I``, raising ``eps`` until it succeeds."""
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for exponent in range(-8, 0):
        L, info = torch.linalg.cholesky_ex(gram + (10.0**exponent) * scale * eye)
        if int(info) == 0:
            return L
    raise RuntimeError("calibration Gram matrix is not positive definite even with damping; use more data")


def relative_output_error(matrix: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (M - A B)||_F / ||X M||_F`` computed from the Gram matrix ``X^T X``."""
    M = matrix.double()
    R = M - down.double() @ up.double()
    num = torch.trace(R.T @ gram.double() @ R).clamp_min(0)
    den = torch.trace(M.T @ gram.double() @ M).clamp_min(1e-30)
    return float((num / den).sqrt())
