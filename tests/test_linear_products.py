"""Hessian-vector products whose ``nn.Linear`` weight blocks are assembled from activations
(`hf_fastif.linear_products`) equal the explicit Hessian's, take autograd's route where a layer is called twice or
written in place, and are turned off, with a warning, for a model that reads a layer's weight outside its forward."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.hvp import BatchHessian
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import flatten, select_parameters, unflatten
from hf_fastif.readout import find_readout
from tests.tiny import TOP, make_token_dataset, tiny_model


def explicit_products(fm, params, batch, vectors, reduction="mean"):
    """Autograd's Hessian-vector products of the objective (the L2 term inside the graph), one per vector."""
    flat = flatten(params).detach()

    def total(f):
        p = unflatten(f, params)
        losses = fm.values_without_l2(p, batch)[0] + fm._l2(p)
        return losses.mean() if reduction == "mean" else losses.sum()

    return torch.stack([torch.autograd.functional.hvp(total, flat, v)[1] for v in vectors])


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weight_blocks_from_activations_equal_the_explicit_hessian(pad_collator, kind, reduction):
    """Every parameter selected (embeddings, LayerNorms and GPT-2's Conv1D take autograd's route in the same
    product; BERT's query, key and value share their input): products, stacks, ``out=`` and ``accumulate`` equal
    the explicit Hessian's, and the route was taken (checked once against autograd's on the first graph)."""
    model = tiny_model(kind)
    data = make_token_dataset(3, seed=1)
    params = select_parameters(model, [r".*"])
    fm = FunctionalModel(model, list(params), weight_decay=0.01)
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(3))
    vectors = torch.randn(2, sum(p.numel() for p in params.values()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    expected = explicit_products(fm, params, batch, vectors, reduction)

    graph = BatchHessian(fm, params, batch, reduction=reduction)
    assert fm.linear_products is True and graph._linear is not None
    routed = {u.weight for u in graph._linear._uses}
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear}
    assert routed == linears & set(params) and routed  # GPT-2: its score head only; Conv1D is not nn.Linear
    torch.testing.assert_close(graph.product(vectors), expected)
    torch.testing.assert_close(graph.product(vectors[0]), expected[0])
    out = torch.full_like(vectors[1], float("nan"))
    torch.testing.assert_close(graph.product(vectors[1], out=out), expected[1])
    torch.testing.assert_close(out, expected[1])
    into = vectors[1].clone()
    graph.accumulate(vectors[0], into, -0.5, last=True)
    torch.testing.assert_close(into, vectors[1] - 0.5 * expected[0])
    with pytest.raises(RuntimeError, match="freed"):
        graph.product(vectors[0])


def test_the_route_takes_the_read_position_cut_and_the_papers_selection(pad_collator):
    """The paper's kind of selection (the last layer, pooler and classifier; the rest frozen, as the paper
    fine-tunes) with the last layer cut to the position the loss reads: the last layer's input needs no gradient (no
    first-backward term there), the layers after the cut run on one position, and the products equal the explicit
    Hessian's (of the uncut model: the cut changes nothing)."""
    model = tiny_model("bert")
    data = make_token_dataset(2, seed=2)
    params = select_parameters(model, TOP["bert"])
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(2))
    readout, reason = find_readout(FunctionalModel(model, list(params)), params, [batch])
    assert readout is not None, reason
    fm = FunctionalModel(model, list(params), readout=readout)
    vectors = torch.randn(1, sum(p.numel() for p in params.values()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    graph = BatchHessian(fm, params, batch)
    assert graph._linear is not None and readout.fired
    uses = {u.weight.split("layer.1.")[-1]: u for u in graph._linear._uses}
    assert uses["attention.self.query.weight"].input_gradient is None  # the layer's input: no gradient
    assert uses["output.dense.weight"].x.shape[1] == 1  # after the cut: one position
    torch.testing.assert_close(graph.product(vectors),
                               explicit_products(FunctionalModel(model, list(params)), params, batch, vectors))


class Head(nn.Module):
    """A small classifier over given features: ``mode`` "plain", "twice" (one layer called twice), "in place"
    (its output written in place after the call), "outside" (its weight read again outside its forward), "outside
    later" (that, only on batches whose first feature is above 5), "gated" (a 4-entry gate parameter of
    ``gate_dtype``, and a smaller read outside) or "dropout"."""

    def __init__(self, mode: str, gate_dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.dense = nn.Linear(4, 4).double()
        self.out = nn.Linear(4, 3).double()
        if mode == "gated":
            self.gate = nn.Parameter(torch.ones(4, dtype=gate_dtype))

    def forward(self, features):
        h = self.dense(features)
        if self.mode == "twice":
            h = self.dense(torch.tanh(h))
        if self.mode == "in place":
            h.mul_(1.5)
        if self.mode == "gated":
            h = h * self.gate.double()
        if self.mode in ("outside", "gated") or self.mode == "outside later" and bool((features[:, 0] > 5).any()):
            h = h + (0.05 if self.mode == "gated" else 0.3) * torch.sin(F.linear(features, self.dense.weight))
        if self.mode == "dropout":
            h = F.dropout(h, 0.5, self.training)
        return self.out(torch.tanh(h))


def head_loss(outputs, batch):
    return F.cross_entropy(outputs, batch["labels"], reduction="none")


def head_batch(seed: int, shift: float = 0.0) -> dict:
    features = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + shift
    return {"features": features, "labels": torch.tensor([0, 1, 2, 1, 0])}


def head_setup(model, loss_fn=head_loss):
    params = select_parameters(model, [r".*"])
    fm = FunctionalModel(model, list(params), loss_fn=loss_fn)
    vectors = torch.randn(2, sum(p.numel() for p in params.values()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))
    return params, fm, vectors


@pytest.mark.parametrize("mode", ["plain", "twice", "in place", "outside", "outside later"])
def test_a_layer_the_route_cannot_see_whole_takes_autograds_route(mode, caplog):
    """A layer called twice, whose output is written in place after its call, or whose weight the forward reads
    elsewhere too (an extra edge to it in the batch's autograd graph; on the first batch or only on a later one) takes
    autograd's route for that batch, without a word (nothing is wrong with the model). Every product equals the
    explicit Hessian's."""
    model = Head(mode)
    params, fm, vectors = head_setup(model)
    with caplog.at_level("WARNING"):
        for batch in (head_batch(3), head_batch(5, shift=10.0)):  # the second: "outside later" reads outside
            graph = BatchHessian(fm, params, batch)
            torch.testing.assert_close(graph.product(vectors), explicit_products(fm, params, batch, vectors))
            routed = mode == "plain" or mode == "outside later" and batch is not None and not (
                batch["features"][:, 0] > 5).any()
            assert (graph._linear is not None) == routed
    assert fm.linear_products is (True if mode in ("plain", "outside later") else None)
    assert "autograd's route" not in caplog.text


def test_what_the_graph_cannot_show_is_caught_by_the_check_against_autograd(monkeypatch, caplog):
    """Should a weight's other read escape the graph's edge count (here: the count made blind), the check against
    autograd's product on the model's first graph turns the route off, with a warning naming the parameter; an
    unrouted bfloat16 parameter beside the float64 layers does not loosen it (each parameter's block is held to its
    own dtype's tolerance: with one bfloat16 tolerance for all, this case passed and products came out 4-7% off)."""
    from hf_fastif import linear_products

    monkeypatch.setattr(linear_products, "_read_once", lambda losses, leaves: True)
    for gate_dtype in (torch.float64, torch.bfloat16):
        params, fm, vectors = head_setup(Head("gated", gate_dtype))
        batch = head_batch(3)
        expected = explicit_products(fm, params, batch, vectors)
        with caplog.at_level("WARNING"):
            graph = BatchHessian(fm, params, batch)
            again = BatchHessian(fm, params, batch)
        assert isinstance(fm.linear_products, str) and "differ from autograd's product at dense." in fm.linear_products
        assert graph._linear is None and again._linear is None
        assert "take autograd's route for this model" in caplog.text
        half = "float16 / bfloat16 rounding, or a layer's weight read outside its forward"
        assert (half in caplog.text) == (gate_dtype == torch.bfloat16)
        tolerance = 1e-9 if gate_dtype == torch.float64 else 2e-2  # (autograd's own bfloat16 rounding)
        torch.testing.assert_close(graph.product(vectors), expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(again.product(vectors), expected, rtol=tolerance, atol=tolerance)
        caplog.clear()


def test_an_overflowing_product_leaves_the_route_undecided_without_blaming_it(caplog):
    """A float16 model whose products overflow (a tiny BERT whose LayerNorm weights were scaled by 100): not finite
    by either route, which says nothing of the route, so the check decides nothing and warns of nothing (it had
    turned the route off, blaming "a layer's weight read outside its forward"); the next graph, once its products
    are finite (the weights scaled back), decides it."""
    model = tiny_model("bert").half().eval()
    params = select_parameters(model, [r".*"])
    fm = FunctionalModel(model, list(params))
    rows = make_token_dataset(4, seed=0, min_len=8, max_len=8)
    batch = {k: torch.tensor(rows[k]) for k in rows.column_names}
    norms = [p for name, p in model.named_parameters() if "LayerNorm.weight" in name]
    vector = torch.randn(sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        with torch.no_grad():
            torch._foreach_mul_(norms, 100.0)
        graph = BatchHessian(fm, params, batch)
        assert fm.linear_products is None and graph._linear is None
        assert not bool(torch.isfinite(graph.product(vector)).all())  # (autograd's route does not hold it either)
        with torch.no_grad():
            torch._foreach_div_(norms, 100.0)
        again = BatchHessian(fm, params, batch)
        assert fm.linear_products is True and again._linear is not None
        assert bool(torch.isfinite(again.product(vector)).all())
    assert "autograd's route" not in caplog.text


def test_a_hook_or_a_forward_set_after_the_first_graph_is_seen_on_the_next(caplog):
    """Hooks and a ``forward`` set on a layer are looked at on every batch, not once per model: a hook registered
    after the check passed leaves that layer to autograd's route on the next graphs (it was kept on the route, and
    products came out 50-79% off)."""
    model = Head("plain")
    params, fm, vectors = head_setup(model)
    batch = head_batch(3)
    assert BatchHessian(fm, params, batch)._linear is not None and fm.linear_products is True
    handle = model.dense.register_forward_hook(lambda module, args, out: out * 2 + out**2)
    try:
        graph = BatchHessian(fm, params, batch)
        assert [u.weight for u in graph._linear._uses] == ["out.weight"]
        torch.testing.assert_close(graph.product(vectors), explicit_products(fm, params, batch, vectors))
    finally:
        handle.remove()
    model.dense.forward = lambda x: F.linear(x, 2 * model.dense.weight, model.dense.bias)
    graph = BatchHessian(fm, params, batch)
    assert [u.weight for u in graph._linear._uses] == ["out.weight"]
    torch.testing.assert_close(graph.product(vectors), explicit_products(fm, params, batch, vectors))
    assert "autograd's route" not in caplog.text


def test_a_loss_linear_in_a_layers_output_and_dropout_in_training_mode(caplog):
    """A loss linear in the last layer's output (its gradient there a constant, which the route's second backward
    refused with "does not require grad") and dropout in training mode (the check's forward draws the masks the
    route's drew: another draw had turned the route off, with a warning): routed, equal to the explicit Hessian."""
    params, fm, vectors = head_setup(Head("plain"), loss_fn=lambda outputs, batch: outputs[:, 0] - outputs[:, 1])
    batch = head_batch(3)
    graph = BatchHessian(fm, params, batch)
    assert graph._linear is not None and fm.linear_products is True
    torch.testing.assert_close(graph.product(vectors), explicit_products(fm, params, batch, vectors))

    model = Head("dropout").train()
    params, fm, vectors = head_setup(model)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        graph = BatchHessian(fm, params, batch)
    assert graph._linear is not None and fm.linear_products is True and "autograd's route" not in caplog.text
    products = graph.product(vectors)
    expected = []
    for vector in vectors:  # the same masks: the explicit Hessian of the loss the graph holds
        torch.set_rng_state(before)
        expected.append(explicit_products(fm, params, batch, vector[None])[0])
    torch.testing.assert_close(products, torch.stack(expected))


def test_a_stack_where_vmap_cannot_go_is_multiplied_one_vector_at_a_time(pad_collator, monkeypatch):
    """A stack of vectors takes one batched second backward (``is_grads_batched``); where vmap refuses it, one
    vector at a time, with the same products."""
    model = tiny_model("bert")
    data = make_token_dataset(2, seed=4)
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params))
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(2))
    vectors = torch.randn(3, sum(p.numel() for p in params.values()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(5))
    graph = BatchHessian(fm, params, batch)
    batched = graph.product(vectors)
    grad, refused = torch.autograd.grad, []

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(True)
            raise RuntimeError("vmap: not supported here (the test's stand-in)")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = graph.product(vectors)
    assert refused and graph._linear is not None
    torch.testing.assert_close(looped, batched)
    torch.testing.assert_close(looped, explicit_products(fm, params, batch, vectors))


@pytest.mark.parametrize("solver", ["lissa", "cg", "arnoldi"])
def test_influence_is_the_same_with_the_route_and_without_it(pad_collator, monkeypatch, solver):
    """Whole `compute_influences` calls (the convergence check, LiSSA with rows drawn again from kept graphs and 3
    test points as one stack, CG's mean Hessian in batches, arnoldi's Lanczos) give the same influence with the weight
    blocks from activations as with autograd's route everywhere; the route was taken."""
    from hf_fastif import compute_influences
    from hf_fastif.influence import default_arguments
    from hf_fastif.linear_products import LinearProducts

    model = tiny_model("bert")
    train, test = make_token_dataset(24, seed=0), make_token_dataset(3, seed=1)
    args = default_arguments(influence_params=TOP["bert"],
                             influence_solver=solver, influence_damping=0.05, influence_scale=20.0,
                             influence_recursion_depth=30, influence_batch_size=1, influence_repetitions=2,
                             influence_knn_k=None, disable_tqdm=True)
    built, models = [], []
    build = LinearProducts.build

    def counted(fm, *a, **k):
        graph, losses = build(fm, *a, **k)
        built.append(graph is not None)
        models.append(fm)
        return graph, losses

    monkeypatch.setattr(LinearProducts, "build", staticmethod(counted))
    routed = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
    assert built and all(built) and all(fm.linear_products is True for fm in models)  # taken, and kept after the check
    monkeypatch.setattr(LinearProducts, "build", staticmethod(
        lambda fm, leaves, batch, reduction: (None, fm.values_without_l2(leaves, batch)[0])))
    plain = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
    key = ["test_id", "train_id"]
    routed, plain = routed.sort_values(key).reset_index(drop=True), plain.sort_values(key).reset_index(drop=True)
    assert (routed[key] == plain[key]).all().all()
    torch.testing.assert_close(torch.tensor(routed.influence.to_numpy()), torch.tensor(plain.influence.to_numpy()),
                               rtol=1e-9, atol=1e-12 * float(plain.influence.abs().max()))
