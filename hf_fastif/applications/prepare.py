"""What every application recipe starts from: a trained NLI model, its training rows and a HANS validation /
test split, either the embedded default (offline, CPU-sized) or the paper's setup (bert-base-cased on MNLI-2,
official HANS), plus the influence settings and the list of settings that differ from the paper.

Data are loaded and checked before any model is built or trained, so a bad file fails in seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from ..arguments import InfluenceArguments
from ..data import label_names, load_hans, load_mnli, split_hans, tokenize_nli
from ..data.loaders import hub_offline
from ..embedded import EMBEDDED_PARAMS, embedded_arguments, embedded_data, embedded_model
from ..trainer import InfluenceTrainer
from .common import check_num_labels

logger = logging.get_logger(__name__)

PAPER_MODEL = "bert-base-cased"
PAPER_INFLUENCE: dict = dict(influence_knn_k=1000, influence_damping=5e-3, influence_scale=1e6,
                             influence_recursion_depth=1000, influence_batch_size=1, influence_repetitions=4,
                             influence_weight_decay=0.005, influence_check_convergence=True)
"""The paper's HANS settings (FASTIF.md): λ = 5e-3 × 1e6 = 5000, FastIF's LiSSA (B 1, J 1000, T 4), k 1000."""

EMBEDDED_INFLUENCE: dict = dict(influence_knn_k=1000, influence_damping=0.1, influence_scale=50.0,
                                influence_recursion_depth=50, influence_batch_size=8, influence_repetitions=1,
                                influence_weight_decay=0.0, influence_check_convergence=False)
"""CPU-sized settings of the embedded default: λ = 0.1 × 50 = 5, above the Hessian's top eigenvalue (~1.7), as
the paper's λ is above bert-base's; damp 0.1 lets LiSSA converge in 50 steps (residual 0.9⁵⁰ < 1%). The
scale-vs-eigenvalue check is off to save ~1 s per call: the top eigenvalue was measured once at ~1.7 ≪ 50."""

PAPER_TRAINING: dict = dict(num_train_epochs=3.0, learning_rate=2e-5, per_device_train_batch_size=32,
                            trainable_layers=2)
EMBEDDED_TRAINING: dict = dict(num_train_epochs=3.0, learning_rate=1e-3, per_device_train_batch_size=32)


@dataclass
class SetupArguments:
    """Model and data of an application recipe. Leave everything unset for the embedded default."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A local checkpoint directory or a Hub id (e.g. bert-base-cased). A sequence-classification "
                "checkpoint is used as is (no training); a base model is fine-tuned first. Unset: the embedded "
                "default (a small BERT trained from a config on generated data, offline)."})
    train_dataset: str | None = field(default=None, metadata={
        "help": "Training data: a Hub id (nyu-mll/multi_nli) or a local MNLI-format file. Unset: generated."})
    train_split: str = field(default="train", metadata={"help": "Hub split of --train_dataset."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use a seeded random subset of this many training rows (influence and fine-tuning)."})
    num_labels: int = field(default=2, metadata={"help": "2 (MNLI-2: entailment / non_entailment) or 3."})
    hans_file: str | None = field(default=None, metadata={
        "help": "HANS: the official heuristics_evaluation_set.txt, a parquet/jsonl copy of the Hub's hans, or a "
                "Hub id. Unset: the generated HANS-style split."})
    hans_split: str = field(default="validation", metadata={"help": "Hub split of --hans_file."})
    validation_fraction: float = field(default=0.5, metadata={
        "help": "Share of each HANS subcase used for anchors (validation); the rest is the held-out test split."})
    max_length: int = field(default=128, metadata={"help": "Token limit of a premise/hypothesis pair."})
    do_train: str = field(default="auto", metadata={
        "help": "auto: fine-tune unless the checkpoint already is a sequence classifier; always; never."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Fine-tuning epochs (default 3)."})
    train_learning_rate: float | None = field(default=None, metadata={
        "help": "Fine-tuning learning rate (default: 2e-5 for a pretrained model, 1e-3 for the embedded one)."})
    train_batch_size: int | None = field(default=None, metadata={"help": "Fine-tuning batch size (default 32)."})
    trainable_layers: int | None = field(default=None, metadata={
        "help": "Train (and take influence over) only the last N encoder layers, the pooler and the classifier; "
                "the paper: 2 (bert-base layers 10-11). Default: 2 for a pretrained model; the embedded model "
                "trains every layer and takes influence over its last layer."})
    knn_k: int | None = field(default=None, metadata={"help": "kNN candidates per query (paper: 1000)."})
    damping: float | None = field(default=None, metadata={"help": "LiSSA damp (λ = damping × scale)."})
    scale: float | None = field(default=None, metadata={"help": "LiSSA scale (paper HANS: 1e6, λ = 5000)."})
    recursion_depth: int | None = field(default=None, metadata={"help": "LiSSA steps J (paper: 1000)."})
    lissa_batch_size: int | None = field(default=None, metadata={"help": "LiSSA batch B (paper: 1)."})
    repetitions: int | None = field(default=None, metadata={"help": "LiSSA repetitions T (paper: 4)."})
    weight_decay: float | None = field(default=None, metadata={
        "help": "Explicit L2 term of every loss (the reference code: 0.005)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, model, splits and replicas."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: 1 for the embedded model, which threads only slow down; else torch's)."})

    def __post_init__(self):
        if self.do_train not in ("auto", "always", "never"):
            raise ValueError(f"--do_train must be auto, always or never, got {self.do_train!r}.")
        label_names(self.num_labels)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}.")

    @property
    def embedded(self) -> bool:
        return self.model_name_or_path is None

    def influence_overrides(self) -> dict:
        given = {"influence_knn_k": self.knn_k, "influence_damping": self.damping, "influence_scale": self.scale,
                 "influence_recursion_depth": self.recursion_depth, "influence_batch_size": self.lissa_batch_size,
                 "influence_repetitions": self.repetitions, "influence_weight_decay": self.weight_decay}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Setup:
    """A trained model and its data, ready for an application."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    data_collator: DataCollatorWithPadding
    args: InfluenceArguments
    train: Dataset
    hans_validation: Dataset
    hans_test: Dataset
    pool: Dataset | None
    name: str
    description: dict = field(default_factory=dict)
    raw_train: Dataset | None = None
    max_length: int = 128
    seed: int = 0


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def configure_threads(setup_args: SetupArguments) -> None:
    """1 thread for the embedded model (tiny matrices; extra threads on a shared machine only slow it down)."""
    if setup_args.num_threads is not None:
        torch.set_num_threads(max(1, setup_args.num_threads))
    elif setup_args.embedded:
        torch.set_num_threads(1)


def resolve_model(name_or_path: str) -> str:
    """A local checkpoint directory or a Hub id that can be loaded; a `ValueError` naming the fix otherwise."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(f"{str(path)!r} is not a model checkpoint (a directory with config.json); pass a "
                             "directory written by model.save_pretrained(...) or a Hub model id.")
        return str(path)
    try:
        AutoConfig.from_pretrained(name_or_path)  # the local cache, or the Hub when online
    except (OSError, ValueError) as err:
        if hub_offline():
            raise ValueError(
                f"{name_or_path!r} is not a local directory, so it would come from the Hugging Face Hub, but the Hub "
                "is offline (HF_HUB_OFFLINE) and it is not in the local cache. Pass a local checkpoint directory "
                "(model.save_pretrained(dir) and tokenizer.save_pretrained(dir)), or go online and unset "
                "HF_HUB_OFFLINE."
            ) from err
        raise ValueError(f"Could not load the model {name_or_path!r} ({err}). Pass a local checkpoint directory or a "
                         "Hub model id such as 'bert-base-cased'.") from err
    return name_or_path


def is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\.")


def freeze_lower_layers(model: nn.Module, trainable_layers: int) -> list[str]:
    """Freeze the embeddings and all but the last ``trainable_layers`` encoder layers (the paper freezes
    bert-base's embeddings and layers 0-9); return the names that stay trainable."""
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER.search(n))]
    if not indices:
        raise ValueError(f"Cannot find numbered layers in {type(model).__name__}'s parameter names; pass "
                         "--trainable_layers only for encoder models (BERT-like).")
    first = max(indices) + 1 - trainable_layers
    trainable = []
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        keep = (m is not None and int(m.group(1)) >= first) or (m is None and "embeddings" not in name)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def _subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return dataset.select(np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n]))


