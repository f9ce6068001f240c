"""Generative models' data layouts: the padding probe on every dataset, targets a causal LM's shift drops, batches
without an attention mask, tied heads by name, encoder-decoder kNN features."""

import copy
from unittest import mock

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_fastif import InfluenceEngine, compute_influences
from hf_fastif.influence import default_arguments
from hf_fastif.params import select_parameters
from tests.tiny import VOCAB, make_token_dataset, seq2seq_rows, tiny_bart, tiny_model

EXACT = dict(influence_solver="exact", influence_knn_k=None, influence_damping=1.0, influence_scale=1.0,
             disable_tqdm=True)


def _values(table, m: int, n: int) -> np.ndarray:
    frame = table.to_pandas()
    out = np.full((m, n), np.nan)
    out[frame.test_id.values, frame.train_id.values] = frame.influence.values
    return out


def _rows(lengths, seed: int, causal: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = [[1] + rng.integers(5, VOCAB, size=n - 1).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                              "labels": ids if causal else [int(sum(x) % 2) for x in ids]})


def _left(collator):
    left = copy.deepcopy(collator)
    left.tokenizer.padding_side = "left"
    return left


def test_left_padding_is_found_beyond_the_first_rows(pad_collator):
    """A training set grouped by length: its first 64 rows share one length, the probe looked at those only, and a
    GPT-2 classifier padded on the left without position ids ran, with influence 0.86 off between batch sizes."""
    train = _rows([5] * 70 + [2, 3, 9, 11], seed=0)
    test = _rows([4, 6], seed=1)
    args = default_arguments(**(EXACT | {"influence_params": [r"score\."]}))
    with pytest.raises(ValueError, match=r"train_dataset row 70 changes when it is padded next to row 73"):
        compute_influences(tiny_model("gpt2"), train, test, args, data_collator=_left(pad_collator))


def test_rows_stored_padded_are_probed_by_their_stored_width(pad_collator):
    """Rows stored padded (`tokenizer(..., padding=True)` in a batched `map`: each chunk to its own longest row), on
    the left, for GPT-2 without position ids: the rows with the fewest and the most real tokens share a chunk and a
    width, so probing by real tokens alone padded nothing and passed, with 0.70 off between batch sizes. The collator
    pads by stored width, and so does the probe now."""
    rng = np.random.default_rng(0)
    ids, mask = [], []
    for width, lengths in ((10, [2, 10, 5, 7]), (6, [4, 6, 5, 6, 3, 6, 4, 5])):
        for n in lengths:
            ids.append([0] * (width - n) + [1] + rng.integers(5, VOCAB, size=n - 1).tolist())
            mask.append([0] * (width - n) + [1] * n)
    train = Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "label": [int(sum(x) % 2) for x in ids]})
    args = default_arguments(**(EXACT | {"influence_params": [r"score\."]}))
    with pytest.raises(ValueError, match=r"train_dataset row 4 changes when it is padded next to row 0"):
        compute_influences(tiny_model("gpt2"), train, train.select([4, 5]), args, data_collator=_left(pad_collator))


def test_left_padded_causal_lm_with_position_ids_is_told_to_pad_right(pad_collator):
    """With position ids, a causal LM padded on the left still predicts its first token from a pad (the collator
    labels it; alone it is no target): the message said to add position ids, which it had."""
    from transformers import DataCollatorForLanguageModeling

    lm = DataCollatorForLanguageModeling(_left(pad_collator).tokenizer, mlm=False)

    def with_positions(rows):
        batch = lm(rows)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return batch

    train = _rows([3, 6, 4, 8], seed=0, causal=True).remove_columns("labels")
    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    with pytest.raises(ValueError, match=r"causal LM padded on the left, and its first token is a target predicted "
                                         r"from a padding position.*padding_side = 'right'"):
        compute_influences(tiny_model("gpt2-lm"), train, train.select([0]), args, data_collator=with_positions)


