"""Stage 4 of `InfluenceEngine`: the candidate rows each query scores (kNN over model features, the
gradient index, a random sample, or every row), and recall of the candidates against the full scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import torch
from datasets import Dataset
from transformers.utils import logging

from .. import distributed as D
from ..batches import Batcher
from ..fingerprint import callable_fingerprint
from ..gradient_index import (
    build_gradient_index,
    check_index_factory,
    load_gradient_index,
    saved_index_intact,
)
from ..knn import build_index, extract_features, search, warn_short
from ..mode import influence_mode
from ..quality import recall_ns
from ..utils import relative_difference
from . import padding  # (its constants read as padding.X: one place to patch them)
from .call import Call

logger = logging.get_logger(__name__)


def _feature_path(call: Call, method, *batchers: Batcher) -> tuple:
    """``(split, batchers)`` that ``method``'s features are extracted through: the call's trunk split for a named
    method, the full model (batchers without their trunk states) for a user's callable, and for a method the trunk's
    first-position cut was not checked on (`InfluenceEngine._first_position_cut`)."""
    split = call.fm.split if isinstance(method, str) else None
    cut = any(b.trunk is not None and b.trunk.per_row for b in batchers)
    if cut and method not in call.feature_methods:
        split = None
    return split, tuple(b if split is not None else _plain(b, padded=not isinstance(method, str)) for b in batchers)


def _plain(batcher: Batcher, padded: bool = False) -> Batcher:
    """``batcher`` without its trunk states, and with ``padded`` its batches collated with their trailing padding
    (a ``features=`` callable, which the trailing-padding probe does not see, gets the batches it got before)."""
    view = batcher.with_trunk(None)
    view.skip_padding = batcher.skip_padding and not padded
    return view


def _recall(reference: np.ndarray, found: list[np.ndarray], ns: Sequence[int]) -> dict:
    """Mean over queries of the share of the reference's n most helpful / harmful rows among the candidates."""
    out = {}
    for n in ns:
        top = min(int(n), reference.shape[1])  # n above the number of rows: all of them
        helpful = [np.isin(np.argsort(ref, kind="stable")[:top], rows).mean() for ref, rows in zip(reference, found)]
        harmful = [np.isin(np.argsort(-ref, kind="stable")[:top], rows).mean() for ref, rows in zip(reference, found)]
        out[f"recall@{n} helpful"], out[f"recall@{n} harmful"] = float(np.mean(helpful)), float(np.mean(harmful))
    return out


