"""Solver rails: iterates in float32 or wider whatever the model's dtype; LiSSA's divergence detection and its
convergence check look at what convergence depends on (batch Hessians, both ends of the spectrum)."""

import numpy as np
import pytest
import torch

from hf_fastif import InfluenceEngine, compute_influences
from hf_fastif.influence import default_arguments
from hf_fastif.solvers import (
    CarryCoefficient,
    LissaDivergenceError,
    converging_depth,
    solve_cg,
    solve_exact,
    solve_lissa,
    truncation_share,
)
from hf_fastif.solvers.arnoldi import (
    TRUNCATION_WARNING,
    low_rank_hessian,
    solve_low_rank,
    truncation_factor,
)
from hf_fastif.solvers.lanczos import extreme_eigenvalues, lanczos, seeded_direction
from tests.helpers import explicit_influence
from tests.tiny import HEAD_ONLY, TOP, make_token_dataset, tiny_model


# ---- LiSSA on explicit matrices --------------------------------------------------------------------------------
def spectrum_matrix(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return torch.tensor(q @ np.diag(eigenvalues) @ q.T), torch.tensor(q)


def explicit_step(matrix, noise=0.0, seed=0):
    """hvp_step of a fixed Hessian, optionally with PSD sampling noise (a batch Hessian = H + symmetric noise)."""
    gen = torch.Generator().manual_seed(seed)

    def step(j, reps, h):
        out = h @ matrix
        if noise:
            e = torch.randn(matrix.shape, generator=gen, dtype=matrix.dtype) * noise
            out = out + h @ (e @ e.T)
        return out

    return step


@pytest.mark.parametrize("mu", [0.0, -0.02])
def test_truncation_share_is_what_lissa_leaves_out_along_its_slowest_direction(mu):
    """Closed form: along an eigenvector of curvature μ (0: flat; negative: an indefinite H above -λ), J steps return
    (1 - ρ^(J+1)) of the fixed point v / (μ + λ), ρ = 1 - damp - μ/scale; a stiff direction converges at once."""
    damping, scale, depth = 0.01, 10.0, 30
    matrix, q = spectrum_matrix([mu, 1.0, 5.0])
    v = q[:, 0].clone()
    estimate, _ = solve_lissa(explicit_step(matrix), v, damping=damping, scale=scale, depth=depth,
                              repetitions=[0], progress=False)
    exact = v / (mu + damping * scale)
    returned = float(torch.dot(estimate, exact) / torch.dot(exact, exact))
    share = truncation_share(damping, scale, depth, mu if mu else None)
    assert share == pytest.approx((1 - damping - mu / scale) ** (depth + 1))
    assert 1 - returned == pytest.approx(share, rel=1e-9)
    assert share > 0.5  # J·damp = 0.3: most of the flat direction's component is missing
    stiff, _ = solve_lissa(explicit_step(matrix), q[:, 2].clone(), damping=damping, scale=scale, depth=depth,
                           repetitions=[0], progress=False)
    torch.testing.assert_close(stiff, q[:, 2] / (5.0 + damping * scale), rtol=1e-6, atol=0)
    assert truncation_share(damping, scale, depth, smallest_eigenvalue=0.5) == truncation_share(damping, scale, depth)
    # the advised depth leaves e^-5 (0.7%) out along that direction, as the paper's J·damp = 1000 × 5e-3 does; a
    # negative curvature needs more steps than 5 / damp (a review: 5/damp left 61% out at μ = -0.09, damp 0.01)
    needed = converging_depth(damping, scale, mu if mu else None)
    assert needed == round(5 / (damping + mu / scale))
    assert np.exp(-5) * 0.95 < truncation_share(damping, scale, needed, mu if mu else None) < np.exp(-5)
    assert converging_depth(5e-3, 1e4) == 1000


def test_lissa_detects_an_eigenvalue_below_minus_lambda():
    """One eigenvalue at -1.5λ with 3% of v along it: the series has no fixed point in that direction and grows by
    (1 + damp/2) per step. Without detection the estimate ends far off; it must be refused."""
    damp, scale = 0.01, 10.0
    lam = damp * scale
    values = np.r_[-1.5 * lam, np.linspace(0.5, 5.0, 19)]
    matrix, q = spectrum_matrix(values)
    v = q[:, 1:] @ torch.ones(19, dtype=torch.float64)
    v = v / v.norm() + 0.03 * q[:, 0]
    with pytest.raises(LissaDivergenceError, match="diverged at step"):
        solve_lissa(explicit_step(matrix), v, damping=damp, scale=scale, depth=1000, repetitions=[0], progress=False)


def test_lissa_converges_without_false_alarms():
    """Positive definite H + λI, deterministic and with sampling noise over long runs: no error, and the
    deterministic estimate is the closed form."""
    damp, scale = 0.01, 10.0
    matrix, q = spectrum_matrix(np.linspace(0.0, 5.0, 20))
    v = torch.ones(20, dtype=torch.float64)
    s, _ = solve_lissa(explicit_step(matrix), v, damping=damp, scale=scale, depth=3000, repetitions=[0],
                       progress=False)
    expected = torch.linalg.solve(matrix + damp * scale * torch.eye(20, dtype=torch.float64), v)
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-8)
    for seed in range(4):  # noisy batch Hessians (each PSD-perturbed): stationary noise, never "growth"
        solve_lissa(explicit_step(matrix, noise=0.3, seed=seed), v, damping=damp, scale=scale, depth=5000,
                    repetitions=[0], progress=False)


def test_the_repetitions_spread_is_the_standard_error_of_their_mean():
    """Ground truth: the T repetitions run one at a time (each draws its own noisy batch Hessians, by repetition and
    step), and the standard error of their mean, ``std(ddof=1) / sqrt(T)`` relative to the mean's norm, largest over
    the right-hand sides; as the engine combines it from processes holding 1 and 3 of the 4 repetitions too."""
    from hf_fastif.solvers import repetition_spread

    matrix, _ = spectrum_matrix(np.linspace(0.5, 4.0, 12))

    def step(j, reps, h):  # each repetition's batch Hessian at step j: H plus PSD noise drawn from (repetition, j)
        out = torch.empty_like(h)
        for r, rep in enumerate(reps):
            e = torch.randn(matrix.shape, generator=torch.Generator().manual_seed(1000 * rep + j),
                            dtype=matrix.dtype) * 0.6
            out[r] = h[r] @ (matrix + e @ e.T)
        return out

    v = torch.stack([torch.linspace(-1.0, 1.0, 12), torch.cos(torch.arange(12.0))]).double()
    kwargs = dict(damping=0.3, scale=20.0, depth=60, progress=False)
    singles = torch.stack([solve_lissa(step, v, repetitions=[r], **kwargs)[0] for r in range(4)])
    mean = singles.mean(0)
    expected = float(((singles - mean).norm(dim=-1).pow(2).sum(0) / 12).sqrt().div(mean.norm(dim=-1)).max())
    both, info = solve_lissa(step, v, repetitions=range(4), **kwargs)
    torch.testing.assert_close(both, mean, rtol=1e-12, atol=1e-14)
    assert repetition_spread(info["lissa_deviations"], both, 4) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01
    parts = [solve_lissa(step, v, repetitions=reps, **kwargs) for reps in ([0], [1, 2, 3])]
    combined = sum(info["lissa_deviations"] + len(reps) * (estimate - mean).norm(dim=-1) ** 2
                   for (estimate, info), reps in zip(parts, ([0], [1, 2, 3])))
    assert repetition_spread(combined, mean, 4) == pytest.approx(expected, rel=1e-9)


