"""A low-rank view of the Hessian, computed once per model (Schioppa et al. 2022, "Scaling Up Influence
Functions": Arnoldi iteration, which for a symmetric Hessian is Lanczos), so that every later s_test is a few
matrix-vector products:

    H ≈ V diag(μ) Vᵀ  (the r eigenpairs of largest |μ|)
    s_test = (H_r + λI)⁻¹ v = V diag(1 / (μ + λ)) Vᵀ v + (v - V Vᵀ v) / λ

Exact when r equals the number of parameters; otherwise the directions outside the top-r eigenspace are treated
as flat (curvature 0, damped by λ)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .lanczos import lanczos


def low_rank_hessian(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, rank: int, *,
                     iterations: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` eigenpairs of largest magnitude, from ``iterations`` (default ``2·rank``) Lanczos steps.

    Returns:
        ``(values (r,) float64, vectors (r, p))``, ordered by decreasing magnitude.
    """
    if rank < 1:
        raise ValueError(f"The Hessian rank must be >= 1, got {rank}.")
    steps = min(num_params, iterations if iterations is not None else 2 * rank)
    values, vectors = lanczos(hvp, num_params, steps, dtype=dtype, device=device, seed=seed)
    keep = torch.argsort(values.abs(), descending=True)[:rank]
    return values[keep], vectors[keep]


def solve_low_rank(values: torch.Tensor, vectors: torch.Tensor, v: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
    """``(H_r + λI)⁻¹ v`` for ``v`` of shape ``(p,)`` or ``(m, p)`` (see the module docstring).

    Raises:
        ValueError: if ``λ ≤ 0`` or some ``μ + λ ≤ 0`` (H + λI is not positive definite), with the damping to use.
    """
    if not lam > 0:
        raise ValueError(f"influence_solver='arnoldi' needs λ = damping × scale > 0 (the directions outside the "
                         f"top-r eigenspace are divided by λ); got λ = {lam:g}. Raise influence_damping.")
    lo = float(values.min())
    if lo + lam <= 0:
        raise ValueError(
            f"H + λI is not positive definite: the Hessian has an eigenvalue of about {lo:.4g} and λ = {lam:.4g} "
            "(influence_damping × influence_scale). The Hessian is indefinite (the model is not at a minimum); "
            f"raise influence_damping so that λ > {-lo:.4g}.")
    squeeze = v.dim() == 1
    v = v.unsqueeze(0) if squeeze else v
    basis = vectors.to(v.dtype)
    coeffs = v @ basis.T  # (m, r)
    # V diag(1/(μ+λ)) Vᵀv + (v - V Vᵀv)/λ  =  v/λ - V diag(μ / (λ(μ+λ))) Vᵀv: two passes over V, not three
    # (V is r x p: at millions of parameters the solve is bound by reading it)
    weights = (values / (lam * (values + lam))).to(device=v.device, dtype=v.dtype)  # values live on the CPU
    s = torch.addmm(v, coeffs * weights, basis, beta=1.0 / lam, alpha=-1.0)
    info = {"arnoldi_rank": int(values.numel()), "hessian_max_eigenvalue": float(values.max()),
            "hessian_min_ritz_value": lo}
    return (s[0] if squeeze else s), info
