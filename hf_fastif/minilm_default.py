"""The pretrained embedded default: all-MiniLM-L6-v2 (`hf_fastif.pretrained`) fine-tuned on generated NLI.

Fine-tuning follows the paper (FastIF, Sec. 3): a 2-label sequence-classification head (entailment /
non_entailment) on the pretrained encoder, with the embeddings and the lower layers frozen and only the last
`trainable_layers` layer(s), the pooler and the classifier trained; those same parameters are the ones
influence is computed over (`minilm_influence_params`).

`cached_finetune_minilm` keeps fine-tuned models on disk, keyed by content (MiniLM's revision and file hashes,
the tokenized training rows, every training setting, the fine-tuning code's version and the torch /
transformers versions), so the demo, the CLI and the Space fine-tune once per machine and a folder made for
other settings is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from safetensors import SafetensorError
from transformers import BertForSequenceClassification, BertTokenizer, DataCollatorWithPadding, set_seed
from transformers.utils import logging

from .arguments import InfluenceArguments
from .cache import CACHE_ENV, cache_root, cache_write_error, mark_used, remove_stale_staging
from .data import NLI2_LABELS, NLI_MAX_LENGTH, tokenize_nli
from .distributed import barrier, is_main_process, together, training_replicas, world
from .fingerprint import dataset_fingerprint
from .mode import evaluating
from .pretrained import (
    MINILM_FILES,
    MINILM_REPO_ID,
    MINILM_REVISION,
    load_minilm_for_sequence_classification,
    load_minilm_tokenizer,
    minilm_path,
    verify_minilm_files,
)
from .trainer import InfluenceTrainer
from .utils import file_digest, to_json, write_atomic

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
                    max_length: int = NLI_MAX_LENGTH, save: bool = True, minilm_folder: str | os.PathLike | None = None,
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


# ---- the content-keyed cache of fine-tuned models ---------------------------------------------------------
FINETUNE_CODE_VERSION = 2
"""Version of the fine-tuning code (`finetune_minilm`); bump it whenever training changes, so models cached by the
old code are not reused. 2: under a launch the Trainer no longer multiplies the classifier's loss by the number of
processes (`InfluenceTrainer.compute_loss`; gradient clipping saw 2x the gradient)."""
FINETUNE_CACHE_SUBDIR = "minilm-nli"
MANIFEST_NAME = "hf_fastif_finetune.json"
"""The manifest of a cached model: its cache key, everything the key hashes, each file's sha256, and a report."""
_TOKEN_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels")


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How MiniLM is fine-tuned (`finetune_minilm`'s arguments); every field is part of the cache key."""

    seed: int = 0
    data_seed: int | None = None
    trainable_layers: int = 2
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = NLI_MAX_LENGTH
    device: str = "cpu"

    def __post_init__(self):
        _check_trainable_layers(self.trainable_layers)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")
        if not self.epochs > 0 or not self.lr > 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError(f"epochs and lr must be > 0, batch_size >= 1 and max_length >= 8; got {self}.")


@dataclasses.dataclass
class FinetunedMiniLM:
    """A fine-tuned MiniLM from the cache: the model (frozen as trained, eval mode), its tokenizer, the cache folder,
    its manifest (key, settings, file hashes, ``report`` with the training accuracy) and whether it was found in the
    cache (``cached``) or trained now."""

    model: BertForSequenceClassification
    tokenizer: BertTokenizer
    folder: Path
    manifest: dict
    cached: bool


def finetune_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir or $HF_FASTIF_CACHE or ~/.cache/hf_fastif>/minilm-nli``."""
    return cache_root(cache_dir) / FINETUNE_CACHE_SUBDIR


FINETUNE_KEY_FIELDS = ("base", "data", "settings", "replicas", "code_version", "torch", "transformers")
"""What `finetune_key`'s content holds; a cached model whose manifest lacks one can never match again
(`hf_fastif.cache` lists it as unusable)."""


def finetune_key(train_tokenized: Dataset, settings: FinetuneSettings) -> tuple[str, dict]:
    """``(key, content)``: the sha256 of ``content``, which holds what a fine-tuned model depends on: MiniLM's
    revision and the sha256 of its files, the tokenized training rows (ids, masks and labels, hashed by value: the
    data's seed, sizes and tokenization), `FinetuneSettings` (but ``max_length``, whose only effect is on the
    tokenized rows), the model copies trained at once (`training_replicas`: processes, GPUs), `FINETUNE_CODE_VERSION`
    and the torch / transformers versions."""
    columns = [c for c in _TOKEN_COLUMNS if c in train_tokenized.column_names]
    content = {
        "base": {"repo": MINILM_REPO_ID, "revision": MINILM_REVISION,
                 "files": {name: f.sha256 for name, f in MINILM_FILES.items()}},
        "data": {"fingerprint": dataset_fingerprint(train_tokenized, columns), "rows": len(train_tokenized),
                 "columns": columns},
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "max_length"},
        "replicas": training_replicas(settings.device),
        "code_version": FINETUNE_CODE_VERSION,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    content = json.loads(to_json(content))  # the form the manifest stores, so the two compare equal
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(), content


def _file_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            hashes[path.name] = file_digest(path, hashlib.sha256)
    return hashes


def cache_problems(folder: str | os.PathLike, key: str, content: dict) -> list[str]:
    """Why ``folder`` cannot serve as the cached model for ``(key, content)`` (empty when it can): no manifest, a
    manifest for another key or other settings, or files that are missing, added or changed since it was written."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return [f"{path} is missing (an unfinished or foreign folder)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [f"{path} is unreadable ({error})"]
    problems = []
    if manifest.get("key") != key or manifest.get("content") != content:
        recorded = manifest.get("content") or {}
        differ = sorted(k for k in set(recorded) | set(content) if recorded.get(k) != content.get(k))
        problems.append(f"it was made for other content (key {str(manifest.get('key'))[:16]}…, differing in "
                        f"{', '.join(differ) or 'the key'})")
    expected = manifest.get("files") or {}
    found = _file_hashes(folder)
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            problems.append(f"{name} is missing")
        elif name not in expected:
            problems.append(f"{name} was added after the model was cached")
        elif found[name] != expected[name]:
            problems.append(f"{name} has sha256 {found[name][:16]}…, the manifest {expected[name][:16]}…")
    if not expected:
        problems.append("the manifest lists no files")
    return problems


@torch.no_grad()
def _train_accuracy(model: BertForSequenceClassification, train: Dataset, collator) -> float:
    rows = train.select_columns([c for c in _TOKEN_COLUMNS if c in train.column_names])
    correct = 0
    with evaluating(model):
        for start in range(0, len(rows), 128):
            batch = collator([rows[i] for i in range(start, min(start + 128, len(rows)))])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / max(1, len(rows))


def cached_finetune_minilm(train_dataset_raw: Dataset, settings: FinetuneSettings | None = None, *,
                           cache_dir: str | os.PathLike | None = None, description: dict | None = None,
                           minilm_folder: str | os.PathLike | None = None) -> FinetunedMiniLM:
    """MiniLM fine-tuned on ``train_dataset_raw`` with ``settings``: loaded from the content-keyed cache, or trained
    with `finetune_minilm` and cached.

    The folder is ``<finetune_cache_root(cache_dir)>/<key[:20]>`` (see `finetune_key`). It is used only if its
    manifest records the same key and content and every file still has the sha256 it recorded; otherwise it is
    rebuilt, with a warning saying why. A new model is trained in a private folder and renamed into place when
    complete, so a concurrent reader never sees half a model.

    Args:
        train_dataset_raw: premise / hypothesis / label rows (labels 0 = entailment, 1 = non_entailment).
        settings: the training settings (default `FinetuneSettings()`: last 2 layers, 1 epoch, lr 2e-4).
        cache_dir: the cache root (default ``$HF_FASTIF_CACHE`` or ``~/.cache/hf_fastif``).
        description: what the rows are (e.g. the generator's seed and sizes), recorded in the manifest only.
        minilm_folder: a folder from `minilm_path` (default: ``minilm_path()``); its files are verified (a
            `ValueError` names a file that is not the official one's).
    """
    settings = settings or FinetuneSettings()
    # the key holds the official files' hashes, not the folder's: a folder with other weights (the same tokenizer)
    # was served the model fine-tuned from the official MiniLM, so a folder given is checked as minilm_path checks
    # its own (0.1-0.3 s)
    folder = (verify_minilm_files(minilm_folder, "Pass a folder from hf_fastif.pretrained.minilm_path() (the cache of "
                                  "fine-tuned models is keyed on the official files); fine-tune another checkpoint "
                                  "with finetune_minilm, which caches nothing.")
              if minilm_folder is not None else minilm_path())
    tokenizer = load_minilm_tokenizer(folder)
    tokenized = tokenize_nli(train_dataset_raw, tokenizer, max_length=settings.max_length)
    key, content = finetune_key(tokenized, settings)
    root = finetune_cache_root(cache_dir)
    target = root / key[:20]
    remove_stale_staging(root)
    if target.is_dir():
        problems = cache_problems(target, key, content)
        if not problems:
            manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
            model, tokenizer = load_finetuned_minilm(target)
            mark_used(target / MANIFEST_NAME)
            logger.info(f"Loaded the fine-tuned MiniLM from the cache {target}.")
            return FinetunedMiniLM(model.eval(), tokenizer, target, manifest, cached=True)
        logger.warning(f"The cached model {target} is not used and will be rebuilt: " + "; ".join(problems) + ".")
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    except OSError as err:  # a read-only or full cache: before the minute of training, not after
        raise cache_write_error(root, err) from err
    try:
        start = time.perf_counter()
        trainer = finetune_minilm(
            train_dataset_raw, staging, seed=settings.seed, trainable_layers=settings.trainable_layers,
            epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, max_length=settings.max_length,
            save=False, minilm_folder=folder, warmup_steps=settings.warmup_ratio, weight_decay=settings.weight_decay,
            data_seed=settings.data_seed, use_cpu=settings.device == "cpu")
        seconds = time.perf_counter() - start
        accuracy = _train_accuracy(trainer.model, trainer.train_dataset, DataCollatorWithPadding(tokenizer))
        manifest = {"key": key, "content": content, "files": {}, "description": description or {},
                    "report": {"train_accuracy": accuracy, "train_rows": len(tokenized), "train_seconds": seconds,
                               "train_loss": getattr(trainer.state, "log_history", [{}])[-1].get("train_loss")},
                    "created_by": f"hf_fastif.minilm_default code version {FINETUNE_CODE_VERSION}"}
        def save() -> None:
            trainer.save_model(str(staging))  # under `accelerate launch` the Trainer saves on the main process only
            if is_main_process():
                (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle the Trainer saves; nothing reads
                for path in staging.iterdir():
                    os.chmod(path, 0o644)  # the cache may be shared
                manifest["files"] = _file_hashes(staging)
                write_atomic(staging / MANIFEST_NAME, to_json(manifest, indent=2))
                os.chmod(staging, 0o755)  # mkdtemp makes it private
                _install(staging, target, key, content)

        try:
            # a failure in the main process (a full disk) stops every process of a launch with its error; the others
            # waited in the barrier below for a model that never came
            together(save, f"Caching the fine-tuned MiniLM in {target} (${CACHE_ENV})")
        except (OSError, SafetensorError) as err:  # a full disk: safetensors raises its own error, not an OSError
            if world()[1] > 1:  # the other processes read the model from the cache
                raise cache_write_error(target, err) from err
            logger.warning(f"Could not cache the fine-tuned MiniLM in {target} ({err}); going on with the model in "
                           f"memory, uncached (it is trained again next time). Free space there (the cached model "
                           f"takes about 90 MB; `hf-fastif cache` lists what the cache holds), or set {CACHE_ENV} "
                           "to a folder with room.")
            manifest["not_cached"] = str(err)
            return FinetunedMiniLM(trainer.model.eval(), tokenizer, target, manifest, cached=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()  # the other processes of a launch read the model the main process installed
    logger.info(f"Fine-tuned MiniLM in {seconds:.0f}s (training accuracy {accuracy:.1%}); cached in {target}.")
    model, tokenizer = load_finetuned_minilm(target)
    manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    return FinetunedMiniLM(model.eval(), tokenizer, target, manifest, cached=False)


def _install(staging: Path, target: Path, key: str, content: dict) -> None:
    """Rename the finished ``staging`` folder to ``target``; a valid ``target`` written meanwhile by another process
    is kept, an invalid one is moved aside and removed."""
    if target.exists():
        if not cache_problems(target, key, content):
            return
        aside = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target.exists() and not cache_problems(target, key, content)):
            raise


__all__ = [
    "FINETUNE_CODE_VERSION",
    "FinetuneSettings",
    "FinetunedMiniLM",
    "MINILM_NUM_LAYERS",
    "cache_problems",
    "cached_finetune_minilm",
    "finetune_cache_root",
    "finetune_key",
    "finetune_minilm",
    "freeze_minilm",
    "load_finetuned_minilm",
    "minilm_arguments",
    "minilm_influence_params",
]
