"""The embedded default: a model trained on the project's generated NLI data, offline, in one of two kinds.

- ``"minilm"`` (the default): all-MiniLM-L6-v2 (`hf_fastif.pretrained`, sha256-verified) with a 2-label head,
  fine-tuned the paper's way (`hf_fastif.minilm_default`: the last 2 of 6 layers, the pooler and the classifier)
  and cached on disk by content, so a machine fine-tunes it once.
- ``"tiny"``: a 2-layer 64-wide BERT built from a config and trained in seconds, for unit tests and ``--quick``.

Used by the recipes, ``hf-fastif build``, the Space, the quickstart and the paper table when no model or data is
given. Every setting of the embedded default lives in this file: the generated data's sizes, the model, its
training, its influence settings, and what each use (a recipe, the default table) changes. The recipes and the
CLI read them as the defaults of their flags (`embedded_defaults`), so a flag given on the command line still
wins. Swapping the embedded model for another is a change to this file only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase, TrainingArguments
from transformers.utils import logging

from .arguments import InfluenceArguments
from .data import NLI2_LABELS, NLI_MAX_LENGTH, build_tokenizer, generate_nli, tokenize_nli
from .distributed import training_replicas
from .minilm_default import (
    FinetuneSettings,
    cached_finetune_minilm,
    freeze_minilm,
)
from .pretrained import load_minilm_for_sequence_classification, load_minilm_tokenizer
from .trainer import InfluenceTrainer

logger = logging.get_logger(__name__)

KINDS = ("minilm", "tiny")
DEFAULT_KIND = "minilm"
"""The embedded model of the demo, the recipes, ``hf-fastif build``, the Space and the paper table."""
QUICK_KIND = "tiny"
"""The embedded model of ``--quick`` runs (smoke tests, CI) and of unit tests."""

_TRAINING_COMMON: dict = dict(seed=0, per_device_train_batch_size=32, warmup_steps=0.1, weight_decay=0.01, use_cpu=True,
                              save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
_DATA: dict = dict(n_train=3000, n_hans_per_subcase=40, n_pool_per_subcase=40)
"""Generated rows of the applications, both kinds: 3,000 training pairs, 40 HANS-style pairs per subcase (split into
validation / test), a pool of 40 unseen pairs per subcase."""
_TABLE_DATA: dict = dict(n_train=2000, n_hans_per_subcase=1, n_pool_per_subcase=0)
"""Generated rows of the default influence table, both kinds: 2,000 training pairs, one HANS-style pair per
subcase."""
_USES_COMMON: dict = {
    "hans_correction": dict(correction_learning_rate=1e-2),
    "augmentation": dict(correction_learning_rate=1e-2),
    "simulatability": dict(influence_knn_k=None, learning_rates=np.logspace(-3, 0.5, 8).tolist()),
    "visualize": dict(test_points_per_heuristic=30),
    # gradient-space candidates: the pooled [CLS] kNN of the paper held 1-4% of the 10 most helpful / harmful rows
    # of the whole set at k = 100 of 2,000 on this table, the gradient index 98-99% (docs/benchmarks.md); the
    # paper's 4 LiSSA repetitions: a table is read row by row, and one repetition's sampling noise reordered its rows
    # (Spearman with the solve at λ 0.979 against 0.991, its 10 most helpful 86% against 93%; docs/benchmarks.md)
    "table": dict(influence_knn_k=100, influence_knn_features="gradient", influence_projection_dim=4096,
                  influence_repetitions=4),
}
"""Per-use settings both kinds share (correction steps, the simulatability sweep, the visualisation, tables). The
paper table's own MiniLM settings (its layers 4-5, scale 200) live in benchmarks/paper_setup.py."""
_WHY_COMMON: dict = {
    "influence_batch_size": "8 rows per step cost about what 1 does",
    "influence_repetitions": "one repetition per s_test on a CPU in the recipes (tables: the paper's 4)",
    # (no count: --quick runs on 600 rows, and its report said 3,000)
    "influence_knn_k": "every training row (the paper's 10,000 exceeds the training rows here)",
    "influence_knn_features": "gradient-space candidates (tables): the paper's pooled [CLS] kNN misses nearly all of "
                              "the most helpful / harmful rows",
    "test_points": "the generated data have no dev split; HANS gives incorrect predictions",
    "test_points_per_heuristic": "CPU time",
}
"""Why both kinds differ from the paper where they differ alike (each kind's `EmbeddedKind.why` adds its own)."""


