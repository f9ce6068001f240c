"""Nothing is BERT-specific: sequence classifiers of several architectures, causal LMs, plain modules."""

import functools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hf_fastif import compute_influences
from hf_fastif.influence import default_arguments
from hf_fastif.params import PAPER_BERT_PARAMS, select_parameters
from tests.tiny import make_token_dataset, seq2seq_rows, tiny_bart, tiny_model

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


@pytest.mark.parametrize("same_length", [True, False])
def test_seq2seq_decoder_inputs_come_from_the_labels(pad_collator, same_length):
    """A Trainer trains a seq2seq model with `DataCollatorForSeq2Seq(tokenizer)` (no decoder inputs in the batch):
    the model builds them from the labels. Influence calls the model without labels; BART then built them from
    `input_ids`, which gave influence 0.23 off (relative) for denoising pairs of equal length, silently, and a
    shape error otherwise. Both collators must give the same influence, each row's loss the model's own."""
    from transformers import DataCollatorForSeq2Seq

    from hf_fastif.batches import Batcher, decoder_inputs_from_labels
    from hf_fastif.loss import make_default_loss

    model = tiny_bart()
    train, test = seq2seq_rows(12, 0, same_length), seq2seq_rows(2, 1, same_length)
    args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=None,
                                            influence_params=[r"decoder\.layers\.1\.(fc|final)"])))
    tables = [compute_influences(model, train, test, args, data_collator=DataCollatorForSeq2Seq(
        pad_collator.tokenizer, **kw)).to_pandas().sort_values(["test_id", "train_id"]) for kw in ({}, {"model": model})]
    assert np.isfinite(tables[0].influence).all() and (tables[0].influence != 0).any()
    np.testing.assert_allclose(tables[0].influence.values, tables[1].influence.values, rtol=1e-10, atol=1e-14)
    collator = DataCollatorForSeq2Seq(pad_collator.tokenizer)
    batch = Batcher(train, train.column_names, collator, "cpu",
                    decoder_inputs=decoder_inputs_from_labels(model)).batch(range(4))
    with torch.no_grad():
        per_row = make_default_loss(model)(model(**{k: v for k, v in batch.items() if k != "labels"}), batch)
        own = [model(**collator([train[i]])).loss.item() for i in range(4)]
    np.testing.assert_allclose(per_row.numpy(), own, rtol=1e-6)


def test_encoder_decoder_heads_that_do_not_read_labels_get_no_decoder_inputs():
    from hf_fastif.batches import decoder_inputs_from_labels

    assert decoder_inputs_from_labels(tiny_bart()) is not None
    assert decoder_inputs_from_labels(tiny_bart("BartForSequenceClassification")) is None  # labels: class ids
    assert decoder_inputs_from_labels(tiny_model("bert")) is None
    from transformers import T5Config, T5ForSequenceClassification

    t5 = T5ForSequenceClassification(T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                              pad_token_id=0, decoder_start_token_id=0))
    assert callable(getattr(t5, "_shift_right", None)) and decoder_inputs_from_labels(t5) is None  # class ids


def _tiny_t5(prepare: bool, shift: bool):
    """A tiny T5 with or without its ``prepare_decoder_input_ids_from_labels`` / ``_shift_right`` (UDOP has only the
    latter)."""
    from transformers import T5Config, T5ForConditionalGeneration

    members = {} if prepare else {"prepare_decoder_input_ids_from_labels": None}
    if not shift:
        members["_shift_right"] = None
    cls = type("T5VariantForConditionalGeneration", (T5ForConditionalGeneration,), members)
    torch.manual_seed(0)
    return cls(T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                        decoder_start_token_id=0, eos_token_id=1)).double().eval()


def test_seq2seq_decoder_inputs_without_prepare_come_from_shift_right_or_are_refused():
    """Without ``prepare_decoder_input_ids_from_labels`` the decoder inputs are the model's own ``_shift_right`` of
    the labels (what its forward builds: the loss with them equals the model's loss given ``labels``); with
    neither, a ForConditionalGeneration model is refused with the fix named."""
    from hf_fastif.batches import decoder_inputs_from_labels

    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[10, 11, 1], [12, 1, -100]])
    for prepare in (True, False):
        model = _tiny_t5(prepare=prepare, shift=True)
        decoder = decoder_inputs_from_labels(model)(labels)
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=(ids > 0).long(), labels=labels).loss
            logits = model(input_ids=ids, attention_mask=(ids > 0).long(), decoder_input_ids=decoder).logits
        mine = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        torch.testing.assert_close(mine, own, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="collate `decoder_input_ids`"):
        decoder_inputs_from_labels(_tiny_t5(prepare=False, shift=False))(labels)


