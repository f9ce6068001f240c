"""The four recipes end to end: the embedded default in --quick mode (the tiny model) with tiny flags, the MiniLM
default once with tiny sizes, and the paper's path on local files and tiny saved checkpoints (no Hub)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.testing_utils import CaptureLogger

from hf_fastif import InfluenceTable

from .conftest import TINY_FLAGS, load_recipe

PAPER_FAST = ["--influence_knn_k", "20", "--influence_recursion_depth", "5", "--influence_damping", "0.1",
              "--influence_scale", "50", "--influence_repetitions", "1", "--influence_batch_size", "4"]


def _outputs(directory: Path, name: str) -> dict:
    for suffix in ("json", "md", "png"):
        path = directory / f"{name}.{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert (directory / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((directory / f"{name}.json").read_text())


def test_hans_correction_recipe_embedded(tmp_path, capsys):
    main = load_recipe("hans_correction").main
    main(["--quick", "--output_dir", str(tmp_path), *TINY_FLAGS, "--heuristics", "lexical_overlap",
          "--strategies", "helpful", "random"])
    results = _outputs(tmp_path, "hans_correction")
    assert results["setup"]["setup"] == "embedded" and results["setup"]["num_train"] == 200
    assert results["setup"]["embedded_model"] == "tiny"  # --quick keeps the from-config model
    assert [r["strategy"] for r in results["runs"]] == ["helpful", "random"]
    assert all(len(r["steps"]) == 2 for r in results["runs"])
    changed = {row[0]: row for row in results["changes_from_paper"]}
    assert changed["correction_learning_rate"][1:3] == ["0.0001", "0.01"] and "λ = damping × scale" in changed
    assert "1e-4 does not move it" in changed["correction_learning_rate"][3]  # the embedded default's reason
    assert changed["num_steps"][3] == "--quick or the command line"
    assert "influence_weight_decay_in_gradients" not in changed  # no L2 term here: where it goes means nothing
    printed = capsys.readouterr().out
    assert "### HANS error correction" in printed and "| lexical_overlap |" in printed
    assert "Settings the embedded default changes from the paper" in printed


def test_hans_correction_recipe_on_the_minilm_default(tmp_path, capsys):
    """The default model (no --quick): MiniLM fine-tuned on 200 generated rows (cached by content), one step."""
    main = load_recipe("hans_correction").main
    results = main(["--output_dir", str(tmp_path), "--max_train_samples", "200", "--num_steps", "1", "--replicas",
                    "1", "--influence_knn_k", "50", "--influence_recursion_depth", "5", "--heuristics",
                    "lexical_overlap", "--strategies", "helpful", "random"])
    setup = results["setup"]
    assert setup["embedded_model"] == "minilm" and setup["num_parameters"] == 22_713_986
    assert setup["num_influence_parameters"] == 148_610 and setup["fine_tuning"]["cached"] is False
    assert [r["strategy"] for r in results["runs"]] == ["helpful", "random"]
    assert len(results["runs"][0]["steps"][0]["influence"]) == 10  # 10 of the 50 candidates, scored
    # the model's report: training accuracy from fine-tuning, HANS accuracy per heuristic and per subcase
    report = results["model_report"]
    assert 0 <= report["train_accuracy"] <= 1 and report["hans_rows"] == 1200 and len(report["subcases"]) == 30
    assert {"accuracy_lexical_overlap_entailment", "accuracy_constituent_non_entailment"} <= set(report["hans"])
    printed = capsys.readouterr().out
    assert "### The model" in printed and "| ln_subject/object_swap | lexical_overlap | non_entailment | 40 |" in printed
    assert "all-MiniLM-L6-v2" in printed  # the settings table names the model


def test_augmentation_recipe_embedded(tmp_path):
    main = load_recipe("augmentation").main
    main(["--quick", "--output_dir", str(tmp_path), *TINY_FLAGS, "--heuristics", "constituent", "--strategies",
          "helpful", "--num_steps", "1", "--influence_solver", "cg", "--influence_knn_features", "gradient",
          "--influence_projection_dim", "64", "--max_pool_samples", "60"])
    results = _outputs(tmp_path, "augmentation")
    assert results["pool"] == "generated HANS-style pool" and results["settings"]["candidates"] == "pool"
    assert max(results["runs"][0]["steps"][0]["selected"]) < results["num_pool"] == 60
    # the subset's rows in the whole pool, which the steps' ids (positions in the subset) could not be traced to
    rows = results["pool_rows"]
    assert len(rows) == 60 and rows == sorted(set(rows)) and max(rows) >= 60
    # the solver and candidates are compared with FastIF's (neither was listed), LiSSA's own settings no longer
    changed = {row[0]: row for row in results["changes_from_paper"]}
    assert changed["influence_solver"][1:4] == ["lissa", "cg", "--quick or the command line"]
    assert changed["influence_knn_features"][1:3] == ["auto", "gradient"]
    assert not {"influence_recursion_depth", "influence_repetitions", "influence_batch_size"} & set(changed)


def test_simulatability_recipe_embedded(tmp_path):
    main = load_recipe("simulatability").main
    main(["--quick", "--output_dir", str(tmp_path), *TINY_FLAGS, "--num_points", "2", "--num_correct", "1",
          "--num_incorrect", "1"])
    results = _outputs(tmp_path, "simulatability")
    assert len(results["points"]) == 2 and results["learning_rates"] == [0.01, 0.1, 1.0]
    assert {"helpful", "harmful"} <= set(results["points"][0]["losses"])


def test_visualize_recipe_embedded(tmp_path):
    main = load_recipe("visualize").main
    main(["--quick", "--output_dir", str(tmp_path), *TINY_FLAGS, "--test_points_per_heuristic", "2",
          "--edges_per_test_point", "2"])
    results = _outputs(tmp_path, "visualize")
    assert results["settings"]["num_test_points"] == 6 and results["graph"]["edges"]
    assert (tmp_path / "influence_table" / "influence_metadata.json").is_file()
    k = results["settings"]["influence"]["influence_knn_k"]  # it said "(k kNN candidates each)", literally
    assert f"2 most helpful and most harmful training rows of each test point (of {k:,} candidates each, kNN on the " \
           "model's own features (auto: the pooled [CLS] output" in (tmp_path / "visualize.md").read_text()


def test_paper_path_loads_a_finetuned_checkpoint(tmp_path, files):
    main = load_recipe("hans_correction").main
    results = main(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"], "--train_dataset",
                    files["mnli"], "--hans_file", files["hans"], "--num_steps", "1", "--replicas", "1",
                    "--heuristics", "subsequence", "--strategies", "helpful", "anchors", *PAPER_FAST])
    assert results["setup"]["setup"] == "paper" and results["setup"]["trained_here"] is False
    assert results["setup"]["num_train"] == 120 and results["settings"]["correction_learning_rate"] == 1e-4
    assert results["settings"]["influence"]["influence_weight_decay"] == 0.005  # the reference code's L2 term,
    assert results["settings"]["influence"]["influence_weight_decay_in_gradients"] is True  # in every loss as there
    assert results["changes_from_paper"] and all(row[3] == "" for row in results["changes_from_paper"])  # no reasons
    assert not (tmp_path / "model" / "config.json").exists()
    # measured although the model was given (it was "not measured" unless the tiny model was trained here)
    report = results["model_report"]
    assert report["train_accuracy"] is not None and report["train_accuracy_rows"] == 120
    assert not report["train_accuracy_sampled"]
    _outputs(tmp_path, "hans_correction")
    assert "on all 120 training rows" in (tmp_path / "hans_correction.md").read_text()


def test_paper_path_fine_tunes_a_base_model(tmp_path, files):
    main = load_recipe("visualize").main
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        results = main(["--output_dir", str(tmp_path), "--model_name_or_path", files["base"], "--train_dataset",
                        files["mnli"], "--hans_file", files["hans"], "--num_train_epochs", "1",
                        "--max_train_samples", "40", "--test_points_per_heuristic", "1", "--edges_per_test_point",
                        "2", *PAPER_FAST])
    assert results["setup"]["trained_here"] is True
    assert (tmp_path / "model" / "config.json").is_file()  # saved for the next run
    # the recipes pin the Trainer's memory only where an accelerator uses it (torch warned at every training run)
    if not torch.accelerator.is_available():
        assert not [w for w in seen if "pin_memory" in str(w.message)]


def test_paper_path_augmentation_three_labels_with_nli_pool(tmp_path, files):
    """The paper's ANLI experiment: a 3-label model corrected on 2-label HANS anchors with an NLI pool."""
    main = load_recipe("augmentation").main
    results = main(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt3"], "--num_labels", "3",
                    "--train_dataset", files["mnli"], "--hans_file", files["hans"], "--pool", files["mnli"],
                    "--num_steps", "1", "--replicas", "1", "--heuristics", "lexical_overlap", "--strategies",
                    "helpful", "anchors", *PAPER_FAST])
    assert results["pool"].startswith("pool ") and results["runs"][0]["steps"][0]["influence"]


