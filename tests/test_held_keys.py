"""A held engine sees what changes a model's or a collator's numbers beside the tensors, the config and the data:
a collator changed through what it closes over, is bound to, wraps or reads from a module-level dict (its plain
settings were compared only at the top: the held engine served the old trunk states, 0.02 off a fresh engine's, and
the old padding check, returning a table a fresh engine refuses); a module's ``forward`` replaced on the instance
(the old trunk states, 2.5e-4 off); and a backward hook (the old Hessian and gradient index, 0.3% off)."""

import argparse
import copy
import functools
import itertools
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from hf_fastif import InfluenceEngine
from hf_fastif.fingerprint import portable_fingerprint
from hf_fastif.influence import default_arguments
from tests.tiny import VOCAB, make_token_dataset, pad_collator_for_tests, tiny_model, train_tiny

TOP = [r"encoder\.layer\.1\.output\.", r"pooler\.", r"classifier\."]  # (the trunk and the cut take part)
BASE = dict(influence_params=TOP, influence_damping=0.05, influence_scale=20.0, influence_knn_k=None,
            influence_solver="cg", disable_tqdm=True)


@pytest.fixture(scope="module")
def data():
    collator = pad_collator_for_tests()
    train, test = make_token_dataset(30, seed=0), make_token_dataset(3, seed=1)
    return train_tiny(tiny_model("bert"), train, collator, epochs=5), train, test, collator


def frame(table):
    return table.to_pandas().sort_values(["test_id", "train_id"]).reset_index(drop=True)


def held_and_fresh(model, args, collator, train, test, change):
    """A held engine's table after ``change()``, and a fresh engine's on the changed state."""
    with InfluenceEngine(model, args, data_collator=collator) as held:
        before = frame(held.compute_influences(train, test))
        change()
        after = frame(held.compute_influences(train, test))
    with InfluenceEngine(model, args, data_collator=collator) as fresh:
        return before, after, frame(fresh.compute_influences(train, test))


def shifted(tokenizer, rows, shift):
    """The rows padded with the real tokens shifted by ``shift`` (the padding, 0, stays)."""
    batch = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt")
    ids = 1 + (batch["input_ids"] - 1 + shift) % (VOCAB - 1)
    batch["input_ids"] = torch.where(batch["attention_mask"].bool(), ids, batch["input_ids"])
    batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return batch


SETTINGS = {"shift": 0}
TOKENIZER = None
OPTIONS = argparse.Namespace(shift=0)
TOKEN_MAP = list(range(300))  # a token-id map longer than `SETTINGS_BREADTH`, read by a collator function


class Settings:  # a script's settings object: neither a dataclass nor a namespace
    pass


CFG = Settings()
CFG.shift, CFG.temperature, CFG.scale = 0, 1.0, 1.0
CRITERION = torch.nn.CrossEntropyLoss(reduction="none")


def global_collate(rows):
    return shifted(TOKENIZER, rows, SETTINGS["shift"])


def object_collate(rows):
    return shifted(TOKENIZER, rows, CFG.shift)


def tempered_loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits / CFG.temperature, batch["labels"], reduction="none")


def criterion_loss(outputs, batch):
    return CRITERION(outputs.logits, batch["labels"])


def scaling_hook(module, args, out):
    return out * CFG.scale


def namespace_collate(rows):
    return shifted(TOKENIZER, rows, OPTIONS.shift)


def mapped_collate(rows):
    batch = shifted(TOKENIZER, rows, 0)
    return batch | {"input_ids": torch.tensor(TOKEN_MAP)[batch["input_ids"]]}


class CallableShifter:
    def __call__(self, rows):
        return shifted(TOKENIZER, rows, SETTINGS["shift"])


class Shifter:
    def __init__(self, tokenizer):
        self.tokenizer, self.shift = tokenizer, 0

    def collate(self, rows):
        return shifted(self.tokenizer, rows, self.shift)


@pytest.mark.parametrize("how", ["closure dict", "bound method", "global dict", "global namespace",
                                 "global settings object", "callable object reading a global dict", "closure tensor",
                                 "long global token map"])
def test_a_collator_changed_through_what_it_reaches_is_seen(data, how, monkeypatch):
    """(A module-level ``argparse.Namespace``, a callable collator object whose ``__call__`` reads a module-level
    dict, and a tensor a collator closes over changed in place were not followed either: the held engine served the
    old trunk states, 0.015 off a fresh engine's.)"""
    model, train, test, collator = data
    tokenizer = copy.deepcopy(collator.tokenizer)
    monkeypatch.setitem(globals(), "TOKENIZER", tokenizer)
    if how == "closure tensor":
        remap = torch.arange(VOCAB)

        def collate(rows):
            batch = shifted(tokenizer, rows, 0)
            return batch | {"input_ids": remap[batch["input_ids"]]}

        def change():
            remap[1:] = 1 + (remap[1:] - 1 + 3) % (VOCAB - 1)
    elif how == "long global token map":
        monkeypatch.setitem(globals(), "TOKEN_MAP", list(range(300)))
        collate = mapped_collate

        def change():
            TOKEN_MAP[1:VOCAB] = [1 + (i - 1 + 3) % (VOCAB - 1) for i in range(1, VOCAB)]  # in place, same length
    elif how == "global namespace":
        monkeypatch.setattr(OPTIONS, "shift", 0)
        collate = namespace_collate

        def change():
            OPTIONS.shift = 3
    elif how == "global settings object":  # (by its type's name only: 3.4e-4 of the values off a fresh engine's)
        monkeypatch.setattr(CFG, "shift", 0)
        collate = object_collate

        def change():
            CFG.shift = 3
    elif how == "callable object reading a global dict":
        monkeypatch.setitem(SETTINGS, "shift", 0)
        collate = CallableShifter()

        def change():
            SETTINGS["shift"] = 3
    elif how == "closure dict":
        options = {"shift": 0}

        def collate(rows):
            return shifted(tokenizer, rows, options["shift"])

        def change():
            options["shift"] = 3
    elif how == "bound method":
        shifter = Shifter(tokenizer)
        collate = shifter.collate

        def change():
            shifter.shift = 3
    else:
        monkeypatch.setitem(SETTINGS, "shift", 0)
        collate = global_collate

        def change():
            SETTINGS["shift"] = 3
    args = default_arguments(**BASE)
    before, held, fresh = held_and_fresh(model, args, collate, train, test, change)
    assert not np.allclose(before.influence, fresh.influence)  # (the change changes the numbers)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