@dataclass(frozen=True)
class EmbeddedKind:
    """Every setting of one kind of embedded default.

    Attributes:
        name: ``"minilm"`` or ``"tiny"``.
        description: what the model is, for result files, table metadata and the paper comparison.
        data: `generate_nli` sizes of the applications' data (train / hans / pool).
        table_data: `generate_nli` sizes of the default influence table (``hf-fastif build``, the Space).
        training: `TrainingArguments` fields of its training.
        influence: the ``influence_*`` settings.
        setup: `ModelDataArguments` fields (threads, trainable layers).
        uses: what each use changes (a recipe's name, or ``"table"``).
        why: one line per setting that differs from the paper, for docs and result files.
    """

    name: str
    description: str
    data: dict
    table_data: dict
    training: dict
    influence: dict
    setup: dict
    uses: dict[str, dict]
    why: dict[str, str] = field(default_factory=dict)


TINY_CONFIG: dict = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                         max_position_embeddings=128)
"""`BertConfig` of the tiny model (2 labels, eager attention so influence can differentiate it twice)."""

TINY = EmbeddedKind(
    name="tiny",
    description="2-layer 64-wide BERT from a config, trained here on generated NLI data",
    data=_DATA,
    table_data=_TABLE_DATA,
    training=_TRAINING_COMMON | dict(num_train_epochs=3.0, learning_rate=1e-3),
    # λ = 0.1 × 50 = 5, above the Hessian's top eigenvalue (~1.7); damp 0.1 converges in 50 steps (0.9⁵⁰ < 1%)
    influence=dict(influence_params=[r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."], influence_knn_k=1000,
                   influence_damping=0.1, influence_scale=50.0, influence_recursion_depth=50, influence_batch_size=8,
                   influence_repetitions=1, influence_weight_decay=0.0, influence_check_convergence=True),
    setup=dict(num_threads=1),
    uses=_USES_COMMON | {"benchmark": dict(influence_scale=5.0)},
    why=_WHY_COMMON | {
        "model": "a CPU-sized model trained offline in seconds (unit tests, --quick)",
        "influence parameters": "the last layer, the pooler and the classifier (the paper's choice, scaled down)",
        "training rows": "generated offline",
        "HANS rows (validation / test)": "generated HANS-style pairs (30 subcases)",
        "λ = damping × scale": "above the Hessian's top eigenvalue (~1.7 here), as the paper's is above bert-base's",
        "influence_damping": "with damp 0.1 LiSSA's series converges in the default's J = 50 steps (residual 0.9^50 "
                             "< 1%; --quick's J = 10 does not: its warning gives the share summed)",
        "influence_scale": "far above the top eigenvalue (~1.7)",
        "influence_recursion_depth": "converged with damp 0.1",
        "influence_weight_decay": "the model was trained without an explicit L2 term",
        "influence_check_convergence": "on: the trained model's eigenvalues (top ~1.8, smallest ~-0.55) need no "
                                       "check, but the HANS correction's steps move it (λ_min down to ~-4.7 against "
                                       "λ = 5; one of 180 steps refused); ~0.1 s a call at the trained weights, "
                                       "~0.5 s in the correction, where it confirms on more rows",
        "correction_learning_rate": "a model trained at lr 1e-3: 1e-4 does not move it, 3e-2 oscillates",
        "learning_rates": "a small model trained at lr 1e-3",
    },
)
"""The tiny model: every layer trains (3 epochs of AdamW at lr 1e-3); influence over its last layer, the pooler
and the classifier; correction steps at lr 1e-2 (the paper's 1e-4 does not move a model trained at 1e-3)."""

MINILM_TRAINABLE_LAYERS = 2
"""Fine-tuned layers of MiniLM (with the pooler and the classifier): the paper trains the last 2 of BERT-base's 12."""
MINILM_PARAMS: list[str] = [r"pooler\.", r"classifier\."]
"""Influence parameters of the MiniLM default: the pooler and the classifier (148,610 of 22.7M), the top of what
fine-tuning trained. With them the cached trunk covers all 6 layers, so a correction step costs ~3 s on a CPU; the
paper's choice (everything trained: here layers 4-5 too, 3.7M) costs 40-60 s a correction step on this machine,
too slow for the 180 influence steps of the correction demo (docs/applications.md has the measurements)."""

def minilm_description(settings: FinetuneSettings) -> str:
    """What MiniLM fine-tuned with ``settings`` is, in the words of `MINILM`'s description (which holds the
    defaults: a recipe run with ``--trainable_layers 4 --learning_rate 5e-5`` still said "last 2 of 6 layers ... lr
    2e-4")."""
    epochs = f"{settings.epochs:g} epoch" + ("" if settings.epochs == 1 else "s")
    lr = np.format_float_scientific(settings.lr, trim="-", exp_digits=1)
    return (f"all-MiniLM-L6-v2 (sha256-verified, 22.7M parameters) fine-tuned here on generated NLI: last "
            f"{settings.trainable_layers} of 6 layers, pooler and classifier, {epochs} at lr {lr}")


MINILM = EmbeddedKind(
    name="minilm",
    description=minilm_description(FinetuneSettings()),
    data=_DATA,
    table_data=_TABLE_DATA,
    training=_TRAINING_COMMON | dict(num_train_epochs=1.0, learning_rate=2e-4),
    influence=dict(influence_params=MINILM_PARAMS, influence_knn_k=1000, influence_damping=0.25,
                   influence_scale=12.0, influence_recursion_depth=20, influence_batch_size=8,
                   influence_repetitions=1, influence_weight_decay=0.0, influence_check_convergence=True,
                   influence_scoring_batch_size=256),
    setup=dict(num_threads=1, trainable_layers=MINILM_TRAINABLE_LAYERS),
    uses=_USES_COMMON,
    why=_WHY_COMMON | {
        "model": "a real pretrained BERT that runs offline on a CPU (sha256-verified wheel), fine-tuned the paper's "
                 "way: embeddings and lower layers frozen, the last 2 layers, pooler and classifier trained",
        "influence parameters": "the pooler and the classifier, the top of what was fine-tuned: the trunk cache then "
                                "covers all 6 layers and a correction step takes ~3 s; with layers 4-5 too it takes "
                                "~40-60 s, for an effect of the same size (docs/applications.md)",
        "training rows": "generated offline (no MNLI download)",
        "HANS rows (validation / test)": "generated HANS-style pairs (30 subcases, 40 rows each)",
        "λ = damping × scale": "above the top eigenvalue of the pooler + classifier Hessian (~2.3; smallest ~-0.45), "
                               "as the paper's is above bert-base's",
        "influence_damping": "with scale 12, J·damp = 5 as the paper's 1000 × 5e-3 (residual 0.75^20 < 0.4%)",
        "influence_scale": "5x the top eigenvalue (~2.3) and above the largest 8-row batch eigenvalue",
        "influence_recursion_depth": "J·damp = 5 as the paper's",
        "influence_weight_decay": "fine-tuning used AdamW's weight decay, not an explicit L2 term",
        "influence_check_convergence": "on: the eigenvalues above hold for the fine-tuned model only, and the HANS "
                                       "correction's steps move it (four steps in, batch Hessians reached ~27 and "
                                       "the smallest eigenvalue -3.7 against λ = 3); the check costs ~0.05 s a call "
                                       "here, kept per weights",
        "correction_learning_rate": "the largest rate at which stepping on the anchors themselves lowers their "
                                    "heuristic's loss without oscillating (sweep 1e-3 … 1e-1, docs/applications.md); "
                                    "the paper's 1e-4 moves nothing in 10 steps",
        "learning_rates": "the sweep spans the rates at which one step moves the simulator at all",
    },
)

EMBEDDED: dict[str, EmbeddedKind] = {"minilm": MINILM, "tiny": TINY}


def embedded_kind(kind: str | None = None) -> EmbeddedKind:
    """The settings of ``kind`` (default `DEFAULT_KIND`); a `ValueError` naming the kinds for an unknown one."""
    kind = DEFAULT_KIND if kind is None else kind
    if kind not in EMBEDDED:
        raise ValueError(f"Unknown embedded model {kind!r}; use one of {', '.join(KINDS)} (--embedded_model).")
    return EMBEDDED[kind]


def embedded_defaults(use: str | None = None, kind: str | None = None) -> dict:
    """Every flag value the embedded default of ``kind`` sets (training, influence, set-up), with ``use``'s changes
    (a recipe's name, ``"table"`` for the default influence table, or None)."""
    settings = embedded_kind(kind)
    if use is not None and use not in settings.uses:
        raise ValueError(f"Unknown use {use!r} of the embedded default; use one of {', '.join(settings.uses)}.")
    out = settings.training | settings.influence | settings.setup | settings.uses.get(use, {})
    return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}


