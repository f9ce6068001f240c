"""Tiny models built from configs and synthetic tokenized data, for tests and benchmarks, and the influence
parameters the tests usually select on them (`TOP`, `HEAD_ONLY`). Helpers shared by tests that are not tiny
models or data are in `tests.helpers`."""

import numpy as np
import torch
from datasets import Dataset

VOCAB = 60


def make_token_dataset(n: int, seed: int = 0, num_labels: int = 2, min_len: int = 4, max_len: int = 9,
                       causal: bool = False) -> Dataset:
    """Random token rows of varying length; the label is a simple function of the tokens (learnable)."""
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = [1] + rng.integers(5, VOCAB, size=length - 1).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(ids if causal else int(sum(ids) % num_labels))
    return Dataset.from_dict(rows)


def tiny_model(kind: str = "bert", num_labels: int = 2, dtype=torch.float64, seed: int = 0):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = dict(attn_implementation="eager")
    if kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=num_labels, **common)
        model = BertForSequenceClassification(cfg)
    elif kind == "roberta":
        cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=40, num_labels=num_labels,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
        model = RobertaForSequenceClassification(cfg)
    elif kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                               max_position_embeddings=32, num_labels=num_labels, **common)
        model = DistilBertForSequenceClassification(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=num_labels,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
        model = GPT2ForSequenceClassification(cfg)
    elif kind == "gpt2-lm":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


# The influence parameters the tests select on each `tiny_model` kind: its top layer and head (`TOP`), or its
# head alone (`HEAD_ONLY`).
TOP = {
    "bert": [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."],
    "roberta": [r"encoder\.layer\.1\.", r"classifier\."],
    "distilbert": [r"transformer\.layer\.1\.", r"pre_classifier\.", r"classifier\."],
    "gpt2": [r"transformer\.h\.1\.", r"ln_f\.", r"score\."],
    "gpt2-lm": [r"transformer\.h\.1\.", r"ln_f\."],
}
HEAD_ONLY = {"bert": [r"pooler\.", r"classifier\."], "gpt2": [r"score\."]}


def train_tiny(model, dataset, collator, epochs: int = 20, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """A few epochs of Adam on ``dataset`` so that gradients differ between rows; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(dataset)).tolist()
        for start in range(0, len(order), batch_size):
            batch = collator([dataset[i] for i in order[start : start + batch_size]])
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def sgd_step(model, rows, output_dir, batch_size: int, accumulation: int = 1):
    """One SGD step (lr 0.5) of an `InfluenceTrainer` on ``rows``, dropout off (the same step whatever rows share a
    forward), ``batch_size`` rows a process and forward: ``(each parameter's change, the logged loss, the
    trainer)``."""
    from hf_fastif import InfluenceArguments, InfluenceTrainer

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = InfluenceArguments(output_dir=str(output_dir), report_to="none", use_cpu=True, max_steps=1, optim="sgd",
                              learning_rate=0.5, per_device_train_batch_size=batch_size,
                              gradient_accumulation_steps=accumulation, save_strategy="no", logging_strategy="no",
                              disable_tqdm=True, seed=0)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=rows)
    loss = trainer.train().training_loss
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}, loss, trainer


def pad_collator_for_tests():
    """DataCollatorWithPadding over a minimal word-level tokenizer (pad id 0), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, "[UNK]")),
                                  pad_token="[PAD]", unk_token="[UNK]")
    return DataCollatorWithPadding(tok)


def tiny_bart(head: str = "BartForConditionalGeneration"):
    import transformers
    from transformers import BartConfig

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=60, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=40,
                     pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=3,
                     forced_eos_token_id=None, attn_implementation="eager")
    return getattr(transformers, head)(cfg).double().eval()


def seq2seq_rows(n: int, seed: int, same_length: bool):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        target = rng.integers(5, 60, size=int(rng.integers(3, 7))).tolist() + [3]
        source = ([4 if rng.random() < 0.3 else t for t in target] if same_length  # a denoising pair
                  else rng.integers(5, 60, size=int(rng.integers(4, 9))).tolist() + [3])
        rows.append({"input_ids": source, "attention_mask": [1] * len(source), "labels": target})
    return Dataset.from_list(rows)


def longformer():
    from transformers import LongformerConfig, LongformerForSequenceClassification

    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=80, num_labels=3, attention_window=4,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=2, attn_implementation="eager")
    return LongformerForSequenceClassification(cfg).double().eval()
