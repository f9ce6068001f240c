"""A word-level tokenizer over the generator's vocabulary, and premise/hypothesis tokenization."""

from __future__ import annotations

from collections.abc import Iterable

from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from .generate import nli_vocabulary

logger = logging.get_logger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Special tokens, in id order: `[PAD]` is 0."""


def build_tokenizer(
    vocab: Iterable[str] | None = None, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer that needs no download.

    Lower-cases, splits on whitespace and punctuation, and encodes a pair as `[CLS] A [SEP] B [SEP]`
    with token_type_ids 0 for A and 1 for B. Unknown words map to `[UNK]`.

    Args:
        vocab: the words to know; default: every word `generate_nli` can produce. Duplicates and
            special tokens in it are ignored; words are lower-cased.
        model_max_length: the longest sequence the tokenizer will produce when truncating.

    Returns:
        A `PreTrainedTokenizerFast` (ids: `[PAD]` 0, `[UNK]` 1, `[CLS]` 2, `[SEP]` 3, `[MASK]` 4, then
        the words sorted); `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it.
    """
    words = (
        nli_vocabulary() if vocab is None else sorted({w.lower() for w in vocab if w not in SPECIAL_TOKENS})
    )
    token_to_id = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", token_to_id["[CLS]"]), ("[SEP]", token_to_id["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tokenize_nli(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerFast, max_length: int = 64
) -> Dataset | DatasetDict:
    """Tokenize premise/hypothesis pairs for a sequence-classification model (Trainer-ready).

    Adds `input_ids`, `attention_mask` and `token_type_ids` (unpadded: the data collator pads),
    renames `label` to `labels`, and keeps every other column (the Trainer drops unused ones).

    Args:
        dataset: a `Dataset` or `DatasetDict` with `premise`, `hypothesis` and `label` columns.
        tokenizer: any tokenizer that encodes sentence pairs, e.g. `build_tokenizer()`.
        max_length: pairs longer than this are truncated (longest side first).

    Returns:
        The tokenized dataset, of the same type as `dataset`.
    """
    columns = dataset.column_names
    if isinstance(columns, dict):
        columns = next(iter(columns.values()), [])
    missing = [c for c in ("premise", "hypothesis", "label") if c not in columns]
    if missing:
        raise ValueError(
            f"tokenize_nli needs the columns premise, hypothesis and label; missing {missing} in {columns}. "
            "Load the data with hf_fastif.data (load_mnli, load_hans, generate_nli) or rename the columns."
        )

    def encode(batch: dict) -> dict:
        return tokenizer(
            batch["premise"],
            batch["hypothesis"],
            truncation=True,
            max_length=max_length,
            return_token_type_ids=True,
        )

    tokenized = dataset.map(encode, batched=True, desc="Tokenizing NLI pairs")
    return tokenized.rename_column("label", "labels")
