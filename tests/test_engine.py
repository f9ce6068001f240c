"""The engine's caches are keyed on content and owned by the engine: never stale, and reused when nothing they
depend on changed. The trunk cache changes no number."""

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from hf_fastif import InfluenceEngine, InfluenceTrainer, compute_influences
from hf_fastif.fingerprint import callable_fingerprint, model_fingerprint
from hf_fastif.influence import default_arguments
from hf_fastif.utils import write_atomic
from tests.tiny import HEAD_ONLY, TOP, VOCAB, make_token_dataset, tiny_model, train_tiny

BASE = dict(influence_params=TOP["bert"], influence_damping=0.05, influence_scale=20.0,
            influence_recursion_depth=20, influence_batch_size=2, influence_repetitions=2, disable_tqdm=True)


@pytest.fixture(scope="module")
def data(pad_collator_module):
    train, test = make_token_dataset(40, seed=0), make_token_dataset(3, seed=1)
    model = train_tiny(tiny_model("bert"), train, pad_collator_module, epochs=5)
    return model, train, test


@pytest.fixture(scope="module")
def pad_collator_module():
    from tests.tiny import pad_collator_for_tests

    return pad_collator_for_tests()


def saved_file(folder: Path, prefix: str) -> Path:
    """The one file `save_caches` wrote in ``folder`` whose name starts with ``prefix`` (its names carry the save's
    token); a trunk's states, not their row table."""
    found = [p for p in folder.iterdir() if p.name.startswith(prefix) and not p.name.endswith("-rows.npy")]
    assert len(found) == 1, found
    return found[0]


def candidates(table):
    return {t: sorted(table.for_test(t).train_id.tolist()) for t in table.test_ids}


def test_feature_functions_of_a_bad_shape_or_not_finite_values_are_named(data, pad_collator):
    """Features of another shape crashed inside faiss (a bare AssertionError, "too many values to unpack"), and a test
    row whose feature was inf or NaN silently got no candidates: it left the table without a word."""
    model, train, test = data
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=5)))
    first = torch.tensor([r[1] for r in test["input_ids"]]).max().item()  # a token of a test row's second position
    for feature, message in (
            (lambda m, b: b["input_ids"][:, 0].float(), r"of shape \(\d+,\) for a batch of \d+ rows"),
            (lambda m, b: b["input_ids"][:, :2, None].float(), r"of shape \(\d+, 2, 1\)"),
            (lambda m, b: b["input_ids"].float(), "columns"),  # its width is the batch's padded length
            (lambda m, b: torch.where(b["input_ids"][:, 1:2] == first, float("nan"), 1.0 * b["input_ids"][:, 1:2]),
             r"not finite \(inf or NaN\) for the rows at positions \[\d+.*\]"),
            # NaN for every row: the padding probe took it for features that read the padding ("difference nan")
            (lambda m, b: torch.full((len(b["input_ids"]), 2), float("nan")),
             # (the first five of the first batch: batches go by length, `Batcher.length_order`)
             r"not finite \(inf or NaN\) for the rows at positions \[\d+, \d+, \d+, \d+, \d+\] \(kNN features\)")):
        with pytest.raises(ValueError, match=message):
            compute_influences(model, train, test, args, data_collator=pad_collator, features=feature)


def test_a_feature_function_that_reads_the_padding_is_refused(data, pad_collator):
    """A features= callable that averaged over every position, padding included, gave a row another vector in
    another batch: its kNN candidates changed with the number of processes (a 2-process launch picked row 17 where
    one process picked row 15), without a word. The same function over the real tokens only is used."""
    model, train, test = data
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=5)))

    def padded_mean(m, batch):
        return m.bert.embeddings.word_embeddings(batch["input_ids"]).mean(1)

    def token_mean(m, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (m.bert.embeddings.word_embeddings(batch["input_ids"]) * mask).sum(1) / mask.sum(1)

    assert len(set(map(len, train["input_ids"]))) > 1  # (rows of several lengths: a batch pads)
    with pytest.raises(ValueError, match=r"The features= callable gives candidate row \d+ another vector when it is "
                                         r"padded next to row \d+ .*reads the padding"):
        compute_influences(model, train, test, args, data_collator=pad_collator, features=padded_mean)
    assert len(compute_influences(model, train, test, args, data_collator=pad_collator, features=token_mean)) \
        == 5 * len(test)


def test_two_feature_functions_never_share_an_index(data, pad_collator):
    """The 2021-style module cache keyed by id() reused the first lambda's index for a second lambda that got the
    same address. Each lambda now gets its own nearest rows."""
    model, train, test = data
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=5)))
    found = []
    for column in (0, 1):
        def feature(m, batch, column=column):
            return batch["input_ids"][:, column : column + 1].float()  # a different feature per lambda

        found.append(candidates(compute_influences(model, train, test, args, data_collator=pad_collator,
                                                   features=feature)))
        del feature
    ids = np.asarray(train["input_ids"], dtype=object)
    for t, row in enumerate(test["input_ids"]):
        for column, got in enumerate(found):
            distances = np.array([abs(r[column] - row[column]) for r in ids])
            assert distances[got[t]].max() <= np.sort(distances)[4]  # within the 5 nearest on that feature


def test_the_trainer_swaps_its_engine_when_the_collator_changes(data, pad_collator, tmp_path):
    from hf_fastif import InfluenceArguments

    model, train, test = data
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **BASE,
                              influence_solver="cg", influence_knn_k=5, influence_knn_features="mean")
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    first = candidates(trainer.compute_influences(test))
    engine = trainer.influence_engine()
    assert trainer.influence_engine() is engine  # held across calls

    def truncating(features):
        return pad_collator([{**f, "input_ids": f["input_ids"][:2], "attention_mask": f["attention_mask"][:2]}
                             for f in features])

    trainer.data_collator = truncating
    second = candidates(trainer.compute_influences(test))
    assert trainer.influence_engine() is not engine
    expected = candidates(compute_influences(model, train, test, args, data_collator=truncating))
    assert second == expected and second != first


def test_the_trainer_keeps_its_engine_for_an_equal_collator_and_watches_the_new_one(data, pad_collator, tmp_path,
                                                                                      monkeypatch):
    """The same collator object is not keyed again on every call (`collator_key` reads the tokenizer's vocabulary: it
    ran on every call, seconds for a collator reading large module-level data); an equal new collator keeps the
    engine and its caches, and the engine then watches the new one (it watched the old object: the new one's padding
    set to the left went unseen)."""
    import hf_fastif.engine.core as engine_module
    from hf_fastif import InfluenceArguments
    from hf_fastif.fingerprint import collator_key

    model, train, test = data
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **BASE,
                              influence_solver="cg", influence_knn_k=None)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=copy.deepcopy(pad_collator))
    trainer.compute_influences(test)
    engine = trainer.influence_engine()
    keyed = []
    monkeypatch.setattr(engine_module, "collator_key", lambda c, *a: keyed.append(c) or collator_key(c, *a))
    trainer.compute_influences(test)
    assert trainer.influence_engine() is engine and keyed == []
    trainer.data_collator = copy.deepcopy(pad_collator)  # equal, another object
    trainer.compute_influences(test)
    assert trainer.influence_engine() is engine and engine.data_collator is trainer.data_collator and len(keyed) == 1
    trainer.data_collator.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="changes when it is padded"):
        trainer.compute_influences(test)


def test_the_trainer_keeps_its_engine_with_label_smoothing(data, pad_collator, tmp_path):
    """With ``label_smoothing_factor`` set, the trainer compared the loss function's fingerprint with the engine's
    loss key, which holds the smoothing too: never equal, so every call made a new engine (every cache again)."""
    from hf_fastif import InfluenceArguments

    model, train, test = data
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **BASE,
                              influence_solver="cg", influence_knn_k=None, label_smoothing_factor=0.1)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    trainer.compute_influences(test)
    engine = trainer.influence_engine()
    trainer.compute_influences(test)
    assert trainer.influence_engine() is engine


def test_model_fingerprint_covers_buffers_config_and_in_place_edits():
    model = tiny_model("bert")
    base = model_fingerprint(model)
    model.bert.embeddings.position_ids.add_(0)  # touching a buffer without a change
    assert model_fingerprint(model) == base
    model.bert.embeddings.token_type_ids.fill_(1)  # a buffer
    assert model_fingerprint(model) != base
    other = tiny_model("bert")
    other.config.problem_type = "multi_label_classification"  # config changes what the loss is
    assert model_fingerprint(other) != base
    other = tiny_model("bert")
    other.classifier.weight.data[0, 0] += 1.0  # .data bumps no version counter
    assert model_fingerprint(other) != base
    assert model_fingerprint(tiny_model("bert")) == base  # the same weights loaded again


def test_a_forward_with_labels_does_not_change_the_fingerprint(pad_collator):
    """transformers writes `config.problem_type` on a model's first forward with labels (an evaluation loop): the
    same weights were then "another model" to `check_model`, and a resumed build was refused. The value it infers
    counts as unset; one set otherwise still counts, and tables recorded the old way still match."""
    from hf_fastif import InfluenceTable

    model = tiny_model("bert")
    table = InfluenceTable.from_arrays([0], [0], [0.1], {"model": {
        "name_or_path": "tiny", "class": type(model).__name__, "fingerprint": model_fingerprint(model)}})
    before = model_fingerprint(model)
    with torch.no_grad():
        model(**pad_collator([{"input_ids": [1, 5, 6], "labels": 1}]))
    assert model.config.problem_type == "single_label_classification"
    assert model_fingerprint(model) == before
    table.check_model(model)
    old_style = InfluenceTable.from_arrays([0], [0], [0.1], {"model": {
        "name_or_path": "tiny", "fingerprint": model_fingerprint(model, inferred_problem_type=False)}})
    assert old_style.metadata["model"]["fingerprint"] != before
    old_style.check_model(model)
    model.config.problem_type = "multi_label_classification"
    assert model_fingerprint(model) != before


def test_tensor_digest_hashes_shape_dtype_and_every_byte():
    import hashlib

    import xxhash

    from hf_fastif.fingerprint import LEGACY_SCHEME, tensor_digest

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header, data = b"(2, 3):torch.float32", t.numpy().tobytes()
    assert tensor_digest(t) == xxhash.xxh3_128(header + data).hexdigest()
    assert tensor_digest(t, LEGACY_SCHEME) == hashlib.sha256(header + data).hexdigest()  # what older tables hold
    assert tensor_digest(t.t()) != tensor_digest(t)  # a transposed view: same bytes re-laid, other shape
    assert tensor_digest(t.flip(0)) != tensor_digest(t)  # same shape and values, other order
    assert tensor_digest(torch.zeros(0, 3)) != tensor_digest(torch.zeros(3, 0))  # no bytes: the header decides
    assert tensor_digest(t.t().contiguous().t()) == tensor_digest(t)  # a non-contiguous view: hashed by value
    flipped = t.clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest bit of one float
    assert tensor_digest(flipped) != tensor_digest(t)
    assert tensor_digest(t.to(torch.bfloat16)) != tensor_digest(t)  # the dtype is hashed too


def test_callable_fingerprint_sees_code_closures_and_collator_settings(pad_collator):
    def make(k):
        return lambda m, b: b["input_ids"][:, :k]

    assert callable_fingerprint(make(1)) == callable_fingerprint(make(1))
    assert callable_fingerprint(make(1)) != callable_fingerprint(make(2))
    assert callable_fingerprint(lambda m, b: 1) != callable_fingerprint(lambda m, b: 2)
    from transformers import DataCollatorWithPadding

    a = DataCollatorWithPadding(pad_collator.tokenizer)
    b = DataCollatorWithPadding(pad_collator.tokenizer, max_length=4, padding="max_length")
    assert callable_fingerprint(a) == callable_fingerprint(DataCollatorWithPadding(pad_collator.tokenizer))
    assert callable_fingerprint(a) != callable_fingerprint(b)


