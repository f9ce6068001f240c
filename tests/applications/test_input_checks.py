"""Input the applications must refuse (or warn about) before any influence is computed or any model trained: rows
shared between the HANS splits and the training data, heuristic names, label orders, empty protocols."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset, Value, concatenate_datasets
from transformers import BertForSequenceClassification
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_fastif.applications import (
    CorrectionArguments,
    SimulatabilityArguments,
    VisualizationArguments,
    common,
    correction,
    run_augmentation,
    run_correction,
    run_simulatability,
    run_visualization,
    simulatability,
    visualize,
)
from hf_fastif.applications.augmentation import _refuse_held_out_pairs
from hf_fastif.applications.common import check_heuristics, model_report, model_report_markdown, shared_rows
from hf_fastif.data import split_hans

from .conftest import tiny_config

MODEL_COLUMNS = ["input_ids", "token_type_ids", "attention_mask", "labels"]
ONE_STEP = dict(strategies=["random"], heuristics=["constituent"], num_steps=1, num_anchors=3, num_points=2,
                correction_learning_rate=0.1, replicas=1)


@pytest.fixture
def no_influence(monkeypatch):
    """Fail loudly if any application builds an engine: bad input must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("influence work started before the bad input was refused")

    for module in (correction, simulatability, visualize):
        monkeypatch.setattr(module, "InfluenceEngine", refuse)


def _spaced(dataset):
    """The rows with an extra space in the premise and without token ids: the same pairs, spelt differently."""
    return dataset.remove_columns(["input_ids", "token_type_ids", "attention_mask"]).map(
        lambda row: {"premise": "  " + row["premise"].replace(" ", "  ")})


# ------------------------------------------------------------------------------------------ rows shared between splits
def test_shared_rows_compares_token_ids_then_text(nli):
    test = nli["test"]
    by_ids = shared_rows(concatenate_datasets([nli["train"].select(range(5)).select_columns(MODEL_COLUMNS),
                                               test.select([3, 7]).select_columns(MODEL_COLUMNS)]), test)
    assert by_ids.by == "input_ids" and by_ids.rows.tolist() == [5, 6] and "token ids" in by_ids.example
    by_text = shared_rows(_spaced(test.select([4, 9])), test)
    assert by_text.by == "premise / hypothesis" and by_text.rows.tolist() == [0, 1]
    assert repr(test[4]["hypothesis"]) in by_text.example
    assert len(shared_rows(nli["train"], test).rows) == 0
    assert shared_rows(test.select_columns(["labels"]), test) is None  # nothing to compare


def test_run_correction_refuses_test_rows_among_anchors_training_rows_or_candidates(trained, nli, data, args,
                                                                                     no_influence):
    """Anchors drawn from the evaluation rows, or steps on them, gave +23 points of fake gain, silently."""
    protocol = CorrectionArguments(**ONE_STEP)
    with pytest.raises(ValueError, match=r"data.hans_validation holds 90 rows of data.hans_test \(the same "
                                         r"input_ids; e.g. row 0: .*split_hans"):
        run_correction(trained, dataclasses.replace(data, hans_test=nli["validation"]), args, protocol)
    columns = [c for c in nli["train"].column_names if c in nli["test"].column_names]
    leaky = concatenate_datasets([nli["train"].select_columns(columns), nli["test"].select_columns(columns)])
    with pytest.raises(ValueError, match=r"data.train holds 90 rows of data.hans_test .*Drop the HANS test rows"):
        run_correction(trained, dataclasses.replace(data, train=leaky), args, protocol)
    with pytest.raises(ValueError, match=r"data.candidates holds 1 row of data.hans_test"):
        pool = concatenate_datasets([nli["pool"].select_columns(MODEL_COLUMNS),
                                     nli["test"].select([0]).select_columns(MODEL_COLUMNS)])
        run_correction(trained, dataclasses.replace(data, candidates=pool), args, protocol)
    with pytest.raises(ValueError, match=r"holds 90 rows of data.hans_test \(the same premise / hypothesis"):
        run_correction(trained, dataclasses.replace(data, hans_validation=_spaced(nli["test"])), args, protocol)


def test_uncomparable_splits_draw_a_warning(trained, nli, data, args):
    hidden = nli["train"].remove_columns(["premise", "hypothesis"])
    hans = data.hans_test.remove_columns(["input_ids"])
    logger = logging.get_logger("hf_fastif.applications.common")
    with CaptureLogger(logger) as captured:
        correction.refuse_test_rows(dataclasses.replace(data, train=hidden, hans_test=hans))
    assert "Cannot check whether data.train holds rows of data.hans_test" in captured.out