def test_stored_lengths_over_views_of_a_dataset():
    from datasets import concatenate_datasets

    from hf_fastif.batches import Batcher

    rows = Dataset.from_list([{"input_ids": [1] * n, "attention_mask": [1] * (n - 1) + [0],
                               "labels": [-100] + [5] * (n - 1)} for n in [3, 9, 1, 7, 2, 12, 4]])
    views = [rows, rows.select([5, 2, 0]), rows.shuffle(seed=0), concatenate_datasets([rows, rows]).select(range(5, 11)),
             rows.select(range(2, 6)).flatten_indices(), rows.filter(lambda r: len(r["input_ids"]) > 2)]
    for view in views:
        batcher = Batcher(view, view.column_names, None, "cpu")
        width = np.array([len(x) for x in view["input_ids"]])
        np.testing.assert_array_equal(batcher.stored_lengths(), width)
        np.testing.assert_array_equal(batcher.stored_lengths("attention_mask", "tokens"), width - 1)
        np.testing.assert_array_equal(batcher.stored_lengths("labels", "targets"), width - 1)
        np.testing.assert_array_equal(batcher.subset([1, 0]).stored_lengths(), width[[1, 0]])
    choices = Dataset.from_list([{"input_ids": [[1, 2], [1, 2, 3, 4]], "attention_mask": [[1, 1], [1, 1, 1, 0]]},
                                 {"input_ids": [[1], [1, 2]], "attention_mask": [[1], [1, 1]]}])
    batcher = Batcher(choices, choices.column_names, None, "cpu")
    assert batcher.stored_lengths().tolist() == [4, 2]  # a row's longest choice
    assert batcher.stored_lengths("attention_mask", "tokens").tolist() == [3, 2]
    multi_hot = Dataset.from_list([{"input_ids": [1, 2], "labels": [0.0, 1.0]}, {"input_ids": [1], "labels": [1.0, 0.0]}])
    assert Batcher(multi_hot, multi_hot.column_names, None, "cpu").stored_lengths("labels", "targets") is None


def test_test_rows_are_probed_too(pad_collator):
    """A causal LM trained on fixed-size blocks (nothing to pad) and asked about test rows of varied length, padded
    on the left: only the test rows are padded, and their influence came back 0.92 off at the default batch size."""
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model("gpt2-lm")
    train = _rows([8] * 12, seed=0, causal=True).remove_columns("labels")
    test = _rows([3, 7, 5], seed=1, causal=True).remove_columns("labels")
    left = DataCollatorForLanguageModeling(_left(pad_collator).tokenizer, mlm=False)
    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    with pytest.raises(ValueError, match=r"test_dataset row 0 changes when it is padded next to row 1"):
        compute_influences(model, train, test, args, data_collator=left)
    right = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
    values = [_values(compute_influences(model, train, test, default_arguments(**(EXACT | {
        "influence_params": [r"ln_f\."], "influence_hvp_batch_size": size, "influence_scoring_batch_size": size})),
        data_collator=right), 3, 12) for size in (1, 64)]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-8, atol=1e-12)


def test_seq2seq_targets_padded_on_the_left_are_refused_with_the_cause(pad_collator):
    """Sources of one length (nothing to pad in the inputs), targets of several, and DataCollatorForSeq2Seq with
    the tokenizer padding on the left: the decoder read pads before the targets, 0.96 off, without a word."""
    from transformers import DataCollatorForSeq2Seq

    model = tiny_bart()
    train, test = seq2seq_rows(12, 0, same_length=False), seq2seq_rows(2, 1, same_length=False)
    train = train.map(lambda row: {"input_ids": row["input_ids"][:4], "attention_mask": [1] * 4})
    args = default_arguments(**(EXACT | {"influence_params": [r"decoder\.layers\.1\.final"]}))
    with pytest.raises(ValueError, match=r"targets are padded on the left .*padding_side = 'right'"):
        compute_influences(model, train, test, args,
                           data_collator=DataCollatorForSeq2Seq(_left(pad_collator).tokenizer))
    table = compute_influences(model, train, test, args, data_collator=DataCollatorForSeq2Seq(pad_collator.tokenizer))
    assert np.isfinite(table.to_pandas().influence).all()


def test_labels_padded_with_the_pad_id_are_named_as_the_cause(pad_collator):
    """Labels padded with the pad token (0), not -100: the loss reads the pads. Refused, naming that (it used to
    blame left padding)."""
    model = tiny_model("gpt2-lm")
    train = _rows([3, 5, 8, 6], seed=0, causal=True)

    def collate(rows):
        batch = pad_collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([r["labels"] + [0] * (width - len(r["labels"])) for r in rows])
        return batch

    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    with pytest.raises(ValueError, match=r"padding positions carry labels other than -100"):
        compute_influences(model, train, train.select([0]), args, data_collator=collate)