def _weighted_loss_object(weights):
    """A loss object whose ``__call__`` reaches its computation through ``self.`` (a helper method closing over the
    weights, and a static method): its key followed ``__call__`` alone."""
    w = torch.tensor(weights, dtype=torch.float64)

    class WeightedLoss:
        def __call__(self, outputs, batch):
            return self.per_row(outputs, batch) * self.scale(len(weights))

        def per_row(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none") * w[
                batch["labels"]]

        @staticmethod
        def scale(k):
            return 1.0

    return WeightedLoss()


def test_a_callable_objects_key_follows_the_functions_its_call_reaches(tmp_path, pad_collator):
    """``__call__`` reaching its work through ``self.`` (a helper method, a static method, a DataCollatorMixin's
    ``torch_call``) changed what an object computes without changing its key: a held trainer served the first loss
    object's table for a second one (72% off), and saved caches the trunk states of another collator (8.7% off), in a
    review. So did a tokenizer's ``model_input_names`` (which columns its ``pad`` returns)."""
    from dataclasses import dataclass

    from transformers import DataCollatorWithPadding
    from transformers.data.data_collator import DataCollatorMixin

    from hf_fastif.fingerprint import collator_key, portable_fingerprint

    same, other = _weighted_loss_object([1.0, 1.0]), _weighted_loss_object([1.0, 4.0])
    assert callable_fingerprint(same) == callable_fingerprint(_weighted_loss_object([1.0, 1.0]))
    assert callable_fingerprint(same) != callable_fingerprint(other)
    assert portable_fingerprint(same) != portable_fingerprint(other)

    def collator_class(shift):
        @dataclass
        class Shifted(DataCollatorMixin):
            tokenizer: object
            return_tensors: str = "pt"

            def torch_call(self, rows):
                batch = self.tokenizer.pad(rows, return_tensors="pt")
                batch["input_ids"] = batch["input_ids"] + shift * batch["attention_mask"]
                return batch
        return Shifted

    tokenizer = pad_collator.tokenizer
    assert callable_fingerprint(collator_class(0)(tokenizer)) == callable_fingerprint(collator_class(0)(tokenizer))
    assert callable_fingerprint(collator_class(0)(tokenizer)) != callable_fingerprint(collator_class(1)(tokenizer))
    names = list(tokenizer.model_input_names)
    before = collator_key(DataCollatorWithPadding(tokenizer))
    try:
        tokenizer.model_input_names = ["input_ids"]
        assert collator_key(DataCollatorWithPadding(tokenizer)) != before
    finally:
        tokenizer.model_input_names = names
    # a held trainer given the second loss object computes its influence, not the first one's
    from hf_fastif import InfluenceArguments

    model, train, test = tiny_model("bert"), make_token_dataset(12, seed=0), make_token_dataset(1, seed=1)
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True,
                              influence_solver="cg", influence_damping=0.5, influence_scale=20.0,
                              influence_knn_k=None, influence_params=[r"pooler\.", r"classifier\."])
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    first = trainer.compute_influences(test, loss_fn=same).to_pandas().influence.to_numpy()
    held = trainer.compute_influences(test, loss_fn=other).to_pandas().influence.to_numpy()
    fresh = InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=other).compute_influences(
        train, test).to_pandas().influence.to_numpy()
    np.testing.assert_allclose(held, fresh, rtol=1e-10, atol=0)
    assert np.abs(held - first).max() > 1e-3 * np.abs(first).max()


def _h3(x):
    return x + 1


def _h2(x):
    return _h3(x) * 2


def _h1(x):
    return _h2(x) - 1


class _Options:  # (a plain settings object: counted by its values where the walk reaches it, else by its address)
    def __init__(self):
        self.t = 1.0


class _ChainLoss:
    def __init__(self):
        self.options = _Options()

    def __call__(self, outputs, batch):
        return self.helper(outputs)

    def helper(self, outputs):
        return _h1(outputs) / self.options.t


def test_a_callable_objects_key_follows_what_wraps_its_functions_and_stays_portable():
    """What a class wraps its functions in (lru_cache, cached_property, partialmethod) and its plain values count
    too; and the walk through the methods stays within the depth a function loss's walk has: one level deeper, a loss
    object whose helper called three nested module-level functions was cut, and `portable_fingerprint` fell back to
    addresses (another key in every process: a build that never resumes, a launch refused), in a review."""
    import functools

    from hf_fastif.fingerprint import portable_fingerprint

    assert portable_fingerprint(_ChainLoss()) == portable_fingerprint(_ChainLoss())

    def make(k, factor, cached, partial):
        class Loss:
            FACTOR = factor

            def __call__(self, outputs, batch):
                return self.scaled(outputs) * self.FACTOR + self.bias + self.shift(outputs)

            @functools.cache  # noqa: B019 (a user's cached method, as written in the wild)
            def scaled(self, outputs):
                return outputs * k

            @functools.cached_property
            def bias(self):
                return cached

            def _shift(self, outputs, by):
                return outputs + by

            shift = functools.partialmethod(_shift, by=partial)
        return Loss()

    base = callable_fingerprint(make(1, 2, 0.0, 1))
    assert base == callable_fingerprint(make(1, 2, 0.0, 1))
    for changed in (make(2, 2, 0.0, 1), make(1, 3, 0.0, 1), make(1, 2, 0.5, 1), make(1, 2, 0.0, 2)):
        assert callable_fingerprint(changed) != base


CLASS_WEIGHTS = torch.tensor([1.0, 1.0], dtype=torch.float64)
SCALE = 1.0


def _helper_scale():
    return SCALE


def _weighted_loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], weight=CLASS_WEIGHTS,
                                             reduction="none") * _helper_scale()


SHIFT = 0
COLLATOR_TOKENIZER = None


def _global_collator(rows):
    batch = COLLATOR_TOKENIZER.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                   return_tensors="pt")
    shifted = 1 + (batch["input_ids"] - 1 + SHIFT) % (VOCAB - 1)  # (other real tokens; the padding, 0, stays)
    batch["input_ids"] = torch.where(batch["attention_mask"].bool(), shifted, batch["input_ids"])
    batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return batch


def test_a_held_engine_sees_the_globals_its_collator_reads(data, pad_collator, monkeypatch):
    """A collator function's fingerprint was taken again only when its plain settings changed, which left out the
    module-level values it reads: after a global constant changed, a held engine kept its trunk states and served
    values 0.035 off a fresh engine's; after the global tokenizer's padding_side became "left", it kept its padding
    check and returned a table where a fresh engine refuses the model's padding."""
    import sys

    model, train, test = data
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "COLLATOR_TOKENIZER", copy.deepcopy(pad_collator.tokenizer))
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=None)))
    with InfluenceEngine(model, args, data_collator=_global_collator) as held:
        held.compute_influences(train, test)
        monkeypatch.setattr(module, "SHIFT", 3)
        got = held.compute_influences(train, test).to_pandas()
        with InfluenceEngine(model, args, data_collator=_global_collator) as fresh:
            assert got.equals(fresh.compute_influences(train, test).to_pandas())
        monkeypatch.setattr(module, "SHIFT", 0)
        COLLATOR_TOKENIZER.padding_side = "left"
        with pytest.raises(ValueError, match="changes when it is padded"):
            held.compute_influences(train, test)


def test_a_held_engine_sees_hooks_and_plain_module_attributes(data, pad_collator):
    """The caches were keyed on the weights, config and adapters only: a forward hook registered on a layer below
    the split (activation patching, an ablation) left a held engine serving the old trunk states (values 0.014 off a
    fresh engine's), and a LayerNorm's eps set to 0.1 the old kNN candidates. Both are part of the keys now (not of
    the fingerprint a table records)."""
    model, train, test = data
    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=6)))

    def fresh():
        with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
            return engine.compute_influences(train, test).to_pandas()

    recorded = model_fingerprint(model)
    with InfluenceEngine(model, args, data_collator=pad_collator) as held:
        first = held.compute_influences(train, test).to_pandas()
        handle = model.bert.encoder.layer[0].output.register_forward_hook(lambda m, a, out: out * 1.5)
        try:
            hooked = held.compute_influences(train, test)
            assert hooked.to_pandas().equals(fresh())
            assert hooked.metadata["model"]["fingerprint"] == recorded  # (the table's record: the weights)
        finally:
            handle.remove()
        norm = model.bert.embeddings.LayerNorm
        eps = norm.eps
        norm.eps = 0.1
        try:
            assert held.compute_influences(train, test).to_pandas().equals(fresh())
        finally:
            norm.eps = eps
        assert held.compute_influences(train, test).to_pandas().equals(first)  # back as it was


