"""Lanczos iteration on a symmetric operator given by its products: extreme eigenvalues (LiSSA's convergence
check) and a low-rank eigendecomposition (the ``arnoldi`` solver). Knows no model."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, iterations: int, *,
            dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` steps of Lanczos with full reorthogonalisation from a seeded random start.

    Returns:
        ``(ritz_values, ritz_vectors)``: ``(k,)`` ascending float64 and ``(k, p)`` rows of unit norm, where ``k``
        ≤ ``iterations`` (fewer when the Krylov space is exhausted: an invariant subspace was found).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(num_params, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm()
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(iterations, num_params)):
        basis.append(q)
        w = hvp(q).to(dtype)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan): keeps the basis orthogonal in float32
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        if not torch.isfinite(w).all():
            raise FloatingPointError("Lanczos met a non-finite Hessian-vector product.")
        if beta <= 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    ritz = vectors.T.to(dtype=dtype, device=device) @ torch.stack(basis)
    return values, ritz


def extreme_eigenvalues(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, *, iterations: int = 8,
                        dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> tuple[float, float]:
    """``(smallest, largest)`` Ritz values after a few Lanczos steps: estimates of the operator's extreme
    eigenvalues from inside the spectrum (Lanczos finds the extremes first)."""
    values, _ = lanczos(hvp, num_params, iterations, dtype=dtype, device=device, seed=seed)
    return float(values[0]), float(values[-1])
