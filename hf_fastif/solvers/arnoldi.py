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

from .lanczos import lanczos, rounding_floor


def lanczos_steps(num_params: int, rank: int, iterations: int | None = None) -> int:
    """The Lanczos steps (Hessian-vector products) `low_rank_hessian` takes: ``iterations``, default ``2·rank``."""
    return min(num_params, iterations if iterations is not None else 2 * rank)


def low_rank_hessian(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, rank: int, *,
                     iterations: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` eigenpairs of largest magnitude, from ``iterations`` (default ``2·rank``) Lanczos steps, and the
    most negative one the steps found when it is not among them (so ``r`` can be ``rank + 1``): negative curvature
    already measured is kept in the solve, and `LowRankSolve` refuses an indefinite H + λI by it. It was dropped,
    so the solve returned values (0.89 off the exact solve on a LayerNorm-only selection) and reported a positive
    smallest eigenvalue.

    Returns:
        ``(values (r,) float64, vectors (r, p))``, ordered by decreasing magnitude.
    """
    if rank < 1:
        raise ValueError(f"The Hessian rank must be >= 1, got {rank}.")
    steps = lanczos_steps(num_params, rank, iterations)
    values, vectors = lanczos(hvp, num_params, steps, dtype=dtype, device=device, seed=seed)
    keep = torch.argsort(values.abs(), descending=True)[:rank]
    lowest = int(torch.argmin(values))
    noise = rounding_floor(dtype) * float(values.abs().max())  # a zero, as rounding leaves it
    if values[lowest] < -noise and lowest not in keep.tolist():
        keep = torch.cat([keep, torch.tensor([lowest])])
    return values[keep], vectors[keep]


WOODBURY_SLICE = 1 << 20
"""Columns of the r × p block V read (as float64) at a time by the Woodbury solve."""


class LowRankSolve:
    """``v ↦ (V diag(μ) Vᵀ + C + λI)⁻¹ v`` for one λ and C, prepared once at construction: each call reads the
    r × p block V twice, whatever C is.

    Args:
        values, vectors: the low-rank term's eigenpairs, ``(r,)`` and orthonormal rows ``(r, p)``.
        lam: λ > 0.
        curvature: ``C``'s diagonal ``(p,)``, >= 0 (the L2 term's ``2·wd`` on the decayed parameters); None: 0.
        rank: the rank asked of `low_rank_hessian` (its values beyond it: the appended most negative pair), for
            `truncation_factor`; None: every value is of the top rank.
    Raises:
        ValueError: if ``λ ≤ 0`` or the matrix is not positive definite, with the damping to use.
    """

    def __init__(self, values: torch.Tensor, vectors: torch.Tensor, lam: float,
                 curvature: torch.Tensor | None = None, rank: int | None = None):
        if not lam > 0:
            raise ValueError(f"influence_solver='arnoldi' needs λ = damping × scale > 0 (the directions outside the "
                             f"top-r eigenspace are divided by λ); got λ = {lam:g}. Raise influence_damping.")
        self.vectors = vectors
        mu = values.to(dtype=torch.float64)  # on the CPU (Lanczos' tridiagonal solve), as the r x r work below
        lo = float(mu.min())
        shift = 0.0 if curvature is None else float(curvature.min())
        self.info = {"arnoldi_rank": int(mu.numel()), "hessian_max_eigenvalue": float(mu.max()) + shift,
                     "hessian_min_ritz_value": lo + shift,
                     "arnoldi_truncation_factor": truncation_factor(mu, vectors.shape[1], lam + shift, rank)}
        self.inverse: torch.Tensor | None = None
        if curvature is None or float(curvature.max()) == shift:  # C = c·I: one damping d for every direction
            self.damp = lam + shift
            _refuse_indefinite(lo + self.damp, lo + shift, lam)
            # V diag(1/(μ+d)) Vᵀv + (v - V Vᵀv)/d  =  v/d - V diag(μ / (d(μ+d))) Vᵀv
            self.weights = mu / (self.damp * (mu + self.damp))
            return
        # Woodbury with D = C + λI: D⁻¹v - D⁻¹ Vᵀ (I + diag(μ) G)⁻¹ diag(μ) V D⁻¹ v, G = V D⁻¹ Vᵀ (r x r)
        self.inverse = 1.0 / (curvature.to(dtype=torch.float64) + lam)
        gram = torch.zeros(len(mu), len(mu), dtype=torch.float64)
        for start in range(0, vectors.shape[1], WOODBURY_SLICE):  # r x 2^20 float64 at a time, not a second r x p block
            part = vectors[:, start : start + WOODBURY_SLICE].to(dtype=torch.float64)
            gram += ((part * self.inverse[start : start + WOODBURY_SLICE].to(part.device)) @ part.T).cpu()
        # D + Vᵀ diag(μ) V is positive definite iff I + G^½ diag(μ) G^½ is (congruence by D^-½)
        g_values, g_vectors = torch.linalg.eigh(gram)
        root = g_vectors @ torch.diag(g_values.clamp_min(0.0).sqrt()) @ g_vectors.T
        eye = torch.eye(len(mu), dtype=torch.float64)
        _refuse_indefinite(float(torch.linalg.eigvalsh(eye + root @ torch.diag(mu) @ root)[0]), lo + shift, lam)
        self.weights = torch.linalg.solve(eye + mu[:, None] * gram, torch.diag(mu))  # (I + diag(μ) G)⁻¹ diag(μ)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """The solve for ``v`` of shape ``(p,)`` or ``(m, p)``, in its dtype and on its device."""
        squeeze = v.dim() == 1
        v = v.unsqueeze(0) if squeeze else v
        if self.inverse is None:  # two passes over V (at millions of parameters the solve is bound by reading it)
            basis = self.vectors.to(v.dtype)
            weights = self.weights.to(device=v.device, dtype=v.dtype)  # (r,), made on the CPU
            s = torch.addmm(v, (v @ basis.T) * weights, basis, beta=1.0 / self.damp, alpha=-1.0)
        else:  # in float64, V read in slices: with λ small on undecayed entries (biases) D⁻¹v and its correction
            # nearly cancel, and in float32 the solve was 50% off at λ = 1e-5 (3.4x on a random full-rank case)
            inverse = self.inverse.to(device=v.device)
            weights = self.weights.to(device=v.device)
            x = v.to(torch.float64, copy=True)  # (written in place below: never the caller's v)
            step = WOODBURY_SLICE
            projection = sum((x[:, i : i + step] * inverse[i : i + step]) @ self.vectors[:, i : i + step].double().T
                             for i in range(0, x.shape[1], step))
            coefficients = projection @ weights.T
            for i in range(0, x.shape[1], step):
                x[:, i : i + step] -= coefficients @ self.vectors[:, i : i + step].double()
            s = (x * inverse).to(v.dtype)
        return s[0] if squeeze else s


TRUNCATION_WARNING = 2.0
"""`truncation_factor` above which the engine warns that the rank is too low for λ."""


def truncation_factor(values: torch.Tensor, num_params: int, damping: float, rank: int | None = None) -> float:
    """How much a direction beyond the kept rank can be overstated, solved as flat (divided by ``d``, the least
    damping any direction gets: λ plus the smallest L2 curvature): ``(m + d) / d``, with ``m`` the smallest magnitude
    of the top-``rank`` values (``values[:rank]``, ordered by decreasing magnitude: the data term's other eigenvalues
    lie within it); 1 where the values cover every parameter. A direction of curvature μ' > 0 comes out ``(μ' + d)/d``
    times too large: on a logistic regression over 64 features at rank 32, m 2.4x d gave influence 0.38 off the exact
    solve, 3.6x gave 0.74.

    ``rank``: the rank asked of `low_rank_hessian`, which appends the most negative pair after the top ``rank`` when it
    is not among them; that pair bounds nothing, and counted (``rank=None`` counts every value), its small |μ| (an
    unconverged estimate) read as m and hid a rank too low: a review's tiny BERT came back 0.99 off the exact solve
    with a factor of 1.18 and no warning, where the top 2 give 15.9. Not bounded: a direction of negative curvature
    beyond the rank, which comes out ``d/(μ' + d)`` times too small (docs/safety.md)."""
    if values.numel() >= num_params:  # (the appended pair among them: every direction is solved as measured)
        return 1.0
    kept = values[:rank] if rank is not None else values
    return (float(kept.abs().min()) + damping) / damping


def solve_low_rank(values: torch.Tensor, vectors: torch.Tensor, v: torch.Tensor, lam: float,
                   curvature: torch.Tensor | None = None, rank: int | None = None) -> tuple[torch.Tensor, dict]:
    """``(V diag(μ) Vᵀ + C + λI)⁻¹ v`` and the solver's diagnostics, prepared and solved at once (see
    `LowRankSolve`; keep one of those to solve many ``v`` with the same λ and C)."""
    solve = LowRankSolve(values, vectors, lam, curvature, rank)
    return solve(v), dict(solve.info)


def _refuse_indefinite(margin: float, lowest: float, lam: float) -> None:
    """Raise unless ``margin`` (the smallest eigenvalue, up to a positive factor, of the damped low-rank
    Hessian) is positive; ``lowest``: the Hessian's smallest known eigenvalue, for the message."""
    if margin <= 0:
        raise ValueError(
            f"H + λI is not positive definite: the Hessian has an eigenvalue of about {lowest:.4g} and λ = {lam:.4g} "
            "(influence_damping × influence_scale). The Hessian is indefinite (the model is not at a minimum); "
            f"raise influence_damping so that λ > {-lowest:.4g}.")