def test_a_hook_that_records_activations_keeps_the_held_engines_caches(data, pad_collator, monkeypatch):
    """Hooks count by `callable_fingerprint`, which hashed the list a recording hook appends to: it changed on every
    forward, so a held engine rebuilt its trunk states (and every other cache) on every call (MiniLM, Arnoldi: 3.0 s a
    call became 22-25 s), hashing every tensor recorded so far. Such a record counts by its identity; a tensor the
    hook computes with (a steering vector changed in place) still by its values."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    recorded, by_layer = [], {}
    steer = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def record(module, args, out):
        recorded.append(out.detach())
        by_layer["output"] = (out.detach(),)

    def steering(module, args, out):
        return out + steer

    args = default_arguments(**(BASE | dict(influence_solver="cg", influence_knn_k=None)))
    layer = model.bert.encoder.layer[0].output
    handles = [layer.register_forward_hook(record), layer.register_forward_hook(steering)]
    try:
        with InfluenceEngine(model, args, data_collator=pad_collator) as held:
            first = held.compute_influences(train, test).to_pandas()
            assert recorded and built == [len(train), len(test)]
            # the dict entry the first call wrote may be a setting moved while it ran: the second call is keyed anew,
            # once; the list that grew is a record at once
            for _ in range(3):
                assert held.compute_influences(train, test).to_pandas().equals(first)
            assert built == [len(train), len(test)] * 2
            steer += 0.5  # in place: the hook now computes something else
            got = held.compute_influences(train, test).to_pandas()
            assert built[4:] == [len(train), len(test)] and not got.equals(first)
            with InfluenceEngine(model, args, data_collator=pad_collator) as fresh:
                assert got.equals(fresh.compute_influences(train, test).to_pandas())
    finally:
        for handle in handles:
            handle.remove()


def test_callable_fingerprint_sees_the_globals_a_function_reads(data, pad_collator, monkeypatch):
    """A loss reading module-level class weights kept its fingerprint when they changed: a held engine served the
    Hessian of the old loss (0.54 off), and a resumed build mixed shards of both losses. The globals it reads (and
    those of the functions it calls) are part of it now; modules and other objects count by type, so the
    fingerprint is the same in another process."""
    import sys

    module = sys.modules[__name__]
    before = callable_fingerprint(_weighted_loss)
    assert callable_fingerprint(_weighted_loss) == before
    monkeypatch.setattr(module, "CLASS_WEIGHTS", torch.tensor([1.0, 5.0], dtype=torch.float64))
    changed = callable_fingerprint(_weighted_loss)
    assert changed != before
    monkeypatch.setattr(module, "SCALE", 2.0)  # read by a helper the loss calls
    assert callable_fingerprint(_weighted_loss) != changed
    model, train, test = data
    args = default_arguments(**(BASE | {"influence_solver": "exact", "influence_params": [r"classifier\."]}))
    with InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=_weighted_loss) as engine:
        engine.compute_influences(train, test)
        monkeypatch.setattr(module, "CLASS_WEIGHTS", torch.tensor([1.0, 1.0], dtype=torch.float64))
        held = engine.compute_influences(train, test).to_pandas()
    fresh = compute_influences(model, train, test, args, data_collator=pad_collator,
                               loss_fn=_weighted_loss).to_pandas()
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=1e-14)


def test_function_fingerprints_read_loaded_globals_only_and_match_across_processes(tmp_path):
    """Attribute names (`outputs.logits`) pulled in same-named globals of the caller's module, and a set literal in a
    helper (a frozenset constant, in hash order) or a global object array (pointers) made the fingerprint differ in
    every process: a resumed build was refused, and processes of one run disagreed."""
    import subprocess
    import sys

    scope = {"torch": torch, "logits": torch.zeros(2)}
    exec("def loss(outputs, batch):\n    return outputs.logits.sum(-1)", scope)
    first = callable_fingerprint(scope["loss"])
    scope["logits"] = torch.ones(2)
    assert callable_fingerprint(scope["loss"]) == first
    del scope["logits"]
    assert callable_fingerprint(scope["loss"]) == first
    (tmp_path / "user_loss.py").write_text(
        "import numpy as np\n"
        "NAMES = np.array(['a', 'b', None], dtype=object)\n"
        "def helper(kind):\n    return kind in {'ce', 'cross_entropy', 'xent', 'nll', 'focal'}\n"
        "def loss(outputs, batch):\n    return outputs.logits.sum(-1) * helper('ce') * len(NAMES)\n")
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import user_loss; "
              "from hf_fastif.fingerprint import callable_fingerprint; print(callable_fingerprint(user_loss.loss))")
    prints = {subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parents[1])],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(prints) == 1 and len(next(iter(prints))) == 64


def test_plain_objects_behind_a_loss_are_never_taken_for_one_another():
    """Counting plain objects by their attributes (with addresses taken out) made a `__slots__` object's instances,
    or settings nested one object deeper, look alike: a build resumed with another loss's numbers (21 off). Such
    objects count by their repr (their address), so two instances never share a fingerprint."""
    from hf_fastif.fingerprint import portable_fingerprint

    class Slotted:
        __slots__ = ("weights",)

        def __init__(self, weights):
            self.weights = weights

        def loss(self, outputs, batch):
            return outputs.logits.sum(-1)

    class Config:
        def __init__(self, weights):
            self.inner = Slotted(weights)

    class Owner:
        def __init__(self, weights):
            self.config = Config(weights)

        def loss(self, outputs, batch):
            return outputs.logits.sum(-1)

    class SlottedCall:
        __slots__ = ("scale",)

        def __init__(self, scale):
            self.scale = scale

        def __call__(self, outputs, batch):
            return outputs.logits.sum(-1) * self.scale

    assert callable_fingerprint(Slotted([1, 1]).loss) != callable_fingerprint(Slotted([1, 9]).loss)
    first, second = Owner([1, 1]), Owner([1, 9])  # settings nested deeper: live instances are told apart
    assert callable_fingerprint(first.loss) != callable_fingerprint(second.loss)
    # what processes compare: by content, followed deeper
    assert portable_fingerprint(first.loss) != portable_fingerprint(second.loss)
    assert portable_fingerprint(Slotted([1, 1]).loss) != portable_fingerprint(Slotted([1, 9]).loss)
    assert portable_fingerprint(Owner([1, 1]).loss) == portable_fingerprint(first.loss)
    assert callable_fingerprint(SlottedCall(0.1)) != callable_fingerprint(SlottedCall(5.0))  # a callable object
    # objects made and freed in turn (their addresses reused): other settings, other fingerprints
    assert len({callable_fingerprint(Slotted([w]).loss) for w in (0.1, 1.0, 5.0, 0.5)}) == 4
    # settings of the loss's object changed in place between calls (a held engine served the old loss's Hessian, 38x
    # off); a settings object one level deeper is counted by its identity only (docs/safety.md)
    loss = Slotted([1, 1])
    before = callable_fingerprint(loss.loss)
    loss.weights = [1, 9]
    assert callable_fingerprint(loss.loss) != before


PLAIN_OBJECT_COLLATOR = """
import torch

class Options:  # a plain settings object with the default repr (its address)
    def __init__(self, pad_to):
        self.pad_to = pad_to

class Deep:  # settings nested past the portable depth
    def __init__(self, value, depth):
        self.inner = Deep(value, depth - 1) if depth else value

class MyCollator:
    def __init__(self, pad_to=8, deep=None):
        self.options, self.deep = Options(pad_to), deep

    def __call__(self, rows):
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows])}
"""


def test_a_collator_holding_a_plain_object_is_the_same_in_every_process(tmp_path):
    """A collator holding a plain object (default repr: its address) had another fingerprint in every process: each
    launch with it was refused as "processes disagree on ['functions']" (launched with the same script), and a build
    with it was never resumed ("holds another build"). What processes compare and builds record now describes such
    objects by their content; settings nested too deep for that keep the address (never taken for one another)."""
    import subprocess
    import sys

    from hf_fastif.fingerprint import portable_fingerprint

    (tmp_path / "my_collator.py").write_text(PLAIN_OBJECT_COLLATOR)
    sys.path.insert(0, str(tmp_path))
    try:
        import my_collator
    finally:
        sys.path.remove(str(tmp_path))
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import my_collator; "
              "from hf_fastif.fingerprint import portable_fingerprint; "
              "print(portable_fingerprint(my_collator.MyCollator()))")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parents[1])],
                           capture_output=True, text=True, check=True).stdout.strip()
    here = portable_fingerprint(my_collator.MyCollator())
    assert here == other and len(here) == 64
    assert callable_fingerprint(my_collator.MyCollator()) != callable_fingerprint(my_collator.MyCollator())
    assert portable_fingerprint(my_collator.MyCollator(pad_to=16)) != here  # other settings, another fingerprint
    deep = [my_collator.MyCollator(deep=my_collator.Deep(value, 8)) for value in (1, 2)]  # cut at the depth limit
    assert portable_fingerprint(deep[0]) != portable_fingerprint(deep[1])
    assert portable_fingerprint(deep[0]) == callable_fingerprint(deep[0])  # (the address-based one)


def test_the_portable_fingerprint_never_takes_one_state_for_another():
    """Described by content, objects whose state Python cannot see (a random generator, a pandas frame's blocks) or
    shows only in part (a pyarrow Table's repr: its first and last rows) looked alike with other state: a build with
    a changed collator was resumed (0.70 off a fresh build). Such objects now fall back to their identity; sets and
    dict keys are described so that they are the same in every process and never alike for other values."""
    import operator
    import subprocess
    import sys

    import pyarrow as pa

    from hf_fastif.fingerprint import portable_fingerprint

    class Holder:
        def __init__(self, value):
            self.value = value

        def __call__(self, rows):
            return rows

    frames = [pd.DataFrame({"a": np.arange(1000)}) for _ in range(2)]
    frames[1].loc[500, "a"] = -1
    tables = [pa.table({"a": np.arange(1000)}), pa.table({"a": np.r_[np.arange(500), -1, np.arange(501, 1000)]})]
    for one, other in ((torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)), tuple(frames),
                       tuple(tables), ({1: "a"}, {"1": "a"}), (np.random.RandomState(1), np.random.RandomState(2))):
        assert portable_fingerprint(Holder(one)) != portable_fingerprint(Holder(other))
        assert callable_fingerprint(Holder(one)) != callable_fingerprint(Holder(other))
    for one, other in ((operator.itemgetter("a"), operator.itemgetter("b")),
                       (torch.ones(2).matmul, torch.zeros(2).matmul)):
        assert portable_fingerprint(one) != portable_fingerprint(other)
        assert callable_fingerprint(one) != callable_fingerprint(other)

    class Broken:
        def __init__(self):
            self.x = 1

        def __repr__(self):
            raise RuntimeError("no repr")

    assert portable_fingerprint(Holder(Broken())) != portable_fingerprint(Holder(Broken()))  # (falls back)

    class CallableInC:  # called through a C function, no attributes: described by its repr, which raises
        __slots__ = ()
        __call__ = staticmethod(len)

        def __repr__(self):
            raise RuntimeError("no repr")

    both = CallableInC(), CallableInC()  # (both alive: by identity)
    for fingerprint in (callable_fingerprint, portable_fingerprint):  # (raised RuntimeError: no repr)
        assert fingerprint(both[0]) != fingerprint(both[1])
    script = ("import sys; sys.path[:0] = [sys.argv[1]]; from hf_fastif.fingerprint import portable_fingerprint; "
              "exec('class H:\\n def __init__(s): s.words = {\\'[CLS]\\', \\'[SEP]\\', \\'x\\', \\'y\\'}\\n def "
              "__call__(s, r): return r'); print(portable_fingerprint(H()))")
    prints = {subprocess.run([sys.executable, "-c", script, str(Path(__file__).parents[1])], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
              for seed in ("1", "2", "3")}
    assert len(prints) == 1 and len(next(iter(prints))) == 64  # a set's repr follows its hashes: per process


def test_a_collator_function_reading_a_global_tokenizer_counts_its_settings(tmp_path):
    """A module-level collator function padding with a global tokenizer counted the tokenizer by its type only: after
    `tokenizer.padding_side = "left"` its fingerprint was the same, and a build was resumed with other batches."""
    import sys

    from hf_fastif.fingerprint import portable_fingerprint

    (tmp_path / "global_tokenizer_collator.py").write_text(
        "from hf_fastif.data import build_tokenizer\n"
        "tokenizer = build_tokenizer()\n"
        "def collate(rows):\n    return tokenizer.pad(rows, return_tensors='pt')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import global_tokenizer_collator as module
    finally:
        sys.path.remove(str(tmp_path))
    before = callable_fingerprint(module.collate), portable_fingerprint(module.collate)
    module.tokenizer.padding_side = "left"
    assert callable_fingerprint(module.collate) != before[0] and portable_fingerprint(module.collate) != before[1]


def test_a_held_engine_probes_padding_and_the_cut_again_for_a_new_loss(pad_collator):
    """The padding probe and the read-position cut were decided once per weights and data, not per loss: after
    `engine.loss_fn` became one that reads every position of the last layer, a held engine kept the cut (0.99 off)
    and skipped the padding probe that refuses such a loss in a fresh engine."""
    import torch.nn.functional as F

    model = tiny_model("bert")
    model.config.output_hidden_states = True
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)

    def every_position(outputs, batch):  # reads the last layer everywhere, padding included
        hidden = outputs.hidden_states[-1]
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") + 0.01 * (hidden ** 2).sum((1, 2))

    args = default_arguments(**(BASE | {"influence_solver": "cg", "influence_damping": 5.0}))
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        assert engine.compute_influences(train, test).metadata["diagnostics"]["readout"]["cut_after"] is not None
        engine.loss_fn = every_position
        with pytest.raises(ValueError, match="changes when it is padded next to row"):
            engine.compute_influences(train, test)


@pytest.mark.parametrize("solver", ["cg", "lissa", "arnoldi"])
@pytest.mark.parametrize("candidates_by", ["all", "auto", "gradient"])
def test_the_trunk_cache_changes_no_number(data, pad_collator, solver, candidates_by):
    model, train, test = data
    settings = BASE | dict(influence_solver=solver, influence_arnoldi_rank=16, influence_projection_dim=64,
                           influence_knn_k=None if candidates_by == "all" else 8,
                           influence_knn_features="auto" if candidates_by == "all" else candidates_by)
    tables = [compute_influences(model, train, test, default_arguments(**settings, influence_trunk_cache=cached),
                                 data_collator=pad_collator) for cached in (True, False)]
    assert tables[0].metadata["diagnostics"]["trunk"]["split"] == "bert.encoder.layer.1"
    assert tables[1].metadata["diagnostics"]["trunk"]["split"] is None
    a, b = (t.to_pandas().sort_values(["test_id", "train_id"]).reset_index(drop=True) for t in tables)
    np.testing.assert_array_equal(a.train_id, b.train_id)
    np.testing.assert_allclose(a.influence, b.influence, rtol=1e-9, atol=1e-12)


def test_the_trunk_states_are_computed_once_per_engine(data, pad_collator, monkeypatch):
    import hf_fastif.engine as engine_module

    model, train, test = data
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_knn_k=None), data_collator=pad_collator)
    engine.compute_influences(train, test)
    engine.compute_influences(train, make_token_dataset(2, seed=7))
    assert built == [len(train), len(test), 2]  # the training rows once; each test set once
    with torch.no_grad():  # a step on the top only (as HANS correction takes) keeps the trunk states
        model.classifier.weight.add_(0.01)
    engine.compute_influences(train, test)
    assert built == [len(train), len(test), 2]
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1.01)
    engine.compute_influences(train, test)
    assert built[3:] == [len(train), len(test)]


def test_logits_share_the_trunk_states_of_a_gradient_checkpointed_model(pad_collator, monkeypatch):
    """`logits` read the modules' state inside influence_mode, which turns gradient checkpointing (and its
    input-gradient hook) off, while `compute_influences` reads it before: on a model left checkpointed by a Trainer,
    the training rows' trunk states were computed and held a second time."""
    import hf_fastif.engine as engine_module

    train, test = make_token_dataset(12, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert")
    model.gradient_checkpointing_enable()
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    with InfluenceEngine(model, default_arguments(**BASE, influence_knn_k=None), data_collator=pad_collator) as engine:
        engine.compute_influences(train, test)
        engine.logits(train)
        assert built == [len(train), len(test)] and len(engine._trunks) == 2
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())  # (given back)


def test_the_exact_hessian_is_built_once_per_weights(data, pad_collator, monkeypatch):
    """'exact' built its p x p Hessian (p Hessian-vector products over every training row) on every call; an
    engine now keeps its eigendecomposition for the same weights, data and loss, and builds it again when the
    weights change. The numbers equal a fresh engine's."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    model = copy.deepcopy(model)
    built, real = [], engine_module.s_test.build_hessian
    monkeypatch.setattr(engine_module.s_test, "build_hessian", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    args = default_arguments(**BASE | dict(influence_solver="exact", influence_knn_k=None,
                                           influence_params=HEAD_ONLY["bert"]))
    other = make_token_dataset(2, seed=7)
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        engine.compute_influences(train, test)
        second = engine.compute_influences(train, other)
        assert len(built) == 1
        fresh = compute_influences(model, train, other, args, data_collator=pad_collator)
        np.testing.assert_allclose(second.to_pandas().influence, fresh.to_pandas().influence, rtol=1e-10)
        with torch.no_grad():
            model.classifier.weight.add_(0.01)
        engine.compute_influences(train, test)
        assert len(built) == 3  # the fresh call's, then the new weights'

    class Tempered:  # a loss with a setting a user may change between calls
        temperature = 1.0

        def __call__(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs.logits / self.temperature, batch["labels"],
                                                     reduction="none")

    loss = Tempered()
    with InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss) as engine:
        engine.compute_influences(train, test)
        loss.temperature = 3.0  # changed in place: the cached Hessian was of the old loss (82% off, silently)
        held = engine.compute_influences(train, test)
        fresh = InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss).compute_influences(train, test)
        np.testing.assert_allclose(held.to_pandas().influence, fresh.to_pandas().influence, rtol=1e-10)


def test_a_row_drawn_again_by_lissa_is_collated_once_per_recursion(data, pad_collator, monkeypatch):
    import hf_fastif.engine as engine_module
    from hf_fastif.batches import Batcher

    model, train, test = data
    settings = dict(BASE, influence_batch_size=1, influence_recursion_depth=30, influence_knn_k=None,
                    influence_check_convergence=False,  # 2 x 30 draws of 1 row from 40 rows
                    influence_skip_unread_positions=False,  # its probe draws a single row too
                    influence_stack_repetitions="no")  # (a grouped step collates its rows together)
    reference = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    drawn, real = [], Batcher.batch
    monkeypatch.setattr(Batcher, "batch", lambda self, rows, **k: (
        drawn.append(tuple(rows)) if len(self) == len(train) and len(rows) == 1 and k.get("trunk", True) else None
    ) or real(self, rows, **k))
    table = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    seed = default_arguments(**settings).influence_seed
    draws = {tuple(engine_module.s_test.lissa_batches(len(train), 1, 30, seed, t)[j]) for t in (0, 1) for j in range(30)}
    assert len(drawn) == len(draws) < 60  # repeats were served from the recursion's memo
    np.testing.assert_array_equal(table.to_pandas().influence, reference.to_pandas().influence)
    monkeypatch.setattr(engine_module.s_test, "LISSA_GRAPH_BYTES", 0)  # no graph kept: the collated rows are
    drawn.clear()
    table = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    assert len(drawn) == len(draws)
    np.testing.assert_array_equal(table.to_pandas().influence, reference.to_pandas().influence)
    monkeypatch.setattr(engine_module.s_test, "LISSA_BATCH_MEMO_BYTES", 0)  # no room: every draw collated, same numbers
    drawn.clear()
    table = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    assert len(drawn) == 60
    np.testing.assert_array_equal(table.to_pandas().influence, reference.to_pandas().influence)


class _CountedHessian:
    """Counts the `BatchHessian`s the engine builds (each one a forward and a first backward)."""

    built: list[int] = []

    def __init__(self, fm, params, batch, **kwargs):
        from hf_fastif.hvp import BatchHessian

        self.hessian = BatchHessian(fm, params, batch, **kwargs)
        self.saved_bytes = self.hessian.saved_bytes
        _CountedHessian.built.append(len(next(iter(batch.values()))))

    def product(self, *args, **kwargs):
        return self.hessian.product(*args, **kwargs)

    def accumulate(self, *args, **kwargs):
        return self.hessian.accumulate(*args, **kwargs)


def test_a_row_drawn_again_by_lissa_keeps_its_first_backward(data, pad_collator, monkeypatch):
    """A row LiSSA draws again (B = 1, J·T > N) is multiplied from the graph of its first backward, kept from one draw
    to the next: one forward and first backward per distinct row instead of one per draw, with the same numbers to
    the bit. Past LISSA_GRAPH_BYTES a graph is built for each draw."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    settings = dict(BASE, influence_batch_size=1, influence_recursion_depth=30, influence_knn_k=None,
                    influence_repetitions=3, influence_check_convergence=False,
                    influence_stack_repetitions="no")  # (one product at a time: the grouped route keeps its own)
    args = default_arguments(**settings)
    draws = [tuple(engine_module.s_test.lissa_batches(len(train), 1, 30, args.influence_seed, t)[j])
             for t in range(3) for j in range(30)]
    assert len(set(draws)) < len(draws) == 90
    monkeypatch.setattr(engine_module.kept_graphs, "BatchHessian", _CountedHessian)
    runs = {}
    for budget in (engine_module.s_test.LISSA_GRAPH_BYTES, 0):
        monkeypatch.setattr(engine_module.s_test, "LISSA_GRAPH_BYTES", budget)
        _CountedHessian.built = []
        runs[budget] = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
        assert sum(rows == 1 for rows in _CountedHessian.built) == (len(set(draws)) if budget else 90)
    np.testing.assert_array_equal(*(r.sort_values(["test_id", "train_id"]).influence for r in runs.values()))


