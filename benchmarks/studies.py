"""The paper table's two studies: kNN recall vs k (with the index built once and timed) and the s_test sweep
over LiSSA's J, B and T. `knn_study` calls hf_fastif.knn directly (features, faiss index, search); the sweep times
the engine's private ``InfluenceEngine._check_lissa`` (the LiSSA convergence check)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from unittest import mock

import numpy as np
from scipy.stats import pearsonr, spearmanr

from hf_fastif import InfluenceArguments
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.engine import InfluenceEngine
from hf_fastif.knn import build_index, extract_features, search
from hf_fastif.quality import influence_by_test
from hf_fastif.solvers.lissa import LissaDivergenceError

from .paper_setup import BenchmarkArguments, Setup, call_influences
from .timing import timed


def knn_study(setup: Setup, ks: list[int], features: str) -> dict:
    """The kNN index over ``features`` (the run's ``influence_knn_features``, so that the "+kNN" rows' candidates
    are their calls') built once (timed), each test point's neighbours in distance order (all N), the candidates
    of each k, and the measured per-query cost (one test feature + one search)."""
    model, train = setup.model, setup.train
    device = next(model.parameters()).device
    train_rows = Batcher(train, validate_dataset(train, "train_dataset", model), setup.collator, device)
    index, build_s = timed(lambda: build_index(extract_features(model, train_rows, features, batch_size=64,
                                                                progress=False)))
    tests = Batcher(setup.test, validate_dataset(setup.test, "test_dataset", model), setup.collator, device)
    k_query = max(ks)

    def query(t: int) -> np.ndarray:
        q = extract_features(model, tests.subset([t]), features, batch_size=1, progress=False)
        search(index, q, k_query)
        return q[0]

    queries, query_s = zip(*(timed(lambda t=t: query(t)) for t in range(len(setup.test))))
    _, order = search(index, np.stack(queries), len(train))
    candidates = {k: [np.sort(order[t, :k]).astype(np.int64) for t in range(len(setup.test))] for k in ks}
    return {"features": features, "index_build_s": build_s, "query_s": float(np.median(query_s)), "order": order,
            "candidates": candidates}


def knn_recall_curve(original: np.ndarray, order: np.ndarray, ns: tuple[int, ...] = (10, 100)) -> dict:
    """The paper's recall study: share of the full scan's n most helpful / harmful rows inside the k nearest
    neighbours, for k from 10 to N, mean over test points. ``original``: ``(m, N)`` influence; ``order``:
    ``(m, N)`` training rows by distance to each test point's feature, nearest first."""
    n_rows = original.shape[1]
    grid = sorted({k for e in range(1, 7) for k in (10**e, 2 * 10**e, 5 * 10**e) if k < n_rows} | {n_rows})
    curve: dict = {"k": grid}
    for n in ns:
        if n > n_rows:
            continue
        for kind, sign in (("helpful", 1.0), ("harmful", -1.0)):
            tops = [np.argsort(sign * original[t], kind="stable")[:n] for t in range(original.shape[0])]
            curve[f"recall@{n} {kind}"] = [
                float(np.mean([np.isin(top, order[t, :k]).mean() for t, top in enumerate(tops)])) for k in grid]
    curve["random"] = [k / n_rows for k in grid]
    return curve


@contextlib.contextmanager
def timed_checks(seconds: list[float]) -> Iterator[None]:
    """Within the block, every `InfluenceEngine`'s LiSSA convergence check (its private ``_check_lissa``, inside
    the ``s_test_s`` of a call's diagnostics, which do not time it apart) appends its seconds to ``seconds``."""
    check = InfluenceEngine._check_lissa

    def timed_check(self, call, v):
        result, check_s = timed(lambda: check(self, call, v))
        seconds.append(check_s)
        return result

    with mock.patch.object(InfluenceEngine, "_check_lissa", timed_check):
        yield


def s_test_sweep(setup: Setup, bench: BenchmarkArguments, args: InfluenceArguments,
                 original: np.ndarray) -> list[dict]:
    """The paper's s_test sweep: LiSSA over a J grid and a B grid, T repetitions, against "original" on a
    random pool of training rows. T = t averages t independent T = 1 runs (other seeds): influence is linear
    in s_test, so this is the T = t estimator. Its time is theirs with the convergence check counted once, as a
    T = t call runs it once (it depends on B, not on J or T): the first run's s_test seconds, the others' without
    their check's (each run is a fresh engine, which checks again). A run the engine refuses
    (`LissaDivergenceError`: its convergence check estimates curvature on a seeded sample of rows, so another seed
    can see another spectrum) is recorded as ``refused`` with the message, and that B's remaining T are skipped."""
    m = min(bench.sweep_num_test, len(setup.test))
    test = setup.test.select(range(m))
    rng = np.random.default_rng(args.seed + 11)
    pool_ids = np.sort(rng.choice(len(setup.train), min(bench.sweep_pool, len(setup.train)), replace=False))
    pool = setup.train.select(pool_ids)
    reference = original[:m, pool_ids]
    points = []
    # fractions that round to the same J (e.g. 0.5 and 1.0 of J = 1) are one point of the grid
    depths = dict.fromkeys(max(1, round(fraction * args.influence_recursion_depth)) for fraction in bench.sweep_depths)
    for depth in depths:
        for b in dict.fromkeys(bench.sweep_batch_sizes):
            t_max = max(1, min(bench.sweep_repetitions, bench.original_batch_size // b))
            estimates, seconds = [], []
            for r in range(t_max):
                settings = replace(args, influence_batch_size=b, influence_repetitions=1,
                                   influence_recursion_depth=depth, influence_knn_k=None,
                                   influence_seed=args.influence_seed + 1000 + r)
                checks: list[float] = []
                try:
                    with timed_checks(checks):
                        table, _ = call_influences(setup, test, settings, candidate_dataset=pool)
                except LissaDivergenceError as err:  # the engine's convergence check refused this seed's sample
                    points.append({"J": depth, "B": b, "T": r + 1, "refused": str(err)})
                    break
                mat = np.zeros((m, len(pool_ids)))
                for t, (ids, values) in enumerate(influence_by_test(table, m)):
                    mat[t, ids] = values
                estimates.append(mat)
                s_test_s = table.metadata["diagnostics"]["s_test_s"] - (sum(checks) if r > 0 else 0.0)
                seconds.append(s_test_s / m)
                mean = np.mean(estimates, 0)
                points.append({
                    "J": depth, "B": b, "T": r + 1, "s_test_s_per_test_point": float(np.sum(seconds)),
                    "spearman": float(np.mean([spearmanr(mean[t], reference[t]).statistic for t in range(m)])),
                    "pearson": float(np.mean([pearsonr(mean[t], reference[t]).statistic for t in range(m)])),
                })
    return points
