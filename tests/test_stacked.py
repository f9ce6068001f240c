"""LiSSA's repetitions stacked into one vmapped computation (`hf_fastif.stacked`): the products equal the ones taken
one batch at a time (and an explicit Hessian's), the influence tables equal the default path's, and every way the
stacked computation can fail falls back to the default path with a log line and the same numbers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hf_fastif import InfluenceArguments, InfluenceEngine
from hf_fastif.engine.s_test import lissa_batches
from hf_fastif.hvp import batch_hvp
from hf_fastif.loss import FunctionalModel
from hf_fastif.mode import influence_mode
from hf_fastif.params import flatten, num_parameters, select_parameters, unflatten
from hf_fastif.stacked import (
    NotStackable,
    StackedHessian,
    _hidden_dtype,
    additive_mask,
    is_causal,
    stack_tolerance,
    stacks,
    unstackable_attention,
)
from hf_fastif.utils import relative_difference
from tests.helpers import ARGS, group_setup, run, table_values
from tests.tiny import TOP, make_token_dataset, tiny_model


@pytest.fixture
def vmapped(monkeypatch):
    """The engine's stacked steps take the vmapped route (`hf_fastif.stacked`) even where the grouped route
    (`hf_fastif.grouped_products`, which a single test point on these models takes first) would apply."""
    monkeypatch.setattr("hf_fastif.engine.s_test.grouped_modules", lambda fm, names: "off in this test")


def test_stacks_on_cuda_by_default_and_only_with_two_repetitions_or_more():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # (a device object needs no GPU)
    assert stacks("auto", cuda, 4) and not stacks("auto", cpu, 4)
    assert stacks("auto", cpu, 4, grouped=True) and not stacks("auto", cpu, 1, grouped=True)
    assert not stacks("no", cpu, 4, grouped=True)
    assert stacks("yes", cpu, 2) and not stacks("yes", cpu, 1) and not stacks("auto", cuda, 1)
    assert not stacks("no", cuda, 4)
    with pytest.raises(ValueError, match="one of auto, yes, no"):
        stacks("sometimes", cpu, 4)
    with pytest.raises(ValueError, match="influence_stack_repetitions='sometimes' is unknown"):
        InfluenceArguments(output_dir="unused", influence_stack_repetitions="sometimes")


def test_the_additive_mask_hides_padded_keys_and_with_causal_later_ones():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    low = torch.finfo(torch.float32).min
    plain = additive_mask(mask, torch.float32, causal=False)
    assert plain.shape == (2, 1, 3, 3) and plain.dtype == torch.float32
    assert (plain[0, 0, :, 2] == low).all() and (plain[0, 0, :, :2] == 0).all() and (plain[1] == 0).all()
    causal = additive_mask(mask, torch.float32, causal=True)
    assert (causal[1, 0] == torch.tensor([[0, low, low], [0, 0, low], [0, 0, 0]])).all()
    assert (causal[0, 0, 2] == torch.tensor([0, 0, low])).all()  # the padded key stays hidden
    assert is_causal(tiny_model("gpt2")) and not is_causal(tiny_model("bert"))


def test_stacked_products_are_the_explicit_hessians_of_each_group(pad_collator):
    """Ground truth: the Hessian of each group's mean loss over the classifier (51 parameters), built entry by
    entry by ``torch.func.hessian``, times each group's two vectors."""
    model, batcher, params = group_setup("bert", pad_collator, [r"classifier\."])
    groups = [[0, 1], [2, 3], [4, 5]]
    p = num_parameters(params)
    vectors = torch.randn(3, 2, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with influence_mode(model, list(params)):
        fm = FunctionalModel(model, list(params))
        stacked = StackedHessian(fm, params).products(batcher.batch(sum(groups, [])), vectors)
        for r, rows in enumerate(groups):
            batch = batcher.batch(rows)

            def loss(flat, batch=batch):
                return fm.values_without_l2(unflatten(flat, params), batch)[0].mean()

            hessian = torch.func.hessian(loss)(flatten(list(params.values())).detach())
            torch.testing.assert_close(stacked[r], vectors[r] @ hessian.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2"])
def test_stacked_products_equal_the_products_one_batch_at_a_time(kind, pad_collator):
    """Every parameter of the model (embeddings included), rows padded to the longest of all groups, GPT-2's mask
    causal as well: each group's products equal `batch_hvp` of the group collated alone."""
    model, batcher, params = group_setup(kind, pad_collator, None)
    groups = [[0, 1], [2, 3], [4, 5]]
    vectors = torch.randn(3, 1, num_parameters(params), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    with influence_mode(model, list(params)):
        fm = FunctionalModel(model, list(params), weight_decay=0.01)  # the L2 term is left to LiSSA's update
        hessian = StackedHessian(fm, params)
        alone = hessian.alone([batcher.batch(g) for g in groups], vectors)
        stacked = hessian.products(batcher.batch(sum(groups, [])), vectors)
        for r, rows in enumerate(groups):
            expected = batch_hvp(fm, params, batcher.batch(rows), vectors[r], l2_term=False)
            torch.testing.assert_close(alone[r], expected, rtol=0, atol=0)
    assert relative_difference(stacked, alone) < 1e-12
    with pytest.raises(NotStackable, match="not 4 groups"):
        hessian.split(batcher.batch(sum(groups, [])), 4)


@pytest.mark.parametrize("kind, names", [("bert", TOP["bert"]), ("gpt2", None), ("distilbert", TOP["distilbert"])])
def test_influence_is_the_same_with_the_repetitions_stacked(kind, names, pad_collator, tmp_path):
    """Through `compute_influences`, two test points (two vectors a repetition), with the trunk cached and the last
    layer cut where the parameters allow it (BERT, DistilBERT) and over every parameter of a causal model (GPT-2)."""
    model = tiny_model(kind, num_labels=3)
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(2, seed=7, num_labels=3)
    settings = dict(influence_params=names)
    stacked, on, _ = run(model, train, test, pad_collator, tmp_path, "yes", **settings)
    alone, off, _ = run(model, train, test, pad_collator, tmp_path, "no", **settings)
    assert on["lissa_stacked"] is True and off["lissa_stacked"] is False
    assert on["readout"] == off["readout"] and on["trunk"]["split"] == off["trunk"]["split"]
    if names is not None:
        assert on["trunk"]["split"] is not None
    np.testing.assert_allclose(stacked, alone, rtol=1e-9, atol=1e-12)
    # one repetition: nothing to stack
    single, one, _ = run(model, train, test, pad_collator, tmp_path, "yes", influence_repetitions=1, **settings)
    assert one["lissa_stacked"] is False


def test_a_model_that_does_not_survive_vmap_falls_back_and_is_not_tried_again(pad_collator, tmp_path, caplog,
                                                                               monkeypatch, vmapped):
    """A forward hook that reads a value out (``.item()``, which vmap refuses): the call runs the repetitions one
    product at a time with a log line, gives the default path's numbers, keeps the last-layer cut (the error is not
    the cut's), and the engine's next call on the same weights and rows does not try again."""
    model = tiny_model("bert", num_labels=3)
    seen = []
    model.classifier.register_forward_hook(lambda module, args, output: seen.append(output.sum().item()))
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(2, seed=7, num_labels=3)
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        stacked, diagnostics, engine = run(model, train, test, pad_collator, tmp_path, "yes",
                                           influence_params=TOP["bert"])
    assert "LiSSA's repetitions run one product at a time: the stacked products raised RuntimeError" in caplog.text
    assert diagnostics["lissa_stacked"] is False
    assert diagnostics["readout"]["cut_after"] == "bert.encoder.layer.1.attention.output (inputs)"
    alone, _, _ = run(model, train, test, pad_collator, tmp_path, "no", influence_params=TOP["bert"])
    np.testing.assert_allclose(stacked, alone, rtol=1e-9, atol=1e-12)
    tried = []
    monkeypatch.setattr(StackedHessian, "products", lambda self, *a: tried.append(1) or (_ for _ in ()).throw(
        AssertionError("tried again")))
    engine.compute_influences(train, make_token_dataset(2, seed=8, num_labels=3))
    assert tried == []


def test_stacked_products_that_differ_are_refused_and_the_call_keeps_the_default_numbers(pad_collator, tmp_path,
                                                                                         caplog, monkeypatch, vmapped):
    """Stacked products off by 1% (a mask built unlike the model's, say) fail the first step's check: that step
    takes the products one at a time it was checked against, and so do the others."""
    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(1, seed=7, num_labels=3)
    alone, _, _ = run(model, train, test, pad_collator, tmp_path, "no", influence_params=TOP["bert"])
    real = StackedHessian.products
    monkeypatch.setattr(StackedHessian, "products", lambda self, batch, vectors: 1.01 * real(self, batch, vectors))
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        refused, diagnostics, _ = run(model, train, test, pad_collator, tmp_path, "yes", influence_params=TOP["bert"])
    assert "the stacked products differ from the products one at a time by 0.01 of their largest entry (more than " \
           "1e-09)" in caplog.text
    assert diagnostics["lissa_stacked"] is False
    np.testing.assert_allclose(refused, alone, rtol=1e-9, atol=1e-12)


def test_a_stacked_step_that_raises_after_the_check_runs_one_product_at_a_time(pad_collator, tmp_path, caplog,
                                                                             monkeypatch, vmapped):
    """Out of memory with R batches at once (say) on a later step: that step and the rest of the call run one
    product at a time (no failing attempt per step), the numbers stay the default path's, and the engine's next call
    stacks again."""
    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(1, seed=7, num_labels=3)
    alone, _, _ = run(model, train, test, pad_collator, tmp_path, "no", influence_params=TOP["bert"])
    real, calls = StackedHessian.products, []

    def sometimes(self, batch, vectors):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        return real(self, batch, vectors)

    monkeypatch.setattr(StackedHessian, "products", sometimes)
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        stacked, diagnostics, engine = run(model, train, test, pad_collator, tmp_path, "yes",
                                           influence_params=TOP["bert"])
    assert ("A stacked LiSSA step raised OutOfMemoryError (CUDA out of memory (a test's)); this call's steps run "
            "one product at a time from here.") in caplog.text
    assert diagnostics["lissa_stacked"] is False and len(calls) == 3
    np.testing.assert_allclose(stacked, alone, rtol=1e-9, atol=1e-12)
    table = engine.compute_influences(train, make_token_dataset(1, seed=8, num_labels=3))
    assert table.metadata["diagnostics"]["lissa_stacked"] is True and len(calls) == 3 + ARGS["influence_recursion_depth"]


def test_products_that_differ_only_on_longer_rows_are_caught_when_longer_rows_come(pad_collator, tmp_path, caplog,
                                                                                  monkeypatch, vmapped):
    """A mask that goes wrong only past some length (a window the 4-D mask does not carry, say) passes the first
    step's check on short rows: a step with rows longer than every row checked is checked again, and refused."""
    model = tiny_model("bert", num_labels=3)
    settings = dict(influence_params=TOP["bert"], influence_batch_size=1, influence_repetitions=2)
    train = make_token_dataset(16, seed=0, num_labels=3, min_len=4, max_len=4)
    draws = [lissa_batches(16, 1, ARGS["influence_recursion_depth"], 42, t) for t in range(2)]
    first = {int(draws[0][0, 0]), int(draws[1][0, 0])}
    long_row = next(int(d[j, 0]) for j in range(1, 12) for d in draws if int(d[j, 0]) not in first)
    train = train.map(lambda row, i: {"input_ids": row["input_ids"] * 2, "attention_mask": [1] * 8}
                      if i == long_row else {}, with_indices=True)
    test = make_token_dataset(1, seed=7, num_labels=3)
    alone, _, _ = run(model, train, test, pad_collator, tmp_path, "no", influence_seed=42, **settings)
    real, checked = StackedHessian.products, []
    monkeypatch.setattr(StackedHessian, "alone", lambda self, b, v, real_alone=StackedHessian.alone: (
        checked.append(b[0]["attention_mask"].shape[-1]), real_alone(self, b, v))[1])
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        ok, fine, _ = run(model, train, test, pad_collator, tmp_path, "yes", influence_seed=42, **settings)
    assert fine["lissa_stacked"] is True and checked[0] == 4 and 8 in checked and len(checked) == 2
    np.testing.assert_allclose(ok, alone, rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(StackedHessian, "products", lambda self, batch, vectors: real(self, batch, vectors) * (
        1.05 if batch["attention_mask"].shape[-1] > 4 else 1.0))
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        refused, diagnostics, _ = run(model, train, test, pad_collator, tmp_path, "yes", influence_seed=42, **settings)
    assert "by 0.05 of their largest entry (more than 1e-09) on rows of 8 positions" in caplog.text
    assert diagnostics["lissa_stacked"] is False
    np.testing.assert_allclose(refused, alone, rtol=1e-9, atol=1e-12)


def test_attention_over_a_window_of_positions_is_not_stacked(pad_collator, tmp_path, caplog):
    """Mistral's sliding window (the 4-D mask would drop it, and rows shorter than the window would pass the check):
    refused up front, with the default path's numbers; so are layers of several attention kinds."""
    from transformers import MistralConfig, MistralForSequenceClassification, ModernBertConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4, pad_token_id=0,
                           num_labels=3, attn_implementation="eager")
    model = MistralForSequenceClassification(config).double().eval()
    assert "config.sliding_window" in unstackable_attention(model)
    assert "config.layer_types" in unstackable_attention(SimpleModel(ModernBertConfig(local_attention=0)))
    assert unstackable_attention(tiny_model("bert")) is None and unstackable_attention(tiny_model("gpt2")) is None
    assert unstackable_attention(SimpleModel({"sliding_window": 4})) is None  # (a dict is no transformers config)
    rows = dict(num_labels=3, min_len=7, max_len=7)  # (no padding: a padded position past the window sees nothing)
    train, test = make_token_dataset(16, seed=0, **rows), make_token_dataset(1, seed=7, **rows)
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        stacked, diagnostics, _ = run(model, train, test, pad_collator, tmp_path, "yes")
    assert ("LiSSA's repetitions run one product at a time: the model cannot be stacked: its attention sees a window "
            "of the positions (config.sliding_window)") in caplog.text
    assert diagnostics["lissa_stacked"] is False
    alone, _, _ = run(model, train, test, pad_collator, tmp_path, "no")
    np.testing.assert_allclose(stacked, alone, rtol=1e-9, atol=1e-12)


class SimpleModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def test_a_loss_that_reads_the_attention_mask_sees_the_0_1_mask(pad_collator, tmp_path):
    """The model gets the 4-D additive mask; a ``loss_fn`` still reads the batch's (b, s) 0/1 mask."""
    def loss_fn(outputs, batch):  # cross-entropy weighted by each row's token count
        losses = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")
        return losses * batch["attention_mask"].sum(-1) / 8

    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(1, seed=7, num_labels=3)
    tables = {}
    for mode in ("yes", "no"):
        args = InfluenceArguments(output_dir=str(tmp_path), influence_stack_repetitions=mode,
                                  **(ARGS | dict(influence_params=TOP["bert"])))
        table = InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss_fn).compute_influences(
            train, test)
        tables[mode] = (table_values(table), table.metadata["diagnostics"]["lissa_stacked"])
    assert tables["yes"][1] is True and tables["no"][1] is False
    np.testing.assert_allclose(tables["yes"][0], tables["no"][0], rtol=1e-9, atol=1e-12)


def test_the_mask_takes_the_hidden_states_dtype_and_half_types_a_wider_tolerance():
    """A bfloat16 model with a float32 head (PEFT's usual mix): the mask is bfloat16, as the attention scores are
    (a float32 mask promoted them, and the next product refused to mix dtypes); the check's tolerance is the
    rounding of two half-precision computations."""
    model = tiny_model("bert", num_labels=3).to(torch.bfloat16)
    model.classifier.float()
    params = select_parameters(model, [r"classifier\."])
    assert StackedHessian(FunctionalModel(model, list(params)), params)._mask_dtype == torch.bfloat16
    assert _hidden_dtype(torch.nn.Linear(2, 2)) == torch.float32  # no input embeddings: float32
    assert stack_tolerance(model) == 1e-2
    assert stack_tolerance(tiny_model("bert")) == 1e-9 and stack_tolerance(tiny_model("bert").float()) == 1e-4