def _pairs(rows):
    return {(" ".join(p.split()), " ".join(h.split())) for p, h in zip(rows["premise"], rows["hypothesis"])}


def test_split_hans_keeps_identical_pairs_on_one_side(nli):
    """The real HANS evaluation set may repeat a pair: the recipes' split must never trip the refusal by itself."""
    hans = nli["raw"]["hans"]
    repeats = hans.select(range(0, len(hans), 3)).map(lambda row: {"premise": row["premise"] + " "})
    doubled = concatenate_datasets([hans, repeats, repeats])
    rng, subcases, plain = np.random.default_rng(0), np.asarray(hans["subcase"]), []
    for subcase in sorted(set(subcases.tolist())):  # the plain stratified split, as before the grouping
        rows = rng.permutation(np.flatnonzero(subcases == subcase))
        plain.extend(rows[: int(round(len(rows) * 0.5))].tolist())
    for seed in (0, 1, 2):
        split = split_hans(doubled, 0.5, seed=seed)
        assert split_hans(doubled, 0.5, seed=seed)["validation"]["pair_id"] == split["validation"]["pair_id"]
        assert not _pairs(split["validation"]) & _pairs(split["test"])
        for subcase in set(hans["subcase"]):  # still stratified: every subcase on both sides
            assert subcase in split["validation"]["subcase"] and subcase in split["test"]["subcase"]
    assert split_hans(hans, 0.5, seed=0)["validation"]["pair_id"] == hans.select(sorted(plain))["pair_id"]
    tokenized = split_hans(concatenate_datasets([nli["validation"], nli["test"], nli["test"].select(range(30))]))
    assert not _pairs(tokenized["validation"]) & _pairs(tokenized["test"])


def test_augmentation_compares_pools_by_token_ids_and_refuses_when_it_cannot(trained, nli, data, args,
                                                                             no_influence):
    protocol = CorrectionArguments(**ONE_STEP)
    reduced = nli["test"].select_columns(MODEL_COLUMNS)  # no text columns: the check used to do nothing
    with pytest.raises(ValueError, match=r"The pool \(data.candidates\) holds 90 rows of data.hans_test \(the same "
                                         "input_ids"):
        run_augmentation(trained, dataclasses.replace(data, candidates=reduced), args, protocol)
    with pytest.raises(ValueError, match=r"holds 90 rows of data.hans_test \(the same premise / hypothesis"):
        _refuse_held_out_pairs(dataclasses.replace(data, candidates=_spaced(nli["test"])))
    text_only = data.hans_validation.remove_columns(["input_ids"])
    with pytest.raises(ValueError, match="Cannot check whether The pool .* keep those columns"):
        run_augmentation(trained, dataclasses.replace(data, candidates=reduced.select(range(3)),
                                                      hans_validation=text_only), args, protocol)


def test_augmentation_warns_when_the_unseen_pool_holds_training_rows(nli, data):
    columns = [c for c in nli["pool"].column_names if c in nli["train"].column_names]
    pool = concatenate_datasets([nli["pool"].select_columns(columns),
                                 nli["train"].select(range(4)).select_columns(columns)])
    logger = logging.get_logger("hf_fastif.applications.augmentation")
    with CaptureLogger(logger) as captured:
        _refuse_held_out_pairs(dataclasses.replace(data, candidates=pool))
    assert "4 training rows are also rows of the pool" in captured.out
    with CaptureLogger(logger) as captured:
        _refuse_held_out_pairs(dataclasses.replace(data, candidates=nli["pool"]))
    assert captured.out == ""


# ------------------------------------------------------------------------------------------------------ heuristic names
@pytest.mark.parametrize("name, meant", [("lexical", "lexical_overlap"), ("overlap", "lexical_overlap"),
                                         ("subseq", "subsequence"), ("lexical-overlap", "lexical_overlap"),
                                         ("constituents", "constituent")])
@pytest.mark.parametrize("arguments", [CorrectionArguments, VisualizationArguments])
def test_a_near_miss_heuristic_is_refused_when_the_arguments_are_made(arguments, name, meant):
    with pytest.raises(ValueError, match=f"Unknown heuristic '{name}': did you mean '{meant}'"):
        arguments(heuristics=[name])


