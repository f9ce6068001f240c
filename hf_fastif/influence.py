"""`compute_influences`: parameters → s_test → candidates → scores → `InfluenceTable`."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from . import distributed as D
from .arguments import InfluenceArguments, validate_influence_settings
from .batches import Batcher, validate_dataset
from .fingerprint import model_fingerprint
from .hvp import batch_gradient, batch_hvp
from .knn import FeatureFn, build_index, extract_features, search
from .loss import FunctionalModel, LossFn
from .mode import influence_mode
from .params import num_parameters, select_parameters
from .scoring import score_pairs
from .solvers import build_hessian, power_iteration, solve_cg, solve_exact, solve_lissa
from .solvers.exact import check_exact_size
from .table import InfluenceTable

logger = logging.get_logger(__name__)

COMBINE = ("none", "mean")
POWER_ITERATION_ROWS = 64
POWER_ITERATIONS = 8


def default_arguments(**overrides) -> InfluenceArguments:
    """`InfluenceArguments` for use without a Trainer (no output is written to ``output_dir``)."""
    overrides.setdefault("output_dir", "hf_fastif_output")
    overrides.setdefault("report_to", "none")
    return InfluenceArguments(**overrides)


def _describe_data(dataset: Dataset) -> dict:
    info = getattr(dataset, "info", None)
    return {
        "name": getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": len(dataset),
    }


def data_signature(dataset: Dataset, rows: int = 16) -> dict:
    """Size, columns and a content hash of the first and last rows: equal on every process that loaded the
    same data (in-memory datasets get random fingerprints, so fingerprints cannot be compared)."""
    import hashlib
    import json

    n = len(dataset)
    sample = sorted(set(range(min(rows, n))) | set(range(max(0, n - rows), n)))
    text = json.dumps(dataset.select(sample).to_dict(), sort_keys=True, default=str)
    return {"num_rows": n, "columns": sorted(dataset.column_names),
            "sample_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _lissa_batches(num_rows: int, batch_size: int, depth: int, seed: int, repetition: int) -> np.ndarray:
    """Row indices ``(depth, batch_size)`` drawn by repetition ``repetition``: successive shuffles of the
    training set, seeded by ``(seed, repetition)`` only, so any process can draw any repetition."""
    rng = np.random.default_rng([seed, repetition])
    need = depth * batch_size
    order = np.concatenate([rng.permutation(num_rows) for _ in range(-(-need // num_rows))])
    return order[:need].reshape(depth, batch_size)


def compute_influences(
    model: nn.Module,
    train_dataset: Dataset,
    test_dataset: Dataset,
    args: InfluenceArguments | None = None,
    *,
    combine: str = "none",
    data_collator: Callable | None = None,
    candidate_dataset: Dataset | None = None,
    loss_fn: LossFn | None = None,
    measurement_fn: LossFn | None = None,
    features: FeatureFn | None = None,
) -> InfluenceTable:
    """Influence of training rows on test rows: ``-∇L(z_train) · (H + λI)⁻¹ ∇L(z_test)``.

    Args:
        model: a transformers model or any module called with a batch dict and returning ``.logits``.
        train_dataset: tokenized training rows with labels; H is the Hessian of their mean loss.
        test_dataset: tokenized test rows with labels.
        args: the ``influence_*`` settings (defaults: `default_arguments`).
        combine: ``"none"``: one s_test per test row; ``"mean"``: one s_test for the mean test loss
            (``test_id`` 0 in the table), the kNN query being the mean test feature.
        data_collator: collates rows (e.g. ``DataCollatorWithPadding``); default: transformers'
            ``default_data_collator``.
        candidate_dataset: rows to score (default ``train_dataset``), e.g. an unseen pool for augmentation;
            ``train_id`` then indexes this dataset.
        loss_fn / measurement_fn: per-example ``(outputs, batch) → (b,)`` training loss / test quantity.
        features: ``(model, batch) → (b, d)`` kNN features instead of ``influence_knn_features``.
    Returns:
        An `InfluenceTable` (negative influence = helpful), identical on every process.
    """
    args = args if args is not None else default_arguments()
    validate_influence_settings(args)
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r} is unknown; use 'none' (one s_test per test row) or 'mean'.")
    candidate_dataset = train_dataset if candidate_dataset is None else candidate_dataset
    train_cols = validate_dataset(train_dataset, "train_dataset", model)
    test_cols = validate_dataset(test_dataset, "test_dataset", model)
    cand_cols = validate_dataset(candidate_dataset, "candidate_dataset", model)
    k = args.influence_knn_k
    if k is not None and k > len(candidate_dataset):
        logger.warning(f"influence_knn_k={k} exceeds the {len(candidate_dataset)} candidate rows; scoring all of them.")
        k = None
    params = select_parameters(model, args.influence_params)
    names = list(params)
    if args.influence_solver == "exact":
        check_exact_size(num_parameters(params))
    rank, world_size = D.world()
    if world_size > 1:
        D.check_same_everywhere({
            "settings": args.influence_settings(), "combine": combine, "parameters": names,
            "train": data_signature(train_dataset), "test": data_signature(test_dataset),
            "candidates": data_signature(candidate_dataset),
        })
    progress = not getattr(args, "disable_tqdm", False) and rank == 0
    device = next(model.parameters()).device
    timings: dict[str, float] = {}
    fingerprint = model_fingerprint(model)

    with influence_mode(model, names):
        fm = FunctionalModel(model, names, loss_fn, measurement_fn, args.influence_weight_decay)
        train = Batcher(train_dataset, train_cols, data_collator, device)
        test = Batcher(test_dataset, test_cols, data_collator, device)
        cand = train if candidate_dataset is train_dataset else Batcher(candidate_dataset, cand_cols, data_collator, device)
        for batcher, name in ((train, "train_dataset"), (cand, "candidate_dataset")):
            batcher.check_labels(name)
        if measurement_fn is None:
            test.check_labels("test_dataset")

        start = time.perf_counter()
        v = _test_gradients(fm, params, test, args.influence_hvp_batch_size, combine)
        timings["test_gradients_s"] = time.perf_counter() - start

        start = time.perf_counter()
        # what the top-eigenvalue estimate depends on: weights, training rows, parameters, loss, seed
        curvature_key = (fingerprint, train.dataset._fingerprint, len(train), tuple(names),
                         "default" if loss_fn is None else id(loss_fn), args.influence_weight_decay,
                         args.influence_seed, D.world())
        s_test, diagnostics = _solve(fm, params, train, v, args, progress, curvature_key)
        timings["s_test_s"] = time.perf_counter() - start

        start = time.perf_counter()
        queries = _candidates(model, cand, test, k, combine, args, features, progress, fingerprint)
        timings["knn_s"] = time.perf_counter() - start

        start = time.perf_counter()
        pair_tests = np.concatenate([np.full(len(rows), t, dtype=np.int64) for t, rows in enumerate(queries)])
        pair_rows = np.concatenate(queries)
        # each process scores the pairs of its share of the candidate rows; (pair, value) rows are gathered
        mine = np.flatnonzero(np.isin(pair_rows, D.shard(np.unique(pair_rows))))
        local = score_pairs(fm, params, cand, pair_tests[mine], pair_rows[mine], s_test,
                            batch_size=args.influence_scoring_batch_size, method=args.influence_scoring,
                            progress=progress)
        gathered = D.gather_rows(np.column_stack([mine.astype(np.float64), local]))
        values = np.empty(len(pair_rows))
        values[gathered[:, 0].astype(np.int64)] = gathered[:, 1]
        timings["scoring_s"] = time.perf_counter() - start

    metadata = {
        "library_version": _version(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
            "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
            "class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_influence_parameters": num_parameters(params),
            "fingerprint": fingerprint,
        },
        "train_data": _describe_data(train_dataset),
        "test_data": _describe_data(test_dataset),
        "candidate_data": _describe_data(candidate_dataset),
        "combine": combine,
        "settings": args.influence_settings() | {"influence_knn_k_used": k},
        "lambda": args.influence_lambda,
        "num_processes": world_size,
        "diagnostics": diagnostics | timings,
    }
    return InfluenceTable.from_arrays(pair_tests, pair_rows, values, metadata)


def _version() -> str:
    from . import __version__

    return __version__


def _test_gradients(fm, params, test: Batcher, batch_size: int, combine: str) -> torch.Tensor:
    """``(m, p)``: one measurement gradient per test row, or one row with the gradient of their mean."""
    rows = D.shard(range(len(test))) if combine == "mean" else range(len(test))
    if combine == "mean":
        total = None
        for _, batch in test.batches(rows, batch_size):
            g = batch_gradient(fm, params, batch, measurement=True, reduction="sum")
            total = g if total is None else total + g
        if total is None:
            total = torch.zeros(num_parameters(params), dtype=next(iter(params.values())).dtype,
                                device=next(iter(params.values())).device)
        return (D.all_reduce_sum(total) / len(test)).unsqueeze(0)
    return torch.cat([batch_gradient(fm, params, batch, measurement=True, reduction="none")
                      for _, batch in test.batches(rows, batch_size)])


def _full_hvp(fm, params, train: Batcher, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V ↦ H V`` with H the Hessian of the mean loss over every training row (batches split over
    processes and summed with one all-reduce)."""
    batches = [b for _, b in train.batches(D.shard(range(len(train))), batch_size)]
    n = len(train)

    def hvp(vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        for batch in batches:
            total = total + batch_hvp(fm, params, batch, vectors, reduction="sum")
        return D.all_reduce_sum(total) / n

    return hvp


def _solve(fm, params, train: Batcher, v: torch.Tensor, args, progress: bool,
           curvature_key: tuple) -> tuple[torch.Tensor, dict]:
    lam = args.influence_lambda
    p = v.shape[1]
    if args.influence_solver == "exact":
        hessian = build_hessian(_full_hvp(fm, params, train, args.influence_hvp_batch_size), p,
                                dtype=v.dtype, device=v.device)
        return solve_exact(hessian, v, lam)
    if args.influence_solver == "cg":
        return solve_cg(_full_hvp(fm, params, train, args.influence_hvp_batch_size), v, lam,
                        max_iterations=args.influence_cg_max_iterations, tol=args.influence_cg_tol,
                        progress=progress)
    return _solve_lissa(fm, params, train, v, args, progress, curvature_key)


# Top Hessian eigenvalue estimates of recent (model weights, training data, loss) combinations: repeated
# queries against an unchanged model skip LiSSA's power-iteration check.
_TOP_EIGENVALUE_CACHE: dict = {}


def _solve_lissa(fm, params, train: Batcher, v: torch.Tensor, args, progress: bool,
                 curvature_key: tuple) -> tuple[torch.Tensor, dict]:
    rank, world_size = D.world()
    repetitions = args.influence_repetitions or world_size
    depth, bsz, n = args.influence_recursion_depth, args.influence_batch_size, len(train)
    info: dict = {"lissa_total_repetitions": repetitions}
    top = None
    if args.influence_check_convergence:
        top = _TOP_EIGENVALUE_CACHE.get(curvature_key)
        if top is None:
            sample = np.random.default_rng([args.influence_seed, 2**31 - 1]).permutation(n)[:POWER_ITERATION_ROWS]
            hvp = _full_hvp(fm, params, train.subset(sample), args.influence_hvp_batch_size)
            top = power_iteration(hvp, v.shape[1], iterations=POWER_ITERATIONS, dtype=v.dtype, device=v.device,
                                  seed=args.influence_seed)
            if len(_TOP_EIGENVALUE_CACHE) >= 16:
                _TOP_EIGENVALUE_CACHE.clear()
            _TOP_EIGENVALUE_CACHE[curvature_key] = top
        info["hessian_top_eigenvalue_estimate"] = top
        scale, damp = args.influence_scale, args.influence_damping
        if top >= (2.0 - damp) * scale:
            from .solvers.lissa import LissaDivergenceError, suggest_scale

            raise LissaDivergenceError(
                f"influence_scale={scale:g} is too small for LiSSA to converge: the top eigenvalue of the training "
                f"Hessian is about {top:.4g}, and LiSSA needs scale > λ_max + λ. Use influence_scale >= "
                f"{suggest_scale(top + damp * scale):.3g} (lower influence_damping to keep λ = damping × scale "
                "if needed), or influence_solver='cg'."
            )
        if top > (2.0 - damp) * scale / 2:
            logger.warning(f"influence_scale={scale:g} is within 2x of LiSSA's convergence limit (top Hessian "
                           f"eigenvalue ~{top:.4g} vs (2 - damp)·scale = {(2 - damp) * scale:.4g}); single-batch "
                           "Hessians are larger still, so LiSSA may diverge. A larger scale is safer.")
    mine = D.shard(range(repetitions))
    draws = {t: _lissa_batches(n, bsz, depth, args.influence_seed, t) for t in mine}
    rows = {t: train.rows(draws[t].reshape(-1)) for t in mine}

    def hvp_step(j: int, reps: Sequence[int], h: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(h)
        for r, t in enumerate(reps):
            batch = train.collate(rows[t][(j - 1) * bsz : j * bsz])
            out[r] = batch_hvp(fm, params, batch, h[r], reduction="mean")
        return out

    estimate, lissa_info = solve_lissa(hvp_step, v, damping=args.influence_damping, scale=args.influence_scale,
                                       depth=depth, repetitions=mine, top_eigenvalue=top, progress=progress)
    total = D.all_reduce_sum(estimate * len(mine)) / repetitions
    return total, info | lissa_info


# The last kNN index, keyed by the model's weights fingerprint, the candidate data and the feature settings:
# repeated queries against an unchanged model (a demo, a table built in parts) reuse it.
_INDEX_CACHE: dict = {}


def _candidates(model, cand: Batcher, test: Batcher, k: int | None, combine: str, args, features,
                progress: bool, fingerprint: str) -> list[np.ndarray]:
    """Candidate rows of each query (one query per test row, or one for the mean)."""
    queries = 1 if combine == "mean" else len(test)
    if k is None:
        return [np.arange(len(cand))] * queries
    method = features or args.influence_knn_features
    bsz = args.influence_scoring_batch_size
    key = (fingerprint, cand.dataset._fingerprint, len(cand), method if isinstance(method, str) else id(method),
           args.influence_knn_index, D.world())
    with torch.no_grad():
        if _INDEX_CACHE.get("key") != key:
            _INDEX_CACHE.clear()  # one index at a time: features of a large training set are big
            mine = cand.subset(D.shard(range(len(cand)))) if D.world()[1] > 1 else cand
            train_feats = D.gather_rows(extract_features(model, mine, method, batch_size=bsz, progress=progress,
                                                         desc="kNN features"))
            _INDEX_CACHE.update(key=key, index=build_index(train_feats, args.influence_knn_index))
        test_feats = extract_features(model, test, method, batch_size=bsz, progress=False)
    if combine == "mean":
        test_feats = test_feats.mean(0, keepdims=True)
    _, ids = search(_INDEX_CACHE["index"], test_feats, k)
    return [np.sort(row[row >= 0]).astype(np.int64) for row in ids]