def test_a_held_engine_multiplies_the_next_calls_lissa_rows_from_kept_graphs(data, pad_collator, monkeypatch):
    """A later call with the same weights and training rows draws the same LiSSA batches: a held engine multiplies
    them from the graphs its call before kept (no forward and first backward; each distinct row's was built once per
    call; a later FastIF call on the MiniLM default 2.4x faster), with a fresh engine's numbers to the bit. Weights
    changed in place key them anew (built again, a fresh engine's numbers), and so do weights written in place with
    the same values; clear() frees them."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    model = copy.deepcopy(model)
    settings = dict(BASE, influence_batch_size=1, influence_recursion_depth=30, influence_knn_k=None,
                    influence_repetitions=3, influence_check_convergence=False,
                    influence_stack_repetitions="no")  # (one product at a time: the grouped route keeps its own)
    args = default_arguments(**settings)
    monkeypatch.setattr(engine_module.kept_graphs, "BatchHessian", _CountedHessian)

    def single_rows(run) -> tuple[int, pd.DataFrame]:
        _CountedHessian.built = []
        table = run().to_pandas().sort_values(["test_id", "train_id"])
        return sum(rows == 1 for rows in _CountedHessian.built), table

    def fresh() -> pd.DataFrame:
        return compute_influences(model, train, test.select([1]), args, data_collator=pad_collator).to_pandas() \
            .sort_values(["test_id", "train_id"])

    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        first, _ = single_rows(lambda: engine.compute_influences(train, test.select([0])))
        assert first > 0
        held = engine._lissa_graphs[1]  # between calls: the graphs, not the call nor its collated batches
        assert held.kept and held.call is None and not held.batches.kept
        built, again = single_rows(lambda: engine.compute_influences(train, test.select([1])))
        assert built == 0
        np.testing.assert_array_equal(again.influence, fresh().influence)
        with torch.no_grad():
            model.classifier.weight.mul_(1.05)
        built, changed = single_rows(lambda: engine.compute_influences(train, test.select([1])))
        assert built == first
        np.testing.assert_array_equal(changed.influence, fresh().influence)
        assert not np.array_equal(changed.influence, again.influence)
        # the same values written in place (weights restored, as HANS correction restores them between its runs):
        # autograd refuses a graph whose saved tensors were written since ("modified by an inplace operation", every
        # later call until clear()), so they are keyed on the tensors' in-place versions too and built again
        model.load_state_dict(model.state_dict())
        built, restored = single_rows(lambda: engine.compute_influences(train, test.select([1])))
        assert built == first
        np.testing.assert_array_equal(restored.influence, changed.influence)
        engine.clear()
        assert engine._lissa_graphs is None


@pytest.mark.parametrize("held_in", ["module attribute", "hook closure"])
def test_kept_graphs_that_read_a_tensor_written_in_place_are_built_again(data, pad_collator, held_in):
    """A tensor that LiSSA's kept graphs saved and that the keys see by its values only (a module's tensor attribute
    or a hook's, multiplied in: an ablation that zeroes it and restores it) written in place between two calls: the
    keys did not change, the graphs were served, and autograd refused every later call ("modified by an inplace
    operation") until clear(). They are dropped and built again: a fresh engine's numbers."""
    model, train, test = data
    model = copy.deepcopy(model)
    layer = model.bert.encoder.layer[1].output
    scale = torch.ones(model.config.hidden_size, dtype=torch.float64)
    if held_in == "module attribute":
        layer.scale = scale
        layer.register_forward_hook(lambda module, args, out: out * module.scale)
    else:
        layer.register_forward_hook(lambda module, args, out: out * scale)
    args = default_arguments(**dict(BASE, influence_batch_size=1, influence_recursion_depth=10, influence_knn_k=None,
                                    influence_repetitions=2, influence_check_convergence=False))
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        engine.compute_influences(train, test)
        assert engine._lissa_graphs[1].kept
        with torch.no_grad():
            saved = scale.clone()
            scale.zero_()
            scale.copy_(saved)
        again = engine.compute_influences(train, test).to_pandas().sort_values(["test_id", "train_id"])
    fresh = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas() \
        .sort_values(["test_id", "train_id"])
    np.testing.assert_array_equal(again.influence, fresh.influence)


def test_a_buffer_made_under_inference_mode_does_not_stop_a_held_engine(data, pad_collator):
    """LiSSA's kept graphs are keyed on every tensor's in-place version, which a tensor made under
    ``torch.inference_mode`` does not keep (reading it raises): a buffer a pipeline's forward re-registered under
    inference mode stopped every call. Such a tensor counts as version -1 (no graph can hold it), here and in the
    settings' descriptions of tensors by identity (a hook's list past its first 8 entries)."""
    from hf_fastif.fingerprint import collator_settings

    model, train, test = data
    model = copy.deepcopy(model)
    with torch.inference_mode():
        made = [torch.ones(3) for _ in range(10)]
    model.bert.register_buffer("scratch", made[0], persistent=False)
    args = default_arguments(**dict(BASE, influence_batch_size=1, influence_recursion_depth=10, influence_knn_k=None,
                                    influence_repetitions=2, influence_check_convergence=False))
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        engine.compute_influences(train, test)
        again = engine.compute_influences(train, test).to_pandas().sort_values(["test_id", "train_id"])
    fresh = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas() \
        .sort_values(["test_id", "train_id"])
    np.testing.assert_array_equal(again.influence, fresh.influence)

    def collate(rows):
        return rows if made else None

    assert collator_settings(collate) == collator_settings(collate)  # (entries past the 8th: by identity, version -1)


@pytest.mark.parametrize("solver", ["cg", "arnoldi"])
def test_the_mean_hessian_keeps_collated_batches_within_a_budget(data, pad_collator, monkeypatch, solver, capsys):
    """CG, arnoldi and exact kept every training row's collated batch (with its padded trunk states) for the whole
    solve: 3.9 GB beside 2.1 GB of memory-mapped trunk states on 22,000 rows. Past FULL_HVP_KEPT_BYTES they are
    collated again for each product, with the same numbers; arnoldi's one-off shows a progress bar."""
    model, train, test = data
    settings = dict(BASE, influence_solver=solver, influence_knn_k=None, influence_hvp_batch_size=8,
                    influence_arnoldi_rank=3, influence_cg_max_iterations=6)
    import hf_fastif.engine as engine_module
    from hf_fastif.batches import Batcher

    collated, real = [], Batcher.batch
    monkeypatch.setattr(Batcher, "batch", lambda self, rows, **k: (
        collated.append(len(rows)) if len(self) == len(train) and len(rows) == 8 else None) or real(self, rows, **k))
    reference = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    kept = len(collated)  # the solve's 5 batches collated once (and other stages' batches)
    monkeypatch.setattr(engine_module.s_test, "FULL_HVP_GRAPH_BYTES", 0)  # no graph kept: the collated batches are
    collated.clear()
    table = compute_influences(model, train, test, default_arguments(**settings), data_collator=pad_collator)
    assert len(collated) == kept
    np.testing.assert_array_equal(table.to_pandas().influence, reference.to_pandas().influence)
    monkeypatch.setattr(engine_module.s_test, "FULL_HVP_KEPT_BYTES", 0)  # no room: collated again for every product
    collated.clear()
    table = compute_influences(model, train, test, default_arguments(**settings | {"disable_tqdm": False}),
                               data_collator=pad_collator)
    assert len(collated) >= kept + 2 * len(train) // 8, (kept, len(collated))
    np.testing.assert_array_equal(table.to_pandas().influence, reference.to_pandas().influence)
    if solver == "arnoldi":
        assert "Hessian eigenpairs (arnoldi, 40 rows)" in capsys.readouterr().err


def test_the_mean_hessian_keeps_its_chunks_first_backward(data, pad_collator, monkeypatch):
    """A product with the mean Hessian (CG's iterations here) multiplies each chunk of rows from the graph of its first
    backward, built once for the solve, with the same numbers as building it for every product (past
    FULL_HVP_GRAPH_BYTES)."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    args = default_arguments(**BASE, influence_solver="cg", influence_knn_k=None, influence_hvp_batch_size=8,
                             influence_cg_max_iterations=6)
    monkeypatch.setattr(engine_module.kept_graphs, "BatchHessian", _CountedHessian)
    runs, chunks, default = {}, {}, engine_module.s_test.FULL_HVP_GRAPH_BYTES
    for budget in (default, 0):
        monkeypatch.setattr(engine_module.s_test, "FULL_HVP_GRAPH_BYTES", budget)
        _CountedHessian.built = []
        runs[budget] = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
        chunks[budget] = sum(rows == 8 for rows in _CountedHessian.built)
    assert chunks[default] == len(train) // 8
    assert chunks[0] >= 3 * len(train) // 8  # a graph per chunk and product
    np.testing.assert_array_equal(*(r.influence for r in runs.values()))


def test_gradient_candidates_find_the_most_influential_rows(data, pad_collator):
    """On a trained tiny BERT, gradient-space candidates at k = 10% of N hold most of the full scan's top rows at
    both ends, where kNN on features holds few."""
    model, train, test = data
    settings = BASE | dict(influence_solver="cg")
    full = compute_influences(model, train, test, default_arguments(**settings, influence_knn_k=None),
                              data_collator=pad_collator)
    recall = {}
    for method in ("gradient", "auto"):
        table = compute_influences(model, train, test, default_arguments(
            **settings, influence_knn_k=8, influence_knn_features=method, influence_projection_dim=512),
            data_collator=pad_collator)
        hits = []
        for t in full.test_ids:
            rows = set(table.for_test(t).train_id)
            hits += [len(set(full.lowest(t, 3).train_id) & rows) / 3, len(set(full.highest(t, 3).train_id) & rows) / 3]
        recall[method] = np.mean(hits)
    assert recall["gradient"] >= 0.8 and recall["gradient"] > recall["auto"], recall


def test_projection_size_is_checked(data, pad_collator):
    model, train, test = data
    args = default_arguments(**BASE, influence_knn_k=5, influence_knn_features="gradient",
                             influence_projection_dim=10**9)
    with pytest.raises(ValueError, match=r"influence_projection_dim=1000000000 must be between 1 and.*Lower it "
                                         r"\(e\.g\. influence_projection_dim=\d+;"):
        compute_influences(model, train, test, args, data_collator=pad_collator)
    with pytest.raises(ValueError, match="influence_projection_dim must be a whole number >= 1"):
        default_arguments(**BASE, influence_projection_dim=0)


def test_the_gradient_index_is_built_with_influence_knn_index(data, pad_collator):
    """`influence_knn_index` was read by the kNN over model features only: gradient-space candidates always came
    from an exact inner-product index, whatever the setting (and the table recorded the setting). The index is
    faiss's factory string over inner products now, keyed on it, and one faiss cannot make is refused."""
    model, train, test = data
    common = dict(BASE, influence_knn_k=6, influence_knn_features="gradient", influence_projection_dim=64)
    engine = InfluenceEngine(model, default_arguments(**common, influence_knn_index="HNSW8"), data_collator=pad_collator)
    approximate = engine.compute_influences(train, test)
    index = engine._gradient_index[1].index
    assert "HNSW" in type(index).__name__ and index.metric_type == faiss.METRIC_INNER_PRODUCT
    engine.args = default_arguments(**common)
    exact = engine.compute_influences(train, test)
    assert type(engine._gradient_index[1].index).__name__ == "IndexFlat"
    assert len(approximate) == len(exact)
    with pytest.raises(ValueError, match=r"influence_knn_index='Foo' could not be built over \d+ rows of 64"):
        compute_influences(model, train, test, default_arguments(**common, influence_knn_index="Foo"),
                           data_collator=pad_collator)


def test_candidate_recall_against_the_full_scan(data, pad_collator):
    model, train, test = data
    args = default_arguments(**BASE, influence_solver="cg", influence_projection_dim=256)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    rows = engine.candidate_recall(train, test, ks=[4, len(train)], methods=["auto", "gradient", "random"], ns=[3])
    by = {(r["method"], r["k"]): r for r in rows}
    for method in ("auto", "gradient", "random"):  # k = N holds everything
        assert by[(method, len(train))]["recall@3 helpful"] == by[(method, len(train))]["recall@3 harmful"] == 1.0
        assert by[(method, 4)]["k_fraction"] == 4 / len(train) and by[(method, 4)]["build_s"] >= 0
    assert by[("gradient", 4)]["recall@3 helpful"] > by[("random", 4)]["recall@3 helpful"]
    # the same numbers as comparing two tables by hand
    full = compute_influences(model, train, test, default_arguments(**BASE, influence_solver="cg",
                                                                    influence_knn_k=None), data_collator=pad_collator)
    knn = compute_influences(model, train, test, default_arguments(**BASE, influence_solver="cg", influence_knn_k=4),
                             data_collator=pad_collator)
    hand = np.mean([len(set(full.lowest(t, 3).train_id) & set(knn.for_test(t).train_id)) / 3 for t in full.test_ids])
    assert by[("auto", 4)]["recall@3 helpful"] == pytest.approx(hand)
    with pytest.raises(ValueError, match="Every k must be between 1 and the 40 candidate rows"):
        engine.candidate_recall(train, test, ks=[0])
    with pytest.raises(ValueError, match=r"ks are counts .*recall.resolve_ks\(\['5%'\], 40\) gives its count"):
        engine.candidate_recall(train, test, ks=["5%"])


def _masked_mean(states, batch):
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1)


