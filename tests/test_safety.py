"""No silent wrong numbers: inputs the model takes are kept, the loss is the model's own, model state that
breaks the maths is switched and restored, and models whose scores would depend on batching are refused."""

import copy
import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.func import functional_call

from hf_fastif import InfluenceArguments, InfluenceEngine, InfluenceTrainer, compute_influences
from hf_fastif.batches import model_input_columns
from hf_fastif.influence import default_arguments
from hf_fastif.loss import make_default_loss
from tests.tiny import HEAD_ONLY, TOP, VOCAB, make_token_dataset, tiny_model

EXACT = dict(influence_solver="exact", influence_damping=0.01, influence_scale=1.0, influence_knn_k=None,
             disable_tqdm=True)
LISSA = dict(influence_solver="lissa", influence_damping=0.05, influence_scale=500.0, influence_recursion_depth=10,
             influence_batch_size=2, influence_repetitions=2, influence_knn_k=6, disable_tqdm=True)


def influence_values(table) -> np.ndarray:
    return table.to_pandas().sort_values(["test_id", "train_id"]).influence.to_numpy()


# --- 1. every input the model takes is kept -------------------------------------------------------------------------

def tiny_layoutlm():
    from transformers import LayoutLMConfig, LayoutLMForSequenceClassification

    torch.manual_seed(0)
    cfg = LayoutLMConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, max_2d_position_embeddings=64,
                         num_labels=2, attn_implementation="eager")
    return LayoutLMForSequenceClassification(cfg).double().eval()


def layout_dataset(n: int, seed: int, length: int = 6) -> Dataset:
    """Rows of equal length with a box per token (x0 <= x1, y0 <= y1, all below 64)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, length))
    ids[:, 0] = 1
    corners = np.sort(rng.integers(0, 64, size=(n, length, 2, 2)), axis=2)  # sorted x pair, sorted y pair
    bbox = np.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], -1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "bbox": bbox.tolist(), "labels": (ids.sum(1) % 2).tolist()})


def direct_influences(model, train: Dataset, test: Dataset, names: list[str], lam: float) -> np.ndarray:
    """``-∇ℓ(z_train)·(H + λI)⁻¹∇ℓ(z_test)`` over the parameters ``names``, from the model's full forward
    (every column but ``labels``), an explicit Hessian and a dense solve: ``(n_test, n_train)``."""
    base = {n: p.detach() for n, p in model.named_parameters() if n in names}
    shapes = [(n, p.shape, p.numel()) for n, p in base.items()]
    flat0 = torch.cat([p.reshape(-1) for p in base.values()])

    def losses(flat, data):
        batch = {k: torch.tensor(v) for k, v in data[:].items()}
        params, i = {}, 0
        for n, shape, size in shapes:
            params[n] = flat[i : i + size].reshape(shape)
            i += size
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = functional_call(model, params, args=(), kwargs=inputs).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    hessian = torch.autograd.functional.hessian(lambda f: losses(f, train).mean(), flat0)
    g_train = torch.autograd.functional.jacobian(lambda f: losses(f, train), flat0)
    g_test = torch.autograd.functional.jacobian(lambda f: losses(f, test), flat0)
    s_test = torch.linalg.solve(hessian + lam * torch.eye(len(flat0), dtype=flat0.dtype), g_test.T)
    return (-(g_train @ s_test)).T.numpy()


def test_layoutlm_keeps_its_bbox_input():
    model = tiny_layoutlm()
    train, test = layout_dataset(12, seed=0), layout_dataset(2, seed=1)
    assert "bbox" in model_input_columns(model, train)
    args = default_arguments(**(EXACT | {"influence_params": [r"classifier\."]}))
    table = compute_influences(model, train, test, args)
    names = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    expected = direct_influences(model, train, test, names, args.influence_lambda)
    np.testing.assert_allclose(influence_values(table), expected.reshape(-1), rtol=1e-7, atol=1e-12)
    # the box matters: without it the numbers differ (what dropping the column produced)
    no_box = direct_influences(model, train.remove_columns("bbox"), test.remove_columns("bbox"), names,
                               args.influence_lambda)
    assert np.abs(no_box - expected).max() > 1e-3 * np.abs(expected).max()


def test_columns_the_model_does_not_take_are_ignored_and_named(pad_collator, caplog):
    model = tiny_model("bert")
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    extra = train.add_column("idx", list(range(len(train)))).add_column("premise", ["a sentence"] * len(train))
    assert model_input_columns(model, extra) == ["input_ids", "attention_mask", "labels"]
    args = default_arguments(**(EXACT | {"influence_params": [r"classifier\."]}))
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        table = compute_influences(model, extra, test, args, data_collator=pad_collator)
    expected = compute_influences(model, train, test, args, data_collator=pad_collator)
    np.testing.assert_array_equal(influence_values(table), influence_values(expected))
    ignored = [r.getMessage() for r in caplog.records if "are ignored" in r.getMessage()]
    # train_dataset once: the training rows as candidates were named again as candidate_dataset
    assert len(ignored) == 1 and ignored[0].startswith("train_dataset: ")
    assert all("'idx'" in m and "'premise'" in m and "BertForSequenceClassification" in m for m in ignored)


class KwargsOnly(nn.Module):
    """A wrapper whose forward names no input: its signature cannot say which columns it reads."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.embed(inputs["input_ids"]).mean(1))


