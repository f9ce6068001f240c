"""A held engine keys every cache of a dataset on its rows' content, not on datasets' ``_fingerprint``: a ``map``
that draws at random, run twice on in-memory data, gives two datasets with one ``_fingerprint`` and other rows, and
a held engine served the first one's caches for the second (the test set's table 0.44 off, the old candidate pool's
table for a new pool, and a label the model lacks past its value check, to a bare IndexError)."""

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Value, concatenate_datasets

from hf_fastif import InfluenceEngine, compute_influences
from hf_fastif.fingerprint import dataset_fingerprint
from hf_fastif.influence import default_arguments
from tests.tiny import VOCAB, make_token_dataset, pad_collator_for_tests, tiny_model, train_tiny

TOP = [r"encoder\.layer\.1\.output\.", r"pooler\.", r"classifier\."]  # (the trunk and the cut take part)
BASE = dict(influence_params=TOP, influence_damping=0.05, influence_scale=20.0, influence_knn_k=None,
            disable_tqdm=True)


@pytest.fixture(scope="module")
def data():
    collator = pad_collator_for_tests()
    train, test = make_token_dataset(30, seed=0), make_token_dataset(3, seed=1)
    return train_tiny(tiny_model("bert"), train, collator, epochs=5), train, test, collator


def redrawn(dataset: Dataset, change, seed: int) -> Dataset:
    """``dataset.map(change)`` under a global numpy seed: the rows differ between seeds, datasets' fingerprint
    does not (it hashes the function, not what it draws)."""
    np.random.seed(seed)
    return dataset.map(change)


def new_token(row):
    ids = list(row["input_ids"])
    ids[2] = int(np.random.randint(5, VOCAB))
    return {"input_ids": ids}


def frame(table):
    return table.to_pandas().sort_values(["test_id", "train_id"]).reset_index(drop=True)


def test_test_rows_that_share_a_datasets_fingerprint_get_their_own_table(data):
    model, train, test, collator = data
    args = default_arguments(**(BASE | dict(influence_solver="exact")))
    first, second = redrawn(test, new_token, 0), redrawn(test, new_token, 1)
    assert first._fingerprint == second._fingerprint and first["input_ids"] != second["input_ids"]
    engine = InfluenceEngine(model, args, data_collator=collator)
    held_first = engine.compute_influences(train, first)
    held = engine.compute_influences(train, second)
    fresh = compute_influences(model, train, second, args, data_collator=collator)
    np.testing.assert_allclose(frame(held).influence, frame(fresh).influence, rtol=1e-10, atol=0)
    assert not np.allclose(frame(held_first).influence, frame(held).influence)
    assert held.metadata["test_data"]["sha256"] != held_first.metadata["test_data"]["sha256"]
    assert held.metadata["test_data"]["sha256"] == dataset_fingerprint(second, ["input_ids", "attention_mask",
                                                                                "labels"])


@pytest.mark.parametrize("solver", ["exact", "arnoldi", "lissa"])
def test_training_rows_that_share_a_datasets_fingerprint_get_their_own_hessian(data, solver):
    """The trunk states, the curvature caches (the exact and low-rank Hessians, LiSSA's check) and the read-position
    cut of the training rows."""
    model, train, test, collator = data

    def noisy(row):  # a token and the label drawn again
        return new_token(row) | {"labels": int(np.random.randint(0, 2))}

    args = default_arguments(**(BASE | dict(influence_solver=solver, influence_arnoldi_rank=8,
                                            influence_recursion_depth=10, influence_batch_size=4,
                                            influence_repetitions=1)))
    first, second = redrawn(train, noisy, 0), redrawn(train, noisy, 1)
    assert first._fingerprint == second._fingerprint and first["labels"] != second["labels"]
    engine = InfluenceEngine(model, args, data_collator=collator)
    engine.compute_influences(first, test)
    held = engine.compute_influences(second, test)
    fresh = compute_influences(model, second, test, args, data_collator=collator)
    np.testing.assert_allclose(frame(held).influence, frame(fresh).influence, rtol=1e-8, atol=0)