def load_data(setup_args: SetupArguments) -> dict[str, Dataset | None]:
    """Raw (untokenized) ``train``, ``hans`` and ``pool`` (pool: the generated one when training data are
    generated, else None). Bad files fail here, before any model is built."""
    generated = None
    if setup_args.train_dataset is None or setup_args.hans_file is None:
        generated, _, _ = embedded_data(seed=setup_args.seed)
    if setup_args.train_dataset is None:
        if setup_args.num_labels != 2:
            raise ValueError("The generated training data have 2 labels; pass --num_labels 2 or --train_dataset.")
        train = generated["train"]
    else:
        train = load_mnli(setup_args.train_dataset, split=setup_args.train_split, num_labels=setup_args.num_labels)
    hans = generated["hans"] if setup_args.hans_file is None else load_hans(setup_args.hans_file,
                                                                            split=setup_args.hans_split)
    return {"train": _subsample(train, setup_args.max_train_samples, setup_args.seed), "hans": hans,
            "pool": generated["pool"] if generated is not None else None}


def prepare(setup_args: SetupArguments, output_dir: str, *, required_labels: tuple[int, ...] = (2,),
            what: str = "This application", influence_defaults: dict | None = None) -> Setup:
    """Check the model and the data, then load or train the model; return everything an application needs.

    Cheap checks come first (label counts, the checkpoint can be found, the data files parse), so bad input
    fails before any training.

    Args:
        setup_args: the recipe's model and data flags.
        output_dir: where a model fine-tuned here is saved (``<output_dir>/model``).
        required_labels: label counts the application accepts (HANS correction: 2).
        what: the application's name, for error messages.
        influence_defaults: ``influence_*`` settings of this application that differ from the shared
            defaults (e.g. a larger k for simulatability), before the user's flags.
    """
    configure_threads(setup_args)
    if setup_args.num_labels not in required_labels:
        raise ValueError(f"{what} needs a {' or '.join(map(str, required_labels))}-label model; got "
                         f"--num_labels {setup_args.num_labels}.")
    checkpoint = None if setup_args.embedded else _check_checkpoint(setup_args, required_labels, what)
    raw = load_data(setup_args)
    if setup_args.embedded and setup_args.train_dataset is not None:
        logger.warning("The embedded model's word-level tokenizer knows only the generated vocabulary; other words of "
                       f"{setup_args.train_dataset} become [UNK]. Pass --model_name_or_path for real data.")
    influence = (dict(EMBEDDED_INFLUENCE if setup_args.embedded else PAPER_INFLUENCE) | (influence_defaults or {})
                 | setup_args.influence_overrides())
    if setup_args.embedded:
        from ..data import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint[0])
    tokenized = {k: tokenize_nli(v, tokenizer, max_length=setup_args.max_length) if v is not None else None
                 for k, v in raw.items()}
    if setup_args.embedded:
        model, args, trained = _embedded_model(setup_args, tokenizer, tokenized["train"], output_dir, influence)
    else:
        model, args, trained = _pretrained_model(setup_args, checkpoint, tokenizer, tokenized["train"], output_dir,
                                                 influence)
    check_num_labels(model, required_labels, what)
    split = split_hans(tokenized["hans"], setup_args.validation_fraction, seed=setup_args.seed)
    influence_params = sum(p.numel() for n, p in model.named_parameters()
                           if (args.influence_params is None and p.requires_grad)
                           or any(re.search(r, n) for r in args.influence_params or []))
    description = {
        "setup": "embedded" if setup_args.embedded else "paper",
        "model": setup_args.model_name_or_path or "embedded BERT (from a config)",
        "trained_here": trained, "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_influence_parameters": influence_params,
        "train_data": setup_args.train_dataset or "generated (hf_fastif.data.generate_nli)",
        "num_train": len(tokenized["train"]), "hans": setup_args.hans_file or "generated HANS-style",
        "num_hans_validation": len(split["validation"]), "num_hans_test": len(split["test"]),
        "influence_lambda": args.influence_lambda,
    }
    logger.info(f"Setup: {description}")
    return Setup(model=model, tokenizer=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), args=args,
                 train=tokenized["train"], hans_validation=split["validation"], hans_test=split["test"],
                 pool=tokenized["pool"], name=description["setup"], description=description, raw_train=raw["train"],
                 max_length=setup_args.max_length, seed=setup_args.seed)


