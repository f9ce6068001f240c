"""The paper-table benchmark (benchmarks/paper_table.py): its quick mode runs end to end and its numbers
are sane. Structure and sanity only, never speed."""

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from benchmarks import rows as rows_module
from benchmarks import studies
from benchmarks.arguments import parse_with_defaults
from benchmarks.costs import CHECK_SEEDS, CostScale, cost_model, engine_check_seconds, paper_scale_rows
from benchmarks.paper_setup import (
    FAST,
    FASTIF,
    FLOOR,
    GRADIENT,
    LOW_RANK,
    ORIGINAL,
    PARALLEL,
    STACKED,
    BenchmarkArguments,
    Setup,
    benchmark_defaults,
    call_influences,
)
from benchmarks.paper_table import convergence_statement, fast_choice, main, model_key, sweep_note
from benchmarks.report import sweep_title, targets
from benchmarks.rows import fast_settings, per_point_seconds, row_quality, top_eigenvalue
from benchmarks.studies import knn_recall_curve
from hf_fastif import InfluenceArguments, InfluenceTable
from hf_fastif.embedded import TINY
from hf_fastif.engine import InfluenceEngine
from hf_fastif.influence import default_arguments
from hf_fastif.minilm_default import minilm_influence_params
from hf_fastif.params import PAPER_BERT_PARAMS
from hf_fastif.quality import influence_by_test
from hf_fastif.solvers.lissa import LissaDivergenceError
from tests.tiny import make_token_dataset, tiny_model


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = main(["--quick", "--output_dir", str(out)])
    return results, out


def by_row(results):
    return {r["row"]: r for r in results["rows"]}


# --------------------------------------------------------------------------------- pure pieces
def test_knn_recall_curve_counts_the_neighbours():
    original = np.arange(20, dtype=float)[None]  # rows 0.. most helpful; rows ..19 most harmful
    order = np.arange(20)[None]  # nearest first: the helpful rows
    curve = knn_recall_curve(original, order, ns=(10,))
    assert curve["k"] == [10, 20]
    assert curve["recall@10 helpful"] == [1.0, 1.0] and curve["recall@10 harmful"] == [0.0, 1.0]


def test_cost_model_formulas():
    # the convergence check at each B (the engine runs it on batches of the row's own B): 4 at B = 1, 6 at B = 2,
    # 8 at B = 8 (fast), 40 at B = 128 (original)
    u = {"hvp": {"1x1": 1.0, "2x1": 1.5, "128x1": 10.0, "8x4": 2.0}, "score": {"1": 0.01, "4": 0.02},
         "test_gradient": 0.5, "power_iteration": {"1": 4.0, "2": 6.0, "8": 8.0, "128": 40.0}, "feature": 0.1,
         "knn_row": 1e-4, "score_loop": 0.1}
    fast = {"b": 8, "t": 1, "j": 50}
    scale = CostScale(n=1000, j=100, b=128, t=4, k=10, knn_ks=[10], m=4, processes=2)
    c = cost_model(u, scale, fast)
    q = 0.1 + 1000 * 1e-4
    assert c[ORIGINAL] == pytest.approx(0.5 + 40 + 100 * 10 + 1000 * 0.01)
    assert c["+kNN (k=10)"] == pytest.approx(0.5 + 40 + 100 * 10 + q + 10 * 0.01)
    assert c[FASTIF] == pytest.approx(0.5 + 4 + 4 * 100 * 1 + q + 10 * 0.01)
    assert c[PARALLEL] == pytest.approx(0.5 + 4 + 2 * 100 * 1 + q + 5 * 0.01)
    # pair scoring, worst case (disjoint candidate sets): each candidate against its own test point's s_test
    assert c[FAST] == pytest.approx(0.5 + 8 / 4 + 50 * 2 / 4 + q + 10 * 0.01)
    # every test point picked the same k candidates: each scored once against all m vectors, shared by m
    shared = cost_model(u, scale, fast, fast_union=10)[FAST]
    assert shared == pytest.approx(0.5 + 8 / 4 + 50 * 2 / 4 + q + 10 * 0.02 / 4)
    # half the pairs shared (c = 2 tests per candidate): score[2] interpolated between score[1] and score[4]
    half = cost_model(u, scale, fast, fast_union=20)[FAST]
    assert half == pytest.approx(0.5 + 8 / 4 + 50 * 2 / 4 + q + 20 * (0.01 + (0.02 - 0.01) / 3) / 4)
    assert c["original (2021 code path)"] == pytest.approx(0.5 + 100 * 10 + 1000 * 0.1)
    # the 2021 code takes its test gradient through the whole model, once a repetition (it was charged hf_fastif's,
    # from the cached trunk, once: a review)
    whole = cost_model(u | {"test_gradient_full": 0.7, "hvp_full": {"1x1": 3.0, "128x1": 30.0}}, scale, fast)
    assert whole["original (2021 code path)"] == pytest.approx(0.7 + 100 * 30 + 1000 * 0.1)
    assert whole["FastIF (2021 code path)"] == pytest.approx(4 * 0.7 + 4 * 100 * 3 + q + 10 * 0.1)
    assert whole[FASTIF] == c[FASTIF]
    # FastIF with B = 2 pays the 2-row step; the original's cost does not move
    # the low-rank row: a test gradient, the closed-form solve, the kNN query and the scoring; no HVP per test point
    c3 = cost_model(u | {"low_rank_solve": {"1": 0.001, "4": 0.002}}, scale, fast)
    assert c3[LOW_RANK] == pytest.approx(0.5 + 0.002 / 4 + q + 10 * 0.01) and LOW_RANK not in c
    c2 = cost_model(u, CostScale(n=1000, j=100, b=128, t=4, k=10, knn_ks=[10], m=4, processes=2, b_fastif=2), fast)
    assert c2[FASTIF] == pytest.approx(0.5 + 6 + 4 * 100 * 1.5 + q + 10 * 0.01) and c2[ORIGINAL] == c[ORIGINAL]


