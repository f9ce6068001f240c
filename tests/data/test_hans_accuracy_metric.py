"""The hans_accuracy evaluate metric, loaded offline by path."""

from pathlib import Path

import evaluate
import pytest

import hf_fastif.metrics
from hf_fastif.metrics import HANS_ACCURACY_PATH, load_hans_accuracy

METRIC_DIR = Path(hf_fastif.metrics.__file__).parent / "hans_accuracy"

# lexical_overlap: entailment 2/2 right, non_entailment 1/3 right; subsequence: non_entailment 0/1 right;
# constituent: entailment 1/2 right (no non_entailment rows)
HEURISTICS = ["lexical_overlap"] * 5 + ["subsequence"] + ["constituent"] * 2
REFERENCES = [0, 0, 1, 1, 1, 1, 0, 0]
PREDICTIONS = [0, 0, 1, 0, 0, 0, 0, 1]
EXPECTED = {
    "accuracy": 4 / 8,
    "accuracy_lexical_overlap": 3 / 5,
    "accuracy_lexical_overlap_entailment": 1.0,
    "accuracy_lexical_overlap_non_entailment": 1 / 3,
    "accuracy_subsequence": 0.0,
    "accuracy_subsequence_non_entailment": 0.0,
    "accuracy_constituent": 0.5,
    "accuracy_constituent_entailment": 0.5,
}


@pytest.mark.parametrize("path", [METRIC_DIR, METRIC_DIR / "hans_accuracy.py"], ids=["folder", "script"])
def test_loaded_by_path_computes_per_heuristic_accuracy(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(path.resolve()), cache_dir=str(tmp_path), keep_in_memory=True)
    results = metric.compute(predictions=PREDICTIONS, references=REFERENCES, heuristics=HEURISTICS)
    assert results == pytest.approx(EXPECTED)
    assert set(results) == set(EXPECTED)


def test_helper_and_batches(tmp_path):
    assert Path(HANS_ACCURACY_PATH) == METRIC_DIR.resolve()
    metric = load_hans_accuracy(cache_dir=str(tmp_path), keep_in_memory=True)
    metric.add_batch(predictions=PREDICTIONS[:3], references=REFERENCES[:3], heuristics=HEURISTICS[:3])
    metric.add_batch(predictions=PREDICTIONS[3:], references=REFERENCES[3:], heuristics=HEURISTICS[3:])
    assert metric.compute() == pytest.approx(EXPECTED)


def test_three_label_predictions_need_binarize(tmp_path):
    metric = load_hans_accuracy(cache_dir=str(tmp_path), keep_in_memory=True)
    predictions = [0, 2, 1, 2]  # 3-label model: neutral / contradiction count as non_entailment
    references = [0, 1, 1, 0]
    heuristics = ["constituent"] * 4
    with pytest.raises(ValueError, match="binarize=True"):
        metric.compute(predictions=predictions, references=references, heuristics=heuristics)
    results = metric.compute(
        predictions=predictions, references=references, heuristics=heuristics, binarize=True
    )
    assert results["accuracy"] == 0.75
    assert results["accuracy_constituent_entailment"] == 0.5
    assert results["accuracy_constituent_non_entailment"] == 1.0
