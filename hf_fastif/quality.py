"""How well an influence estimate agrees with a reference: rank agreement and top-n recall.

A cheaper estimate (kNN candidates, fewer LiSSA steps, another solver) is judged against a reference table,
usually the full scan of every training row with a tight solver. Two questions matter to a user:
does the estimate order its candidates as the reference does (Pearson / Spearman on the rows both score),
and does it find the reference's most helpful / harmful training rows (recall@n). The sign is the paper's:
negative influence is helpful, positive harmful.

    reference = influence_by_test(full_table, num_test)          # every training row
    estimate = influence_by_test(fast_table, num_test)           # e.g. kNN candidates only
    agreement(dense_reference(reference, num_train), estimate)   # {"spearman": ..., "recall@10 helpful": ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from .table import InfluenceTable

RECALL_NS = (10, 100)
"""The recall@n of the table: the full scan's 10 and 100 most helpful / harmful rows."""


def recall_ns(num_rows: int) -> list[int]:
    """`RECALL_NS` capped at ``num_rows`` candidate rows (fewer rows than n: recall of all of them), without
    repeats."""
    return sorted({min(n, num_rows) for n in RECALL_NS})


DIRECTIONS = ("helpful", "harmful")

PerTest = tuple[np.ndarray, np.ndarray]  # (train_ids (k,), influence (k,)) of one test point


def influence_by_test(table: InfluenceTable, num_test: int) -> list[PerTest]:
    """``[(train_ids, influence)]`` for test ids ``0 .. num_test - 1`` of a table, rows sorted by train id.

    ``train_ids`` is ``int64`` and ``influence`` ``float64``, both of shape ``(k_t,)`` where ``k_t`` is the
    number of training rows scored for test point ``t`` (N for a full scan, k with kNN candidates).
    """
    if not isinstance(num_test, (int, np.integer)) or num_test < 1:
        raise ValueError(f"num_test must be a positive integer, got {num_test!r}.")
    frame = table.to_pandas()
    present = set(frame.test_id.unique().tolist())
    missing = [t for t in range(num_test) if t not in present]
    if missing:
        raise ValueError(f"The table has no rows for test ids {missing[:10]}; it holds test ids "
                         f"{sorted(present)[:10]}. Pass num_test <= the number of test points it was built for.")
    out = []
    for t in range(num_test):
        rows = frame[frame.test_id == t].sort_values("train_id")
        out.append((rows.train_id.to_numpy(np.int64), rows.influence.to_numpy(np.float64)))
    return out


def dense_reference(per_test: Sequence[PerTest], num_train: int) -> np.ndarray:
    """The ``(m, num_train)`` matrix of a full-scan reference given as `influence_by_test` output.

    Raises a `ValueError` if any test point does not score every training row exactly once: recall and
    rank agreement need the reference's value for every row.
    """
    out = np.empty((len(per_test), num_train))
    for t, (ids, values) in enumerate(per_test):
        ids = np.asarray(ids)
        if len(ids) != num_train or not np.array_equal(np.sort(ids), np.arange(num_train)):
            raise ValueError(f"Test point {t} of the reference scores {len(ids)} rows, not each of the "
                             f"{num_train} training rows once; build the reference without kNN "
                             "(influence_knn_k=None).")
        out[t, ids] = values
    return out


def _check_estimate(reference_row: np.ndarray, ids, values, where: str) -> tuple[np.ndarray, np.ndarray]:
    ids, values = np.asarray(ids), np.asarray(values, dtype=np.float64)
    if ids.ndim != 1 or values.shape != ids.shape:
        raise ValueError(f"{where}: train_ids and influence must be 1-D of the same length, got shapes "
                         f"{ids.shape} and {values.shape}.")
    if len(ids) and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{where}: train_ids must be integers (rows of the training set), got {ids.dtype}.")
    ids = ids.astype(np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(reference_row)):
        raise ValueError(f"{where}: train_ids must lie in [0, {len(reference_row)}) (the reference's training "
                         f"rows), got values from {ids.min()} to {ids.max()}.")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: train_ids contain duplicates; give each training row once.")
    return ids, values