def last_hidden_mean(model, batch):
    return _masked_mean(model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                        .last_hidden_state, batch)


def word_embedding_mean(model, batch):
    return _masked_mean(model.bert.embeddings.word_embeddings(batch["input_ids"]), batch)


def padded_word_embedding_mean(model, batch):  # reads the padding
    return model.bert.embeddings.word_embeddings(batch["input_ids"]).mean(1)


def test_candidate_recall_keys_each_callable_method_by_its_own_code(data, pad_collator):
    """Callables handed to candidate_recall were keyed by the engine's own features= (None): the second one was
    measured on the first one's kNN index, and its padding never probed (a review's repro). A numpy integer k, which
    the settings accept, reached faiss as it was (a bare SWIG TypeError)."""
    model, train, test = data
    args = default_arguments(**BASE, influence_solver="cg", influence_knn_k=np.int64(5))

    def recall(methods):
        engine = InfluenceEngine(model, args, data_collator=pad_collator)
        return engine.candidate_recall(train, test, ks=[5], methods=methods, ns=[5])

    (alone,) = recall([word_embedding_mean])
    first, second = recall([last_hidden_mean, word_embedding_mean])
    assert (first["method"], second["method"]) == ("last_hidden_mean", "word_embedding_mean")
    assert {k: v for k, v in second.items() if "recall" in k} == {k: v for k, v in alone.items() if "recall" in k}
    with pytest.raises(ValueError, match="reads the padding"):
        recall([last_hidden_mean, padded_word_embedding_mean])
    for features in ("auto", "gradient"):
        table = compute_influences(model, train, test, default_arguments(
            **BASE, influence_solver="cg", influence_knn_k=np.int64(5), influence_knn_features=features,
            influence_projection_dim=64), data_collator=pad_collator)
        assert table.to_pandas().groupby("test_id").size().tolist() == [5] * len(test)


def test_index_settings_that_cannot_work_fail_before_s_test(data, pad_collator, monkeypatch):
    """candidate_recall built the kNN indexes after s_test and the full scan (the CLI after fine-tuning too), and
    'IDMap,Flat' failed in the gradient index's add with faiss's own error, after s_test."""
    model, train, test = data

    def no_s_test(*args, **kwargs):
        raise AssertionError("s_test was computed before the bad setting was refused")

    monkeypatch.setattr(InfluenceEngine, "_s_test_of", no_s_test)
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_solver="cg", influence_knn_index="IVF64,Flat"),
                             data_collator=pad_collator)
    with pytest.raises(ValueError, match="influence_knn_index='IVF64,Flat' could not be built over 40 rows"):
        engine.candidate_recall(train, test, ks=[4], methods=["auto", "random"], ns=[3])
    for features in ("auto", "gradient"):
        args = default_arguments(**BASE, influence_solver="cg", influence_knn_k=4, influence_knn_features=features,
                                 influence_projection_dim=64, influence_knn_index="IDMap,Flat")
        with pytest.raises(ValueError, match="influence_knn_index='IDMap,Flat' could not be built"):
            compute_influences(model, train, test, args, data_collator=pad_collator)
    # checked without building the indexes: two feature methods are built once each (a first fix built each twice,
    # the rebuild counted as query time)
    monkeypatch.undo()
    from hf_fastif import engine as engine_module

    builds = []
    real = engine_module.candidates.build_index
    monkeypatch.setattr(engine_module.candidates, "build_index", lambda *a, **k: builds.append(1) or real(*a, **k))
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_solver="cg"), data_collator=pad_collator)
    rows = engine.candidate_recall(train, test, ks=[4, 8], methods=["auto", "cls"], ns=[3])
    assert len(builds) == 2 and all(row["build_s"] > 0 for row in rows)


