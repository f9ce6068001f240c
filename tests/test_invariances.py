"""Invariances: batch sizes, k = N, JVP vs per-example gradients, many test points vs one at a time."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_fastif import compute_influences
from hf_fastif.batches import Batcher
from hf_fastif.influence import default_arguments
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import select_parameters
from hf_fastif.scoring import score_candidates, score_per_example_loop
from tests.tiny import TOP, make_token_dataset, tiny_model

BASE = dict(influence_params=TOP["bert"], influence_damping=0.05,
            influence_scale=20.0, influence_recursion_depth=30, influence_batch_size=2, influence_repetitions=2,
            disable_tqdm=True)


def run(model, train, test, collator, **overrides):
    args = default_arguments(**(BASE | overrides))
    return compute_influences(model, train, test, args, data_collator=collator).to_pandas()


@pytest.fixture(scope="module")
def data():
    return tiny_model("bert"), make_token_dataset(40, seed=0), make_token_dataset(4, seed=1)


def sorted_frame(df):
    return df.sort_values(["test_id", "train_id"]).reset_index(drop=True)


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_hvp_and_scoring_batch_sizes_do_not_change_scores(data, pad_collator, solver):
    model, train, test = data
    a = sorted_frame(run(model, train, test, pad_collator, influence_solver=solver, influence_knn_k=None,
                         influence_hvp_batch_size=64, influence_scoring_batch_size=64))
    b = sorted_frame(run(model, train, test, pad_collator, influence_solver=solver, influence_knn_k=None,
                         influence_hvp_batch_size=7, influence_scoring_batch_size=3))
    np.testing.assert_allclose(a.influence, b.influence, rtol=1e-9, atol=1e-12)


def test_knn_with_k_equal_n_is_the_full_scan(data, pad_collator):
    model, train, test = data
    full = sorted_frame(run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=None))
    knn = sorted_frame(run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=len(train)))
    assert len(knn) == len(full) == len(train) * len(test)
    np.testing.assert_array_equal(full.train_id, knn.train_id)
    np.testing.assert_allclose(full.influence, knn.influence, rtol=1e-12)


def test_knn_candidates_are_the_nearest_rows(data, pad_collator):
    model, train, test = data
    df = run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=5)
    assert df.groupby("test_id").size().tolist() == [5] * len(test)
    # a test row that is also a training row has itself among its nearest neighbours
    dup = train.select([3])
    df = run(model, train, dup, pad_collator, influence_solver="cg", influence_knn_k=3)
    assert 3 in set(df.train_id)


def test_jvp_scoring_equals_per_example_gradients(data, pad_collator):
    model, train, test = data
    jvp = sorted_frame(run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=None,
                           influence_scoring="jvp"))
    grad = sorted_frame(run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=None,
                            influence_scoring="grad"))
    np.testing.assert_allclose(jvp.influence, grad.influence, rtol=1e-9, atol=1e-12)


def test_batched_scoring_equals_the_per_example_loop(data, pad_collator):
    model, train, _ = data
    params = select_parameters(model, BASE["influence_params"])
    fm = FunctionalModel(model, list(params))
    batcher = Batcher(train, ["input_ids", "attention_mask", "labels"], pad_collator, "cpu")
    s = torch.randn(3, sum(p.numel() for p in params.values()), dtype=torch.float64)
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    batched = score_candidates(fm, params, batcher, list(range(40)), s, batch_size=16, progress=False)
    loop = score_per_example_loop(fm, params, batcher, list(range(40)), s)
    np.testing.assert_allclose(batched, loop, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [None, 10])
def test_many_test_points_equal_one_at_a_time(data, pad_collator, k):
    model, train, test = data
    together = sorted_frame(run(model, train, test, pad_collator, influence_solver="lissa", influence_knn_k=k))
    for t in range(len(test)):
        alone = run(model, train, test.select([t]), pad_collator, influence_solver="lissa", influence_knn_k=k)
        mine = together[together.test_id == t].sort_values("train_id")
        alone = alone.sort_values("train_id")
        np.testing.assert_array_equal(mine.train_id.values, alone.train_id.values)
        np.testing.assert_allclose(mine.influence.values, alone.influence.values, rtol=1e-8, atol=1e-12)


def test_lissa_is_seeded(data, pad_collator):
    model, train, test = data
    a = run(model, train, test, pad_collator, influence_solver="lissa", influence_knn_k=None)
    b = run(model, train, test, pad_collator, influence_solver="lissa", influence_knn_k=None)
    c = run(model, train, test, pad_collator, influence_solver="lissa", influence_knn_k=None, influence_seed=7)
    np.testing.assert_array_equal(a.influence, b.influence)
    assert not np.allclose(sorted_frame(a).influence, sorted_frame(c).influence)


def test_combine_mean_is_the_mean_of_test_gradients(data, pad_collator):
    """s_test is linear in ∇L_test, so the influence on the mean loss is the mean of per-row influences."""
    model, train, test = data
    per_row = sorted_frame(run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=None))
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=None)))
    mean = compute_influences(model, train, test, args, combine="mean", data_collator=pad_collator)
    df = mean.to_pandas().sort_values("train_id")
    assert set(df.test_id) == {0}
    expected = per_row.groupby("train_id").influence.mean().values
    np.testing.assert_allclose(df.influence.values, expected, rtol=1e-8)

    # an unlabelled test row (-100: its loss is 0, and the model's own loss leaves it out) is not counted in the mean:
    # it was, and every value came out scaled by the labelled share (3/4)
    unlabelled = Dataset.from_dict({**test.to_dict(), "labels": [-100, *test["labels"][1:]]})
    with_one = compute_influences(model, train, unlabelled, args, combine="mean", data_collator=pad_collator)
    labelled = per_row[per_row.test_id != 0].groupby("train_id").influence.mean().values
    np.testing.assert_allclose(with_one.to_pandas().sort_values("train_id").influence.values, labelled, rtol=1e-8)
    from hf_fastif.table import dataset_card  # and its card counts the rows in the mean, not every row given

    n = len(unlabelled)
    assert f"the mean over the {n - 1} rows with a target of the {n} rows of the test data" in str(
        dataset_card(with_one.metadata, len(with_one)))
    assert f"the mean over the {n} rows of the test data" in str(dataset_card(mean.metadata, len(mean)))
    with pytest.raises(ValueError, match="Every row of test_dataset is labelled -100"):  # (refused before any work)
        compute_influences(model, train, unlabelled.map(lambda r: {"labels": -100}), args, combine="mean",
                           data_collator=pad_collator)


@pytest.mark.parametrize("overrides", [
    dict(influence_knn_k=None, influence_weight_decay=0.05, influence_weight_decay_in_gradients=True),
    dict(influence_knn_k=6, influence_knn_features="auto")], ids=["l2_in_gradients", "knn_query"])
def test_an_unlabelled_test_row_is_out_of_every_part_of_the_mean(data, pad_collator, overrides):
    """Under combine="mean" a test row labelled -100 is left out of the mean: the same table as without the row. Its
    L2 term was still summed into the mean test gradient (2% off on a review's repro), and its features into the
    kNN query (3 of 8 candidates other)."""
    model, train, test = data
    unlabelled = Dataset.from_dict({**test.to_dict(), "labels": [-100, *test["labels"][1:]]})
    args = default_arguments(**(BASE | dict(influence_solver="cg") | overrides))
    with_it, without = (compute_influences(model, train, rows, args, combine="mean", data_collator=pad_collator)
                        .to_pandas().sort_values("train_id") for rows in (unlabelled, unlabelled.select(range(1, 4))))
    assert with_it.train_id.tolist() == without.train_id.tolist()
    np.testing.assert_allclose(with_it.influence.values, without.influence.values, rtol=1e-9, atol=0)


def test_each_candidate_is_scored_only_against_the_tests_that_picked_it(data, pad_collator, monkeypatch):
    import hf_fastif.scoring as scoring

    model, train, test = data
    seen, real = [], scoring.score_batch

    def spy(fm, params, batch, s_test, method="jvp", **kwargs):
        seen.append((batch["input_ids"].shape[0], s_test.shape[0]))
        return real(fm, params, batch, s_test, method, **kwargs)

    monkeypatch.setattr(scoring, "score_batch", spy)
    df = run(model, train, test, pad_collator, influence_solver="cg", influence_knn_k=3,
             influence_scoring_batch_size=3)
    pairs, union = len(df), df.train_id.nunique()
    assert sum(b for b, _ in seen) == union  # every candidate row runs once
    work = sum(b * m for b, m in seen)  # candidate-tangent products computed
    assert work <= 2 * pairs < union * len(test)


def test_candidates_shared_by_some_tests_are_batched_together(monkeypatch):
    """Test 0 picks rows 0-7, test 1 rows 1, 3, 5, 7 and 8-11: the shared rows sit between test 0's own by row id.
    Batched by their set of tests, no batch of 4 needs both vectors unless all its rows do, so the work equals the
    pairs (batched by first test alone, rows 0-3 and 4-7 would each run both vectors: 20 products for 16 pairs)."""
    import hf_fastif.scoring as scoring

    class Rows:
        def batch(self, ids):
            return {"ids": torch.as_tensor(np.asarray(ids))}

        def padded_lengths(self):  # (no stored lengths: candidates stay in row order within their set of tests)
            return None

    seen = []

    def fake(fm, params, batch, s_test, method="jvp", row_batch=None):  # "influence" = 10·row + test, from s_test[t] = t
        seen.append((len(batch["ids"]), s_test.shape[0]))
        return batch["ids"][:, None].double() * 10 + s_test[:, 0][None, :]

    monkeypatch.setattr(scoring, "score_batch", fake)
    tests = np.r_[np.zeros(8, int), np.ones(8, int)]
    rows = np.r_[np.arange(8), [1, 3, 5, 7, 8, 9, 10, 11]]
    shuffle = np.random.default_rng(0).permutation(len(rows))
    s_test = torch.arange(2, dtype=torch.float64)[:, None]
    out = scoring.score_pairs(None, {}, Rows(), tests[shuffle], rows[shuffle], s_test, batch_size=4, progress=False)
    np.testing.assert_array_equal(out, 10 * rows[shuffle] + tests[shuffle])  # aligned with the pairs given
    assert sum(b for b, _ in seen) == 12 and sum(b * m for b, m in seen) == 16
    assert sorted(seen) == [(4, 1), (4, 1), (4, 2)]


def test_the_knn_index_is_reused_until_the_weights_change(data, pad_collator, monkeypatch):
    import hf_fastif.engine as engine_module
    from hf_fastif import InfluenceEngine

    model, train, test = data
    model = tiny_model("bert")  # changed in place below
    built, real = [], engine_module.candidates.build_index
    monkeypatch.setattr(engine_module.candidates, "build_index", lambda *a, **kw: built.append(1) or real(*a, **kw))
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=5)))
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    first = engine.compute_influences(train, test).to_pandas()
    again = engine.compute_influences(train, test).to_pandas()
    assert len(built) == 1 and first.equals(again)
    with torch.no_grad():  # an edit through .data bumps no version counter: the content key still sees it
        model.bert.encoder.layer[0].output.dense.weight.data.mul_(1.5)
    engine.compute_influences(train, test)
    assert len(built) == 2
    compute_influences(model, train, test, args, data_collator=pad_collator)  # a short-lived engine of its own
    assert len(built) == 3


def test_the_curvature_estimate_is_reused_until_the_weights_change(data, pad_collator, monkeypatch):
    import hf_fastif.engine as engine_module
    from hf_fastif import InfluenceEngine

    model, train, test = data
    calls, real = [], engine_module.s_test.extreme_eigenvalues
    monkeypatch.setattr(engine_module.s_test, "extreme_eigenvalues", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = default_arguments(**(BASE | dict(influence_solver="lissa", influence_knn_k=None)))
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    first = engine.compute_influences(train, test).to_pandas()
    per_check = len(calls)
    again = engine.compute_influences(train, test).to_pandas()
    assert per_check == engine_module.s_test.CHECK_BATCHES + 1 and len(calls) == per_check and first.equals(again)
    args.influence_seed = 3
    engine.compute_influences(train, test)
    other = InfluenceEngine(tiny_model("bert", seed=9), args, data_collator=pad_collator)
    other.compute_influences(train, test)
    assert len(calls) == 3 * per_check



def test_arnoldi_on_a_float32_copy_agrees_to_float32_precision(pad_collator):
    """A low-rank Hessian short of convergence depends on Lanczos' start vector, which was drawn in the model's dtype
    (torch draws other numbers in float32 than in float64): on a tiny GPT-2 LM at rank 8, a float32 copy's values
    were 2.1e-2 of the largest value off the float64 model's (up to 36% of a value), against 1.4e-6 from one start
    (2.1e-7 since the start is drawn in float32)."""
    import copy

    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
    train = make_token_dataset(24, seed=0, causal=True).remove_columns("labels")
    test = make_token_dataset(3, seed=100, causal=True).remove_columns("labels")
    model = tiny_model("gpt2-lm")
    args = default_arguments(**(BASE | dict(influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=None,
                                            influence_damping=0.3, influence_scale=20.0,
                                            influence_params=[r"h\.1\.mlp\.c_proj", r"ln_f\."])))
    double = sorted_frame(compute_influences(model, train, test, args, data_collator=collator).to_pandas())
    single = sorted_frame(compute_influences(copy.deepcopy(model).float(), train, test, args,
                                             data_collator=collator).to_pandas())
    scale = double.influence.abs().max()
    np.testing.assert_allclose(single.influence, double.influence, rtol=0, atol=1e-4 * scale)
