"""HANS accuracy: overall, per heuristic, and per heuristic and gold label."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy on HANS (McCoy et al. 2019) broken down the way HANS results are reported: overall, for each
heuristic (lexical_overlap, subsequence, constituent), and for each heuristic split by gold label, since a
model that relies on the heuristics scores near 100% on the entailment cases and near 0% on the
non-entailment ones. Labels: 0 = entailment, 1 = non_entailment.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 = entailment, 1 = non_entailment.
    references (`list` of `int`): gold labels, same convention.
    heuristics (`list` of `str`): the HANS heuristic of each example (the dataset's `heuristic` column).
    binarize (`bool`, defaults to `False`): map every label above 0 to 1 first, for 3-label models
        (0 = entailment, 1 = neutral, 2 = contradiction) evaluated on HANS.

Returns:
    accuracy (`float`): over all examples.
    accuracy_<heuristic> (`float`): over the examples of each heuristic present.
    accuracy_<heuristic>_entailment, accuracy_<heuristic>_non_entailment (`float`): over the examples of
        each heuristic with that gold label, for the labels present.

Examples:
    >>> hans_accuracy = evaluate.load("path/to/hf_fastif/metrics/hans_accuracy")
    >>> hans_accuracy.compute(predictions=[0, 0, 1], references=[0, 1, 1],
    ...                       heuristics=["lexical_overlap", "lexical_overlap", "constituent"])
    {'accuracy': 0.6666666666666666, 'accuracy_constituent': 1.0, 'accuracy_constituent_non_entailment': 1.0, \
'accuracy_lexical_overlap': 0.5, 'accuracy_lexical_overlap_entailment': 1.0, \
'accuracy_lexical_overlap_non_entailment': 0.0}
"""

_CITATION = """
@inproceedings{mccoy-etal-2019-right,
    title = "Right for the Wrong Reasons: Diagnosing Syntactic Heuristics in Natural Language Inference",
    author = "McCoy, Tom and Pavlick, Ellie and Linzen, Tal",
    booktitle = "Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics",
    year = "2019",
    pages = "3428--3448",
}
"""

LABEL_NAMES = ("entailment", "non_entailment")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HansAccuracy(evaluate.Metric):
    """Accuracy overall, per HANS heuristic, and per heuristic and gold label."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "heuristics": datasets.Value("string"),
                }
            ),
            reference_urls=["https://github.com/tommccoy1/hans"],
        )

    def _compute(self, predictions, references, heuristics, binarize: bool = False) -> dict:
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        heuristics = np.asarray(heuristics, dtype=object)
        if len(predictions) == 0:
            raise ValueError("hans_accuracy got no examples; pass at least one prediction.")
        if binarize:
            predictions, references = np.minimum(predictions, 1), np.minimum(references, 1)
        for name, values in (("predictions", predictions), ("references", references)):
            bad = sorted(set(values.tolist()) - {0, 1})
            if bad:
                raise ValueError(
                    f"hans_accuracy {name} must be 0 (entailment) or 1 (non_entailment), got {bad}; "
                    "for a 3-label model pass binarize=True (neutral and contradiction count as non_entailment)."
                )
        correct = predictions == references
        results = {"accuracy": float(correct.mean())}
        for heuristic in sorted(set(heuristics.tolist())):
            in_heuristic = heuristics == heuristic
            results[f"accuracy_{heuristic}"] = float(correct[in_heuristic].mean())
            for label, label_name in enumerate(LABEL_NAMES):
                rows = in_heuristic & (references == label)
                if rows.any():
                    results[f"accuracy_{heuristic}_{label_name}"] = float(correct[rows].mean())
        return results