def test_the_check_unit_is_the_engines_own_check():
    """The check's unit summed unit HVPs: a graph build priced per product (the engine builds one per Lanczos run:
    ~2x high on the quick model) and the confirmation on more rows left out (it ran in every original call of a
    quick run; a review of the cost model). It is now the engine's own check at each B, a call stopped right after
    it, which says whether it passed, confirmed on more rows, or refused."""
    from tests.tiny import make_token_dataset, pad_collator_for_tests, tiny_model

    train = make_token_dataset(300, seed=0)
    setup = Setup(model=tiny_model("bert", dtype=torch.float32), tokenizer=None, collator=pad_collator_for_tests(),
                  train=train, test=make_token_dataset(2, seed=1), description={})
    base = dict(influence_solver="lissa", influence_params=None, influence_recursion_depth=5, influence_knn_k=None,
                disable_tqdm=True)
    made = []
    real = InfluenceEngine.compute_influences

    def counted(self, *a, **kw):
        made.append((self.args.influence_batch_size, self.args.influence_seed))
        return real(self, *a, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InfluenceEngine, "compute_influences", counted)
        seconds, status = engine_check_seconds(setup, default_arguments(**base, influence_damping=0.5,
                                                                        influence_scale=100.0), [4, 1, 4])
    seeds = range(42, 42 + CHECK_SEEDS)  # (the default seed's and the next ones: the mean over seeds)
    assert made == [(b, seed) for b in (1, 4) for seed in seeds]
    assert set(seconds) == set(status) == {"1", "4"} and all(v > 0 for v in seconds.values())
    assert set(status.values()) == {"passed"}  # λ = 50, far above this random model's curvature
    # λ near the random model's most negative curvature: the engine confirms on more rows (or refuses), and so does
    # the unit, which costs more than the check that passed at once
    near, near_status = engine_check_seconds(setup, default_arguments(**base, influence_damping=1e-4,
                                                                      influence_scale=100.0), [1])
    assert near_status["1"] != "passed" and near["1"] > seconds["1"]


def test_sweep_records_a_refused_point_and_goes_on(monkeypatch):
    """A sweep run the engine refuses (LissaDivergenceError) is a row of the table, not the end of the benchmark."""
    rows = Dataset.from_dict({"input_ids": [[1, 2]] * 6, "labels": [0, 1] * 3})
    setup = Setup(model=None, tokenizer=None, collator=None, train=rows, test=rows.select([0]), description={})
    bench = BenchmarkArguments(sweep_depths=[1.0], sweep_batch_sizes=[1, 2], sweep_repetitions=2, sweep_num_test=1,
                               sweep_pool=6, original_batch_size=4)
    args = InfluenceArguments(report_to="none", influence_recursion_depth=10, influence_seed=0)

    def fake_call(setup, test, settings, candidate_dataset=None):
        if settings.influence_batch_size == 1 and settings.influence_seed == 1001:  # B = 1, its second seed
            raise LissaDivergenceError("H + λI is not positive definite")
        values = np.arange(6, dtype=float) + settings.influence_seed
        table = InfluenceTable.from_arrays(np.zeros(6), np.arange(6), values, {"diagnostics": {"s_test_s": 0.5}})
        return table, 1.0

    monkeypatch.setattr(studies, "call_influences", fake_call)
    points = studies.s_test_sweep(setup, bench, args, original=np.arange(6, dtype=float)[None])
    assert [(p["B"], p["T"], "refused" in p) for p in points] == [(1, 1, False), (1, 2, True), (2, 1, False),
                                                                  (2, 2, False)]
    assert "not positive definite" in points[1]["refused"]
    assert points[0]["spearman"] == pytest.approx(1.0) and points[3]["s_test_s_per_test_point"] == pytest.approx(1.0)


