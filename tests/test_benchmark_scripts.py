"""The core, parallel, per-test-point and device-cost benchmarks (benchmarks/core.py, parallel.py, per_test_point.py,
device_costs.py) run end to end in quick mode, and the scripts refuse what they cannot run before any work (also
benchmarks/minilm_finetune.py's --save). Structure and sanity only, never speed."""

import gc
import json
import weakref
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest

import hf_fastif.recall as recall_module
from benchmarks import (
    core,
    default_solvers,
    device_agreement,
    device_costs,
    device_step,
    digits_anchor,
    minilm_finetune,
    paper_table,
    parallel,
    per_test_point,
    recall,
    reference,
)
from benchmarks.arguments import parse_with_defaults
from benchmarks.timing import timed
from hf_fastif import InfluenceArguments
from hf_fastif.data import generate_nli, hans_row_count
from hf_fastif.embedded import TINY
from hf_fastif.recall import RECALL_HANS_PER_SUBCASE
from hf_fastif.solvers.lissa import LissaDivergenceError


def _no_work(*args, **kwargs):
    raise AssertionError("the benchmark started its work")


class _Stop(Exception):
    pass


# each benchmark and the first step of its work: a refusal must come before it
FIRST_WORK = [(core, "scoring_benchmark"), (device_costs, "build_setup"), (device_step, "build_setup"),
              (per_test_point, "embedded_data"),
              (parallel, "workload"), (recall, "finetuned_minilm"), (paper_table, "prepare")]


@pytest.mark.parametrize("module, first_work", FIRST_WORK, ids=[m.__name__ for m, _ in FIRST_WORK])
def test_an_output_dir_that_is_a_file_is_refused_before_any_work(module, first_work, tmp_path, monkeypatch):
    """core, device_costs and per_test_point found it only when writing, after all the measuring."""
    monkeypatch.setattr(module, first_work, _no_work)
    afile = tmp_path / "afile"
    afile.write_text("i am a file")
    with pytest.raises(ValueError, match="--output_dir .* is an existing file"):
        module.main(["--quick", "--output_dir", str(afile)])


@pytest.mark.parametrize("module, first_work, argv, message", [
    (core, "scoring_benchmark", ["--num_candidates", "8", "--loop_candidates", "32"],
     "--loop_candidates 32 exceeds --num_candidates 8"),
    (core, "scoring_benchmark", ["--hidden_sizes", "30"], "--hidden_sizes"),
    (per_test_point, "train_embedded_model", ["--num_test_points", "100"],
     "--num_test_points 100 exceeds the 30 HANS-style test rows"),
    (recall, "finetuned_minilm", ["--num_test_points", "50"],
     "--num_test_points 50 exceeds the 30 generated HANS-style test rows"),
    (core, "scoring_benchmark", ["--digits_train", "1790", "--digits_test", "50"],
     "1790 training \\+ 50 test rows; the digits have 1797"),
    (core, "scoring_benchmark", ["--minilm_train", "1"], "--minilm_train 1 --minilm_test 8: the MiniLM head"),
    (paper_table, "prepare", ["--digits_train", "1797"], "1797 training \\+ 4 test rows"),
    (parallel, "workload", ["--num_test", "5000"], "--num_test 5000 exceeds the 1200 HANS-style test rows"),
    (parallel, "workload", ["--num_test", "0"], "--num_test must be at least 1"),
    (default_solvers, "train_embedded", ["--num_test_points", "0"], "--num_test_points and --threads must be"),
], ids=["core loop", "core heads", "per_test_point", "recall", "core digits", "core minilm", "paper table digits",
        "parallel rows", "parallel none", "default solvers"])
def test_own_sizes_are_refused_before_the_model_work(module, first_work, argv, message, tmp_path, monkeypatch):
    """Sizes past what there is failed with IndexError / numpy errors after the model was trained or fine-tuned; digits
    splits past the 1,797 rows silently scored fewer test rows, or none."""
    monkeypatch.setattr(module, first_work, _no_work)
    with pytest.raises(ValueError, match=message):
        module.main(["--quick", "--output_dir", str(tmp_path), *argv])