class CandidateStage:
    """`InfluenceEngine`'s candidates and their recall (`candidate_recall`). State (made in
    `InfluenceEngine.__init__`): ``_feature_index``, ``_gradient_index`` (saved by saved_caches.py, which leaves
    ``_saved_gradient_index`` to be read on first use here); ``("features", ...)`` keys of ``_padding_checked``."""

    def candidate_recall(self, train_dataset: Dataset, test_dataset: Dataset, ks: Sequence[int], *,
                         methods: Sequence[str] = ("auto", "gradient", "random"), ns: Sequence[int] | None = None,
                         candidate_dataset: Dataset | None = None) -> list[dict]:
        """How many of the truly most influential rows each candidate method finds, with one s_test.

        For every test row: s_test once, then the full scan (every candidate row scored exactly); then for each
        ``method`` (``influence_knn_features`` values, ``"gradient"``, ``"random"``) and each ``k``: recall@n of the
        full scan's ``n`` most helpful and most harmful rows among the k candidates (candidates are scored exactly,
        so that is also the recall of the candidate method's own top n). Random candidates are expected at k/N.
        ``ns`` defaults to 10 and 100, each capped at the candidate rows.

        Returns:
            One dict per (method, k): ``method``, ``k``, ``k_fraction``, ``recall@{n} helpful/harmful`` (mean over
            test rows), ``random_expectation`` (k/N), ``build_s`` (the method's index, once), ``query_s`` (per query).
        """
        call = self._start(train_dataset, test_dataset, candidate_dataset, "none", methods=list(methods))
        n_rows = len(call.cand)
        ns = recall_ns(n_rows) if ns is None else ns  # (10, 100) capped at the rows: 100 was refused under 100 rows
        for k in ks:
            if isinstance(k, str):  # (int("5%") failed with Python's own words)
                raise ValueError(f"ks are counts of candidate rows, got {k!r}; for a share of the {n_rows} rows, "
                                 f"hf_fastif.recall.resolve_ks([{k!r}], {n_rows}) gives its count.")
            if not 1 <= int(k) <= n_rows:
                raise ValueError(f"Every k must be between 1 and the {n_rows} candidate rows, got {k}.")
        for n in ns:
            if not 1 <= int(n) <= n_rows:
                raise ValueError(f"Every n must be between 1 and the {n_rows} candidate rows, got {n}.")
        out = []
        with influence_mode(self.model, call.names):
            self._prepare(call)
            for method in methods:  # an index setting that cannot work fails before s_test and the full scan (it
                if method not in ("gradient", "random"):  # failed after them, and after the CLI's fine-tuning)
                    self._check_feature_index(call, method)
            s_test = self._s_test_of(call)
            reference = self._full_scan(call, s_test)
            for method in methods:
                first = True
                for k in ks:
                    start = time.perf_counter()
                    found = self._candidates(call, s_test, method, int(k))
                    seconds = time.perf_counter() - start
                    if first:  # the first call builds the method's index; time a second query alone
                        start = time.perf_counter()
                        self._candidates(call, s_test, method, int(k))
                        query = time.perf_counter() - start
                        build, first = max(seconds - query, 0.0), False
                    else:
                        query = seconds
                    row = {"method": method if isinstance(method, str) else getattr(method, "__qualname__", "callable"),
                           "k": int(k),
                           "k_fraction": int(k) / n_rows, "random_expectation": int(k) / n_rows,
                           "build_s": build, "query_s": query / len(found)}
                    row |= _recall(reference, found, ns)
                    out.append(row)
        self._ended()
        return out

    def _candidate_method(self):
        """How candidates are found where a call names no method: the engine's ``features`` (a name or a function of
        one's own), else ``influence_knn_features``."""
        return self.features or self.args.influence_knn_features

    def _candidates_read_s_test(self, call: Call) -> bool:
        """Whether this call's candidates come from s_test (gradient-space candidates); kNN over model features,
        a random sample or every row do not, and are found before s_test."""
        method = self._candidate_method()
        return call.k is not None and isinstance(method, str) and method == "gradient"

    def _candidates(self, call: Call, s_test: torch.Tensor, method=None, k: int | None = None) -> list[np.ndarray]:
        """Candidate rows of each query (one query per test row, or one for the mean), by ``method`` (default: the
        engine's ``features`` or ``influence_knn_features``; ``"random"`` for a seeded uniform sample)."""
        queries = 1 if call.combine == "mean" else len(call.test)
        for_scores = method is None  # (candidate_recall names a method: it measures an index as it is, unwarned)
        k = call.k if method is None else k
        if k is None:
            call.info["candidates"] = "all"
            return [np.arange(len(call.cand))] * queries
        method = method or self._candidate_method()
        if method == "random":
            rng = np.random.default_rng([self.args.influence_seed, 17])
            return [np.sort(rng.choice(len(call.cand), size=k, replace=False)) for _ in range(queries)]
        if method == "gradient":
            call.info["candidates"] = "gradient"
            found = self._gradient_candidates(call, s_test, k)
        else:
            call.info["candidates"] = "knn" if isinstance(method, str) else "knn (callable features)"
            found = self._knn_candidates(call, method, k)
        if for_scores:
            warn_short(found, k, len(call.cand), "The gradient index" if method == "gradient" else "The kNN index",
                       self.args.influence_knn_index)
        return found

    def _gradient_candidates(self, call: Call, s_test: torch.Tensor, k: int) -> list[np.ndarray]:
        """The candidates of each query from the engine's gradient index (`hf_fastif.gradient_index`: built once per
        weights, data, loss and projection, or read from `load_caches`' folder on first use, and kept)."""
        args = self.args
        key = (call.model_key, call.cand.fingerprint, len(call.cand), self._functions["collator"],
               self._functions["loss"], args.influence_weight_decay, args.influence_weight_decay_in_gradients,
               tuple(call.names), args.influence_projection_dim,
               args.influence_seed, args.influence_knn_index, D.world()[1], *call.cand.layout_key)
        saved = self._saved_gradient_index
        wanted = saved is not None and saved[0] == key and (self._gradient_index is None
                                                            or self._gradient_index[0] != key)
        if wanted and not saved_index_intact(saved):
            now = self._saved_index_now(saved)  # (another engine's save since: the same index under a new name?)
            if now is None:
                logger.warning(f"The saved gradient index {saved[1]} changed since it was loaded (another engine "
                               "saved into its folder); building it again.")
            self._saved_gradient_index = saved = now
            wanted = now is not None
        if wanted:
            try:
                self._gradient_index = (key, load_gradient_index(call.fm, call.params, saved[1],
                                                                 dim=args.influence_projection_dim,
                                                                 seed=args.influence_seed, dtype=saved[2]))
                self._served("gradient_index", key)
            except (RuntimeError, OSError) as err:  # faiss: a damaged or truncated file; built again below
                logger.warning(f"Could not read the saved gradient index {saved[1]} ({err}); building it again.")
                self._saved_gradient_index = None
        if self._gradient_index is None or self._gradient_index[0] != key:
            self._gradient_index = None
            self._replaced("gradient_index", key)
            index = build_gradient_index(call.fm, call.params, call.cand, dim=args.influence_projection_dim,
                                         seed=args.influence_seed, batch_size=args.influence_scoring_batch_size,
                                         progress=call.progress, factory=args.influence_knn_index)
            self._gradient_index = (key, index)
        return self._gradient_index[1].candidates(s_test, k)

    def _check_feature_index(self, call: Call, method) -> None:
        """Refuse an ``influence_knn_index`` faiss cannot build over ``method``'s features of the candidate rows,
        from one row's features (their width) and random rows, without building the index."""
        split, (cand,) = _feature_path(call, method, call.cand)
        with torch.no_grad():
            width = extract_features(self.model, cand.subset([0]), method, batch_size=1, split=split,
                                     progress=False).shape[1]
        check_index_factory(self.args.influence_knn_index, len(call.cand), width, metric=faiss.METRIC_L2)

    def _check_feature_padding(self, call: Call, method: Callable, batchers: list[tuple[Batcher, str]]) -> None:
        """Refuse a ``features=`` callable whose vector for a row changes with the padding around it (a mean over
        every position, padding included): rows are batched with others, by process shares, so its candidates
        depended on the batch size and the number of processes, without a word. Probed as the loss is (the
        narrowest row alone and padded next to the widest), once per model, data and function."""
        for batcher, name in batchers:
            batcher = _plain(batcher, padded=True)  # (as `_feature_path` hands the callable its batches)
            key = ("features", call.model_key, batcher.fingerprint, self._functions["collator"],
                   self._method_key(method))
            if key in self._padding_checked:
                continue
            for short, long in batcher.padding_probes(padding.PADDING_PROBE_ROWS):
                with torch.no_grad():
                    alone = method(self.model, batcher.batch([short], trunk=False)).detach().double().cpu()
                    padded = method(self.model, batcher.batch([short, long], trunk=False)).detach().double().cpu()
                if alone.ndim != 2 or padded.ndim != 2 or alone.shape[1] != padded.shape[1]:
                    continue  # (a width that grows with the padding: extract_features names it)
                if not bool(torch.isfinite(alone).all()):
                    continue  # not the padding's doing: extract_features names the rows that are not finite
                error = relative_difference(padded[0], alone[0], floor=1e-12)
                if not error <= padding.PADDING_TOLERANCE:
                    row, other = batcher.named_rows([short, long])
                    raise ValueError(
                        f"The features= callable gives {name} row {row} another vector when it is padded next to "
                        f"row {other} (relative difference {error:.2g}): it reads the padding, so the kNN candidates "
                        "would depend on the batch size and the number of processes. Leave the padding out (e.g. a "
                        "mean weighted by batch['attention_mask']).")
            self._padding_checked.add(key)

    def _method_key(self, method) -> str:
        """What keys a feature method's index and padding check: its name, or a callable's fingerprint (the engine's
        ``features`` as the call keyed it; another, handed to `candidate_recall`, its own: keyed by the engine's, a
        second callable was measured on the first one's index, and its padding never probed)."""
        if isinstance(method, str):
            return method
        return self._functions["features"] if method is self.features else callable_fingerprint(method)

    def _knn_candidates(self, call: Call, method, k: int) -> list[np.ndarray]:
        if k >= len(call.cand):  # every row, as the gradient index gives them (an IVF / HNSW search can return fewer)
            return [np.arange(len(call.cand), dtype=np.int64)] * (1 if call.combine == "mean" else len(call.test))
        args = self.args
        bsz = args.influence_scoring_batch_size
        key = (call.model_key, call.cand.fingerprint, len(call.cand), self._functions["collator"],
               self._method_key(method), args.influence_knn_index,
               D.world()[1], *call.cand.layout_key)
        split, (cand, test) = _feature_path(call, method, call.cand, call.test)
        if callable(method):
            D.together(lambda: self._check_feature_padding(call, method, [(call.cand, "candidate"), (call.test, "test")]),
                       "The features function's padding check")
        with torch.no_grad():
            if self._feature_index is None or self._feature_index[0] != key:
                self._feature_index = None  # one index at a time: features of a large training set are big
                mine = cand.subset(D.shard(range(len(cand)))) if D.world()[1] > 1 else cand
                feats = D.gather_rows(D.together(
                    lambda: extract_features(self.model, mine, method, batch_size=bsz, split=split,
                                             progress=call.progress, desc="kNN features"),
                    "The candidates' kNN features"))
                self._feature_index = (key, build_index(feats, args.influence_knn_index), feats.shape[1])
            test_feats = D.together(lambda: extract_features(self.model, test, method, batch_size=bsz, split=split,
                                                             progress=False, desc="test features"),
                                    "The test rows' kNN features")
        if test_feats.shape[1] != self._feature_index[2]:  # (faiss: a bare AssertionError)
            raise ValueError(f"The test rows' kNN features have {test_feats.shape[1]} columns, the candidates' "
                             f"{self._feature_index[2]}: a features= callable must give every row a vector of one width "
                             "(not one that grows with the padding).")
        if call.combine == "mean":  # (over the rows the mean loss is over: an unlabelled row is out of both)
            test_feats = test_feats[self._rows_in_mean(call)].mean(0, keepdims=True)
        _, ids = search(self._feature_index[1], test_feats, k)
        return [np.sort(row[row >= 0]).astype(np.int64) for row in ids]

    def _full_scan(self, call: Call, s_test: torch.Tensor) -> np.ndarray:
        """``(queries, N)``: influence of every candidate row on every query (the recall reference)."""
        queries = 1 if call.combine == "mean" else len(call.test)
        every = [np.arange(len(call.cand))] * queries
        tests, rows, values = self._scores(call, every, s_test)
        reference = np.empty((queries, len(call.cand)))
        reference[tests, rows] = values
        return reference

    def _recall_of(self, call: Call, s_test: torch.Tensor, queries: list[np.ndarray]) -> dict:
        # recall@10 / @100 capped at the candidate rows, labelled as such (N = 40 was reported as "recall@100")
        return _recall(self._full_scan(call, s_test), queries, recall_ns(len(call.cand))) | {
            "random_expectation": len(queries[0]) / len(call.cand), "method": call.info.get("candidates")}