@pytest.mark.usefixtures("propagating")
def test_an_approximate_index_that_finds_fewer_than_k_rows_says_so(data, pad_collator, caplog):
    """An IVF index searches one list by default: a call asked for k candidates got fewer, without a word."""
    model, train, test = data
    for features, extra in (("auto", {}), ("gradient", {"influence_projection_dim": 64})):
        caplog.clear()
        args = default_arguments(**BASE, influence_solver="cg", influence_knn_k=30, influence_knn_features=features,
                                 influence_knn_index="IVF8,Flat", **extra)
        with caplog.at_level(logging.WARNING):
            table = compute_influences(model, train, test, args, data_collator=pad_collator)
        sizes = table.to_pandas().groupby("test_id").size()
        assert sizes.min() < 30 and "found fewer than influence_knn_k = 30 candidates" in caplog.text, features
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            compute_influences(model, train, test, default_arguments(
                **BASE, influence_solver="cg", influence_knn_k=30, influence_knn_features=features, **extra),
                data_collator=pad_collator)
        assert "found fewer than" not in caplog.text  # an exact index: every k rows, no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # candidate_recall measures the index as it is: no warning there
        InfluenceEngine(model, default_arguments(**BASE, influence_solver="cg", influence_knn_index="IVF8,Flat"),
                        data_collator=pad_collator).candidate_recall(train, test, ks=[30], methods=["auto"], ns=[3])
    assert "found fewer than" not in caplog.text


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW8"])
@pytest.mark.usefixtures("propagating")
def test_k_equal_to_the_candidate_count_is_every_row_on_an_approximate_index(data, pad_collator, factory, caplog):
    """k = N went through the faiss search, which on IVF / HNSW returned fewer rows (33 or 80 of 120 pairs where k =
    N + 1 gave all 120); an HNSW shortfall was explained by IVF's lists."""
    model, train, test = data
    n = len(train)
    full = compute_influences(model, train, test, default_arguments(**BASE, influence_solver="cg", influence_knn_k=None),
                              data_collator=pad_collator).to_pandas()
    at_n = compute_influences(model, train, test, default_arguments(
        **BASE, influence_solver="cg", influence_knn_k=n, influence_knn_index=factory), data_collator=pad_collator)
    assert at_n.to_pandas().equals(full)
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_solver="cg", influence_knn_index=factory),
                             data_collator=pad_collator)
    (recall,) = engine.candidate_recall(train, test, ks=[n], methods=["auto"], ns=[3])
    assert recall["recall@3 helpful"] == recall["recall@3 harmful"] == 1.0
    from hf_fastif.knn import warn_short

    with caplog.at_level(logging.WARNING):
        warn_short([np.arange(3)], 5, 10, "The kNN index", factory)
    assert ("HNSW index searches a bounded neighbourhood" in caplog.text) == (factory == "HNSW8")
    assert ("(IVF) searches one list" in caplog.text) == (factory != "HNSW8")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # an IVF index whose quantizer is an HNSW graph falls short as IVF does
        warn_short([np.arange(3)], 5, 10, "The kNN index", "IVF64_HNSW32,Flat")
    assert "(IVF) searches one list" in caplog.text and "HNSW index" not in caplog.text


def test_recall_is_recorded_in_the_metadata_when_asked(data, pad_collator):
    model, train, test = data
    table = compute_influences(model, train, test, default_arguments(
        **BASE, influence_solver="cg", influence_knn_k=len(train) // 2, influence_measure_recall=True),
        data_collator=pad_collator)
    recall = table.metadata["diagnostics"]["candidate_recall"]
    assert recall["method"] == "knn" and recall["random_expectation"] == 0.5
    assert 0.0 <= recall["recall@10 helpful"] <= 1.0
    # recall over every row is labelled as such (it read "recall@100" over 40 rows: always k/N)
    n = len(train)
    assert n < 100 and f"recall@{n} harmful" in recall and "recall@100 harmful" not in recall
    assert recall[f"recall@{n} helpful"] == recall[f"recall@{n} harmful"] == 0.5
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_solver="cg"), data_collator=pad_collator)
    (row,) = engine.candidate_recall(train, test, ks=[5], methods=["random"])  # default ns: 10 and 100 capped at N
    assert {"recall@10 helpful", f"recall@{n} helpful"} <= set(row) and "recall@100 helpful" not in row


def test_the_table_says_which_loss_and_test_quantity_it_holds(data, pad_collator):
    """A table of a measurement_fn (here the labelled class's logit: higher is better) had the metadata of a
    default-loss table, its semantics claiming grad L(z_test): another quantity (correlation -0.998 with the
    default), whose helpful / harmful read the other way round, said nowhere. And `add_text` labelled a
    combine="mean" table's one row, the anchors' mean loss, with the first anchor's text."""
    import torch.nn.functional as F

    def class_logit(outputs, batch):
        return outputs["logits"].gather(1, batch["labels"][:, None])[:, 0]

    def smoothed(outputs, batch):
        return F.cross_entropy(outputs["logits"], batch["labels"], reduction="none", label_smoothing=0.1)

    model, train, test = data
    args = default_arguments(**BASE, influence_solver="cg", influence_knn_k=None)
    plain = compute_influences(model, train, test, args, data_collator=pad_collator)
    assert plain.metadata["functions"] == {"loss_fn": None, "measurement_fn": None}
    assert "grad L(z_test)" in plain.metadata["semantics"]["influence"]
    table = compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=smoothed,
                               measurement_fn=class_logit)
    functions = table.metadata["functions"]
    assert functions["measurement_fn"]["name"].endswith("class_logit") and functions["loss_fn"]["name"].endswith(
        "smoothed")
    assert functions["measurement_fn"]["fingerprint"] == callable_fingerprint(class_logit)
    assert "grad m(z_test), m the measurement_fn" in table.metadata["semantics"]["influence"]
    from hf_fastif.table.card import dataset_card  # the Hub card said "negative is helpful" of any table

    card = str(dataset_card(table.metadata, len(table), columns=table.column_names))
    assert "∇m(z_test)`, m the measurement `" in card and "L is the loss `" in card
    assert "**negative is helpful**" in str(dataset_card(plain.metadata, len(plain), columns=plain.column_names))
    mean = compute_influences(model, train, test, args, data_collator=pad_collator, combine="mean")
    with pytest.raises(ValueError, match=f"test id 0 is the mean loss of {len(test)} test rows"):
        mean.add_text(test_dataset=test)
    assert "train_input_ids" in mean.add_text(train, columns=["input_ids"]).column_names


def test_logits_through_the_trunk_equal_the_model(data, pad_collator):
    from hf_fastif.applications.common import predict

    model, train, test = data
    engine = InfluenceEngine(model, default_arguments(**BASE), data_collator=pad_collator)
    np.testing.assert_allclose(engine.logits(train), predict(model, train, pad_collator), rtol=1e-6, atol=1e-7)
    assert len(engine._trunks) == 1
    with torch.no_grad():
        model.classifier.bias.add_(0.5)  # the top changed: the same trunk states, new logits
    np.testing.assert_allclose(engine.logits(train), predict(model, train, pad_collator), rtol=1e-6, atol=1e-7)
    assert len(engine._trunks) == 1
    with torch.no_grad():
        model.classifier.bias.sub_(0.5)


def test_saved_caches_serve_a_new_engine_and_only_the_same_model(data, pad_collator, tmp_path, monkeypatch):
    import hf_fastif.engine as engine_module

    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=6,
                             influence_knn_features="gradient", influence_projection_dim=64)
    first = InfluenceEngine(model, args, data_collator=pad_collator)
    expected = first.compute_influences(train, test).to_pandas()
    first.save_caches(tmp_path / "caches")
    second = InfluenceEngine(model, args, data_collator=pad_collator)
    assert set(second.load_caches(tmp_path / "caches")) == {"gradient_index", "low_rank", "trunk"}
    other = tiny_model("bert", seed=3)  # other weights: nothing saved may serve it
    third = InfluenceEngine(other, args, data_collator=pad_collator)
    third.load_caches(tmp_path / "caches")
    work = []
    monkeypatch.setattr(engine_module.s_test, "low_rank_hessian", lambda *a, **k: work.append("low_rank"))
    monkeypatch.setattr(engine_module.candidates, "build_gradient_index", lambda *a, **k: work.append("index"))
    real = engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: work.append(len(a[1])) or real(*a, **k))
    got = second.compute_influences(train, test).to_pandas()
    assert work == [] and got.equals(expected)
    with pytest.raises(TypeError):  # the patched builders ran (and returned None): the saved caches were not used
        third.compute_influences(train, test)
    assert len(work) >= 2 and work[0] == len(train)


def test_saved_caches_do_not_serve_other_model_code(data, pad_collator, tmp_path, monkeypatch):
    """The saved keys hold the weights and the config, not the model's code: a model class of one's own (a
    trust_remote_code modeling file) edited between a save and a load was served the old trunk states, low-rank
    Hessian and curvature (here the edit scales the embeddings, below the split: every influence changes)."""
    import importlib
    import sys

    source = ("from transformers import BertForSequenceClassification\n"
              "SCALE = {scale}\n\n\n"
              "class Scaled(BertForSequenceClassification):\n"
              "    def __init__(self, config):\n"
              "        super().__init__(config)\n"
              "        self.bert.embeddings.register_forward_hook(lambda m, a, out: out * SCALE)\n")
    model, train, test = data
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "scaled_embeddings.py").write_text(source.format(scale=1.0))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))

    def built():
        module = importlib.reload(importlib.import_module("scaled_embeddings"))
        scaled = module.Scaled(model.config).eval()
        scaled.load_state_dict(model.state_dict())
        return scaled

    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=None)
    with InfluenceEngine(built(), args, data_collator=pad_collator) as first:
        first.compute_influences(train, test)
        first.save_caches(tmp_path / "caches")
    with InfluenceEngine(built(), args, data_collator=pad_collator) as same:
        assert set(same.load_caches(tmp_path / "caches")) == {"low_rank", "trunk"}
    (tmp_path / "code" / "scaled_embeddings.py").write_text(source.format(scale=3.0))
    edited = built()
    try:
        with InfluenceEngine(edited, args, data_collator=pad_collator) as engine:
            assert engine.load_caches(tmp_path / "caches") == []
            got = engine.compute_influences(train, test).to_pandas()
        with InfluenceEngine(edited, args, data_collator=pad_collator) as fresh:
            assert got.equals(fresh.compute_influences(train, test).to_pandas())
    finally:
        sys.modules.pop("scaled_embeddings", None)


def test_a_loaded_gradient_index_not_yet_read_is_saved_again(data, pad_collator, tmp_path, monkeypatch):
    """The gradient index is read on first use: an engine that loaded a folder, made a call without gradient
    candidates and saved again left it out of the new manifest, so the next engine rebuilt it."""
    model, train, test = data
    grad = default_arguments(**BASE, influence_knn_k=6, influence_knn_features="gradient", influence_projection_dim=64)
    with InfluenceEngine(model, grad, data_collator=pad_collator) as engine:
        engine.compute_influences(train, test)
        engine.save_caches(tmp_path / "a")
    with InfluenceEngine(model, default_arguments(**BASE), data_collator=pad_collator) as engine:
        assert "gradient_index" in engine.load_caches(tmp_path / "a")
        engine.compute_influences(train, test)  # every row: the index is not read
        engine.save_caches(tmp_path / "a")  # the same folder
        engine.save_caches(tmp_path / "b")  # another one
    def rebuilt(*args, **kwargs):
        raise AssertionError("the gradient index was built again")

    monkeypatch.setattr("hf_fastif.engine.candidates.build_gradient_index", rebuilt)
    for folder in ("a", "b"):
        with InfluenceEngine(model, grad, data_collator=pad_collator) as engine:
            assert "gradient_index" in engine.load_caches(tmp_path / folder)
            engine.compute_influences(train, test)
            assert "gradient_index" not in engine.unused_loaded_caches()