def test_parallel_counts_the_rows_it_generates():
    """benchmarks.parallel refuses --num_test past the HANS-style rows it would generate (a bare IndexError after the
    set-up), counted without generating them: the count must be the generator's."""
    rows = generate_nli(seed=0, n_train=0, n_hans_per_subcase=TINY.data["n_hans_per_subcase"], n_pool_per_subcase=0)
    assert parallel.hans_rows() == len(rows["hans"]) == 1200


@pytest.mark.parametrize("per_subcase", [0, 1, 3])
def test_hans_row_count_is_the_generators(per_subcase):
    """`hans_row_count` (what benchmarks.parallel and benchmarks.recall refuse sizes by, before any work) counts the
    rows `generate_nli` makes in its `hans` and `pool` splits; benchmarks.recall generated data to count them."""
    rows = generate_nli(seed=1, n_train=0, n_hans_per_subcase=per_subcase, n_pool_per_subcase=per_subcase)
    assert hans_row_count(per_subcase) == len(rows["hans"]) == len(rows["pool"]) == 30 * per_subcase


def test_recall_counts_the_test_rows_of_its_model(monkeypatch):
    """benchmarks.recall's limit on --num_test_points is the number of HANS-style rows `finetuned_minilm` gives."""
    made = {}

    def generate(**kwargs):
        made.update(kwargs)
        raise _Stop

    monkeypatch.setattr(recall_module, "generate_nli", generate)
    with pytest.raises(_Stop):
        recall_module.finetuned_minilm(10, SimpleNamespace(seed=0))
    assert hans_row_count(made["n_hans_per_subcase"]) == hans_row_count(RECALL_HANS_PER_SUBCASE) == 30


def test_per_test_point_warms_up_before_the_timed_rows(tmp_path, monkeypatch):
    """The first row's first call paid the process's cold start (lazy imports, first kernel dispatch: 4.5 s vs 3.1 s
    on repeat): untimed calls on a few rows, one with each row's settings shrunk (the first row's alone left the
    gradient index of the fast and live rows cold: an audit), now go before every row; a warm-up whose few rows the
    convergence check refuses warms the rest without the check."""
    calls = []

    class Engine:  # records each call: (settings, training rows, test rows)
        def __init__(self, model, args, data_collator=None):
            self.args = args

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def compute_influences(self, train, test):
            calls.append((self.args, len(train), len(test)))
            if len(calls) == 1:  # the warm-up's 64 rows look indefinite to the check
                raise LissaDivergenceError("H + λI is not positive definite")
            return SimpleNamespace(metadata={"diagnostics": {"s_test_s": 0.5}})

    monkeypatch.setattr(per_test_point, "InfluenceEngine", Engine)
    monkeypatch.setattr(per_test_point, "train_embedded_model", lambda *a, **k: (None, {"cached": True}))
    results = per_test_point.main(["--quick", "--output_dir", str(tmp_path), "--num_test_points", "3"])
    (first, rows_1, tests_1), (again, rows_2, _) = calls[0], calls[1]
    assert (rows_1, tests_1, rows_2) == (64, 1, 64)  # the warm-up: 64 of the 200 training rows, one test point
    assert first.influence_recursion_depth == 2 and first.influence_knn_k == 32 and first.influence_check_convergence
    assert not again.influence_check_convergence and again.influence_recursion_depth == 2
    fastif = results["rows"][0]
    assert fastif["row"] == "FastIF" and fastif["settings"]["influence_recursion_depth"] == 20
    # the other two rows' warm-ups, with their own settings (the gradient index of the fast and live rows)
    warmed = [args for args, rows, tests in calls[2:4]]
    assert [(rows, tests) for _, rows, tests in calls[2:4]] == [(64, 1), (64, 1)]
    assert [a.influence_knn_features for a in warmed] == [r["settings"]["influence_knn_features"]
                                                          for r in results["rows"][1:]]
    assert [a.influence_solver for a in warmed] == ["lissa", "arnoldi"]
    # then each row as before, on the whole training set: first call, 2 later calls, all 3 in one call
    assert [(rows, tests) for _, rows, tests in calls[4:]] == [(200, 1), (200, 1), (200, 1), (200, 3)] * 3
    assert calls[4][0].influence_recursion_depth == 20 and calls[4][0].influence_knn_k == 50