def embedded_arguments(output_dir: str = "outputs/embedded", use: str | None = None, kind: str | None = None,
                       **overrides) -> InfluenceArguments:
    """`InfluenceArguments` of the embedded default of ``kind`` for ``use`` (see `embedded_defaults`), then
    ``overrides``."""
    fields = {name for name, spec in InfluenceArguments.__dataclass_fields__.items() if spec.init}
    settings = {k: v for k, v in embedded_defaults(use, kind).items() if k in fields} | overrides
    return InfluenceArguments(output_dir=output_dir, **settings)


def embedded_tokenizer(kind: str | None = None) -> PreTrainedTokenizerBase:
    """MiniLM's verified WordPiece tokenizer, or the tiny model's word-level one over the generated vocabulary."""
    return load_minilm_tokenizer() if embedded_kind(kind).name == "minilm" else build_tokenizer()


def embedded_data(seed: int = 0, n_train: int | None = None, n_hans_per_subcase: int | None = None,
                  n_pool_per_subcase: int | None = None, *, kind: str | None = None, max_length: int = NLI_MAX_LENGTH,
                  ) -> tuple[DatasetDict, DatasetDict, PreTrainedTokenizerBase]:
    """``(raw, tokenized, tokenizer)`` of the generated NLI data (splits train / hans / pool), tokenized for
    ``kind``; unset sizes are ``kind``'s `EmbeddedKind.data`."""
    sizes = embedded_kind(kind).data
    raw = generate_nli(seed=seed, n_train=sizes["n_train"] if n_train is None else n_train,
                       n_hans_per_subcase=sizes["n_hans_per_subcase"] if n_hans_per_subcase is None
                       else n_hans_per_subcase,
                       n_pool_per_subcase=sizes["n_pool_per_subcase"] if n_pool_per_subcase is None
                       else n_pool_per_subcase)
    tokenizer = embedded_tokenizer(kind)
    return raw, tokenize_nli(raw, tokenizer, max_length=max_length), tokenizer


