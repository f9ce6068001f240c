"""LiSSA: the stochastic Neumann series of Agarwal et al., as FastIF's reference code runs it.

For each repetition t, with a fresh sample of B training points per step::

    h_0 = v;  h_j = v + (1 - damp)·h_{j-1} - HVP_{batch(t, j)}(h_{j-1}) / scale,  j = 1..J  (exactly J steps)
    s_test = h_J / scale, averaged over repetitions

Its fixed point is ``(H + damp·scale·I)⁻¹ v``. Each step contracts when the batch Hessian's eigenvalues lie in
``(-λ, (2 - damp)·scale)`` with ``λ = damp·scale``; the series converges in expectation when ``H + λI`` is positive
definite and ``scale`` is above the batch Hessians' top eigenvalues. Batch Hessians of a non-convex model are often
indefinite, so single steps may expand: what signals divergence is an iterate beyond the bound of a convergent
series that keeps growing geometrically, which `GrowthMonitor` detects (a slowly unstable direction may stay
below that bound for J steps: the convergence check before the recursion looks for it, see
`hf_fastif.engine.s_test`). A repetition whose last iterate points away from ``v`` is refused too (`final_alignment`).
The iterate lives in the dtype of ``v`` (the caller passes float32 or wider, whatever the model's dtype).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


class LissaDivergenceError(ValueError):
    """LiSSA's iterates grew without bound: ``scale`` is below the batch Hessians' top eigenvalues, or H + λI is
    indefinite."""


class LissaNonFiniteError(LissaDivergenceError, FloatingPointError):
    """A LiSSA step's Hessian-vector product came out inf / NaN while its iterate was finite: a sampled training
    row's loss or its derivatives are (a FloatingPointError too, as the other solvers' non-finite products are)."""


def suggest_scale(top_eigenvalue: float) -> float:
    """A scale comfortably above ``top_eigenvalue``: 2x, rounded up to 1, 2 or 5 times a power of ten."""
    target = max(2.0 * abs(top_eigenvalue), 1e-12)
    exp = math.floor(math.log10(target))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= target:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def truncation_share(damping: float, scale: float, depth: int, smallest_eigenvalue: float | None = None) -> float:
    """The share of the fixed point that J steps leave out along the directions LiSSA converges slowest in: the
    recursion sums ``Σ_{i≤J} ρ^i v`` of the series ``v / (1 - ρ)``, with ``ρ = 1 - damp - μ/scale`` for a direction of
    curvature μ, so ``ρ^(J+1)`` of that component is missing. μ is taken as 0 (a flat direction: most networks have
    them), or as ``smallest_eigenvalue`` when that is negative (an indefinite Hessian converges slower still). An
    upper bound: directions the right-hand side does not reach (a classifier's shift of every class alike) do not
    count, so the error measured against the exact solve can be far smaller."""
    return slowest_rate(damping, scale, smallest_eigenvalue) ** (depth + 1)


def slowest_rate(damping: float, scale: float, smallest_eigenvalue: float | None = None) -> float:
    """LiSSA's contraction ``ρ = 1 - damp - μ/scale`` per step along its slowest direction (μ as in `truncation_share`)."""
    mu = min(smallest_eigenvalue or 0.0, 0.0)
    return min(max(1.0 - damping - mu / scale, 0.0), 1.0)


def converging_depth(damping: float, scale: float, smallest_eigenvalue: float | None = None) -> int:
    """The J at which the slowest direction's ``J·(1 - ρ)`` is 5, the paper's ``J·damp`` (1000 × 5e-3): ``5 / damp``
    along a flat direction, more where the Hessian is indefinite."""
    return math.ceil(5.0 / max(1.0 - slowest_rate(damping, scale, smallest_eigenvalue), 1e-12))


TRUNCATION_WARNING = 0.5
"""`truncation_share` above which the engine warns that J steps stop well before LiSSA converges (J·damp below ~0.7;
the paper's 1000 × 5e-3 = 5 leaves 0.7%)."""


SPREAD_WARNING = 0.3
"""`repetition_spread` above which the engine warns that LiSSA's T repetitions disagree: their mean's standard error
is more than 30% of its norm. A review's GPT-2 classifier (H indefinite, damp 0.59, J 400: each repetition rests on its
last ~2 batches) came back unwarned 0.61 / 0.65 / 1.18 off the exact solve at B = 1 / 2 / 4 (T = 4), where this
spread is 0.71 / 0.44 / 0.32; at B = 4, T = 16 (0.17) and B = 10, T = 8 (0.07) it was 0.82 and 0.35 off. Not the
draws' order: batches drawn independently instead of in shuffles gave 0.38 off at B = 10, T = 8 (spread 0.15) and
diverged at B = 4 (its Hessian is indefinite: -7.9 against λ = 11.8). A repetition's error is heavy-tailed there, and
a few repetitions under-estimate it: the spread is a floor, not a bound."""


def repetition_spread(deviations: torch.Tensor, mean: torch.Tensor, repetitions: int) -> float:
    """The standard error of the mean of ``repetitions`` (T ≥ 2) LiSSA estimates relative to the mean's norm, largest
    over the right-hand sides: ``sqrt(Σ_r ‖h_r − h̄‖² / (T(T − 1))) / ‖h̄‖``, from ``deviations`` ``(m,)`` (``Σ_r
    ‖h_r − h̄‖²`` over every repetition: `solve_lissa`'s ``lissa_deviations`` about each process's own mean, plus
    each process's repetitions times its mean's squared distance to h̄) and ``mean`` ``(m, p)``. The repetitions draw
    their batches independently, so this is how far s_test may be from LiSSA's expectation (heavy-tailed errors,
    where an indefinite H makes single repetitions swing, are under-estimated by a few repetitions), not that
    expectation's own bias (a J too short: `truncation_share`)."""
    centre = mean.double().norm(dim=-1).cpu()
    relative = (deviations.double().cpu() / (repetitions * (repetitions - 1))).sqrt()
    return float((relative / centre.clamp_min(torch.finfo(torch.float64).tiny)).max())


FINAL_GROWTH_LIMIT = 1e6
"""The last iterate's ‖h_J‖ over the convergent-series bound ``E_J`` beyond which the recursion is refused as diverged
whatever its length (a series converging to an ill-conditioned fixed point can exceed ``E_J`` by 1/(1 - |λ_min|/λ);
30 steps at a quarter of the needed scale reached 1e16 and came back as the answer)."""


class GrowthMonitor:
    """Detects an iterate that grows without bound: ``‖h_j‖`` (one per repetition and test vector) has left the
    envelope of a convergent series and keeps growing geometrically.

    With every batch Hessian positive semi-definite and below ``(2 - damp)·scale``, each step contracts by at least
    ``1 - damp``, so ``‖h_j‖ ≤ E_j = ‖v‖·Σ_{i≤j} (1 - damp)^i`` (at most ``‖v‖/damp``). Indefinite batch Hessians (a
    model away from a minimum) can push a convergent series above ``E_j`` for a while, and a series whose fixed point
    is far from ``v`` (small damp) grows for ~1/damp steps: neither is divergence. Divergence is declared when both
    hold: ``‖h_j‖ > factor·E_j``, and ``‖h‖`` at the end of each window of ``window`` steps rose ``rising`` windows
    in a row (an unstable direction grows by the same factor every step, however small its share of ``v``).
    """

    def __init__(self, v_norm: torch.Tensor, damping: float, depth: int, *, window: int | None = None,
                 rising: int = 6, factor: float = 2.0):
        self.window = window or max(8, depth // 50)
        self.rising, self.factor, self.damping = rising, factor, damping
        self.v_norm = v_norm.detach().double()
        self.envelope = torch.zeros_like(self.v_norm)
        self.step = 0
        self._ends: list[torch.Tensor] = []

    def update(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Add one step's ``‖h_j‖``; returns ``‖h_j‖ / E_j`` (per vector) when the series diverges, else None."""
        self.step += 1
        self.envelope = 1.0 + (1.0 - self.damping) * self.envelope
        if self.step % self.window:
            return None
        norms = norms.detach().double()
        self._ends.append(norms)
        if len(self._ends) <= self.rising:
            return None
        recent = torch.stack(self._ends[-(self.rising + 1):])
        rising = (recent[1:] > recent[:-1]).all(0)
        ratio = self.ratio(norms)
        diverging = rising & (ratio > self.factor)
        return ratio if bool(diverging.any()) else None

    def ratio(self, norms: torch.Tensor) -> torch.Tensor:
        """``‖h_j‖ / E_j`` per vector, at the last step `update` counted."""
        return norms.detach().double() / (self.envelope * self.v_norm).clamp_min(torch.finfo(torch.float64).tiny)


class Carry:
    """The carried part of one LiSSA step, ``into ← v + c ⊙ h`` (``c = 1 - damping``, or with the L2 term's diagonal
    the per-entry coefficient), written one range of the flat vector at a time: a step that adds its products block
    by block (`hf_fastif.grouped_products`) carries each block just before its first add, while the block is still
    in cache, instead of a whole pass over the iterates ahead of the step (MiniLM, four repetitions of the paper's
    selection: a step 29.2 → 26.2 ms). `finish` carries every range not carried yet; carrying a range twice would
    overwrite what was added there, so each is carried once (a partial overlap is refused).

    Args:
        v: ``(m, p)`` right-hand sides; h: ``(R, m, p)`` the step's input; into: ``(R, m, p)``, what the step writes.
        coefficient: ``c``, found once per recursion (`CarryCoefficient`).
    """

    def __init__(self, v: torch.Tensor, h: torch.Tensor, into: torch.Tensor, coefficient: CarryCoefficient):
        self._v, self._h, self._into, self._coefficient = v, h, into, coefficient
        self._carried: dict[int, int] = {}  # start -> end of every range carried

    def part(self, start: int, end: int) -> None:
        """Carry the flat entries ``[start, end)`` of every slice, unless that range was carried already (or
        everything was, by `finish`; an empty range, a parameter of no entries, has nothing to carry)."""
        if start == end or self._carried.get(start) == end or self._carried.get(0) == self._into.shape[-1]:
            return
        if start in self._carried:
            raise RuntimeError(f"LiSSA's carried part: [{start}, {end}) overlaps a range carried before.")
        self._write(start, end)
        self._carried[start] = end

    def finish(self) -> None:
        """Carry every entry not carried yet (in as few ranges as there are gaps)."""
        position = 0
        for start, end in sorted(self._carried.items()):
            if start < position:
                raise RuntimeError(f"LiSSA's carried part: [{start}, {end}) overlaps a range carried before.")
            if start > position:
                self._write(position, start)
            position = end
        size = self._into.shape[-1]
        if position < size:
            self._write(position, size)
        self._carried = {0: size}

    def _write(self, start: int, end: int) -> None:
        self._coefficient.write(self._v, self._h, self._into, start, end)


class CarryCoefficient:
    """The coefficient ``c`` of LiSSA's carried part ``v + c ⊙ h``: ``1 - damping`` everywhere, or per entry
    ``(1 - damping) - diagonal / scale`` with the L2 term's diagonal (``2·wd`` on a decayed parameter's entries, 0
    on the others: constant over each parameter). Found once per recursion: where ``c`` is constant over runs of
    entries (at most `MAX_RUNS` of them), a range is written run by run as ``torch.add(v, h, alpha=c)``, which
    neither reads ``c`` nor broadcasts it over the repetitions; elsewhere ``torch.addcmul`` with the per-entry ``c``.
    The same values either way (MiniLM's last layer + pooler + classifier, four repetitions: the carried part of a
    step 4.4 → 3.3 ms, about 0.1 s of a 100-step call; bitwise the same influence)."""

    MAX_RUNS = 4096

    def __init__(self, damping: float, coefficient: torch.Tensor | None = None):
        self._per_entry = None
        if coefficient is None:
            self._starts, self._values = [0], [1.0 - damping]
            return
        change = torch.nonzero(coefficient[1:] != coefficient[:-1]).flatten() + 1
        if change.numel() >= self.MAX_RUNS:
            self._per_entry = coefficient
            return
        self._starts = [0, *change.tolist()]
        self._values = coefficient[self._starts].tolist() if coefficient.numel() else [1.0 - damping]

    def largest(self) -> float:
        """``max |c|`` over the entries."""
        if self._per_entry is not None:
            return float(self._per_entry.abs().max()) if self._per_entry.numel() else 0.0
        return max(abs(c) for c in self._values)

    def write(self, v: torch.Tensor, h: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
        """``out[..., start:end] = v[..., start:end] + c[start:end] ⊙ h[..., start:end]`` (``v`` broadcast)."""
        if self._per_entry is not None:
            torch.addcmul(v[..., start:end], self._per_entry[start:end], h[..., start:end], out=out[..., start:end])
            return
        run = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            stop = min(end, self._starts[run + 1]) if run + 1 < len(self._starts) else end
            torch.add(v[..., start:stop], h[..., start:stop], alpha=self._values[run], out=out[..., start:stop])
            start, run = stop, run + 1


def solve_lissa(hvp_step: Callable[[int, Sequence[int], torch.Tensor], torch.Tensor], v: torch.Tensor, *,
                damping: float, scale: float, depth: int, repetitions: Sequence[int],
                top_eigenvalue: float | None = None, progress: bool = True,
                diagonal: torch.Tensor | None = None, accumulates: bool = False,
                carries: bool = False, in_place: bool = False) -> tuple[torch.Tensor, dict]:
    """Run the given LiSSA repetitions in lockstep and return their mean estimate of ``(H + λI)⁻¹ v``.

    Args:
        hvp_step: ``(j, reps, h) → HVP`` where ``h`` is ``(R, m, p)`` (one slice per repetition in ``reps``)
            and slice r is multiplied by the Hessian of the batch that repetition ``reps[r]`` draws at step j.
        v: ``(m, p)`` right-hand sides (``(p,)`` accepted), in the dtype the iterate should live in.
        repetitions: repetition indices to run here (their batches depend on the index only, so the
            repetitions can be split over processes without changing the result).
        top_eigenvalue: the largest batch-Hessian eigenvalue estimate, used in the error message.
        diagonal: ``(p,)``, a diagonal part of every batch Hessian that ``hvp_step`` leaves out (the explicit L2
            term: ``2·wd`` on the decayed entries), applied exactly in the update, which then reads and writes
            each vector once: ``h ← v + ((1 - damping) - diagonal / scale) ⊙ h - hvp_step(h) / scale``.
        accumulates: ``hvp_step`` is called as ``hvp_step(j, reps, h, into=, alpha=)`` and adds ``alpha ·`` its
            products into ``into`` (``(R, m, p)``, already holding ``v + (1 - damping)·h``) in place, returning
            nothing: the products are never stored apart (`hf_fastif.hvp.BatchHessian.accumulate`).
        carries: (with ``accumulates``) ``into`` is handed over empty, with ``carry=`` a `Carry` for the step to
            write ``v + (1 - damping)·h`` range by range before adding its products there; what the step did not
            carry is carried after it. A step that adds whole-vector products calls ``carry.finish()`` first.
        in_place: (with ``carries``, one vector: ``m = 1``, as a carried range is written for every vector at once)
            ``into`` is ``h`` itself: the step writes the next iterate over its input, so it must read all of ``h``
            that its products need before it carries or adds anywhere, and hold none of it in a view it reads later
            (the grouped route forms every seed of its second backward first, each in memory of its own; a step
            that multiplies otherwise copies ``h`` first). The same values; one iterate buffer instead of two, and
            the carried part written where it was read (MiniLM's paper selection, four repetitions: the carried
            ranges 3.1 → 2.1 ms a step in isolation).
    Returns:
        ``(mean over repetitions of h_J / scale, info)``; ``info["lissa_deviations"]`` is a ``(m,)`` float64 tensor on
        ``v``'s device, ``Σ_r ‖h_r / scale − the mean‖²`` per right-hand side (`repetition_spread`; absent for no
        repetitions), the rest numbers.
    Raises:
        LissaDivergenceError: the iterate became NaN/inf or grew without bound (`GrowthMonitor`).
    """
    squeeze = v.dim() == 1
    v = v.unsqueeze(0) if squeeze else v
    reps = list(repetitions)
    if not reps:
        return torch.zeros_like(v[0] if squeeze else v), {"lissa_repetitions": 0}
    h = v.unsqueeze(0).repeat(len(reps), 1, 1)
    # the next iterate is written in a spare buffer, then the two swap (no allocation per step), or over h itself
    spare = None if in_place else torch.empty_like(h)
    before = v.norm(dim=-1).expand(h.shape[:-1])  # ‖h_{j-1}‖ (in place, what says the step's input was finite)
    coefficient = CarryCoefficient(damping, None if diagonal is None
                                   else (1.0 - damping) - diagonal.to(v.dtype) / scale)
    monitor = GrowthMonitor(v.norm(dim=-1), damping, depth)
    bar = tqdm(range(1, depth + 1), desc=f"s_test (lissa, {len(reps)} rep.)", disable=not progress, leave=False)

    def carried(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # v + (1 - damp)·h (diagonal)
        out = torch.empty_like(h) if out is None else out
        coefficient.write(v, h, out, 0, h.shape[-1])
        return out

    add_products = hvp_step if accumulates else _adding(hvp_step)
    if carries and not accumulates:
        raise ValueError("solve_lissa: carries=True needs accumulates=True (the step adds into the next iterate).")
    if in_place and not carries:
        raise ValueError("solve_lissa: in_place=True needs carries=True (the step carries before it writes).")
    if in_place and v.shape[0] != 1:  # (a carried range is written for every vector at once: vector 1's input would
        # be overwritten by vector 0's carry before its seeds are formed)
        raise ValueError(f"solve_lissa: in_place=True takes one right-hand side, not {v.shape[0]}.")
    for j in bar:
        if carries:
            into = h if in_place else spare
            carry = Carry(v, h, into, coefficient)
            add_products(j, reps, h, into=into, alpha=-1.0 / scale, carry=carry)
            carry.finish()
        else:
            carried(h, out=spare)
            add_products(j, reps, h, into=spare, alpha=-1.0 / scale)
        if not in_place:
            h, spare = spare, h
        norms = h.norm(dim=-1)
        if not torch.isfinite(norms).all():
            # the step's input was finite (its norm was, at the step before); where the carried part is finite
            # too, what added the inf / NaN is the products. In place the input is gone: the carried part's entries
            # are bounded by ‖v‖ + max|c|·‖h_{j-1}‖, finite in the working dtype where that bound is
            if in_place:
                bound = v.norm(dim=-1).double() + coefficient.largest() * before.double()
                blamed = bool((bound < torch.finfo(h.dtype).max).all())
            else:
                blamed = bool(torch.isfinite(spare).all()) and bool(torch.isfinite(carried(spare)).all())
            if blamed:
                size = float(before.max() / v.norm(dim=-1).max().clamp_min(torch.finfo(v.dtype).tiny))
                raise LissaNonFiniteError(
                    f"LiSSA step {j}: the Hessian-vector product of the sampled training rows is not finite (inf/NaN) "
                    f"while the iterate is (‖h‖ = {size:.3g}·‖v‖): a training row's loss or its derivatives are "
                    "inf / NaN, or they overflowed the working dtype; check the training rows' losses. If ‖h‖ is far "
                    "above 1/damping·‖v‖, the iterate itself grew until the model's dtype overflowed: that is "
                    "divergence (raise influence_scale).")
            raise LissaDivergenceError(_divergence_message(j, None, damping, scale, top_eigenvalue))
        before = norms
        growth = monitor.update(norms)
        if growth is not None:
            raise LissaDivergenceError(_divergence_message(j, float(growth.max()), damping, scale, top_eigenvalue))
    final = monitor.ratio(before)  # (‖h_J‖: the last step's norms)
    if float(final.max()) > FINAL_GROWTH_LIMIT:  # the windows' monitor needs 7 windows (56+ steps) to speak
        raise LissaDivergenceError(_divergence_message(depth, float(final.max()), damping, scale, top_eigenvalue,
                                                       final=True))
    alignment = final_alignment(h, v, before)
    wrong = [(r, i) for r in range(len(reps)) for i in range(v.shape[0]) if not alignment[r, i] > 0]
    if wrong:
        r, i = wrong[0]
        raise LissaDivergenceError(_wrong_side_message(reps[r], i, float(alignment[r, i]), len(wrong), damping,
                                                       scale, top_eigenvalue))
    estimate = (h / scale).mean(0)
    deviations = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
    for r in range(len(reps)):  # (one repetition's difference at a time: no second iterate-sized buffer)
        deviations += torch.linalg.vector_norm(h[r] / scale - estimate, dim=-1).double() ** 2
    info = {"lissa_repetitions": len(reps), "lissa_final_norm": float(before.max()) / scale,
            "lissa_steps": depth, "lissa_min_alignment": float(alignment.min()) if alignment.numel() else float("nan"),
            "lissa_deviations": deviations}
    return (estimate[0] if squeeze else estimate), info


def final_alignment(h: torch.Tensor, v: torch.Tensor, h_norms: torch.Tensor | None = None) -> torch.Tensor:
    """``cos(h_J, v)`` per repetition and right-hand side (``(R, m)``, float64; 1 where ``v`` or ``h_J`` is 0).

    For a positive definite ``H + λI`` the fixed point ``s = (H + λI)⁻¹v`` has ``v·s > 0``, and so does every
    partial sum of the recursion with the mean Hessian (along each eigendirection ``Σ_{i≤J} ρ^i > 0`` for
    ``|ρ| < 1``); sampled Hessians keep it up to their noise. A repetition that ends with ``v·h_J ≤ 0`` took a step
    that expanded the iterate (a sampled batch's Hessian above ``(2 - damp)·scale``, which the convergence check's
    few sampled batches can miss) or drowned in its samples' noise: its estimate points away from the answer (seen:
    a 4-row LiSSA on a tiny BERT, scale 0.75x the check's top eigenvalue, came back as the exact solve's influence
    negated, Pearson -0.998). Computed row by row from unit vectors, so a tiny ``v`` does not underflow the dot
    product; ``h_norms``, ``‖h_J‖`` (``(R, m)``) where the caller has them."""
    v_norms = v.norm(dim=-1)
    h_norms = h.norm(dim=-1) if h_norms is None else h_norms
    unit_v = v / v_norms.unsqueeze(-1).clamp_min(torch.finfo(v.dtype).tiny)
    out = torch.ones(h.shape[:2], dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    for r in range(h.shape[0]):
        cos = torch.linalg.vecdot(h[r], unit_v).double() / h_norms[r].double().clamp_min(tiny)
        out[r] = torch.where((h_norms[r] > 0) & (v_norms > 0), cos, torch.ones_like(cos)).cpu()
    return out


def _wrong_side_message(repetition: int, vector: int, cos: float, count: int, damping: float, scale: float,
                        top_eigenvalue: float | None) -> str:
    limit = (2.0 - damping) * scale
    seen = "" if top_eigenvalue is None else f" (the convergence check's sampled batches reached ~{top_eigenvalue:.4g})"
    return (
        f"LiSSA's estimate points away from the test gradient: repetition {repetition} ended with "
        f"cos(s_test, ∇L_test) = {cos:.3g} for right-hand side {vector}"
        + (f" ({count} pairs of a repetition and a right-hand side in all)" if count > 1 else "")
        + ", while (H + λI)⁻¹∇L_test has a positive dot product with ∇L_test whenever H + λI is positive definite, "
        "and so does every step of the recursion with the mean Hessian. So a step expanded the iterate (a sampled "
        f"batch's Hessian had eigenvalues above (2 - damp)·scale = {limit:.4g}{seen}; single batches can be larger "
        "than the sampled ones), or H + λI is not positive definite at these weights (a model away from a minimum: "
        "influence_check_convergence=True measures both before the recursion), or the sampled Hessians' noise "
        "swamped the estimate. Its influence would come back with the wrong sign. Raise influence_scale (e.g. "
        f"{suggest_scale(max(top_eigenvalue or 0.0, limit)):.3g}; lower influence_damping to keep λ = damping × "
        "scale), raise λ where the Hessian is indefinite, raise influence_batch_size, or use influence_solver='cg' "
        "(which refuses an indefinite H + λI)."
    )


def _adding(hvp_step: Callable[[int, Sequence[int], torch.Tensor], torch.Tensor]) -> Callable:
    """An ``hvp_step`` that returns its products as ``solve_lissa(accumulates=True)`` calls one: adding them."""

    def added(j: int, reps: Sequence[int], h: torch.Tensor, *, into: torch.Tensor, alpha: float) -> None:
        into.add_(hvp_step(j, reps, h), alpha=alpha)

    return added


def _divergence_message(step: int, growth: float | None, damping: float, scale: float,
                        top_eigenvalue: float | None, final: bool = False) -> str:
    what = (f"‖h_j‖ is {growth:.3g}x the bound of a convergent series (‖v‖·Σ(1 - damp)^i)"
            + (" at the last step" if final else " and has grown geometrically for several windows")
            if growth is not None else "the iterate became NaN/inf")
    lines = [
        f"LiSSA diverged at step {step}: {what}. With damp = {damping} and scale = {scale} (λ = {damping * scale:.4g}) "
        "a step contracts only if the batch Hessian's eigenvalues lie in (-λ, (2 - damp)·scale)."
    ]
    if top_eigenvalue is not None and abs(top_eigenvalue) >= scale * (1 - damping):
        lines.append(f"The batch Hessians' top eigenvalue is about {top_eigenvalue:.4g}: use influence_scale >= "
                     f"{suggest_scale(top_eigenvalue):.3g} (lower influence_damping to keep λ if needed).")
    else:
        lines.append(
            "Either raise influence_scale (top eigenvalue estimate: "
            f"{'unknown' if top_eigenvalue is None else f'{top_eigenvalue:.4g}'}; single batches can be larger, try "
            "10x), or, if the Hessian is indefinite (the model is not at a minimum), raise influence_damping so that "
            "λ exceeds its most negative eigenvalue; influence_solver='exact'/'cg' report the curvature, and "
            "influence_check_convergence=True estimates both ends of the spectrum before the recursion."
        )
    return " ".join(lines)
