"""Influence against ground truth: closed forms, explicit Hessians, leave-one-out retraining."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy.stats import spearmanr
from torch import nn
from transformers import DataCollatorWithPadding

from hf_fastif import compute_influences
from hf_fastif.data import NLI2_LABELS, generate_nli, tokenize_nli
from hf_fastif.ground_truth import (
    LogisticRegression,
    digits_data,
    fit_linear_head,
    fit_logistic_regression,
    head_features,
    leave_one_out_loss_changes,
)
from hf_fastif.influence import default_arguments
from hf_fastif.pretrained import load_minilm_for_sequence_classification, load_minilm_tokenizer
from tests.helpers import explicit_influence
from tests.tiny import make_token_dataset, tiny_model


def table_matrix(table, num_test, num_train):
    out = np.full((num_test, num_train), np.nan)
    df = table.to_pandas()
    out[df.test_id.values, df.train_id.values] = df.influence.values
    return out


class LinearRegression(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, 1, bias=False, dtype=torch.float64)

    def forward(self, features):
        return {"logits": self.linear(features.to(torch.float64))}


def squared_error(outputs, batch):
    return (outputs["logits"].squeeze(-1) - batch["labels"].to(torch.float64)) ** 2


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa", "arnoldi"])
def test_linear_regression_closed_form(solver):
    rng = np.random.default_rng(0)
    n, d = 60, 5
    # float32-representable values: the default collator builds float32 tensors from the rows
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    x = f32(rng.normal(size=(n, d)))
    y = f32(x @ rng.normal(size=d) + 0.3 * rng.normal(size=n))
    xt, yt = f32(rng.normal(size=(4, d))), f32(rng.normal(size=4))
    model = LinearRegression(d)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(np.linalg.lstsq(x, y, rcond=None)[0])[None])
    w = model.linear.weight.detach().numpy()[0]
    damping, scale = 0.01, 20.0
    lam = damping * scale
    hessian = 2 * x.T @ x / n
    grad_train = 2 * (x @ w - y)[:, None] * x
    grad_test = 2 * (xt @ w - yt)[:, None] * xt
    expected = -grad_test @ np.linalg.solve(hessian + lam * np.eye(d), grad_train.T)  # (test, train)

    train = Dataset.from_dict({"features": x.tolist(), "labels": y.tolist()})
    test = Dataset.from_dict({"features": xt.tolist(), "labels": yt.tolist()})
    args = default_arguments(influence_solver=solver, influence_damping=damping, influence_scale=scale,
                             influence_knn_k=None, influence_recursion_depth=400, influence_batch_size=8,
                             influence_repetitions=8, disable_tqdm=True)
    got = table_matrix(compute_influences(model, train, test, args, loss_fn=squared_error), 4, n)
    if solver == "lissa":
        for t in range(4):
            assert spearmanr(got[t], expected[t]).statistic >= 0.99
        assert np.abs(got - expected).max() / np.abs(expected).max() < 0.1
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa", "arnoldi"])
def test_tiny_bert_against_explicit_hessian(solver, pad_collator):
    model = tiny_model("bert")
    train, test = make_token_dataset(32, seed=0), make_token_dataset(3, seed=1)
    names = [n for n, _ in model.named_parameters() if n.startswith(("bert.pooler", "classifier"))]
    damping, scale = 0.05, 20.0
    expected, evals = explicit_influence(model, names, train, test, pad_collator, damping * scale)
    assert evals.min() + damping * scale > 0
    args = default_arguments(influence_solver=solver, influence_params=[r"pooler\.", r"classifier\."],
                             influence_damping=damping, influence_scale=scale, influence_knn_k=None,
                             influence_recursion_depth=300, influence_batch_size=4, influence_repetitions=4,
                             influence_arnoldi_rank=len(evals), disable_tqdm=True)
    got = table_matrix(compute_influences(model, train, test, args, data_collator=pad_collator), 3, 32)
    if solver == "lissa":
        for t in range(3):
            assert spearmanr(got[t], expected[t]).statistic >= 0.99
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_arnoldi_at_full_rank_equals_exact_with_an_l2_term(pad_collator):
    """The L2 term's curvature (2·wd on weights, 0 on biases and norms) is kept exactly by the low-rank solve,
    not folded into the eigenpairs: at full rank it is the exact solve. (Decomposing H itself, Lanczos stopped
    at the data term's invariant subspace and left the L2 term's own eigenspace as if flat: 2e-2 off at wd 0.2.)"""
    model = tiny_model("bert")
    train, test = make_token_dataset(32, seed=0), make_token_dataset(3, seed=1)
    common = dict(influence_params=[r"pooler\.", r"classifier\."], influence_damping=0.05, influence_scale=20.0,
                  influence_weight_decay=0.2, influence_knn_k=None, disable_tqdm=True)
    p = sum(x.numel() for n, x in model.named_parameters() if n.startswith(("bert.pooler", "classifier")))
    exact = table_matrix(compute_influences(model, train, test, default_arguments(influence_solver="exact", **common),
                                            data_collator=pad_collator), 3, 32)
    low_rank = table_matrix(compute_influences(model, train, test, default_arguments(
        influence_solver="arnoldi", influence_arnoldi_rank=p, **common), data_collator=pad_collator), 3, 32)
    np.testing.assert_allclose(low_rank, exact, rtol=1e-7, atol=1e-9 * np.abs(exact).max())


@pytest.fixture(scope="module")
def digits():
    wd = 0.005
    train, test, x, y, xt, yt = digits_data(num_train=300, num_test=8, seed=0)
    model = fit_logistic_regression(LogisticRegression(64, 2).double(), x, y, wd)
    loo = leave_one_out_loss_changes(model, x, y, xt, yt, wd)
    return model, train, test, loo, wd


def test_arnoldi_below_the_rank_lambda_needs_is_warned_of(digits, caplog):
    """The low-rank solve treats the directions beyond its rank as flat (divided by λ alone): with λ far below the
    smallest kept eigenvalue they come out far too large, and the table came back without a word. Measured against
    the exact solve: rank 32 of 128 at λ = 1e-3 is 0.74 off (warned), rank 64 (the data term's whole rank) exact."""
    import logging

    model, train, test, _, wd = digits
    common = dict(influence_weight_decay=wd, influence_knn_k=None, disable_tqdm=True, influence_damping=1e-3,
                  influence_scale=1.0)
    exact = table_matrix(compute_influences(model, train, test, default_arguments(influence_solver="exact",
                                                                                  **common)), 8, 300)
    for rank, warned in ((32, True), (64, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_fastif.engine"):
            table = compute_influences(model, train, test, default_arguments(
                influence_solver="arnoldi", influence_arnoldi_rank=rank, **common))
        off = np.abs(table_matrix(table, 8, 300) - exact).max() / np.abs(exact).max()
        factor = table.metadata["diagnostics"]["arnoldi_truncation_factor"]
        said = [r.getMessage() for r in caplog.records if "influence_arnoldi_rank" in r.getMessage()]
        assert bool(said) == warned and (factor > 2) == warned, (rank, factor, said)
        assert off > 0.3 if warned else off < 1e-6, (rank, off)
        if warned:
            assert f"at rank {rank}" in said[0] and f"up to {factor:.3g}x too large" in said[0]


@pytest.mark.usefixtures("propagating")
def test_arnoldi_is_warned_of_where_the_appended_negative_pair_hid_the_rank(caplog):
    """A review's repro (a trained tiny BERT, its pooler + classifier, a Hessian with eigenvalues -0.016 ... 6.3):
    at rank 2 the appended negative Ritz pair (-0.0036, unconverged) was read as the smallest kept magnitude, so the
    rank's bound read 1.18 and the table came back 0.46 off the exact solve's (s_test 0.99 off) without a warning."""
    import logging

    from tests.tiny import HEAD_ONLY, pad_collator_for_tests, train_tiny

    collator = pad_collator_for_tests()
    train, test = make_token_dataset(40, seed=1, num_labels=3), make_token_dataset(3, seed=2, num_labels=3)
    model = train_tiny(tiny_model("bert", num_labels=3), train, collator, epochs=30)
    common = dict(influence_params=HEAD_ONLY["bert"], influence_knn_k=None, disable_tqdm=True,
                  influence_damping=0.002, influence_scale=10.0)
    exact = table_matrix(compute_influences(model, train, test, default_arguments(influence_solver="exact", **common),
                                            data_collator=collator), 3, 40)
    with caplog.at_level(logging.WARNING, logger="hf_fastif.engine"):
        table = compute_influences(model, train, test, default_arguments(
            influence_solver="arnoldi", influence_arnoldi_rank=2, **common), data_collator=collator)
    diagnostics = table.metadata["diagnostics"]
    said = [r.getMessage() for r in caplog.records if "influence_arnoldi_rank" in r.getMessage()]
    assert diagnostics["arnoldi_rank"] == 3 and diagnostics["hessian_min_ritz_value"] < 0, diagnostics
    assert diagnostics["arnoldi_truncation_factor"] > 10 and said and "at rank 2" in said[0], (diagnostics, said)
    assert np.linalg.norm(table_matrix(table, 3, 40) - exact) / np.linalg.norm(exact) > 0.2


def plain_test_loss(outputs, batch):
    """The measured quantity of leave-one-out: the plain test loss, without the L2 term."""
    return F.cross_entropy(outputs["logits"], batch["labels"], reduction="none")


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa", "arnoldi"])
def test_logistic_regression_leave_one_out(digits, solver):
    model, train, test, loo, wd = digits
    args = default_arguments(influence_solver=solver, influence_damping=0.001, influence_scale=2.0,
                             influence_weight_decay=wd, influence_knn_k=None, influence_batch_size=32,
                             influence_recursion_depth=1500, influence_repetitions=4,
                             influence_arnoldi_rank=sum(p.numel() for p in model.parameters()), disable_tqdm=True)
    if solver in ("exact", "cg"):
        args.influence_damping = 0.0
    if solver == "arnoldi":  # needs λ > 0 (outside its eigenspace it divides by λ); rank = p makes that moot
        args.influence_damping, args.influence_scale = 1e-9, 1.0
    table = compute_influences(model, train, test, args, measurement_fn=plain_test_loss)
    influence = table_matrix(table, 8, len(train))
    # θ without z ≈ θ + H⁻¹∇L(z)/n, so the test loss changes by ∇L_t·H⁻¹∇L(z)/n = -influence/n.
    rhos = [spearmanr(-influence[t], loo[:, t]).statistic for t in range(8)]
    assert min(rhos) >= (0.95 if solver != "lissa" else 0.9), rhos
    assert np.mean(rhos) >= 0.97, rhos


def test_the_sign_is_what_leave_one_out_says_with_an_l2_term(digits):
    """With the L2 term in every row's gradient (the 2021 code's convention, the only one before), each test point's
    values summed to 0 over the training rows (at the optimum the rows' L2-carrying gradients cancel), and a fifth
    of the rows called harmful lowered the test loss when removed: 0.77 sign agreement with leave-one-out, though
    the ranks (Spearman, above) were fine. The L2 term is now part of H only, unless asked for."""
    model, train, test, loo, wd = digits
    settings = dict(influence_solver="exact", influence_damping=0.0, influence_weight_decay=wd, influence_knn_k=None,
                    disable_tqdm=True)
    influence = table_matrix(compute_influences(model, train, test, default_arguments(**settings)), 8, len(train))
    removed = -influence.T / len(train)  # the first-order change of each test loss when the row is removed
    agree = np.mean(np.sign(removed) == np.sign(loo))
    assert agree >= 0.97, agree
    pearson = np.corrcoef(removed.ravel(), loo.ravel())[0, 1]  # the scale too (a few high-leverage rows aside)
    assert pearson >= 0.9, pearson
    # the 2021 convention on request: the same values less one constant per test point (its test loss has no L2
    # term here, as leave-one-out measures it)
    every = default_arguments(**settings, influence_weight_decay_in_gradients=True)
    shifted = table_matrix(compute_influences(model, train, test, every, measurement_fn=plain_test_loss), 8,
                           len(train))
    offsets = shifted - influence
    np.testing.assert_allclose(offsets, offsets[:, :1].repeat(len(train), axis=1), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(shifted.sum(axis=1), 0.0, atol=1e-8 * np.abs(shifted).sum())
    assert np.mean(np.sign(-shifted.T) == np.sign(loo)) < agree


def test_a_duplicate_of_the_test_point_is_among_the_most_helpful(digits):
    """The paper's sign: negative = helpful. Test points that are training rows (of top-quarter loss, so
    their gradient is not negligible) find themselves among their 3 most helpful rows."""
    model, train, _, _, wd = digits
    with torch.no_grad():
        logits = model(torch.tensor(train["features"]))["logits"]
        losses = F.cross_entropy(logits, torch.tensor(train["labels"]), reduction="none").numpy()
    rows = np.argsort(losses)[::-1][: len(losses) // 4 : 7][:10]
    args = default_arguments(influence_solver="exact", influence_damping=0.0, influence_weight_decay=wd,
                             influence_knn_k=None, disable_tqdm=True)
    table = compute_influences(model, train, train.select(rows), args)
    found = [int(r) in table.helpful(t, 3).train_id.tolist() for t, r in enumerate(rows)]
    assert all(found), list(zip(found, losses[rows].round(4)))
    assert all(table.helpful(t, 1).influence.iloc[0] < 0 for t in range(len(rows)))


def test_influence_through_the_pretrained_minilm_is_what_leave_one_out_of_its_head_says():
    """A real pretrained transformer, not a tiny random one: all-MiniLM-L6-v2's classification head put at the
    optimum of ``mean CE + wd·‖W‖²`` over its own pooled features (`fit_linear_head`) is a convex logistic
    regression, so retraining the head without each row is ground truth for influence computed through the whole
    model (the trunk cached below the head, the engine's kernels). Measured: Spearman 0.997-0.998 per test point,
    Pearson 0.98; with H⁻¹ taken out (λ = 1e6: the gradient dot product) 0.26-0.58, so what this checks is the
    inverse-Hessian product, not only the gradients."""
    tokenizer = load_minilm_tokenizer()
    torch.manual_seed(0)
    model = load_minilm_for_sequence_classification(2, id2label=dict(enumerate(NLI2_LABELS)))
    num_train, num_test, wd = 40, 3, 0.005
    raw = generate_nli(seed=0, n_train=num_train, n_hans_per_subcase=1, n_pool_per_subcase=0)
    train = tokenize_nli(raw["train"], tokenizer)  # (premise, hypothesis, genre kept: the collator never sees them)
    test = tokenize_nli(raw["hans"].shuffle(seed=0).select(range(num_test)), tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    with pytest.raises(ValueError, match="strictly convex only with an L2 term"):
        fit_linear_head(model, train, collator, 0.0)  # (exact then refused the softmax's flat direction)
    state = torch.random.get_rng_state()
    head, x, y = fit_linear_head(model, train, collator, wd)
    assert torch.equal(torch.random.get_rng_state(), state)  # (a seeded script's later draws are its own)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight"]
    assert not any(m.training for m in model.modules())  # (loaded in eval mode, and so left)
    x_test = head_features(model, test, collator).to(x.dtype)
    loo = leave_one_out_loss_changes(head, x, y, x_test, torch.as_tensor(test["labels"]), wd)  # (train, test)

    def removed(solver: str, damping: float) -> tuple[np.ndarray, dict]:
        args = default_arguments(influence_solver=solver, influence_damping=damping, influence_scale=1.0,
                                 influence_weight_decay=wd, influence_knn_k=None, disable_tqdm=True,
                                 influence_params=None)  # (what requires grad: the head's weight alone)
        table = compute_influences(model, train, test, args, data_collator=collator)
        return -table_matrix(table, num_test, num_train).T / num_train, table.metadata["diagnostics"]

    for solver in ("exact", "cg"):
        change, diagnostics = removed(solver, 0.0)
        assert diagnostics["trunk"]["split"] is not None  # through the cached trunk
        rhos = [spearmanr(change[:, t], loo[:, t]).statistic for t in range(num_test)]
        assert min(rhos) >= 0.99, (solver, rhos)
        assert np.corrcoef(change.ravel(), loo.ravel())[0, 1] >= 0.95, solver
        assert np.mean(np.sign(change) == np.sign(loo)) >= 0.95, solver
    flat, _ = removed("exact", 1e6)
    assert np.mean([spearmanr(flat[:, t], loo[:, t]).statistic for t in range(num_test)]) < 0.9
