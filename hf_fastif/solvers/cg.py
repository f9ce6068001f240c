"""Conjugate gradients for several right-hand sides at once (one Hessian-vector product per iteration)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)


def default_tolerance(dtype: torch.dtype) -> float:
    """A relative residual CG can reach in ``dtype``: 1e-10 in float64, 1e-5 in float32 (whose rounding error
    alone is ~1e-7 per operation)."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def solve_cg(hvp: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, lam: float, *,
             max_iterations: int = 200, tol: float | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Solve ``(H + λI) x = v`` for each row of ``v`` (``(m, p)`` or ``(p,)``).

    ``hvp`` maps ``(m, p) → (m, p)``; vectors stay in the dtype of ``v`` (float32 or wider) whatever dtype the
    products are computed in. Columns that converge (relative residual ≤ ``tol``, default `default_tolerance`)
    stop moving.

    Raises:
        ValueError: on negative curvature (``pᵀ(H + λI)p ≤ 0``): H + λI is not positive definite; or when CG stops
            unconverged with an iterate that blew up (`_blew_up`: a (nearly) singular H + λI). An iterate that is
            merely unconverged is returned, with a warning.
        FloatingPointError: if ``v`` is not finite.
    """
    squeeze = v.dim() == 1
    b = v.unsqueeze(0) if squeeze else v
    if not bool(torch.isfinite(b).all()):  # a NaN residual never counts as unconverged: x = 0 would come back
        raise FloatingPointError("CG's right-hand side (the test gradients) is not finite.")
    tol = default_tolerance(b.dtype) if tol is None else tol
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    target = (tol * b.norm(dim=1)) ** 2
    active = rs > target
    iterations = 0
    bar = tqdm(total=max_iterations, desc="s_test (cg)", disable=not progress, leave=False)
    while active.any() and iterations < max_iterations:
        ap = hvp(p).to(b.dtype) + lam * p
        curvature = (p * ap).sum(1)
        bad = active & (curvature <= 0)
        if bad.any():
            raise ValueError(
                f"CG met negative curvature (pᵀ(H + λI)p = {curvature[bad].min().item():.4g} at iteration "
                f"{iterations}): H + λI is not positive definite with λ = {lam:.4g}. The Hessian is indefinite "
                "(the model is not at a minimum); raise influence_damping."
            )
        alpha = torch.where(active, rs / curvature.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs > target)
        iterations += 1
        bar.update(1)
    bar.close()
    residual = (rs.sqrt() / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)).max().item()
    if active.any() and _blew_up(x, b, lam, residual):
        raise ValueError(
            f"CG did not converge and its iterate blew up: after {iterations} iterations the relative residual is "
            f"{residual:.3g}, so s_test would be noise. H + λI is (nearly) singular with λ = {lam:.4g}: raise "
            "influence_damping (λ = influence_damping × influence_scale).")
    if active.any():
        logger.warning(f"CG stopped after {iterations} iterations with relative residual {residual:.3g} > tol {tol}; "
                       "raise influence_cg_max_iterations or influence_damping.")
    return (x[0] if squeeze else x), {"cg_iterations": iterations, "cg_relative_residual": residual}


BLOW_UP_RESIDUAL = 1e3
"""With λ = 0, an unconverged relative residual above this is a blow-up: a CG iterate's residual is at most
sqrt(cond(H)) times ‖v‖ in exact arithmetic, so only a Hessian with a condition number above 1e6 (as good as
singular) or rounding gone wrong gets there (the singular case measured 1e11)."""


def _blew_up(x: torch.Tensor, b: torch.Tensor, lam: float, residual: float) -> bool:
    """Whether an unconverged CG iterate is noise rather than an approximation. From x_0 = 0, CG's iterates grow in
    norm towards the solution, whose norm with H positive semi-definite is at most ‖v‖ / λ: an iterate beyond that
    bound (with 1% slack for rounding) came from rounding, not from the system. Without λ there is no such bound;
    a residual above `BLOW_UP_RESIDUAL` is taken instead. A NaN residual is a blow-up too."""
    if not math.isfinite(residual):
        return True
    if lam > 0:
        return bool((x.norm(dim=1) > 1.01 * b.norm(dim=1) / lam).any())
    return residual > BLOW_UP_RESIDUAL
