"""The embedded default: a small BERT trained from a config on the project's generated NLI data, offline.

Used by `make demo`, the recipes and the Space when no real model or data is given.
"""

from __future__ import annotations

import torch
from datasets import DatasetDict
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from .arguments import InfluenceArguments
from .data import build_tokenizer, generate_nli, tokenize_nli
from .trainer import InfluenceTrainer

# The paper's selection for a 2-layer model: the last layer, the pooler and the classifier.
EMBEDDED_PARAMS = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]


def embedded_data(seed: int = 0, n_train: int = 3000, n_hans_per_subcase: int = 40,
                  n_pool_per_subcase: int = 40) -> tuple[DatasetDict, DatasetDict, PreTrainedTokenizerFast]:
    """``(raw, tokenized, tokenizer)`` of the generated NLI data (splits train / hans / pool)."""
    raw = generate_nli(seed=seed, n_train=n_train, n_hans_per_subcase=n_hans_per_subcase,
                       n_pool_per_subcase=n_pool_per_subcase)
    tokenizer = build_tokenizer()
    return raw, tokenize_nli(raw, tokenizer), tokenizer


def embedded_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 64,
                   num_layers: int = 2) -> BertForSequenceClassification:
    """A small 2-label BERT built from a config (eager attention, so influence can differentiate it twice)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=4, intermediate_size=4 * hidden_size, max_position_embeddings=128,
                        num_labels=2, id2label={0: "entailment", 1: "non_entailment"},
                        label2id={"entailment": 0, "non_entailment": 1}, pad_token_id=tokenizer.pad_token_id,
                        attn_implementation="eager")
    return BertForSequenceClassification(config)


def embedded_arguments(output_dir: str, seed: int = 0, epochs: float = 3.0, **influence) -> InfluenceArguments:
    """Training and influence settings of the embedded default (CPU-sized; the paper's are in FASTIF.md)."""
    defaults = dict(influence_params=EMBEDDED_PARAMS, influence_damping=5e-3, influence_scale=1e3,
                    influence_recursion_depth=200, influence_batch_size=1, influence_repetitions=4,
                    influence_knn_k=500)
    return InfluenceArguments(output_dir=output_dir, seed=seed, num_train_epochs=epochs, learning_rate=1e-3,
                              per_device_train_batch_size=32, warmup_steps=0.1, weight_decay=0.01,
                              save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
                              disable_tqdm=True, **(defaults | influence))


def train_embedded(output_dir: str = "outputs/embedded", seed: int = 0, epochs: float = 3.0,
                   data: tuple | None = None, **influence) -> tuple[InfluenceTrainer, DatasetDict, DatasetDict]:
    """Train the embedded default model; returns ``(trainer, raw, tokenized)``."""
    raw, tokenized, tokenizer = data or embedded_data(seed=seed)
    model = embedded_model(tokenizer, seed=seed)
    trainer = InfluenceTrainer(model=model, args=embedded_arguments(output_dir, seed, epochs, **influence),
                               train_dataset=tokenized["train"], processing_class=tokenizer)
    trainer.train()
    return trainer, raw, tokenized