def top_n_recall(reference: np.ndarray, train_ids: np.ndarray, influence: np.ndarray, n: int,
                 direction: str = "helpful") -> float:
    """Share of the reference's ``n`` most helpful (most negative) or harmful (most positive) training rows
    that are also among the ``n`` most helpful / harmful rows of the estimate.

    Args:
        reference: ``(N,)`` influence of every training row on one test point.
        train_ids: ``(k,)`` training rows the estimate scored (e.g. its kNN candidates), distinct.
        influence: ``(k,)`` the estimate's influence of those rows.
        n: how many top rows to compare, ``1 <= n <= N``.
        direction: ``"helpful"`` or ``"harmful"``.
    Returns:
        A share in ``[0, 1]``, over ``n``: an estimate that scores fewer than ``n`` rows cannot reach 1.
        Ties are broken by row order (stable sort), the same for reference and estimate.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use 'helpful' or 'harmful'.")
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 1:
        raise ValueError(f"reference must be 1-D (one test point, every training row), got shape {reference.shape}.")
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= len(reference):
        raise ValueError(f"n must be an integer in [1, {len(reference)}] (the number of training rows), got {n!r}.")
    ids, values = _check_estimate(reference, train_ids, influence, "top_n_recall")
    sign = -1.0 if direction == "harmful" else 1.0  # ascending order of sign·influence: most helpful first
    truth = np.argsort(sign * reference, kind="stable")[:n]
    mine = ids[np.lexsort((ids, sign * values))[:n]]  # ties by row, not by the order the ids were given in
    return len(np.intersect1d(truth, mine)) / n


def agreement(reference: np.ndarray, estimates: Sequence[PerTest], ns: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Agreement of an influence estimate with a full-scan reference, averaged over test points.

    Args:
        reference: ``(m, N)`` influence of every training row on each of m test points (`dense_reference`).
        estimates: one ``(train_ids, influence)`` per test point, for the first ``len(estimates)`` rows of
            ``reference`` (`influence_by_test` of the estimate's table).
        ns: the n of each recall@n.
    Returns:
        ``pearson`` and ``spearman``: correlation with the reference on the rows the estimate scores (rows
        whose value is NaN on either side, e.g. a gradient that overflowed, left out: one made every mean NaN;
        nan for a test point where either side is constant), mean over test points; ``spearman_min``: the worst test
        point; ``recall@{n} helpful`` / ``recall@{n} harmful``: mean `top_n_recall`.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2:
        raise ValueError(f"reference must be 2-D (test points, training rows), got shape {reference.shape}; "
                         "for one test point pass reference[None].")
    if not 1 <= len(estimates) <= len(reference):
        raise ValueError(f"Give between 1 and {len(reference)} estimates (one per reference test point), "
                         f"got {len(estimates)}.")
    for n in ns:
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= reference.shape[1]:
            raise ValueError(f"Every n in ns must be an integer in [1, {reference.shape[1]}], got {n!r}.")
    scores: dict[str, list[float]] = {"pearson": [], "spearman": []}
    for t, (train_ids, influence) in enumerate(estimates):
        ids, values = _check_estimate(reference[t], train_ids, influence, f"estimate of test point {t}")
        ref = reference[t, ids]
        finite = np.isfinite(values) & np.isfinite(ref)
        a, b = values[finite], ref[finite]
        constant = len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0
        scores["pearson"].append(float("nan") if constant else float(pearsonr(a, b).statistic))
        scores["spearman"].append(float("nan") if constant else float(spearmanr(a, b).statistic))
        for n in ns:
            for direction in DIRECTIONS:
                scores.setdefault(f"recall@{n} {direction}", []).append(
                    top_n_recall(reference[t], ids, values, n, direction))
    summary = {key: float(np.mean(values)) for key, values in scores.items()}
    summary["spearman_min"] = float(np.min(scores["spearman"]))
    return summary