def test_a_label_the_model_lacks_is_refused_though_the_datasets_fingerprint_passed_before(data):
    model, train, test, collator = data
    draws = iter([[0, 1] * 15, [0, 1] * 14 + [0, 7]])  # a label-noise experiment whose second draw holds 7

    def relabelled(dataset):
        labels = next(draws)
        return dataset.map(lambda row, i: {"labels": labels[i]}, with_indices=True,
                           new_fingerprint="label-noise")  # (as a random map gives: one fingerprint for both)

    first, second = relabelled(train), relabelled(train)
    assert first._fingerprint == second._fingerprint
    engine = InfluenceEngine(model, default_arguments(**(BASE | dict(influence_solver="exact"))),
                             data_collator=collator)
    engine.compute_influences(first, test)
    with pytest.raises(ValueError, match="train_dataset row 29 has label 7, but the model has 2 classes"):
        engine.compute_influences(second, test)


@pytest.mark.parametrize("features", ["auto", "gradient"])
def test_a_candidate_pool_drawn_again_gets_its_own_index(data, features):
    """The kNN feature index and the gradient index of a candidate pool (the paper's augmentation: an unseen pool
    made by a random augmentation), and the pool's trunk states."""
    model, train, test, collator = data

    def augmented(row):
        ids = list(row["input_ids"])
        ids[-1] = int(np.random.randint(5, VOCAB))
        return {"input_ids": ids}

    pool = make_token_dataset(20, seed=7)
    first, second = redrawn(pool, augmented, 0), redrawn(pool, augmented, 1)
    assert first._fingerprint == second._fingerprint and first["input_ids"] != second["input_ids"]
    args = default_arguments(**(BASE | dict(influence_solver="exact", influence_knn_k=5,
                                            influence_knn_features=features, influence_projection_dim=64)))
    engine = InfluenceEngine(model, args, data_collator=collator)
    engine.compute_influences(train, test, candidate_dataset=first)
    held = frame(engine.compute_influences(train, test, candidate_dataset=second))
    fresh = frame(compute_influences(model, train, test, args, data_collator=collator, candidate_dataset=second))
    assert held[["test_id", "train_id"]].equals(fresh[["test_id", "train_id"]])
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


def test_the_content_hash_is_the_same_however_arrow_holds_the_rows(monkeypatch):
    """`dataset_fingerprint` copies each block's columns by concatenation, and takes an indices mapping's rows a
    block at a time: the digests are those of the whole copy and row-by-row `take` it made before (3x and, with an
    indices mapping, 8x slower), for lists, nested lists, strings, nulls, structs and booleans, whole, sliced,
    selected, shuffled and concatenated (recorded fingerprints, builds' manifests, stay valid)."""
    import hf_fastif.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "HASH_BLOCK_ROWS", 16)  # several blocks, cut inside chunks
    rng = np.random.default_rng(0)
    n = 50
    dataset = Dataset.from_dict({
        "ids": [rng.integers(0, 100, rng.integers(0, 9)).tolist() for _ in range(n)],
        "nested": [[rng.integers(0, 5, rng.integers(0, 4)).tolist() for _ in range(rng.integers(0, 3))]
                   for _ in range(n)],
        "text": [None if i % 7 == 0 else "x" * (i % 5) for i in range(n)],
        "flag": [bool(i % 3) if i % 11 else None for i in range(n)],
        "value": [float(i) if i % 4 else None for i in range(n)],
        "pair": [{"a": i, "b": [i, i]} if i % 9 else None for i in range(n)],
    }).cast_column("value", Value("float32"))

    def by_take(data) -> str:  # the block copy as it was: a `take` of every row
        digest = fingerprint.hashlib.sha256(fingerprint.json.dumps([len(data), data.column_names]).encode())
        table = data.with_format("arrow")[:]
        schema = table.schema.remove_metadata()
        with pa.ipc.new_stream(fingerprint._HashWriter(digest), schema) as writer:
            for start in range(0, table.num_rows, 16):
                block = pa.Table.from_batches(table.slice(start, 16).to_batches(), schema=schema)
                writer.write_batch(block.take(pa.array(np.arange(block.num_rows))).combine_chunks().to_batches()[0])
        return digest.hexdigest()

    perm = rng.permutation(n).tolist()
    pieces = concatenate_datasets([dataset.select(range(17)), dataset.select(range(17, n))])  # several chunks
    for view in (dataset, dataset.select(range(3, 41)), pieces, dataset.select(perm), pieces.select(perm),
                 dataset.shuffle(seed=0).select(range(5, 30))):  # (the last three: indices mappings)
        assert dataset_fingerprint(view) == by_take(view)