def test_paper_path_augmentation_hans_train_pool(tmp_path, files):
    main = load_recipe("augmentation").main
    results = main(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"], "--train_dataset",
                    files["mnli"], "--hans_file", files["hans"], "--pool", files["hans_train"], "--num_steps", "1",
                    "--replicas", "1", "--heuristics", "constituent", "--strategies", "random", *PAPER_FAST])
    assert results["num_pool"] == 120


@pytest.mark.parametrize("simulator", ["copy", "ckpt2"])
def test_paper_path_simulatability(tmp_path, files, simulator):
    main = load_recipe("simulatability").main
    results = main(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"], "--train_dataset",
                    files["mnli"], "--hans_file", files["hans"], "--simulator", files.get(simulator, simulator),
                    "--num_correct", "1", "--num_incorrect", "1", "--num_points", "2", "--learning_rates", "0.1", "1",
                    *PAPER_FAST])
    assert results["learning_rates"] == [0.1, 1.0] and len(results["points"]) >= 1


def test_visualize_edges_above_the_candidates_fail_before_any_training(tmp_path, monkeypatch):
    """More edges per test point than the candidates each scores was refused only after the model was built (with
    --model_name_or_path, after its whole fine-tuning)."""
    import importlib

    def no_model(*_, **__):
        raise AssertionError("the recipe got as far as building the model")

    monkeypatch.setattr(importlib.import_module("hf_fastif.applications.prepare"), "embedded_model", no_model)
    with pytest.raises(ValueError, match=r"edges_per_test_point=500 exceeds the 30 candidate rows each test point "
                                         r"scores \(influence_knn_k=30"):
        load_recipe("visualize").main(["--quick", "--output_dir", str(tmp_path), *TINY_FLAGS,
                                       "--edges_per_test_point", "500"])