def _qa_loss(outputs, batch):
    """Question answering's loss over real tokens only (transformers' own softmax also covers the padding)."""
    pad = batch["attention_mask"] == 0
    start, end = outputs.start_logits.masked_fill(pad, -1e4), outputs.end_logits.masked_fill(pad, -1e4)
    return (torch.nn.functional.cross_entropy(start, batch["start_positions"], reduction="none")
            + torch.nn.functional.cross_entropy(end, batch["end_positions"], reduction="none")) / 2


def _tiny_qa_bert(**config):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    return BertForQuestionAnswering(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, attn_implementation="eager", **config)).double().eval()


def _qa_rows(n: int, seed: int):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = [1] + rng.integers(5, 60, size=int(rng.integers(4, 10))).tolist()
        start = int(rng.integers(1, len(ids)))
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "start_positions": start,
                    "end_positions": int(rng.integers(start, len(ids)))})
    return Dataset.from_list(out)


def test_question_answering_with_a_loss_fn_matches_the_explicit_hessian(pad_collator):
    """A model without `.logits` and rows without `labels`: the loss_fn reads start / end positions. The trunk cache
    used to crash in its check (it read `.logits`), and the rows were refused for lacking `labels`. Influence on
    the head and the last layer's LayerNorm and dense bias below it (82 parameters) must equal
    -∇ℓ_i·(H + λI)⁻¹∇ℓ_test, H the explicit Hessian of the mean loss, each row's loss taken alone (unpadded), with the
    cache on and off; the model's own loss (softmax over padding too) is refused by the padding probe with the fix
    named. The reference Hessian is autograd's double backward: torch.func.hessian (and jacrev of jacrev) gets
    LayerNorm's mixed second derivatives wrong in torch 2.13 (here 1e-3 of the Hessian, asymmetric), so the reference
    must be symmetric before it is trusted."""
    model = _tiny_qa_bert()
    train, test = _qa_rows(12, seed=0), _qa_rows(2, seed=1)
    damping, scale = 0.05, 10.0  # λ 0.5: the untrained layer's Hessian has an eigenvalue near -0.17
    selection = r"qa_outputs\.|encoder\.layer\.1\.output\.(LayerNorm|dense\.bias)"
    names = [n for n, _ in model.named_parameters() if re.search(selection, n)]
    assert len(names) == 5
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]

    def loss_of(flat, row):
        values = dict(base) | {n: t.view_as(base[n]) for n, t in zip(names, flat.split(sizes))}
        batch = pad_collator([row])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        return _qa_loss(torch.func.functional_call(model, values, (), inputs), batch)[0]

    theta = torch.cat([base[n].reshape(-1) for n in names])
    hessian = sum(torch.autograd.functional.hessian(functools.partial(loss_of, row=train[i]), theta, vectorize=True)
                  for i in range(len(train))) / len(train)
    torch.testing.assert_close(hessian, hessian.T, rtol=0, atol=1e-14)

    def grads(data):
        return torch.stack([torch.func.grad(loss_of)(theta, data[i]) for i in range(len(data))])

    s_test = torch.linalg.solve(hessian + damping * scale * torch.eye(len(theta), dtype=theta.dtype), grads(test).T)
    expected = -(grads(train) @ s_test).T.numpy()  # (tests, train)
    for cache in (True, False):
        args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=None, influence_damping=damping,
                                                influence_scale=scale, influence_weight_decay=0.0,
                                                influence_params=[selection], influence_trunk_cache=cache)))
        table = compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=_qa_loss)
        df = table.to_pandas()
        found = np.zeros_like(expected)
        found[df.test_id, df.train_id] = df.influence
        np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
        assert (table.metadata["diagnostics"]["trunk"].get("split") is not None) == cache

    def own(outputs, batch):  # transformers' own: the softmax covers the padded positions
        return torch.nn.functional.cross_entropy(outputs.start_logits, batch["start_positions"], reduction="none")

    with pytest.raises(ValueError, match="loss_fn that masks them"):
        compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=own)