def test_sweep_charges_the_convergence_check_once_per_point(monkeypatch):
    """A T = t point is t fresh-engine calls, each running the convergence check; a T = t call runs it once, so the
    point charges it once (the sweep summed t of them: 0.90 s for a T = 2 that costs 0.63-0.66 s)."""
    rows = Dataset.from_dict({"input_ids": [[1, 2]] * 6, "labels": [0, 1] * 3})
    setup = Setup(model=None, tokenizer=None, collator=None, train=rows, test=rows.select([0]), description={})
    bench = BenchmarkArguments(sweep_depths=[1.0], sweep_batch_sizes=[1], sweep_repetitions=3, sweep_num_test=1,
                               sweep_pool=6, original_batch_size=4)
    args = InfluenceArguments(report_to="none", influence_recursion_depth=10, influence_seed=0)
    monkeypatch.setattr(InfluenceEngine, "_check_lissa", lambda self, call, v: {})  # the engine's check, stubbed
    monkeypatch.setattr(studies, "timed", lambda fn: (fn(), 0.25))  # each check takes 0.25 s

    def fake_call(setup, test, settings, candidate_dataset=None):  # as the engine: s_test_s holds the check
        InfluenceEngine._check_lissa(None, None, None)
        table = InfluenceTable.from_arrays(np.zeros(6), np.arange(6), np.arange(6, dtype=float),
                                           {"diagnostics": {"s_test_s": 0.25 + 0.5}})  # check + recursion
        return table, 1.0

    monkeypatch.setattr(studies, "call_influences", fake_call)
    points = studies.s_test_sweep(setup, bench, args, original=np.arange(6, dtype=float)[None])
    assert [p["T"] for p in points] == [1, 2, 3]
    assert [p["s_test_s_per_test_point"] for p in points] == pytest.approx([0.75, 1.25, 1.75])


def test_sweep_lists_each_j_once(monkeypatch):
    """Fractions of J that round to the same J (0.5 and 1.0 of J = 1) are one point of the sweep, not two."""
    rows = Dataset.from_dict({"input_ids": [[1, 2]] * 6, "labels": [0, 1] * 3})
    setup = Setup(model=None, tokenizer=None, collator=None, train=rows, test=rows.select([0]), description={})
    bench = BenchmarkArguments(sweep_depths=[0.5, 1.0], sweep_batch_sizes=[1, 1], sweep_repetitions=1,
                               sweep_num_test=1, sweep_pool=6, original_batch_size=4)
    args = InfluenceArguments(report_to="none", influence_recursion_depth=1, influence_seed=0)

    def fake_call(setup, test, settings, candidate_dataset=None):
        values = np.arange(6, dtype=float)
        return InfluenceTable.from_arrays(np.zeros(6), np.arange(6), values, {"diagnostics": {"s_test_s": 0.5}}), 1.0

    monkeypatch.setattr(studies, "call_influences", fake_call)
    points = studies.s_test_sweep(setup, bench, args, original=np.arange(6, dtype=float)[None])
    assert [(p["J"], p["B"], p["T"]) for p in points] == [(1, 1, 1)]


def test_knn_study_ranks_by_the_features_of_the_run(pad_collator, tmp_path):
    """The "+kNN" rows' candidates, quality and query cost come from the kNN study: it must use the run's
    influence_knn_features (it used 'auto' whatever the flag said), so its candidates are a call's."""
    train, test = make_token_dataset(40, seed=1), make_token_dataset(3, seed=2)
    setup = Setup(tiny_model(), None, pad_collator, train, test, {})
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", influence_knn_features="mean",
                              influence_knn_k=8, influence_recursion_depth=2, influence_batch_size=4,
                              influence_repetitions=1, influence_check_convergence=False)
    study = studies.knn_study(setup, [8], "mean")
    table, _ = call_influences(setup, test, args)
    called = [ids for ids, _ in influence_by_test(table, len(test))]
    assert all(np.array_equal(a, b) for a, b in zip(called, study["candidates"][8])) and study["features"] == "mean"
    auto = studies.knn_study(setup, [8], "auto")  # the pooler's features pick other rows: the test can tell
    assert not all(np.array_equal(a, b) for a, b in zip(auto["candidates"][8], study["candidates"][8]))


