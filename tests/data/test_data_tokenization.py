"""The offline word-level tokenizer and tokenize_nli."""

import pytest
from transformers import AutoTokenizer

from hf_fastif.data import SPECIAL_TOKENS, build_tokenizer, generate_nli, tokenize_nli


@pytest.fixture(scope="module")
def data():
    return generate_nli(seed=1, n_train=200, n_hans_per_subcase=3, n_pool_per_subcase=3)


def test_special_tokens_and_pair_layout():
    tokenizer = build_tokenizer()
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 64
    encoding = tokenizer("The doctor helped the lawyer.", "The lawyer helped the doctor.")
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokens == [
        "[CLS]",
        "the",
        "doctor",
        "helped",
        "the",
        "lawyer",
        ".",
        "[SEP]",
        "the",
        "lawyer",
        "helped",
        "the",
        "doctor",
        ".",
        "[SEP]",
    ]
    assert encoding["token_type_ids"] == [0] * 8 + [1] * 7
    assert tokenizer("The zebra slept.")["input_ids"][2] == tokenizer.unk_token_id


def test_custom_vocab():
    tokenizer = build_tokenizer(vocab=["Zebra", "slept", "zebra", "[PAD]"])
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 2
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra slept")["input_ids"]) == [
        "[CLS]",
        "zebra",
        "slept",
        "[SEP]",
    ]


def test_generated_data_has_no_unknown_words(data):
    tokenizer = build_tokenizer()
    for split in data.values():
        for premise, hypothesis in zip(split["premise"], split["hypothesis"]):
            assert tokenizer.unk_token_id not in tokenizer(premise, hypothesis)["input_ids"], (
                premise,
                hypothesis,
            )


def test_save_and_reload_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    pair = ("Probably the judge thanked the pilot.", "The judge thanked the pilot.")
    assert reloaded(*pair) == tokenizer(*pair)
    assert "token_type_ids" in reloaded(*pair)
    assert reloaded.pad_token_id == 0 and reloaded.model_max_length == 64
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_tokenize_nli_columns_and_no_padding(data):
    tokenizer = build_tokenizer()
    tokenized = tokenize_nli(data["hans"], tokenizer, max_length=64)
    assert set(tokenized.column_names) == {
        "premise",
        "hypothesis",
        "labels",
        "heuristic",
        "subcase",
        "template",
        "pair_id",
        "input_ids",
        "attention_mask",
        "token_type_ids",
    }
    assert tokenized["labels"] == data["hans"]["label"]
    lengths = {len(ids) for ids in tokenized["input_ids"]}
    assert len(lengths) > 1 and tokenizer.pad_token_id not in {
        i for ids in tokenized["input_ids"] for i in ids
    }
    first = tokenized[0]
    assert first["input_ids"] == tokenizer(first["premise"], first["hypothesis"])["input_ids"]
    assert len(first["token_type_ids"]) == len(first["input_ids"]) == len(first["attention_mask"])


def test_tokenize_nli_truncates_and_handles_dataset_dicts(data):
    tokenized = tokenize_nli(data, build_tokenizer(), max_length=8)
    assert set(tokenized) == {"train", "hans", "pool"}
    assert max(len(ids) for ids in tokenized["train"]["input_ids"]) == 8
    assert "genre" in tokenized["train"].column_names and "label" not in tokenized["train"].column_names


def test_tokenize_nli_names_missing_columns(data):
    with pytest.raises(ValueError, match="missing \\['hypothesis'\\]"):
        tokenize_nli(data["train"].remove_columns("hypothesis"), build_tokenizer())