def test_lissa_applies_a_diagonal_part_of_the_hessian_exactly():
    """The L2 term's Hessian handed to solve_lissa as a diagonal gives the recursion over the whole matrix, and the
    closed form; a diagonal that makes an eigenvalue fall below -λ is still caught."""
    damp, scale = 0.01, 10.0
    matrix, _ = spectrum_matrix(np.linspace(0.0, 5.0, 20))
    diagonal = torch.tensor(np.r_[np.zeros(8), np.full(12, 0.4)])  # 2·wd on some entries only
    v = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64)
    for reps in ([0], [0, 1, 2]):
        split, _ = solve_lissa(explicit_step(matrix), v, damping=damp, scale=scale, depth=500, repetitions=reps,
                               progress=False, diagonal=diagonal)
        whole, _ = solve_lissa(explicit_step(matrix + torch.diag(diagonal)), v, damping=damp, scale=scale,
                               depth=500, repetitions=reps, progress=False)
        torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    full, _ = solve_lissa(explicit_step(matrix), v, damping=damp, scale=scale, depth=4000, repetitions=[0],
                          progress=False, diagonal=diagonal)
    expected = torch.linalg.solve(matrix + torch.diag(diagonal) + damp * scale * torch.eye(20, dtype=torch.float64), v)
    torch.testing.assert_close(full, expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(LissaDivergenceError):
        solve_lissa(explicit_step(matrix), v, damping=damp, scale=scale, depth=2000, repetitions=[0], progress=False,
                    diagonal=torch.full((20,), -1.0, dtype=torch.float64))


def test_a_short_recursion_that_blew_up_is_refused_at_its_last_step():
    """The windows' monitor needs 7 windows of at least 8 steps: 30 steps at a scale 4x too small came back as an
    s_test of 1e16 (55 steps: 1e28) against an explicit 14.6."""
    matrix, _ = spectrum_matrix([0.5, 1.0, 8.0])
    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match="at the last step"):
        solve_lissa(explicit_step(matrix), v, damping=0.01, scale=2.0, depth=30, repetitions=[0], progress=False)
    estimate, _ = solve_lissa(explicit_step(matrix), v, damping=0.01, scale=10.0, depth=30, repetitions=[0],
                              progress=False)  # a converging short recursion is not refused
    assert torch.isfinite(estimate).all()


def test_a_step_that_turns_the_iterate_against_v_is_refused():
    """A last step whose Hessian exceeds (2 - damp)·scale along v flips the iterate (h_J = v + ρ·h, ρ = -2.1) while
    its norm stays within the growth bounds: before the alignment check it came back as the answer negated (the
    quick tiny BERT at 0.75x the check's scale: Pearson -0.998 against CG). A converged run records cos(h_J, v)."""
    damp, scale, depth = 0.1, 4.0, 30
    calm, spike = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)), torch.diag(
        torch.tensor([12.0, 2.0], dtype=torch.float64))

    def step(j, reps, h):
        return h @ (spike if j == depth else calm)

    v = torch.tensor([1.0, 0.2], dtype=torch.float64)
    with pytest.raises(LissaDivergenceError, match=r"points away from the test gradient: repetition 1 .*"
                                                   r"right-hand side 0.*\(2 - damp\)·scale = 7\.6"):
        solve_lissa(step, v, damping=damp, scale=scale, depth=depth, repetitions=[1], progress=False)
    flipped, _ = solve_lissa(step, v, damping=damp, scale=scale, depth=depth - 1, repetitions=[1], progress=False)
    assert float(torch.dot(flipped, v)) > 0  # the same run a step earlier: on v's side, not refused

    estimate, info = solve_lissa(explicit_step(calm), v, damping=damp, scale=scale, depth=200, repetitions=[0, 1],
                                 progress=False)
    exact = torch.linalg.solve(calm + damp * scale * torch.eye(2, dtype=torch.float64), v)
    torch.testing.assert_close(estimate, exact)
    assert info["lissa_min_alignment"] == pytest.approx(float(torch.dot(exact, v) / exact.norm() / v.norm()))
    zero, info = solve_lissa(explicit_step(calm), torch.zeros(2, 2, dtype=torch.float64), damping=damp, scale=scale,
                             depth=5, repetitions=[0], progress=False)  # a zero gradient: nothing to point away from
    assert not zero.any() and info["lissa_min_alignment"] == 1.0


def test_a_product_that_is_not_finite_names_the_training_loss_not_the_scale(bert, pad_collator, monkeypatch):
    """A training row whose loss overflows (float16) or holds NaN: LiSSA blamed the scale ("raise influence_scale",
    which gave the same error 100x larger), exact failed with a bare LinAlgError ("ill-conditioned")."""
    import hf_fastif.engine as engine_module

    matrix, _ = spectrum_matrix([0.5, 1.0, 2.0])

    def overflowing(j, reps, h):
        return h @ matrix * (float("inf") if j == 3 else 1.0)

    with pytest.raises(LissaDivergenceError, match="step 3: the Hessian-vector product of the sampled training rows "
                                                   "is not finite"):
        solve_lissa(overflowing, torch.ones(3, dtype=torch.float64), damping=0.01, scale=10.0, depth=20,
                    repetitions=[0], progress=False)
    model, train, test = bert
    real = engine_module.s_test.build_hessian
    monkeypatch.setattr(engine_module.s_test, "build_hessian", lambda *a, **k: real(*a, **k) * float("nan"))
    args = default_arguments(influence_solver="exact", influence_params=[r"classifier\."], influence_knn_k=None,
                             disable_tqdm=True)
    with pytest.raises(FloatingPointError, match="The training Hessian holds inf/NaN"):  # (every loss finite: as is)
        compute_influences(model, train, test, args, data_collator=pad_collator)


def adding(step):
    """``step`` (an hvp_step returning its products) as solve_lissa's ``accumulates=True`` calls it."""

    def added(j, reps, h, *, into, alpha):
        into.add_(step(j, reps, h), alpha=alpha)

    return added


def test_products_added_into_the_next_iterate_give_the_same_recursion():
    """``accumulates=True`` (the engine's: each product added into the next iterate, never stored apart) runs the
    same recursion as products returned, with and without the L2 term's diagonal, over repetitions and several
    vectors; and a product that is not finite still names the training rows, not the scale."""
    matrix, _ = spectrum_matrix([0.05, 0.5, 1.0, 2.0])
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    for diagonal in (None, torch.tensor([0.1, 0.0, 0.2, 0.0], dtype=torch.float64)):
        settings = dict(damping=0.01, scale=10.0, depth=200, repetitions=[0, 3], progress=False, diagonal=diagonal)
        returned, _ = solve_lissa(explicit_step(matrix, noise=0.1, seed=4), v, **settings)
        added, _ = solve_lissa(adding(explicit_step(matrix, noise=0.1, seed=4)), v, accumulates=True, **settings)
        torch.testing.assert_close(added, returned, rtol=1e-12, atol=1e-12)
        assert returned.abs().max() > 1.0
    with pytest.raises(LissaDivergenceError, match="step 3: the Hessian-vector product of the sampled training rows "
                                                   "is not finite"):
        solve_lissa(adding(lambda j, reps, h: h @ matrix * (float("nan") if j == 3 else 1.0)), v, damping=0.01,
                    scale=10.0, depth=20, repetitions=[0], progress=False, accumulates=True)


