"""Nothing is BERT-specific: sequence classifiers of several architectures, causal LMs, plain modules."""

import numpy as np
import pytest
import torch
from torch import nn

from hf_fastif import compute_influences
from hf_fastif.influence import default_arguments
from hf_fastif.params import PAPER_BERT_PARAMS, select_parameters
from tests.tiny import make_token_dataset, tiny_model

ARGS = dict(influence_solver="lissa", influence_damping=0.05, influence_scale=500.0, influence_recursion_depth=20,
            influence_batch_size=2, influence_repetitions=2, influence_knn_k=6, disable_tqdm=True)


def both_scorings(model, train, test, collator, **kw):
    out = []
    for scoring in ("jvp", "grad"):
        args = default_arguments(**(ARGS | kw | {"influence_scoring": scoring}))
        df = compute_influences(model, train, test, args, data_collator=collator).to_pandas()
        out.append(df.sort_values(["test_id", "train_id"]).reset_index(drop=True))
    return out


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2"])
def test_sequence_classifiers(kind, pad_collator):
    model = tiny_model(kind, num_labels=3)
    train, test = make_token_dataset(30, seed=0, num_labels=3), make_token_dataset(2, seed=1, num_labels=3)
    jvp, grad = both_scorings(model, train, test, pad_collator)
    assert len(jvp) == 2 * 6 and np.isfinite(jvp.influence).all() and (jvp.influence != 0).any()
    np.testing.assert_array_equal(jvp.train_id, grad.train_id)
    np.testing.assert_allclose(jvp.influence, grad.influence, rtol=1e-8, atol=1e-12)


