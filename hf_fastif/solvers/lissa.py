"""LiSSA: the stochastic Neumann series of Agarwal et al., as FastIF's reference code runs it.

For each repetition t, with a fresh sample of B training points per step::

    h_0 = v;  h_j = v + (1 - damp)·h_{j-1} - HVP_{batch(t, j)}(h_{j-1}) / scale,  j = 1..J
    s_test = h_J / scale, averaged over repetitions

Its fixed point is ``(H + damp·scale·I)⁻¹ v``. It converges when every batch Hessian's eigenvalues lie in
``(-λ, (2 - damp)·scale)``; with a positive definite ``H + λI`` the iterates are bounded by ``‖v‖ / damp``,
which is what the divergence check uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


class LissaDivergenceError(ValueError):
    """LiSSA's iterates blew up: ``scale`` is below the top Hessian eigenvalue, or H + λI is indefinite."""


def suggest_scale(top_eigenvalue: float) -> float:
    """A scale comfortably above ``top_eigenvalue``: 2x, rounded up to 1, 2 or 5 times a power of ten."""
    target = max(2.0 * abs(top_eigenvalue), 1e-12)
    exp = math.floor(math.log10(target))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= target:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def power_iteration(hvp: Callable[[torch.Tensor], torch.Tensor], num_params: int, *, iterations: int = 8,
                    dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> float:
    """Estimate the eigenvalue of largest magnitude of the operator ``hvp`` (a Rayleigh quotient)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(num_params, generator=gen, dtype=dtype).to(device)
    x = x / x.norm()
    value = 0.0
    for _ in range(iterations):
        hx = hvp(x)
        value = float(torch.dot(x, hx))
        norm = hx.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        x = hx / norm
    return value


def solve_lissa(hvp_step: Callable[[int, Sequence[int], torch.Tensor], torch.Tensor], v: torch.Tensor, *,
                damping: float, scale: float, depth: int, repetitions: Sequence[int],
                top_eigenvalue: float | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Run the given LiSSA repetitions in lockstep and return their mean estimate of ``(H + λI)⁻¹ v``.

    Args:
        hvp_step: ``(j, reps, h) → HVP`` where ``h`` is ``(R, m, p)`` (one slice per repetition in ``reps``)
            and slice r is multiplied by the Hessian of the batch that repetition ``reps[r]`` draws at step j.
        v: ``(m, p)`` right-hand sides (``(p,)`` accepted).
        repetitions: repetition indices to run here (their batches depend on the index only, so the
            repetitions can be split over processes without changing the result).
        top_eigenvalue: from `power_iteration`, used in the error message.
    Returns:
        ``(mean over repetitions of h_J / scale, info)``.
    """
    squeeze = v.dim() == 1
    v = v.unsqueeze(0) if squeeze else v
    reps = list(repetitions)
    if not reps:
        return torch.zeros_like(v[0] if squeeze else v), {"lissa_repetitions": 0}
    h = v.unsqueeze(0).repeat(len(reps), 1, 1)
    v_norm = v.norm(dim=-1)
    bound = 10.0 * v_norm / damping if damping > 0 else 1e8 * v_norm.clamp_min(1e-30)
    bar = tqdm(range(1, depth + 1), desc=f"s_test (lissa, {len(reps)} rep.)", disable=not progress, leave=False)
    for j in bar:
        h = v + (1.0 - damping) * h - hvp_step(j, reps, h) / scale
        norms = h.norm(dim=-1)
        if not torch.isfinite(norms).all() or (norms > bound).any():
            raise LissaDivergenceError(_divergence_message(j, norms, v_norm, damping, scale, top_eigenvalue))
    estimate = (h / scale).mean(0)
    info = {"lissa_repetitions": len(reps), "lissa_final_norm": float((h / scale).norm(dim=-1).max())}
    return (estimate[0] if squeeze else estimate), info


def _divergence_message(step, norms, v_norm, damping, scale, top_eigenvalue) -> str:
    finite = torch.isfinite(norms).all()
    what = f"‖h‖ reached {norms.max().item():.3g}" if finite else "‖h‖ became NaN/inf"
    lines = [
        f"LiSSA diverged at step {step}: {what} (‖v‖ = {v_norm.max().item():.3g}; a convergent series stays "
        f"below ‖v‖/damp = {(v_norm.max() / max(damping, 1e-30)).item():.3g}). With damp = {damping} and "
        f"scale = {scale} (λ = {damping * scale:.4g}) it converges only if every batch Hessian's eigenvalues "
        "lie in (-λ, (2 - damp)·scale)."
    ]
    if top_eigenvalue is not None and abs(top_eigenvalue) >= scale * (1 - damping):
        lines.append(f"The top Hessian eigenvalue is about {top_eigenvalue:.4g}: use influence_scale >= "
                     f"{suggest_scale(top_eigenvalue):.3g} (lower influence_damping to keep λ if needed).")
    else:
        lines.append(
            f"Either raise influence_scale (top Hessian eigenvalue estimate: "
            f"{'unknown' if top_eigenvalue is None else f'{top_eigenvalue:.4g}'}; single-batch Hessians can be "
            "larger, try 10x), or, if the Hessian is indefinite (the model is not at a minimum), raise "
            "influence_damping, or use influence_solver='exact'/'cg', which report the curvature."
        )
    return " ".join(lines)