def test_a_carry_written_range_by_range_gives_the_same_recursion():
    """``carries=True`` (the grouped route's: the carried part ``v + (1 - damp)·h`` written range by range just
    before a block's products are added, the rest after the step) runs the same recursion as the carried part
    written whole ahead, with and without the L2 term's diagonal; a range is carried once, so products added there
    stay; a step that carries nothing gets it all from `Carry.finish`; a partly overlapping range is refused."""
    matrix, _ = spectrum_matrix([0.05, 0.5, 1.0, 2.0, 3.0])
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.2], [0.0, 1.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    step = None  # (a fresh noisy step per run: its generator draws as it goes)

    def by_ranges(j, reps, h, *, into, alpha, carry):
        products = step(j, reps, h)
        # [3, 5) twice, half its products each time: carried once, the first half kept; [2, 2) a parameter of no
        # entries, starting where the next one starts (nothing carried, no overlap)
        for start, end in ((3, 5), (0, 2), (3, 5), (2, 2), (2, 3)):
            carry.part(start, end)
            into[..., start:end] += alpha * products[..., start:end] / (2 if start == 3 else 1)

    def whole(j, reps, h, *, into, alpha, carry):
        products = step(j, reps, h)
        carry.finish()
        into.add_(products, alpha=alpha)
        carry.part(1, 3)  # (after finish everything is carried: nothing is written again)

    for diagonal in (None, torch.tensor([0.1, 0.0, 0.2, 0.0, 0.3], dtype=torch.float64)):
        settings = dict(damping=0.01, scale=10.0, depth=200, repetitions=[0, 3], progress=False, diagonal=diagonal)
        returned, _ = solve_lissa(explicit_step(matrix, noise=0.1, seed=4), v, **settings)
        for carrying in (by_ranges, whole):
            step = explicit_step(matrix, noise=0.1, seed=4)
            carried, _ = solve_lissa(carrying, v, accumulates=True, carries=True, **settings)
            torch.testing.assert_close(carried, returned, rtol=1e-12, atol=1e-12)
        assert returned.abs().max() > 1.0
    # a step that adds nothing: the whole carried part comes from finish (H = 0: h → v / damp)
    nothing, _ = solve_lissa(lambda j, reps, h, *, into, alpha, carry: None, v, damping=0.5, scale=1.0, depth=60,
                             repetitions=[0], progress=False, accumulates=True, carries=True)
    torch.testing.assert_close(nothing, v / 0.5, rtol=1e-12, atol=1e-12)

    for second in ((0, 2), (2, 4)):  # the same start, another end; a range straddling the first one's end

        def overlapping(j, reps, h, *, into, alpha, carry, second=second):
            carry.part(0, 3)
            carry.part(*second)

        with pytest.raises(RuntimeError, match="overlaps a range carried before"):
            solve_lissa(overlapping, v, damping=0.01, scale=10.0, depth=2, repetitions=[0], progress=False,
                        accumulates=True, carries=True)
    with pytest.raises(ValueError, match="carries=True needs accumulates=True"):
        solve_lissa(explicit_step(matrix), v, damping=0.01, scale=10.0, depth=2, repetitions=[0], progress=False, carries=True)


def test_an_iterate_written_in_place_gives_the_same_recursion():
    """``in_place=True``: the step writes the next iterate over its input (``into`` is ``h``), having read what its
    products need first. The same recursion as into a spare buffer, bitwise, with and without the L2 term's
    diagonal, over repetitions and one vector; products that are not finite are still named as such (the input's
    norm from the step before says it was finite)."""
    matrix, _ = spectrum_matrix([0.05, 0.5, 1.0, 2.0, 3.0])
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.2]], dtype=torch.float64)
    seen = []

    def by_ranges(step):
        def run(j, reps, h, *, into, alpha, carry):
            seen.append(into.data_ptr() == h.data_ptr())
            products = step(j, reps, h)  # (read before anything is written)
            for start, end in ((3, 5), (0, 3)):
                carry.part(start, end)
                into[..., start:end] += alpha * products[..., start:end]
        return run

    for diagonal in (None, torch.tensor([0.1, 0.0, 0.2, 0.0, 0.3], dtype=torch.float64)):
        settings = dict(damping=0.01, scale=10.0, depth=200, repetitions=[0, 3], progress=False, diagonal=diagonal,
                        accumulates=True, carries=True)
        spare, _ = solve_lissa(by_ranges(explicit_step(matrix, noise=0.1, seed=4)), v, **settings)
        seen.clear()
        written, _ = solve_lissa(by_ranges(explicit_step(matrix, noise=0.1, seed=4)), v, in_place=True, **settings)
        assert seen and all(seen)
        assert torch.equal(written, spare) and written.abs().max() > 1.0

    def nan_at_3(j, reps, h, *, into, alpha, carry):
        products = h @ matrix * (float("nan") if j == 3 else 1.0)
        carry.finish()
        into.add_(products, alpha=alpha)

    with pytest.raises(LissaDivergenceError, match="step 3: the Hessian-vector product of the sampled training rows "
                                                   "is not finite"):
        solve_lissa(nan_at_3, v, damping=0.01, scale=10.0, depth=20, repetitions=[0], progress=False,
                    accumulates=True, carries=True, in_place=True)

    with pytest.raises(ValueError, match="in_place=True needs carries=True"):
        solve_lissa(explicit_step(matrix), v, damping=0.01, scale=10.0, depth=2, repetitions=[0], progress=False,
                    accumulates=True, in_place=True)
    # two vectors: a carried range is written for both at once, over the second's input before its products
    with pytest.raises(ValueError, match="in_place=True takes one right-hand side, not 2"):
        solve_lissa(nan_at_3, torch.cat([v, v]), damping=0.01, scale=10.0, depth=2, repetitions=[0], progress=False,
                    accumulates=True, carries=True, in_place=True)


def test_the_carried_coefficient_is_written_run_by_run_with_the_same_values(monkeypatch):
    """`CarryCoefficient` writes ``v + c ⊙ h`` with a scalar ``c`` over each run of equal entries (the L2 term's
    diagonal is constant over a parameter), over any range, runs split where the range crosses them; with too many
    runs it multiplies by ``c`` entry by entry. Both equal the formula; ``c = 1 - damping`` without a diagonal."""
    generator = torch.Generator().manual_seed(0)
    p = 50
    v, h = torch.randn(2, p, generator=generator), torch.randn(3, 2, p, generator=generator)
    runs = torch.tensor([0.9] * 7 + [0.8] * 20 + [0.9] * 3 + [0.8] * 20)  # parameters alternately decayed or not
    for coefficient, many in ((runs, False), (None, False), (runs, True), (torch.rand(p, generator=generator), True)):
        if many:
            monkeypatch.setattr(CarryCoefficient, "MAX_RUNS", 3)
        written = CarryCoefficient(0.1, coefficient)
        assert (written._per_entry is not None) == (many and coefficient is not None)
        expected = v + (0.9 if coefficient is None else coefficient) * h
        out = torch.full_like(h, float("nan"))
        for start, end in ((0, 5), (5, 29), (29, 29), (29, 50)):  # inside a run, across runs, empty, to the end
            written.write(v, h, out, start, end)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        monkeypatch.undo()


def test_lissa_nan_is_divergence():
    def step(j, reps, h):
        return h * float("nan") if j == 5 else h

    with pytest.raises(LissaDivergenceError, match="NaN"):
        solve_lissa(step, torch.ones(4), damping=0.1, scale=10.0, depth=20, repetitions=[0], progress=False)


def test_smallest_eigenvalue_estimate_is_not_biased_by_outliers_in_float32():
    """A Hessian-like spectrum: a bulk near zero reaching -0.05 and a few large outliers. Lanczos without
    reorthogonalisation estimates the smallest eigenvalue at +0.01 to +0.07 in float32 (the outliers leak back),
    which would accept LiSSA on an indefinite H + λI; the check's estimate must stay negative."""
    p = 3000
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        spectrum = torch.cat([torch.linspace(-0.05, 0.5, p - 3), torch.tensor([2e3, 8e2, 3e2])])
        q = torch.linalg.qr(torch.randn(p, p, generator=gen))[0]
        matrix = (q * spectrum) @ q.T
        low, high = extreme_eigenvalues(lambda x, m=matrix: m @ x, p, iterations=7, seed=seed)
        assert low < -0.005, low
        assert high == pytest.approx(2e3, rel=1e-3)


