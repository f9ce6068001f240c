"""The pretrained embedded default: all-MiniLM-L6-v2 (`hf_fastif.pretrained`) fine-tuned on generated NLI.

Fine-tuning follows the paper (FastIF, Sec. 3): a 2-label sequence-classification head (entailment /
non_entailment) on the pretrained encoder, with the embeddings and the lower layers frozen and only the last
`trainable_layers` layer(s), the pooler and the classifier trained; those same parameters are the ones
influence is computed over (`minilm_influence_params`).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from datasets import Dataset
from transformers import BertForSequenceClassification, BertTokenizer, set_seed
from transformers.utils import logging

from .arguments import InfluenceArguments
from .data import NLI2_LABELS, tokenize_nli
from .pretrained import load_minilm_for_sequence_classification, load_minilm_tokenizer, minilm_path
from .trainer import InfluenceTrainer

logger = logging.get_logger(__name__)

MINILM_NUM_LAYERS = 6
TRAINABLE_LAYERS_KEY = "hf_fastif_trainable_layers"
"""Config entry that records how many top layers were fine-tuned, so a saved model is frozen the same way
when loaded again."""


def _check_trainable_layers(trainable_layers: int) -> None:
    if (not isinstance(trainable_layers, int) or isinstance(trainable_layers, bool)
            or not 0 <= trainable_layers <= MINILM_NUM_LAYERS):
        raise ValueError(f"trainable_layers must be an integer from 0 (pooler and classifier only) to "
                         f"{MINILM_NUM_LAYERS} (every layer), got {trainable_layers!r}.")


def minilm_influence_params(trainable_layers: int = 2) -> list[str]:
    """Regexes (for ``influence_params``) of the fine-tuned parameters: the last ``trainable_layers`` encoder
    layers, the pooler and the classifier."""
    _check_trainable_layers(trainable_layers)
    first = MINILM_NUM_LAYERS - trainable_layers
    return [rf"encoder\.layer\.{i}\." for i in range(first, MINILM_NUM_LAYERS)] + [r"pooler\.", r"classifier\."]


def freeze_minilm(model: BertForSequenceClassification, trainable_layers: int = 2) -> list[str]:
    """Set ``requires_grad`` so that only the last ``trainable_layers`` layers, the pooler and the classifier
    train; returns the trainable parameter names. The choice is recorded in the config (saved with the model)."""
    _check_trainable_layers(trainable_layers)
    patterns = [re.compile(p) for p in minilm_influence_params(trainable_layers)]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p.search(name) for p in patterns))
        if parameter.requires_grad:
            trainable.append(name)
    setattr(model.config, TRAINABLE_LAYERS_KEY, trainable_layers)
    return trainable


def minilm_arguments(output_dir: str | os.PathLike, seed: int = 0, trainable_layers: int = 2, epochs: float = 1.0,
                     lr: float = 2e-4, batch_size: int = 32, **overrides) -> InfluenceArguments:
    """Training arguments of the MiniLM default (CPU-sized), with ``influence_params`` set to the fine-tuned
    parameters; any `InfluenceArguments` field can be overridden."""
    settings = dict(output_dir=str(output_dir), seed=seed, num_train_epochs=epochs, learning_rate=lr,
                    per_device_train_batch_size=batch_size, per_device_eval_batch_size=128, warmup_steps=0.1,
                    weight_decay=0.01, save_strategy="no", logging_strategy="no", report_to="none",
                    disable_tqdm=True, influence_params=minilm_influence_params(trainable_layers))
    return InfluenceArguments(**(settings | overrides))


def finetune_minilm(train_dataset_raw: Dataset, output_dir: str | os.PathLike, seed: int = 0,
                    trainable_layers: int = 2, epochs: float = 1.0, lr: float = 2e-4, batch_size: int = 32,
                    max_length: int = 64, save: bool = True, minilm_folder: str | os.PathLike | None = None,
                    **overrides) -> InfluenceTrainer:
    """Fine-tune pretrained MiniLM for 2-label NLI on raw premise/hypothesis pairs (e.g. ``generate_nli()["train"]``).

    The defaults (last 2 of 6 layers, as the paper trains the last 2 of BERT-base's 12; 1 epoch at 2e-4) reach
    ~95% training accuracy on 2,500 generated rows in 25-55 s on 2 shared CPU cores while still failing most
    HANS-style non-entailment subcases, as MNLI models do (docs/pretrained.md has the sweep).

    Args:
        train_dataset_raw: rows with ``premise``, ``hypothesis`` and ``label`` (0 = entailment, 1 = non_entailment).
        output_dir: the Trainer's output folder; with ``save`` the model and tokenizer are saved there
            (safetensors), for `load_finetuned_minilm`.
        seed: seeds the classifier's initialisation, dropout and the data order.
        trainable_layers: top encoder layers trained (with the pooler and classifier); the rest is frozen.
        epochs, lr, batch_size: training length, peak learning rate (linear decay, 10% warm-up), batch size.
        max_length: pairs are truncated to this many tokens.
        minilm_folder: a folder from `minilm_path` (default: ``minilm_path()``).
        **overrides: any other `InfluenceArguments` field (e.g. ``use_cpu=True``, influence settings).

    Returns:
        The trained `InfluenceTrainer` (``.model``, ``.processing_class`` = the tokenizer, ``.train_dataset``
        tokenized), ready for ``compute_influences``.
    """
    missing = [c for c in ("premise", "hypothesis", "label") if c not in train_dataset_raw.column_names]
    if missing:
        raise ValueError(f"finetune_minilm needs raw NLI rows with premise, hypothesis and label; missing {missing} "
                         f"in {train_dataset_raw.column_names}. Use hf_fastif.data.generate_nli or load_mnli.")
    labels = set(train_dataset_raw.unique("label"))
    if not labels <= {0, 1}:
        raise ValueError(f"finetune_minilm trains 2 labels (0 = entailment, 1 = non_entailment), got {sorted(labels)}; "
                         "map neutral and contradiction to 1 first.")
    _check_trainable_layers(trainable_layers)
    args = minilm_arguments(output_dir, seed, trainable_layers, epochs, lr, batch_size, **overrides)

    folder = Path(minilm_folder) if minilm_folder is not None else minilm_path()
    tokenizer = load_minilm_tokenizer(folder)
    train = tokenize_nli(train_dataset_raw, tokenizer, max_length=max_length)
    set_seed(seed)
    model = load_minilm_for_sequence_classification(len(NLI2_LABELS), id2label=dict(enumerate(NLI2_LABELS)),
                                                    path=folder)
    trainable = freeze_minilm(model, trainable_layers)
    logger.info(f"Fine-tuning MiniLM: {sum(p.numel() for n, p in model.named_parameters() if n in trainable):,} "
                f"of {model.num_parameters():,} parameters trainable (last {trainable_layers} layer(s), pooler, "
                "classifier).")
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    logger.info(f"Fine-tuned MiniLM on {len(train)} rows for {epochs} epoch(s) in {time.perf_counter() - start:.1f} s.")
    if save:
        trainer.save_model(str(output_dir))
    return trainer


def load_finetuned_minilm(path: str | os.PathLike) -> tuple[BertForSequenceClassification, BertTokenizer]:
    """``(model, tokenizer)`` saved by `finetune_minilm`, frozen as it was trained (eager attention, safetensors)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds no saved model (no config.json); run finetune_minilm(..., output_dir="
                         f"{str(path)!r}, save=True) first.")
    model = BertForSequenceClassification.from_pretrained(path, attn_implementation="eager", use_safetensors=True)
    freeze_minilm(model, int(getattr(model.config, TRAINABLE_LAYERS_KEY, 2)))
    tokenizer = BertTokenizer.from_pretrained(path)
    return model, tokenizer


__all__ = [
    "MINILM_NUM_LAYERS",
    "finetune_minilm",
    "freeze_minilm",
    "load_finetuned_minilm",
    "minilm_arguments",
    "minilm_influence_params",
]