def test_question_answering_without_return_dict_keeps_the_trunk_cache(pad_collator):
    """``return_dict=False`` with the positions in the batch: the model returns ``(loss, start, end)``, a tuple that
    names nothing. The trunk check compared that loss (a softmax over padding the cache does not hold) and dropped
    the split; a 0-dim output is now left out like a named loss, and the numbers equal the uncached ones."""
    def tuple_loss(outputs, batch):  # the last two entries are the start / end logits
        return _qa_loss(SimpleNamespace(start_logits=outputs[-2], end_logits=outputs[-1]), batch)

    train, test = _qa_rows(8, seed=0), _qa_rows(2, seed=1)
    found = {}
    for cache in (True, False):
        args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=None, influence_damping=0.05,
                                                influence_scale=10.0, influence_params=[r"qa_outputs\."],
                                                influence_trunk_cache=cache)))
        table = compute_influences(_tiny_qa_bert(return_dict=False), train, test, args, data_collator=pad_collator,
                                   loss_fn=tuple_loss)
        assert (table.metadata["diagnostics"]["trunk"].get("split") is not None) == cache
        found[cache] = table.to_pandas().sort_values(["test_id", "train_id"]).influence.to_numpy()
    np.testing.assert_allclose(found[True], found[False], rtol=1e-9)


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

    def features(model, batch):  # over the real tokens (one that reads the padding is refused)
        mask = batch["attention_mask"].unsqueeze(-1).to(model.embed.weight.dtype)
        return (model.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)

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


def test_a_seq2seq_models_position_tables_pad_labels_and_collator_are_named(pad_collator):
    """BART names its position tables `embed_positions` (2 rows skipped): a source or target longer than them failed
    with a bare IndexError; targets padded with the pad id were blamed on left padding or a QA loss; and a collator
    that cannot pad the targets was answered "pass DataCollatorWithPadding", the collator given."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from hf_fastif.batches import decoder_position_limit, position_limit

    model = tiny_bart()
    assert position_limit(model) == 40 and decoder_position_limit(model) == 40
    train = seq2seq_rows(8, 0, False)
    args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=None,
                                            influence_params=[r"decoder\.layers\.1\.(fc|final)"])))
    collator = DataCollatorForSeq2Seq(pad_collator.tokenizer)
    for row, message in (
            ({"input_ids": list(range(5, 55)) + [3], "labels": [5, 3]}, "has a sequence of 51 tokens, more than the "
                                                                         "model's 40 positions"),
            ({"input_ids": [5, 6, 3], "labels": list(range(5, 55)) + [3]}, "has 51 target tokens \\(labels\\), more "
                                                                           "than the decoder's 40 positions")):
        long = Dataset.from_list([row | {"attention_mask": [1] * len(row["input_ids"])}])
        with pytest.raises(ValueError, match=f"test_dataset row 0 {message}"):
            compute_influences(model, train, long, args, data_collator=collator)
    padded_with_pad_id = DataCollatorForSeq2Seq(pad_collator.tokenizer, label_pad_token_id=0)
    with pytest.raises(ValueError, match="Its targets are padded with the pad token id"):
        compute_influences(model, train, seq2seq_rows(2, 1, False), args, data_collator=padded_with_pad_id)
    with pytest.raises(ValueError, match="pass data_collator=DataCollatorForSeq2Seq\\(tokenizer, model=model\\)"):
        compute_influences(model, train, seq2seq_rows(2, 1, False), args,
                           data_collator=DataCollatorWithPadding(pad_collator.tokenizer))


def test_only_the_token_stacks_position_tables_bound_the_rows():
    """Every `embed_positions` counted: FSMT's grows on demand and Qwen2-Audio's is its audio tower's (its text
    model has rotary positions), so rows those models take were refused. An encoder-decoder classifier was told to
    use DataCollatorForSeq2Seq, which fails on class ids."""
    import transformers as T

    from hf_fastif.batches import (
        PADDING_COLLATORS,
        decoder_position_limit,
        padding_collator_for,
        position_limit,
    )

    torch.manual_seed(0)
    fsmt = T.FSMTForConditionalGeneration(T.FSMTConfig(
        langs=["en", "de"], src_vocab_size=40, tgt_vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=8, pad_token_id=1, bos_token_id=0, eos_token_id=2))
    assert position_limit(fsmt) is None and decoder_position_limit(fsmt) is None
    audio = T.Qwen2AudioForConditionalGeneration(T.Qwen2AudioConfig(
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
                          max_source_positions=20),
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096),
        audio_token_index=63))
    assert position_limit(audio) is None
    assert position_limit(tiny_model("bert")) == 32 and position_limit(tiny_model("gpt2")) == 32
    assert position_limit(tiny_model("roberta")) == 39
    assert padding_collator_for(tiny_bart("BartForSequenceClassification")) == PADDING_COLLATORS[None]
    assert padding_collator_for(tiny_bart()) == PADDING_COLLATORS["seq2seq"]


def _float64_collator(features):
    """default_data_collator with float tensors in float64: datasets hands float columns over as float32, and these
    tests' models are float64."""
    from transformers import default_data_collator

    return {k: v.double() if v.is_floating_point() else v for k, v in default_data_collator(features).items()}