def test_the_three_term_recurrence_keeps_the_largest_estimate_within_the_spectrum():
    """The convergence check's batch runs read the largest Ritz value only, and skip the full reorthogonalisation
    (`extreme_eigenvalues(reorthogonalise=False)`): in float32, on spectra with outliers and with a clustered top,
    over many steps (where the basis loses orthogonality), the largest estimate must never exceed the true largest
    eigenvalue beyond rounding, and at the check's 5 steps it equals the reorthogonalised run's to rounding."""
    p = 2000
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(p, p, generator=gen))[0]
        for spectrum in (torch.cat([torch.linspace(-0.05, 0.5, p - 3), torch.tensor([2e3, 8e2, 3e2])]),
                         torch.cat([torch.linspace(0.0, 1.0, p - 4), torch.tensor([5.0, 5.0 - 1e-4, 4.9, 4.8])])):
            matrix = (q * spectrum) @ q.T
            top = float(spectrum.max())
            for steps in (5, 40):
                _, plain = extreme_eigenvalues(lambda x, m=matrix: m @ x, p, iterations=steps, seed=seed,
                                               reorthogonalise=False)
                _, full = extreme_eigenvalues(lambda x, m=matrix: m @ x, p, iterations=steps, seed=seed)
                assert plain <= top * (1 + 1e-5), (steps, plain, top)
                if steps == 5:
                    assert plain == pytest.approx(full, rel=1e-5)


# ---- the convergence check on a model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert"), make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)


def per_row_top_eigenvalues(model, train, collator, names):
    from hf_fastif.batches import Batcher, validate_dataset
    from hf_fastif.hvp import batch_hvp
    from hf_fastif.loss import FunctionalModel
    from hf_fastif.params import num_parameters, select_parameters

    params = select_parameters(model, names)
    fm = FunctionalModel(model, list(params))
    batcher = Batcher(train, validate_dataset(train, "t", model), collator, "cpu")
    p = num_parameters(params)
    tops = []
    for i in range(len(train)):
        batch = batcher.batch([i])
        tops.append(extreme_eigenvalues(lambda x, b=batch: batch_hvp(fm, params, b, x), p, iterations=20,
                                        dtype=torch.float64)[1])
    mean = extreme_eigenvalues(lambda x: sum(batch_hvp(fm, params, batcher.batch([i]), x)
                                             for i in range(len(train))) / len(train), p, iterations=20,
                               dtype=torch.float64)
    return np.array(tops), mean


def test_the_check_looks_at_single_row_hessians_for_b_1(bert, pad_collator):
    """With B = 1 each LiSSA step multiplies by one row's Hessian, whose top eigenvalue exceeds the mean
    Hessian's: a scale between the two must be refused (a check on the mean Hessian lets it through)."""
    model, train, test = bert
    names = HEAD_ONLY["bert"]
    rows, (mean_low, mean_top) = per_row_top_eigenvalues(model, train, pad_collator, names)
    assert np.median(rows) > 1.5 * mean_top
    damp = 1e-3
    scale = float(np.median(rows)) / 2 / 1.1  # (2 - damp)·scale below most rows' tops, far above the mean's
    assert (2 - damp) * scale > 1.3 * mean_top
    args = default_arguments(influence_solver="lissa", influence_params=names, influence_damping=damp,
                             influence_scale=scale, influence_batch_size=1, influence_recursion_depth=5,
                             influence_knn_k=None, disable_tqdm=True)
    with pytest.raises(LissaDivergenceError, match=r"1-row batch .* below \(2 - damp\)·scale"):
        compute_influences(model, train, test, args, data_collator=pad_collator)


def test_the_engine_refuses_an_estimate_against_the_test_gradient(bert, pad_collator):
    """One LiSSA step over every row (the mean Hessian, no sampling) at a scale 1.25x below what the test gradient's
    own curvature needs: h_1 = (2 - damp)·v - Hv/scale has v·h_1 < 0, within the growth bounds; the check off, the
    engine must refuse it rather than return the influence negated. At 2x the scale it is returned, its alignment
    in the diagnostics."""
    from hf_fastif.batches import Batcher, validate_dataset
    from hf_fastif.hvp import batch_gradient, batch_hvp
    from hf_fastif.loss import FunctionalModel
    from hf_fastif.params import select_parameters

    model, train, test = bert
    names = HEAD_ONLY["bert"]
    params = select_parameters(model, names)
    fm = FunctionalModel(model, list(params))
    v = batch_gradient(fm, params, Batcher(test, validate_dataset(test, "t", model), pad_collator, "cpu").batch([0]))
    every = Batcher(train, validate_dataset(train, "t", model), pad_collator, "cpu").batch(list(range(len(train))))
    curvature = float(torch.dot(v, batch_hvp(fm, params, every, v)) / torch.dot(v, v))
    assert curvature > 0
    damp = 0.01
    one_step = dict(influence_solver="lissa", influence_params=names, influence_damping=damp,
                    influence_batch_size=len(train), influence_recursion_depth=1, influence_knn_k=None,
                    influence_check_convergence=False, disable_tqdm=True)
    with pytest.raises(LissaDivergenceError, match="points away from the test gradient"):
        compute_influences(model, train, test.select([0]), default_arguments(
            **one_step, influence_scale=curvature / (2 - damp) / 1.25), data_collator=pad_collator)
    table = compute_influences(model, train, test.select([0]), default_arguments(
        **one_step, influence_scale=2 * curvature / (2 - damp)), data_collator=pad_collator)
    assert 0 < table.metadata["diagnostics"]["lissa_min_alignment"] <= 1


def test_the_check_refuses_lambda_below_the_most_negative_eigenvalue(bert, pad_collator):
    """A random-init BERT is not at a minimum; with λ at 0.85 of |λ_min| exact and cg refuse, and so must LiSSA."""
    model, train, test = bert
    import hf_fastif.engine as engine_module

    names = [n for n, _ in model.named_parameters() if n.startswith(("bert.encoder.layer.1.", "bert.pooler",
                                                                      "classifier"))]
    sample = train.select(range(min(engine_module.s_test.CHECK_ROWS, len(train))))
    _, evals = explicit_influence(model, names, sample, test, pad_collator, 1.0)
    lo = float(evals.min())
    assert lo < 0
    lam = 0.85 * -lo
    for solver in ("exact", "cg", "lissa"):
        args = default_arguments(influence_solver=solver, influence_params=TOP["bert"],
                                 influence_damping=lam / 100.0, influence_scale=100.0,
                                 influence_recursion_depth=50, influence_batch_size=4, influence_knn_k=None,
                                 disable_tqdm=True)
        with pytest.raises(ValueError, match="not positive definite"):
            compute_influences(model, sample, test, args, data_collator=pad_collator)


def test_a_negative_sample_estimate_is_confirmed_on_more_rows_before_refusing(bert, pad_collator, monkeypatch):
    """A few rows' Hessian is more indefinite than the whole set's: a λ between the two estimates must run (the
    confirmation on the set overrules the sample), and a λ below both must be refused naming the confirming rows."""
    import hf_fastif.engine as engine_module

    model, train, test = bert
    monkeypatch.setattr(engine_module.s_test, "CHECK_ROWS", 3)
    settings = dict(influence_solver="lissa", influence_params=TOP["bert"], influence_scale=100.0, influence_recursion_depth=20,
                    influence_batch_size=4, influence_knn_k=None, disable_tqdm=True)
    probe = InfluenceEngine(model, default_arguments(**settings, influence_damping=1e-6), data_collator=pad_collator)
    with pytest.raises(LissaDivergenceError, match=f"Lanczos on {len(train)} rows"):
        probe.compute_influences(train, test)
    (found,) = probe._curvature.values()
    sample, whole = found["hessian_min_eigenvalue_estimate"], found["hessian_min_eigenvalue_confirmed"]
    assert found["lissa_check_rows"] == 3 and found["lissa_confirm_rows"] == len(train)
    assert sample < whole < 0, (sample, whole)  # the 3-row estimate is the more negative
    lam = -(sample + whole) / 2  # refused by the sample alone, accepted by the set
    args = default_arguments(**settings, influence_damping=lam / 100.0)
    table = compute_influences(model, train, test, args, data_collator=pad_collator)
    diagnostics = table.metadata["diagnostics"]
    assert diagnostics["hessian_min_eigenvalue_confirmed"] == pytest.approx(whole)
    assert np.isfinite(table.dataset["influence"]).all()


