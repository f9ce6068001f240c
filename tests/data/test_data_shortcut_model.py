"""A tiny BERT trained on the generated train split learns the overlap shortcut and fails HANS non-entailment."""

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from hf_fastif.data import HANS_HEURISTICS, build_tokenizer, generate_nli, tokenize_nli

COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels"]


def _train_and_evaluate(seed: int) -> tuple[float, dict]:
    """Train a 2-layer, 64-wide BERT for 3 epochs; return train accuracy and HANS accuracy per (heuristic, label)."""
    data = generate_nli(seed=seed, n_train=4000, n_hans_per_subcase=20, n_pool_per_subcase=0)
    tokenizer = build_tokenizer()
    tokenized = tokenize_nli(data, tokenizer)
    collate = DataCollatorWithPadding(tokenizer)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    train = tokenized["train"].select_columns(COLUMNS)
    rows = [train[i] for i in range(len(train))]
    order = np.random.default_rng(seed)

    def predict(split: str) -> tuple[np.ndarray, np.ndarray]:
        dataset = tokenized[split].select_columns(COLUMNS)
        model.eval()
        with torch.no_grad():
            batch = collate([dataset[i] for i in range(len(dataset))])
            return model(**batch).logits.argmax(-1).numpy(), np.asarray(dataset["labels"])

    threads = torch.get_num_threads()
    # one thread: the same numbers on any machine, and no slowdown when other processes share the cores
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = BertForSequenceClassification(config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model.train()
            for _ in range(3):
                permutation = order.permutation(len(rows))
                for start in range(0, len(rows), 32):
                    loss = model(**collate([rows[i] for i in permutation[start : start + 32]])).loss
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        train_predictions, train_labels = predict("train")
        hans_predictions, hans_labels = predict("hans")
    finally:
        torch.set_num_threads(threads)

    correct = hans_predictions == hans_labels
    heuristics = np.asarray(data["hans"]["heuristic"])
    hans_accuracy = {
        (heuristic, label): float(correct[(heuristics == heuristic) & (hans_labels == label)].mean())
        for heuristic in HANS_HEURISTICS
        for label in (0, 1)
    }
    return float((train_predictions == train_labels).mean()), hans_accuracy


def test_tiny_bert_falls_for_the_overlap_heuristic():
    train_accuracy, hans_accuracy = _train_and_evaluate(seed=0)
    entailment = [hans_accuracy[h, 0] for h in HANS_HEURISTICS]
    non_entailment = [hans_accuracy[h, 1] for h in HANS_HEURISTICS]
    assert train_accuracy >= 0.95
    # the overlap heuristic is right on HANS entailment and wrong on non_entailment, and so is the model
    # (seeds 0-6: mean accuracy 0.72-1.0 on entailment, 0.12-0.33 on non_entailment)
    assert np.mean(entailment) >= 0.7, hans_accuracy
    assert np.mean(non_entailment) <= 0.4, hans_accuracy
    assert all(e > n for e, n in zip(entailment, non_entailment)), hans_accuracy
