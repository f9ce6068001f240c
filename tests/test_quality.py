"""hf_fastif.quality: rank agreement and top-n recall against a reference, on hand-computed cases."""

import math

import numpy as np
import pytest
from datasets import Dataset

from hf_fastif import InfluenceTable
from hf_fastif.quality import agreement, dense_reference, influence_by_test, top_n_recall

# One test point, five training rows: row 0 is the most helpful (most negative), row 4 the most harmful.
REFERENCE = np.array([-3.0, -1.0, 0.0, 2.0, 5.0])


def test_top_n_recall_by_hand():
    ids, values = np.array([0, 1, 3]), np.array([-2.0, -1.5, 3.0])
    # helpful top 2: reference {0, 1}, estimate {0, 1}
    assert top_n_recall(REFERENCE, ids, values, 2, "helpful") == 1.0
    # harmful top 2: reference {4, 3}, estimate {3 (3.0), 1 (-1.5)}: one of two
    assert top_n_recall(REFERENCE, ids, values, 2, "harmful") == 0.5
    # an estimate with fewer rows than n cannot reach 1: top 4 helpful {0, 1, 2, 3}, estimate has 3 of them
    assert top_n_recall(REFERENCE, ids, values, 4, "helpful") == 0.75
    # the estimate's own ordering counts, not only which rows it holds: it calls row 3 its most helpful
    assert top_n_recall(REFERENCE, ids, np.array([0.0, 1.0, -9.0]), 1, "helpful") == 0.0


def test_agreement_by_hand():
    ids, values = np.array([0, 1, 3]), np.array([1.0, 0.0, 2.0])
    q = agreement(REFERENCE[None], [(ids, values)], ns=(1, 2))
    # ranks of values (2, 1, 3) vs reference (1, 2, 3): d = (1, -1, 0), rho = 1 - 6·2 / (3·(9 - 1)) = 0.5
    assert q["spearman"] == pytest.approx(0.5) and q["spearman_min"] == pytest.approx(0.5)
    # deviations (0, -1, 1) and (-7/3, -1/3, 8/3): r = 3 / sqrt(2 · 114/9) = 9 / sqrt(228)
    assert q["pearson"] == pytest.approx(9 / math.sqrt(228))
    # helpful: reference top 1 is row 0, the estimate's is row 1; top 2 {0, 1} both found
    assert q["recall@1 helpful"] == 0.0 and q["recall@2 helpful"] == 1.0
    # harmful: reference top 1 is row 4 (not scored); top 2 {4, 3}, the estimate's {3, 0}
    assert q["recall@1 harmful"] == 0.0 and q["recall@2 harmful"] == 0.5


def test_agreement_averages_over_test_points_and_keeps_the_worst():
    reference = np.array([REFERENCE, -REFERENCE])
    perfect = (np.arange(5), REFERENCE)
    reversed_ = (np.arange(5), REFERENCE)  # test point 1's reference is the negation: rank order reversed
    q = agreement(reference, [perfect, reversed_], ns=(1,))
    assert q["spearman"] == pytest.approx(0.0) and q["spearman_min"] == pytest.approx(-1.0)
    assert q["pearson"] == pytest.approx(0.0)
    assert q["recall@1 helpful"] == 0.5 and q["recall@1 harmful"] == 0.5
    # fewer estimates than reference rows: the first ones are compared
    assert agreement(reference, [perfect], ns=(1,))["spearman"] == pytest.approx(1.0)


def test_constant_estimates_have_no_correlation():
    q = agreement(REFERENCE[None], [(np.array([0, 4]), np.array([1.0, 1.0]))], ns=(1,))
    assert math.isnan(q["pearson"]) and math.isnan(q["spearman"])
    assert q["recall@1 helpful"] == 1.0  # stable ties: row 0 comes first in both orders


def test_tables_round_trip_through_influence_by_test():
    rows = {"test_id": [1, 0, 0, 1, 0, 1], "train_id": [2, 1, 0, 0, 2, 1],
            "influence": [0.5, -1.0, 2.0, 0.1, 3.0, -0.2]}
    table = InfluenceTable(Dataset.from_dict(rows), {})
    per_test = influence_by_test(table, 2)
    assert [ids.tolist() for ids, _ in per_test] == [[0, 1, 2], [0, 1, 2]]
    assert per_test[0][1].tolist() == [2.0, -1.0, 3.0] and per_test[1][1].tolist() == [0.1, -0.2, 0.5]
    dense = dense_reference(per_test, 3)
    assert dense.tolist() == [[2.0, -1.0, 3.0], [0.1, -0.2, 0.5]]
    with pytest.raises(ValueError, match="no rows for test ids \\[2\\]"):
        influence_by_test(table, 3)
    with pytest.raises(ValueError, match="influence_knn_k=None"):
        dense_reference([(np.array([0, 2]), np.array([1.0, 2.0]))], 3)


@pytest.mark.parametrize("call, message", [
    (lambda: top_n_recall(REFERENCE, [0, 1], [1.0, 2.0], 6), "n must be an integer in \\[1, 5\\]"),
    (lambda: top_n_recall(REFERENCE, [0, 1], [1.0, 2.0], 1, "best"), "use 'helpful' or 'harmful'"),
    (lambda: top_n_recall(REFERENCE[None], [0], [1.0], 1), "reference must be 1-D"),
    (lambda: top_n_recall(REFERENCE, [0, 7], [1.0, 2.0], 1), "must lie in \\[0, 5\\)"),
    (lambda: top_n_recall(REFERENCE, [0, 0], [1.0, 2.0], 1), "duplicates"),
    (lambda: top_n_recall(REFERENCE, [0, 1], [1.0], 1), "same length"),
    (lambda: agreement(REFERENCE, [([0], [1.0])]), "reference must be 2-D"),
    (lambda: agreement(REFERENCE[None], [([0], [1.0])] * 2), "between 1 and 1 estimates"),
    (lambda: agreement(REFERENCE[None], [([0], [1.0])], ns=(10,)), "Every n in ns"),
])
def test_bad_input_names_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="must be integers"):
        top_n_recall(REFERENCE, np.array([0.0, 1.0]), [1.0, 2.0], 1)


def test_ties_break_by_row_and_nan_rows_leave_the_correlations():
    """Tied estimates were ranked by the order their ids were passed in (recall 1.0 or 0.0 for the same estimate),
    though the docstring says by row; one NaN value (a gradient that overflowed) made every mean NaN."""
    reference = np.array([0.0, -1.0, -1.0, 5.0])
    for ids in ([1, 2], [2, 1]):
        assert top_n_recall(reference, np.array(ids), np.array([-1.0, -1.0]), 1) == 1.0
    rows = np.arange(4)
    estimate = np.array([0.0, -1.0, np.nan, 5.0])
    summary = agreement(np.array([[0.0, -1.0, -2.0, 5.0]]), [(rows, estimate)], ns=(1,))
    assert summary["pearson"] == pytest.approx(1.0) and summary["spearman"] == pytest.approx(1.0)