def test_augmentation_flags_that_cannot_work_fail_before_any_training(tmp_path, files, monkeypatch):
    """The generated pool with one's own training data, and a misspelt heuristic, failed after the fine-tuning."""
    recipe = load_recipe("augmentation")

    def no_training(*_, **__):
        raise AssertionError("the recipe got as far as preparing the model")

    monkeypatch.setattr(recipe, "prepare", no_training)
    main = recipe.main
    common = ["--output_dir", str(tmp_path), "--model_name_or_path", files["base"], "--train_dataset", files["mnli"],
              "--hans_file", files["hans"]]
    with pytest.raises(ValueError, match="--pool generated needs the generated data"):
        main(common)
    with pytest.raises(ValueError, match="did you mean 'lexical_overlap'"):
        main([*common, "--pool", files["hans_train"], "--heuristics", "lexical-overlap"])
    monkeypatch.undo()  # the real preparation, which splits HANS before it trains anything
    trained = []
    import importlib

    module = importlib.import_module("hf_fastif.applications.prepare")  # the package exports a function of that name
    monkeypatch.setattr(module, "_train", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"validation_fraction=0\.99 leaves the test split empty"):
        main([*common, "--pool", files["hans_train"], "--validation_fraction", "0.99"])
    assert trained == []


def test_quickstart_explains_each_test_point_once():
    """--num_test above the mistakes explained the same pairs again (5,000 s_tests, nearly all repeats); 0 failed
    after training, deep in the engine."""
    quickstart = load_recipe("quickstart")
    wrong = np.array([3, 8, 9, 20])
    assert quickstart.test_points(wrong, 2, 30).tolist() == [3, 20]
    assert quickstart.test_points(wrong, 50, 30).tolist() == [3, 8, 9, 20]
    assert quickstart.test_points(np.array([], dtype=int), 3, 5).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="--num_test must be at least 1"):
        quickstart.QuickstartArguments(num_test=0)