def _check_checkpoint(setup_args: SetupArguments, required_labels, what) -> tuple[str, object, bool]:
    """``(name, config, train)`` for a pretrained model; raises before any download of weights or data."""
    name = resolve_model(setup_args.model_name_or_path)
    config = AutoConfig.from_pretrained(name)
    classifier = is_sequence_classifier(config)
    train = setup_args.do_train == "always" or (setup_args.do_train == "auto" and not classifier)
    if not train:
        if not classifier:
            raise ValueError(f"--do_train never, but {name!r} is not a sequence-classification checkpoint "
                             f"(architectures {config.architectures}); fine-tune it first or use --do_train auto.")
        if config.num_labels not in required_labels or config.num_labels != setup_args.num_labels:
            raise ValueError(
                f"{what} needs a {' or '.join(map(str, required_labels))}-label model matching --num_labels "
                f"{setup_args.num_labels}, but the checkpoint {name!r} has {config.num_labels} labels "
                f"({config.id2label}). Use a 2-label (entailment / non_entailment, MNLI-2) checkpoint, pass "
                "--num_labels to match it where the application allows, or fine-tune a base model with "
                "--do_train always."
            )
    return name, config, train


def _embedded_model(setup_args, tokenizer, train, output_dir, influence):
    if setup_args.do_train == "never":
        raise ValueError("--do_train never needs --model_name_or_path (a fine-tuned checkpoint); the embedded "
                         "model is always trained here.")
    epochs = setup_args.num_train_epochs or EMBEDDED_TRAINING["num_train_epochs"]
    args = embedded_arguments(f"{output_dir}/model", seed=setup_args.seed, epochs=epochs,
                              **({"influence_params": EMBEDDED_PARAMS} | influence))
    args.learning_rate = setup_args.train_learning_rate or EMBEDDED_TRAINING["learning_rate"]
    args.per_device_train_batch_size = setup_args.train_batch_size or EMBEDDED_TRAINING["per_device_train_batch_size"]
    model = embedded_model(tokenizer, seed=setup_args.seed)
    if setup_args.trainable_layers is not None:
        freeze_lower_layers(model, setup_args.trainable_layers)
        args.influence_params = None
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval(), args, True