def _tiny_wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, classifier_proj_size=8,
                            num_labels=2, vocab_size=10)
    return Wav2Vec2ForSequenceClassification(config).double().eval()


def test_audio_classifier_without_token_embeddings_matches_the_explicit_hessian():
    """Wav2Vec2 (input_values, no token embeddings: transformers' ``get_input_embeddings`` raises
    NotImplementedError there) crashed in the engine's value check. Influence on the projector and classifier
    must equal -∇ℓ_i·(H + λI)⁻¹∇ℓ_test with H the explicit Hessian of the mean training loss."""
    from datasets import Dataset

    model = _tiny_wav2vec2()
    rng = np.random.default_rng(0)

    def rows(n):
        return Dataset.from_dict({"input_values": rng.standard_normal((n, 400)).tolist(),
                                  "labels": rng.integers(0, 2, n).tolist()})

    train, test = rows(10), rows(2)
    names = [n for n, _ in model.named_parameters() if n.startswith(("projector.", "classifier."))]
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].reshape(-1) for n in names])

    def losses(flat, data):
        values = dict(base) | {n: t.view_as(base[n]) for n, t in zip(names, flat.split(sizes))}
        inputs = torch.tensor(data["input_values"], dtype=torch.float64)
        logits = torch.func.functional_call(model, values, (), {"input_values": inputs}).logits
        return nn.functional.cross_entropy(logits, torch.tensor(data["labels"]), reduction="none")

    lam = 0.05 * 10.0
    hessian = torch.autograd.functional.hessian(lambda f: losses(f, train).mean(), theta)
    g_train = torch.autograd.functional.jacobian(lambda f: losses(f, train), theta)
    g_test = torch.autograd.functional.jacobian(lambda f: losses(f, test), theta)
    expected = -(torch.linalg.solve(hessian + lam * torch.eye(len(theta), dtype=theta.dtype), g_test.T).T
                 @ g_train.T).numpy()
    args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=None, influence_damping=0.05,
                                            influence_scale=10.0, influence_weight_decay=0.0,
                                            influence_params=[r"^projector\.", r"^classifier\."])))
    df = compute_influences(model, train, test, args, data_collator=_float64_collator).to_pandas()
    found = np.zeros_like(expected)
    found[df.test_id, df.train_id] = df.influence
    np.testing.assert_allclose(found, expected, rtol=1e-8, atol=1e-11 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["resnet", "segformer"])
def test_convolutional_vision_features_are_pooled_maps(kind):
    """A convolutional vision model's kNN features: ResNet's pooled output is (b, c, 1, 1) and SegFormer's states
    (b, c, h, w); 'auto' refused both as features that are not (rows, d). They are the pooled map and the global
    average pool, and the kNN candidates' values are the full scan's."""
    import transformers
    from datasets import Dataset

    from hf_fastif.knn import model_features

    torch.manual_seed(0)
    if kind == "resnet":
        model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_labels=2, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    else:
        model = transformers.SegformerForImageClassification(transformers.SegformerConfig(
            num_labels=2, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]))
    model = model.double().eval()
    rng = np.random.default_rng(0)
    pixels = torch.tensor(rng.standard_normal((6, 3, 32, 32)))
    with torch.no_grad():
        out = model.base_model(pixel_values=pixels)
        expected = out.pooler_output.flatten(1) if kind == "resnet" else out.last_hidden_state.mean((2, 3))
        found = model_features(model, {"pixel_values": pixels})
    assert found.shape == (6, 16)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)

    def rows(n):
        return Dataset.from_dict({"pixel_values": rng.standard_normal((n, 3, 32, 32)).tolist(),
                                  "labels": rng.integers(0, 2, n).tolist()})

    train, test = rows(8), rows(2)
    tables = {}
    for k in (5, None):
        args = default_arguments(**(ARGS | dict(influence_solver="exact", influence_knn_k=k,
                                                influence_params=[r"^classifier\."])))
        table = compute_influences(model, train, test, args, data_collator=_float64_collator)
        assert table.metadata["diagnostics"]["candidates"] == ("knn" if k else "all")
        tables[k] = table.to_pandas().set_index(["test_id", "train_id"]).influence
    assert len(tables[5]) == 2 * 5
    np.testing.assert_allclose(tables[5].to_numpy(), tables[None].loc[tables[5].index].to_numpy(), rtol=1e-10)