def test_heuristic_names_are_mapped_deduplicated_and_not_empty():
    assert CorrectionArguments(heuristics=["Lexical_Overlap"]).heuristics == ["lexical_overlap"]
    assert VisualizationArguments(heuristics=["SUBSEQUENCE"]).heuristics == ["subsequence"]
    assert check_heuristics(["my_own_heuristic", "negation"]) == ["my_own_heuristic", "negation"]  # custom data
    assert check_heuristics(None) is None
    with CaptureLogger(logging.get_logger("hf_fastif.applications.common")) as captured:
        protocol = CorrectionArguments(heuristics=["constituent", "Constituent", "subsequence"])
    assert protocol.heuristics == ["constituent", "subsequence"]  # repeats used to count as extra replicas
    assert "more than once" in captured.out
    for arguments in (CorrectionArguments, VisualizationArguments):
        with pytest.raises(ValueError, match="empty list; omit it"):
            arguments(heuristics=[])


def test_a_heuristic_missing_from_a_split_is_refused_before_any_work(trained, nli, data, args, no_influence):
    """It failed after the first heuristic's runs were done (a ValueError, or a bare KeyError)."""
    test = nli["test"].filter(lambda row: row["heuristic"] != "subsequence")
    for every in (True, False):
        with pytest.raises(ValueError, match=r"\['subsequence'\] have no rows in data.hans_test"):
            run_correction(trained, dataclasses.replace(data, hans_test=test), args,
                           CorrectionArguments(strategies=["helpful"], eval_every_step=every))
    with pytest.raises(ValueError, match="data.hans_validation has no rows"):
        run_correction(trained, dataclasses.replace(data, hans_validation=nli["validation"].select([])), args,
                       CorrectionArguments())
    visualization = VisualizationArguments(heuristics=["subsequence"], test_points_per_heuristic=2)
    with pytest.raises(ValueError, match=r"\['subsequence'\] have no rows in data.hans_test"):
        run_visualization(trained, dataclasses.replace(data, hans_test=test), args, visualization)
    with pytest.raises(ValueError, match="data.hans_test has no rows"):
        run_visualization(trained, dataclasses.replace(data, hans_test=nli["test"].select([])), args,
                          VisualizationArguments())


# ------------------------------------------------------------------------------------------------------------ labels
@pytest.fixture(scope="module")
def reversed_model(trained):
    model = copy.deepcopy(trained)
    model.config.id2label = {0: "non_entailment", 1: "entailment"}
    model.config.label2id = {"non_entailment": 0, "entailment": 1}
    return model


@pytest.fixture(scope="module")
def three_labels(nli):
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(nli["tokenizer"], 3)).eval()


def test_label_orders_and_counts_that_would_misread_the_data_are_refused(reversed_model, three_labels, data, args,
                                                                         no_influence):
    order = "would be read as the wrong classes"
    with pytest.raises(ValueError, match=order):
        run_correction(reversed_model, data, args, CorrectionArguments(**ONE_STEP))
    for model, message in ((reversed_model, order), (three_labels, "needs a model with 2 labels")):
        with pytest.raises(ValueError, match=message):
            run_visualization(model, data, args, VisualizationArguments(test_points_per_heuristic=2))
    simulation = SimulatabilityArguments(num_correct=1, num_incorrect=1, num_points=2, learning_rates=[0.1])
    with pytest.raises(ValueError, match=order):
        run_simulatability(reversed_model, reversed_model, data, args, simulation)
    with pytest.raises(ValueError, match=r"data.train has labels \['entailment', 'non_entailment'\], but the task "
                                         "model has 3"):
        run_simulatability(three_labels, three_labels, data, args, simulation)


def test_a_three_label_model_is_corrected_with_the_two_label_loss(three_labels, data, args, monkeypatch):
    """Its anchors (HANS label 1 = non_entailment) were trained as 'neutral' by the default 3-way loss."""
    seen = []

    def spy(*a, measurement_fn=None, **k):
        seen.append(measurement_fn)
        return 0.0

    monkeypatch.setattr(correction, "sgd_step", spy)
    protocol = CorrectionArguments(**(ONE_STEP | {"strategies": ["anchors"]}))
    result = run_correction(three_labels, data, args, protocol, progress=False)
    assert seen == [common.two_label_loss] and len(result.runs) == 1


