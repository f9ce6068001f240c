"""The embedded NLI generator: determinism, schema, and the lexical-overlap shortcut it must carry."""

from collections import Counter

import pytest
from datasets import ClassLabel

from hf_fastif.data import (
    HANS_HEURISTICS,
    HANS_TEMPLATES,
    NLI2_LABELS,
    generate_nli,
    word_overlap_rate,
    words,
)

N_PER_SUBCASE = 20
N_SUBCASES = sum(len(subcases) for subcases in HANS_TEMPLATES.values())


@pytest.fixture(scope="module")
def data():
    return generate_nli(
        seed=0, n_train=4000, n_hans_per_subcase=N_PER_SUBCASE, n_pool_per_subcase=N_PER_SUBCASE
    )


def _is_contiguous(premise: str, hypothesis: str) -> bool:
    p, h = words(premise), words(hypothesis)
    return any(p[i : i + len(h)] == h for i in range(len(p) - len(h) + 1))


def _overlap_heuristic(premise: str, hypothesis: str) -> int:
    """Predict entailment (0) iff every hypothesis word is in the premise."""
    return 0 if word_overlap_rate(premise, hypothesis) == 1.0 else 1


def test_same_seed_same_data_other_seed_other_data():
    kwargs = dict(n_train=300, n_hans_per_subcase=4, n_pool_per_subcase=4)
    first, again, other = (
        generate_nli(seed=7, **kwargs),
        generate_nli(seed=7, **kwargs),
        generate_nli(seed=8, **kwargs),
    )
    for split in ("train", "hans", "pool"):
        assert first[split].to_dict() == again[split].to_dict()
        assert first[split]["premise"] != other[split]["premise"]


def test_schema_sizes_and_labels(data):
    assert set(data) == {"train", "hans", "pool"}
    assert data["train"].column_names == ["premise", "hypothesis", "label", "genre"]
    hans_columns = ["premise", "hypothesis", "label", "heuristic", "subcase", "template", "pair_id"]
    for split in ("train", "hans", "pool"):
        label = data[split].features["label"]
        assert isinstance(label, ClassLabel) and label.names == list(NLI2_LABELS)
        assert set(data[split]["label"]) == {0, 1}
    for split in ("hans", "pool"):
        ds = data[split]
        assert ds.column_names == hans_columns
        assert len(ds) == N_SUBCASES * N_PER_SUBCASE
        assert len(set(ds["pair_id"])) == len(ds)
        assert set(ds["heuristic"]) == set(HANS_HEURISTICS)
        assert Counter(ds["subcase"]) == {
            s: N_PER_SUBCASE for subcases in HANS_TEMPLATES.values() for s in subcases
        }
        # both labels within every heuristic, one label within every subcase (as in HANS)
        for heuristic in HANS_HEURISTICS:
            assert {lab for h, lab in zip(ds["heuristic"], ds["label"]) if h == heuristic} == {0, 1}
        by_subcase = {}
        for subcase, label in zip(ds["subcase"], ds["label"]):
            by_subcase.setdefault(subcase, set()).add(label)
        assert all(len(labels) == 1 for labels in by_subcase.values())
    assert len(data["train"]) == 4000


def test_pool_hans_and_train_are_disjoint(data):
    pairs = {split: set(zip(data[split]["premise"], data[split]["hypothesis"])) for split in data}
    assert len(pairs["hans"]) == len(data["hans"]) and len(pairs["pool"]) == len(data["pool"])
    assert not pairs["hans"] & pairs["pool"]
    assert not pairs["train"] & (pairs["hans"] | pairs["pool"])


def test_train_carries_the_overlap_shortcut(data):
    train = data["train"]
    full = [
        lab
        for p, h, lab in zip(train["premise"], train["hypothesis"], train["label"])
        if word_overlap_rate(p, h) == 1.0
    ]
    partial = [
        lab
        for p, h, lab in zip(train["premise"], train["hypothesis"], train["label"])
        if word_overlap_rate(p, h) < 1.0
    ]
    assert len(full) > 0.3 * len(train) and len(partial) > 0.3 * len(train)
    entailment_given_full = full.count(0) / len(full)
    entailment_given_partial = partial.count(0) / len(partial)
    assert entailment_given_full >= 0.9
    assert entailment_given_partial <= 0.5
    # a small minority of full-overlap non-entailment rows that teach the right behaviour
    assert 0.02 * len(full) <= full.count(1) <= 0.1 * len(full)


def test_hans_pairs_have_full_overlap_and_hans_structure(data):
    for split in ("hans", "pool"):
        ds = data[split]
        for premise, hypothesis, heuristic in zip(ds["premise"], ds["hypothesis"], ds["heuristic"]):
            assert word_overlap_rate(premise, hypothesis) == 1.0, (premise, hypothesis)
            # subsequence/constituent hypotheses are spans of the premise; lexical_overlap ones are not
            assert _is_contiguous(premise, hypothesis) == (heuristic != "lexical_overlap"), (
                premise,
                hypothesis,
            )


def test_overlap_heuristic_fits_train_and_fails_hans_non_entailment(data):
    train = data["train"]
    predictions = [_overlap_heuristic(p, h) for p, h in zip(train["premise"], train["hypothesis"])]
    train_accuracy = sum(p == lab for p, lab in zip(predictions, train["label"])) / len(train)
    assert train_accuracy >= 0.8
    hans = data["hans"]
    for heuristic in HANS_HEURISTICS:
        for label, expected in ((0, 1.0), (1, 0.0)):
            rows = [
                (p, h)
                for p, h, hh, lab in zip(
                    hans["premise"], hans["hypothesis"], hans["heuristic"], hans["label"]
                )
                if hh == heuristic and lab == label
            ]
            accuracy = sum(_overlap_heuristic(p, h) == label for p, h in rows) / len(rows)
            assert accuracy == expected, (heuristic, label)


def test_every_hans_word_is_seen_in_training(data):
    def vocabulary(split):
        return {w for s in [*data[split]["premise"], *data[split]["hypothesis"]] for w in words(s)}

    train_words, hans_words = vocabulary("train"), vocabulary("hans")
    assert hans_words <= train_words, sorted(hans_words - train_words)


@pytest.mark.parametrize(
    "kwargs", [{"n_train": -1}, {"n_hans_per_subcase": 1.5}, {"n_pool_per_subcase": "3"}]
)
def test_bad_sizes_raise(kwargs):
    with pytest.raises(ValueError, match="non-negative integer"):
        generate_nli(**kwargs)