@pytest.mark.usefixtures("propagating")
def test_a_folder_without_saved_caches_loads_nothing_with_a_warning(data, pad_collator, tmp_path, caplog):
    """A mistyped folder, or the one above the caches, is named (it returned [] silently)."""
    model, train, test = data
    engine = InfluenceEngine(model, default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8),
                             data_collator=pad_collator)
    engine.compute_influences(train, test)
    engine.save_caches(tmp_path / "run" / "caches")
    for folder, says in ((tmp_path / "run" / "cahces", "does not exist"),
                         (tmp_path / "run", "holds no hf_fastif_caches.json")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert engine.load_caches(folder) == []
        assert f"No engine caches loaded: {folder} {says}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert "low_rank" in engine.load_caches(tmp_path / "run" / "caches")
    assert "No engine caches loaded" not in caplog.text


@pytest.mark.usefixtures("propagating")
def test_a_damaged_cache_folder_is_skipped_with_a_warning(data, pad_collator, tmp_path, caplog):
    """Caches only save time: a folder that cannot be read (a truncated array, a damaged manifest) loads nothing,
    says so, and leaves the engine's own caches as they were; the call still gives the same numbers."""
    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=None)
    first = InfluenceEngine(model, args, data_collator=pad_collator)
    expected = first.compute_influences(train, test).to_pandas()
    first.save_caches(tmp_path / "caches")
    vectors = saved_file(tmp_path / "caches", "low_rank_vectors-")
    vectors.write_bytes(vectors.read_bytes()[:100])  # truncated after the trunk states
    second = InfluenceEngine(model, args, data_collator=pad_collator)
    with caplog.at_level(logging.WARNING):
        assert second.load_caches(tmp_path / "caches") == []
    assert "Could not read the engine caches" in caplog.text and not second._trunks
    assert second.compute_influences(train, test).to_pandas().equals(expected)
    from hf_fastif.engine.saved_caches import CACHE_MANIFEST

    saved = json.loads((tmp_path / "caches" / CACHE_MANIFEST).read_text())
    for shape in ([], saved | {"files": list(saved["files"])}):  # JSON of another shape: a bare AttributeError
        (tmp_path / "caches" / CACHE_MANIFEST).write_text(json.dumps(shape))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert second.load_caches(tmp_path / "caches") == []
        assert "is not a manifest save_caches writes" in caplog.text
    gradient = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=6,
                                 influence_knn_features="gradient", influence_projection_dim=64)
    indexed = InfluenceEngine(model, gradient, data_collator=pad_collator)
    with_index = indexed.compute_influences(train, test).to_pandas()
    indexed.save_caches(tmp_path / "indexed")
    index = saved_file(tmp_path / "indexed", "gradient-")
    index.write_bytes(index.read_bytes()[:64])
    manifest = json.loads((tmp_path / "indexed" / CACHE_MANIFEST).read_text())
    assert InfluenceEngine(model, gradient, data_collator=pad_collator).load_caches(tmp_path / "indexed") == []
    manifest.pop("files")  # a folder saved before file digests: the index is read on first use, not by
    (tmp_path / "indexed" / CACHE_MANIFEST).write_text(json.dumps(manifest))  # load_caches: rebuilt then, warned
    reader = InfluenceEngine(model, gradient, data_collator=pad_collator)
    assert "gradient_index" in reader.load_caches(tmp_path / "indexed")
    with caplog.at_level(logging.WARNING):
        assert reader.compute_influences(train, test).to_pandas().equals(with_index)
    assert "Could not read the saved gradient index" in caplog.text
    first.save_caches(tmp_path / "intact")
    (tmp_path / "intact" / CACHE_MANIFEST).write_text("{not json")  # a damaged manifest, intact arrays
    assert InfluenceEngine(model, args, data_collator=pad_collator).load_caches(tmp_path / "intact") == []
    # a value edited in place (same size, a valid array): served before, and it changed the influences
    first.save_caches(tmp_path / "edited")
    edited_file = saved_file(tmp_path / "edited", "trunk-0-")
    states = np.load(edited_file)
    states[0] += 1.0
    np.save(edited_file, states)
    edited = InfluenceEngine(model, args, data_collator=pad_collator)
    with caplog.at_level(logging.WARNING):
        assert edited.load_caches(tmp_path / "edited") == []
    assert f"{edited_file.name} changed since it was saved" in caplog.text
    assert edited.compute_influences(train, test).to_pandas().equals(expected)


@pytest.mark.usefixtures("propagating")
def test_a_save_cut_short_keeps_the_last_finished_one_and_no_save_leaves_files_behind(data, pad_collator, tmp_path,
                                                                                      caplog, monkeypatch):
    """save_caches removed the manifest first: a re-save interrupted (Ctrl-C) left a folder that loaded nothing,
    said to be "not a save_caches folder"; and a save holding fewer caches left the earlier save's files (the
    gradient index, the low-rank basis: GBs) named by no manifest, never removed."""
    import hf_fastif.engine.saved_caches as S

    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=6,
                             influence_knn_features="gradient", influence_projection_dim=64)
    folder = tmp_path / "caches"
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    expected = engine.compute_influences(train, test).to_pandas()
    engine.save_caches(folder)
    first = sorted(p.name for p in folder.iterdir())
    calls = []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # (the trunk states and their rows written: Ctrl-C)
            raise KeyboardInterrupt
        return write_atomic(path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(S, "write_atomic", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.save_caches(folder)
    reader = InfluenceEngine(model, args, data_collator=pad_collator)
    assert sorted(reader.load_caches(folder)) == ["gradient_index", "low_rank", "trunk", "trunk"]
    assert reader.compute_influences(train, test).to_pandas().equals(expected)
    assert reader.unused_loaded_caches() == []
    plain = default_arguments(**BASE, influence_solver="cg", influence_knn_k=None)
    fewer = InfluenceEngine(model, plain, data_collator=pad_collator)
    fewer.compute_influences(train, test)
    mine = [folder / "gradients.faiss", folder / "low_rank_approx.npy"]  # files of the user's: not the save's
    for path in mine:
        path.write_bytes(b"mine")
    fewer.save_caches(folder)  # trunk states only: the earlier save's files, and the cut one's, are removed
    assert all(path.read_bytes() == b"mine" for path in mine)
    left = sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(("hf_fastif_caches", ".hf_fastif")) and p not in mine)
    assert left and all(name.startswith("trunk-") for name in left) and not set(left) & set(first)
    cut = tmp_path / "cut"
    with monkeypatch.context() as patched:
        patched.setattr(S, "write_atomic", interrupted)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            engine.save_caches(cut)
    with caplog.at_level(logging.WARNING):
        assert InfluenceEngine(model, args, data_collator=pad_collator).load_caches(cut) == []
    assert "the save_caches that wrote its files was cut short before it finished" in caplog.text


def test_loaded_caches_that_serve_no_call_are_reported_and_can_be_dropped_before_saving(data, pad_collator, tmp_path):
    """Caches saved for other weights (or by another version: other keys) are read but never used; the engine says
    which kinds served nothing, and drops them so that a new save holds only what serves."""
    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8, influence_knn_k=6,
                             influence_knn_features="gradient", influence_projection_dim=64)
    kinds = ["gradient_index", "low_rank", "trunk"]
    first = InfluenceEngine(model, args, data_collator=pad_collator)
    first.compute_influences(train, test)
    first.save_caches(tmp_path / "old")
    same = InfluenceEngine(model, args, data_collator=pad_collator)
    same.load_caches(tmp_path / "old")
    assert same.unused_loaded_caches() == kinds  # nothing has served a call yet
    same.compute_influences(train, test)
    assert same.unused_loaded_caches() == []

    other = tiny_model("bert", seed=3)
    expected = InfluenceEngine(other, args, data_collator=pad_collator).compute_influences(train, test).to_pandas()
    stale = InfluenceEngine(other, args, data_collator=pad_collator)
    stale.load_caches(tmp_path / "old")
    assert stale.compute_influences(train, test).to_pandas().equals(expected)
    assert stale.unused_loaded_caches() == kinds
    held = len(stale._trunks)
    stale.forget_unused_loaded(kinds)
    assert stale.unused_loaded_caches() == [] and len(stale._trunks) == held - len(first._trunks)
    stale.save_caches(tmp_path / "new")
    again = InfluenceEngine(other, args, data_collator=pad_collator)
    assert set(again.load_caches(tmp_path / "new")) == set(kinds)
    assert again.compute_influences(train, test).to_pandas().equals(expected)
    assert again.unused_loaded_caches() == []  # all that was saved again serves


def test_a_save_that_fails_half_way_keeps_the_last_finished_one(data, pad_collator, tmp_path, monkeypatch):
    """A save writes new files under names of its own and replaces the manifest last: one that fails half way (a
    full disk) cannot pair the old keys with new arrays, and the last finished save still loads (it used to remove
    the manifest first: the folder then loaded nothing)."""
    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    expected = engine.compute_influences(train, test).to_pandas()
    engine.save_caches(tmp_path / "caches")
    loaded = InfluenceEngine(model, args, data_collator=pad_collator).load_caches(tmp_path / "caches")
    assert loaded

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        engine.save_caches(tmp_path / "caches")
    monkeypatch.undo()
    reader = InfluenceEngine(model, args, data_collator=pad_collator)
    assert reader.load_caches(tmp_path / "caches") == loaded
    assert reader.compute_influences(train, test).to_pandas().equals(expected) and not reader.unused_loaded_caches()


def test_a_cache_rebuilt_under_a_loaded_key_is_neither_served_nor_dropped(data, pad_collator, tmp_path, monkeypatch):
    """A loaded low-rank Hessian replaced (other weights) and then rebuilt for its key, and loaded trunk states pushed
    out of the engine and rebuilt under their key: the rebuilt caches are fresh, not "loaded", and
    `forget_unused_loaded` keeps them."""
    import hf_fastif.engine as engine_module

    model, train, test = data
    args = default_arguments(**BASE, influence_solver="arnoldi", influence_arnoldi_rank=8)
    first = InfluenceEngine(model, args, data_collator=pad_collator)
    first.compute_influences(train, test)
    first.save_caches(tmp_path / "caches")
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    engine.load_caches(tmp_path / "caches")
    loaded_low_rank, bias = engine._low_rank, model.classifier.bias.detach().clone()
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # other weights: another low-rank key, the loaded one is replaced
    engine.compute_influences(train, test)
    with torch.no_grad():
        model.classifier.bias.copy_(bias)
    engine.compute_influences(train, test)  # the original weights: the low-rank Hessian built again for its key
    assert engine._low_rank[0] == loaded_low_rank[0] and engine._low_rank is not loaded_low_rank
    assert "low_rank" not in engine.unused_loaded_caches()  # the rebuilt one is not the loaded one, nor served
    engine.forget_unused_loaded(["low_rank"])
    assert engine._low_rank[0] == loaded_low_rank[0]

    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    engine.load_caches(tmp_path / "caches")
    monkeypatch.setattr(engine_module.trunk_states, "MAX_TRUNK_CACHES", 1)
    engine.logits(test.select([0]))  # one row's trunk states push both loaded ones out, unused
    engine.logits(train)  # the training rows' states built again, under the key they were saved with
    held = list(engine._trunks)
    assert len(held) == 1 and engine.unused_loaded_caches() == ["low_rank"]
    engine.forget_unused_loaded(["trunk"])
    assert list(engine._trunks) == held



JVP_REFUSALS = {
    "autograd.Function": "In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, jacrev, "
                         "...), ...",
    "half tangent": "expected mat1 and mat2 to have the same dtype, but got: float != c10::BFloat16",
}
"""What torch.func.jvp raised: Bloom's GeLU (a custom autograd.Function without setup_context); a bfloat16 BERT on an
H200 (a float32 tangent out of a bfloat16 layer met the next Linear's weights: `benchmarks.device_agreement`)."""
JVP_SCORED = dict(influence_solver="exact", influence_damping=1.0, influence_knn_k=5,
                  influence_params=[r"encoder\.layer\.1\.", r"classifier\."])