def test_a_forward_naming_no_input_keeps_the_common_inputs():
    data = make_token_dataset(3).add_column("idx", [0, 1, 2])
    assert model_input_columns(KwargsOnly(), data) == ["input_ids", "attention_mask", "labels"]


# --- 2. the default loss is the model's own, per problem type --------------------------------------------------------

def _labels(kind: str, n: int, k: int, rng) -> torch.Tensor:
    if kind == "single_label_classification":
        return torch.as_tensor(rng.integers(0, k, n))
    if kind == "multi_label_classification":
        return torch.as_tensor(rng.integers(0, 2, (n, k)), dtype=torch.float64)
    if k == 1:
        return torch.as_tensor(rng.normal(size=n) * 2.0)
    return torch.as_tensor(rng.normal(size=(n, k)) * 2.0)


@pytest.mark.parametrize("kind, num_labels, declared, int_labels", [
    ("single_label_classification", 3, False, True),
    ("multi_label_classification", 3, False, False),  # inferred from float multi-hot labels
    ("multi_label_classification", 3, True, False),
    ("regression", 1, False, False),
    ("regression", 1, False, True),  # integer scores (STS-B style) are still regression for one output
    ("regression", 2, True, False),
])
def test_default_loss_is_the_models_own(kind, num_labels, declared, int_labels):
    model = tiny_model("bert", num_labels=num_labels)
    if declared:
        model.config.problem_type = kind
    rng = np.random.default_rng(0)
    labels = _labels(kind, 5, num_labels, rng)
    if int_labels:
        labels = labels.round().long()
    inputs = {"input_ids": torch.as_tensor(rng.integers(5, VOCAB, (5, 7))), "attention_mask": torch.ones(5, 7)}
    with torch.no_grad():
        per_row = make_default_loss(model)(model(**inputs), inputs | {"labels": labels})  # before the model
        own = model(**inputs, labels=labels).loss  # sets config.problem_type when unset
    assert model.config.problem_type == kind
    assert per_row.shape == (5,)
    torch.testing.assert_close(per_row.mean(), own.to(per_row.dtype), rtol=1e-10, atol=1e-12)


def test_class_ids_stored_as_floats_are_refused_with_the_fix():
    model = tiny_model("bert", num_labels=3)
    inputs = {"input_ids": torch.randint(5, VOCAB, (4, 6))}
    with pytest.raises(ValueError, match="store them as int"):
        make_default_loss(model)(model(**inputs), {"labels": torch.tensor([0.0, 1.0, 2.0, 1.0])})