class _Cycle:
    """A reference cycle: only the garbage collector frees it."""

    def __init__(self):
        self.me = self


def test_whole_calls_are_timed_from_a_collected_heap(tmp_path, monkeypatch):
    """A full collection of a benchmark process's heap costs ~0.24 s, and the collector ran one inside whichever call
    crossed its threshold (218 ms inside the fast row's 4-test-point call of `benchmarks.per_test_point`, for the
    garbage of the rows before): ``timed(collected=True)`` collects first, untimed, and the per-test-point calls use
    it. (The automatic collector is off here, so only that collection can free the cycles.)"""
    gc.disable()
    try:
        left = weakref.ref(_Cycle())
        freed, _ = timed(lambda: left() is None, collected=True)
        assert freed
        kept = weakref.ref(_Cycle())
        freed, _ = timed(lambda: kept() is None)
        assert not freed  # (without it, the garbage is still there when the timer starts)
        gc.collect()
        cycles, found = [], []

        class Engine:  # each call leaves a cycle behind; a timed call finds the one before it freed
            def __init__(self, model, args, data_collator=None):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

            def compute_influences(self, train, test):
                found.append([ref() is None for ref in cycles])
                cycles.append(weakref.ref(_Cycle()))
                return SimpleNamespace(metadata={"diagnostics": {"s_test_s": 0.5}})

        monkeypatch.setattr(per_test_point, "InfluenceEngine", Engine)
        monkeypatch.setattr(per_test_point, "train_embedded_model", lambda *a, **k: (None, {"cached": True}))
        per_test_point.main(["--quick", "--output_dir", str(tmp_path), "--num_test_points", "2"])
    finally:
        gc.enable()
    assert len(found) == 3 + 3 * 3  # a warm-up a row, then 3 rows of 3 timed calls
    assert all(all(freed) for freed in found[3:]) and found[3]  # every timed call: all garbage before it freed


def test_device_costs_says_up_front_it_runs_bert_base_on_the_cpu(tmp_path, monkeypatch, caplog):
    """Without a GPU and without --quick it started BERT-base on the CPU and printed nothing for minutes."""
    monkeypatch.setattr(device_costs.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_costs, "build_setup", _no_work)
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="started its work"):
        device_costs.main(["--output_dir", str(tmp_path)])
    assert "No GPU found: running BERT-base" in caplog.text and "on the CPU" in caplog.text
    assert "--quick runs a 2-layer model" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="started its work"):
        device_costs.main(["--quick", "--output_dir", str(tmp_path)])
    assert "BERT-base" not in caplog.text  # --quick is the small model: nothing to warn of


def test_minilm_finetune_save_compares_numbers(tmp_path, monkeypatch, capsys):
    """--save 1,2e-4,1 saved nothing (compared as text with '0.0002'); a --save that names no run is refused before
    any training."""
    sweep = ["--layers", "1", "--lrs", "2e-4", "--epochs", "1", "--output-dir", str(tmp_path)]
    assert minilm_finetune.parse_args([*sweep, "--save", "1,2e-4,1"]).save == (1, 2e-4, 1.0)
    monkeypatch.setattr(minilm_finetune, "finetune_minilm", _no_work)
    for save, message in (("2,2e-4,1", "--save 2,2e-4,1 matches no run of the sweep (--layers 1, --lrs 0.0002"),
                          ("1,2e-4", "--save 1,2e-4 is not LAYERS,LR,EPOCHS")):
        with pytest.raises(SystemExit) as exit_:
            minilm_finetune.main([*sweep, "--save", save])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    saved = []
    trainer = SimpleNamespace(processing_class=None, train_dataset=None, save_model=saved.append)
    monkeypatch.setattr(minilm_finetune, "minilm_path", lambda: None)
    monkeypatch.setattr(minilm_finetune, "generate_nli", lambda **kwargs: {"train": None, "hans": None})
    monkeypatch.setattr(minilm_finetune, "finetune_minilm", lambda *args, **kwargs: trainer)
    monkeypatch.setattr(minilm_finetune, "tokenize_nli", lambda *args: None)
    monkeypatch.setattr(minilm_finetune, "evaluate", lambda *args: {"hans_accuracy": 0.5})
    monkeypatch.setattr(minilm_finetune, "report", lambda table, args: "")
    minilm_finetune.main([*sweep, "--lrs", "1e-3", "2e-4", "--save", "1,2e-4,1"])
    assert saved == [str(tmp_path / "model")]  # the 2e-4 run's model, once