def test_quality_with_fewer_than_100_training_rows():
    """recall@100 of a 60-row set is recall@60 (every row), as ``hf-fastif recall`` caps it; it was a ValueError
    after every row had been computed."""
    original = np.random.default_rng(0).standard_normal((2, 60))
    quality = row_quality(original, [(np.arange(60), original[t]) for t in range(2)])
    assert quality["recall@10 helpful"] == 1.0 and quality["recall@60 harmful"] == 1.0
    assert rows_module.recall_ns(60) == [10, 60] and rows_module.recall_ns(5) == [5]
    assert "recall@100 helpful" in row_quality(np.zeros((1, 200)), [(np.arange(200), np.zeros(200))])


def test_every_row_is_charged_without_its_trunk_phase():
    """The low-rank row's kept engine finds the trunk states cached, every other row's fresh engine computes them
    on each call: each call's trunk phase is left out, as its index build is (a one-off in the cost model), so the
    rows pay alike (low-rank showed 34.5x next to the gradient dot product's 10x, which does less work)."""
    full_scan = {"candidates": "all", "trunk_s": 0.4, "candidates_s": 1e-4}
    assert per_point_seconds(5.0, full_scan, 1, 0.002) == pytest.approx(5.0 - 0.4)
    knn = {"candidates": "knn", "trunk_s": 0.4, "candidates_s": 0.2}
    assert per_point_seconds(5.0, knn, 2, 0.002) == pytest.approx(5.0 - 0.4 - 0.2 + 2 * 0.002)
    warm = {"candidates": "knn", "trunk_s": 0.01, "candidates_s": 0.007}  # a kept engine's later call
    assert per_point_seconds(0.3, warm, 2, 0.002) == pytest.approx(0.3 - 0.01 - 0.007 + 2 * 0.002)


def test_sweep_note_promises_the_original_rerun_only_where_the_sweep_has_it():
    """The note said the B = --original_batch_size, T = 1 point at the original's J is the original rerun with
    another seed, though the sweep's B may not hold it (MiniLM: B 1 and 8, the original's 32); the plot's title said
    B=128 whatever the original's B was."""
    bench = BenchmarkArguments(original_batch_size=32, sweep_num_test=2, sweep_pool=500)
    without = [{"J": 20, "B": b, "T": t} for b in (1, 8) for t in (1, 2)]
    note = sweep_note(bench, 20, 2, 400, without)
    assert "scored on 400 random training rows" in note and "convergence check counted once" in note
    assert "no point of this sweep is the original (B = 32, J = 20, T = 1)" in note
    assert "its own noise floor" not in note
    refused = [*without, {"J": 20, "B": 32, "T": 1, "refused": "not positive definite"}]
    assert "no point of this sweep" in sweep_note(bench, 20, 2, 400, refused)
    with_it = [*without, {"J": 10, "B": 32, "T": 1}, {"J": 20, "B": 32, "T": 1}]
    assert "the B = 32, J = 20, T = 1 point is the original rerun with another seed" in sweep_note(bench, 20, 2, 400,
                                                                                                    with_it)
    assert "no point of this sweep" in sweep_note(bench, 20, 2, 400, with_it[:-1])  # B = 32 at another J only
    title = sweep_title(without, 32, 20)
    assert "(vs original: B=32, J=20, T=1)" in title and "B ∈ [1, 8]" in title and "B=128" not in title


def test_top_eigenvalue_probe_runs_the_convergence_check(monkeypatch):
    """The probe reads the check's estimate, so it runs the check even with --influence_check_convergence false
    (a KeyError 'lissa_batch_top_eigenvalue' after the set-up)."""
    rows = Dataset.from_dict({"input_ids": [[1, 2]] * 3, "labels": [0, 1, 0]})
    setup = Setup(model=None, tokenizer=None, collator=None, train=rows, test=rows, description={})
    seen = []

    def fake_call(setup, test, settings, candidate_dataset=None):  # as the engine: the estimate comes with the check
        seen.append(settings)
        diagnostics = {"lissa_batch_top_eigenvalue": 1.5} if settings.influence_check_convergence else {}
        return InfluenceTable.from_arrays([0], [0], [0.0], {"diagnostics": diagnostics}), 1.0

    monkeypatch.setattr(rows_module, "call_influences", fake_call)
    args = InfluenceArguments(report_to="none", influence_check_convergence=False)
    assert top_eigenvalue(setup, args) == 1.5 and seen[0].influence_recursion_depth == 1