def test_a_format_set_on_the_same_rows_is_another_key():
    """datasets' fingerprint changed with set_format, the content hash alone did not: numpy's float64 labels reach
    the collator as float64 where plain rows give float32, so the format is part of the key (plain rows keep the
    bare content hash, which tables record)."""
    from hf_fastif.batches import Batcher

    rows = make_token_dataset(6, seed=0)
    plain = Batcher(rows, rows.column_names, None, "cpu")
    numpy = Batcher(rows.with_format("numpy"), rows.column_names, None, "cpu")
    assert plain.fingerprint == dataset_fingerprint(rows) and numpy.fingerprint != plain.fingerprint


def test_the_columns_a_format_hands_out_are_part_of_the_key(data):
    """The key hashed the format's type but not its `columns`: the same rows formatted to hand out fewer columns (no
    token_type_ids, so the model used 0) shared the key with all of them, and a held engine served the first
    format's test gradients for the second (0.13 off the second's fresh table). Rows whose stored attention mask was
    left out (the collator makes one) were refused as tokenising to other lengths."""
    from hf_fastif.batches import Batcher

    model, train, _, collator = data
    rows = make_token_dataset(3, seed=1).map(lambda r: {"token_type_ids": [1] * len(r["input_ids"])})
    full = rows.with_format("torch")
    fewer = rows.with_format("torch", columns=["input_ids", "attention_mask", "labels"])
    every = rows.with_format("torch", columns=["input_ids"], output_all_columns=True)
    keys = {Batcher(d, rows.column_names, None, "cpu").fingerprint for d in (rows, full, fewer, every)}
    assert len(keys) == 4
    args = default_arguments(**BASE | dict(influence_solver="exact", influence_params=[r"classifier\."]))
    with InfluenceEngine(model, args, data_collator=collator) as engine:
        held = [engine.compute_influences(train, test).to_pandas().sort_values(["test_id", "train_id"]).influence
                for test in (full, fewer)]
    fresh = compute_influences(model, train, fewer, args, data_collator=collator).to_pandas()
    np.testing.assert_allclose(held[1], fresh.sort_values(["test_id", "train_id"]).influence, rtol=1e-6)
    assert not np.allclose(held[0], held[1])  # (the model reads token types: the two formats differ)


def test_features_that_decode_the_stored_values_are_part_of_the_key():
    """A cast to features that decode the stored values otherwise (an image mode, an audio sampling rate) keeps the
    stored bytes: the key hashes such features too; plain values keep the bare content hash."""
    from datasets import Features, Image

    from hf_fastif.batches import Batcher

    rows = Dataset.from_dict({"image": [{"bytes": b"\0\1", "path": None}], "labels": [0]},
                             features=Features(image=Image(), labels=Value("int64")))
    grey = rows.cast_column("image", Image(mode="L"))
    assert dataset_fingerprint(rows) == dataset_fingerprint(grey)  # the stored bytes are the same
    one, two = (Batcher(d, d.column_names, None, "cpu").fingerprint for d in (rows, grey))
    assert one != two
