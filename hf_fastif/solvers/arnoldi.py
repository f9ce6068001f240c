"""A low-rank view of the Hessian, computed once per model (Schioppa et al. 2022, "Scaling Up Influence
Functions": Arnoldi iteration, which for a symmetric Hessian is Lanczos), so that every later s_test is a few
matrix-vector products:

    H ≈ V diag(μ) Vᵀ + C  (the r eigenpairs of largest |μ| of the data term, C the L2 term's diagonal 2·wd·M)
    s_test = (V diag(μ) Vᵀ + C + λI)⁻¹ v

With C = c·I (no L2 term, or one on every parameter) that is ``V diag(1/(μ+c+λ)) Vᵀ v + (v - V Vᵀ v)/(c+λ)``;
otherwise the Woodbury identity with D = C + λI:
``D⁻¹v - D⁻¹ V (I + diag(μ) Vᵀ D⁻¹ V)⁻¹ diag(μ) Vᵀ D⁻¹ v``. Exact when r reaches the data Hessian's rank;
otherwise the data term's directions outside the top-r eigenspace are treated as flat (only C and λ there)."""

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


def solve_low_rank(values: torch.Tensor, vectors: torch.Tensor, v: torch.Tensor, lam: float,
                   curvature: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``(V diag(μ) Vᵀ + C + λI)⁻¹ v`` for ``v`` of shape ``(p,)`` or ``(m, p)`` (see the module docstring).

    Args:
        values, vectors: the low-rank term's eigenpairs, ``(r,)`` and orthonormal rows ``(r, p)``.
        curvature: ``C``'s diagonal ``(p,)``, >= 0 (the L2 term's ``2·wd`` on the decayed parameters); None: 0.
    Raises:
        ValueError: if ``λ ≤ 0`` or the matrix is not positive definite, with the damping to use.
    """
    if not lam > 0:
        raise ValueError(f"influence_solver='arnoldi' needs λ = damping × scale > 0 (the directions outside the "
                         f"top-r eigenspace are divided by λ); got λ = {lam:g}. Raise influence_damping.")
    squeeze = v.dim() == 1
    v = v.unsqueeze(0) if squeeze else v
    basis = vectors.to(v.dtype)
    mu = values.to(device=v.device, dtype=torch.float64)  # values live on the CPU (Lanczos' tridiagonal solve)
    lo = float(values.min())
    shift = 0.0 if curvature is None else float(curvature.min())
    info = {"arnoldi_rank": int(values.numel()), "hessian_max_eigenvalue": float(values.max()) + shift,
            "hessian_min_ritz_value": lo + shift}
    if curvature is None or float(curvature.max()) == shift:  # C = c·I: one damping for every direction
        damp = lam + shift
        _refuse_indefinite(lo + damp, lo + shift, lam)
        coeffs = v @ basis.T  # (m, r)
        # V diag(1/(μ+d)) Vᵀv + (v - V Vᵀv)/d  =  v/d - V diag(μ / (d(μ+d))) Vᵀv: two passes over V, not three
        # (V is r x p: at millions of parameters the solve is bound by reading it)
        weights = (mu / (damp * (mu + damp))).to(v.dtype)
        s = torch.addmm(v, coeffs * weights, basis, beta=1.0 / damp, alpha=-1.0)
        return (s[0] if squeeze else s), info
    inverse = 1.0 / (curvature.to(device=v.device, dtype=v.dtype) + lam)  # D⁻¹, D = C + λI
    scaled = basis * inverse  # V D⁻¹ (r, p)
    gram = (scaled.double() @ basis.double().T)  # V D⁻¹ Vᵀ, symmetric positive semi-definite (r, r)
    # D + Vᵀ diag(μ) V is positive definite iff I + G^½ diag(μ) G^½ is (congruence by D^-½)
    g_values, g_vectors = torch.linalg.eigh(gram)
    root = g_vectors @ torch.diag(g_values.clamp_min(0.0).sqrt()) @ g_vectors.T
    smallest = float(torch.linalg.eigvalsh(torch.eye(len(mu), dtype=torch.float64, device=v.device)
                                           + root @ torch.diag(mu) @ root)[0])
    _refuse_indefinite(smallest, lo + shift, lam)
    coeffs = (v @ scaled.T).double()  # V D⁻¹ v (m, r)
    kernel = torch.eye(len(mu), dtype=torch.float64, device=v.device) + mu[:, None] * gram  # I + diag(μ) G
    y = torch.linalg.solve(kernel, mu[:, None] * coeffs.T).T.to(v.dtype)  # (m, r)
    s = v * inverse - y @ scaled
    return (s[0] if squeeze else s), info


def _refuse_indefinite(margin: float, lowest: float, lam: float) -> None:
    """Raise unless ``margin`` (the smallest eigenvalue, up to a positive factor, of the damped low-rank
    Hessian) is positive; ``lowest``: the Hessian's smallest known eigenvalue, for the message."""
    if margin <= 0:
        raise ValueError(
            f"H + λI is not positive definite: the Hessian has an eigenvalue of about {lowest:.4g} and λ = {lam:.4g} "
            "(influence_damping × influence_scale). The Hessian is indefinite (the model is not at a minimum); "
            f"raise influence_damping so that λ > {-lowest:.4g}.")
