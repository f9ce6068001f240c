"""Gradients, Hessian-vector products and directional derivatives with the explicit L2 term added in closed form
equal autograd through the term."""

import pytest
import torch

from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.hvp import BatchHessian, batch_gradient, batch_hvp, directional_derivatives
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import flatten, select_parameters, unflatten
from tests.tiny import TOP, make_token_dataset, tiny_model


@pytest.mark.parametrize("in_gradients", [False, True])
def test_closed_form_l2_term_equals_autograd(pad_collator, in_gradients):
    """The Hessian has the L2 term always (it is the objective's); the rows' gradients have it only with
    ``l2_in_gradients`` (the 2021 code's convention)."""
    model = tiny_model("bert")
    data = make_token_dataset(5, seed=0)
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params), weight_decay=0.03, l2_in_gradients=in_gradients)
    assert fm.decayed and len(fm.decayed) < len(params)  # biases / LayerNorm weights carry no L2 term
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(5))
    flat = flatten(params).detach()

    def total(f, reduction):
        p = unflatten(f, params)
        losses = fm.values_without_l2(p, batch)[0] + fm._l2(p)  # the objective, the L2 term inside the graph
        return losses.mean() if reduction == "mean" else losses.sum()

    def row_losses(f):
        p = unflatten(f, params)
        return fm.values_without_l2(p, batch)[0] + (fm._l2(p) if in_gradients else 0.0)

    torch.testing.assert_close(fm.losses(params, batch), row_losses(flat))

    v = torch.randn(2, flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for reduction in ("mean", "sum"):
        expected = torch.stack([torch.autograd.functional.hvp(lambda f, r=reduction: total(f, r), flat, x)[1]
                                for x in v])
        torch.testing.assert_close(batch_hvp(fm, params, batch, v, reduction=reduction), expected)
        torch.testing.assert_close(batch_hvp(fm, params, batch, v[0], reduction=reduction), expected[0])
        torch.testing.assert_close(batch_hvp(fm, params, batch, v[:1], reduction=reduction), expected[:1])  # stack of 1
    grad_sum = torch.autograd.functional.jacobian(lambda f: row_losses(f).sum(), flat)
    torch.testing.assert_close(batch_gradient(fm, params, batch, reduction="sum"), grad_sum)
    per_row = torch.autograd.functional.jacobian(row_losses, flat)
    torch.testing.assert_close(batch_gradient(fm, params, batch, reduction="none"), per_row)
    torch.testing.assert_close(directional_derivatives(fm, params, batch, v), per_row @ v.T)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_kept_graph_multiplies_as_a_fresh_one(pad_collator, reduction):
    """`BatchHessian` keeps the first backward's graph: every later product (one vector, ``out=``, a stack, with and
    without the L2 term) equals a fresh `batch_hvp` to the bit; ``last=True`` frees it, and a product after that is
    refused."""
    model = tiny_model("bert")
    data = make_token_dataset(4, seed=0)
    params = select_parameters(model, [r".*"])
    fm = FunctionalModel(model, list(params), weight_decay=0.03)
    batcher = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu")
    batch = batcher.batch(range(4))
    flat = flatten(params)
    v = torch.randn(3, flat.numel(), dtype=flat.dtype, generator=torch.Generator().manual_seed(0))
    hessian = BatchHessian(fm, params, batch, reduction=reduction, measure=True)
    for x in (v[0], v[1], v[:1], v):
        for l2_term in (True, False):
            fresh = batch_hvp(fm, params, batch, x, reduction=reduction, l2_term=l2_term)
            assert torch.equal(hessian.product(x, l2_term=l2_term), fresh)
    out = torch.empty_like(v[2])
    assert hessian.product(v[2], out=out, last=True) is out
    assert torch.equal(out, batch_hvp(fm, params, batch, v[2], reduction=reduction))
    with pytest.raises(RuntimeError, match="freed"):
        hessian.product(v[0])
    one = BatchHessian(fm, params, batcher.batch([0]), measure=True).saved_bytes
    assert 0 < one < hessian.saved_bytes  # grows with the rows
    assert BatchHessian(fm, params, batch).saved_bytes is None  # not measured unless asked


@pytest.mark.parametrize("l2_term", [True, False])
def test_a_product_added_into_a_row_of_a_stack_is_the_product(pad_collator, l2_term):
    """`BatchHessian.accumulate` adds ``alpha ·`` the product into a vector parameter by parameter (LiSSA's update
    without the flattened product): the same as `product` then an add, within float rounding (the add happens per
    parameter instead of on the flat vector), into a row of a stack and nowhere else; a vector it could not write
    through (not contiguous, so the parameter slices would be copies) is refused rather than left unchanged."""
    model = tiny_model("bert")
    data = make_token_dataset(3, seed=0)
    params = select_parameters(model, [r"encoder\.layer\.1\.", r"classifier\."])
    fm = FunctionalModel(model, list(params), weight_decay=0.03)
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(3))
    flat = flatten(params)
    p = flat.numel()
    gen = torch.Generator().manual_seed(1)
    x, start = (torch.randn(shape, generator=gen, dtype=flat.dtype) for shape in ((p,), (3, p)))
    hessian = BatchHessian(fm, params, batch)
    into = start.clone()
    hessian.accumulate(x, into[1], -0.25, l2_term=l2_term)
    expected = start[1] - 0.25 * hessian.product(x, l2_term=l2_term)
    torch.testing.assert_close(into[1], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(into[1], start[1])
    assert torch.equal(into[0], start[0]) and torch.equal(into[2], start[2])
    with pytest.raises(ValueError, match="contiguous"):
        hessian.accumulate(x, torch.zeros(p, 2, dtype=flat.dtype)[:, 0], 1.0)
    hessian.accumulate(x, into[2], 1.0, last=True)
    with pytest.raises(RuntimeError, match="freed"):
        hessian.accumulate(x, into[2], 1.0)


def test_a_tied_parameter_is_substituted_under_every_name():
    """GPT-2's LM head shares the input embedding: substituting the embedding moves the head too, as
    ``functional_call(tie_weights=True)`` does; the tie map is found once, not on every forward."""
    from torch.func import functional_call
    from transformers import DataCollatorForLanguageModeling

    from tests.tiny import pad_collator_for_tests

    model = tiny_model("gpt2-lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    fm = FunctionalModel(model, ["transformer.wte.weight"])
    assert fm.aliases == {"transformer.wte.weight": ["lm_head.weight"], "lm_head.weight": ["transformer.wte.weight"]}
    data = make_token_dataset(4, seed=1)
    collator = DataCollatorForLanguageModeling(pad_collator_for_tests().tokenizer, mlm=False)
    batch = Batcher(data, validate_dataset(data, "d", model), collator, "cpu").batch(range(4))
    moved = {"transformer.wte.weight": model.transformer.wte.weight.detach() * 1.5}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = functional_call(model, moved, args=(), kwargs=inputs, tie_weights=True).logits
    untied = functional_call(model, moved, args=(), kwargs=inputs, tie_weights=False).logits
    ours = fm.outputs(moved, batch).logits
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(untied, expected)  # the head did move: the test can tell
    with pytest.raises(ValueError, match="tied"):  # two values for one tied parameter: refused, as torch refuses
        fm.outputs(moved | {"lm_head.weight": model.lm_head.weight.detach() * 2.0}, batch)
    same = moved | {"lm_head.weight": moved["transformer.wte.weight"]}  # the same value under both names is fine
    torch.testing.assert_close(fm.outputs(same, batch).logits, expected)
    assert FunctionalModel(tiny_model("bert"), ["classifier.weight"]).aliases == {}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, attn_implementation="eager")).double().eval()