def _pretrained_model(setup_args, checkpoint, tokenizer, train, output_dir, influence):
    name, _, do_train = checkpoint
    names = label_names(setup_args.num_labels)
    kwargs = {"attn_implementation": "eager"}
    if do_train:
        kwargs |= {"num_labels": setup_args.num_labels, "id2label": dict(enumerate(names)),
                   "label2id": {n: i for i, n in enumerate(names)}, "ignore_mismatched_sizes": True}
    model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    trainable_layers = setup_args.trainable_layers if setup_args.trainable_layers is not None \
        else PAPER_TRAINING["trainable_layers"]
    if trainable_layers > 0:
        freeze_lower_layers(model, trainable_layers)
    args = InfluenceArguments(
        output_dir=f"{output_dir}/model", seed=setup_args.seed, report_to="none", save_strategy="no",
        logging_strategy="steps", logging_steps=200,
        num_train_epochs=setup_args.num_train_epochs or PAPER_TRAINING["num_train_epochs"],
        learning_rate=setup_args.train_learning_rate or PAPER_TRAINING["learning_rate"],
        per_device_train_batch_size=setup_args.train_batch_size or PAPER_TRAINING["per_device_train_batch_size"],
        influence_params=None, **influence)
    if do_train:
        trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        logger.info(f"Saved the fine-tuned model to {args.output_dir}; pass it as --model_name_or_path next time.")
        model = trainer.model
    else:
        model.to(args.device)
    return model.eval(), args, do_train


