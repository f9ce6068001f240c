"""NLI data for hf_fastif: loaders for MNLI / HANS / ANLI (Hub ids or local files) and an embedded,
seeded generator of MNLI-like training data with a lexical-overlap shortcut and HANS-style test data."""

from .generate import HANS_TEMPLATES, TRAIN_FAMILIES, generate_nli, nli_vocabulary, word_overlap_rate, words
from .loaders import HANS_HUB_COLUMNS, HANS_TSV_HEADER, load_anli, load_hans, load_mnli, split_hans
from .schema import (
    ENTAILMENT,
    HANS_HEURISTICS,
    HANS_METADATA_COLUMNS,
    NLI2_LABELS,
    NLI3_LABELS,
    NON_ENTAILMENT,
    hans_features,
    label_names,
    nli_features,
)
from .tokenization import (
    MIN_MAX_LENGTH,
    MODEL_MAX_LENGTH,
    NLI_MAX_LENGTH,
    SPECIAL_TOKENS,
    build_tokenizer,
    count_cut_pairs,
    tokenize_nli,
)

__all__ = [
    "ENTAILMENT",
    "HANS_HEURISTICS",
    "HANS_HUB_COLUMNS",
    "HANS_METADATA_COLUMNS",
    "HANS_TEMPLATES",
    "HANS_TSV_HEADER",
    "NLI2_LABELS",
    "NLI3_LABELS",
    "NON_ENTAILMENT",
    "SPECIAL_TOKENS",
    "TRAIN_FAMILIES",
    "build_tokenizer",
    "generate_nli",
    "hans_features",
    "label_names",
    "load_anli",
    "load_hans",
    "load_mnli",
    "nli_features",
    "nli_vocabulary",
    "split_hans",
    "tokenize_nli",
    "count_cut_pairs",
    "NLI_MAX_LENGTH",
    "MODEL_MAX_LENGTH",
    "MIN_MAX_LENGTH",
    "word_overlap_rate",
    "words",
]