def test_a_sample_estimate_near_minus_lambda_is_confirmed_on_more_rows_too(bert, pad_collator, monkeypatch):
    """Only an estimate below -λ was confirmed: a sample less indefinite than the set (a 32-row -0.055 against the
    set's -0.084, λ 0.069) let LiSSA run on an indefinite H + λI, and it came back 2x off where exact and cg refuse.
    The sample's estimate stands in here for such a sample: clear of -λ, but by less than half of λ."""
    import hf_fastif.engine as engine_module

    model, train, test = bert
    monkeypatch.setattr(engine_module.s_test, "CHECK_ROWS", 3)
    settings = dict(influence_solver="lissa", influence_params=TOP["bert"], influence_scale=100.0, influence_recursion_depth=20,
                    influence_batch_size=4, influence_knn_k=None, disable_tqdm=True)
    probe = InfluenceEngine(model, default_arguments(**settings, influence_damping=1e-6), data_collator=pad_collator)
    with pytest.raises(LissaDivergenceError):
        probe.compute_influences(train, test)
    (found,) = probe._curvature.values()
    whole = found["hessian_min_eigenvalue_confirmed"]
    lam = 0.8 * -whole  # below the set's |λ_min|: H + λI is indefinite
    real, estimates = engine_module.s_test.extreme_eigenvalues, []

    def sample_clear_of_lambda(operator, p, iterations, **kwargs):
        low, high = real(operator, p, iterations=iterations, **kwargs)
        if iterations == engine_module.s_test.CHECK_ITERATIONS + 2:  # the smallest-eigenvalue estimates
            estimates.append(low)
            if len(estimates) == 1:  # the sample's
                return -0.6 * lam, high
        return low, high

    monkeypatch.setattr(engine_module.s_test, "extreme_eigenvalues", sample_clear_of_lambda)
    with pytest.raises(LissaDivergenceError, match=f"not positive definite.*Lanczos on {len(train)} rows"):
        compute_influences(model, train, test, default_arguments(**settings, influence_damping=lam / 100.0),
                           data_collator=pad_collator)
    assert len(estimates) == 2


# ---- dtypes ----------------------------------------------------------------------------------------------------
def test_bf16_model_gives_float32_accurate_lissa(pad_collator):
    """The paper's LiSSA settings on a bf16 model vs the same weights in float64 with the same seed: the iterate
    lives in float32, so only the bf16 products themselves differ (the iterate in bf16 was 37% off)."""
    from tests.tiny import train_tiny

    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    trained = train_tiny(tiny_model("bert", dtype=torch.float32), train, pad_collator, epochs=10)
    model16 = tiny_model("bert", dtype=torch.bfloat16)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in trained.state_dict().items()})
    model64 = tiny_model("bert", dtype=torch.float64)
    model64.load_state_dict({k: v.to(torch.float64) for k, v in model16.state_dict().items()})
    args = default_arguments(influence_solver="lissa", influence_params=TOP["bert"], influence_damping=5e-3,
                             influence_scale=1e4, influence_recursion_depth=1000, influence_batch_size=1,
                             influence_repetitions=1, influence_knn_k=None, influence_check_convergence=False,
                             disable_tqdm=True)
    ref = compute_influences(model64, train, test, args, data_collator=pad_collator).to_pandas()
    got = compute_influences(model16, train, test, args, data_collator=pad_collator).to_pandas()
    ref, got = (f.sort_values(["test_id", "train_id"]).influence.to_numpy() for f in (ref, got))
    error = np.abs(got - ref).max() / np.abs(ref).max()
    assert error < 0.01, error  # measured 0.2% (the iterate in bf16: tens of %)


@pytest.mark.usefixtures("propagating")
def test_half_precision_influence_parameters_are_warned_with_the_float32_copy(pad_collator, caplog):
    """A bfloat16 model's influence was ~0.3% off, as documented, but its rankings moved (Spearman 0.84 with float64
    in a review's check) without a word; its float32 copy is not warned."""
    import logging

    train, test = make_token_dataset(12, seed=0), make_token_dataset(1, seed=1)
    args = default_arguments(influence_solver="exact", influence_params=[r"classifier\."], influence_damping=0.05,
                             influence_scale=20.0, influence_knn_k=None, disable_tqdm=True)
    model16 = tiny_model("bert", dtype=torch.bfloat16)
    logging.Logger.warning_once.cache_clear()  # (transformers' once per process: other tests may have said it)
    with caplog.at_level(logging.WARNING):
        compute_influences(model16.float(), train, test, args, data_collator=pad_collator)
        assert "of the model's parameters are" not in caplog.text
        compute_influences(model16.to(torch.bfloat16), train, test, args, data_collator=pad_collator)
        model16.classifier.float()  # float32 influence parameters on a bf16 trunk: its forwards are bf16 all the same
        model16.classifier.register_forward_pre_hook(lambda m, a: tuple(x.to(m.weight.dtype) for x in a))
        compute_influences(model16, train, test, args, data_collator=pad_collator)
    trunk = sum(p.numel() for p in model16.parameters() if p.dtype == torch.bfloat16)
    assert f"{trunk:,} of the model's parameters are bfloat16: its forwards" in caplog.text
    count = sum(p.numel() for p in model16.parameters())
    assert (f"{count:,} of the model's parameters are bfloat16: its forwards and Hessian-vector products run in that "
            "precision" in caplog.text)
    assert "copy.deepcopy(model).float()" in caplog.text


@pytest.mark.parametrize("solver", ["cg", "exact", "arnoldi"])
def test_half_precision_models_with_dense_solvers(pad_collator, solver):
    model64 = tiny_model("bert", dtype=torch.float64)
    model16 = tiny_model("bert", dtype=torch.float16)
    model64.load_state_dict({k: v.to(torch.float64) for k, v in model16.state_dict().items()})
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(influence_solver=solver, influence_params=HEAD_ONLY["bert"],
                             influence_damping=0.05, influence_scale=20.0, influence_knn_k=None,
                             influence_arnoldi_rank=306, disable_tqdm=True)
    ref = compute_influences(model64, train, test, args, data_collator=pad_collator).to_pandas()
    got = compute_influences(model16, train, test, args, data_collator=pad_collator).to_pandas()
    ref, got = (f.sort_values(["test_id", "train_id"]).influence.to_numpy() for f in (ref, got))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.02


def test_mixed_dtype_parameters_keep_each_tangent_in_its_dtype(pad_collator, monkeypatch):
    """A bf16 pooler next to an fp32 classifier: JVP scoring agrees with per-example gradients to bf16 rounding,
    clearly better than with every tangent cast to the first parameter's dtype (bf16)."""
    import hf_fastif.hvp as hvp

    model = tiny_model("bert", dtype=torch.float32)
    model.bert.pooler.to(torch.bfloat16)
    model.bert.pooler.register_forward_pre_hook(lambda m, a: (a[0].to(torch.bfloat16),))
    model.classifier.register_forward_pre_hook(lambda m, a: (a[0].to(torch.float32),))
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)

    def run(scoring):
        args = default_arguments(influence_solver="cg", influence_params=HEAD_ONLY["bert"],
                                 influence_damping=0.05, influence_scale=20.0, influence_knn_k=None,
                                 influence_scoring=scoring, disable_tqdm=True)
        frame = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
        return frame.sort_values(["test_id", "train_id"]).influence.to_numpy()

    grad = run("grad")
    error = np.abs(run("jvp") - grad).max() / np.abs(grad).max()
    real_unflatten = hvp.unflatten
    monkeypatch.setattr(hvp, "unflatten", lambda v, like: {n: t.to(torch.bfloat16)
                                                           for n, t in real_unflatten(v, like).items()})
    one_dtype = np.abs(run("jvp") - grad).max() / np.abs(grad).max()
    assert error < 5e-4 and error < one_dtype / 2, (error, one_dtype)