def embedded_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, *, kind: str = QUICK_KIND,
                   trainable_layers: int | None = None, **config) -> BertForSequenceClassification:
    """An untrained embedded model: the tiny BERT freshly initialised from `TINY_CONFIG` (``config`` overrides its
    fields), or pretrained MiniLM with a new head (seeded), frozen below its last ``trainable_layers`` layers
    (default `MINILM_TRAINABLE_LAYERS`)."""
    torch.manual_seed(seed)
    if embedded_kind(kind).name == "minilm":
        model = load_minilm_for_sequence_classification(len(NLI2_LABELS), id2label=dict(enumerate(NLI2_LABELS)))
        freeze_minilm(model, MINILM_TRAINABLE_LAYERS if trainable_layers is None else trainable_layers)
        return model
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), num_labels=2, id2label={0: "entailment", 1: "non_entailment"},
        label2id={"entailment": 0, "non_entailment": 1}, pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager", **(TINY_CONFIG | config)))


def data_description(seed: int, n_train: int) -> dict:
    """What generated training rows are, for a cached model's manifest."""
    return {"generator": "hf_fastif.data.generate_nli", "seed": int(seed), "n_train": int(n_train)}


def finetune_settings(args: InfluenceArguments, trainable_layers: int | None = None,
                      max_length: int = NLI_MAX_LENGTH) -> FinetuneSettings:
    """The `FinetuneSettings` that ``args`` ask for: its seed, data_seed, num_train_epochs, learning_rate,
    per_device_train_batch_size, warmup_steps (a ratio below 1), weight_decay and device."""
    return FinetuneSettings(
        seed=int(args.seed), data_seed=args.data_seed, epochs=float(args.num_train_epochs),
        lr=float(args.learning_rate), batch_size=int(args.per_device_train_batch_size),
        warmup_ratio=float(args.warmup_steps), weight_decay=float(args.weight_decay),
        trainable_layers=MINILM_TRAINABLE_LAYERS if trainable_layers is None else int(trainable_layers),
        max_length=int(max_length), device=_training_device(args))