def test_multi_label_influence_uses_binary_cross_entropy(pad_collator):
    model = tiny_model("bert", num_labels=3)
    rng = np.random.default_rng(0)
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    train = train.remove_columns("labels").add_column("labels", rng.integers(0, 2, (16, 3)).astype(float).tolist())
    test = test.remove_columns("labels").add_column("labels", rng.integers(0, 2, (2, 3)).astype(float).tolist())
    args = default_arguments(**(EXACT | {"influence_params": [r"classifier\."]}))

    def bce(outputs, batch):
        return F.binary_cross_entropy_with_logits(outputs.logits, batch["labels"].double(), reduction="none").mean(1)

    table = compute_influences(model, train, test, args, data_collator=pad_collator)
    expected = compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=bce)
    np.testing.assert_allclose(influence_values(table), influence_values(expected), rtol=1e-10, atol=1e-14)


# --- 3. gradient checkpointing is switched off for the computation and back on after ----------------------------------

def checkpointing(model) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.is_gradient_checkpointing


def test_gradient_checkpointing_is_switched_off_and_back_on(pad_collator, caplog):
    model = tiny_model("bert")
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert checkpointing(model)
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**LISSA)
    with caplog.at_level(logging.INFO, logger="hf_fastif"):
        table = compute_influences(model, train, test, args, data_collator=pad_collator)
    expected = compute_influences(reference, train, test, args, data_collator=pad_collator)
    np.testing.assert_allclose(influence_values(table), influence_values(expected), rtol=1e-10, atol=1e-14)
    assert "gradient checkpointing" in caplog.text
    assert checkpointing(model) and model.is_activation_checkpointing
    # the input-gradient hook checkpointing relies on is back: embedding outputs require grad again
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 7, 9]]))
    handle.remove()
    assert seen == [True]


def test_input_gradient_hooks_left_by_a_second_enable_are_off_for_influence_too(pad_collator):
    """Each ``gradient_checkpointing_enable()`` (a second ``Trainer.train()``) calls ``enable_input_require_grads``,
    which forgets the hook it registered before: ``disable_input_require_grads`` removed only the last, and the
    forgotten one's ``requires_grad_`` failed inside the scoring's jvp, after s_test had been computed."""
    model = tiny_model("bert")
    reference = copy.deepcopy(model)
    model.enable_input_require_grads()
    model.enable_input_require_grads()  # the first hook is now orphaned

    def hooks():
        return [h for h in model.get_input_embeddings()._forward_hooks.values()
                if getattr(h, "__name__", "") == "make_inputs_require_grads"]

    assert len(hooks()) == 2
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**LISSA)
    table = compute_influences(model, train, test, args, data_collator=pad_collator)
    expected = compute_influences(reference, train, test, args, data_collator=pad_collator)
    np.testing.assert_allclose(influence_values(table), influence_values(expected), rtol=1e-10, atol=1e-14)
    assert len(hooks()) == 2  # put back as they were: training goes on as before


def test_a_compiled_model_is_explained_by_its_eager_forward(pad_collator, tmp_path):
    """``torch.compile(model)``: its wrapper's forward names no input, so every column was dropped ("You must
    specify exactly one of input_ids or inputs_embeds"); ``model.compile()``: every forward went through the
    compiled graph, which refuses double backward (after 38 s of compiling). Both give the plain model's values, and
    the model comes back compiled (nothing here runs the compiled graph, so no compiler is needed)."""
    from hf_fastif import InfluenceEngine, build_influence_table

    model = tiny_model("bert")
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**LISSA)
    expected = influence_values(compute_influences(model, train, test, args, data_collator=pad_collator))
    wrapped = torch.compile(model)
    for table in (compute_influences(wrapped, train, test, args, data_collator=pad_collator),
                  build_influence_table(wrapped, train, test, tmp_path, args, data_collator=pad_collator)):
        np.testing.assert_array_equal(influence_values(table), expected)
    assert InfluenceEngine(wrapped, args).model is model
    table.check_model(wrapped)  # checked as the model it wraps (it named OptimizedModule)
    model.compile()
    compiled = model._compiled_call_impl
    assert compiled is not None
    np.testing.assert_array_equal(
        influence_values(compute_influences(model, train, test, args, data_collator=pad_collator)), expected)
    assert model._compiled_call_impl is compiled


