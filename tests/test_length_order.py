"""Rows run in batches of like length (`Batcher.length_order`): kNN features, the gradient index, candidate scoring
and the mean Hessian's chunks. Each row's value must land on its own row, and the order must change nothing but
float rounding."""

import numpy as np
import pytest
import torch
from datasets import Dataset

import hf_fastif.engine as engine_module
from hf_fastif import compute_influences
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.influence import default_arguments
from hf_fastif.knn import extract_features
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import select_parameters
from hf_fastif.scoring import score_candidates, score_per_example_loop
from tests.tiny import TOP, make_token_dataset, tiny_model


@pytest.fixture(scope="module")
def rows():
    data = make_token_dataset(24, seed=3, min_len=3, max_len=12)
    lengths = np.array([len(ids) for ids in data["input_ids"]])
    assert len(set(lengths)) > 5 and not (np.diff(lengths) >= 0).all()  # mixed lengths, not already in order
    return data, lengths


def _batcher(data, model, collator):
    return Batcher(data, validate_dataset(data, "d", model), collator, "cpu")


def _recording(monkeypatch, lengths):
    """The stored lengths of the rows of every batch collated from now on, batch by batch."""
    seen, real = [], Batcher.batch

    def batch(self, positions, *args, **kwargs):
        seen.append(lengths[self.base_rows(np.asarray(positions, dtype=np.int64))].tolist())
        return real(self, positions, *args, **kwargs)

    monkeypatch.setattr(Batcher, "batch", batch)
    return seen


def test_length_order_sorts_by_the_length_a_batch_pads_to(rows, pad_collator):
    data, lengths = rows
    model = tiny_model("bert")
    batcher = _batcher(data, model, pad_collator)
    order = batcher.length_order()
    np.testing.assert_array_equal(order, np.argsort(lengths, kind="stable"))
    some = np.array([5, 0, 17, 3, 9])
    np.testing.assert_array_equal(batcher.length_order(some), some[np.argsort(lengths[some], kind="stable")])
    # a view orders its own positions by its own rows' lengths
    view = batcher.subset(some)
    np.testing.assert_array_equal(view.length_order(), np.argsort(lengths[some], kind="stable"))

    # rows stored padded to one width: by that width (all equal: as given), unless batches drop the trailing padding,
    # where the real tokens of the stored attention mask decide
    width = int(lengths.max())
    padded = Dataset.from_dict({
        "input_ids": [ids + [0] * (width - len(ids)) for ids in data["input_ids"]],
        "attention_mask": [m + [0] * (width - len(m)) for m in data["attention_mask"]],
        "labels": data["labels"]})
    stored = _batcher(padded, model, pad_collator)
    np.testing.assert_array_equal(stored.length_order(), np.arange(len(data)))
    stored.skip_padding = True
    np.testing.assert_array_equal(stored.length_order(), np.argsort(lengths, kind="stable"))

    # no token ids stored (a collator that tokenises text): as given
    texts = Dataset.from_dict({"text": ["a b", "c"], "labels": [0, 1]})
    plain = Batcher(texts, ["text", "labels"], lambda features: features, "cpu")
    assert plain.padded_lengths() is None
    np.testing.assert_array_equal(plain.length_order([1, 0]), [1, 0])


def test_features_run_by_length_and_land_on_their_rows(rows, pad_collator, monkeypatch):
    data, lengths = rows
    model = tiny_model("bert")
    batcher = _batcher(data, model, pad_collator)
    one_at_a_time = extract_features(model, batcher, "mean", batch_size=1, progress=False)
    seen = _recording(monkeypatch, lengths)
    batched = extract_features(model, batcher, "mean", batch_size=5, progress=False)
    np.testing.assert_allclose(batched, one_at_a_time, rtol=1e-6, atol=1e-7)  # (float32 features)
    assert [len(b) for b in seen] == [5, 5, 5, 5, 4]
    flat = [n for b in seen for n in b]
    assert flat == sorted(flat)  # batches of like length, shortest first
    assert sum(max(b) * len(b) for b in seen) < sum(max(lengths[i : i + 5]) * len(lengths[i : i + 5])
                                                    for i in range(0, len(lengths), 5))  # less padding than row order


