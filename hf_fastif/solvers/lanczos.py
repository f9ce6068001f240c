"""Lanczos iteration on a symmetric operator given by its products: extreme eigenvalues (LiSSA's convergence
check) and a low-rank eigendecomposition (the ``arnoldi`` solver). Knows no model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, iterations: int, *,
            dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` steps of Lanczos with full reorthogonalisation from a seeded random start.

    Returns:
        ``(ritz_values, ritz_vectors)``: ``(k,)`` ascending float64 and ``(k, p)`` rows of unit norm, where ``k``
        ≤ ``iterations`` (fewer when the Krylov space is exhausted: an invariant subspace was found).
    """
    tri, basis = _tridiagonal(hvp, num_params, iterations, dtype, device, seed)
    values, vectors = torch.linalg.eigh(tri)
    ritz = vectors.T.to(dtype=dtype, device=device) @ basis[: len(values)]
    return values, ritz


def extreme_eigenvalues(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, *, iterations: int = 8,
                        dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                        reorthogonalise: bool = True, workspace: torch.Tensor | None = None) -> tuple[float, float]:
    """``(smallest, largest)`` Ritz values after a few Lanczos steps: estimates of the operator's extreme
    eigenvalues from inside the spectrum (Lanczos finds the extremes first). The Ritz vectors are not formed.

    The basis is reorthogonalised as in `lanczos`: without it (the three-term recurrence alone), in float32 a
    Hessian's large outlier eigenvalues leak back into later vectors and the smallest estimate of a bulk near zero
    comes out biased upwards (spectrum [-0.05, 0.5] plus outliers 2e3, 8e2, 3e2: +0.01 to +0.07 instead of about
    -0.01), which would let LiSSA run on an indefinite H + λI. ``reorthogonalise=False`` runs the three-term
    recurrence alone (each new vector made orthogonal to the last two), for a caller that reads the largest value
    only: in finite precision the Ritz values stay within the spectrum up to rounding (Paige), and a lost direction
    comes back as a copy of a converged extreme value, never above the largest, so the largest estimate keeps its
    meaning at a fraction of the vector work (5 steps: 1/3 of the passes over the p-sized vectors).

    ``workspace``: a ``(rows, num_params)`` tensor of ``dtype`` to hold the basis, for a caller that runs several
    estimates in turn (its rows are written over; with fewer rows than the steps, a basis of its own): each run
    otherwise writes its basis into fresh memory, whose first touch cost MiniLM's 1.9M-entry rows ~3 ms each."""
    tri, _ = _tridiagonal(hvp, num_params, iterations, dtype, device, seed, reorthogonalise, workspace)
    values = torch.linalg.eigvalsh(tri)
    return float(values[0]), float(values[-1])


def rounding_floor(dtype: torch.dtype) -> float:
    """A value this small against the spectrum's scale is rounding noise: 1e-10 in float64, 100·eps in float32.
    Lanczos reads a residual below it as a closed Krylov space (in float32 the noise had been normalised into a
    "new" direction: the identity's extreme eigenvalues came out -0.0014 and 2.0014); not larger, or a bulk of small
    eigenvalues beside large outliers (residuals of ~1e-4·scale) would read as closed. The low-rank Hessian reads
    an eigenvalue below it as zero."""
    return max(1e-10, 100 * torch.finfo(dtype).eps)


def _tridiagonal(hvp, num_params: int, iterations: int, dtype, device, seed: int,
                 reorthogonalise: bool = True, workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos' ``(k, k)`` float64 tridiagonal matrix and its ``(steps, p)`` basis (the first k rows are used).
    ``reorthogonalise=False``: each new direction is made orthogonal to the last two only, once (the three-term
    recurrence; see `extreme_eigenvalues`), and a restart's start to those two.

    When the Krylov space closes (an invariant subspace: the new direction vanishes against the spectrum's scale
    seen so far), the iteration restarts from a seeded random vector orthogonal to the basis, with a zero
    off-diagonal entry: from one start vector Lanczos sees one direction per eigenspace, so a Hessian with repeated
    eigenvalues (a linear head on frozen features: one copy of the features' Hessian per output) lost the others,
    and the low-rank solve treated them as flat. It stops early only when the basis spans the whole space."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps = min(iterations, num_params)
    fits = (workspace is not None and workspace.shape[0] >= steps and workspace.shape[1] == num_params
            and workspace.dtype == dtype and workspace.device == torch.device(device))
    # filled row by row: no restacking
    basis = workspace[:steps] if fits else torch.empty(steps, num_params, dtype=dtype, device=device)
    q = basis[0]
    seeded_direction(num_params, gen, dtype, device, out=q)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # the largest |entry| of the tridiagonal so far: the spectrum's scale, whatever the loss's units
    breakdown = rounding_floor(dtype)
    for i in range(steps):
        w = hvp(q).to(dtype)
        if w.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
            w = w.clone()  # (an operator that hands back its input: w is written in place below)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        done = basis[: i + 1] if reorthogonalise else basis[max(0, i - 1) : i + 1]
        for _ in range(2 if reorthogonalise else 1):  # twice is enough (Kahan): keeps the basis orthogonal in float32
            w.addmv_(done.T, done @ w, alpha=-1)  # w - basisᵀ(basis w), in place: no fresh p-sized vector each time
        beta = float(w.norm())
        if not math.isfinite(alpha) or not math.isfinite(beta):  # any inf / NaN entry reaches both or the norm
            raise FloatingPointError("Lanczos met a non-finite Hessian-vector product: a loss is inf / NaN, or the "
                                     "products overflowed the working dtype.")
        scale = max(scale, abs(alpha), beta)
        if i + 1 == steps:
            break
        if beta <= breakdown * scale:  # an invariant subspace: go on from a new direction (0 off the diagonal)
            w = _orthogonal_start(done, gen, dtype)
            if w is None:
                break
            beta = 0.0
        betas.append(beta)
        q = basis[i + 1]
        if beta:
            torch.div(w, beta, out=q)
        else:
            q.copy_(w)
    k = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    return tri, basis


def seeded_direction(num_params: int, gen: torch.Generator, dtype, device,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """A random unit vector from ``gen``, the same numbers whatever ``dtype`` (up to its rounding).

    Drawn in float32 and converted: torch draws other numbers in float32 than in float64 (beyond 15 entries), so a
    float32 copy of a model had started from another vector, and a low-rank Hessian short of convergence differed
    beyond rounding; float32 draws are exact in float64. (Not drawn in float64: 4-5x the cost, 46 vs 10 ms for
    1.9M entries on one thread, paid by each of the convergence check's five Lanczos runs.) ``out``: written there
    (a float32 one on the CPU drawn into directly: the same numbers, no fresh vectors)."""
    if out is not None and out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous():
        torch.randn(num_params, generator=gen, dtype=torch.float32, out=out)
        return out.div_(out.norm())
    x = torch.randn(num_params, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    x = x / x.norm()
    return x if out is None else out.copy_(x)


def _orthogonal_start(basis: torch.Tensor, gen: torch.Generator, dtype) -> torch.Tensor | None:
    """A seeded random unit vector orthogonal to the rows of ``basis``, or None when they span the space."""
    for _ in range(3):
        w = seeded_direction(basis.shape[1], gen, dtype, basis.device)
        for _ in range(2):
            w = torch.addmv(w, basis.T, basis @ w, alpha=-1)
        norm = float(w.norm())
        if norm > 1e-3:
            return w / norm
    return None