# TrainingArguments fields that do not change what a Trainer learns: where and how it reports and saves
_NOT_TRAINING = ("output_dir", "logging_", "save_", "report_to", "run_name", "disable_tqdm", "push_to_hub",
                 "hub_", "overwrite_output_dir", "resume_from_checkpoint", "eval_", "do_eval", "do_predict",
                 "per_device_eval_batch_size", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
                 "local_rank", "log_", "skip_memory_metrics", "dataloader_num_workers", "dataloader_p", "ddp_timeout",
                 "trackio_", "project", "debug", "batch_eval_metrics", "include_")


FINETUNE_READS = ("seed", "data_seed", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
                  "warmup_steps", "weight_decay", "use_cpu")
"""The training fields MiniLM's fine-tuning reads (`finetune_settings`)."""


def ignored_training_flags(args: InfluenceArguments) -> list[str]:
    """``name=value`` of the training fields of ``args`` set away from `TrainingArguments`' defaults that MiniLM's
    fine-tuning does not read (`FINETUNE_READS`): ``--max_steps 3`` or ``--optim sgd`` were accepted and silently
    ignored, the cached model the same."""
    baseline = TrainingArguments(output_dir=args.output_dir).to_dict()
    return [f"{k}={v!r}" for k, v in args.to_dict().items()
            if not k.startswith(("influence_", *_NOT_TRAINING)) and k not in FINETUNE_READS and k in baseline
            and baseline[k] != v]


def training_settings(args: InfluenceArguments, kind: str | None = None) -> dict:
    """What the embedded model of ``kind`` trained with ``args`` depends on (a build reuses a model only when these
    are equal): MiniLM's `FinetuneSettings` (its fine-tuning cache key), or for the tiny model every training field of
    ``args`` but those that only say where and how the Trainer reports and saves; and for both the model copies
    trained at once (`training_replicas`: a build under 2 processes trained other weights)."""
    if embedded_kind(kind).name == "minilm":
        settings = dataclasses.asdict(finetune_settings(args))
        return settings | {"replicas": training_replicas(settings["device"])}
    return {k: v for k, v in args.to_dict().items() if not k.startswith("influence_")
            and not k.startswith(_NOT_TRAINING)} | {"replicas": training_replicas(_training_device(args))}