@pytest.mark.parametrize("kind, selection", [
    ("bert", r"encoder\.layer\.1\.|classifier\."),
    ("distilbert", r"transformer\.layer\.1\.|classifier\."),
    ("gpt2", r"h\.1\.|ln_f\.|score\."),
    ("gpt2-lm", r"h\.1\.|ln_f\."),
    ("llama", r"layers\.1\.|model\.norm\.|score\."),  # RMSNorm, rotary positions, grouped key / value heads
])
def test_batched_paths_equal_one_at_a_time(kind, selection, pad_collator):
    """What runs batched (several vectors through ``is_grads_batched``, per-example gradients of a padded batch,
    several tangents vmapped over ``jvp``) equals the same work done one vector / one unpadded row at a time, on
    norms of both kinds, causal and bidirectional attention: a wrong batching rule would go unseen elsewhere (a
    helper's audit ran this over 27 architectures: all identical; torch.func.hessian, nested, is not, see
    docs/correctness.md)."""
    from transformers import DataCollatorForLanguageModeling

    model = _tiny_llama() if kind == "llama" else tiny_model(kind)
    data = make_token_dataset(4, seed=3, causal=kind == "gpt2-lm")
    collator = pad_collator
    if kind == "gpt2-lm":
        data = data.remove_columns("labels")
        collator = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
    params = select_parameters(model, [selection])
    fm = FunctionalModel(model, list(params))
    batcher = Batcher(data, validate_dataset(data, "d", model), collator, "cpu")
    batch = batcher.batch(range(4))
    assert bool((batch["attention_mask"] == 0).any())  # rows of different lengths: padding in the batch
    v = torch.randn(3, flatten(params).numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def close(found, expected, rtol=1e-10):
        torch.testing.assert_close(found, expected, rtol=rtol, atol=rtol * 1e-2 * float(expected.abs().max()))

    close(batch_hvp(fm, params, batch, v), torch.stack([batch_hvp(fm, params, batch, x) for x in v]))
    per_row = batch_gradient(fm, params, batch, reduction="none")
    # a padded batch against each row alone: other shapes, whose float64 sums round apart, and Llama's float32 casts
    # (RMSNorm, the eager softmax) make that a float32-sized difference (a fresh clone's run: 5.3e-8 absolute, 1.1e-5
    # relative at a small entry, where it had passed at 1e-10 before)
    close(per_row, torch.stack([batch_gradient(fm, params, batcher.batch([i])) for i in range(4)]),
          rtol=1e-4 if kind == "llama" else 1e-10)
    close(directional_derivatives(fm, params, batch, v),
          torch.cat([directional_derivatives(fm, params, batch, x) for x in v], 1))
    # forward vs reverse mode: Llama's RMSNorm computes in float32 whatever the model's dtype
    close(directional_derivatives(fm, params, batch, v), per_row @ v.T, rtol=1e-6 if kind == "llama" else 1e-10)



MARK = 3  # a token id that marks the row whose loss the test's loss_fn makes NaN (second position)


def _nan_where_marked(outputs, batch):
    """Cross-entropy per row, NaN for rows whose second token is `MARK` (their inputs and logits stay finite)."""
    losses = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")
    factor = torch.where(batch["input_ids"][:, 1] == MARK, float("nan"), 1.0).to(losses.dtype)
    return losses * factor  # in the graph: the row's derivative is NaN


def _marked_rows(n: int, seed: int, marked: int):
    data = make_token_dataset(n, seed=seed).map(
        lambda r, i: {"input_ids": [r["input_ids"][0], MARK if i == marked else 5] + r["input_ids"][2:]},
        with_indices=True)
    return data


def test_a_non_finite_row_leaves_the_other_rows_per_example_gradients_alone(pad_collator):
    """Per-example gradients come from one backward with a one-hot stack: a row whose loss derivative is NaN put
    0 · NaN into every row's gradient (grad scoring then returned a batch of NaN, and the diagnostics named every
    row). Each row is now run alone when that happens: only the NaN row stays NaN, the others equal their
    gradients in a batch without it."""
    from hf_fastif.scoring import score_batch

    model = tiny_model("bert")
    data = _marked_rows(5, seed=0, marked=2)
    params = select_parameters(model, TOP["bert"])
    batcher = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu")
    fm = FunctionalModel(model, list(params), loss_fn=_nan_where_marked, weight_decay=0.01)
    batch = batcher.batch(range(5))
    assert not torch.isfinite(batch_gradient(fm, params, batch, reduction="none")).any()  # one row poisons all
    gradients = batch_gradient(fm, params, batch, reduction="none", row_batch=lambda i: batcher.batch([i]))
    finite = torch.isfinite(gradients).all(1)
    assert finite.tolist() == [True, True, False, True, True]
    torch.testing.assert_close(gradients[finite], batch_gradient(fm, params, batcher.batch([0, 1, 3, 4]),
                                                                 reduction="none"))
    s = torch.randn(2, gradients.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores = score_batch(fm, params, batch, s, method="grad", row_batch=lambda i: batcher.batch([i]))
    assert torch.isfinite(scores).all(1).tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("params", [TOP["bert"], None])
def test_grad_scoring_names_only_the_non_finite_candidate(pad_collator, params):
    """The same through the engine, with the trunk cache (last layer + head) and without it (every parameter):
    the table's non-finite values and its diagnostics name only the marked candidate; the other values equal
    JVP scoring's."""
    from hf_fastif import compute_influences
    from hf_fastif.influence import default_arguments

    model = tiny_model("bert")
    train, test = make_token_dataset(12, seed=0), make_token_dataset(2, seed=1)
    candidates = _marked_rows(9, seed=2, marked=6)
    tables = {}
    for scoring in ("jvp", "grad"):
        args = default_arguments(influence_solver="cg", influence_damping=10.0, influence_scale=1.0,
                                 influence_knn_k=None, influence_params=params, influence_scoring=scoring,
                                 influence_check_convergence=False, disable_tqdm=True)
        # the NaN loss only on the candidates: the marked row is not in the training or test rows
        tables[scoring] = compute_influences(model, train, test, args, data_collator=pad_collator,
                                             candidate_dataset=candidates, loss_fn=_nan_where_marked)
    for table in tables.values():
        assert table.metadata["diagnostics"]["non_finite_scores"]["train_ids"] == [6]
    jvp, grad = (t.to_pandas().sort_values(["test_id", "train_id"]) for t in (tables["jvp"], tables["grad"]))
    ok = jvp["train_id"] != 6
    assert grad[ok]["influence"].notna().all()
    torch.testing.assert_close(torch.tensor(grad[ok]["influence"].to_numpy()),
                               torch.tensor(jvp[ok]["influence"].to_numpy()))


def test_a_non_finite_test_row_is_the_only_one_named(pad_collator):
    """The error for test rows whose gradient is not finite named every row of the batch (0 · NaN); only the row
    whose own loss is NaN is named now, with what to check."""
    from hf_fastif import compute_influences
    from hf_fastif.influence import default_arguments

    args = default_arguments(influence_solver="cg", influence_damping=10.0, influence_scale=1.0, influence_knn_k=None,
                             influence_params=[r"classifier\."], disable_tqdm=True)
    with pytest.raises(FloatingPointError, match=r"gradient of test rows \[1\] is not finite: their loss is inf / NaN"):
        compute_influences(tiny_model("bert"), make_token_dataset(12, seed=0), _marked_rows(4, seed=1, marked=1),
                           args, data_collator=pad_collator, measurement_fn=_nan_where_marked)