@pytest.mark.parametrize("labels", ["one token", "first position only"])
def test_causal_test_rows_whose_targets_the_shift_drops_are_refused(pad_collator, labels):
    """A causal LM's loss skips position 0 (each position predicts the next token): a one-token test row, or one
    labelled at its first token only, has loss 0 and gave a table of zeros."""
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model("gpt2-lm")
    train = _rows([4, 6, 5, 7], seed=0, causal=True)
    if labels == "one token":
        test = Dataset.from_dict({"input_ids": [[1, 7, 9], [1]], "attention_mask": [[1, 1, 1], [1]]})
        collator = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
        train = train.remove_columns("labels")
    else:
        test = Dataset.from_dict({"input_ids": [[1, 7, 9], [1, 8, 9]], "attention_mask": [[1] * 3] * 2,
                                  "labels": [[1, 7, 9], [1, -100, -100]]})
        collator = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
        collator = _keep_labels(collator)
    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    if labels == "one token":  # (labels the collator makes: seen once collated)
        with pytest.raises(ValueError, match=r"test_dataset row 1 leaves the loss no target"):
            compute_influences(model, train, test, args, data_collator=collator)
    else:  # stored labels: refused by the check of stored values, before any work (it came after the trunk states)
        with mock.patch.object(InfluenceEngine, "_test_gradients", side_effect=AssertionError("work began")), \
                pytest.raises(ValueError, match=r"test_dataset row 1 has every label at -100 \(ignored\) after its "
                                                r"first token, which a causal LM's loss does not read"):
            compute_influences(model, train, test, args, data_collator=collator)
    table = compute_influences(model, train, test.select([0]), args, data_collator=collator)
    assert (table.to_pandas().influence != 0).all()


def _keep_labels(collator):
    """Pad stored labels with -100 instead of copying input_ids (as DataCollatorForSeq2Seq does)."""
    def collate(rows):
        batch = collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
        if "labels" in rows[0]:
            width = batch["input_ids"].shape[1]
            batch["labels"] = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        return batch

    return collate


def test_batches_without_an_attention_mask_run_without_the_trunk_cache(pad_collator, caplog):
    """A collator that pads but returns no attention mask (pads labelled -100, causal attention never reads them):
    the cache counted the pads as tokens and failed with "tokenise to other lengths", a new engine too. It now runs
    the full forward and says why; the values equal the cache switched off."""
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model("gpt2-lm")
    lm = DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)

    def no_mask(rows):
        batch = lm(rows)
        batch.pop("attention_mask")
        return batch

    train = _rows([4, 6, 5, 7, 3, 8], seed=0, causal=True).remove_columns("labels")
    test = _rows([4, 6], seed=1, causal=True).remove_columns("labels")
    args = {**EXACT, "influence_params": [r"h\.1\.", r"ln_f\."], "influence_damping": 20.0}
    tables = [compute_influences(model, train, test, default_arguments(**(args | {"influence_trunk_cache": on})),
                                 data_collator=no_mask) for on in (True, False)]
    assert "carry no attention_mask" in caplog.text
    assert tables[0].metadata["diagnostics"]["trunk"]["split"] is None
    assert "carry no attention_mask" in tables[0].metadata["diagnostics"]["trunk"]["reason"]
    np.testing.assert_allclose(_values(tables[0], 2, 6), _values(tables[1], 2, 6), rtol=1e-10, atol=1e-14)
    assert np.abs(_values(tables[0], 2, 6)).max() > 0


def test_a_tied_head_is_selected_by_its_own_name():
    """GPT-2's lm_head.weight is transformer.wte.weight: `influence_params=["lm_head"]` matched nothing and a list
    with another pattern silently ran without the head."""
    model = tiny_model("gpt2-lm")
    assert list(select_parameters(model, [r"lm_head\."])) == ["transformer.wte.weight"]
    # a pattern that matches listed names does not reach through aliases: BERT's MLM head `cls.` holds the decoder
    # tied to the word embeddings, which it would pull in (and with them the trunk cache would be lost)
    from transformers import BertConfig, BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32))
    assert "bert.embeddings.word_embeddings.weight" not in select_parameters(mlm, [r"cls\."])
    assert list(select_parameters(model, [r"lm_head\.", r"ln_f\."])) == ["transformer.wte.weight",
                                                                        "transformer.ln_f.weight",
                                                                        "transformer.ln_f.bias"]
    assert list(select_parameters(model, [r"wte\."])) == ["transformer.wte.weight"]


def test_token_logits_of_batches_of_different_lengths(pad_collator):
    from transformers import DataCollatorForLanguageModeling

    model = tiny_model("gpt2-lm")
    rows = _rows([3, 4, 9, 8], seed=0, causal=True).remove_columns("labels")
    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    with InfluenceEngine(model, args, data_collator=DataCollatorForLanguageModeling(pad_collator.tokenizer,
                                                                                    mlm=False)) as engine:
        logits = engine.logits(rows, batch_size=2)
    assert logits.shape == (4, 9, VOCAB)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits[0].numpy()
    np.testing.assert_allclose(logits[0, :3], own, rtol=1e-6)
    assert np.isnan(logits[0, 4:]).all() and np.isfinite(logits[2]).all()


