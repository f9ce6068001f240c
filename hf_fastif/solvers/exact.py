"""Dense solve by eigendecomposition of the explicit Hessian (small parameter counts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

MAX_EXACT_PARAMS = 20_000


def check_exact_size(num_params: int) -> None:
    """Refuse a dense Hessian above `MAX_EXACT_PARAMS` parameters, naming the alternatives."""
    if num_params > MAX_EXACT_PARAMS:
        raise ValueError(
            f"influence_solver='exact' builds a dense {num_params}x{num_params} Hessian; that is above the "
            f"{MAX_EXACT_PARAMS} parameter limit. Use influence_solver='cg' or 'lissa', or select fewer "
            "parameters with influence_params."
        )


def build_hessian(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, *, dtype: torch.dtype,
                  device: torch.device | str = "cpu", chunk: int = 512, progress: bool = False) -> torch.Tensor:
    """The ``(p, p)`` matrix of ``hvp`` (columns from products with identity blocks), symmetrised."""
    check_exact_size(num_params)
    cols = []
    for start in tqdm(range(0, num_params, chunk), desc=f"Hessian ({num_params} parameters)", disable=not progress,
                      leave=False):
        stop = min(start + chunk, num_params)
        eye = torch.zeros(stop - start, num_params, dtype=dtype, device=device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        cols.append(hvp(eye).to(dtype))
    hessian = torch.cat(cols, 0)
    return (hessian + hessian.T) / 2


def solve_exact(hessian: torch.Tensor, v: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
    """``(H + λI)⁻¹ v`` for ``v`` of shape ``(p,)`` or ``(m, p)``.

    Raises:
        ValueError: if ``H + λI`` is not positive definite, with the damping that would make it so.
    """
    # float64 whatever the model's dtype; zero judged at the precision the Hessian was built in
    return solve_decomposed(*torch.linalg.eigh(hessian.double()), v, lam, built_in=hessian.dtype)


def zero_floor(evals: torch.Tensor, built_in: torch.dtype) -> float:
    """The largest eigenvalue magnitude that is zero up to rounding for a Hessian built in ``built_in``:
    ``2·sqrt(p)·eps·max|μ|``, the spectral norm of a rounding of every entry by ``eps`` of the largest (a random
    p × p perturbation's). Not `torch.linalg.matrix_rank`'s ``p·eps·max|μ|``, a worst case: at the solver's 20,000
    float32 parameters it would call 0.24% of the top eigenvalue zero and refuse damped solves that are accurate.
    Nor `hf_fastif.solvers.lanczos.rounding_floor`, the floor of Lanczos' residuals (100·eps, 1e-10 in float64),
    which accumulate rounding over the steps: an explicit eigendecomposition's is that of the matrix itself."""
    return 2.0 * evals.numel() ** 0.5 * torch.finfo(built_in).eps * float(evals.abs().max())


def solve_decomposed(evals: torch.Tensor, evecs: torch.Tensor, v: torch.Tensor, lam: float,
                     built_in: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """`solve_exact` from the Hessian's eigendecomposition (``torch.linalg.eigh``, ascending), kept across calls
    with the same weights and data; ``built_in``: the dtype the Hessian was built in (default the eigenvalues').

    ``H + λI`` is refused where its smallest eigenvalue is not above `zero_floor`: a singular Hessian's zero
    eigenvalues come out of the decomposition as ±rounding, and with λ = 0 a positive one was divided by (a linear
    model with more features than rows returned influence 2.4x the minimum-norm answer's largest, without a word,
    when every flat direction's rounding fell on the positive side; refused otherwise)."""
    lo, hi = evals[0].item(), evals[-1].item()
    floor = zero_floor(evals, built_in or evals.dtype)
    if lo + lam <= floor:
        singular = abs(lo) <= floor  # zero up to rounding: flat directions, not negative ones
        why = ("The Hessian is singular (flat directions: more parameters than the data pins down; eigenvalues "
               f"within {floor:.2g} of 0 are rounding); raise influence_damping above 0 so that λ > {floor:.2g}."
               if singular else
               f"The Hessian is indefinite (the model is not at a minimum); raise influence_damping so that "
               f"λ > {-lo:.4g}.")
        raise ValueError(f"H + λI is not positive definite: the smallest Hessian eigenvalue is {lo:.4g} and "
                         f"λ = {lam:.4g} (influence_damping × influence_scale). {why}")
    coeffs = (v.double() @ evecs) / (evals + lam)
    return (coeffs @ evecs.T).to(v.dtype), {"hessian_min_eigenvalue": lo, "hessian_max_eigenvalue": hi}
