"""A word-level tokenizer over the generator's vocabulary, and premise/hypothesis tokenization."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from .generate import nli_vocabulary

logger = logging.get_logger(__name__)

NLI_MAX_LENGTH = 64
"""Token limit of a pair in the embedded default's data (its models are fine-tuned on pairs cut to it)."""
MIN_MAX_LENGTH = 8
"""The shortest token limit a pair may be cut to (its special tokens and some words): `hf-fastif build`'s and the
recipes' ``--max_length``."""
MODEL_MAX_LENGTH = 128
"""Token limit of a pair for a user's model (`hf-fastif build` / `recall` with ``--model_name_or_path``, the recipes):
the paper's, as its MNLI fine-tuning (run_glue's ``max_seq_length``) cut pairs."""


def check_min_max_length(max_length: int | None) -> None:
    """Refuse a ``--max_length`` below `MIN_MAX_LENGTH` (0-2 cut nothing, while the warning said every pair was cut)."""
    if max_length is not None and max_length < MIN_MAX_LENGTH:
        raise ValueError(f"--max_length must be at least {MIN_MAX_LENGTH} word pieces (a pair needs its special "
                         f"tokens and words), got {max_length}.")


def resolve_max_length(max_length: int | None, positions: int | None, model: str = "the model") -> int:
    """``--max_length`` for a model with ``positions`` usable positions (None: no limit), as ``hf-fastif build`` and
    the recipes read it: unset, `MODEL_MAX_LENGTH` or the positions if fewer; given, refused above them (the recipes
    failed in their model report or the Trainer with a bare tensor-size error)."""
    if max_length is None:
        return min(MODEL_MAX_LENGTH, positions) if positions else MODEL_MAX_LENGTH
    if positions and max_length > positions:
        raise ValueError(f"--max_length {max_length} exceeds the {positions} positions of {model}; use at most "
                         f"{positions} (or leave it unset: {MODEL_MAX_LENGTH}, or the model's positions if fewer).")
    return max_length


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
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerFast, max_length: int = NLI_MAX_LENGTH
) -> Dataset | DatasetDict:
    """Tokenize premise/hypothesis pairs for a sequence-classification model (Trainer-ready).

    Adds `input_ids`, `attention_mask` and `token_type_ids` (unpadded: the data collator pads),
    renames `label` to `labels`, and keeps every other column (the Trainer drops unused ones).

    Args:
        dataset: a `Dataset` or `DatasetDict` with `premise`, `hypothesis` and `label` columns.
        tokenizer: any tokenizer that encodes sentence pairs, e.g. `build_tokenizer()`.
        max_length: pairs longer than this are truncated (longest side first); how many were is logged as a
            warning, with the fix.

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
    splits = tokenized.items() if isinstance(tokenized, DatasetDict) else [(None, tokenized)]
    for name, split in splits:
        raw = dataset if name is None else dataset[name]
        cut = count_cut_pairs(raw, split, tokenizer, max_length)
        if cut:
            logger.warning(f"{cut:,} of the {len(split):,} pairs{'' if name is None else f' of {name}'} are longer than "
                           f"max_length={max_length} word pieces and were cut (longest side first), so the model reads "
                           "them cut; pass a larger max_length (at most the model's positions) to keep them whole.")
    return tokenized.rename_column("label", "labels")


def count_cut_pairs(raw: Dataset, tokenized: Dataset, tokenizer, max_length: int) -> int:
    """How many premise/hypothesis pairs of ``raw`` are longer than ``max_length`` word pieces, ``tokenized`` being
    them cut to it: only rows of exactly ``max_length`` pieces can have been, and only those are tokenized again,
    whole."""
    if not len(tokenized):
        return 0
    ids = tokenized.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    full = np.flatnonzero(pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False) >= max_length)
    if not len(full):
        return 0
    rows = raw.select(full).select_columns(["premise", "hypothesis"])[:]
    # cut at one piece more: longer pairs show as such, without the tokenizer's warning about the model's limit
    again = tokenizer(rows["premise"], rows["hypothesis"], truncation=True, max_length=max_length + 1)["input_ids"]
    return int(sum(len(x) > max_length for x in again))
