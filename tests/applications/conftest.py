"""Tiny NLI fixtures for the application tests: generated data, a 16-wide BERT trained for a moment, fast settings."""

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, DataCollatorWithPadding

from hf_fastif.applications import ApplicationData
from hf_fastif.data import HANS_TSV_HEADER, build_tokenizer, generate_nli, split_hans, tokenize_nli
from hf_fastif.influence import default_arguments

PARAMS = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]
FAST = dict(influence_params=PARAMS, influence_knn_k=30, influence_damping=0.1, influence_scale=50.0,
            influence_recursion_depth=5, influence_batch_size=4, influence_repetitions=1,
            influence_check_convergence=False, disable_tqdm=True)
# flags a recipe needs to run in a few seconds on the embedded default
# λ = 0.5 × 50: a model trained one epoch on 200 rows is far from a minimum (the Hessian's smallest eigenvalue ~-5.7,
# which the convergence check refuses at the embedded default's λ = 5)
TINY_FLAGS = ["--max_train_samples", "200", "--num_train_epochs", "1", "--influence_knn_k", "30",
              "--influence_recursion_depth", "5", "--influence_damping", "0.5"]


def tiny_config(tokenizer, num_labels=2):
    names = ["entailment", "non_entailment"] if num_labels == 2 else ["entailment", "neutral", "contradiction"]
    return BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64, num_labels=num_labels,
                      id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                      pad_token_id=tokenizer.pad_token_id, attn_implementation="eager")


@pytest.fixture(scope="session")
def nli():
    """Raw and tokenized generated data, the tokenizer, a padding collator and a HANS validation / test split."""
    raw = generate_nli(seed=0, n_train=300, n_hans_per_subcase=6, n_pool_per_subcase=4)
    tokenizer = build_tokenizer()
    tokenized = tokenize_nli(raw, tokenizer)
    split = split_hans(tokenized["hans"], 0.5, seed=0)
    return {"raw": raw, "tokenizer": tokenizer, "train": tokenized["train"], "pool": tokenized["pool"],
            "validation": split["validation"], "test": split["test"], "collator": DataCollatorWithPadding(tokenizer)}


@pytest.fixture(scope="session")
def trained(nli):
    """A tiny BERT trained for six epochs on the generated training rows (92% train accuracy after 5: not a
    one-class model, so gradients and predictions differ between rows)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(nli["tokenizer"]))
    rows = nli["train"].select_columns(["input_ids", "attention_mask", "token_type_ids", "labels"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    order = np.random.default_rng(0)
    for _ in range(6):
        permutation = order.permutation(len(rows))
        for start in range(0, len(rows), 32):
            batch = nli["collator"]([rows[int(i)] for i in permutation[start : start + 32]])
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture
def args():
    return default_arguments(**FAST)


@pytest.fixture
def data(nli):
    """The tiny data as an application takes them."""
    return ApplicationData(train=nli["train"], hans_validation=nli["validation"], hans_test=nli["test"],
                           collator=nli["collator"], raw_train=nli["raw"]["train"])


def write_hans_tsv(path, dataset, header=HANS_TSV_HEADER, labels=None):
    """``dataset`` (generated HANS rows) as an official HANS file (optionally with other ``labels`` strings)."""
    names = {0: "entailment", 1: "non-entailment"}
    lines = ["\t".join(header)]
    for i, row in enumerate(dataset):
        gold = labels[i] if labels is not None else names[row["label"]]
        fields = {"gold_label": gold, "sentence1_binary_parse": "( x )", "sentence2_binary_parse": "( x )",
                  "sentence1_parse": "(ROOT x)", "sentence2_parse": "(ROOT x)", "sentence1": row["premise"],
                  "sentence2": row["hypothesis"], "pairID": row["pair_id"], "heuristic": row["heuristic"],
                  "subcase": row["subcase"], "template": row["template"]}
        lines.append("\t".join(fields.get(h, "x") for h in header))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_mnli_jsonl(path, dataset):
    names = {0: "entailment", 1: "contradiction"}
    path.write_text("".join(json.dumps({"sentence1": r["premise"], "sentence2": r["hypothesis"],
                                        "gold_label": names[r["label"]], "genre": r["genre"]}) + "\n"
                            for r in dataset), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def files(tmp_path_factory, nli):
    """Local files in the real formats: an MNLI jsonl, an official HANS file, and tiny checkpoints (a 2-label and a
    3-label sequence classifier, and a base model) with the generated vocabulary's tokenizer."""
    root = tmp_path_factory.mktemp("files")
    tokenizer = nli["tokenizer"]
    out = {"mnli": write_mnli_jsonl(root / "mnli.jsonl", nli["raw"]["train"].select(range(120))),
           "hans": write_hans_tsv(root / "heuristics_evaluation_set.txt", nli["raw"]["hans"]),
           "hans_train": write_hans_tsv(root / "heuristics_train_set.txt", nli["raw"]["pool"])}
    for name, num_labels, cls in (("ckpt2", 2, BertForSequenceClassification), ("ckpt3", 3, BertForSequenceClassification),
                                  ("base", 2, BertForMaskedLM)):
        torch.manual_seed(0)
        config = tiny_config(tokenizer, num_labels)
        model = cls(config)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