def test_candidates_are_scored_by_length_and_land_on_their_rows(rows, pad_collator, monkeypatch):
    data, lengths = rows
    model = tiny_model("bert")
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params))
    batcher = _batcher(data, model, pad_collator)
    p = sum(t.numel() for t in params.values())
    s_test = torch.randn(2, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    candidates = np.random.default_rng(0).permutation(len(data))[:15]
    loop = score_per_example_loop(fm, params, batcher, candidates, s_test)
    seen = _recording(monkeypatch, lengths)
    batched = score_candidates(fm, params, batcher, candidates, s_test, batch_size=4, progress=False)
    np.testing.assert_allclose(batched, loop, rtol=1e-9, atol=1e-12)
    flat = [n for b in seen for n in b]
    assert len(flat) == 15 and flat == sorted(flat)


def test_mean_hessian_chunks_run_longest_first_and_change_only_rounding(rows, pad_collator, monkeypatch):
    data, lengths = rows
    model = tiny_model("bert")
    test = make_token_dataset(2, seed=4)
    args = default_arguments(influence_params=TOP["bert"], influence_solver="cg", influence_damping=0.05,
                             influence_scale=20.0, influence_knn_k=None, influence_hvp_batch_size=5,
                             influence_trunk_cache=False, disable_tqdm=True)
    widths, real = [], engine_module.kept_graphs.KeptHessians.product

    def product(self, key, collate, vectors, **kwargs):
        widths.append((key, collate()["input_ids"].shape[1]))
        return real(self, key, collate, vectors, **kwargs)

    monkeypatch.setattr(engine_module.kept_graphs.KeptHessians, "product", product)
    ordered = compute_influences(model, data, test, args, data_collator=pad_collator).to_pandas()
    first = [w for key, w in widths[: 5]]  # the first product: chunks 0-4 of the 24 rows
    assert [key for key, _ in widths[:5]] == [0, 1, 2, 3, 4]
    assert first == sorted(first, reverse=True) and first[0] == lengths.max() and first[-1] < lengths.max()

    monkeypatch.setattr(Batcher, "length_order", lambda self, positions=None: (
        np.arange(len(self)) if positions is None else np.asarray(positions, dtype=np.int64)))
    as_stored = compute_influences(model, data, test, args, data_collator=pad_collator).to_pandas()
    pd_sorted = [frame.sort_values(["test_id", "train_id"]).reset_index(drop=True) for frame in (ordered, as_stored)]
    np.testing.assert_array_equal(pd_sorted[0].train_id, pd_sorted[1].train_id)
    np.testing.assert_allclose(pd_sorted[0].influence, pd_sorted[1].influence, rtol=1e-9, atol=1e-12)


def test_logits_run_by_length_and_land_on_their_rows(rows, pad_collator, monkeypatch):
    from hf_fastif import InfluenceEngine

    data, lengths = rows
    model = tiny_model("bert")
    args = default_arguments(influence_params=TOP["bert"], disable_tqdm=True)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    seen = _recording(monkeypatch, lengths)
    logits = engine.logits(data, batch_size=5)
    with torch.no_grad():
        alone = np.concatenate([model(**pad_collator([data[i]])).logits.float().numpy() for i in range(len(data))])
    np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-6)
    last = seen[-5:]  # the logits' own batches, after the trunk states' and the probes'
    assert [len(b) for b in last] == [5, 5, 5, 5, 4]
    flat = [n for b in last for n in b]
    assert flat == sorted(flat) == sorted(lengths.tolist())


def test_predictions_without_an_engine_land_on_their_rows(rows, pad_collator, monkeypatch):
    from hf_fastif.applications.common import predict

    data, lengths = rows
    model = tiny_model("bert")
    seen = _recording(monkeypatch, lengths)
    logits = predict(model, data, pad_collator, batch_size=5)
    with torch.no_grad():
        alone = np.concatenate([model(**pad_collator([data[i]])).logits.float().numpy() for i in range(len(data))])
    np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-6)
    flat = [n for b in seen for n in b]
    assert [len(b) for b in seen] == [5, 5, 5, 5, 4] and flat == sorted(flat)