def test_cg_refuses_a_non_finite_right_hand_side():
    with pytest.raises(FloatingPointError, match="not finite"):
        solve_cg(lambda m: m, torch.tensor([1.0, float("nan")]), 0.1, progress=False)


def test_cg_refuses_to_return_noise_on_a_singular_hessian(pad_collator):
    """λ = 0 on a singular Hessian (51 classifier parameters, 12 rows): CG ran its 200 iterations to a relative
    residual of 1e11 and returned influence values up to 2e13 (the minimum-norm answer's are ~25) with only a
    warning. A residual of 1 or more is worse than x = 0: refused, naming the fix."""
    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(12, seed=0, num_labels=3), make_token_dataset(2, seed=1, num_labels=3)
    args = default_arguments(influence_solver="cg", influence_damping=0.0, influence_scale=1.0, influence_knn_k=None,
                             influence_params=[r"classifier\."], disable_tqdm=True)
    with pytest.raises(ValueError, match=r"CG did not converge and its iterate blew up.*raise influence_damping"):
        compute_influences(model, train, test, args, data_collator=pad_collator)
    args.influence_damping = 1e-2  # the same call with λ > 0 converges
    assert compute_influences(model, train, test, args, data_collator=pad_collator).metadata[
        "diagnostics"]["cg_relative_residual"] < 1e-9


def test_cg_returns_an_unconverged_iterate_that_did_not_blow_up():
    """CG minimises the error in H's norm, not the residual: after few iterations on an ill-conditioned (but
    positive definite) system the residual can exceed ‖v‖ while the iterate is already closer than x = 0. That is
    returned (with a warning), not refused as a blow-up."""
    matrix = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
    v = torch.tensor([1.0, 0.1], dtype=torch.float64)
    x, info = solve_cg(lambda m: m @ matrix, v, 0.0, max_iterations=1, progress=False)
    assert info["cg_relative_residual"] > 4  # 4.95: above 1, yet
    exact = torch.linalg.solve(matrix, v)
    error = lambda y: float((y - exact) @ matrix @ (y - exact)) ** 0.5  # noqa: E731
    assert error(x) < 0.75 * error(torch.zeros(2, dtype=torch.float64))
    spectrum, _ = spectrum_matrix(np.geomspace(1e-2, 1e2, 30))  # cond 1e4 with λ = 0.01, 5 iterations
    x, info = solve_cg(lambda m: m @ spectrum, torch.ones(30, dtype=torch.float64), 0.01, max_iterations=5,
                       progress=False)
    assert torch.isfinite(x).all() and info["cg_iterations"] == 5


def test_cg_tolerance_is_reachable_in_float32():
    matrix, _ = spectrum_matrix(np.linspace(0.1, 5.0, 30))
    v = torch.ones(30, dtype=torch.float32)
    x, info = solve_cg(lambda m: m @ matrix.float(), v, 0.1, max_iterations=500, progress=False)
    assert info["cg_iterations"] < 100 and info["cg_relative_residual"] <= 1e-5


# ---- the low-rank (arnoldi) solver --------------------------------------------------------------------------
def test_low_rank_solver_is_the_truncated_eigendecomposition():
    matrix, q = spectrum_matrix(np.r_[np.linspace(0.01, 0.1, 27), 3.0, 5.0, 9.0])
    v = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values, vectors = low_rank_hessian(lambda x: matrix @ x, 30, 3, iterations=30, dtype=torch.float64)
    np.testing.assert_allclose(sorted(values.tolist()), [3.0, 5.0, 9.0], rtol=1e-8)
    lam = 0.2
    top = q[:, -3:]
    truncated = top @ torch.diag(torch.tensor([3.0, 5.0, 9.0], dtype=torch.float64)) @ top.T
    expected = torch.linalg.solve(truncated + lam * torch.eye(30, dtype=torch.float64), v.T).T
    got, _ = solve_low_rank(values, vectors, v, lam)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    one, _ = solve_low_rank(values, vectors, v[1], lam)  # a single (p,) vector, and float32 vectors
    torch.testing.assert_close(one, expected[1], rtol=1e-7, atol=1e-9)
    single, _ = solve_low_rank(values, vectors.float(), v.float(), lam)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, expected.float(), rtol=1e-4, atol=1e-5)
    # the eigenvalues stay on the CPU (Lanczos' tridiagonal solve) while the vectors sit on the model's device:
    # "meta" stands in for a GPU, where mixing them would raise
    moved, _ = solve_low_rank(values, vectors.to("meta"), v.to("meta"), lam)
    assert moved.device.type == "meta" and moved.shape == v.shape
    with pytest.raises(ValueError, match="not positive definite"):
        solve_low_rank(torch.tensor([-1.0, 2.0], dtype=torch.float64), vectors[:2], v, 0.5)


def test_low_rank_solver_keeps_measured_negative_curvature_and_refuses_by_it():
    """A negative Ritz value of small magnitude fell outside the top-|μ| ranks: the solve returned values (0.89 off
    on a LayerNorm-only selection) and reported a positive smallest eigenvalue, where exact / cg / lissa refuse."""
    matrix, q = spectrum_matrix(np.r_[-0.02, np.linspace(0.01, 0.1, 26), 3.0, 5.0, 9.0])
    values, vectors = low_rank_hessian(lambda x: matrix @ x, 30, 3, iterations=30, dtype=torch.float64)
    assert len(values) == 4 and float(values.min()) == pytest.approx(-0.02, rel=1e-8)
    v = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="eigenvalue of about -0.02 and λ = 0.01"):
        solve_low_rank(values, vectors, v, 0.01)
    got, info = solve_low_rank(values, vectors, v, 0.2)  # λ above it: solved, with that direction as measured
    assert info["hessian_min_ritz_value"] == pytest.approx(-0.02, rel=1e-8) and info["arnoldi_rank"] == 4
    kept = q[:, [0, -3, -2, -1]]
    low = kept @ torch.diag(torch.tensor([-0.02, 3.0, 5.0, 9.0], dtype=torch.float64)) @ kept.T
    torch.testing.assert_close(got, torch.linalg.solve(low + 0.2 * torch.eye(30, dtype=torch.float64), v))


