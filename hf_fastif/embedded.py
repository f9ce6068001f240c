"""The embedded default: a small BERT trained from a config on the project's generated NLI data, offline.

Used by the recipes, ``hf-fastif build``, the Space and the quickstart when no model or data is given. Every
setting of the embedded default lives in this file: the generated data's sizes, the model's config, its
training, its influence settings, and what each use (a recipe, the default table) changes. The recipes and
the CLI read them as the defaults of their flags (`embedded_defaults`), so a flag given on the command line
still wins. Swapping the embedded model for another is a change to this file only.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import DatasetDict
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from .arguments import InfluenceArguments
from .data import build_tokenizer, generate_nli, tokenize_nli
from .trainer import InfluenceTrainer

EMBEDDED_DESCRIPTION = "2-layer 64-wide BERT from a config, trained here on generated NLI data"
"""What the embedded model is, for result files, table metadata and the paper comparison."""

EMBEDDED_DATA: dict = dict(n_train=3000, n_hans_per_subcase=40, n_pool_per_subcase=40)
"""Generated rows for the applications: 3,000 training pairs, 1,200 HANS-style pairs (40 per each of 30
subcases; split into validation / test) and a pool of 1,200 unseen HANS-style pairs."""

EMBEDDED_TABLE_DATA: dict = dict(n_train=2000, n_hans_per_subcase=1, n_pool_per_subcase=0)
"""Generated rows of the default influence table (``hf-fastif build``, the Space, the quickstart): 2,000
training pairs and 30 HANS-style test pairs, small enough to build at start-up on a CPU."""

EMBEDDED_MODEL: dict = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                            max_position_embeddings=128)
"""`BertConfig` of the embedded model (2 labels, eager attention so influence can differentiate it twice)."""

EMBEDDED_PARAMS = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]
"""The paper's selection for a 2-layer model: the last layer, the pooler and the classifier."""

EMBEDDED_TRAINING: dict = dict(seed=0, num_train_epochs=3.0, learning_rate=1e-3, per_device_train_batch_size=32,
                               warmup_steps=0.1, weight_decay=0.01, use_cpu=True, save_strategy="no",
                               logging_strategy="no", report_to="none", disable_tqdm=True)
"""`TrainingArguments` of the embedded model: 3 epochs of AdamW at lr 1e-3 on the CPU, nothing saved or logged."""

EMBEDDED_INFLUENCE: dict = dict(influence_params=EMBEDDED_PARAMS, influence_knn_k=1000, influence_damping=0.1,
                                influence_scale=50.0, influence_recursion_depth=50, influence_batch_size=8,
                                influence_repetitions=1, influence_weight_decay=0.0,
                                influence_check_convergence=False)
"""CPU-sized influence settings: λ = 0.1 × 50 = 5, above the Hessian's top eigenvalue (~1.7), as the paper's λ is
above bert-base's; damp 0.1 lets LiSSA converge in 50 steps (residual 0.9⁵⁰ < 1%). The scale-vs-eigenvalue
check is off to save ~1 s per call: the top eigenvalue was measured once at ~1.7 ≪ 50."""

EMBEDDED_SETUP: dict = dict(num_threads=1)
"""`ModelDataArguments` of the embedded default: one torch thread (tiny matrices; extra threads on a shared
machine only slow it down)."""

EMBEDDED_USES: dict[str, dict] = {
    "hans_correction": dict(correction_learning_rate=1e-2),
    "augmentation": dict(correction_learning_rate=1e-2),
    "simulatability": dict(influence_knn_k=None, learning_rates=np.logspace(-3, 0.5, 8).tolist()),
    "visualize": dict(test_points_per_heuristic=30),
    "table": dict(influence_knn_k=100),
}
"""What each use changes. Correction and augmentation: plain SGD at lr 1e-2 (a small model trained with lr 1e-3;
the paper's 1e-4 does not move it). Simulatability: every training row is scored (the paper's k is 10,000, more
than the 3,000 rows here), and 8 step sizes 1e-3 … 10^0.5. Visualisation: 30 test points per heuristic (paper:
100). The default table: 100 kNN candidates per test row."""


def embedded_defaults(use: str | None = None) -> dict:
    """Every flag value the embedded default sets (training, influence, set-up), with ``use``'s changes (a
    recipe's name, ``"table"`` for the default influence table, or None)."""
    if use is not None and use not in EMBEDDED_USES:
        raise ValueError(f"Unknown use {use!r} of the embedded default; use one of {', '.join(EMBEDDED_USES)}.")
    out = EMBEDDED_TRAINING | EMBEDDED_INFLUENCE | EMBEDDED_SETUP | EMBEDDED_USES.get(use, {})
    return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}


def embedded_arguments(output_dir: str = "outputs/embedded", use: str | None = None, **overrides) -> InfluenceArguments:
    """`InfluenceArguments` of the embedded default for ``use`` (see `embedded_defaults`), then ``overrides``."""
    fields = {name for name, spec in InfluenceArguments.__dataclass_fields__.items() if spec.init}
    settings = {k: v for k, v in embedded_defaults(use).items() if k in fields} | overrides
    return InfluenceArguments(output_dir=output_dir, **settings)


def embedded_data(seed: int = 0, n_train: int = EMBEDDED_DATA["n_train"],
                  n_hans_per_subcase: int = EMBEDDED_DATA["n_hans_per_subcase"],
                  n_pool_per_subcase: int = EMBEDDED_DATA["n_pool_per_subcase"],
                  ) -> tuple[DatasetDict, DatasetDict, PreTrainedTokenizerFast]:
    """``(raw, tokenized, tokenizer)`` of the generated NLI data (splits train / hans / pool)."""
    raw = generate_nli(seed=seed, n_train=n_train, n_hans_per_subcase=n_hans_per_subcase,
                       n_pool_per_subcase=n_pool_per_subcase)
    tokenizer = build_tokenizer()
    return raw, tokenize_nli(raw, tokenizer), tokenizer


def embedded_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config) -> BertForSequenceClassification:
    """The embedded 2-label BERT, freshly initialised from `EMBEDDED_MODEL` (``config`` overrides its fields)."""
    torch.manual_seed(seed)
    settings = EMBEDDED_MODEL | config
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), num_labels=2, id2label={0: "entailment", 1: "non_entailment"},
        label2id={"entailment": 0, "non_entailment": 1}, pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager", **settings))


def train_embedded(output_dir: str = "outputs/embedded", seed: int = 0, epochs: float | None = None,
                   data: tuple | None = None, *, args: InfluenceArguments | None = None,
                   **influence) -> tuple[InfluenceTrainer, DatasetDict, DatasetDict]:
    """Train the embedded default model; returns ``(trainer, raw, tokenized)``.

    Args:
        output_dir / seed / epochs / influence: build the settings with `embedded_arguments` (ignored when
            ``args`` is given).
        data: ``(raw, tokenized, tokenizer)`` from `embedded_data` (default: generated with ``args.seed``).
        args: the training and influence settings as they are, e.g. parsed from a command line.
    """
    if args is None:
        epochs_ = {} if epochs is None else {"num_train_epochs": epochs}
        args = embedded_arguments(output_dir, seed=seed, **epochs_, **influence)
    raw, tokenized, tokenizer = data or embedded_data(seed=args.seed)
    model = embedded_model(tokenizer, seed=args.seed)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=tokenized["train"], processing_class=tokenizer)
    trainer.train()
    return trainer, raw, tokenized