def test_none_or_zero_flags_reach_every_benchmark():
    """``--influence_knn_k None`` / ``--influence_repetitions 0`` mean None (--help says so), as in the hf-fastif CLI;
    the reference comparison needs k None."""
    _, args = parse_with_defaults((parallel.ParallelArguments, InfluenceArguments), parallel.parallel_defaults,
                                  ["--quick", "--influence_repetitions", "None", "--influence_knn_k", "0"])
    assert args.influence_repetitions is None and args.influence_knn_k is None
    own, args = parse_with_defaults((reference.ReferenceArguments, InfluenceArguments), reference.reference_defaults,
                                    ["--influence_knn_k", "None"])
    reference.validate(own, args)  # refused "--influence_knn_k 5" says to pass None; None passes


def test_device_costs_takes_the_influence_flags(tmp_path, monkeypatch):
    """FastIF's k, J and T at the paper's scale are the influence flags (they were ignored); None for k or T has no
    cost row and is refused before any work."""
    own, args = parse_with_defaults((device_costs.DeviceCostsArguments, InfluenceArguments),
                                    device_costs.device_costs_defaults,
                                    ["--quick", "--influence_repetitions", "16", "--influence_knn_k", "10",
                                     "--influence_recursion_depth", "7"])
    bench = device_costs.paper_settings(own, args)
    assert (bench.paper_k, bench.paper_j, bench.paper_t, bench.paper_b) == (10, 7, 16, 64)
    _, args = parse_with_defaults((device_costs.DeviceCostsArguments, InfluenceArguments),
                                  device_costs.device_costs_defaults, [])
    bench = device_costs.paper_settings(own, args)  # the defaults are the paper's
    assert (bench.paper_k, bench.paper_j, bench.paper_t, args.influence_batch_size) == (1000, 1000, 4, 1)
    monkeypatch.setattr(device_costs, "build_setup", _no_work)
    for argv, message in ((["--influence_knn_k", "None"], "--influence_knn_k and --influence_repetitions as "),
                          (["--influence_batch_size", "65"], "--influence_batch_size 65 exceeds")):
        with pytest.raises(ValueError, match=message):
            device_costs.main(["--quick", "--output_dir", str(tmp_path), *argv])


def test_core_quick(tmp_path, capsys):
    results = core.main(["--quick", "--output_dir", str(tmp_path), "--influence_scoring_batch_size", "16"])
    scoring = results["scoring"]
    assert [(r["hidden"], r["parameters"]) for r in scoring] == [
        (32, "paper (last layer, pooler, classifier)"), (32, "all")]
    assert scoring[0]["num_parameters"] < scoring[1]["num_parameters"]
    for row in scoring:
        for key in ("forward_cand_per_s", "loop_cand_per_s", "jvp_cand_per_s", "grad_cand_per_s"):
            assert row[key] > 0, key
    digits = {r["solver"]: r for r in results["digits"]}
    assert digits["exact"]["spearman_vs_exact"] == pytest.approx(1.0)
    assert digits["cg"]["spearman_vs_exact"] > 0.99 and digits["exact"]["spearman_vs_loo"] > 0.9
    assert json.loads((tmp_path / "benchmark_core.json").read_text())["digits"][0]["solver"] == "exact"
    assert "## Scoring" in capsys.readouterr().out