def _training_device(args: TrainingArguments) -> str:
    """Where a Trainer with ``args`` trains: ``"cuda"`` or ``"cpu"``."""
    return "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"


def train_embedded_model(raw_train: Dataset, tokenized_train: Dataset, tokenizer: PreTrainedTokenizerBase,
                         args: InfluenceArguments, *, kind: str | None = None, trainable_layers: int | None = None,
                         max_length: int = NLI_MAX_LENGTH, description: dict | None = None) -> tuple[nn.Module, dict]:
    """``(model, info)``: the embedded model of ``kind`` trained on the given rows with ``args``' training fields.

    MiniLM comes from the content-keyed fine-tuning cache (`hf_fastif.minilm_default.cached_finetune_minilm`), its
    last ``trainable_layers`` layers fine-tuned (``info``: ``cached``, ``folder``, ``key``, ``train_accuracy``,
    ``train_seconds``); the tiny model is trained from scratch, every layer, with an `InfluenceTrainer` (``info``:
    ``train_seconds``). The model is returned in eval mode.
    """
    settings = embedded_kind(kind)
    if settings.name == "minilm":
        ignored = ignored_training_flags(args)
        if ignored:
            smoothing = any(flag.startswith("label_smoothing_factor=") for flag in ignored)
            logger.warning(f"MiniLM's fine-tuning reads only {', '.join(FINETUNE_READS)}; {', '.join(ignored)} "
                           "change nothing in the model (the cached one is used as it is)"
                           + (", though influence's loss takes the label smoothing: the influence is then of a "
                              "smoothed loss the model was not trained on" if smoothing else "") + ".")
        found = cached_finetune_minilm(raw_train, finetune_settings(args, trainable_layers, max_length),
                                       description=description)
        report = found.manifest.get("report", {})
        info = {"cached": found.cached, "folder": str(found.folder), "key": found.manifest["key"],
                "train_accuracy": report.get("train_accuracy"), "train_seconds": report.get("train_seconds")}
        return found.model.to(args.device).eval(), info
    if trainable_layers is not None:
        raise ValueError("trainable_layers applies to the MiniLM default; freeze the tiny model before training it.")
    model = embedded_model(tokenizer, seed=args.seed, kind="tiny")
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=tokenized_train, processing_class=tokenizer)
    result = trainer.train()
    return trainer.model.eval(), {"cached": False, "train_seconds": result.metrics.get("train_runtime")}


def train_embedded(output_dir: str = "outputs/embedded", seed: int = 0, epochs: float | None = None,
                   data: tuple | None = None, *, args: InfluenceArguments | None = None, kind: str | None = None,
                   **influence) -> tuple[InfluenceTrainer, DatasetDict, DatasetDict]:
    """The trained embedded model of ``kind`` in an `InfluenceTrainer`; returns ``(trainer, raw, tokenized)``.

    Args:
        output_dir / seed / epochs / influence: build the settings with `embedded_arguments` (ignored when
            ``args`` is given).
        data: ``(raw, tokenized, tokenizer)`` from `embedded_data` of the same kind (default: generated with
            ``args.seed``).
        args: the training and influence settings as they are, e.g. parsed from a command line.
        kind: ``"minilm"`` (default: fine-tuned once, then loaded from the cache) or ``"tiny"`` (trained here).
    """
    if args is None:
        epochs_ = {} if epochs is None else {"num_train_epochs": epochs}
        args = embedded_arguments(output_dir, kind=kind, seed=seed, **epochs_, **influence)
    raw, tokenized, tokenizer = data or embedded_data(seed=args.seed, kind=kind)
    model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=kind,
                                       description=data_description(args.seed, len(raw["train"])))
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=tokenized["train"], processing_class=tokenizer)
    logger.info(f"Embedded {kind or DEFAULT_KIND} model ready: {info}")
    return trainer, raw, tokenized