def test_the_low_rank_truncation_factor_is_not_hidden_by_the_appended_negative_pair():
    """The rank's bound was taken over every kept value, the appended most negative pair included: its small |μ|
    (Lanczos' unconverged estimate of a negative eigenvalue) read as the smallest kept magnitude and hid a rank too
    low (a review's tiny BERT: s_test 0.99 off the exact solve, factor 1.18, no warning). It is now taken over the
    top-``rank`` values; where the values cover every parameter (the appended pair the last), it stays 1."""
    spectrum = np.r_[-0.016, np.linspace(-0.01, 0.02, 56), 0.3, 6.2]
    p, lam = len(spectrum), 0.02
    matrix, _ = spectrum_matrix(spectrum)
    v = torch.randn(p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(matrix + lam * torch.eye(p, dtype=torch.float64), v)
    values, vectors = low_rank_hessian(lambda x: matrix @ x, p, 2, dtype=torch.float64)
    assert len(values) == 3 and -0.016 < float(values[-1]) < 0  # (the appended pair, unconverged)
    got, info = solve_low_rank(values, vectors, v, lam, rank=2)
    assert float((got - exact).norm() / exact.norm()) > 0.5  # (the solve is far off: a warning is due)
    assert info["arnoldi_truncation_factor"] == pytest.approx((0.3 + lam) / lam, rel=1e-3)  # (m: the top 2)
    assert truncation_factor(values, p, lam) < TRUNCATION_WARNING  # (the old reading: every value counted)
    # 4 parameters, rank 3 and the appended pair: every direction kept, the solve exact, nothing to warn of
    matrix, _ = spectrum_matrix(np.array([5.0, 1.0, 0.5, -0.05]))
    values, vectors = low_rank_hessian(lambda x: matrix @ x, 4, 3, dtype=torch.float64)
    v4 = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, info = solve_low_rank(values, vectors, v4, 0.1, rank=3)
    assert len(values) == 4 and info["arnoldi_truncation_factor"] == 1.0
    torch.testing.assert_close(got, torch.linalg.solve(matrix + 0.1 * torch.eye(4, dtype=torch.float64), v4))


@pytest.mark.parametrize("loss_scale", [1.0, 1e-11])
def test_low_rank_solver_finds_repeated_eigenvalues_at_any_loss_scale(loss_scale):
    """From one start vector Lanczos sees one direction per eigenspace: a Hessian whose eigenvalues repeat (a
    linear head with K outputs on frozen features: I_K ⊗ XᵀX) stopped after 6 of 18 pairs, and the solve treated the
    rest as flat (45x off). Its stopping rule was absolute, so a loss scaled by 1e-11 kept 1 pair (0.23 off)."""
    base, _ = spectrum_matrix(np.linspace(0.4, 1.2, 6))
    matrix = torch.kron(torch.eye(3, dtype=torch.float64), base) * loss_scale
    v = torch.randn(18, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lam = 1e-3 * loss_scale
    exact = torch.linalg.solve(matrix + lam * torch.eye(18, dtype=torch.float64), v)
    values, vectors = low_rank_hessian(lambda x: matrix @ x, 18, 18, dtype=torch.float64)
    assert len(values) == 18
    got, _ = solve_low_rank(values, vectors, v, lam)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=0.0)
    low, high = extreme_eigenvalues(lambda x: matrix @ x, 18, iterations=18, dtype=torch.float64)
    assert low == pytest.approx(0.4 * loss_scale, rel=1e-8) and high == pytest.approx(1.2 * loss_scale, rel=1e-8)


def test_lanczos_sees_a_closed_krylov_space_in_float32():
    """In float32 the breakdown test sat below rounding: a residual of pure noise inside the basis' span became a
    "new" direction. The identity's extreme eigenvalues came out (-0.0014, 2.0014), its top 4 as [10.9, -8.9, 1.9,
    1.0] (so the low-rank solve refused it as indefinite), a rank-1 operator's as (-0.0018, 2.0)."""
    low, high = extreme_eigenvalues(lambda x: x, 50, iterations=8, dtype=torch.float32)
    assert low == pytest.approx(1.0, abs=1e-5) and high == pytest.approx(1.0, abs=1e-5)
    values, _ = low_rank_hessian(lambda x: x, 200, 4, dtype=torch.float32)
    np.testing.assert_allclose(values.numpy(), 1.0, atol=1e-5)
    # an operator that hands back its very input: the basis it was given stays as it was (w is made orthogonal in
    # place), so the Ritz vectors keep unit norm
    _, ritz = lanczos(lambda x: x, 200, 4, dtype=torch.float32)
    np.testing.assert_allclose(ritz.norm(dim=1).numpy(), 1.0, atol=1e-5)
    u = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    u /= u.norm()
    low, high = extreme_eigenvalues(lambda x: u * (u @ x), 10_000, iterations=8, dtype=torch.float32)
    assert low == pytest.approx(0.0, abs=1e-5) and high == pytest.approx(1.0, abs=1e-5)


def test_low_rank_solve_keeps_a_diagonal_curvature_exactly():
    """``(V diag(μ) Vᵀ + C + λI)⁻¹ v`` against a dense solve: C on some coordinates only (Woodbury), C constant
    (folded into λ), and an indefinite low-rank term that C + λ does not outweigh refused."""
    gen = torch.Generator().manual_seed(1)
    vectors = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64, generator=gen))[0].T  # (4, 30) orthonormal
    values = torch.tensor([7.0, 2.0, 0.5, -0.05], dtype=torch.float64)
    v = torch.randn(3, 30, dtype=torch.float64, generator=gen)
    lam = 0.1
    for curvature in (torch.where(torch.arange(30) % 3 == 0, 0.0, 0.4).double(), torch.full((30,), 0.4).double()):
        dense = vectors.T @ torch.diag(values) @ vectors + torch.diag(curvature) + lam * torch.eye(30).double()
        got, _ = solve_low_rank(values, vectors, v, lam, curvature=curvature)
        torch.testing.assert_close(got, torch.linalg.solve(dense, v.T).T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        solve_low_rank(torch.tensor([7.0, -1.0]).double(), vectors[:2], v, lam,
                       curvature=torch.where(torch.arange(30) % 3 == 0, 0.0, 0.4).double())
    # a negative μ below -λ that C outweighs is positive definite: accepted (μ + λ alone would refuse it)
    curvature = torch.where(torch.arange(30) % 3 == 0, 0.0, 0.4).double()
    inside = torch.zeros(1, 30, dtype=torch.float64)
    inside[0, 1], inside[0, 2] = 0.6, 0.8  # a unit vector where C = 0.4
    for values_, vectors_, c in ((torch.tensor([-0.45]).double(), inside, curvature),
                                 (torch.tensor([-0.45]).double(), vectors[:1], torch.full((30,), 0.4).double())):
        dense = vectors_.T @ torch.diag(values_) @ vectors_ + torch.diag(c) + lam * torch.eye(30).double()
        got, _ = solve_low_rank(values_, vectors_, v, lam, curvature=c)
        torch.testing.assert_close(got, torch.linalg.solve(dense, v.T).T, rtol=1e-10, atol=1e-12)


def test_low_rank_solve_with_undecayed_entries_holds_at_small_lambda_in_float32():
    """With weight decay on some parameters only (biases undecayed), D⁻¹v and the Woodbury correction nearly cancel
    where D = λ: the float32 solve was 2% off at λ = 1e-4 and 3.4x at 1e-5 against the explicit float64 solve."""
    from hf_fastif.solvers.arnoldi import LowRankSolve

    torch.manual_seed(0)
    p = 60
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))
    vectors, mu = q.T.contiguous(), torch.rand(p, dtype=torch.float64) * 2 + 0.01
    curvature = torch.zeros(p, dtype=torch.float64)
    curvature[:50] = 0.04  # 2·wd on the decayed entries; the last 10 (biases) undecayed
    v = torch.randn(3, p, dtype=torch.float64)
    for lam in (1e-3, 1e-4, 1e-5):
        matrix = vectors.T @ torch.diag(mu) @ vectors + torch.diag(curvature) + lam * torch.eye(p, dtype=torch.float64)
        truth = torch.linalg.solve(matrix, v.T).T
        solved = LowRankSolve(mu, vectors.float(), lam, curvature.float())(v.float()).double()
        assert float((solved - truth).norm() / truth.norm()) < 1e-5, lam