def test_minilm_head_anchor_quick():
    """The core benchmark's second anchor (left out of ``--quick``): influence through the pretrained MiniLM against
    leave-one-out retraining of its head; structure, and H⁻¹ ranking closer to leave-one-out than its absence.
    tests/test_ground_truth.py holds the ground-truth test itself."""
    solvers = {name: digits_anchor.MINILM_SOLVERS[name] for name in ("exact", digits_anchor.NO_INVERSE)}
    result = digits_anchor.minilm_head_anchor(24, 2, 4, solvers=solvers)
    rows = {r["solver"]: r for r in result["rows"]}
    assert list(rows) == ["exact", digits_anchor.NO_INVERSE, "leave-one-out retraining (Newton)"]
    assert (result["num_train"], result["num_test"]) == (24, 2)
    assert rows["exact"]["spearman_vs_loo"] > 0.95 > rows[digits_anchor.NO_INVERSE]["spearman_vs_loo"]
    assert rows["exact"]["spearman_vs_exact"] == pytest.approx(1.0)


def test_default_solvers_quick(tmp_path, monkeypatch):
    """benchmarks.default_solvers on the tiny model: every variant scores every row; the reference (CG) agrees with
    itself, the others are measured against it; the report is written. An untimed call of the cheapest row (one
    test point) goes first: the first row, CG, paid the process's one-time costs (an audit: 1.08 against 0.70 s)."""
    calls = []
    real = default_solvers.compute_influences

    def recorded(model, train, test, args, **kwargs):
        calls.append((len(test), args.influence_solver, args.influence_damping))
        return real(model, train, test, args, **kwargs)

    monkeypatch.setattr(default_solvers, "compute_influences", recorded)
    report = default_solvers.main(["--quick", "--output_dir", str(tmp_path)])
    assert calls[0] == (1, "cg", 1e6) and len(calls) == 7 and all(tests == 2 for tests, _, _ in calls[1:])
    names = [row["s_test"] for row in report["rows"]]
    assert names[0] == "cg at λ = 5 (the reference)" and len(names) == 6 and names[1].startswith("the default: lissa")
    first = report["rows"][0]
    assert first["spearman_vs_cg"] == first["min_spearman"] == first["top10_helpful_overlap"] == 1.0
    assert all(-1 <= row["min_spearman"] <= row["spearman_vs_cg"] <= 1 and row["seconds"] > 0 for row in report["rows"])
    assert (report["n_train"], len(report["test_rows"])) == (300, 2)
    assert "| s_test |" in (tmp_path / "default_solvers.md").read_text()


def test_parallel_quick_runs_two_processes(tmp_path, capsys):
    results = parallel.main(["--quick", "--output_dir", str(tmp_path)])
    one, two = results["one_process"], results["two_processes"]
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["many_in_one_call_s"] > 0 and one["one_at_a_time_s"] > 0 and two["many_in_one_call_s"] > 0
    assert "one_at_a_time_s" not in two  # only the one-process run times test points one by one
    assert "--quick" in results["command"]  # the launched run got the same flags
    assert (tmp_path / "benchmark_parallel.json").exists()
    assert "2 processes, many test points in one call" in capsys.readouterr().out


def test_per_test_point_quick(tmp_path, capsys):
    results = per_test_point.main(["--quick", "--output_dir", str(tmp_path), "--num_test_points", "3"])
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == ["FastIF", "fast", "live"]
    assert rows["FastIF"]["settings"]["influence_batch_size"] == 1
    assert rows["FastIF"]["settings"]["influence_repetitions"] == 4
    assert rows["live"]["settings"]["influence_solver"] == "arnoldi"
    for row in rows.values():
        assert row["first_call_s"] > 0 and row["next_calls_s"] > 0 and row["all_in_one_call_s_per_point"] > 0
        assert row["all_in_one_call_phases"]["s_test_s"] > 0
    assert json.loads((tmp_path / "per_test_point.json").read_text())["num_test_points"] == 3
    assert "Seconds per test point" in capsys.readouterr().out