def pad(rows, tokenizer):
    return tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt") \
        | {"labels": torch.tensor([r["labels"] for r in rows])}


def test_the_padding_side_of_a_tokenizer_a_partial_collator_holds_is_seen(data):
    """``functools.partial(pad, tokenizer=tokenizer)``: its tokenizer's padding side set to "left" after a call is
    refused by the padding probe, as a fresh engine refuses it (the held engine kept its padding check)."""
    model, train, test, collator = data
    tokenizer = copy.deepcopy(collator.tokenizer)
    args = default_arguments(**BASE)
    with InfluenceEngine(model, args, data_collator=functools.partial(pad, tokenizer=tokenizer)) as held:
        held.compute_influences(train, test)
        tokenizer.padding_side = "left"
        with pytest.raises(ValueError, match="changes when it is padded"):
            held.compute_influences(train, test)


def test_a_forward_replaced_on_a_module_below_the_split_is_seen(data):
    """``module.forward = ...`` on the instance (a patch, an ablation) below the split: the trunk states of the old
    forward were served."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    norm = model.bert.embeddings.LayerNorm
    own = norm.forward

    def change():
        norm.forward = lambda x: own(x) * 1.5

    before, held, fresh = held_and_fresh(model, default_arguments(**BASE), collator, train, test, change)
    assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("how", ["module", "function"])
def test_an_activation_swapped_for_another_without_parameters_is_seen(data, how):
    """A module without parameters swapped for another (``intermediate_act_fn = nn.Tanh()``), or the function an
    activation module holds replaced (``act = torch.tanh``), below the split: the held engine served the old trunk
    states and Hessian (4-17% off a fresh engine's, in a review), the modules' description naming neither the
    class nor a function attribute."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    intermediate = model.bert.encoder.layer[0].intermediate

    def change():
        if how == "module":
            intermediate.intermediate_act_fn = torch.nn.Tanh()
        else:
            intermediate.intermediate_act_fn.act = torch.tanh

    before, held, fresh = held_and_fresh(model, default_arguments(**BASE), collator, train, test, change)
    assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("settings", [dict(influence_solver="exact"),
                                      dict(influence_solver="arnoldi", influence_arnoldi_rank=8)])
def test_a_backward_hook_keys_the_curvature_caches(data, settings):
    """A backward hook registered between calls (gradients scaled in the pooler): the held engine served the Hessian
    and low-rank Hessian of the model without it (0.3% off a fresh engine's)."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    handles = []

    def change():
        handles.append(model.bert.pooler.register_full_backward_hook(
            lambda module, grad_input, grad_output: tuple(None if g is None else 2 * g for g in grad_input)))

    try:
        _, held, fresh = held_and_fresh(model, default_arguments(**(BASE | settings)), collator, train, test, change)
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


def test_a_collator_wrapped_in_a_lambda_is_followed_to_its_tokenizer(data):
    """``lambda rows: inner(rows)`` around a padding collator: `callable_fingerprint` stops at its depth before the
    tokenizer, so after ``inner.tokenizer.padding_side = "left"`` the held engine kept its padding check (and trunk
    states) and returned a table a fresh engine refuses."""
    model, train, test, collator = data
    inner = copy.deepcopy(collator)
    args = default_arguments(**BASE)
    with InfluenceEngine(model, args, data_collator=lambda rows: inner(rows)) as held:
        held.compute_influences(train, test)
        inner.tokenizer.padding_side = "left"
        with pytest.raises(ValueError, match="changes when it is padded"):
            held.compute_influences(train, test)


INNER = None


def calls_a_global_collator(rows):
    return INNER(rows)


def test_a_collator_object_a_collator_function_calls_from_its_module_is_followed(data, monkeypatch):
    """A module-level collator object that the collator function calls counted by its type in the settings: its
    tokenizer set to left padding kept the held engine's padding check."""
    model, train, test, collator = data
    monkeypatch.setitem(globals(), "INNER", copy.deepcopy(collator))
    with InfluenceEngine(model, default_arguments(**BASE), data_collator=calls_a_global_collator) as held:
        held.compute_influences(train, test)
        INNER.tokenizer.padding_side = "left"
        with pytest.raises(ValueError, match="changes when it is padded"):
            held.compute_influences(train, test)


@pytest.mark.usefixtures("propagating")
def test_a_backward_hook_is_warned_about_once(data, caplog):
    """Backward hooks reach influence's gradients and HVPs but not its forward-mode scoring: the values mix the hooked
    and the unhooked model, and nothing said so."""
    import logging

    model, train, test, collator = data
    model = copy.deepcopy(model)
    handle = model.bert.pooler.register_full_backward_hook(lambda module, grad_input, grad_output: None)
    try:
        with caplog.at_level(logging.WARNING), InfluenceEngine(model, default_arguments(**BASE),
                                                               data_collator=collator) as engine:
            engine.compute_influences(train, test)
            engine.compute_influences(train, test)
    finally:
        handle.remove()
    assert caplog.text.count("Backward hooks are registered on bert.pooler") == 1
    assert "its forward-mode scoring does not" in caplog.text


def test_a_forward_replaced_with_what_it_reads_changed_is_seen(data):
    """A replaced ``forward`` that adds a steering vector (changed in place) counted the tensor by its type, one
    replaced by another layer's bound forward counted that layer by its type, and vectors by layer in a dict were
    left out as a record: the held engine served the old trunk states (2%, 5e-4 and 1.1e-2 off a fresh engine's)."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    layers = model.bert.encoder.layer[0].attention.self, model.bert.encoder.layer[1].attention.self
    dense = model.bert.encoder.layer[0].output.dense
    own = dense.forward
    steer = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    by_layer = {"layer0": torch.zeros_like(steer)}
    dense.forward = lambda x: own(x) + steer + by_layer["layer0"]
    for change in (lambda: steer.add_(torch.linspace(-2, 2, len(steer), dtype=torch.float64)),
                   lambda: setattr(layers[0], "forward", layers[1].forward),
                   lambda: by_layer.update(layer0=torch.linspace(-1, 1, len(steer), dtype=torch.float64)),
                   lambda: by_layer["layer0"].mul_(3)):
        before, held, fresh = held_and_fresh(model, default_arguments(**BASE), collator, train, test, change)
        assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
        np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


@pytest.mark.usefixtures("propagating")
def test_what_the_engines_own_calls_record_keeps_its_caches(data, monkeypatch, caplog):
    """A backward hook that records gradient norms as floats, and a replaced forward that records ``.item()`` values,
    changed the modules' state on every forward: a held engine rebuilt every cache on every call (0.03 s became 0.8 s
    on a tiny BERT) and warned about the hook each time. What the engine's own last call left counts as unchanged; a
    change made between calls still keys the caches anew."""
    import logging

    import hf_fastif.engine as engine_module

    model, train, test, collator = data
    model = copy.deepcopy(model)
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    norms, means = [], []
    handle = model.bert.pooler.register_full_backward_hook(
        lambda module, grad_input, grad_output: norms.append(float(grad_output[0].detach().norm())))
    dense = model.bert.encoder.layer[1].output.dense  # (above the split: it runs in every call)
    own = dense.forward

    def recording(x):
        out = own(x)
        means.append(out.mean().item())
        return out

    dense.forward = recording
    try:
        with caplog.at_level(logging.WARNING), InfluenceEngine(model, default_arguments(**BASE),
                                                               data_collator=collator) as held:
            first = frame(held.compute_influences(train, test))
            recorded = len(norms), len(means)
            second = frame(held.compute_influences(train, test))
            assert len(norms) > recorded[0] and len(means) > recorded[1]  # (the records grew with the engine's calls)
            assert built == [len(train), len(test)]  # the trunk states of the first call, served to the second
            dense.eps_like_setting = 0.5  # a change between calls (a plain attribute): keyed anew
            held.compute_influences(train, test)
            assert built == [len(train), len(test)] * 2
    finally:
        handle.remove()
    pd.testing.assert_frame_equal(first, second)
    assert caplog.text.count("Backward hooks are registered on bert.pooler") == 1


def test_the_pad_token_of_a_wrapped_collators_tokenizer_is_seen():
    """``lambda rows: inner(rows)``: the pad token lives in the tokenizer's special-tokens map, which its plain
    settings left out (only the top-level collator's tokenizer had its pad id read), so on a GPT-2 classifier (which
    reads the last non-pad token) the held engine returned a table a fresh engine refuses."""
    collator = pad_collator_for_tests()
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    model = train_tiny(tiny_model("gpt2"), train, collator, epochs=2)
    inner = copy.deepcopy(collator)
    args = default_arguments(**(BASE | dict(influence_params=[r"score\."])))
    with InfluenceEngine(model, args, data_collator=lambda rows: inner(rows)) as held:
        held.compute_influences(train, test)
        inner.tokenizer.pad_token = "[UNK]"
        with pytest.raises(ValueError, match="changes when it is padded"):
            held.compute_influences(train, test)


def test_a_collator_reading_large_module_level_data_is_described_cheaply(monkeypatch):
    """A collator reading 100,000 module-level rows was described entry by entry on every call (3.5 s a call); a
    container past `SETTINGS_BREADTH` entries counts by its identity and length."""
    from hf_fastif.fingerprint import SETTINGS_BREADTH, collator_settings

    monkeypatch.setitem(globals(), "ROWS", [{"text": f"row {i}", "label": i % 2} for i in range(100_000)])

    def collate(rows):
        return [ROWS[i] for i in rows]  # noqa: F821 (set above)

    before = collator_settings(collate)
    assert len(repr(before)) < 2_000
    ROWS.append({"text": "one more", "label": 0})  # noqa: F821
    assert collator_settings(collate) != before  # (its length is seen)
    assert len(ROWS) > SETTINGS_BREADTH  # noqa: F821


def test_an_options_object_whose_getattr_raises_another_error_is_described(data):
    """An options object whose ``__getattr__`` raises KeyError (not AttributeError) stopped the engine's
    construction: ``getattr(value, "__code__", None)`` and the tokenizer probe's ``hasattr`` let it through."""
    model, train, test, collator = data

    class Options(dict):
        def __getattr__(self, name):
            return self[name]

    class Collate:
        def __init__(self):
            self.options = Options(shift=0)

        def __call__(self, rows):
            return collator(rows)

    with InfluenceEngine(model, default_arguments(**BASE), data_collator=Collate()) as engine:
        assert len(engine.compute_influences(train, test).to_pandas()) == len(train) * len(test)