def test_quickstart_main_process_alone_prints(tmp_path, capsys, monkeypatch):
    """Under `accelerate launch` every process ran the whole quickstart and printed it all (twice on 2 processes);
    now every process computes and saves the table, the main one alone prints."""
    quickstart = load_recipe("quickstart")
    flags = ["--embedded_model", "tiny", "--num_test", "1", "--top", "2", "--influence_knn_k", "30",
             "--influence_recursion_depth", "5", "--num_train_epochs", "1"]
    quickstart.main([*flags, "--output_dir", str(tmp_path / "main")])
    printed = capsys.readouterr().out
    assert "HANS-style accuracy" in printed and printed.count("### test ") == 1 and "most harmful" in printed
    monkeypatch.setattr(quickstart, "is_main_process", lambda: False)
    quickstart.main([*flags, "--output_dir", str(tmp_path / "other")])
    # what is left is the Trainer's own summary, which transformers prints from the main process only
    assert [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{'train_runtime'")] == []
    main, other = (InfluenceTable.load(tmp_path / name / "influence_table") for name in ("main", "other"))
    assert len(main.to_pandas()) == 30 and np.allclose(main.to_pandas()["influence"], other.to_pandas()["influence"])


def _fail_on_call(monkeypatch, owner, name: str, failing_call: int, error: type = ValueError):
    """``owner.name`` raising ``error`` on its ``failing_call``-th call (1-based), as it was otherwise."""
    original, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise error("a late failure (a test)")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def test_a_late_failure_writes_the_finished_runs_and_raises(tmp_path, monkeypatch):
    """A LiSSA refusal at run 46 of 120 of the correction lost the 45 finished runs: nothing was written (a
    review's repro). The finished runs' report is written, marked incomplete with where and why, and the error
    raised as it was; simulatability keeps its finished test points the same way."""
    from hf_fastif.applications import correction, simulatability

    _fail_on_call(monkeypatch, correction._Corrector, "run", 2)
    main = load_recipe("hans_correction").main
    with pytest.raises(ValueError, match="a late failure"):
        main(["--quick", "--output_dir", str(tmp_path / "c"), *TINY_FLAGS, "--heuristics", "lexical_overlap",
              "--strategies", "helpful", "random"])
    results = _outputs(tmp_path / "c", "hans_correction")
    assert [r["strategy"] for r in results["runs"]] == ["helpful"]
    assert results["stopped"].startswith("stopped at lexical_overlap / random / replica 0 by ValueError: a late ")
    assert "(1 of 2 runs finished" in results["stopped"]
    assert (tmp_path / "c" / "hans_correction.md").read_text().startswith("**Incomplete: stopped at lexical_overlap")

    _fail_on_call(monkeypatch, simulatability._SimulatorSteps, "losses", 5)  # 4 groups a point: the second point
    main = load_recipe("simulatability").main
    with pytest.raises(ValueError, match="a late failure"):
        main(["--quick", "--output_dir", str(tmp_path / "s"), *TINY_FLAGS, "--num_points", "2", "--num_correct",
              "1", "--num_incorrect", "1"])
    results = _outputs(tmp_path / "s", "simulatability")
    assert len(results["points"]) == 1 and "(1 of 2 test points finished" in results["stopped"]

    # an interrupt (Ctrl-C: how a long run is mostly stopped) keeps them too; a partial report whose cells hold other
    # replica counts says so (a cell of 1 read "± 0.0" over "2 replicas")
    _fail_on_call(monkeypatch, correction._Corrector, "run", 4, KeyboardInterrupt)
    main = load_recipe("hans_correction").main
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--output_dir", str(tmp_path / "k"), *TINY_FLAGS, "--heuristics", "lexical_overlap",
              "--strategies", "helpful", "random", "--replicas", "2"])
    results = _outputs(tmp_path / "k", "hans_correction")
    assert [(r["strategy"], r["replica"]) for r in results["runs"]] == [("helpful", 0), ("random", 0), ("helpful", 1)]
    assert "by KeyboardInterrupt: a late failure" in results["stopped"]
    assert "1 to 2 replicas, by cell" in (tmp_path / "k" / "hans_correction.md").read_text()

    # a report that cannot be written is logged; the error that stopped the protocol is what is raised
    from hf_fastif.applications import report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (a test)")

    _fail_on_call(monkeypatch, correction._Corrector, "run", 2)
    monkeypatch.setattr(report, "write_report", full_disk)
    with pytest.raises(ValueError, match="a late failure"), CaptureLogger(report.logger) as captured:
        main(["--quick", "--output_dir", str(tmp_path / "w"), *TINY_FLAGS, "--heuristics", "lexical_overlap",
              "--strategies", "helpful", "random"])
    assert "could not be written (OSError: [Errno 28] No space left on device (a test))" in captured.out
    monkeypatch.undo()

    _fail_on_call(monkeypatch, correction._Corrector, "run", 1)  # nothing finished: nothing written
    main = load_recipe("hans_correction").main
    with pytest.raises(ValueError, match="a late failure"):
        main(["--quick", "--output_dir", str(tmp_path / "n"), *TINY_FLAGS, "--heuristics", "lexical_overlap",
              "--strategies", "helpful"])
    assert not (tmp_path / "n" / "hans_correction.json").exists()