@pytest.mark.parametrize("head", ["BartForConditionalGeneration", "BartForSequenceClassification", "T5"])
def test_encoder_decoder_knn_features_are_the_encoders(pad_collator, head):
    """kNN features of an encoder-decoder read the decoder's states by the encoder's mask (an IndexError, or the
    state of a decoder pad), and T5's classifier failed inside T5Model. They are the encoder's now: k = N gives the
    full scan, and a row's feature does not depend on its batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from hf_fastif.batches import Batcher, decoder_inputs_from_labels
    from hf_fastif.knn import extract_features

    if head == "T5":
        from transformers import T5Config, T5ForSequenceClassification

        torch.manual_seed(0)
        model = T5ForSequenceClassification(T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                     num_heads=2, pad_token_id=0, decoder_start_token_id=0,
                                                     num_labels=2)).double().eval()
    else:
        model = tiny_bart(head)
    if head == "BartForConditionalGeneration":
        train, test = seq2seq_rows(12, 0, same_length=False), seq2seq_rows(2, 1, same_length=False)
        collator, params = DataCollatorForSeq2Seq(pad_collator.tokenizer), [r"decoder\.layers\.1\.final"]
    else:
        eos = {"input_ids": lambda r: r["input_ids"] + [3], "attention_mask": lambda r: r["attention_mask"] + [1]}
        train, test = [make_token_dataset(n, seed=seed, min_len=3, max_len=8).map(  # (BART's classifier reads </s>)
            lambda r: {k: f(r) for k, f in eos.items()}) for n, seed in ((12, 0), (2, 1))]
        collator, params = DataCollatorWithPadding(pad_collator.tokenizer), [r"(classification_head|classifier)\."]
    full = compute_influences(model, train, test, default_arguments(**(EXACT | {"influence_damping": 5.0, "influence_params": params})),
                              data_collator=collator)
    for features in ("auto", "mean", "last", "cls"):
        knn = compute_influences(model, train, test, default_arguments(**(EXACT | {"influence_damping": 5.0,
            "influence_params": params, "influence_knn_k": len(train), "influence_knn_features": features})),
            data_collator=collator)
        np.testing.assert_allclose(_values(knn, 2, 12), _values(full, 2, 12), rtol=1e-10, atol=1e-14)
    batcher = Batcher(train, train.column_names, collator, "cpu", decoder_inputs=decoder_inputs_from_labels(model))
    for features in ("mean", "last"):
        together = extract_features(model, batcher, features, batch_size=12, progress=False)
        alone = extract_features(model, batcher, features, batch_size=1, progress=False)
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the encoder's own states of each row, alone: their mean and their last token
        states = [model.get_encoder()(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0]
                  for row in train]
    np.testing.assert_allclose(extract_features(model, batcher, "mean", progress=False),
                               torch.stack([h.mean(0) for h in states]).numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(extract_features(model, batcher, "last", progress=False),
                               torch.stack([h[-1] for h in states]).numpy(), rtol=1e-6, atol=1e-8)


def test_encoder_features_of_an_encoder_that_takes_no_token_ids():
    """Whisper's encoder takes `input_features`: kNN over its states failed when only token inputs were passed."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=60, num_mel_bins=4, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation="eager")).eval()  # (float32: the stored features are)
    rng = np.random.default_rng(0)

    def rows(n):
        labels = [rng.integers(5, 60, 4).tolist() + [2] for _ in range(n)]
        return Dataset.from_dict({"input_features": [rng.normal(size=(4, 16)).tolist() for _ in range(n)],
                                  "decoder_input_ids": [[1] + t[:-1] for t in labels], "labels": labels})

    train, test = rows(12), rows(2)
    tables = [compute_influences(model, train, test, default_arguments(**(EXACT | {
        "influence_params": [r"decoder\.layer_norm"], "influence_knn_k": k}))) for k in (None, 12)]
    np.testing.assert_allclose(_values(tables[1], 2, 12), _values(tables[0], 2, 12), rtol=1e-5, atol=1e-12)


def _stored_left(n: int, seed: int, width: int = 10) -> Dataset:
    """Causal-LM rows stored left-padded to one width (padding="max_length", padding_side="left"), pads labelled
    -100: each row's first real token is a target predicted from the last pad position."""
    rng = np.random.default_rng(seed)
    ids, mask, labels = [], [], []
    for _ in range(n):
        length = int(rng.integers(3, 9))
        x = [1] + rng.integers(5, VOCAB, size=length - 1).tolist()
        ids.append([0] * (width - length) + x)
        mask.append([0] * (width - length) + [1] * length)
        labels.append([-100] * (width - length) + x)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": labels})