def test_trainer_with_gradient_checkpointing(tmp_path, pad_collator):
    train, test = make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert")
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                              per_device_train_batch_size=8, save_strategy="no", logging_strategy="no", seed=0,
                              gradient_checkpointing=True, **LISSA)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, processing_class=pad_collator.tokenizer)
    trainer.train()
    assert checkpointing(model)
    table = trainer.compute_influences(test)
    reference = tiny_model("bert")
    reference.load_state_dict(model.state_dict())
    expected = compute_influences(reference, train, test, default_arguments(**LISSA), data_collator=pad_collator)
    np.testing.assert_allclose(influence_values(table), influence_values(expected), rtol=1e-10, atol=1e-14)
    assert checkpointing(model)


# --- 4. normalisation with the batch's own statistics is refused ------------------------------------------------------

class NormedClassifier(nn.Module):
    """Mean-pooled embeddings → BatchNorm1d → linear head; counts its forward passes."""

    def __init__(self, track_running_stats: bool = True, norm_stays_training: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.norm = nn.BatchNorm1d(8, track_running_stats=track_running_stats)
        self.head = nn.Linear(8, 2)
        self.norm_stays_training = norm_stays_training
        self.calls = 0

    def train(self, mode: bool = True):
        super().train(mode)
        if self.norm_stays_training:
            self.norm.train(True)
        return self

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.head(torch.tanh(self.norm(pooled))))


@pytest.mark.parametrize("kwargs, why", [
    ({"track_running_stats": False}, "track_running_stats=False"),
    ({"norm_stays_training": True}, "stays in training mode"),
])
def test_batch_statistics_are_refused_before_any_work(kwargs, why, pad_collator):
    torch.manual_seed(0)
    model = NormedClassifier(**kwargs).double().train()
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    with pytest.raises(ValueError, match=rf"BatchNorm1d module 'norm'.*{why}.*track_running_stats=True"):
        compute_influences(model, train, test, default_arguments(**EXACT), data_collator=pad_collator)
    assert model.calls == 0  # refused before any forward pass
    assert model.training and all(p.requires_grad for p in model.parameters())  # state restored


def test_running_statistics_give_scores_independent_of_the_batch_size(pad_collator):
    torch.manual_seed(0)
    model = NormedClassifier(track_running_stats=True).double()
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    with torch.no_grad():  # estimate the running statistics, as training would
        for start in range(0, 20, 5):
            batch = pad_collator([train[i] for i in range(start, start + 5)])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.eval()
    values = []
    for size in (1, 7):
        args = default_arguments(**(EXACT | {"influence_damping": 1.0, "influence_scoring_batch_size": size,
                                              "influence_hvp_batch_size": size}))
        values.append(influence_values(compute_influences(model, train, test, args, data_collator=pad_collator)))
    assert np.abs(values[0]).max() > 0
    np.testing.assert_allclose(values[0], values[1], rtol=1e-9, atol=1e-14)