def test_a_hook_registered_during_a_call_is_seen_by_the_next(data):
    """A loss function that registers a forward hook below the split during a call (after the trunk states): the
    state that call left was taken for the state it was keyed on, and the held engine served the trunk states without
    the hook for ever (2.7% off a fresh engine's)."""
    import torch.nn.functional as F

    model, train, test, collator = data
    model = copy.deepcopy(model)
    handles, uses = [], []
    steer = torch.linspace(-2, 2, model.config.hidden_size, dtype=torch.float64)

    def loss_fn(outputs, batch):
        uses.append(1)
        if len(uses) == 5 and not handles:
            handles.append(model.bert.encoder.layer[0].output.register_forward_hook(lambda m, i, out: out + steer))
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    args = default_arguments(**dict(BASE, influence_solver="exact"))  # (its eigendecomposition is kept between calls)
    try:
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as held:
            first = frame(held.compute_influences(train, test))
            assert handles  # (registered during the first call)
            second = frame(held.compute_influences(train, test))
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as fresh:
            expected = frame(fresh.compute_influences(train, test))
    finally:
        for handle in handles:
            handle.remove()
    assert not np.allclose(first.influence, expected.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(second.influence, expected.influence, rtol=1e-10, atol=0)


def test_what_a_collator_keeps_from_its_own_batches_keeps_the_caches(data, monkeypatch):
    """A collator keeping its last batch as an attribute: its settings (a tensor held directly, by its values) changed
    with every collation, and a held engine rebuilt its trunk states on every call; now once more only."""
    import hf_fastif.engine as engine_module

    model, train, test, collator = data
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))

    class Remembering:
        def __init__(self):
            self.last_ids = None

        def __call__(self, rows):
            batch = collator(rows)
            self.last_ids = batch["input_ids"]
            return batch

    with InfluenceEngine(model, default_arguments(**BASE), data_collator=Remembering()) as held:
        tables = [frame(held.compute_influences(train, test)) for _ in range(4)]
    # the first change during a call may be a setting moved while it ran: the second call is keyed anew, once
    assert built == [len(train), len(test)] * 2
    for table in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], table)


