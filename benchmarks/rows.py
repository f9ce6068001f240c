"""The measured rows of the paper table: original, its noise floor, +kNN, FastIF, FastIF parallel, hf_fastif
fast, hf_fastif low-rank and the no-Hessian reference, each timed and compared with "original"."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from datasets import Dataset
from datasets.utils import disable_progress_bars, enable_progress_bars
from transformers.utils import logging

from hf_fastif import InfluenceArguments, InfluenceEngine
from hf_fastif.quality import agreement, influence_by_test
from hf_fastif.recall import recall_ns
from hf_fastif.solvers.lissa import LissaDivergenceError
from hf_fastif.utils import to_json, write_atomic

from .launch import accelerate_launch
from .paper_setup import (
    FAST,
    FASTIF,
    FLOOR,
    GRADIENT,
    LOW_RANK,
    ORIGINAL,
    PARALLEL,
    BenchmarkArguments,
    Setup,
    call_influences,
    influence_fields,
)
from .report import short_on_purpose
from .timing import timed

LOW_RANK_CHOICE = (
    "the library's `influence_solver='arnoldi'` (the Space's live solver): the top {rank} eigenpairs of the mean "
    "Hessian of {rows} seeded training rows, from up to {steps} Lanczos steps, computed once per model by an "
    "`InfluenceEngine` that keeps it (its first call, {build_s:.1f}s here, is the one-off: the low-rank Hessian, "
    "the trunk states and the kNN index); then every s_test is (H_r + λI)⁻¹∇L_test in closed form (the same λ "
    "as the original), the {m} test points in one call, kNN candidates scored by batched JVPs. Its seconds are "
    "the engine's later calls, charged as every row's are (no trunk phase, a kNN query for the index), but for the "
    "set-up a fresh engine repeats on each call and a kept one does not (its probes and checks: ~0.03 s a call on "
    "the quick model in a review). Quality is "
    "measured against the original below, not assumed."
)

logger = logging.get_logger(__name__)

PerTest = list[tuple[np.ndarray, np.ndarray]]


def top_eigenvalue(setup: Setup, args: InfluenceArguments) -> float:
    """The library's estimate of the batch Hessians' top eigenvalue (its LiSSA convergence check, recorded in a
    table's diagnostics), from the cheapest LiSSA call: one step, one candidate; the check runs whatever
    ``--influence_check_convergence`` says for the rows."""
    probe = replace(args, influence_recursion_depth=1, influence_batch_size=1, influence_repetitions=1,
                    influence_knn_k=None, influence_check_convergence=True)
    with short_on_purpose():
        table, _ = call_influences(setup, setup.test.select([0]), probe, candidate_dataset=setup.train.select([0]))
    return float(table.metadata["diagnostics"]["lissa_batch_top_eigenvalue"])


def fast_settings(bench: BenchmarkArguments, args: InfluenceArguments, top_eigenvalue: float) -> dict:
    """The "hf_fastif fast" LiSSA: scale from the top-eigenvalue estimate, capped at the original's, with
    damping = λ / scale (the original's fixed point) and J such that J·damp is the original's convergence."""
    lam = args.influence_damping * args.influence_scale
    scale = max(bench.fast_scale_factor * top_eigenvalue, lam * 1.01)
    scale = min(scale, args.influence_scale)
    damping = lam / scale
    depth = max(1, math.ceil(args.influence_recursion_depth * args.influence_damping / damping - 1e-9))
    return {"b": bench.fast_batch_size, "t": bench.fast_repetitions, "j": depth, "scale": scale, "damping": damping,
            "top": top_eigenvalue}


def row_quality(original: np.ndarray, values: PerTest) -> dict:
    """A row's agreement with the original (`hf_fastif.quality.agreement`) at `recall_ns`."""
    return agreement(original, values, ns=recall_ns(original.shape[1]))


def per_point_seconds(wall: float, diagnostics: dict, queries: int, query_s: float) -> float:
    """A call's seconds as the cost model charges them, alike for every row: without its trunk phase
    (``trunk_s``: the frozen layers' states of the training rows, a one-off per model and data that a fresh engine
    computes on every call and a kept one finds cached), and with its kNN phase (which rebuilds the training
    features and index on every call) replaced by the measured cost of its queries: the index is built once for all
    test points."""
    seconds = wall - diagnostics.get("trunk_s", 0.0)
    if diagnostics.get("candidates", "all") == "all":
        return seconds
    return seconds - diagnostics["candidates_s"] + queries * query_s


def row_arguments(bench: BenchmarkArguments, args: InfluenceArguments, fast: dict, k_fast: int) -> dict:
    """Each row's `InfluenceArguments`: FastIF is ``args`` itself (k capped at N), the others replace a few
    fields. Seeds differ by row so no two rows share LiSSA's samples, except "+kNN", which is the original's
    s_test by construction."""
    lam = args.influence_damping * args.influence_scale
    original = replace(args, influence_batch_size=bench.original_batch_size, influence_repetitions=1,
                       influence_knn_k=None)
    return {
        ORIGINAL: original,
        FLOOR: replace(original, influence_seed=args.influence_seed + 300),
        FASTIF: replace(args, influence_knn_k=k_fast, influence_seed=args.influence_seed + 100),
        FAST: replace(args, influence_batch_size=fast["b"], influence_repetitions=fast["t"],
                      influence_recursion_depth=fast["j"], influence_scale=fast["scale"],
                      influence_damping=fast["damping"], influence_knn_k=k_fast,
                      influence_seed=args.influence_seed + 200),
        # s_test ∝ ∇L_test: one LiSSA step with a scale so large that the Hessian term vanishes (λ kept)
        GRADIENT: replace(args, influence_batch_size=1, influence_repetitions=1, influence_recursion_depth=1,
                          influence_scale=1e9, influence_damping=lam / 1e9, influence_knn_k=k_fast,
                          influence_check_convergence=False),
        LOW_RANK: replace(args, influence_solver="arnoldi", influence_arnoldi_rank=bench.low_rank_rank,
                          influence_arnoldi_rows=bench.low_rank_rows, influence_knn_k=k_fast,
                          influence_seed=args.influence_seed + 400),
    }


def run_rows(setup: Setup, bench: BenchmarkArguments, args: InfluenceArguments, knn: dict,
             fast: dict) -> tuple[list[dict], np.ndarray]:
    """The measured rows, their calls interleaved test point by test point so that the load of a shared
    machine falls on every row alike; each row's time is the median over its calls. Returns
    ``(rows, original)`` with ``original`` the ``(m, N)`` full-scan influence. ``fast`` is updated in place if
    the fast row diverges and is rerun with twice the scale."""
    m, n = len(setup.test), len(setup.train)
    k_fast = knn["fastif_k"]
    floor_points = min(bench.noise_floor_test, m)
    fast_slots = _spread(bench.fast_calls, m)
    settings = row_arguments(bench, args, fast, k_fast)
    for k in knn["ks"]:
        settings[f"+kNN (k={k})"] = replace(settings[ORIGINAL], influence_knn_k=k)
    original = np.zeros((m, n))
    calls: dict[str, list[float]] = {}
    diagnostics: dict[str, dict] = {}
    values: dict[str, PerTest] = {FLOOR: [], FASTIF: []}
    knn_checks = {}

    def call(name: str, test: Dataset, queries: int, engine: InfluenceEngine | None = None):
        if engine is None:
            table, wall = call_influences(setup, test, settings[name])
        else:
            table, wall = timed(lambda: engine.compute_influences(setup.train, test), collected=True)
        diag = table.metadata["diagnostics"]
        calls.setdefault(name, []).append(per_point_seconds(wall, diag, queries, knn["query_s"]) / queries)
        diagnostics.setdefault(name, diag)
        return table

    low_rank_slots = _spread(bench.low_rank_calls, m)
    # one engine keeps the low-rank Hessian (and the trunk states, the kNN index): its first call is the one-off
    low_rank = InfluenceEngine(setup.model, settings[LOW_RANK], data_collator=setup.collator)
    table, low_rank_build_s = timed(lambda: low_rank.compute_influences(setup.train, setup.test), collected=True)
    values[LOW_RANK] = influence_by_test(table, m)
    low_rank_build_diagnostics = table.metadata["diagnostics"]
    low_rank_differences: list[float] = []  # later calls against the first, relative

    for t in range(m):
        one = setup.test.select([t])
        ids, vals = influence_by_test(call(ORIGINAL, one, 1), 1)[0]
        original[t, ids] = vals
        if t < floor_points:
            values[FLOOR] += influence_by_test(call(FLOOR, one, 1), 1)
        values[FASTIF] += influence_by_test(call(FASTIF, one, 1), 1)
        if t == 0:  # "+kNN": the same s_test (settings and seed) as original, kNN candidates
            for k in knn["ks"]:
                name = f"+kNN (k={k})"
                knn_checks[name] = influence_by_test(call(name, one, 1), 1)[0]
        if t in fast_slots:  # all test points in one call
            try:
                table = call(FAST, setup.test, m)
            except LissaDivergenceError as err:  # the tight scale met a larger batch Hessian: back off
                fast.update(fast_settings(bench, args, 2 * fast["top"]))
                fast["note"] = f"scale doubled after: {err}"
                logger.warning(f"hf_fastif fast diverged; retrying with twice the scale ({fast['scale']:.3g}).")
                settings[FAST] = replace(settings[FAST], influence_scale=fast["scale"],
                                         influence_damping=fast["damping"], influence_recursion_depth=fast["j"])
                calls.pop(FAST, None)
                table = call(FAST, setup.test, m)
            values[FAST] = influence_by_test(table, m)
        if t in low_rank_slots:  # all test points in one call, on the engine that keeps the low-rank Hessian
            later = influence_by_test(call(LOW_RANK, setup.test, m, engine=low_rank), m)
            low_rank_differences += [_relative_difference(a, b) for a, b in zip(later, values[LOW_RANK])]
    low_rank.clear()
    with short_on_purpose():
        values[GRADIENT] = influence_by_test(call(GRADIENT, setup.test, m), m)

    def row(name: str, described: str, vals: PerTest, **extra) -> dict:
        return {"row": name, "settings": described, "seconds": float(np.median(calls[name])), "calls": calls[name],
                "diagnostics": diagnostics[name], "values": vals, "influence_settings": influence_fields(settings[name]),
                **extra}

    depth, b_fastif, t_fastif = args.influence_recursion_depth, args.influence_batch_size, args.influence_repetitions
    rows = [row(ORIGINAL, f"no kNN (N = {n}), B = {bench.original_batch_size}, J = {depth}, T = 1",
                [(np.arange(n), original[t]) for t in range(m)]),
            row(FLOOR, f"as original, another LiSSA seed ({floor_points} test points): the noise floor",
                values[FLOOR])]
    for k in knn["ks"]:
        name = f"+kNN (k={k})"
        ids, vals = knn_checks[name]
        sanity = {"candidates_equal_knn_index": bool(np.array_equal(ids, knn["candidates"][k][0])),
                  "max_relative_difference_to_original": float(np.max(np.abs(vals - original[0, ids]))
                                                               / max(np.abs(original[0]).max(), 1e-30))}
        rows.append(row(name, f"as original, k = {k}",
                        [(c, original[t, c]) for t, c in enumerate(knn["candidates"][k])], sanity=sanity))
    rows.append(row(FASTIF, f"k = {k_fast}, B = {b_fastif}, J = {depth}, T = {t_fastif}", values[FASTIF]))
    if bench.parallel_processes > 1:
        rows.append(run_parallel(bench, settings[FASTIF], setup, knn["query_s"], values[FASTIF]))
    rows.append(row(FAST, f"k = {k_fast}, B = {fast['b']}, J = {fast['j']}, T = {fast['t']}, scale = "
                    f"{fast['scale']:.3g}, {m} test points per call, JVP scoring", values[FAST], union=_union(values[FAST])))
    rank, rows_used = bench.low_rank_rank, min(bench.low_rank_rows, n)
    rows.append(row(LOW_RANK, f"k = {k_fast}, arnoldi rank {rank} over {rows_used} rows (built once), {m} test points "
                    "per call, JVP scoring", values[LOW_RANK],
                    union=_union(values[LOW_RANK]),
                    one_off={"seconds": low_rank_build_s, "s_test_s": low_rank_build_diagnostics.get("s_test_s"),
                             "trunk_s": low_rank_build_diagnostics.get("trunk_s", 0.0), "rank": rank,
                             "rows": rows_used, "lanczos_steps": 2 * rank},
                    sanity={"max_relative_difference_later_call_vs_first": max(low_rank_differences)}))
    rows.append(row(GRADIENT, f"k = {k_fast}, s_test ∝ ∇L_test (H⁻¹ left out): what needs no Hessian at all",
                    values[GRADIENT]))
    for r in rows:
        r.update(row_quality(original, r["values"]))
    return rows, original


def _spread(count: int, m: int) -> set[int]:
    """``count`` test-point indices spread evenly over ``range(m)`` (where a row's timed calls go)."""
    return set(np.linspace(0, m - 1, min(count, m)).round().astype(int).tolist())


def _union(per_test: PerTest) -> int:
    """Distinct candidates of a call's test points."""
    return int(np.unique(np.concatenate([ids for ids, _ in per_test])).size)


def _relative_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest difference of two ``(train_ids, values)`` estimates relative to ``b``'s largest value; inf if they
    score different rows."""
    if not np.array_equal(a[0], b[0]):
        return float("inf")
    return float(np.max(np.abs(a[1] - b[1])) / max(np.abs(b[1]).max(), 1e-30))


def run_parallel(bench: BenchmarkArguments, args: InfluenceArguments, setup: Setup, query_s: float,
                 reference: PerTest) -> dict:
    """"FastIF parallel": `benchmarks.fastif_worker` in ``bench.parallel_processes`` processes (`accelerate
    launch`), one test point per call with FastIF's ``args``; its values are checked against ``reference``."""
    work = (Path(args.output_dir) / "parallel").resolve()
    work.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()
    try:
        setup.model.save_pretrained(work / "model")
        if setup.tokenizer is not None:
            setup.tokenizer.save_pretrained(work / "model")
        setup.train.save_to_disk(str(work / "train"))
        setup.test.save_to_disk(str(work / "test"))
    finally:
        enable_progress_bars()
    write_atomic(work / "job.json", to_json({"settings": influence_fields(args), "num_threads": bench.num_threads}))
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    (proc, command), launch_s = timed(lambda: accelerate_launch(
        "benchmarks.fastif_worker", [str(work)], bench.parallel_processes, num_threads=bench.num_threads))
    name = f"{PARALLEL} ({bench.parallel_processes} processes)"
    row = {"row": name, "settings": f"as FastIF, {bench.parallel_processes} processes (accelerate launch)",
           "command": command, "launch_and_run_s": launch_s}
    if proc.returncode != 0 or not result_path.exists():
        row.update({"seconds": float("nan"), "error": (proc.stderr or proc.stdout)[-3000:],
                    "values": [(ids, np.full(len(ids), np.nan)) for ids, _ in reference]})
        return row
    result = json.loads(result_path.read_text())
    values = [(np.asarray(ids, np.int64), np.asarray(v, np.float64)) for ids, v in result["values"]]
    seconds = [per_point_seconds(w, d, 1, query_s) for w, d in zip(result["walls"], result["diagnostics"])]
    diff = max(_relative_difference(a, b) for a, b in zip(values, reference))
    row.update({"seconds": float(np.median(seconds)), "calls": seconds, "diagnostics": result["diagnostics"][0],
                "values": values, "num_processes": result["num_processes"],
                "sanity": {"max_relative_difference_to_FastIF": diff}})
    return row