def test_left_padding_that_changes_a_rows_output_is_refused(pad_collator):
    """GPT-2 counts positions from the first pad: left padding without position ids changes a row's logits with
    its batch, so influence would depend on the batch sizes. Refused before s_test; right padding runs."""
    model = tiny_model("gpt2")
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    left = copy.deepcopy(pad_collator)
    left.tokenizer.padding_side = "left"
    args = default_arguments(**(EXACT | {"influence_params": [r"score\."]}))
    with pytest.raises(ValueError, match=r"changes when it is padded next to row .*padding_side = 'right'"):
        compute_influences(model, train, test, args, data_collator=left)
    table = compute_influences(model, train, test, args, data_collator=pad_collator)
    assert np.isfinite(influence_values(table)).all()
    # the same refusal from an engine that took the collator before its tokenizer was switched to left padding:
    # every check and cache it keys on the collator used to go on with the fingerprint taken at its creation
    with InfluenceEngine(model, args, data_collator=left) as engine:
        left.tokenizer.padding_side = "right"
        engine.compute_influences(train, test)
        left.tokenizer.padding_side = "left"
        with pytest.raises(ValueError, match=r"changes when it is padded next to row"):
            engine.compute_influences(train, test)


def test_a_fresh_head_padded_on_the_left_is_refused_by_its_logits(pad_collator):
    """A classifier at initialisation (std 0.02) keeps its loss near log k whatever its inputs: BERT padded on the
    left moved its logits by 44% with the batch while the loss moved less than the tolerance, and influence came
    back 3% off the explicit Hessian at batch size 10 (exact at 1), without a word."""
    torch.manual_seed(1)
    model = tiny_model("bert", num_labels=3, seed=1)
    train, test = make_token_dataset(10, seed=1, num_labels=3), make_token_dataset(3, seed=2, num_labels=3)
    left = copy.deepcopy(pad_collator)
    left.tokenizer.padding_side = "left"
    args = default_arguments(**(EXACT | {"influence_params": HEAD_ONLY["bert"], "influence_damping": 1.0}))
    with pytest.raises(ValueError, match=r"per-row logits\) of train_dataset row \d+ changes when it is padded"):
        compute_influences(model, train, test, args, data_collator=left)
    assert np.isfinite(influence_values(compute_influences(model, train, test, args, data_collator=pad_collator))).all()