def test_device_costs_quick(tmp_path, capsys):
    results = device_costs.main(["--quick", "--output_dir", str(tmp_path), "--influence_batch_size", "2",
                                 "--influence_knn_k", "500"])
    unit, rows = results["unit_costs_s"], {r["row"]: r for r in results["paper_scale"]}
    assert results["environment"]["device"] == "cpu" and results["num_train"] == 64
    assert results["paper_scale_settings"]["paper_b"] == 64  # the original's B: every row of a smaller set
    # the settings used are the flags given, and the JSON says so
    assert results["paper_scale_settings"]["paper_k"] == 500 and results["paper_scale_settings"]["fastif_b"] == 2
    assert results["influence_arguments"]["influence_batch_size"] == 2
    assert "FastIF parallel (P=4, ideal)" in rows
    assert set(unit["hvp"]) >= {"1x1", "1x8", "2x1", "8x1", "64x1"} and all(v > 0 for v in unit["hvp"].values())
    assert unit["score"]["1"] > 0 and unit["score_loop"] > 0
    assert set(unit["power_iteration"]) == {"1", "2", "8", "64"}  # the check at each B of the run
    assert all(v > 0 for v in unit["power_iteration"].values())
    assert rows["original"]["speed-up vs original (hf_fastif kernels)"] == pytest.approx(1.0)
    assert rows["FastIF"]["seconds"] < rows["original"]["seconds"]  # kNN and B = 1 cut the cost at N = 392,702
    assert all(v > 0 for v in results["throughput"].values())
    assert "At the paper's scale" in (tmp_path / "device_costs.md").read_text()
    assert "Unit costs on cpu" in capsys.readouterr().out
    assert set(unit["hvp_stacked"]) == {"2x4"} and unit["hvp_stacked"]["2x4"] > 0  # B 2, the run's and paper's T 4
    assert rows["FastIF, repetitions stacked"]["seconds"] > 0
    # one first call end to end; on a CPU-only machine its CPU side is a fresh engine there, equal to the bit, and
    # the other stacking is off (the default stacks this model's repetitions on the CPU too: the grouped route):
    # equal up to float rounding
    call = results["end_to_end"]
    assert call["sides"] == {"device": "cpu", "device, other stacking": "cpu, influence_stack_repetitions=no",
                             "cpu": "cpu (a fresh engine)"} and (call["rows"], call["depth"]) == (64, 100)
    assert call["stacked"] == {"device": True, "device, other stacking": False, "cpu": True}
    assert call["spearman"] == pytest.approx(1.0) and call["max_abs_difference_relative"] == 0.0
    other = call["other_stacking_vs_cpu"]
    assert other["spearman"] > 0.9999 and other["max_abs_difference_relative"] < 1e-4
    assert call["top10_helpful_in_common"] == 10 and all(v > 0 for v in call["seconds"].values())
    assert call["phases"]["cpu"]["s_test_s"] > 0
    assert "influence_stack_repetitions=no against the CPU" in (tmp_path / "device_costs.md").read_text()
    assert unit["hvp_stacked_route"] == "grouped"