PAPER_DESCRIPTION: dict = {
    "model": "bert-base-cased, fine-tuned on MNLI-2 (embeddings and layers 0-9 frozen)",
    "influence parameters": "layers 10-11, pooler, classifier (14.7M)",
    "training rows": "392,702 (MNLI-2 train)",
    "HANS rows (validation / test)": "official HANS evaluation set (30,000), split into validation / test",
}


def compare_with_paper(setup: Setup, paper_protocol: dict | None = None, used_protocol: dict | None = None,
                       paper_influence: dict | None = None) -> list[tuple[str, str, str]]:
    """``(setting, paper, here)`` for the model, the data, the influence settings and λ, and the application's
    protocol settings (``paper_protocol`` vs ``used_protocol``, keyed alike). Only differences are listed."""
    d = setup.description
    here = {
        "model": "embedded BERT from a config, trained here on generated data" if d["setup"] == "embedded"
        else f"{d['model']}" + (" (fine-tuned here)" if d["trained_here"] else " (as given)"),
        "influence parameters": f"{d['num_influence_parameters']:,} of {d['num_parameters']:,}",
        "training rows": f"{d['num_train']:,} ({d['train_data']})",
        "HANS rows (validation / test)": f"{d['hans']}: {d['num_hans_validation']:,} / {d['num_hans_test']:,}",
    }
    rows = []
    if d["setup"] == "embedded" or d["train_data"] != PAPER_DESCRIPTION["training rows"]:
        rows += [(k, PAPER_DESCRIPTION[k], here[k]) for k in PAPER_DESCRIPTION]
    paper_influence = PAPER_INFLUENCE | (paper_influence or {})
    used = setup.args.influence_settings()
    rows += [(k, _show(v), _show(used.get(k))) for k, v in paper_influence.items() if _show(v) != _show(used.get(k))]
    paper_lambda = paper_influence["influence_damping"] * paper_influence["influence_scale"]
    if _show(paper_lambda) != _show(setup.args.influence_lambda):
        rows.append(("λ = damping × scale", _show(paper_lambda), _show(setup.args.influence_lambda)))
    for k, v in (paper_protocol or {}).items():
        if _show(v) != _show((used_protocol or {}).get(k)):
            rows.append((k, _show(v), _show((used_protocol or {}).get(k))))
    return rows


def comparison_markdown(rows: list[tuple[str, str, str]], setup: Setup) -> str:
    from .common import markdown_table

    title = ("Settings the embedded default changes from the paper" if setup.name == "embedded"
             else "Settings that differ from the paper")
    if not rows:
        return f"### {title}\n\nNone."
    return f"### {title}\n\n" + markdown_table(["setting", "paper", "here"], rows)


def apply_quick(setup_args: SetupArguments) -> None:
    """A smoke-test size for ``--quick``: 600 training rows, 1 epoch, 200 kNN candidates, 10 LiSSA steps
    (only where the flags leave the value unset)."""
    setup_args.max_train_samples = setup_args.max_train_samples or 600
    setup_args.num_train_epochs = setup_args.num_train_epochs or 1.0
    setup_args.knn_k = setup_args.knn_k or 200
    setup_args.recursion_depth = setup_args.recursion_depth or 10