def test_logits_see_a_collator_changed_in_place(data):
    """`InfluenceEngine.logits` keyed its trunk states on the collator's key, which only an influence call refreshed:
    a collator changed in place between two `logits` calls gave the old logits (4e-3 off)."""
    model, train, test, collator = data
    tokenizer = copy.deepcopy(collator.tokenizer)
    options = {"shift": 0}

    def collate(rows):
        return shifted(tokenizer, rows, options["shift"])

    with InfluenceEngine(model, default_arguments(**BASE), data_collator=collate) as held:
        before = held.logits(train)
        options["shift"] = 3
        after = held.logits(train)
    with InfluenceEngine(model, default_arguments(**BASE), data_collator=collate) as fresh:
        expected = fresh.logits(train)
    assert not np.allclose(before, expected)
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*(beta state|nested tensors):UserWarning")  # (torch's, on making them)
@pytest.mark.parametrize("kind", ["sparse", "sparse csr", "meta", "nested"])
def test_tensors_without_plain_bytes_are_described(data, kind):
    """A replaced forward or a collator holding a sparse (COO / CSR), meta or nested tensor: hashing it by its values
    raised (``unsupported memory format``, ``Cannot copy out of meta tensor``, ``NestedTensorImpl doesn't support
    sizes``) and stopped the engine."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    held = {"sparse": lambda: torch.eye(4).to_sparse(), "sparse csr": lambda: torch.eye(4).to_sparse_csr(),
            "meta": lambda: torch.empty(4, device="meta"),
            "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}[kind]()
    dense = model.bert.encoder.layer[0].output.dense
    own = dense.forward
    dense.forward = lambda x: own(x) if held is not None else None

    def collate(rows):
        return collator(rows) if held is not None else None

    with InfluenceEngine(model, default_arguments(**BASE), data_collator=collate) as engine:
        assert len(engine.compute_influences(train, test).to_pandas()) == len(train) * len(test)


def test_a_setting_changed_during_a_call_keys_the_next_call_anew(data):
    """A hook's setting changed while a call runs (by the loss function here; another thread alike): the state the
    call left was taken for the state it was keyed on, and the held engine served the trunk states of the old setting
    for ever (2.8% off a fresh engine's). Only records (lists that grew, tensors a forward wrote) are absorbed."""
    import torch.nn.functional as F

    model, train, test, collator = data
    model = copy.deepcopy(model)
    options = {"alpha": 0.0}
    steer = torch.linspace(-2, 2, model.config.hidden_size, dtype=torch.float64)
    handle = model.bert.encoder.layer[0].output.register_forward_hook(lambda m, i, out: out + options["alpha"] * steer)
    uses = []

    def loss_fn(outputs, batch):
        uses.append(1)
        if len(uses) == 5:
            options["alpha"] = 1.0
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    args = default_arguments(**dict(BASE, influence_solver="exact"))  # (its eigendecomposition is kept between calls)
    try:
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as held:
            held.compute_influences(train, test)
            second = frame(held.compute_influences(train, test))
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as fresh:
            expected = frame(fresh.compute_influences(train, test))
    finally:
        handle.remove()
    np.testing.assert_allclose(second.influence, expected.influence, rtol=1e-10, atol=0)


def test_a_collator_that_changes_itself_during_a_call_keys_the_next_call_anew(data):
    """A curriculum collator moving its own setting during a call: the settings it left were taken for no change,
    and the held engine served the trunk states of the old setting (5.7% off)."""
    model, train, test, collator = data
    tokenizer = copy.deepcopy(collator.tokenizer)

    class Curriculum:
        def __init__(self):
            self.shift, self.batches = 0, 0

        def __call__(self, rows):
            self.batches += 1
            if self.batches == 24:  # (after the trunk states: 28 batches in a call here)
                self.shift = 3
            return shifted(tokenizer, rows, self.shift)

    curriculum = Curriculum()
    args = default_arguments(**BASE)
    with InfluenceEngine(model, args, data_collator=curriculum) as held:
        held.compute_influences(train, test)
        assert curriculum.shift == 3
        second = frame(held.compute_influences(train, test))
    with InfluenceEngine(model, args, data_collator=curriculum) as fresh:
        expected = frame(fresh.compute_influences(train, test))
    np.testing.assert_allclose(second.influence, expected.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("how", ["made anew at a freed address", "changed through .data"])
def test_a_steering_vector_by_layer_changed_between_calls_is_seen(data, how):
    """Vectors by layer in a dict a replaced forward reads, counted by address and in-place version: one deleted and
    made anew took the freed address (every later strength served the first one's trunk states, up to 7% off), and one
    changed through ``.data`` kept its version (5% off)."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    direction = torch.linspace(-1, 1, model.config.hidden_size, dtype=torch.float64)
    by_layer = {"layer0": direction * 0.5}
    dense = model.bert.encoder.layer[0].output.dense
    own = dense.forward
    dense.forward = lambda x: own(x) + by_layer["layer0"]
    args = default_arguments(**BASE)
    with InfluenceEngine(model, args, data_collator=collator) as held:
        for alpha in (1.0, 1.5, 2.0):
            if how == "changed through .data":
                by_layer["layer0"].data.copy_(direction * alpha)
            else:
                del by_layer["layer0"]
                by_layer["layer0"] = direction * alpha
            got = frame(held.compute_influences(train, test))
            with InfluenceEngine(model, args, data_collator=collator) as fresh:
                np.testing.assert_allclose(got.influence, frame(fresh.compute_influences(train, test)).influence,
                                           rtol=1e-10, atol=0)


def test_a_record_grown_between_calls_keeps_the_caches(data, monkeypatch):
    """HANS correction's loop (influence, an SGD step of the model outside the engine, logits): a backward hook's
    record of gradient norms grew between the calls, and every step rebuilt every trunk state."""
    import hf_fastif.engine as engine_module

    model, train, test, collator = data
    model = copy.deepcopy(model)
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    norms = []
    handle = model.bert.pooler.register_full_backward_hook(
        lambda module, grad_input, grad_output: norms.append(float(grad_output[0].detach().norm())))
    try:
        with InfluenceEngine(model, default_arguments(**BASE), data_collator=collator) as held:
            for _ in range(2):
                held.compute_influences(train, test)
                before = len(norms)
                model.zero_grad()
                model(**collator([train[i] for i in range(4)])).loss.backward()  # (the step's backward)
                assert len(norms) > before
                held.logits(test)
    finally:
        handle.remove()
        model.zero_grad()
    assert built == [len(train), len(test)]


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")  # (torch's deprecation, on making one)
@pytest.mark.parametrize("kind", ["float8", "quantized", "datetime64"])
def test_values_of_dtypes_numpy_lacks_are_described(kind):
    """A replaced forward or a collator holding a float8 or quantized tensor or a datetime64 array: hashing its values
    raised (``unsupported ScalarType``, ``cannot include dtype 'M' in a buffer``)."""
    from hf_fastif.fingerprint import collator_settings

    make = {"float8": lambda x: torch.full((4,), x).to(torch.float8_e4m3fn),
            "quantized": lambda x: torch.quantize_per_tensor(torch.full((4,), x), 0.1, 0, torch.quint8),
            "datetime64": lambda x: np.array([f"2026-12-0{int(x)}"], dtype="datetime64[D]")}[kind]
    value = make(1.0)

    def collate(rows):
        return rows if value is not None else None

    described = collator_settings(collate)
    value = make(2.0)
    assert collator_settings(collate) != described  # (by its values)


def test_a_long_list_replaced_at_a_freed_address_is_seen(monkeypatch):
    """A list of more than `SETTINGS_BREADTH` rows counted by address and length: rows replaced by other rows of the
    same length at the freed address looked unchanged."""
    from hf_fastif.fingerprint import collator_settings, settings_differences

    monkeypatch.setitem(globals(), "ROWS", [{"text": f"row {i}"} for i in range(300)])

    def collate(rows):
        return [ROWS[i] for i in rows]  # noqa: F821 (set above)

    before = collator_settings(collate)
    monkeypatch.setitem(globals(), "ROWS", [{"text": f"other {i}"} for i in range(300)])
    after = collator_settings(collate)
    assert set(settings_differences(before, after).values()) == {"changed"}


@pytest.mark.parametrize("how", ["a list of dims extended", "a list of (scale, vector) changed through .data",
                                 "a long dict of overrides grown"])
def test_a_setting_a_hook_holds_changed_between_calls_is_seen(data, how):
    """Settings a hook holds that look like records: a list extended by the user between calls was taken for a
    record that grew (5.8e-4 off a fresh engine's), a vector in a list changed through ``.data`` kept its identity and
    version (1.3e-2), and a long dict grown under its identity was taken for one (4e-5). Lists count as records only
    where the engine saw them grow during its own calls."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    hidden = model.config.hidden_size
    dims, steer = [0], [(1.0, torch.linspace(-1, 1, hidden, dtype=torch.float64))]
    overrides = {i: torch.zeros(hidden, dtype=torch.float64) for i in range(300)}

    def hook(module, args, out):
        out = out.clone()
        out[..., dims] = 0
        return out + steer[0][0] * steer[0][1] + overrides.get(300, 0)

    change = {"a list of dims extended": lambda: dims.extend(range(1, 8)),
              "a list of (scale, vector) changed through .data": lambda: steer[0][1].data.mul_(3),
              "a long dict of overrides grown": lambda: overrides.update({300: torch.linspace(-1, 1, hidden, dtype=torch.float64)})}
    handle = model.bert.encoder.layer[0].output.dense.register_forward_hook(hook)
    try:
        before, held, fresh = held_and_fresh(model, default_arguments(**BASE), collator, train, test, change[how])
    finally:
        handle.remove()
    assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("where", ["trunk", "top"])
def test_a_setting_in_a_hooks_keyword_default_is_seen(data, where):
    """A hook's setting bound as a keyword default (``def hook(module, args, out, cfg=cfg)``, the usual way to bind a
    loop's value) changed between calls: a function was described by its code, closure, globals and binding, not its
    defaults, so a held engine kept its trunk states (a hook below the influence parameters: 4e-4 off a fresh
    engine's) and LiSSA's kept graphs (above: 5% off)."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    cfg = {"scale": [1.0]}  # (a list in the dict: each default is followed as deep as a closure's value, not deeper)

    def hook(module, args, out, cfg=cfg):
        return out * cfg["scale"][0]

    handle = model.bert.encoder.layer[0 if where == "trunk" else 1].output.register_forward_hook(hook)
    args = default_arguments(**dict(BASE, influence_solver="lissa", influence_batch_size=1,
                                    influence_recursion_depth=30, influence_repetitions=3))
    try:
        before, held, fresh = held_and_fresh(model, args, collator, train, test,
                                             lambda: cfg["scale"].__setitem__(0, 1.2))
    finally:
        handle.remove()
    assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("held_as", ["tensor", "dict", "list", "array", "settings"])
def test_a_tensor_a_module_holds_as_an_attribute_keys_the_caches(data, held_as):
    """A steering vector set as a plain module attribute (``module.steer = tensor``, not a buffer; or in a dict or a
    list, or as a numpy array; or a settings dict) and read by a hook, changed in place between calls: a module's
    state held its plain scalar attributes only, so a held engine served LiSSA's kept graphs and the curvature of the
    old vector (0.4% off a fresh engine's), and then its bare tensors only (a dict-held vector on a trunk layer: 1.2%
    off). Tensors, arrays and containers count by what they hold."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    layer = model.bert.encoder.layer[1].output
    vector = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    layer.steer, read, change = {
        "tensor": (vector, lambda s: s, lambda: vector.fill_(0.1)),
        "dict": ({"v": vector}, lambda s: s["v"], lambda: vector.fill_(0.1)),
        "list": ([vector], lambda s: s[0], lambda: vector.fill_(0.1)),
        "array": (vector.numpy(), lambda s: torch.from_numpy(s), lambda: vector.fill_(0.1)),  # (the same memory)
        "settings": ({"shift": 0.0}, lambda s: s["shift"], lambda: layer.steer.update(shift=0.1)),
    }[held_as]
    handle = layer.register_forward_hook(lambda module, args, out: out + read(module.steer))
    args = default_arguments(**dict(BASE, influence_solver="lissa", influence_batch_size=1,
                                    influence_recursion_depth=30, influence_repetitions=3))
    try:
        before, held, fresh = held_and_fresh(model, args, collator, train, test, change)
    finally:
        handle.remove()
    assert not np.allclose(before.influence, fresh.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(held.influence, fresh.influence, rtol=1e-10, atol=0)


def test_a_long_record_of_floats_keeps_the_caches(data, monkeypatch):
    """A hook's record of ``.item()`` floats past 256 entries was counted by a hash of all of it, which every forward
    changed: every call rebuilt every cache (and once more when a record crossed 256 entries)."""
    import hf_fastif.engine as engine_module

    model, train, test, collator = data
    model = copy.deepcopy(model)
    built, real = [], engine_module.trunk_states.TrunkCache
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", lambda *a, **k: built.append(len(a[1])) or real(*a, **k))
    means = [0.0] * 250
    handle = model.bert.pooler.register_forward_hook(lambda m, i, out: means.append(out.mean().item()))
    try:
        with InfluenceEngine(model, default_arguments(**BASE), data_collator=collator) as held:
            for _ in range(4):
                held.compute_influences(train, test)
    finally:
        handle.remove()
    assert len(means) > 270 and built == [len(train), len(test)]  # past 256, growing with every call


@pytest.mark.parametrize("kind", ["tensor", "dict key"])
def test_a_collator_moving_a_tensor_or_a_key_during_a_call_keys_the_next_call_anew(data, kind):
    """A curriculum collator whose setting is a tensor, or a key added to its options, during a call: tensors written
    and keys added during a call were taken for records at once (1.5e-2 off a fresh engine's)."""
    model, train, test, collator = data
    tokenizer = copy.deepcopy(collator.tokenizer)

    class Curriculum:
        def __init__(self):  # (its batch count in an itertools.count, which its settings do not read)
            self.batches, self.remap, self.options = itertools.count(1), torch.arange(VOCAB), {}

        def __call__(self, rows):
            if next(self.batches) == 24:  # (after the trunk states: 28 batches in a call here)
                if kind == "tensor":
                    self.remap = 1 + (torch.arange(VOCAB) - 1 + 3) % (VOCAB - 1)
                    self.remap[0] = 0
                else:
                    self.options["shift"] = 3
            batch = shifted(tokenizer, rows, self.options.get("shift", 0))
            return batch | {"input_ids": self.remap[batch["input_ids"]]}

    curriculum = Curriculum()
    args = default_arguments(**BASE)
    with InfluenceEngine(model, args, data_collator=curriculum) as held:
        first = frame(held.compute_influences(train, test))
        second = frame(held.compute_influences(train, test))
    with InfluenceEngine(model, args, data_collator=curriculum) as fresh:
        expected = frame(fresh.compute_influences(train, test))
    assert not np.allclose(first.influence, expected.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(second.influence, expected.influence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("how", ["a global settings object", "a global loss module's smoothing",
                                 "a closed-over loss module's smoothing", "a hook reading a global settings object"])
def test_what_a_loss_or_a_hook_reads_from_a_plain_object_or_a_loss_module_is_seen(data, how, monkeypatch):
    """A loss dividing by ``CFG.temperature`` read from a module-level settings object (neither a dataclass nor a
    namespace) and a loss module's ``label_smoothing`` set in place counted by the object's type name and by the
    module's tensors only: a held engine served the old loss's Hessian (20% and 13% off a fresh engine's); a hook
    reading ``CFG.scale`` kept the old states (7e-4)."""
    model, train, test, collator = data
    model = copy.deepcopy(model)
    for name, value in (("temperature", 1.0), ("scale", 1.0)):
        monkeypatch.setattr(CFG, name, value)
    monkeypatch.setattr(CRITERION, "label_smoothing", 0.0)
    closed = torch.nn.CrossEntropyLoss(reduction="none")
    loss_fn, change, handle = None, None, None
    if how == "a global settings object":
        loss_fn, change = tempered_loss, lambda: setattr(CFG, "temperature", 3.0)
    elif how == "a global loss module's smoothing":
        loss_fn, change = criterion_loss, lambda: setattr(CRITERION, "label_smoothing", 0.3)
    elif how == "a closed-over loss module's smoothing":
        def loss_fn(outputs, batch):
            return closed(outputs.logits, batch["labels"])

        def change():
            closed.label_smoothing = 0.3
    else:
        handle = model.bert.encoder.layer[0].output.register_forward_hook(scaling_hook)
        change = lambda: setattr(CFG, "scale", 0.5)  # noqa: E731
    args = default_arguments(**dict(BASE, influence_solver="exact"))  # (its eigendecomposition is kept between calls)
    try:
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as held:
            before = frame(held.compute_influences(train, test))
            change()
            after = frame(held.compute_influences(train, test))
        with InfluenceEngine(model, args, data_collator=collator, loss_fn=loss_fn) as fresh:
            expected = frame(fresh.compute_influences(train, test))
    finally:
        if handle is not None:
            handle.remove()
    assert not np.allclose(before.influence, expected.influence, rtol=1e-6, atol=0)
    np.testing.assert_allclose(after.influence, expected.influence, rtol=1e-10, atol=0)


def test_what_is_kept_across_processes_tells_settings_objects_and_loss_modules_apart(monkeypatch):
    """`portable_fingerprint` (a build's manifest, `load_caches`, a launch's check) of a loss reading another value
    from a module-level settings object, or closing over a loss module with other settings, differs; the same values
    in other objects (another process) give the same fingerprint. They were equal: a build resumed, or caches loaded,
    with another temperature or smoothing were served the first one's (13% off)."""
    def closing_over(criterion):
        return lambda outputs, batch: criterion(outputs.logits, batch["labels"])

    smoothed = [portable_fingerprint(closing_over(torch.nn.CrossEntropyLoss(label_smoothing=v))) for v in (0.0, 0.3, 0.3)]
    assert smoothed[0] != smoothed[1] == smoothed[2]
    seen = []
    for value in (1.0, 3.0):
        monkeypatch.setattr(CFG, "temperature", value)
        seen.append(portable_fingerprint(tempered_loss))
    fresh = Settings()
    fresh.shift, fresh.temperature, fresh.scale = CFG.shift, 3.0, CFG.scale
    monkeypatch.setitem(globals(), "CFG", fresh)  # (another object, the same values: as in another process)
    assert seen[0] != seen[1] == portable_fingerprint(tempered_loss)


class Counter:  # what a script's loss keeps: a count of its calls
    def __init__(self):
        self.calls = 0


COUNTER = Counter()


def counting_loss(outputs, batch):
    COUNTER.calls += 1
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")


CALLS = {"n": 0, "temperature": 1.0}  # a script's module-level dict: a counter beside a setting
LOSSES: list = []  # a log a loss appends to
WEIGHTS: list = []  # a setting a loss fills on its first call


def dict_counting_loss(outputs, batch):
    CALLS["n"] += 1
    return torch.nn.functional.cross_entropy(outputs.logits / CALLS["temperature"], batch["labels"], reduction="none")


def logging_loss(outputs, batch):
    LOSSES.append(len(batch["labels"]))
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")


MARGINS = {"margin": float("nan"), "calls": 0}  # a NaN placeholder (no margin) beside a counter


def margin_loss(outputs, batch):
    MARGINS["calls"] += 1
    margin = 0.0 if MARGINS["margin"] != MARGINS["margin"] else MARGINS["margin"]
    return torch.nn.functional.cross_entropy(outputs.logits - margin, batch["labels"], reduction="none")


def lazily_weighted_loss(outputs, batch):
    if not WEIGHTS:
        WEIGHTS.extend([1.0, 1.0])  # (a temperature per label)
    temperature = torch.tensor(WEIGHTS, dtype=outputs.logits.dtype)
    return torch.nn.functional.cross_entropy(outputs.logits / temperature, batch["labels"], reduction="none")


class Forwarding:  # an options object whose __getattr__ raises KeyError (not AttributeError) for what it lacks
    __slots__ = ("_values",)

    def __init__(self, **values):
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        return self._values[name]


FORWARDING = Forwarding(scale=1.0)


def forwarding_loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits * FORWARDING.scale, batch["labels"], reduction="none")


def test_a_counter_or_log_kept_in_a_module_level_dict_or_list_is_a_record(data, monkeypatch):
    """A loss counting its calls in a module-level dict (``CALLS["n"] += 1``) or appending to a module-level list
    keyed the held engine anew on every call (containers were hashed by content). A dict's entry a call changes is a
    record from then on, and a list that grew during two calls; the dict's settings, a list a loss fills once (then
    changed between calls) and a NaN placeholder still key the engine anew when they change."""
    from hf_fastif.fingerprint import callable_fingerprint, global_values, note_records

    model, train, test, collator = data
    args = default_arguments(**dict(BASE, influence_solver="exact"))
    monkeypatch.setitem(CALLS, "temperature", 1.0)

    def influence(engine):
        return engine.compute_influences(train, test).to_pandas()["influence"].to_numpy()

    with InfluenceEngine(model, args, data_collator=collator, loss_fn=dict_counting_loss) as engine:
        calls, values = [], []
        for temperature in (1.0, 1.0, 1.0, 2.0):
            CALLS["temperature"] = temperature
            before = CALLS["n"]
            values.append(influence(engine))
            calls.append(CALLS["n"] - before)
        assert calls[2] < calls[0] and calls[3] > calls[2], calls  # (served from the caches; the setting changed)
        np.testing.assert_allclose(values[2], values[0], rtol=1e-5, atol=1e-9)
        assert not np.allclose(values[3], values[0], rtol=1e-3)
    with InfluenceEngine(model, args, data_collator=collator, loss_fn=dict_counting_loss) as fresh:
        np.testing.assert_allclose(influence(fresh), values[3], rtol=1e-4, atol=1e-9)  # (a fresh engine at 2)
    with InfluenceEngine(model, args, data_collator=collator, loss_fn=logging_loss) as engine:
        grew = []
        for _ in range(4):
            before = len(LOSSES)
            influence(engine)
            grew.append(len(LOSSES) - before)
        assert grew[3] < grew[0], grew  # (a record after growing in two calls: the fourth call served)
    monkeypatch.setattr(sys.modules[__name__], "WEIGHTS", [])
    with InfluenceEngine(model, args, data_collator=collator, loss_fn=lazily_weighted_loss) as engine:
        first, _ = influence(engine), influence(engine)
        WEIGHTS[:] = [2.0, 2.0]  # (filled on the first call only: still a setting)
        np.testing.assert_allclose(influence(engine), influence(InfluenceEngine(
            model, args, data_collator=collator, loss_fn=lazily_weighted_loss)), rtol=1e-5, atol=1e-9)
        assert not np.allclose(influence(engine), first, rtol=1e-3)
    monkeypatch.setattr(sys.modules[__name__], "MARGINS", {"margin": float("nan"), "calls": 0})
    before = global_values(margin_loss)
    MARGINS["calls"] += 1  # (what a call does to the dict)
    assert note_records(before, global_values(margin_loss))  # ("calls" is a record; the NaN is not)
    unchanged = callable_fingerprint(margin_loss)
    MARGINS["calls"] = 7
    assert callable_fingerprint(margin_loss) == unchanged
    MARGINS["margin"] = 0.5
    assert callable_fingerprint(margin_loss) != unchanged


def test_module_level_objects_are_read_as_settings_only_where_they_are_settings(data, monkeypatch):
    """Following module-level objects (`_global_object`) must not cost what they hold nor key a held engine anew
    for what a call itself changes: a loss counting its calls in a module-level object is keyed anew once (the
    count changed during a call: a record from then on), not on every call (the diff review's repro: the Hessian
    recomputed every call); a library's object (a logger, accelerate's state, whose ``process_index`` differs
    between the processes of a launch) counts by its type; a script's ``local_rank`` is left out; an object whose
    attributes cannot be read does not fail the call."""
    import argparse
    import logging

    from accelerate import PartialState

    from hf_fastif.fingerprint import _global_object

    model, train, test, collator = data
    args = default_arguments(**dict(BASE, influence_solver="exact"))
    calls = []
    with InfluenceEngine(model, args, data_collator=collator, loss_fn=counting_loss) as engine:
        for _ in range(3):
            before = COUNTER.calls
            engine.compute_influences(train, test)
            calls.append(COUNTER.calls - before)
    assert calls[2] < calls[0], calls  # (the third call served from the caches)
    assert _global_object(logging.getLogger("x")) == "Logger" and _global_object(PartialState()) == "PartialState"
    assert _global_object(argparse.Namespace(temperature=2.0, local_rank=1)) == {"Namespace": {"temperature": 2.0}}
    assert _global_object(FORWARDING) == "Forwarding"
    with InfluenceEngine(model, args, data_collator=collator, loss_fn=forwarding_loss) as engine:
        assert len(engine.compute_influences(train, test).to_pandas()) == len(train) * len(test)
