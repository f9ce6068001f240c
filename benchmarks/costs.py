"""Unit costs measured on the run's model, and the cost model that turns them into seconds per test point at
any scale (the run's, to check the model against the measured rows, and the paper's).

`measure_unit_costs` times the library's kernels directly (hf_fastif.batches, hvp, loss, mode, params,
scoring, knn, trunk): it follows those internal modules when they change. hf_fastif's units run as the engine runs
them, from the cached trunk states where the model splits (`hf_fastif.trunk`); the 2021 code path's units (its
HVP, its per-example scoring loop) run the whole model, as that code does.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hf_fastif import InfluenceArguments, InfluenceEngine
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.engine.trunk_states import READOUT_PROBE_ROWS, verification_rows
from hf_fastif.grouped_products import GroupedHessian, grouped_modules
from hf_fastif.hvp import batch_gradient, batch_hvp
from hf_fastif.knn import build_index, extract_features, search
from hf_fastif.loss import FunctionalModel
from hf_fastif.mode import influence_mode
from hf_fastif.params import num_parameters, select_parameters
from hf_fastif.readout import find_readout
from hf_fastif.scoring import score_candidates, score_per_example_loop
from hf_fastif.solvers.arnoldi import LowRankSolve
from hf_fastif.solvers.lissa import LissaDivergenceError, solve_lissa
from hf_fastif.stacked import StackedHessian
from hf_fastif.trunk import TrunkCache, find_split, model_inputs, split_tolerance, verify_split

from .paper_setup import FAST, FASTIF, LOW_RANK, ORIGINAL, PARALLEL, STACKED, BenchmarkArguments, Setup
from .timing import median_seconds, timed

SCORED_ROWS = 256
"""Rows the units ``score`` and ``feature`` run over: four batches of 64, ordered as the engine orders a scan
(`hf_fastif.batches.Batcher.length_order`), so that a unit is charged the padding of a scan of many rows, not that of
one batch of random rows (which pads to its longest: 1.47x the tokens of MiniLM's generated rows, against 1.02x)."""


COST_MODEL = (
    "Seconds per test point, from the unit costs u measured in this run (same model, same kernels):\n"
    "- original   = u.test_gradient + u.power_iteration[B] + J·u.hvp[B x1] + N·u.score[1]\n"
    "- +kNN (k)   = u.test_gradient + u.power_iteration[B] + J·u.hvp[B x1] + q + k·u.score[1]\n"
    "- FastIF     = u.test_gradient + u.power_iteration[B_F] + T·J·u.hvp[B_F x1] + q + k·u.score[1]\n"
    "- parallel P = u.test_gradient + u.power_iteration[B_F] + ⌈T/P⌉·J·u.hvp[B_F x1] + q + (k/P)·u.score[1]"
    "  (ideal split)\n"
    "- FastIF, repetitions stacked = u.test_gradient + u.power_iteration[B_F] + J·u.hvp_stacked[B_F x T] + q\n"
    "  + k·u.score[1]  (the T repetitions' products of a step as one computation, influence_stack_repetitions:\n"
    "  grouped, hf_fastif.grouped_products, by default wherever the parameters allow it; else vmapped,\n"
    "  hf_fastif.stacked, by default on CUDA devices)\n"
    "- fast (m)   = u.test_gradient + u.power_iteration[B_f]/m + T_f·J_f·u.hvp[B_f x m]/m + q + S\n"
    "  (m test points per call share each LiSSA step; J_f = J·scale_f/scale)\n"
    "- low-rank (m) = u.test_gradient + u.low_rank_solve[m]/m + q + S  (the low-rank Hessian: a one-off per\n"
    "  model, 2r HVPs over R rows whatever N is)\n"
    "  S = U·u.score[c]/m, the scoring of one call shared by its m test points: U distinct candidates, each\n"
    "  run once against the tests that picked it, batched by that set of tests (pair scoring), c = m·k/U\n"
    "  tests per candidate on average; u.score[c] linear between u.score[1] and u.score[m] (then the sum over\n"
    "  the sets is exactly U·u.score[c]). U: the run's measured union; at the paper's scale the worst case,\n"
    "  disjoint k-candidate sets (U = m·k, c = 1): S = k·u.score[1]\n"
    "- 2021 code path: original = u.test_gradient_full + J·u.hvp_full[B x1] + N·u.score_loop,\n"
    "                  FastIF   = T·u.test_gradient_full + T·J·u.hvp_full[B_F x1] + q + k·u.score_loop\n"
    "  (the 2021 code computes the test gradient again in each repetition, through the whole model)\n"
    "where B and B_F are the original's and FastIF's B (128 and 1 in the paper) and q = u.feature +\n"
    "N·u.knn_row is one kNN query (exact Flat search). u.power_iteration[B] is the LiSSA convergence check at\n"
    "the row's own B, the engine's own, timed in a first call at that B, the mean over 3 seeds (its Lanczos runs\n"
    "on B-row batches and on the mean Hessian of CHECK_ROWS rows, and its confirmation on more rows where it runs).\n"
    "hf_fastif's units (hvp, score, test_gradient, the check) run from the cached trunk states where the model\n"
    "splits; hvp_full, test_gradient_full (without the 2021 code's create_graph) and score_loop run the whole\n"
    "model, as the 2021 code does. Built once for all test points\n"
    "and not charged per test point: the training-set features and index (N·u.feature) and the trunk states\n"
    "(N·u.trunk)."
)


@dataclass
class CostScale:
    """Where the cost model is evaluated: N training rows, LiSSA J, the original's B, FastIF's T and k, the
    k of the "+kNN" rows, m test points per "fast" call, the processes of "FastIF parallel" and FastIF's B
    (``b_fastif``, 1 in the paper)."""

    n: int
    j: int
    b: int
    t: int
    k: int
    knn_ks: list[int]
    m: int
    processes: int
    b_fastif: int = 1


def measure_unit_costs(setup: Setup, bench: BenchmarkArguments, args: InfluenceArguments, shared: int,
                       batch_sizes: list[int]) -> dict:
    """Seconds per unit of work on this model and data (medians of single calls), for the cost model:
    ``hvp[B x m]``: one LiSSA step (collate B fresh rows, one HVP with m vectors); ``score[m]``: one candidate
    scored by batched JVP against m s_test vectors (`SCORED_ROWS` seeded rows in batches of 64, in the engine's
    order); ``test_gradient``: one test row (``test_gradient_full``: one row through the whole model, the 2021 code
    path's);
    ``power_iteration[B]``: the engine's own convergence check at each B (`engine_check_seconds`, confirmation
    included where it runs); all but it
    from the cached trunk states where the model splits and with the last layer cut to the position the loss
    reads where it can be (``readout``), as the engine runs them. ``trunk``: one row's trunk
    states (0 without a split). The 2021 code path, whole model: ``hvp_full[B x1]`` (its HVP) and ``score_loop``
    (one candidate scored the 2021 way, per-example forward + backward with ``create_graph``).
    ``hvp_stacked[B x T]``: one LiSSA step of T repetitions stacked (T·B fresh rows collated together; each
    repetition's products assembled from activations where every influence parameter allows it,
    `hf_fastif.grouped_products`, else one vmapped product per repetition, `hf_fastif.stacked`:
    ``hvp_stacked_route`` says which), at FastIF's B (``influence_batch_size``) and the run's and the paper's T, timed
    as the recursion runs it (`recursion_step_seconds`). ``low_rank_solve[m]``: the low-rank s_test of m test gradients (rank ``bench.low_rank_rank``). ``feature``: one
    row's kNN feature (the first `SCORED_ROWS` rows, batches of 64 in the engine's order); ``knn_row``: one (query, indexed row) pair of an exact (Flat) faiss search."""
    model, train = setup.model, setup.train
    device = next(model.parameters()).device
    params = select_parameters(model, args.influence_params)
    names = list(params)
    p = num_parameters(params)
    dtype = next(iter(params.values())).dtype
    rng = np.random.default_rng(args.seed + 7)
    n = len(train)
    calls = 5 if bench.quick else 15
    out: dict = {"hvp": {}, "hvp_full": {}, "score": {}}
    with influence_mode(model, names):
        steps = step_models(setup, params, args)
        full_fm, full, tests, fm, batcher = steps.whole, steps.rows, steps.tests, steps.cut, steps.cached
        out["trunk"], out["trunk_split"] = steps.trunk_seconds, steps.split
        out["readout"] = None if fm.readout is None else fm.readout.name

        def step(b: int, vectors: torch.Tensor, reduction: str = "mean", fm=fm, batcher=batcher) -> float:
            def one():  # fresh rows every step, collated (with their trunk states) inside the step as LiSSA does
                return batch_hvp(fm, params, batcher.batch(rng.choice(n, b, replace=b > n)), vectors,
                                 reduction=reduction)

            return median_seconds(one, calls if b <= 16 else max(3, calls // 3))

        for b in sorted(set(batch_sizes)):
            for m in sorted({1, shared}):
                # one vector goes as a (p,) vector, as the engine's LiSSA step passes it (no batched gradients)
                vectors = torch.randn(m, p, device=device, dtype=dtype) * 1e-2
                out["hvp"][f"{b}x{m}"] = step(b, vectors[0] if m == 1 else vectors)
            # (the step's own unit where it runs the whole model: no trunk split and no last-layer cut)
            out["hvp_full"][f"{b}x1"] = (out["hvp"][f"{b}x1"] if fm.split is None and fm.readout is None else
                                         step(b, torch.randn(p, device=device, dtype=dtype) * 1e-2, fm=full_fm,
                                              batcher=full))
        # one LiSSA step of T repetitions stacked: T·B fresh rows collated in one batch, as the engine collates a
        # stacked step, at FastIF's B and at the run's and the paper's T; grouped (hf_fastif.grouped_products) where
        # the parameters allow it, as the engine does, else vmapped (hf_fastif.stacked)
        table = grouped_modules(fm, names)
        grouped = not isinstance(table, str)
        stacked = GroupedHessian(fm, params, table=table) if grouped else StackedHessian(fm, params)
        out["hvp_stacked_route"] = "grouped" if grouped else "vmapped"
        out["hvp_stacked"] = {}
        b = args.influence_batch_size

        def stacked_step(j, reps, h, *, into, alpha, carry):  # as the engine's stacked step (`_StackedSteps.step`)
            batch = batcher.batch(rng.choice(n, len(reps) * b, replace=len(reps) * b > n))
            if grouped:  # (into the next iterate, each block carried just before its first add)
                stacked.build(batch, len(reps)).accumulate(h, into, alpha, last=True, carry=carry)
            else:
                products = stacked.products(batch, h)
                carry.finish()
                into.add_(products, alpha=alpha)

        v = torch.randn(1, p, device=device, dtype=dtype) * 1e-2
        for t in sorted({args.influence_repetitions or 1, bench.paper_t} - {1}):
            out["hvp_stacked"][f"{b}x{t}"] = recursion_step_seconds(stacked_step, v, t, args,
                                                                    calls if t * b <= 16 else max(3, calls // 3))
        # 256 seeded rows, four batches of 64 in the engine's order (rows alike in length together,
        # `Batcher.length_order`), as a scan of many candidates runs: one batch of 64 pads to its longest row
        block = rng.choice(n, min(SCORED_ROWS, n), replace=False).tolist()
        for m in sorted({1, shared}):
            s_test = torch.randn(m, p, device=device, dtype=dtype) * 1e-3
            out["score"][str(m)] = median_seconds(
                lambda s_test=s_test: score_candidates(fm, params, batcher, block, s_test, batch_size=64,
                                                       progress=False), max(3, calls // 3)) / len(block)
        s_test = torch.randn(1, p, device=device, dtype=dtype) * 1e-3
        singles = iter(rng.choice(n, 4 * calls, replace=True).tolist())
        out["score_loop"] = median_seconds(  # the 2021 code path: the whole model, row by row
            lambda: score_per_example_loop(full_fm, params, full, [next(singles)], s_test), 2 * calls)
        # the low-rank solve of m test gradients: projections on r eigenvectors, and back
        basis = torch.linalg.qr(torch.randn(p, bench.low_rank_rank, device=device, dtype=dtype))[0].T.contiguous()
        eigenvalues = torch.linspace(1.0, 2.0, bench.low_rank_rank, dtype=torch.float64)
        gradients = torch.randn(max(1, shared), p, device=device, dtype=dtype)
        solve = LowRankSolve(eigenvalues, basis, 1.0)  # prepared once, as the engine keeps it
        out["low_rank_solve"] = {str(m): median_seconds(lambda m=m: solve(gradients[:m]), calls)
                                 for m in sorted({1, shared})}
        one = tests.batch([0])
        out["test_gradient"] = median_seconds(
            lambda: batch_gradient(fm, params, one, measurement=True, reduction="none"), calls)
        # the test row through the whole model (the 2021 code path's), collated as the training rows are
        whole_row = Batcher(setup.test, validate_dataset(setup.test, "test_dataset", model), setup.collator,
                            device).batch([0])
        out["test_gradient_full"] = (out["test_gradient"] if fm.split is None and fm.readout is None else median_seconds(
            lambda: batch_gradient(full_fm, params, whole_row, measurement=True, reduction="none"), calls))
    sample = Batcher(train.select(range(min(SCORED_ROWS, n))), validate_dataset(train, "train_dataset", model),
                     setup.collator, device)
    features = args.influence_knn_features  # the run's kNN features (the paper table refuses "gradient")
    feats = extract_features(model, sample, features, batch_size=64, progress=False)
    out["feature"] = median_seconds(lambda: extract_features(model, sample, features, batch_size=64, progress=False),
                                    max(3, calls // 3)) / len(sample)
    rows = 20_000 if bench.quick else 100_000
    synthetic = np.random.default_rng(0).standard_normal((rows, feats.shape[1])).astype(np.float32)
    index = build_index(synthetic)
    queries = synthetic[:32] + 0.1
    out["knn_row"] = median_seconds(lambda: search(index, queries, 1000), 3) / (len(queries) * rows)
    out["num_parameters"] = p
    out["feature_dim"] = int(feats.shape[1])
    out["power_iteration"], out["check_confirmed"] = engine_check_seconds(setup, args, batch_sizes)
    return out


class _CheckDone(BaseException):
    """Ends a `_CheckOnly` call once its check is timed (not an `Exception`, which the engine's fallbacks catch)."""


class _CheckOnly(InfluenceEngine):
    """An engine whose calls stop right after LiSSA's convergence check, which they time (`engine_check_seconds`).
    Follows the engine's private ``_check_lissa(call, v)``."""

    seconds: float = float("nan")
    found: dict = {}

    def _check_lissa(self, call, v):
        start, self.found = time.perf_counter(), {}
        try:
            self.found = super()._check_lissa(call, v)
        finally:  # (a refusal, LissaDivergenceError, after a whole check: its seconds too)
            self.seconds = time.perf_counter() - start
        raise _CheckDone


CHECK_SEEDS = 3
"""Seeds the check's unit is the mean over: its confirmation on more rows runs for some seeds' 32-row samples and
not others' (MiniLM's paper table: at B = 1 with seed 42, 13.6 s; FastIF's own row, seed 142, did not confirm)."""


def engine_check_seconds(setup: Setup, args: InfluenceArguments, batch_sizes: list[int]
                         ) -> tuple[dict[str, float], dict[str, str]]:
    """The engine's own LiSSA convergence check at each B (``u.power_iteration[str(B)]``), as a first call at that B
    runs it: its Lanczos runs on `CHECK_BATCHES` B-row batches (one graph a run) and on the mean Hessian of
    `CHECK_ROWS` rows, and its confirmation on more rows where the estimate nears -λ; the mean over `CHECK_SEEDS`
    seeds from the run's, so the confirmation weighs in as often as it runs (``u.check_confirmed[str(B)]``:
    "passed", or how many seeds confirmed on more rows or refused LiSSA, as a row's call then does). Summing unit
    HVPs instead priced a build per product (~2x on the quick model) and left the confirmation out (it ran in every
    original call of a quick run). One engine for every B and seed: the training rows' trunk states are computed
    before the first check, not timed; each (B, seed) checks anew (the estimates are kept per B and seed)."""
    engine = _CheckOnly(setup.model, copy.copy(args), data_collator=setup.collator)
    engine.args.influence_solver, engine.args.influence_check_convergence = "lissa", True
    seconds, confirmed = {}, {}
    with engine:
        for b in sorted(set(batch_sizes)):
            engine.args.influence_batch_size = b
            times, ends = [], []
            for seed in range(args.influence_seed, args.influence_seed + CHECK_SEEDS):
                engine.args.influence_seed, end = seed, None
                try:
                    engine.compute_influences(setup.train, setup.test.select([0]))
                except _CheckDone:
                    rows = engine.found.get("lissa_confirm_rows")
                    end = "passed" if rows is None else f"confirmed on {rows} rows"
                except LissaDivergenceError:
                    end = "refused"
                if end is None:
                    raise RuntimeError("The engine's call ran without its convergence check.")
                times.append(engine.seconds)
                ends.append(end)
            seconds[str(b)] = float(np.mean(times))
            others = [e for e in ends if e != "passed"]
            confirmed[str(b)] = "passed" if not others else "; ".join(
                f"{ends.count(e)} of {len(ends)} seeds {e}" for e in sorted(set(others)))
    return seconds, confirmed


RECURSION_DEPTHS = (2, 10)
"""The two depths of LiSSA recursion whose difference, over the steps between them, is a stacked step's unit."""


def recursion_step_seconds(step, v: torch.Tensor, repetitions: int, args: InfluenceArguments, calls: int) -> float:
    """Seconds of one LiSSA step of ``repetitions`` repetitions as `hf_fastif.solvers.lissa.solve_lissa` runs the
    engine's stacked steps (``step``): its products added into the next iterate in place, the carried part written
    block by block, the iterate's norms checked: the difference of the medians of two recursions
    (`RECURSION_DEPTHS`) over the steps between them, so the recursion's one-offs (the iterates' first buffer, the
    final division) are not charged to its steps. Timing ``GroupedHessian.products`` instead charged each step a
    fresh zeroed ``(T, 1, p)`` output that the engine never makes (MiniLM's paper selection, T = 4: ~20 ms of page
    faults a step)."""
    def run(depth: int) -> float:
        return median_seconds(lambda: solve_lissa(
            step, v, damping=args.influence_damping, scale=args.influence_scale, depth=depth,
            repetitions=range(repetitions), progress=False, accumulates=True, carries=True, in_place=True), calls)

    low, high = RECURSION_DEPTHS
    longer = run(high)
    difference = longer - run(low)
    return difference / (high - low) if difference > 0 else longer / high  # (noise beyond the steps: all of it)


@dataclass
class StepModels:
    """The functional models and batchers a benchmark's steps run on, as the engine runs them (`step_models`)."""

    whole: FunctionalModel  # the whole model (the 2021 code path)
    rows: Batcher  # the training rows, collated for the whole model
    top: FunctionalModel  # from the cached trunk states where the model splits (else the whole model)
    cut: FunctionalModel  # ``top`` with the last layer cut to the position the loss reads, where it can be
    cached: Batcher  # the training rows with their trunk states (else ``rows``)
    tests: Batcher  # the test rows, likewise
    trunk_seconds: float  # one training row's trunk states (0 without a split)
    split: str | None  # where the trunk ends (``None``: no split)
    readout_why: str  # why the last layer is not cut ("" where it is)


def step_models(setup: Setup, params: dict, args: InfluenceArguments) -> StepModels:
    """`StepModels` for ``setup``'s model and rows, inside `influence_mode` for ``params``: the trunk cached and
    checked as the engine does (`_with_trunk`), and the last layer cut where `find_readout` finds the cut exact on
    the first `READOUT_PROBE_ROWS` rows (unless ``influence_skip_unread_positions`` is off)."""
    model, names = setup.model, list(params)
    device = next(model.parameters()).device
    whole = FunctionalModel(model, names, weight_decay=args.influence_weight_decay)
    rows = Batcher(setup.train, validate_dataset(setup.train, "train_dataset", model), setup.collator, device)
    tests = Batcher(setup.test, validate_dataset(setup.test, "test_dataset", model), setup.collator, device)
    top, cached, tests, trunk_seconds, split = _with_trunk(model, names, whole, rows, tests, args)
    cut, why = top, "influence_skip_unread_positions=False"
    if args.influence_skip_unread_positions:
        readout, why = find_readout(top, params, [cached.batch(range(min(READOUT_PROBE_ROWS, len(setup.train))))])
        cut = FunctionalModel(model, names, weight_decay=args.influence_weight_decay, split=top.split,
                              readout=readout)
    return StepModels(whole, rows, top, cut, cached, tests, trunk_seconds, split, why)


def _with_trunk(model, names: list[str], fm: FunctionalModel, train: Batcher, tests: Batcher,
                args: InfluenceArguments) -> tuple[FunctionalModel, Batcher, Batcher, float, str | None]:
    """The engine's trunk cache for the unit costs: ``(fm, train, tests, seconds per row of the training trunk
    states, split)`` running only the top where the model splits cleanly (checked as the engine checks it), else
    the inputs unchanged with 0 s and ``None``."""
    if not args.influence_trunk_cache:
        return fm, train, tests, 0.0, None
    split, _ = find_split(model, names, model_inputs(train.batch(range(min(2, len(train))), trunk=False)))
    if split is None:
        return fm, train, tests, 0.0, None
    (cache, seconds) = timed(lambda: TrunkCache(split, train, "unit-costs-train", batch_size=args.influence_hvp_batch_size))
    if verify_split(split, cache, train, verification_rows(train)) > split_tolerance(model):
        return fm, train, tests, 0.0, None
    test_cache = TrunkCache(split, tests, "unit-costs-test", batch_size=args.influence_hvp_batch_size)
    top = FunctionalModel(model, names, weight_decay=args.influence_weight_decay, split=split)
    return top, train.with_trunk(cache), tests.with_trunk(test_cache), seconds / len(train), f"{split.path}.{split.first}"


def cost_model(u: dict, scale: CostScale, fast: dict, fast_union: float | None = None,
               more_processes: tuple[int, ...] = ()) -> dict:
    """Seconds per test point of every row under `COST_MODEL` at ``scale``. ``fast``: the fast row's B, T
    and J (keys ``b``, ``t``, ``j``); ``fast_union``: distinct candidates scored per call of the rows that take m
    test points per call, "fast" and "low-rank" (the same kNN candidates; default: the worst case, disjoint sets,
    m·k); ``more_processes``: extra "FastIF parallel (P=..., ideal)" rows, named so whatever ``scale.processes``
    is."""
    h, s = u["hvp"], u["score"]
    tg, check = u["test_gradient"], u["power_iteration"]  # the convergence check at each row's own B
    n, j, b, t, k, m = scale.n, scale.j, scale.b, scale.t, scale.k, scale.m
    q = u["feature"] + n * u["knn_row"]
    step = h[f"{scale.b_fastif}x1"]  # one FastIF LiSSA step
    union = m * k if fast_union is None else fast_union
    shared = _shared_scoring(s, m, k, union)
    out = {ORIGINAL: tg + check[str(b)] + j * h[f"{b}x1"] + n * s["1"]}
    for kk in scale.knn_ks:
        out[f"+kNN (k={kk})"] = tg + check[str(b)] + j * h[f"{b}x1"] + q + kk * s["1"]
    out[FASTIF] = tg + check[str(scale.b_fastif)] + t * j * step + q + k * s["1"]
    stacked = u.get("hvp_stacked", {}).get(f"{scale.b_fastif}x{t}")
    if stacked is not None:
        out[STACKED] = tg + check[str(scale.b_fastif)] + j * stacked + q + k * s["1"]
    names = ([(PARALLEL, scale.processes)] if scale.processes > 1 else []) + [
        (f"{PARALLEL} (P={count}, ideal)", count) for count in more_processes]
    for name, count in names:
        out[name] = tg + check[str(scale.b_fastif)] + math.ceil(t / count) * j * step + q + k / count * s["1"]
    out[FAST] = tg + check[str(fast["b"])] / m + fast["t"] * fast["j"] * h[f"{fast['b']}x{m}"] / m + q + shared
    if "low_rank_solve" in u:
        out[LOW_RANK] = tg + u["low_rank_solve"][str(m)] / m + q + shared
    full = u.get("hvp_full", h)  # the 2021 code runs its HVPs through the whole model
    tg_full = u.get("test_gradient_full", tg)  # (and its test gradient, once a repetition: a review)
    out["original (2021 code path)"] = tg_full + j * full[f"{b}x1"] + n * u["score_loop"]
    out["FastIF (2021 code path)"] = t * tg_full + t * j * full[f"{scale.b_fastif}x1"] + q + k * u["score_loop"]
    return out


def _shared_scoring(score: dict, m: int, k: int, union: float) -> float:
    """Seconds per test point of one call's pair scoring (`hf_fastif.scoring.score_pairs`): ``union`` distinct
    candidates, each run once against the ``c = m·k / union`` test vectors that picked it, ``score[c]`` taken
    linearly between the measured ``score["1"]`` and ``score[str(m)]``."""
    c = min(max(m * k / union, 1.0), float(m)) if union > 0 else 1.0
    one, many = score["1"], score[str(m)]
    per_candidate = one if m == 1 else one + (c - 1) / (m - 1) * (many - one)
    return union * per_candidate / m


def paper_scale_rows(unit: dict, bench: BenchmarkArguments, args: InfluenceArguments, fast: dict,
                     m: int, b_fastif: int = 1) -> tuple[list[dict], int]:
    """Seconds per test point and speed-ups of every row at the paper's scale (``bench.paper_*``; FastIF's B
    ``b_fastif``, the paper's 1), with the unit costs of this run (``unit["hvp"]`` holds ``f"{b_fastif}x1"``);
    "fast" keeps its J·scale_f/scale ratio. Returns ``(rows, J of fast)``."""
    fast_paper = dict(fast, j=max(1, round(bench.paper_j * fast["j"] / args.influence_recursion_depth)))
    scale = CostScale(n=bench.paper_n, j=bench.paper_j, b=bench.paper_b, t=bench.paper_t, k=bench.paper_k,
                      knn_ks=sorted({100, bench.paper_k}), m=m, processes=bench.parallel_processes,
                      b_fastif=b_fastif)
    paper = cost_model(unit, scale, fast_paper, more_processes=(bench.paper_t,))
    untightened = cost_model(unit, scale, dict(fast_paper, j=bench.paper_j))[FAST]
    ordered = {}
    for name, seconds in paper.items():
        ordered[name] = seconds
        if name == FAST:
            ordered[f"{FAST}, J_f = J (no scale tightening)"] = untightened
    rows = [{"row": name, "seconds": seconds,
             "speed-up vs original (hf_fastif kernels)": ordered[ORIGINAL] / seconds,
             "speed-up vs original (2021 code path)": ordered["original (2021 code path)"] / seconds}
            for name, seconds in ordered.items()]
    return rows, fast_paper["j"]