def test_feature_maps_are_read_by_their_channels():
    """Four-dimensional states become (b, h·w, c) by where the channels sit: channels first (convolutional models),
    channels last (NAT-style: flattening those channel-first mixed every channel into one feature), and a clear error
    where the config cannot tell them apart."""
    from hf_fastif.knn import _map_positions

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8))
    states = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(_map_positions(states, model, None), states.reshape(2, 15, 8))
    first = states.permute(0, 3, 1, 2)  # (2, 8, 3, 5)
    torch.testing.assert_close(_map_positions(first, model, None), states.reshape(2, 15, 8))
    pooled = torch.randn(2, 8)
    torch.testing.assert_close(_map_positions(first, SimpleNamespace(config=None), pooled), states.reshape(2, 15, 8))
    with pytest.raises(ValueError, match=r"which dimension holds the 8 channels is not clear: pass `features="):
        _map_positions(torch.randn(2, 8, 4, 8), model, None)


def _choice_rows(n: int, seed: int, choices: int):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, size=(n, choices, 6))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": rng.integers(0, choices, size=n).tolist()})


def test_a_multiple_choice_head_takes_cross_entropy_over_its_choices_whatever_its_problem_type():
    """BertForMultipleChoice's loss is cross-entropy over its choices, whatever config.problem_type says; the default
    loss read it as a sequence classifier's: a multi-label or regression problem_type was refused with a message
    about integer labels (a review's repro), and one choice got squared error. Now the per-row loss is the model's
    own and the influence the same as without a problem_type; rows of one choice (every loss 0) are refused."""
    from transformers import BertConfig, BertForMultipleChoice

    from hf_fastif.batches import Batcher, validate_dataset
    from hf_fastif.loss import make_default_loss, multiple_choice
    from hf_fastif.trunk import model_inputs

    train, test = _choice_rows(8, 0, 3), _choice_rows(2, 1, 3)
    args = default_arguments(influence_solver="exact", influence_knn_k=None, influence_damping=0.5,
                             influence_params=[r"classifier\."], disable_tqdm=True)
    tables = {}
    for declared in (None, "multi_label_classification", "regression"):
        torch.manual_seed(0)
        model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, problem_type=declared,
                                                 attn_implementation="eager")).double().eval()
        assert multiple_choice(model)
        batch = Batcher(train, validate_dataset(train, "train", model), None, "cpu").batch(range(8))
        with torch.no_grad():
            outputs = model(**model_inputs(batch, model))
            own = model(**batch).loss
        torch.testing.assert_close(make_default_loss(model)(outputs, batch).mean(), own, rtol=1e-12, atol=0)
        tables[declared] = compute_influences(model, train, test, args).to_pandas().influence.to_numpy()
        assert (tables[declared] != 0).all()
    for declared in ("multi_label_classification", "regression"):
        np.testing.assert_allclose(tables[declared], tables[None], rtol=1e-12, atol=0)
    assert not multiple_choice(tiny_model("bert"))
    with pytest.raises(ValueError, match="one choice each"):
        compute_influences(model, _choice_rows(6, 0, 1), _choice_rows(2, 1, 1), args)
    # soft labels over the choices: named for what they are (the hint said to set problem_type, which it ignores)
    soft = train.map(lambda r: {"labels": [float(c == r["labels"]) for c in range(3)]})
    with pytest.raises(ValueError, match=r"multiple-choice head takes one integer choice id per row.*loss_fn") as err:
        compute_influences(model, soft, test, args)
    assert "problem_type" not in str(err.value)