def test_device_costs_end_to_end_runs_without_the_check_when_it_refuses(monkeypatch):
    """A random BERT-base's Hessian can look indefinite to the convergence check: the end-to-end call then runs
    both sides without it and says so, instead of losing the device run's measurements."""
    own, args = parse_with_defaults((device_costs.DeviceCostsArguments, InfluenceArguments),
                                    device_costs.device_costs_defaults,
                                    ["--quick", "--end_to_end_rows", "8", "--end_to_end_depth", "2"])
    setup = device_costs.build_setup(own, args, "cpu")
    seen = []

    def compute(model, train, test, settings, data_collator):
        seen.append(settings.influence_check_convergence)
        if settings.influence_check_convergence:
            raise device_costs.LissaDivergenceError("The Hessian looks indefinite.\nmore")
        return real(model, train, test, settings, data_collator=data_collator)

    real = device_costs.compute_influences
    monkeypatch.setattr(device_costs, "compute_influences", compute)
    call = device_costs.end_to_end(setup, own, args, "cpu")
    assert seen == [True, False, False, False] and call["check"] == ("off (the check refused: The Hessian looks "
                                                                     "indefinite.)")
    seen.clear()  # the CPU side's check refusing (the device sides' passed) turns it off for every side too
    refusals = iter([False, False, True])

    def compute_cpu_refuses(model, train, test, settings, data_collator):
        seen.append(settings.influence_check_convergence)
        if settings.influence_check_convergence and next(refusals):
            raise device_costs.LissaDivergenceError("The Hessian looks indefinite.")
        return real(model, train, test, settings, data_collator=data_collator)

    monkeypatch.setattr(device_costs, "compute_influences", compute_cpu_refuses)
    call = device_costs.end_to_end(setup, own, args, "cpu")
    assert seen == [True, True, True, False, False, False] and call["check"].startswith("off (the check refused")
    assert call["rows"] == 8 and call["spearman"] == pytest.approx(1.0)
    assert device_costs.end_to_end(setup, replace(own, end_to_end_rows=0), args, "cpu") is None


def test_device_costs_keeps_the_units_when_the_end_to_end_call_fails(tmp_path, monkeypatch):
    """The end-to-end call runs last, after minutes of unit costs on a lent GPU: its failure is raised only after
    the report with everything measured before it is written."""
    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(device_costs, "compute_influences", broken)
    with pytest.raises(RuntimeError, match="same device"):
        device_costs.main(["--quick", "--output_dir", str(tmp_path), "--end_to_end_rows", "8"])
    saved = json.loads((tmp_path / "device_costs.json").read_text())
    assert saved["unit_costs_s"]["hvp"]["1x1"] > 0 and saved["throughput"]
    assert saved["end_to_end"] == {"error": "RuntimeError: Expected all tensors to be on the same device"}
    assert "Failed: RuntimeError: Expected all tensors" in (tmp_path / "device_costs.md").read_text()


def test_device_agreement_runs_every_case_and_a_failing_one_does_not_stop_the_rest(tmp_path, monkeypatch):
    """The GPU-against-CPU script on a CPU-only machine: every case on two fresh engines, equal to the bit; a case
    that raises on one side is reported with its error and the cases after it still run."""
    real = device_agreement.compute_influences

    def compute(model, train, test, settings, combine):
        if settings.influence_solver == "cg":
            raise RuntimeError("Expected all tensors to be on the same device")
        return real(model, train, test, settings, combine=combine)

    monkeypatch.setattr(device_agreement, "compute_influences", compute)
    results = device_agreement.main(["--output_dir", str(tmp_path), "--num_train", "32", "--seq_len", "16",
                                     "--influence_recursion_depth", "4"])
    cases = results["cases"]
    assert list(cases) == list(device_agreement.CASES) and results["sides"] == ["cpu", "cpu (a fresh engine)"]
    assert set(cases["CG"]["errors"]) == {"cpu", "cpu (a fresh engine)"} and "spearman" not in cases["CG"]
    assert "same device" in cases["CG"]["errors"]["cpu"]
    for name, case in cases.items():
        if name != "CG":
            assert not case["errors"] and case["same_pairs"], name
            assert case["max_abs_difference_relative"] == 0.0 and case["spearman"] == pytest.approx(1.0), name
    assert cases["LiSSA, kNN k 16"]["pairs"] == 3 * 16  # the candidates: k per test point, the same on both sides
    # the CPU stacks LiSSA's repetitions by default where the grouped route applies (this BERT's parameters), and
    # not when told not to
    sides = ["cpu", "cpu (a fresh engine)"]
    assert [cases["LiSSA, full scan"]["stacked"][s] for s in sides] == [True, True]
    assert [cases["LiSSA, repetitions one product at a time"]["stacked"][s] for s in sides] == [False, False]
    assert [cases["LiSSA, repetitions stacked on both sides"]["stacked"][s] for s in sides] == [True, True]
    assert cases["CG"]["stacked"] == {} and cases["Arnoldi"]["stacked"] == {s: None for s in sides}
    report = (tmp_path / "device_agreement.md").read_text()
    assert "cpu (a fresh engine) failed: RuntimeError: Expected all tensors" in report and "### CG, cpu" in report
    assert "| LiSSA, repetitions stacked on both sides |" in report and "| yes / yes |" in report
    with pytest.raises(ValueError, match="--num_train must be at least 32"):  # before any work
        device_agreement.main(["--output_dir", str(tmp_path / "small"), "--num_train", "16"])
    assert not (tmp_path / "small").exists()