def _same_tables(a, b) -> None:
    pd.testing.assert_frame_equal(*(t.to_pandas().sort_values(["test_id", "train_id"]).reset_index(drop=True)
                                    for t in (a, b)), check_exact=False, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("refusal", list(JVP_REFUSALS.values()), ids=list(JVP_REFUSALS))
def test_a_model_without_forward_mode_ad_is_scored_by_gradients(data, pad_collator, caplog, monkeypatch, refusal):
    """Where torch.func.jvp refuses the model (a custom autograd.Function without setup_context, as Bloom's GeLU;
    a half-precision model whose forward-mode tangents come out float32 on a GPU), the candidates are scored by
    per-example gradients: the same values as JVP scoring (a tiny BERT with jvp made to refuse), with a warning and a
    note in the diagnostics."""
    model, train, test = data
    expected = compute_influences(model, train, test, default_arguments(**JVP_SCORED), data_collator=pad_collator)

    def refuse(*args, **kwargs):
        raise RuntimeError(refusal)

    with monkeypatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(torch.func, "jvp", refuse)
        table = compute_influences(model, train, test, default_arguments(**JVP_SCORED), data_collator=pad_collator)
    assert "cannot run under forward-mode AD" in caplog.text
    assert refusal[:40] in table.metadata["diagnostics"]["scored_by"]["why"]
    assert "scored_by" not in expected.metadata["diagnostics"]
    _same_tables(table, expected)


def test_a_half_type_clash_inside_the_cut_layer_under_jvp_keeps_the_cut(data, pad_collator, monkeypatch):
    """The GPU's clash came from inside the last layer, after the cut's position: the cut's own error handler must
    pass it on to scoring (which scores by gradients, the cut kept) instead of taking it for the cut's failure; the
    same clash outside forward mode is the model's and is raised (before: every call raised it)."""
    import hf_fastif.loss as loss_module

    model, train, test = data
    expected = compute_influences(model, train, test, default_arguments(**JVP_SCORED), data_collator=pad_collator)
    cut = expected.metadata["diagnostics"]["readout"]["cut_after"]
    assert cut is not None and cut.startswith("bert.encoder.layer.1.")
    dense = model.bert.encoder.layer[-1].intermediate.dense  # runs after the cut, at the first position
    forward = dense.forward

    def clash(hidden):
        if loss_module._FORWARD_MODE.get():
            raise RuntimeError(JVP_REFUSALS["half tangent"])
        return forward(hidden)

    monkeypatch.setattr(dense, "forward", clash)
    table = compute_influences(model, train, test, default_arguments(**JVP_SCORED), data_collator=pad_collator)
    diagnostics = table.metadata["diagnostics"]
    assert diagnostics["readout"] == {"cut_after": cut}  # kept, not "failed on a batch"
    assert "float != c10::BFloat16" in diagnostics["scored_by"]["why"]
    _same_tables(table, expected)

    def always(hidden):
        raise RuntimeError(JVP_REFUSALS["half tangent"])

    monkeypatch.setattr(dense, "forward", always)
    with pytest.raises(RuntimeError, match="float != c10::BFloat16"):
        compute_influences(model, train, test, default_arguments(**JVP_SCORED), data_collator=pad_collator)


def test_bloom_runs_end_to_end_with_its_gelu_scored_by_gradients(data, pad_collator):
    """Bloom's GeLU (a custom autograd.Function without setup_context) stopped the call in scoring."""
    from transformers import BloomConfig, BloomForSequenceClassification

    _, train, test = data
    torch.manual_seed(0)
    bloom = BloomForSequenceClassification(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=2,
                                                       num_labels=3, pad_token_id=0)).double().eval()
    table = compute_influences(bloom, train, test, data_collator=pad_collator,  # h.1's GeLU runs under the JVP
                               args=default_arguments(**JVP_SCORED | {
                                   "influence_params": [r"h\.1\.", r"^score\."], "influence_solver": "lissa",
                                   "influence_recursion_depth": 5, "influence_scale": 100.0,
                                   "influence_check_convergence": False}))
    assert "scored_by" in table.metadata["diagnostics"] and np.isfinite(table.to_pandas()["influence"]).all()


def test_only_a_clash_of_float32_with_a_half_type_under_jvp_is_taken_for_forward_modes():
    """A float32 tangent meeting bfloat16 / float16 weights under jvp is forward mode's doing (the same forward ran
    in reverse mode before scoring); the same clash outside jvp, a clash of two half types or of other dtypes, or
    another error, is the model's and is raised."""
    from hf_fastif.loss import forward_ad_unsupported, forward_mode

    clashes = (JVP_REFUSALS["half tangent"], "expected scalar type Float but found BFloat16",
               "expected mat1 and mat2 to have the same dtype, but got: c10::Half != float")
    for text in clashes:
        assert forward_ad_unsupported(RuntimeError(text), under_jvp=True), text
        assert not forward_ad_unsupported(RuntimeError(text)), text  # outside forward_mode: the model's
        with forward_mode():
            assert forward_ad_unsupported(RuntimeError(text)), text
    for error in (RuntimeError("expected m1 and m2 to have the same dtype, but got: c10::Half != c10::BFloat16"),
                  RuntimeError("expected scalar type Long but found Half"),
                  RuntimeError("expected mat1 and mat2 to have the same dtype, but got: double != float"),
                  RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
                  ValueError(JVP_REFUSALS["half tangent"])):
        assert not forward_ad_unsupported(error, under_jvp=True), error
    assert forward_ad_unsupported(RuntimeError(JVP_REFUSALS["autograd.Function"]), under_jvp=False)


def test_loaded_caches_stay_bounded_and_a_replaced_index_is_not_served(data, pad_collator, tmp_path, monkeypatch,
                                                                       caplog):
    """Loaded trunk states were read whole into memory whatever their size, and added beyond the cap of cached
    trunks; a saved gradient index, read on first use, was served from whatever file another engine had saved into
    its folder since (other rows' candidates, no warning)."""
    import hf_fastif.engine as engine_module
    import hf_fastif.trunk as trunk_module

    model, train, test = data
    args = default_arguments(**BASE, influence_knn_k=6, influence_knn_features="gradient", influence_projection_dim=64)
    saver = InfluenceEngine(model, args, data_collator=pad_collator)
    parts = [train.select(range(i, i + 20)) for i in range(engine_module.trunk_states.MAX_TRUNK_CACHES)]
    for part in parts:
        saver.compute_influences(part, test)
    saver.save_caches(tmp_path / "caches")
    monkeypatch.setattr(trunk_module, "MEMORY_LIMIT_BYTES", 0)
    loader = InfluenceEngine(model, args, data_collator=pad_collator)
    loader.compute_influences(train.select(range(30, 40)), test)  # one cache of its own, then 4 loaded
    assert loader.load_caches(tmp_path / "caches").count("trunk") == engine_module.trunk_states.MAX_TRUNK_CACHES
    assert len(loader._trunks) == engine_module.trunk_states.MAX_TRUNK_CACHES
    mapped = Path("/proc/self/maps").read_text()
    assert str(saved_file(tmp_path / "caches", "trunk-0-")) in mapped  # memory-mapped, beyond the (patched) limit

    class ReadOnly:  # a folder where the lock file cannot be made: read without it, as before the lock
        def __init__(self, path):
            pass

        def acquire(self):
            raise PermissionError("read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module.saved_caches, "FileLock", ReadOnly)
        assert "gradient_index" in InfluenceEngine(model, args).load_caches(tmp_path / "caches")
    reader = InfluenceEngine(model, args, data_collator=pad_collator)
    reader.load_caches(tmp_path / "caches")  # the gradient index of parts[-1], read on first use
    other = InfluenceEngine(model, args, data_collator=pad_collator)
    other.compute_influences(train.select(range(24, 40)), test)
    other.save_caches(tmp_path / "caches")  # another engine's save replaces gradient.faiss under it
    expected = InfluenceEngine(model, args, data_collator=pad_collator).compute_influences(parts[-1], test)
    with caplog.at_level("WARNING"):
        got = reader.compute_influences(parts[-1], test)
    assert "changed since it was loaded" in caplog.text
    assert got.to_pandas().equals(expected.to_pandas())
    # another engine's save of the same index (its files carry a new name, the old one removed): read from there,
    # not built again (the diff review's repro: a rebuild, minutes on a real index)
    reader = InfluenceEngine(model, args, data_collator=pad_collator)
    reader.load_caches(tmp_path / "caches")
    same = InfluenceEngine(model, args, data_collator=pad_collator)
    same.load_caches(tmp_path / "caches")
    same.compute_influences(train.select(range(24, 40)), test)
    same.save_caches(tmp_path / "caches")
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = reader.compute_influences(train.select(range(24, 40)), test)
    assert "changed since it was loaded" not in caplog.text and reader.unused_loaded_caches() == []
    assert got.to_pandas().equals(same.compute_influences(train.select(range(24, 40)), test).to_pandas())


def test_a_failed_load_keeps_the_engines_own_caches_and_bf16_states_map(pad_collator, tmp_path, monkeypatch):
    """A load that failed late (a damaged curvature entry) put back the engine's own trunk caches already closed by
    the cap, and the next call failed ('NoneType' object has no attribute 'shape'); bfloat16 states, saved as
    float32, were read whole into memory beyond the limit."""
    import hf_fastif.engine as engine_module
    import hf_fastif.trunk as trunk_module

    model = tiny_model("bert", dtype=torch.bfloat16)
    train, test = make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**BASE, influence_knn_k=None)
    saver = InfluenceEngine(model, args, data_collator=pad_collator)
    expected = saver.compute_influences(train, test).to_pandas()
    saver.save_caches(tmp_path / "caches")
    monkeypatch.setattr(trunk_module, "MEMORY_LIMIT_BYTES", 0)
    mapped = InfluenceEngine(model, args, data_collator=pad_collator)
    assert "trunk" in mapped.load_caches(tmp_path / "caches")
    assert str(saved_file(tmp_path / "caches", "trunk-0-")) in Path("/proc/self/maps").read_text()
    assert mapped.compute_influences(train, test).to_pandas().equals(expected)

    own = InfluenceEngine(model, args, data_collator=pad_collator)
    for i in range(engine_module.trunk_states.MAX_TRUNK_CACHES):
        own.compute_influences(train.select(range(i, i + 12)), test)
    shutil.copytree(tmp_path / "caches", tmp_path / "damaged")
    manifest = json.loads((tmp_path / "damaged" / engine_module.saved_caches.CACHE_MANIFEST).read_text())
    manifest["curvature"] = [["damaged"]]
    (tmp_path / "damaged" / engine_module.saved_caches.CACHE_MANIFEST).write_text(json.dumps(manifest))
    assert own.load_caches(tmp_path / "damaged") == []
    assert all(cache.flat is not None for cache in own._trunks.values())
    own.compute_influences(train.select(range(0, 12)), test)


def test_each_engine_method_has_one_home():
    """`InfluenceEngine` gathers its stages' methods from one base class per module (hf_fastif/engine/): a name
    defined in two of them would be settled by the order of the bases, without a word."""
    from hf_fastif.engine import InfluenceEngine

    homes: dict[str, str] = {}
    for cls in InfluenceEngine.__mro__[:-1]:
        for name, value in vars(cls).items():
            if name.startswith("__") or not (callable(value) or isinstance(value, (property, staticmethod, classmethod))):
                continue
            assert name not in homes, f"{name} is defined in {homes.get(name)} and {cls.__name__}"
            homes[name] = cls.__name__
    assert len({homes[n] for n in homes}) == len(InfluenceEngine.__mro__) - 1  # every base holds methods
    assert homes["compute_influences"] == "InfluenceEngine" and homes["_check_lissa"] == "STestStage"