# --------------------------------------------------------------------------------------------------- simulatability
def test_simulatability_needs_a_test_point():
    with pytest.raises(ValueError, match="both 0: there would be no test point"):
        SimulatabilityArguments(num_correct=0, num_incorrect=0)
    assert SimulatabilityArguments(num_correct=0, num_incorrect=1).num_incorrect == 1


@pytest.mark.parametrize("row_labels", ["prediction", "gold"])
def test_random_groups_are_drawn_by_the_label_they_are_stepped_with(trained, data, args, row_labels):
    """With predictions as step labels, rows of random_entailment were stepped as non_entailment (drawn by gold)."""
    protocol = SimulatabilityArguments(num_correct=1, num_incorrect=1, num_points=10, learning_rates=[0.1],
                                       row_labels=row_labels, simulator="copy")
    result = run_simulatability(trained, trained, data, args, protocol, progress=False)
    gold = np.asarray(data.train["labels"])
    step = gold if row_labels == "gold" else common.predict(trained, data.train, data.collator).argmax(-1)
    names = {v: k for k, v in trained.config.id2label.items()}
    randoms = [g for g in result.groups if g.startswith("random_")]
    assert sorted(randoms) == ["random_entailment", "random_non_entailment"]
    for point in result.points:
        for group in randoms:
            assert set(step[point["rows"][group]].tolist()) == {names[group.removeprefix("random_")]}


# ------------------------------------------------------------------------------------------------------ model report
def test_the_subcase_table_shows_the_heuristic_tables_decimal():
    """Subcases were rounded to whole percents with Python's half-to-even rounding: 2.5 showed as 2, 52.5 as 52 and
    97.5 as 98, next to heuristics with one decimal."""
    report = {"hans": {"accuracy": 0.5}, "heuristics": [], "hans_rows": 120,
              "subcases": {f"sub_{i}": {"heuristic": "lexical_overlap", "label": 0, "rows": 40, "accuracy": a}
                           for i, a in enumerate((0.025, 0.525, 0.975))}}
    cells = [line.split("|")[-2].strip() for line in model_report_markdown(report).splitlines()
             if line.startswith("| sub_")]
    assert cells == ["2.5", "52.5", "97.5"]


def test_model_report_measures_training_accuracy_on_a_seeded_sample(trained, nli):
    report = model_report(trained, nli["test"], nli["collator"], train=nli["train"], max_train_rows=100, seed=3)
    assert report["train_accuracy_rows"] == 100 and report["train_accuracy_sampled"] is True
    again = model_report(trained, nli["test"], nli["collator"], train=nli["train"], max_train_rows=100, seed=3)
    assert again["train_accuracy"] == report["train_accuracy"] is not None
    assert "on 100 sampled training rows" in model_report_markdown(report)
    whole = model_report(trained, nli["test"], nli["collator"], train=nli["train"])
    assert whole["train_accuracy_rows"] == 300 and "on all 300 training rows" in model_report_markdown(whole)
    recorded = model_report(trained, nli["test"], nli["collator"], train=nli["train"], train_accuracy=0.9)
    assert recorded["train_accuracy_rows"] is None and "recorded when the model was fine-tuned" in \
        model_report_markdown(recorded)
    # a 3-label model's training accuracy is over its own labels (neutral and contradiction were merged: an
    # always-neutral classifier's 1/3 read 2/3)
    config = copy.deepcopy(trained.config)
    config.num_labels, config.id2label, config.label2id = 3, {0: "e", 1: "n", 2: "c"}, {"e": 0, "n": 1, "c": 2}
    neutral = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        neutral.classifier.weight.zero_()
        neutral.classifier.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    three = nli["train"].cast_column("labels", Value("int64")).map(lambda r, i: {"labels": i % 3}, with_indices=True)
    assert model_report(neutral, nli["test"], nli["collator"], train=three)["train_accuracy"] == pytest.approx(1 / 3)


def test_generated_data_has_no_repeats_to_refuse():
    """The refusals must not fire on the embedded default's own data."""
    from hf_fastif.data import generate_nli

    raw = generate_nli(seed=0, n_train=300, n_hans_per_subcase=6, n_pool_per_subcase=4)
    split = split_hans(raw["hans"], 0.5, seed=0)
    for rows in (split["validation"], raw["train"], raw["pool"]):
        assert len(shared_rows(rows, split["test"]).rows) == 0
    assert isinstance(raw["hans"], Dataset)
