"""Label names, heuristics and column schemas shared by the generator and the loaders."""

from __future__ import annotations

from datasets import ClassLabel, Features, Value

ENTAILMENT = 0
NON_ENTAILMENT = 1

NLI2_LABELS: tuple[str, ...] = ("entailment", "non_entailment")
"""Two-label NLI (MNLI-2, HANS): 0 = entailment, 1 = non_entailment."""

NLI3_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
"""Three-label NLI in MNLI's order: 0 = entailment, 1 = neutral, 2 = contradiction."""

HANS_HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")
"""The three syntactic heuristics HANS probes, in HANS's order."""

HANS_METADATA_COLUMNS: tuple[str, ...] = ("heuristic", "subcase", "template", "pair_id")


def label_names(num_labels: int) -> tuple[str, ...]:
    """The label names of a 2- or 3-label NLI dataset.

    Args:
        num_labels: 2 (entailment / non_entailment) or 3 (entailment / neutral / contradiction).

    Returns:
        The names, index = label id.
    """
    if num_labels == 2:
        return NLI2_LABELS
    if num_labels == 3:
        return NLI3_LABELS
    raise ValueError(
        f"num_labels must be 2 (MNLI-2: entailment / non_entailment) or 3 (MNLI), got {num_labels!r}."
    )


def nli_features(num_labels: int = 2) -> Features:
    """Schema of an MNLI-like split: `premise`, `hypothesis`, `label`, `genre`.

    Args:
        num_labels: 2 or 3, see `label_names`.

    Returns:
        The `datasets.Features`.
    """
    return Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=list(label_names(num_labels))),
            "genre": Value("string"),
        }
    )


def hans_features() -> Features:
    """Schema of a HANS-style split: `premise`, `hypothesis`, `label` (2 labels) and the HANS metadata.

    Returns:
        The `datasets.Features`.
    """
    return Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=list(NLI2_LABELS)),
            **{name: Value("string") for name in HANS_METADATA_COLUMNS},
        }
    )