def test_rows_stored_left_padded_give_the_same_influence_with_the_trunk_cache():
    """The cache holds a pad position's state as a copy of the row's first token's, and its check compared the
    logits of real tokens only: the loss reads the last pad's output (it predicts the first token), and influence
    came back 63% off with the cache on, the check passing with an error of 0.0."""
    from transformers import default_data_collator

    train, test = _stored_left(10, 0), _stored_left(3, 1)
    model = tiny_model("gpt2-lm")
    found = []
    for trunk in (True, False):
        args = default_arguments(**(EXACT | {"influence_params": [r"h\.1\.mlp\.c_proj", r"h\.1\.ln_2", r"ln_f"],
                                             "influence_damping": 10.0,
                                             "influence_trunk_cache": trunk}))
        found.append(_values(compute_influences(model, train, test, args, data_collator=default_data_collator), 3, 10))
    np.testing.assert_allclose(found[0], found[1], rtol=1e-8, atol=1e-12)


def test_left_padding_is_refused_for_any_row_whose_first_token_is_a_target():
    """The probe padded the narrowest row next to the widest; in an SFT-style mix both had their first token
    unlabelled, so the other rows' values changed with the batch size (40% off) without a word."""
    def left_with_positions(rows):
        width = max(len(r["input_ids"]) for r in rows)

        def pad(x, value):
            return [value] * (width - len(x)) + list(x)

        batch = {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
                 "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
                 "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return batch

    rows = _rows([3, 6, 4, 8, 5], seed=0, causal=True)
    labels = [[-100] + x[1:] if i in (0, 3) else x for i, x in enumerate(rows["labels"])]  # narrowest, widest: prompts
    train = rows.remove_columns("labels").add_column("labels", labels)
    args = default_arguments(**(EXACT | {"influence_params": [r"ln_f\."]}))
    with pytest.raises(ValueError, match=r"causal LM padded on the left, and its first token is a target"):
        compute_influences(tiny_model("gpt2-lm"), train, train.select([1]), args, data_collator=left_with_positions)



def test_only_a_causal_lm_reads_the_padding_position_before_a_target():
    """The split's check compared the logits at padding positions followed by a target for every model: a token
    classifier padded on the left with its first token labelled lost the trunk cache for nothing."""
    from transformers import GPT2Config, GPT2ForTokenClassification

    from hf_fastif.trunk import _read_positions

    batch = {"attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, -100, 3, 4], [1, 2, 3, 4]])}
    classifier = GPT2ForTokenClassification(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    assert _read_positions(batch, classifier).tolist() == [[False, False, True, True], [True] * 4]
    assert _read_positions(batch, tiny_model("gpt2-lm")).tolist() == [[False, True, True, True], [True] * 4]


def test_generating_heads_that_train_unshifted_get_their_own_loss():
    """XLNet's, XLM's and Flaubert's LM heads can generate, but transformers scores each position against its own
    label: the default loss shifted them like a causal LM's, another loss than the one they train on (4.14 against
    4.08 on one row), and the own-loss check blamed class weights or smoothing."""
    import transformers as T

    from hf_fastif.loss import make_default_loss, shifts_labels

    heads = {"xlm": lambda: T.XLMWithLMHeadModel(T.XLMConfig(vocab_size=VOCAB, emb_dim=8, n_layers=1, n_heads=2,
                                                                  max_position_embeddings=32, pad_index=0)),
             "flaubert": lambda: T.FlaubertWithLMHeadModel(T.FlaubertConfig(
                 vocab_size=VOCAB, emb_dim=8, n_layers=1, n_heads=2, max_position_embeddings=32, pad_index=0)),
             "xlnet": lambda: T.XLNetLMHeadModel(T.XLNetConfig(vocab_size=VOCAB, d_model=8, n_layer=1, n_head=2,
                                                               d_inner=16, pad_token_id=0)),
             "gpt2": lambda: tiny_model("gpt2-lm")}
    ids, labels = torch.tensor([[1, 17, 4, 23, 9, 31]]), torch.tensor([[-100, -100, 29, -100, 9, -100]])
    for kind, make in heads.items():
        torch.manual_seed(0)
        model = make().double().eval()
        assert shifts_labels(model) == (kind == "gpt2")
        with torch.no_grad():
            own = model(input_ids=ids, labels=labels).loss
            ours = make_default_loss(model)(model(input_ids=ids), {"labels": labels})
        torch.testing.assert_close(ours.reshape(()).double(), own.double(), rtol=1e-6, atol=1e-9, msg=kind)