def test_statements_name_the_runs_j_and_damping():
    """J·damp is stated as it is: the paper's 5 only when it is (J = 1 with damp = 0.25 is 0.25)."""
    assert "J·damp = 5 as the paper's 1000 × 5e-3" in convergence_statement(20, 0.25)
    changed = convergence_statement(1, 0.25)
    assert "J·damp = 0.25, not the paper's 1000 × 5e-3 = 5" in changed and "as the paper's" not in changed
    args = InfluenceArguments(report_to="none", influence_recursion_depth=1, influence_damping=0.25,
                              influence_batch_size=2, influence_repetitions=3)
    fast = {"b": 8, "t": 1, "j": 1, "scale": 5.0, "damping": 0.5}
    choice = fast_choice(BenchmarkArguments(), args, fast)
    assert "instead of FastIF's B = 2, T = 3" in choice and "J = 1 steps, the fewest with J·damp >= 0.25" in choice
    assert "J·damp = 0.5 here" in choice and "J·damp = 5" not in choice
    assert "a single row's product" not in choice  # no unit costs: no figure
    priced = fast_choice(BenchmarkArguments(), args, fast, {"hvp": {"1x1": 0.02, "8x1": 0.06, "8x2": 0.1}})
    assert "one product over 8 rows, which costs 3x a single row's product here" in priced


def test_paper_t_equal_to_the_processes_keeps_the_ideal_row():
    """--paper_t equal to --parallel_processes: the ideal P = T row and its two targets are there (the ideal row was
    named as the measured one's and vanished)."""
    u = {"hvp": {"1x1": 1.0, "128x1": 10.0, "8x2": 2.0}, "score": {"1": 0.01, "2": 0.015}, "test_gradient": 0.5,
         "power_iteration": {"1": 4.0, "8": 5.0, "128": 6.0}, "feature": 0.1, "knn_row": 1e-4, "score_loop": 0.1}
    scale = CostScale(n=1000, j=100, b=128, t=2, k=10, knn_ks=[10], m=2, processes=2)
    c = cost_model(u, scale, {"b": 8, "t": 1, "j": 50}, more_processes=(2,))
    assert c[PARALLEL] == c[f"{PARALLEL} (P=2, ideal)"]
    args = InfluenceArguments(report_to="none", influence_recursion_depth=100)
    bench = BenchmarkArguments(paper_t=2, parallel_processes=2)
    paper, _ = paper_scale_rows(u, bench, args, {"b": 8, "t": 1, "j": 50, "scale": 1.0}, 2)
    assert f"{PARALLEL} (P=2, ideal)" in [r["row"] for r in paper]
    measured = [{"row": name, "spearman": 1.0, "spearman_min": 1.0} for name in (FASTIF, FAST)]
    assert sum("FastIF parallel" in t["target"] for t in targets(measured, paper, bench.paper_t)) == 2


def test_fast_settings_keep_lambda_and_convergence():
    args = InfluenceArguments(report_to="none", influence_recursion_depth=100, influence_damping=0.05,
                              influence_scale=5.0)
    fast = fast_settings(BenchmarkArguments(fast_scale_factor=1.5), args, top_eigenvalue=1.6)
    assert fast["scale"] == pytest.approx(2.4)
    assert fast["damping"] * fast["scale"] == pytest.approx(0.25)  # λ of the original
    assert fast["j"] * fast["damping"] >= 100 * 0.05 - 1e-9 and fast["j"] == 48
    # a scale factor that would exceed the original's scale is capped at it
    assert fast_settings(BenchmarkArguments(fast_scale_factor=10), args, 1.6)["j"] == 100


def parse(argv):
    return parse_with_defaults((BenchmarkArguments, InfluenceArguments), benchmark_defaults, argv)


def test_influence_settings_are_influence_arguments_flags():
    bench, args = parse(["--quick", "--influence_recursion_depth", "30", "--knn_sweep", "5", "10"])
    assert args.influence_recursion_depth == 30  # the user's flag wins over --quick's 20
    assert args.influence_damping == pytest.approx(0.25) and args.influence_knn_k == 80  # --quick's defaults
    assert bench.knn_sweep == [5, 10] and bench.num_test == 2 and args.seed == 0
    assert args.influence_params == TINY.influence["influence_params"] and args.use_cpu  # --quick: the tiny model
    _, args = parse([])
    assert args.influence_params == minilm_influence_params(2) and args.learning_rate == 2e-4  # MiniLM by default
    # a given model gets the paper's settings: InfluenceArguments' own defaults and the paper's BERT layers
    bench, args = parse(["--model_name_or_path", "some/bert"])
    assert (args.influence_recursion_depth, args.influence_damping, args.influence_scale) == (1000, 5e-3, 1e4)
    assert args.influence_params == PAPER_BERT_PARAMS and bench.num_test == 8 and not args.use_cpu
    # the MiniLM setting: its fine-tuned layers take part, CPU-sized sizes, the paper's J·damp
    bench, args = parse(["--embedded_model", "minilm", "--num_test", "3"])
    assert args.influence_params == minilm_influence_params(2) and args.use_cpu and bench.num_test == 3
    assert bench.original_batch_size == 32 and bench.paper_b == 128 and not bench.ground_truth
    assert bench.knn_sweep == [300] and args.influence_knn_k == 300 and args.influence_scale == 200.0
    assert args.influence_recursion_depth * args.influence_damping == pytest.approx(5.0)
    for respelled in (["--damping", "0.1"], ["--knn_k", "5"], ["--recursion_depth", "5"], ["--fastif_k", "5"]):
        with pytest.raises(SystemExit):  # one name per setting: argparse's "unrecognized arguments"
            parse(respelled)


