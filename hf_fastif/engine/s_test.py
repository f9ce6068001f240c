"""Stages 2 and 3 of `InfluenceEngine`: the test gradients, and s_test = (H + λI)⁻¹ v by the chosen solver.

The solvers (`hf_fastif.solvers`) are pure; this module feeds them Hessian-vector products of the call's batches,
runs LiSSA's convergence check before the recursion, and keeps what later calls reuse: the curvature estimates, the
low-rank and exact Hessians, and LiSSA's first-backward graphs (`hf_fastif.engine.kept_graphs.KeptHessians`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .. import distributed as D
from ..batches import Batcher
from ..fingerprint import in_place_version
from ..grouped_products import AmbiguousBatch, GroupedHessian, PartlyAdded, grouped_modules
from ..hvp import BatchHessian, batch_gradient
from ..loss import rows_without_targets
from ..params import num_parameters
from ..solvers import (
    SPREAD_WARNING,
    TRUNCATION_WARNING,
    Carry,
    LissaDivergenceError,
    LowRankSolve,
    build_hessian,
    converging_depth,
    extreme_eigenvalues,
    lanczos_steps,
    low_rank_hessian,
    repetition_spread,
    solve_cg,
    solve_decomposed,
    solve_lissa,
    suggest_scale,
    truncation_share,
)
from ..solvers.arnoldi import TRUNCATION_WARNING as ARNOLDI_TRUNCATION_WARNING
from ..stacked import StackedHessian, stack_tolerance, stacks, unstackable_attention
from ..utils import NonFiniteError, first_line, overflow_advice, relative_difference
from .call import Call
from .kept_graphs import KeptBatches, KeptHessians

logger = logging.get_logger(__name__)

CHECK_BATCHES = 4
"""LiSSA's convergence check: B-row batches whose Hessians' top eigenvalues are estimated (Lanczos)."""

CHECK_ITERATIONS = 5
"""Lanczos steps per estimate of the convergence check."""

CHECK_ROWS = 32
"""Rows of the mean Hessian whose smallest eigenvalue the convergence check estimates first."""

CONFIRM_ROWS = (256, 1024)
"""Rows (at most, in turn) of the mean Hessian that confirm a negative estimate before LiSSA is refused: a small
sample's smallest eigenvalue is mostly far more negative than the whole set's (the paper table's trained tiny BERT:
-0.049 over all 3,000 rows, -0.16 to -0.33 on 64-row samples, -0.30 to -0.67 in refused checks), but can be less (a
32-row sample's -0.055 against the set's -0.084). The first size whose estimate clears -λ by `CONFIRM_MARGIN` ends
the confirmation; a refusal needs the last."""

CONFIRM_MARGIN = 0.5
"""An estimate that does not clear -λ by this share of λ (smallest eigenvalue above -λ/2) is confirmed on more rows
too, not only one below -λ."""

FULL_HVP_KEPT_BYTES = 256 * 2**20
"""Collated batches (with their trunk states, padded) that a product with the mean Hessian over every row keeps for
the next product (CG's iterations, arnoldi's Lanczos steps, the exact solver's columns); the rest are collated again
each time, so memory stays bounded at any N (they were all kept: 3.9 GB beside 2.1 GB of memory-mapped trunk states
on 22,000 rows)."""

LISSA_BATCH_MEMO_BYTES = 256 * 2**20
"""Collated LiSSA batches (with their trunk states) kept until they are drawn again, for rows whose graph
(`LISSA_GRAPH_BYTES`) is not kept: a row is read, collated and gathered once. Rows recur where B = 1 and J·T > N/2
(the repetitions draw independently: FastIF's J 1000, T 4 over the MiniLM default's 2,000 rows draws each row
twice); not at the paper's scale (4,000 draws over 392,702 rows), where few recur and little is kept. The collator is
taken to be deterministic, as the trunk cache takes it."""

LISSA_GRAPH_BYTES = 256 * 2**20
"""First-backward graphs (`hf_fastif.hvp.BatchHessian`) of LiSSA batches, kept while they fit, so that a batch drawn
again pays only the second backward: ~0.3 MB a 32-token row of MiniLM's last layer from its trunk states, ~0.8 MB of
the tiny BERT with every parameter. The engine holds them between calls while the weights, the training rows and
what else keys its curvature estimates stay the same (later calls draw the same batches); `InfluenceEngine.clear`
frees them."""

FULL_HVP_GRAPH_BYTES = 256 * 2**20
"""First-backward graphs of the chunks of a product with the mean Hessian over a batcher's rows, kept for the next
product (CG's iterations, arnoldi's and the convergence check's Lanczos steps, the exact solver's columns); the
chunks beyond it are built again for each product (their collated batches kept up to `FULL_HVP_KEPT_BYTES`)."""


NO_TARGET_IN_MEAN = ("No test_dataset row has a target for the loss to read (every label -100), so the mean test loss "
                     "is 0 and so would every influence be. Label the test rows.")


class _StackedSteps:
    """One LiSSA call's stacked steps: grouped (`hf_fastif.grouped_products`, their graphs kept in ``kept``, so a
    later call on the same weights and rows, which draws the same groups, multiplies from them) or vmapped
    (`hf_fastif.stacked`). The first step, and any step whose rows are longer than every row checked before (a mask
    built unlike the model's may show only on longer rows), is checked against the products one batch at a time,
    which that step then uses; a check that fails or raises turns stacking off for the rest of the call and, through
    ``refused`` (which logs why), for later calls on the same weights, rows and loss. A kept grouped graph passed that
    check in the call that built it. A step that raises after the checks passed (out of memory with R batches at
    once, say) adds nothing, returns False and turns stacking off for the rest of the call only: from that step on,
    one product at a time; a grouped assembly that fails after adding part of the products raises `PartlyAdded`. A
    batch whose shapes cannot say which dimension holds the rows (`AmbiguousBatch`: a padded length equal to the
    row count) runs that step, and every later one of that length, one product at a time; other lengths group on."""

    def __init__(self, hessian: StackedHessian | GroupedHessian, train: Batcher, tolerance: float,
                 refused: Callable[[str], None], kept: KeptHessians | None = None):
        self.hessian, self.train, self.tolerance, self.refused = hessian, train, tolerance, refused
        self.kept = kept  # (grouped graphs are kept there, for later calls)
        self.usable, self.checked_length = True, -1
        self.ambiguous: set[int] = set()  # padded lengths whose batches' shapes cannot say where the rows are

    def step(self, groups: Sequence[np.ndarray], vectors: torch.Tensor, into: torch.Tensor, alpha: float,
             carry: Carry) -> bool:
        """``into[r] = carried + alpha · H_r @ vectors[r]`` (``(R, m, p)`` each), H_r the Hessian of the batch of rows
        ``groups[r]`` without the L2 term, the carried part written through ``carry`` (`hf_fastif.solvers.lissa.Carry`:
        block by block on the grouped route, whole before other products); False where no product was added (the
        step then runs one product at a time)."""
        rows = np.concatenate(groups)
        grouped = isinstance(self.hessian, GroupedHessian)
        key = ("grouped", len(groups), rows.tobytes())
        kept = grouped and self.kept is not None and key in self.kept.kept
        batch = None if kept else self.train.batch(rows)
        mask = None if kept else batch.get("attention_mask")
        length = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else 0
        if not kept and length in self.ambiguous:
            return False
        if kept or length <= self.checked_length:
            try:
                if grouped:  # (into the next iterate: no products stored apart)
                    self.kept.accumulate_grouped(key, lambda: batch if batch is not None else self.train.batch(rows),
                                                 self.hessian, vectors, into, alpha, carry)
                else:
                    products = self.hessian.products(batch, vectors)
                    carry.finish()
                    into.add_(products, alpha=alpha)
            except PartlyAdded:
                raise
            except AmbiguousBatch:  # (this length's shapes only: it runs one product at a time, others may group)
                self.ambiguous.add(length)
                return False
            except Exception as err:  # noqa: BLE001 (vmap's and the model's errors under it: the default path decides)
                self.usable = False
                logger.info(f"A stacked LiSSA step raised {type(err).__name__} ({first_line(err)}); this call's "
                            "steps run one product at a time from here.")
                return False
            return True
        # (what the default path raises, it raises here too)
        alone = self.hessian.alone([self.train.batch(g) for g in groups], vectors)
        try:  # (both read ``vectors`` before the carried part is written: it may be written over them)
            stacked = self.hessian.products(batch, vectors)
        except AmbiguousBatch:  # (not checked: later steps with rows this long run one product at a time)
            self.ambiguous.add(length)
            stacked = None
        except Exception as err:  # noqa: BLE001
            self.usable = False
            self.refused(f"the stacked products raised {type(err).__name__} ({first_line(err)})")
            stacked = None
        carry.finish()
        into.add_(alone, alpha=alpha)
        if stacked is None:
            return True
        gap = relative_difference(stacked, alone)
        if gap > self.tolerance:
            self.usable = False
            self.refused(f"the stacked products differ from the products one at a time by {gap:.3g} of their "
                         f"largest entry (more than {self.tolerance:g}) on rows of {length} positions")
        else:
            self.checked_length = length
        return True


def lissa_batches(num_rows: int, batch_size: int, depth: int, seed: int, repetition: int) -> np.ndarray:
    """Row indices ``(depth, batch_size)`` drawn by repetition ``repetition``: successive shuffles of the
    training set, seeded by ``(seed, repetition)`` only, so any process can draw any repetition."""
    rng = np.random.default_rng([seed, repetition])
    need = depth * batch_size
    order = np.concatenate([rng.permutation(num_rows) for _ in range(-(-need // num_rows))])
    return order[:need].reshape(depth, batch_size)


class STestStage:
    """`InfluenceEngine`'s s_test: test gradients, the solvers' products, LiSSA's check and kept graphs. State
    (made in `InfluenceEngine.__init__`): ``_curvature`` and ``_low_rank`` (saved and restored by
    saved_caches.py), ``_exact``, ``_prepared_solve``, ``_lissa_graphs``, ``_stack_refused``, ``_spread_warned``."""

    # ---- stage 2: test gradients ---------------------------------------------------------------------------
    def _s_test_of(self, call: Call) -> torch.Tensor:
        """s_test of the call's test rows (their gradients first, refused where they are not finite)."""
        with call.timer("test_gradients"):
            v = self._test_gradients(call)
        bad = np.flatnonzero(~torch.isfinite(v).all(1).cpu().numpy())
        if len(bad):
            rows = "the mean of the test rows" if call.combine == "mean" else f"test rows {call.test.named_rows(bad[:10])}"
            advice = overflow_advice(call.params)
            raise FloatingPointError(
                f"The gradient of {rows} is not finite: their loss is inf / NaN (check those rows' labels and inputs)"
                + (f", {advice}" if advice else "") + ".")
        with call.timer("s_test"):
            try:
                return self._s_test(call, v)
            except FloatingPointError as err:  # (every solver's inf / NaN products: name the rows where it is theirs)
                bad = self._non_finite_training_rows(call)
                if not bad:  # (no row's loss: an overflow, of half-precision weights where the advice says so)
                    if (advice := overflow_advice(call.params)) and (not err.args or isinstance(err.args[0], str)):
                        err.args = (f"{err.args[0] if err.args else err} ({advice}.)", *err.args[1:])
                    raise
                raise NonFiniteError(
                    f"train_dataset rows {bad[:10]}{' ...' if len(bad) > 10 else ''} have a loss that is inf / NaN "
                    f"({len(bad)} of {len(call.train)} rows), which made s_test fail (the {type(err).__name__} below). "
                    "Drop them (train_dataset.select / filter) or mend their inputs and labels, then run again."
                    ) from err

    def _non_finite_training_rows(self, call: Call) -> list[int]:
        """The training rows whose loss is inf / NaN, as errors name them: one forward over every row, without
        gradients, after a solver met inf / NaN products (which name no row)."""
        bad = []
        bsz = self.args.influence_hvp_batch_size
        with torch.no_grad():
            for rows, batch in tqdm(call.train.batches(call.train.length_order(), bsz), disable=not call.progress,
                                    total=-(-len(call.train) // bsz), desc="training rows' losses (inf / NaN?)"):
                values, _ = call.fm.values_without_l2(call.params, batch)
                bad += [rows[i] for i in torch.nonzero(~torch.isfinite(values)).flatten().tolist()]
        return sorted(call.train.named_rows(bad))

    def _rows_in_mean(self, call: Call) -> np.ndarray:
        """Positions of the test rows ``combine="mean"`` averages over (its loss, and its kNN query): under the default
        loss those with a target (an unlabelled row's loss is 0, and the model's own loss leaves it out), else every
        row. Collated without trunk states: only the labels are read."""
        every = np.arange(len(call.test))
        if not self.measures_default_loss:
            return every
        empty = []
        for start in range(0, len(every), 256):
            rows = every[start:start + 256]
            empty += [rows[i] for i in rows_without_targets(self.model, call.test.batch(rows, trunk=False))]
        counted = np.setdiff1d(every, empty)
        if not len(counted):  # (the kNN query, which comes first, was a mean over nothing: NaN)
            raise ValueError(NO_TARGET_IN_MEAN)
        return counted

    def _test_gradients(self, call: Call) -> torch.Tensor:
        """``(m, p)`` in the working dtype: one measurement gradient per test row, or one row with the gradient
        of their mean (``combine="mean"``, rows split over processes)."""
        bsz = self.args.influence_hvp_batch_size
        if call.combine == "mean":
            device = next(iter(call.params.values())).device
            total = torch.zeros(num_parameters(call.params), dtype=call.work_dtype, device=device)
            # the rows the mean is over, as its kNN query (an unlabelled row is out of it: its zero loss, its L2 term
            # and the count; counted, it scaled every value by the labelled share)
            counted = self._rows_in_mean(call)

            def mine():
                for _, batch in call.test.batches(call.test.length_order(D.shard(counted)), bsz):
                    total.add_(batch_gradient(call.fm, call.params, batch, measurement=True,
                                              reduction="sum").to(total.dtype))

            D.together(mine, "The test rows' mean gradient")
            call.info["mean_over_rows"] = len(counted)  # (the card's count: the rows with a target, not every row)
            return (D.all_reduce_sum(total) / len(counted)).unsqueeze(0)
        # every process computes every row's (a collective block: an error one process alone meets stops them all;
        # no collective inside, where a failure before it would leave the others waiting in another gather)
        return D.together(lambda: self._each_test_gradient(call), "The test rows' gradients")

    def _each_test_gradient(self, call: Call) -> torch.Tensor:
        """``(m, p)`` in the working dtype: one measurement gradient per test row (in this process)."""
        bsz = self.args.influence_hvp_batch_size
        gradients = []
        for rows, batch in call.test.batches(range(len(call.test)), bsz):
            if self.measures_default_loss:  # a row must have targets
                empty = rows_without_targets(self.model, batch)
                if empty:
                    raise ValueError(
                        f"test_dataset row {call.test.named_rows([rows[empty[0]]])[0]} leaves the loss no target "
                        "to read: every label -100 as collated (a causal LM's loss also skips the first position, as "
                        "each position predicts the next token: a one-token row, or one labelled at its first token "
                        "only), so every influence on it would be 0. Drop such rows, or label at least one token "
                        "(after the first, for a causal LM).")
            gradients.append(batch_gradient(call.fm, call.params, batch, measurement=True, reduction="none",
                                            row_batch=lambda i, rows=rows: call.test.batch([rows[i]])))
        return torch.cat(gradients).to(call.work_dtype)

    # ---- stage 3: s_test --------------------------------------------------------------------------------------
    def _full_hvp(self, call: Call, batcher: Batcher, *, l2_term: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V ↦ H V`` with H the Hessian of the mean loss over every row of ``batcher`` (batches split over
        processes, summed with one all-reduce), in the working dtype; ``l2_term=False``: its data term alone."""
        bsz = self.args.influence_hvp_batch_size
        # chunks of rows alike in length (less padding), the longest first: the first chunk's graph is the one measured
        # for the budget (`KeptHessians`), and the budget keeps the graphs that cost the most to build again
        share = batcher.length_order(D.shard(range(len(batcher))))[::-1]
        chunks = [share[start : start + bsz] for start in range(0, len(share), bsz)]
        # beyond the budgets, built / collated again each product: bounded at any N
        kept = KeptHessians(call, FULL_HVP_GRAPH_BYTES, KeptBatches(FULL_HVP_KEPT_BYTES), "sum")
        n = len(batcher)

        def hvp(vectors: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(vectors, dtype=call.work_dtype)

            def mine():
                for i in range(len(chunks)):
                    total.add_(kept.product(i, lambda i=i: batcher.batch(chunks[i]), vectors,
                                            l2_term=l2_term).to(call.work_dtype))

            D.together(mine, "A product with the mean Hessian")
            return D.all_reduce_sum(total).div_(n)  # (total, or the reduction's own copy: no fresh vector)

        return hvp

    def _s_test(self, call: Call, v: torch.Tensor) -> torch.Tensor:
        args, lam = self.args, self.args.influence_lambda
        solver = args.influence_solver
        if solver == "exact":
            key = self._curvature_key(call, "exact")
            if self._exact is None or self._exact[0] != key:  # the Hessian, once per weights / data / loss
                self._exact = None  # the old one freed first: p² floats
                hessian = build_hessian(self._full_hvp(call, call.train), v.shape[1], dtype=call.work_dtype,
                                        device=v.device, progress=call.progress)
                if not torch.isfinite(hessian).all():  # (eigh: a bare "ill-conditioned" LinAlgError)
                    raise NonFiniteError("The training Hessian holds inf/NaN: a training row's loss or its derivatives "
                                         "are inf / NaN, or they overflowed the working dtype. Check the training "
                                         "rows' losses.")
                self._exact = (key, *torch.linalg.eigh(hessian.double()))
                del hessian
            s_test, info = solve_decomposed(self._exact[1], self._exact[2], v, lam, built_in=call.work_dtype)
        elif solver == "cg":
            s_test, info = solve_cg(self._full_hvp(call, call.train), v, lam,
                                    max_iterations=args.influence_cg_max_iterations, tol=args.influence_cg_tol,
                                    progress=call.progress)
        elif solver == "arnoldi":
            solve = self._low_rank_solve(call, v)
            s_test, info = solve(v), dict(solve.info)
        else:
            s_test, info = self._lissa(call, v)
        call.info.update(info)
        if not bool(torch.isfinite(s_test).all()):
            raise FloatingPointError(
                f"s_test ({solver}) is not finite: a training row's loss or its derivatives are inf / NaN, or the "
                "products overflowed the working dtype. Check the training rows' losses.")
        return s_test

    def _curvature_key(self, call: Call, *extra) -> tuple:
        return (call.model_key, call.train.fingerprint, len(call.train), tuple(call.names),
                self._functions["loss"], self._functions["collator"], self.args.influence_weight_decay,
                self.args.influence_seed, D.world()[1], str(call.train.device), *call.train.layout_key,
                *extra)  # (a model moved: rebuilt there)

    def _low_rank_solve(self, call: Call, v: torch.Tensor) -> LowRankSolve:
        """The low-rank solve for this call's λ and L2 term, prepared once per low-rank Hessian and λ (with an L2
        term on some parameters only, its preparation reads the eigenvectors once more)."""
        values, vectors = self._low_rank_hessian(call, v)
        key = (self._low_rank[0], self.args.influence_lambda)
        if self._prepared_solve is None or self._prepared_solve[0] != key:
            l2 = call.fm.l2_mask(call.params).to(call.work_dtype) if call.fm.decayed else None  # 2·wd on the decayed
            rank = self.args.influence_arnoldi_rank
            solve = LowRankSolve(values, vectors, self.args.influence_lambda, l2, rank)
            self._prepared_solve = (key, solve)
            factor = solve.info["arnoldi_truncation_factor"]
            if factor > ARNOLDI_TRUNCATION_WARNING:
                logger.warning(
                    f"influence_solver='arnoldi' at rank {rank}: the smallest magnitude among the Hessian's top {rank} "
                    f"eigenvalues is {factor - 1:.3g}x the damping (λ = {self.args.influence_lambda:.4g}, plus the L2 "
                    "term's curvature) that every direction beyond the rank is solved with, as if flat; where those "
                    f"directions curve about as much, their share of s_test comes out up to {factor:.3g}x too large. "
                    "Raise influence_arnoldi_rank (until the smallest of the top eigenvalues falls below λ) or "
                    "influence_damping, or compare with influence_solver='cg'.")
        return self._prepared_solve[1]

    def _low_rank_hessian(self, call: Call, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``influence_arnoldi_rank`` eigenpairs of the data term of H (the L2 term, known exactly, is
        left to the solve) over ``influence_arnoldi_rows`` seeded training rows (all by default), computed once
        per weights / data / loss and kept by the engine."""
        args = self.args
        # (v2: Lanczos restarts in a closed Krylov space, and the most negative Ritz pair is kept; v3: its start vector
        # the same whatever the dtype; v4: that start drawn in float32, so a Hessian saved from another start is not
        # served)
        key = self._curvature_key(call, "arnoldi (data term) v4", args.influence_arnoldi_rank,
                                  args.influence_arnoldi_rows)
        if self._low_rank is not None and self._low_rank[0] == key:
            self._served("low_rank", key)  # (a no-op unless it was read from disk)
        else:
            self._replaced("low_rank", key)
            rows = args.influence_arnoldi_rows
            batcher = call.train
            if rows is not None and rows < len(batcher):
                batcher = batcher.subset(np.sort(np.random.default_rng([args.influence_seed, 11]).permutation(
                    len(batcher))[:rows]))
            hvp = self._full_hvp(call, batcher, l2_term=False)
            steps = lanczos_steps(v.shape[1], args.influence_arnoldi_rank)
            with tqdm(total=steps, desc=f"Hessian eigenpairs (arnoldi, {len(batcher)} rows)", leave=False,
                      disable=not call.progress) as bar:
                def counted(x: torch.Tensor) -> torch.Tensor:
                    out = hvp(x.unsqueeze(0))[0]
                    bar.update()
                    return out

                self._low_rank = (key, low_rank_hessian(counted, v.shape[1], args.influence_arnoldi_rank,
                                                        dtype=call.work_dtype, device=v.device,
                                                        seed=args.influence_seed))
        return self._low_rank[1]

    def _lissa(self, call: Call, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
        args = self.args
        rank, world_size = D.world()
        repetitions = args.influence_repetitions or world_size
        depth, bsz, n = args.influence_recursion_depth, args.influence_batch_size, len(call.train)
        info: dict = {"lissa_total_repetitions": repetitions}
        if bsz > n:  # (B 100 over 40 rows ran unremarked)
            logger.warning_once(
                f"influence_batch_size={bsz} is more than the {n} training rows: each LiSSA step's batch holds rows "
                "twice or more (every row as often as the others over the steps) and costs more than a product with "
                f"the whole training set's Hessian. Use influence_batch_size={n} or less, or influence_solver='cg' "
                "(the mean Hessian itself).")
        top = None
        smallest = None
        if args.influence_check_convergence:
            check = self._check_lissa(call, v)
            info |= check
            top = check["lissa_batch_top_eigenvalue"]
            smallest = check.get("hessian_min_eigenvalue_confirmed", check["hessian_min_eigenvalue_estimate"])
        left_out = truncation_share(args.influence_damping, args.influence_scale, depth, smallest)
        info["lissa_truncation_share"] = left_out  # (below the warning's half, a table still says how far J went)
        if left_out > TRUNCATION_WARNING:  # (J 5 at damp 0.01 returned s_test 44% off the exact solve, unwarned)
            negative = smallest is not None and smallest < 0
            logger.warning_once(
                f"influence_recursion_depth={depth} with influence_damping={args.influence_damping:g}: LiSSA stops "
                f"after J steps, where along directions of little{' or negative' if negative else ''} curvature it "
                f"has summed only {1 - left_out:.0%} of its series (up to {left_out:.0%} of s_test missing there). "
                "The paper keeps J·damping at 5 (1000 × 5e-3): raise influence_recursion_depth to "
                f"{converging_depth(args.influence_damping, args.influence_scale, smallest)}"
                + (f" (the Hessian's smallest eigenvalue, ~{smallest:.3g}, slows it)" if negative else "")
                + ", or raise influence_damping (λ = damping × scale rises with it; lower influence_scale to keep λ).")
        mine = D.shard(range(repetitions))
        draws = {t: lissa_batches(n, bsz, depth, args.influence_seed, t) for t in mine}

        # batches drawn again (rows recur where B = 1 and J·T > N/2, and a later call with these weights and rows
        # draws the same ones) keep their graph while it fits, or else, within this call, their collated rows
        uses = Counter(rows.tobytes() for t in mine for rows in draws[t])
        kept = self._kept_lissa_graphs(call).for_call(call, KeptBatches(LISSA_BATCH_MEMO_BYTES))

        stacked = self._stacked_steps(call, len(mine), v, kept)

        def hvp_step(j: int, reps: Sequence[int], h: torch.Tensor, *, into: torch.Tensor, alpha: float,
                     carry: Carry) -> None:
            if stacked is not None and stacked.usable:
                groups = [draws[t][j - 1] for t in reps]
                if stacked.step(groups, h, into, alpha, carry):
                    for rows in groups:  # (drawn: a kept graph is kept for the draws still to come)
                        uses[rows.tobytes()] -= 1
                    return
                # it raised after its checks: this step and the rest of the call run one product at a time
            if into.data_ptr() == h.data_ptr():  # (in place, only where the steps stack: the products below read
                h = h.clone()  # h after the carry wrote it; from a step that stopped stacking on, a copy a step)
            carry.finish()  # (what a grouped step carried before it raised stays: carried once)
            for r, t in enumerate(reps):
                rows = draws[t][j - 1]
                key = rows.tobytes()
                uses[key] -= 1
                step = dict(again=uses[key] > 0, l2_term=False)  # the L2 term's diagonal: left to solve_lissa
                collate = functools.partial(call.train.batch, rows)
                if h.shape[1] == 1:  # one vector: the plain double backward, added into the next iterate
                    kept.accumulate(key, collate, h[r, 0], into[r, 0], alpha, **step)
                else:
                    into[r].add_(kept.product(key, collate, h[r], **step), alpha=alpha)

        diagonal = call.fm.l2_mask(call.params) if call.fm.decayed else None
        # an error in one process's repetitions (a divergence) stops every process; they waited for its sum
        try:
            estimate, lissa_info = D.together(
                lambda: solve_lissa(hvp_step, v, damping=args.influence_damping, scale=args.influence_scale,
                                    depth=depth, repetitions=mine, top_eigenvalue=top, progress=call.progress,
                                    diagonal=diagonal, accumulates=True, carries=True,
                                    in_place=v.shape[0] == 1 and stacked is not None),
                "LiSSA's repetitions")
        finally:
            kept.end_call()
        total = D.all_reduce_sum(estimate * len(mine)) / repetitions
        # stacked to the end in every process (a process holding one repetition has nothing to stack)
        info["lissa_stacked"] = bool(D.gather_rows(np.array([stacked is not None and stacked.usable])).all())
        # the table's diagnostics describe every repetition, not only this process's share
        ends = D.gather_rows(np.array([[lissa_info.get("lissa_final_norm", np.nan),
                                        lissa_info.get("lissa_min_alignment", np.nan)]]))
        # the repetitions' squared deviations from the mean of all: each process's about its own mean, and its own
        # mean's from the whole (none in a process without a repetition)
        # (on the device: NCCL reduces no CPU tensor; every process knows T, so all or none take part)
        spread = None
        if repetitions > 1:
            deviations = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
            if mine:
                own = torch.linalg.vector_norm(estimate - total, dim=-1).double() ** 2
                deviations = lissa_info["lissa_deviations"] + len(mine) * own
            spread = repetition_spread(D.all_reduce_sum(deviations), total, repetitions)
        lissa_info = {"lissa_repetitions": repetitions, "lissa_steps": depth,
                      "lissa_final_norm": float(np.nanmax(ends[:, 0])),
                      "lissa_min_alignment": float(np.nanmin(ends[:, 1]))}
        if spread is not None:
            lissa_info["lissa_repetition_spread"] = spread
        # once per weights, data and settings (a loop over test points said it for each), by the main process
        if spread is not None and spread > SPREAD_WARNING:
            key = self._curvature_key(call, "spread warned", bsz, repetitions, depth, args.influence_damping,
                                      args.influence_scale)
            if key not in self._spread_warned and D.is_main_process():
                logger.warning(
                    f"LiSSA's {repetitions} repetitions disagree: their mean's standard error is {spread:.2g} of "
                    "s_test's norm, so s_test is that uncertain from sampling alone (each repetition rests on its last "
                    f"~1/damping = {1 / max(args.influence_damping, 1e-12):.3g} batches of {bsz} rows). Raise "
                    "influence_repetitions or influence_batch_size, lower influence_damping (raising "
                    "influence_recursion_depth to match), or use influence_solver='cg' (no sampling).")
            self._spread_warned.add(key)
        return total, info | lissa_info

    def _stacked_steps(self, call: Call, repetitions: int, v: torch.Tensor,
                       kept: KeptHessians) -> _StackedSteps | None:
        """The stacked LiSSA steps of this call (`hf_fastif.stacked`), or None where ``influence_stack_repetitions``
        does not stack here or the stacked products failed their check before on these weights, rows and loss."""
        mode = getattr(self.args, "influence_stack_repetitions", "auto")
        table = grouped_modules(call.fm, call.names)
        grouped = not isinstance(table, str)
        if not stacks(mode, v.device, repetitions, grouped):
            return None
        key = self._curvature_key(call, "stacked lissa", str(call.work_dtype),
                                  None if call.fm.split is None else f"{call.fm.split.path}.{call.fm.split.first}",
                                  None if call.fm.readout is None else call.fm.readout.name)
        if self._stack_refused is not None and self._stack_refused[0] == key:
            return None

        def refused(why: str) -> None:
            self._stack_refused = (key, why)
            logger.info(f"LiSSA's repetitions run one product at a time: {why}.")

        if grouped:
            return _StackedSteps(GroupedHessian(call.fm, call.params, table=table), call.train,
                                 stack_tolerance(call.fm.model), refused, kept)
        why = unstackable_attention(call.fm.model)
        if why is not None:
            refused(f"the model cannot be stacked: {why}")
            return None
        return _StackedSteps(StackedHessian(call.fm, call.params), call.train, stack_tolerance(call.fm.model), refused)

    def _kept_lissa_graphs(self, call: Call) -> KeptHessians:
        """LiSSA's kept first-backward graphs, held between calls on the same weights, rows, parameters, loss and
        collator (what keys the curvature estimates); built anew (the old ones freed) when any of them changed.

        Also keyed on the in-place version of every parameter and buffer of the model: a graph holds the tensors it
        read, and autograd refuses a graph whose saved tensor was written in place since, even with the same values
        (weights restored by ``load_state_dict``, as HANS correction restores them between its runs, made every later
        call raise "modified by an inplace operation" until `clear`)."""
        versions = tuple(in_place_version(t) for t in (*self.model.parameters(), *self.model.buffers()))
        key = self._curvature_key(call, "lissa graphs", str(call.work_dtype), versions)
        if self._lissa_graphs is None or self._lissa_graphs[0] != key:  # (the old graphs freed with their holder)
            self._lissa_graphs = (key, KeptHessians(call, LISSA_GRAPH_BYTES, KeptBatches(0), "mean", retain=True))
        return self._lissa_graphs[1]

    def _check_lissa(self, call: Call, v: torch.Tensor) -> dict:
        """Estimate what LiSSA's convergence depends on, before the recursion: the top eigenvalue of B-row batch
        Hessians (the largest over `CHECK_BATCHES` seeded batches) and the smallest eigenvalue of the mean
        Hessian over `CHECK_ROWS` rows (Lanczos), confirmed on `CONFIRM_ROWS` rows in turn when it says H + λI is
        indefinite. Refuse what cannot converge; kept per weights / data / B."""
        args = self.args
        bsz, n = args.influence_batch_size, len(call.train)
        key = self._curvature_key(call, "lissa v4", bsz)  # (v4: batch runs without full reorthogonalisation)
        p, dtype, device = v.shape[1], call.work_dtype, v.device

        @functools.cache
        def workspace() -> torch.Tensor:  # the Lanczos runs' bases one after another in the same rows, made at first
            # need (fresh memory's first touch cost ~3 ms a 1.9M-entry row, each run)
            return torch.empty(CHECK_ITERATIONS + 2, p, dtype=dtype, device=device)

        def smallest(rows: np.ndarray) -> tuple[float, float]:
            mean_hvp = self._full_hvp(call, call.train.subset(np.sort(rows)))
            return extreme_eigenvalues(lambda x: mean_hvp(x.unsqueeze(0))[0], p, iterations=CHECK_ITERATIONS + 2,
                                       dtype=dtype, device=device, seed=args.influence_seed, workspace=workspace())

        self._served("curvature", key)
        if key not in self._curvature:
            rng = np.random.default_rng([args.influence_seed, 2**31 - 1])
            tops = []
            # each batch run's products written into one vector, Lanczos taking it in before asking for the next
            # (where a parameter's dtype differs, products as they come)
            reused = torch.empty(p, dtype=dtype, device=device) if all(
                t.dtype == dtype for t in call.params.values()) else None
            for b in range(CHECK_BATCHES):
                rows = rng.choice(n, size=min(bsz, n), replace=False)
                hessian = BatchHessian(call.fm, call.params, call.train.batch(rows))  # one graph for the run

                def hvp(x, hessian=hessian):
                    return hessian.product(x, out=reused).to(dtype)

                tops.append(extreme_eigenvalues(hvp, p, iterations=CHECK_ITERATIONS, dtype=dtype, device=device,
                                                seed=args.influence_seed + b, reorthogonalise=False,
                                                workspace=workspace())[1])
            reused = None  # (freed before the mean Hessian's run)
            sample = rng.permutation(n)[:CHECK_ROWS]
            low, high = smallest(sample)
            self._curvature[key] = {"lissa_batch_top_eigenvalue": max(tops), "hessian_min_eigenvalue_estimate": low,
                                    "hessian_max_eigenvalue_estimate": high, "lissa_check_batches": CHECK_BATCHES,
                                    "lissa_check_rows": len(sample)}
        found = self._curvature[key]
        scale, damp, lam = args.influence_scale, args.influence_damping, args.influence_lambda
        top, low = found["lissa_batch_top_eigenvalue"], found["hessian_min_eigenvalue_estimate"]
        limit = (2.0 - damp) * scale
        if top >= limit:
            raise LissaDivergenceError(
                f"influence_scale={scale:g} is too small for LiSSA to converge: each step needs the Hessian of its "
                f"{bsz}-row batch to have eigenvalues below (2 - damp)·scale = {limit:.4g}, and the largest seen on "
                f"{CHECK_BATCHES} sampled batches is about {top:.4g}. Use influence_scale >= {suggest_scale(top):.3g} "
                "(lower influence_damping to keep λ = damping × scale if needed), a larger influence_batch_size, or "
                "influence_solver='cg'.")
        rows = found["lissa_check_rows"]
        confirmed = found.setdefault("hessian_min_eigenvalue_confirmed_by_rows", {})
        for size in sorted({min(c, n) for c in CONFIRM_ROWS}):
            # cleared by a margin, or no more rows than the estimate already had; else confirmed on more rows both
            # ways: a small sample's Hessian is mostly more indefinite than the set's, but not always (a 32-row
            # sample's -0.055 against the set's -0.084 let λ = 0.069 through, and LiSSA came back 2x off)
            if low + lam > CONFIRM_MARGIN * lam or size <= rows:
                continue
            if str(size) not in confirmed:
                logger.info(f"LiSSA check: the {rows}-row Hessian's smallest eigenvalue ~{low:.4g} is "
                            f"{'below' if low + lam <= 0 else 'near'} -λ = {-lam:.4g}; confirming on {size} rows.")
                order = np.random.default_rng([args.influence_seed, 2**31 - 2]).permutation(n)  # nested sizes
                confirmed[str(size)] = smallest(order[:size])[0]  # str keys: the same after a JSON round trip
            low, rows = confirmed[str(size)], size
            found["hessian_min_eigenvalue_confirmed"], found["lissa_confirm_rows"] = low, rows
        if low + lam <= 0:
            raise LissaDivergenceError(
                f"H + λI is not positive definite: the smallest eigenvalue of the training Hessian is about {low:.4g} "
                f"(Lanczos on {rows} rows) and λ = {lam:.4g} (influence_damping × influence_scale), so LiSSA has no "
                "fixed point to converge to. The Hessian is indefinite (the model is not at a minimum); raise "
                f"influence_damping so that λ > {-low:.4g} (e.g. {suggest_scale(-low):.3g}).")
        if top > limit / 2:
            logger.warning(f"influence_scale={scale:g} is within 2x of LiSSA's convergence limit: batch Hessians reach "
                           f"~{top:.4g} vs (2 - damp)·scale = {limit:.4g}; a larger scale is safer.")
        return dict(found)