def test_causal_lm_uses_mean_token_loss(pad_collator):
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model("gpt2-lm")
    train, test = make_token_dataset(20, seed=0, causal=True), make_token_dataset(2, seed=1, causal=True)
    collator = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
    train, test = train.remove_columns("labels"), test.remove_columns("labels")
    with pytest.raises(ValueError, match="DataCollatorForLanguageModeling"):
        compute_influences(model, train, test, default_arguments(**ARGS), data_collator=pad_collator)
    jvp, grad = both_scorings(model, train, test, collator, influence_knn_k=None)
    np.testing.assert_allclose(jvp.influence, grad.influence, rtol=1e-8, atol=1e-12)
    # the default loss is the model's own (shifted, mean over tokens) loss
    from hf_fastif.loss import make_default_loss

    batch = collator([train[i] for i in range(4)])  # the collator makes labels = input_ids (pads: -100)
    with torch.no_grad():
        per_row = make_default_loss(model)(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
        own = [model(**collator([train[i]])).loss.item() for i in range(4)]
    np.testing.assert_allclose(per_row.numpy(), own, rtol=1e-6)  # the model upcasts its loss to float32


class PlainClassifier(nn.Module):
    """Not a transformers model: a batch dict in, an object with `.logits` out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return type("Out", (), {"logits": self.head(torch.tanh(pooled))})()


def test_plain_module_with_custom_features(pad_collator):
    torch.manual_seed(0)
    model = PlainClassifier().double()
    train, test = make_token_dataset(25, seed=0), make_token_dataset(3, seed=1)

    def features(model, batch):
        return model.embed(batch["input_ids"]).mean(1)

    args = default_arguments(**(ARGS | {"influence_solver": "exact"}))
    table = compute_influences(model, train, test, args, data_collator=pad_collator, features=features)
    assert sorted(set(table.to_pandas().test_id)) == [0, 1, 2]
    with pytest.raises(ValueError, match="features=callable"):
        compute_influences(model, train, test, args, data_collator=pad_collator)


def test_custom_loss_and_measurement(pad_collator):
    model = tiny_model("bert")
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)

    def margin(outputs, batch):  # a test quantity other than the loss: the logit margin of class 1
        return outputs.logits[:, 1] - outputs.logits[:, 0]

    args = default_arguments(**(ARGS | {"influence_solver": "cg", "influence_knn_k": None,
                                        "influence_params": [r"classifier\."]}))
    plain = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
    measured = compute_influences(model, train, test, args, data_collator=pad_collator,
                                  measurement_fn=margin).to_pandas()
    doubled = compute_influences(model, train, test, args, data_collator=pad_collator,
                                 measurement_fn=lambda o, b: 2 * margin(o, b)).to_pandas()
    key = ["test_id", "train_id"]
    a, b, c = (df.sort_values(key).influence.values for df in (plain, measured, doubled))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(c, 2 * b, rtol=1e-10)  # s_test is linear in the measurement gradient


def test_paper_parameter_selection():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertForSequenceClassification(cfg)
    names = list(select_parameters(model, PAPER_BERT_PARAMS))
    assert any(n.startswith("bert.encoder.layer.10.") for n in names)
    assert any(n.startswith("bert.encoder.layer.11.") for n in names)
    assert "bert.pooler.dense.weight" in names and "classifier.weight" in names
    assert not any(n.startswith(("bert.embeddings", "bert.encoder.layer.1.", "bert.encoder.layer.9.")) for n in names)
    # requires_grad selection: freeze all but the selection, as the paper fine-tunes
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    assert list(select_parameters(model, None)) == names


@pytest.mark.parametrize("side", ["right", "left"])
def test_first_and_last_token_features_follow_the_attention_mask(side):
    """'cls' and 'last' kNN features take each row's first / last real token, whichever side the padding is on
    (taking position 0 and length - 1 gave padding or early tokens under left padding)."""
    from hf_fastif.knn import _token

    lengths = [2, 4, 3]
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    hidden = torch.arange(15, dtype=torch.float64).reshape(3, 5, 1).expand(3, 5, 2)
    first = [int(mask[r].nonzero()[0]) for r in range(3)]
    last = [int(mask[r].nonzero()[-1]) for r in range(3)]
    assert _token(hidden, mask, "first")[:, 0].tolist() == [5.0 * r + first[r] for r in range(3)]
    assert _token(hidden, mask, "last")[:, 0].tolist() == [5.0 * r + last[r] for r in range(3)]
    assert _token(hidden, None, "last")[:, 0].tolist() == [4.0, 9.0, 14.0]


class ScoresClassifier(PlainClassifier):
    """Returns a dict without `logits`: usable with a loss_fn of its own."""

    def forward(self, input_ids, attention_mask=None):
        return {"scores": super().forward(input_ids, attention_mask).logits}


def test_a_model_without_logits_runs_with_its_loss_fn(pad_collator):
    """The padding probe compares the rows' losses as every stage computes them, so a model that returns no
    `.logits` but comes with a loss_fn is probed and accepted, not refused for its output type."""
    torch.manual_seed(0)
    model = ScoresClassifier().double()
    train, test = make_token_dataset(25, seed=0), make_token_dataset(3, seed=1)

    def loss_fn(outputs, batch):
        return nn.functional.cross_entropy(outputs["scores"], batch["labels"], reduction="none")

    args = default_arguments(**(ARGS | {"influence_solver": "exact", "influence_knn_k": None}))
    table = compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=loss_fn)
    assert len(table) == 3 * 25 and np.isfinite(table.to_pandas().influence).all()


def test_stored_values_of_nested_token_lists_are_checked_per_sequence():
    """Multiple-choice rows hold a list of token lists: token ids and sequence lengths are checked inside them
    (a one-level flatten crashed on them) and a bad one is named by its row."""
    from datasets import Dataset

    from hf_fastif.batches import check_values
    from tests.tiny import VOCAB

    model = tiny_model("bert")  # vocabulary 60, 32 positions
    good = Dataset.from_dict({"input_ids": [[[1, 2], [3, 4, 5]], [[1], [6, 2]]], "labels": [0, 1]})
    check_values(good, ["input_ids", "labels"], "train_dataset", model)
    bad_id = Dataset.from_dict({"input_ids": [[[1, 2], [3, 4, 5]], [[1], [VOCAB + 1, 2]]], "labels": [0, 1]})
    with pytest.raises(ValueError, match=rf"train_dataset row 1 has token id {VOCAB + 1}"):
        check_values(bad_id, ["input_ids", "labels"], "train_dataset", model)
    too_long = Dataset.from_dict({"input_ids": [[[1, 2], [3] * 33], [[1], [6, 2]]], "labels": [0, 1]})
    with pytest.raises(ValueError, match=r"train_dataset row 0 has a sequence of 33 tokens"):
        check_values(too_long, ["input_ids", "labels"], "train_dataset", model)