def test_arnoldi_eigendecomposition_is_computed_once_per_model(bert, pad_collator, monkeypatch):
    import hf_fastif.engine as engine_module

    model, train, test = bert
    calls, real = [], engine_module.s_test.low_rank_hessian
    monkeypatch.setattr(engine_module.s_test, "low_rank_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = default_arguments(influence_solver="arnoldi", influence_params=HEAD_ONLY["bert"],
                             influence_damping=0.05, influence_scale=20.0, influence_arnoldi_rank=8,
                             influence_knn_k=None, disable_tqdm=True)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    engine.compute_influences(train, test)
    engine.compute_influences(train, make_token_dataset(3, seed=5))
    assert len(calls) == 1


def test_exact_tells_a_singular_hessian_from_an_indefinite_one():
    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"singular .*raise influence_damping above 0"):
        solve_exact(torch.diag(torch.tensor([-1e-17, 1.0, 2.0], dtype=torch.float64)), v, 0.0)
    with pytest.raises(ValueError, match=r"indefinite .*λ > 0\.5"):
        solve_exact(torch.diag(torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64)), v, 0.1)


@pytest.mark.parametrize("flat", [1e-17, -1e-17])
def test_exact_refuses_a_flat_direction_whatever_the_sign_of_its_rounding(flat):
    """A singular Hessian's zero eigenvalues come out of eigh as ±rounding: with λ = 0 only the negative ones were
    refused, and a positive one was divided by (a linear model with more features than rows: influence up to 2.4x
    the minimum-norm answer's largest, returned without a word)."""
    v = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"singular .*λ > "):
        solve_exact(torch.diag(torch.tensor([flat, 1.0, 2.0], dtype=torch.float64)), v, 0.0)
    # zero is judged at the precision the Hessian was built in: 3e-8 is rounding for float32, a curvature for float64
    with pytest.raises(ValueError, match="singular"):
        solve_exact(torch.diag(torch.tensor([3e-8, 1.0, 2.0], dtype=torch.float32)), v.float(), 0.0)
    solved, info = solve_exact(torch.diag(torch.tensor([3e-8, 1.0, 2.0], dtype=torch.float64)), v, 0.0)
    torch.testing.assert_close(solved, torch.tensor([1 / 3e-8, 1.0, 0.5], dtype=torch.float64))
    solved, _ = solve_exact(torch.diag(torch.tensor([flat, 1.0, 2.0], dtype=torch.float64)), v, 0.5)  # damped: fine
    torch.testing.assert_close(solved, 1 / torch.tensor([flat + 0.5, 1.5, 2.5], dtype=torch.float64))


def test_lanczos_starts_from_the_same_vector_in_float32_and_float64():
    """Lanczos drew its start vector with torch.randn in the model's dtype, and torch draws other numbers in float32
    than in float64 (beyond 15 entries): a float32 copy of a model got another Krylov space, so a low-rank Hessian
    short of convergence, and its influence, differed by far more than rounding (here its Ritz values 3% apart; on a
    tiny GPT-2 LM at rank 8, influence 2.1e-2 of the largest value apart, 1.4e-6 from one start)."""
    matrix, _ = spectrum_matrix(np.r_[np.linspace(0.01, 1.0, 54), 2.0, 2.2, 3.0, 3.1, 5.0, 9.0])
    v = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    solved = {}
    for dtype in (torch.float64, torch.float32):
        m = matrix.to(dtype)
        values, vectors = low_rank_hessian(lambda x, m=m: m @ x, 60, 3, iterations=6, dtype=dtype)
        solved[dtype] = (values, solve_low_rank(values, vectors, v.to(dtype), 0.1)[0].double())
        solved[dtype, "extremes"] = extreme_eigenvalues(lambda x, m=m: m @ x, 60, iterations=4, dtype=dtype)
    torch.testing.assert_close(solved[torch.float32][0], solved[torch.float64][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(solved[torch.float32][1], solved[torch.float64][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(solved[torch.float32, "extremes"], solved[torch.float64, "extremes"], rtol=1e-5)


def test_lanczos_runs_in_a_workspace_give_the_same_estimates():
    """The convergence check runs its Lanczos estimates one after another in one workspace (no fresh memory per
    run): the same values as each run in a basis of its own, in float32 (drawn straight into the workspace) and
    float64, with and without reorthogonalisation; a workspace that does not fit (too few rows, another dtype) is
    left alone."""
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        diagonal = torch.rand(5_000, generator=gen, dtype=dtype) * 3 - 1
        hvp = diagonal.mul
        workspace = torch.full((7, 5_000), float("nan"), dtype=dtype)
        for iterations, reorthogonalise, seed in ((5, False, 0), (5, False, 1), (7, True, 4)):
            alone = extreme_eigenvalues(hvp, 5_000, iterations=iterations, dtype=dtype,
                                        seed=seed, reorthogonalise=reorthogonalise)
            shared = extreme_eigenvalues(hvp, 5_000, iterations=iterations, dtype=dtype,
                                         seed=seed, reorthogonalise=reorthogonalise, workspace=workspace)
            assert shared == alone
        assert bool(torch.isfinite(workspace).all())  # (its rows held the bases)
        small = torch.full((3, 5_000), float("nan"), dtype=dtype)
        assert extreme_eigenvalues(hvp, 5_000, iterations=5, dtype=dtype, workspace=small) == \
            extreme_eigenvalues(hvp, 5_000, iterations=5, dtype=dtype)
        assert bool(torch.isnan(small).all())
        drawn = torch.empty(5_000, dtype=dtype)  # the start drawn into its row: the numbers of a fresh draw
        seeded_direction(5_000, torch.Generator().manual_seed(5), dtype, "cpu", out=drawn)
        assert torch.equal(drawn, seeded_direction(5_000, torch.Generator().manual_seed(5), dtype, "cpu"))


@pytest.mark.usefixtures("propagating")
def test_repetitions_that_disagree_are_warned_of_and_their_spread_recorded(pad_collator, caplog, monkeypatch):
    """LiSSA's repetitions' spread (the standard error of their mean relative to it) is in every table of T ≥ 2
    repetitions, and warned of above `SPREAD_WARNING` (here lowered, as the tiny model's repetitions agree): a
    review's GPT-2 classifier came back 0.6-1.2 off the exact solve at a spread of 0.3-0.7, without a word."""
    import logging

    import hf_fastif.engine as engine_module

    train, test = make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)

    def run(repetitions):
        args = default_arguments(influence_solver="lissa", influence_params=TOP["bert"],
                                 influence_damping=0.5, influence_scale=20.0, influence_recursion_depth=60,
                                 influence_batch_size=1, influence_repetitions=repetitions,
                                 influence_knn_k=None, disable_tqdm=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            table = compute_influences(tiny_model("bert"), train, test, args, data_collator=pad_collator)
        return table.metadata["diagnostics"], caplog.text

    diagnostics, warned = run(4)
    spread = diagnostics["lissa_repetition_spread"]
    assert 0 < spread < 0.3 and "repetitions disagree" not in warned
    monkeypatch.setattr(engine_module.s_test, "SPREAD_WARNING", spread / 2)
    diagnostics, warned = run(4)
    assert diagnostics["lissa_repetition_spread"] == spread
    assert f"LiSSA's 4 repetitions disagree: their mean's standard error is {spread:.2g} of s_test's norm" in warned
    assert "~1/damping = 2 batches of 1 rows" in warned
    engine = InfluenceEngine(tiny_model("bert"), default_arguments(
        influence_solver="lissa", influence_params=TOP["bert"], influence_damping=0.5, influence_scale=20.0,
        influence_recursion_depth=60, influence_batch_size=1, influence_repetitions=4, influence_knn_k=None,
        disable_tqdm=True), data_collator=pad_collator)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a held engine: once per weights, data and settings, not once a call
        for rows in (test, test.select([0]), test):
            engine.compute_influences(train, rows)
    assert caplog.text.count("repetitions disagree") == 1
    diagnostics, warned = run(1)  # one repetition: nothing to compare
    assert "lissa_repetition_spread" not in diagnostics and "repetitions disagree" not in warned