def test_none_or_zero_flags_mean_none_as_in_the_cli():
    """``--influence_knn_k None`` / ``0`` (what --help says) is None, as the hf-fastif CLI reads it; argparse refused
    'None' and 0 stayed 0."""
    _, args = parse(["--quick", "--influence_knn_k", "None", "--influence_repetitions", "0"])
    assert args.influence_knn_k is None and args.influence_repetitions is None
    _, args = parse(["--quick", "--influence_knn_k=none", "--influence_repetitions", "2"])
    assert args.influence_knn_k is None and args.influence_repetitions == 2


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--influence_solver", "cg"], "FastIF row, which is LiSSA"),
    (["--quick", "--test_format", "csv"], "use 'mnli' or 'hans'"),
    (["--quick", "--embedded_model", "gpt2"], "use one of minilm, tiny"),
    (["--quick", "--knn_sweep", "0"], "--knn_sweep must be positive"),
    (["--quick", "--parallel_processes", "-1"], "--parallel_processes must be >= 0"),
    (["--quick", "--influence_knn_k", "None"], "FastIF's row needs --influence_knn_k"),
    (["--quick", "--influence_knn_features", "gradient"], "influence_knn_features='gradient'"),
])
def test_bad_settings_are_refused_before_any_work(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        main([*argv, "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------- the quick run
def test_rows_are_the_papers_and_ours(quick):
    results, _ = quick
    names = [r["row"] for r in results["rows"]]
    assert names == [ORIGINAL, FLOOR, "+kNN (k=20)", "+kNN (k=80)", FASTIF, f"{PARALLEL} (2 processes)", FAST,
                     LOW_RANK, GRADIENT]


def test_every_row_has_time_and_quality(quick):
    results, _ = quick
    for row in results["rows"]:
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row["row"]
        assert row["speed-up"] == pytest.approx(results["rows"][0]["seconds"] / row["seconds"])
        for key in ("pearson", "spearman"):
            assert -1.0 <= row[key] <= 1.0, (row["row"], key)
        for key in ("recall@10 helpful", "recall@10 harmful", "recall@100 helpful", "recall@100 harmful"):
            assert 0.0 <= row[key] <= 1.0, (row["row"], key)
        assert "values" not in row


def test_original_agrees_with_itself(quick):
    rows = by_row(quick[0])
    original = rows[ORIGINAL]
    assert original["spearman"] == pytest.approx(1.0) and original["speed-up"] == pytest.approx(1.0)
    assert original["recall@10 helpful"] == 1.0 and original["recall@100 harmful"] == 1.0
    # another LiSSA seed is another estimate: close to the original, but not the same numbers
    assert 0.5 < rows[FLOOR]["pearson"] < 1.0 - 1e-9
    for name in (ORIGINAL, FASTIF, FAST, LOW_RANK):
        assert 0.0 < rows[name]["cost model / measured"] < 100.0, name
    # the measured FastIF call groups its 4 repetitions (the tiny BERT's grouped route): checked against the grouped
    # formula (against 4 single products it read 2.42, a review's run), the parallel row, grouping 2 a process, not
    assert 0.4 < rows[FASTIF]["cost model / measured"] < 2.0
    assert rows[f"{PARALLEL} (2 processes)"]["cost model / measured"] is None


def test_a_measured_row_is_checked_against_the_formula_of_how_it_ran():
    assert model_key(FASTIF, stacked=True) == STACKED and model_key(FASTIF, stacked=False) == FASTIF
    assert model_key(f"{PARALLEL} (2 processes)", stacked=True) is None
    assert model_key(f"{PARALLEL} (2 processes)", stacked=False) == PARALLEL
    assert model_key(ORIGINAL, stacked=True) == ORIGINAL and model_key(FAST, stacked=True) == FAST


def test_knn_rows_share_the_original_s_test(quick):
    rows = by_row(quick[0])
    small, large = rows["+kNN (k=20)"], rows["+kNN (k=80)"]
    for row in (small, large):
        assert row["sanity"]["candidates_equal_knn_index"]
        assert row["sanity"]["max_relative_difference_to_original"] < 1e-5
        assert row["spearman"] == pytest.approx(1.0)
    for key in ("recall@10 helpful", "recall@10 harmful", "recall@100 helpful", "recall@100 harmful"):
        assert large[key] >= small[key], key  # the k = 20 neighbours are inside the k = 80 ones


def test_parallel_equals_fastif(quick):
    rows = by_row(quick[0])
    parallel = next(r for name, r in rows.items() if name.startswith(PARALLEL))
    assert "error" not in parallel, parallel.get("error")
    assert parallel["num_processes"] == 2
    assert parallel["sanity"]["max_relative_difference_to_FastIF"] < 1e-4
    # the values agree to float32 rounding (the mean over repetitions is summed in another order on 2 processes,
    # ~1e-7), which can swap two of the tiny model's near-tied values: Spearman to 1e-3, not exactly
    assert parallel["spearman"] == pytest.approx(rows[FASTIF]["spearman"], abs=1e-3)


def test_fast_row_is_close_to_the_original(quick):
    results, _ = quick
    fast = by_row(results)[FAST]
    assert fast["spearman"] > 0.5
    assert results["fast"]["damping"] * results["fast"]["scale"] == pytest.approx(results["scale"]["lambda"])
    # the choice states what a step of its B rows costs against a single row's, from this run's unit costs
    ratio = results["unit_costs"]["hvp"][f"{results['fast']['b']}x1"] / results["unit_costs"]["hvp"]["1x1"]
    assert f"which costs {ratio:.3g}x a single row's product here" in results["fast"]["choice"]
    assert "union" in fast and fast["union"] <= results["scale"]["num_train"]


def test_low_rank_row_is_the_arnoldi_solver_built_once(quick):
    results, _ = quick
    row = by_row(results)[LOW_RANK]
    settings = row["influence_settings"]
    assert settings["influence_solver"] == "arnoldi" and settings["influence_arnoldi_rank"] == 4
    assert settings["influence_arnoldi_rows"] == 64 and settings["influence_knn_k"] == 80
    assert row["diagnostics"]["arnoldi_rank"] == 4 and row["spearman"] > 0.5
    # the engine's later calls reuse the low-rank Hessian: the same numbers as its first call, which built it
    assert row["sanity"]["max_relative_difference_later_call_vs_first"] < 1e-5
    assert len(row["calls"]) == 2 and row["one_off"]["seconds"] > row["seconds"]
    # its first call's trunk states are the one-off's (the later calls', like every row's, are left out)
    assert 0 < row["one_off"]["trunk_s"] < row["one_off"]["seconds"]
    assert results["paper"]["low_rank_build_s"] == row["one_off"]["s_test_s"] > 0  # 64 of 400 rows: as measured
    assert "arnoldi" in results["low_rank"]["choice"] and "Lanczos" in results["low_rank"]["choice"]
    marks = [t for t in results["targets"] if t["target"].startswith(f"({LOW_RANK}")]
    assert len(marks) == 3 and all(isinstance(t["met"], bool) for t in marks)


def test_paper_scale_rows(quick):
    results, out = quick
    paper = {r["row"]: r for r in results["paper_rows"]}
    assert paper[ORIGINAL]["speed-up vs original (hf_fastif kernels)"] == pytest.approx(1.0)
    assert paper[FASTIF]["speed-up vs original (hf_fastif kernels)"] > 1.0
    assert paper["original (2021 code path)"]["speed-up vs original (2021 code path)"] == pytest.approx(1.0)
    u = results["unit_costs"]
    assert all(v > 0 for v in u["hvp"].values()) and all(v > 0 for v in u["score"].values())
    # hf_fastif's units run from the trunk cache (the embedded model splits above layer 0); the 2021 code path's
    # HVPs run the whole model, one per B of the run
    assert u["trunk_split"] == "bert.encoder.layer.1" and u["trunk"] > 0
    assert set(u["hvp_full"]) == {key for key in u["hvp"] if key.endswith("x1")}
    # the convergence check at each B of the run, from that B's step (the original's B = 32 costs most)
    assert set(u["power_iteration"]) == {key[:-2] for key in u["hvp_full"]}
    assert u["power_iteration"]["128"] > u["power_iteration"]["1"] > 0
    assert results["paper"]["trunk_build_s"] == pytest.approx(results["paper"]["n"] * u["trunk"])
    assert len(results["targets"]) >= 6 and all(isinstance(t["met"], bool) for t in results["targets"])
    # the stacked step is measured, and its row shown where the run's setting stacks on its device (auto: CUDA, or
    # the grouped route, which the tiny BERT's parameters take on this CPU)
    assert u["hvp_stacked"] and all(v > 0 for v in u["hvp_stacked"].values())
    assert u["hvp_stacked_route"] == "grouped"
    assert paper["FastIF, repetitions stacked"]["seconds"] > 0 and results["stacked_row"] is None
    assert sum(t["target"].startswith("(FastIF, repetitions stacked") for t in results["targets"]) == 1


def test_knn_recall_curve_of_the_run(quick):
    curve = quick[0]["knn_recall_curve"]
    assert curve["k"][-1] == quick[0]["scale"]["num_train"]
    for key in (k for k in curve if k.startswith("recall@")):
        assert np.all(np.diff(curve[key]) >= -1e-12), key
        assert curve[key][-1] == pytest.approx(1.0), key


def test_sweep_grid(quick):
    results, _ = quick
    config = results["arguments"]
    sweep = results["sweep"]
    depths = {max(1, round(f * results["scale"]["recursion_depth"])) for f in config["sweep_depths"]}
    assert {(p["J"], p["B"]) for p in sweep} == {(j, b) for j in depths for b in config["sweep_batch_sizes"]}
    for p in sweep:
        assert p["T"] * p["B"] <= max(config["original_batch_size"], p["B"])
        if "refused" in p:  # the engine's convergence check refused that seed's sample
            continue
        assert p["s_test_s_per_test_point"] > 0 and -1.0 <= p["spearman"] <= 1.0
    t_max = config["sweep_repetitions"]
    assert max(p["T"] for p in sweep if p["B"] == 1) == t_max


def test_ground_truth_anchor(quick):
    rows = {r["solver"]: r for r in quick[0]["ground_truth"]["rows"]}
    assert rows["exact"]["spearman_vs_exact"] == pytest.approx(1.0)
    assert rows["cg"]["spearman_vs_exact"] > 0.99
    assert rows["exact"]["spearman_vs_loo"] > 0.9
    for row in rows.values():
        assert -1.0 <= row["lds"] <= 1.0
    assert "leave-one-out retraining (Newton)" in rows


def test_files(quick):
    results, out = quick
    saved = json.loads((out / "benchmark.json").read_text())
    assert [r["row"] for r in saved["rows"]] == [r["row"] for r in results["rows"]]
    for png in ("s_test_sweep.png", "knn_recall.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "benchmark.md").read_text()
    for heading in ("## Measured, side by side in one run", "## At the paper's scale", "## Targets",
                    "## s_test sweep", "## kNN recall vs k", "## Ground-truth anchor"):
        assert heading in report
    assert "leave out its calls' trunk phase" in report and "power_iteration[B=32]" in report
    # --quick sweeps B 1 and 8 against the original's B = 32: no point of it is the original rerun
    assert "no point of this sweep is the original (B = 32, J = 20, T = 1)" in results["sweep_note"]


@pytest.mark.usefixtures("propagating")
def test_a_probe_short_on_purpose_leaves_out_only_the_truncation_warning(caplog, pad_collator):
    """A benchmark's warm-up or probe with J 1 advised "raise influence_recursion_depth to 100000000" (a review):
    inside `short_on_purpose` the engine's own warning is left out, every other passes, and after it it is back."""
    import logging

    from benchmarks.report import short_on_purpose
    from hf_fastif import InfluenceArguments, compute_influences
    from hf_fastif.engine import s_test
    from tests.tiny import HEAD_ONLY, make_token_dataset, tiny_model

    model, train, test = tiny_model("bert"), make_token_dataset(12, seed=0), make_token_dataset(1, seed=1)

    def call(depth: int) -> None:  # (a damping of its own: warning_once says a message once per process)
        compute_influences(model, train, test, InfluenceArguments(
            output_dir="unused", report_to="none", disable_tqdm=True, influence_solver="lissa",
            influence_recursion_depth=depth, influence_damping=0.0123, influence_scale=10.0, influence_knn_k=None,
            influence_check_convergence=False, influence_params=HEAD_ONLY["bert"]), data_collator=pad_collator)

    with caplog.at_level(logging.WARNING):
        with short_on_purpose():
            call(1)
            s_test.logger.warning("another warning")
        assert "another warning" in caplog.text and "LiSSA stops" not in caplog.text
        call(2)
    assert "influence_recursion_depth=2 with influence_damping=0.0123: LiSSA stops after J steps" in caplog.text