def test_half_precision_with_the_trunk_cache_gives_finite_influence(pad_collator):
    """The cached trunk states' padding positions are a real token's state, not zeros, which made float16
    second derivatives overflow there and every influence NaN (with 'cg' and 'exact' silently)."""
    train, test = make_token_dataset(40, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert")
    from tests.tiny import train_tiny

    train_tiny(model, train, pad_collator, epochs=5)
    args = default_arguments(**(EXACT | {"influence_solver": "cg", "influence_damping": 1.0,
                                          "influence_params": TOP["bert"]}))
    half = compute_influences(model.half(), train, test, args, data_collator=pad_collator)
    assert half.metadata["diagnostics"]["trunk"]["split"] is not None  # the cached path ran
    full = compute_influences(model.double(), train, test, args, data_collator=pad_collator)
    values, reference = influence_values(half), influence_values(full)
    assert np.isfinite(values).all()
    assert np.corrcoef(values, reference)[0, 1] > 0.99


def test_non_finite_test_gradients_and_s_test_are_refused_with_the_fix(pad_collator, monkeypatch):
    """A test loss that overflows made CG return zeros (its NaN residual never counted as unconverged), so every
    influence was 0: refused by test row; and any solver's non-finite s_test is refused."""
    model = tiny_model("bert")
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    default = make_default_loss(model)

    def overflowing(outputs, batch):
        return default(outputs, batch) * float("inf")

    args = default_arguments(**(EXACT | {"influence_solver": "cg"}))
    with pytest.raises(FloatingPointError, match=r"gradient of test rows \[0, 1\] is not finite: their loss is inf / NaN "
                                                 r"\(check those rows' labels and inputs\)\.$"):  # float64: no overflow
        compute_influences(model, train, test, args, data_collator=pad_collator, measurement_fn=overflowing)
    monkeypatch.setattr("hf_fastif.engine.s_test.solve_cg", lambda hvp, v, lam, **k: (torch.full_like(v, float("nan")), {}))
    # (every training loss finite: the solver's own error; for a float64 model without the float32 advice it gave)
    with pytest.raises(FloatingPointError, match=r"s_test \(cg\) is not finite: a training row's loss or its "
                                                 r"derivatives are inf / NaN.*Check the training rows' losses\.$"):
        compute_influences(model, train, test, args, data_collator=pad_collator)
    # half-precision weights, the same: the overflow advice added, a copy (model.float() converted a Trainer's model)
    with pytest.raises(FloatingPointError, match=r"s_test \(cg\) is not finite: .*\(or it overflowed in float16: "
                                                 r"compute influence on a float32 copy of the model, "
                                                 r"copy\.deepcopy\(model\)\.float\(\)\.\)$"):
        compute_influences(copy.deepcopy(model).half(), train, test, args, data_collator=pad_collator)


def test_relative_difference_takes_nan_and_inf_for_no_agreement_and_reads_a_floor():
    """Every agreement check (a trunk split, the last-layer cut, stacked products, padding) reads its difference
    here: a NaN must not pass a ``<=`` nor fail a ``>`` silently, and the floor makes small references absolute."""
    from hf_fastif.utils import relative_difference

    reference = torch.tensor([2.0, -4.0, 1.0])
    assert relative_difference(reference + torch.tensor([0.0, 0.4, 0.0]), reference) == pytest.approx(0.1)
    assert relative_difference(reference, reference) == 0.0
    for bad in (float("nan"), float("inf")):
        broken = reference.clone()
        broken[1] = bad
        assert relative_difference(broken, reference) == float("inf")
        assert relative_difference(reference, broken) == float("inf")
    small = torch.tensor([1e-6, 0.0])
    assert relative_difference(small * 2, small) == pytest.approx(1.0)  # relative to its own size, however small
    assert relative_difference(small * 2, small, floor=1.0) == pytest.approx(1e-6)  # absolute below the floor
    zeros = torch.zeros(3)
    assert relative_difference(zeros, zeros) == 0.0
    assert relative_difference(zeros + 1e-30, zeros) > 1e200  # anything against exact zeros is a difference
    # a floor of 0 (the linear products' check reads the product's largest entry): zeros against zeros agree, and
    # anything else against them does not (a loss that is 0 on every row raised ZeroDivisionError there)
    assert relative_difference(zeros, zeros, floor=0.0) == 0.0
    assert relative_difference(zeros + 1e-30, zeros, floor=0.0) == float("inf")


def test_relative_difference_reads_large_tensors_chunk_by_chunk_with_the_same_value(monkeypatch):
    """Beyond `DIFFERENCE_CHUNK` entries the comparison runs chunk by chunk (no full-size temporaries): the same
    number as in one piece, the largest gap and reference found in whichever chunk holds them (the last, partial one
    too), mixed dtypes promoted alike, and a NaN or inf in any chunk still no agreement."""
    from hf_fastif import utils

    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 1, 1000, generator=gen)
    reference[1, 0, 10] = -9.0  # the largest reference entry, in another chunk
    value = reference + 1e-3 * torch.randn(3, 1, 1000, generator=gen)
    value[2, 0, 990] += 0.5  # the largest gap, in the last (partial) chunk
    whole, swapped = utils.relative_difference(value, reference), utils.relative_difference(reference, value)
    monkeypatch.setattr(utils, "DIFFERENCE_CHUNK", 256)  # 3,000 entries: 12 chunks, the last of 184
    assert utils.relative_difference(value, reference) == whole
    assert utils.relative_difference(reference, value) == swapped  # (the largest gap negative: its size counts)
    assert whole == float((value - reference).abs().max()) / 9.0 and 0.05 < whole < 0.06
    assert utils.relative_difference(value.double(), reference) == utils.relative_difference(value.double(),
                                                                                                reference.double())
    for bad in (float("nan"), float("inf")):
        broken = value.clone()
        broken[2, 0, 700] = bad
        assert utils.relative_difference(broken, reference) == float("inf")
    assert utils.relative_difference(value[:1], reference) == pytest.approx(  # broadcast: in one piece, as before
        float((value[:1] - reference).abs().max()) / 9.0)