def test_comparing_tables_over_other_pairs_says_so():
    """Two tables over different (test, train) pairs are not compared value by value."""
    def table(train_ids):
        return SimpleNamespace(to_pandas=lambda: pd.DataFrame(
            {"test_id": [0] * len(train_ids), "train_id": train_ids, "influence": [float(i) for i in train_ids]}))

    assert device_costs.compare(table([0, 1]), table([0, 2])) == {"same_pairs": False}
    assert device_costs.compare(table([0, 1]), table([0, 1, 2])) == {"same_pairs": False}
    assert device_costs.compare(table([1, 0]), table([0, 1]))["max_abs_difference_relative"] == 0.0
    nan = SimpleNamespace(to_pandas=lambda: pd.DataFrame(
        {"test_id": [0, 0, 0], "train_id": [0, 1, 2], "influence": [0.0, float("nan"), 2.0]}))
    compared = device_costs.compare(nan, table([0, 1, 2]))  # a NaN pair is left out, and counted
    assert compared["non_finite"] == 1 and compared["pairs"] == 3 and compared["spearman"] == pytest.approx(1.0)
    assert "1 pairs not finite on a side, left out" in device_costs.agreement_line(compared)
    one = SimpleNamespace(to_pandas=lambda: pd.DataFrame({"test_id": [0], "train_id": [0], "influence": [1.0]}))
    assert "spearman" not in device_costs.compare(one, one)  # too few pairs to rank: said, not a KeyError
    assert device_costs.agreement_line(device_costs.compare(one, one)).startswith("Fewer than 2 pairs finite")
    assert device_costs.agreement_line({"same_pairs": False}) == "The two tables scored different pairs."


def test_device_step_quick_measures_a_step_and_the_4d_mask_on_the_cpu(tmp_path, capsys):
    """The step script on a CPU-only machine: eager steps, a profile, the 4-D mask giving the 2-D mask's products to
    the bit; the CUDA graph part says it needs CUDA. Settings it cannot run are refused before any work."""
    results = device_step.main(["--quick", "--output_dir", str(tmp_path)])
    assert results["device"] == "cpu" and results["readout"] == "bert.encoder.layer.1.attention.output (inputs)"
    assert set(results["eager_ms"]) == {"collate a row with its trunk states", "hvp B 1, cut", "hvp B 1, no cut",
                                        "hvp B 1, whole model", "hvp B 8, cut"}
    assert all(v > 0 for v in results["eager_ms"].values())
    assert results["four_d_mask_difference"] == {"B 1, cut": 0.0, "B 1, no cut": 0.0, "B 1, whole model": 0.0,
                                                 "B 8, cut": 0.0}
    profiled = results["profile"]
    assert profiled["kernels_per_step"] is None and profiled["wall_ms_per_step_profiled"] > 0
    assert len(profiled["top_host_operators"]) == device_step.TOP_OPERATORS
    assert results["captured"] is None and "needs a CUDA device" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--num_train must be at least 8"):
        device_step.main(["--quick", "--output_dir", str(tmp_path / "small"), "--num_train", "4"])
    assert not (tmp_path / "small").exists()
