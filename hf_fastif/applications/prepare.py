"""What every application recipe starts from: a trained NLI model, its training rows and a HANS validation /
test split, either the embedded default (offline, CPU-sized; hf_fastif.embedded) or the paper's setup
(bert-base-cased on MNLI-2, official HANS).

A recipe parses ``(ModelDataArguments, <its protocol>, InfluenceArguments)`` with `parse_recipe`: the flags
are the dataclasses' fields, and flags the command line does not give take the chosen setup's defaults (the
embedded default's or the paper's). Data are loaded and checked before any model is built or trained, so a
bad file fails in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.file_download import _CACHED_NO_EXIST
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorWithPadding,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.utils import cached_file, logging

from .. import distributed as D
from ..arguments import InfluenceArguments
from ..batches import usable_positions
from ..data import (
    generate_nli,
    label_names,
    load_hans,
    load_mnli,
    split_hans,
    tokenize_nli,
)
from ..data.loaders import hub_offline
from ..data.tokenization import MODEL_MAX_LENGTH, check_min_max_length, resolve_max_length
from ..embedded import (
    DEFAULT_KIND,
    KINDS,
    QUICK_KIND,
    TINY_CONFIG,
    data_description,
    embedded_defaults,
    embedded_kind,
    embedded_model,
    embedded_tokenizer,
    finetune_settings,
    minilm_description,
    train_embedded_model,
)
from ..parsing import (
    check_flags,
    check_output_flag,
    check_positive_counts,
    flag_given,
    flag_refusals,
    parse_arguments,
)
from ..trainer import InfluenceTrainer
from ..utils import check_output_dir, pin_memory_default
from .common import ApplicationData, check_num_labels, heuristics_in, model_report

logger = logging.get_logger(__name__)

PAPER_TRAINING: dict = dict(num_train_epochs=3.0, learning_rate=2e-5, per_device_train_batch_size=32,
                            save_strategy="no", logging_strategy="steps", logging_steps=200, report_to="none")
"""Fine-tuning of a pretrained model as in the paper (3 epochs at lr 2e-5, batch 32)."""
PAPER_INFLUENCE: dict = dict(influence_params=None, influence_knn_k=1000, influence_damping=5e-3,
                             influence_scale=1e6, influence_recursion_depth=1000, influence_batch_size=1,
                             influence_repetitions=4, influence_weight_decay=0.005,
                             influence_weight_decay_in_gradients=True, influence_check_convergence=True)
"""The paper's HANS settings (FASTIF.md): λ = 5e-3 × 1e6 = 5000, FastIF's LiSSA (B 1, J 1000, T 4), k 1000, the
reference code's L2 term, in every loss as there; influence over every parameter left trainable."""
PAPER_SETUP: dict = dict(trainable_layers=2)
"""The paper freezes bert-base's embeddings and layers 0-9: the last 2 layers, the pooler and the classifier train."""
RECIPE_DEFAULTS: dict = dict(seed=0)
"""Both setups: seed 0 for data, model, splits and replicas."""
QUICK: dict = dict(max_train_samples=600, num_train_epochs=3.0, influence_knn_k=200, influence_recursion_depth=10)
"""``--quick``, with each protocol's ``QUICK``: a smoke-test size (not a measurement); 3 epochs, as 1 left the tiny
model predicting one class (every HANS cell 50.0, every change +0.0: a smoke run could not show a sign error)."""

FINE_TUNE = ("auto", "always", "never")


@dataclass
class ModelDataArguments:
    """The model and data of an application recipe. Leave everything unset for the embedded default."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A local checkpoint directory or a Hub id (e.g. bert-base-cased). A sequence-classification "
                "checkpoint is used as is (no training); a base model is fine-tuned first. Unset: the embedded "
                "default (--embedded_model: pretrained MiniLM fine-tuned on generated data, offline), whose defaults "
                "for every other flag differ from the paper's (see docs/applications.md)."})
    embedded_model: str | None = field(default=None, metadata={
        "help": f"The embedded default's model when --model_name_or_path is unset: {' or '.join(KINDS)}. Unset: "
                f"{DEFAULT_KIND} (all-MiniLM-L6-v2 fine-tuned once and cached in $HF_FASTIF_CACHE), or {QUICK_KIND} "
                "with --quick (a 2-layer BERT from a config, trained in seconds)."})
    train_dataset: str | None = field(default=None, metadata={
        "help": "Training data: a Hub id (nyu-mll/multi_nli) or a local MNLI-format file. Unset: generated."})
    train_split: str = field(default="train", metadata={"help": "Hub split of --train_dataset."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Training rows: a seeded random subset of this many rows of --train_dataset, or this many "
                "generated rows (default 3000). Used for influence and fine-tuning."})
    num_labels: int = field(default=2, metadata={"help": "2 (MNLI-2: entailment / non_entailment) or 3."})
    hans_file: str | None = field(default=None, metadata={
        "help": "HANS: the official heuristics_evaluation_set.txt, a parquet/jsonl copy of the Hub's hans, or a "
                "Hub id. Unset: the generated HANS-style split."})
    hans_split: str = field(default="validation", metadata={"help": "Hub split of --hans_file."})
    validation_fraction: float = field(default=0.5, metadata={
        "help": "Share of each HANS subcase used for anchors (validation); the rest is the held-out test split."})
    max_length: int | None = field(default=None, metadata={
        "help": f"Token limit of a premise/hypothesis pair, at most the model's positions. Unset: {MODEL_MAX_LENGTH}, "
                "or the model's positions if fewer."})
    fine_tune: str = field(default="auto", metadata={
        "help": "auto: fine-tune unless the checkpoint already is a sequence classifier; always; never. "
                "Fine-tuning uses --num_train_epochs, --learning_rate, --per_device_train_batch_size."})
    trainable_layers: int | None = field(default=None, metadata={
        "help": "Train (and take influence over) only the last N encoder layers, the pooler and the classifier; "
                "unset: every layer. Default: 2 for a pretrained model (the paper: bert-base layers 10-11) and for "
                "the embedded MiniLM (whose influence parameters are --influence_params: its pooler and classifier); "
                "the tiny embedded model trains every layer and takes influence over its last layer."})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads (default: 1 for the embedded models, measured faster on a shared 2-core machine; "
                "else torch's)."})
    quick: bool = field(default=False, metadata={
        "help": f"Smoke run (not a measurement): {QUICK['max_train_samples']} training rows, "
                f"{QUICK['num_train_epochs']:g} epochs, k {QUICK['influence_knn_k']} (simulatability: every row), J "
                f"{QUICK['influence_recursion_depth']}, and a smaller protocol. Flags given still win."})

    def __post_init__(self):
        if self.fine_tune not in FINE_TUNE:
            raise ValueError(f"--fine_tune must be one of {', '.join(FINE_TUNE)}, got {self.fine_tune!r}.")
        label_names(self.num_labels)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        check_min_max_length(self.max_length)
        check_positive_counts(self, "num_threads", "max_train_samples")
        if self.trainable_layers is not None and self.trainable_layers < 0:  # (-1 ran as 0)
            raise ValueError(f"--trainable_layers must be at least 0 (0: only the pooler and the classifier), got "
                             f"{self.trainable_layers}.")
        if self.model_name_or_path is None and self.num_labels != 2:  # the tiny model crashed in its first step
            raise ValueError(f"--num_labels {self.num_labels}: the embedded models (minilm, tiny) have 2 labels "
                             "(MNLI-2: entailment / non_entailment). For 3 labels pass --model_name_or_path (a 3-label "
                             "checkpoint, or a base model to fine-tune) with --train_dataset.")
        if self.embedded_model is not None:
            embedded_kind(self.embedded_model)
            if self.model_name_or_path is not None:
                raise ValueError("--embedded_model chooses the embedded default, which runs without "
                                 "--model_name_or_path; drop one of them.")

    @property
    def embedded(self) -> bool:
        return self.model_name_or_path is None

    @property
    def kind(self) -> str | None:
        """The embedded model (``minilm`` or ``tiny``), or None for a given checkpoint."""
        return None if not self.embedded else chosen_kind(self.embedded_model, self.quick)


def chosen_kind(embedded_model: str | None, quick: bool) -> str:
    """``--embedded_model`` if given, else the tiny model for ``--quick`` and MiniLM otherwise."""
    return embedded_model or (QUICK_KIND if quick else DEFAULT_KIND)


@dataclass
class Setup:
    """A trained model and its data, ready for an application."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    args: InfluenceArguments
    data: ApplicationData
    pool: Dataset | None
    """The generated pool (tokenized) where the data are generated, for augmentation's ``--pool generated``."""
    data_args: ModelDataArguments
    description: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    """The trained model's accuracy: training rows and HANS (overall, per heuristic and label, per subcase)."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        """``embedded`` or ``paper``."""
        return self.description.get("setup", "embedded" if self.data_args.embedded else "paper")

    def seconds(self) -> float:
        """Seconds since `prepare` began."""
        return time.perf_counter() - self.started


def recipe_defaults(name: str, protocols: Sequence[type] = (),
                    argv: Sequence[str] | None = None) -> Callable[[argparse.Namespace], dict]:
    """The defaults of a recipe's flags as a function of a first parse (see `hf_fastif.parsing`): the embedded
    default's settings for ``name`` (hf_fastif.embedded) or the paper's, then ``--quick``'s sizes. Under a launch
    the setup's batch is split over the processes, with a warning where they do not divide it and ``argv`` (the
    command line, default ``sys.argv[1:]``) does not give ``--per_device_train_batch_size``."""

    def defaults(first: argparse.Namespace) -> dict:
        out = RECIPE_DEFAULTS | {"output_dir": f"outputs/{name}", "dataloader_pin_memory": pin_memory_default()}
        if first.model_name_or_path is None:
            kind = chosen_kind(first.embedded_model, first.quick)
            out |= embedded_defaults(name, kind)
            if kind == "tiny" and first.trainable_layers is not None:  # influence over what trains, as the paper
                out["influence_params"] = None
        else:
            out |= PAPER_TRAINING | PAPER_INFLUENCE | PAPER_SETUP
            for protocol in protocols:
                out |= getattr(protocol, "PAPER_INFLUENCE", {})
        if first.quick:
            out |= QUICK
            for protocol in protocols:
                out |= getattr(protocol, "QUICK", {})
        processes = D.world()[1]
        if processes > 1 and "per_device_train_batch_size" in out:  # the setup's batch is the optimizer's: each
            # process takes its share (2 processes of 32 rows each took half the steps, and --quick's tiny model
            # predicted one class: every HANS cell 50.0)
            batch = out["per_device_train_batch_size"]
            out["per_device_train_batch_size"] = share = max(1, batch // processes)
            given = flag_given(sys.argv[1:] if argv is None else argv, "--per_device_train_batch_size")
            # (3 processes stepped on 30 rows, 64 on 64, without a word)
            if share * processes != batch and not given and D.is_main_process():
                logger.warning(
                    f"The setup's batch of {batch} rows does not split evenly over {processes} processes: each takes "
                    f"{share}, so the optimizer steps on {share * processes} rows, not {batch}. Launch a number of "
                    f"processes that divides {batch}, or give --per_device_train_batch_size (each process's rows) to "
                    "choose.")
        return out

    return defaults


def parse_recipe(name: str, protocols: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """``(ModelDataArguments, *protocols, InfluenceArguments)`` from the command line of recipe ``name``
    (``recipes/<name>.py``; results go to ``outputs/<name>`` unless ``--output_dir`` says otherwise)."""
    parsed = parse_arguments((ModelDataArguments, *protocols, InfluenceArguments), argv,
                             recipe_defaults(name, protocols, argv))
    check_output_flag(parsed[-1].output_dir, argv)  # an existing file: refused now, not when the results are written
    # flags the embedded default cannot take: one line on the command line too (a traceback, after loading)
    check_flags(lambda: _check_embedded_flags(parsed[0], parsed[-1]), argv)
    return parsed


def configure_threads(data_args: ModelDataArguments) -> None:
    if data_args.num_threads is not None:
        torch.set_num_threads(data_args.num_threads)


def resolve_model(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                  remote_code_flag: str | None = "--trust_remote_code") -> str:
    """A local checkpoint directory or a Hub id (at ``revision``) that can be loaded; a `ValueError` naming the fix
    otherwise (transformers' own says "We couldn't connect to 'https://huggingface.co'..." for a mistyped folder).
    A checkpoint that names its own code for a sequence classifier (``auto_map``) is refused unless
    ``trust_remote_code``: `refuse_own_code`; ``remote_code_flag`` is the caller's flag that allows it (None: there is none)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(f"{str(path)!r} is not a model checkpoint (a directory with config.json); pass a "
                             "directory written by model.save_pretrained(...) or a Hub model id.")
        name_or_path = str(path)
    else:
        try:
            AutoConfig.from_pretrained(name_or_path, revision=revision,  # the local cache, or the Hub when online
                                       trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            if hub_offline():
                raise ValueError(
                    f"{name_or_path!r} is not a local directory, so it would come from the Hugging Face Hub, but the "
                    "Hub is offline (HF_HUB_OFFLINE) and it is not in the local cache. Pass a local checkpoint "
                    "directory (model.save_pretrained(dir) and tokenizer.save_pretrained(dir)), or go online and "
                    "unset HF_HUB_OFFLINE."
                ) from None  # (the Hub client's own error, chained, was a traceback about repo-id syntax or the network)
            raise ValueError(f"Could not load the model {name_or_path!r} ({err}). Pass a local checkpoint directory or "
                             "a Hub model id such as 'bert-base-cased'.") from err
    refuse_own_code(name_or_path, revision, trust_remote_code, remote_code_flag)
    return name_or_path


def refuse_own_code(name_or_path: str, revision: str | None, trust_remote_code: bool, remote_code_flag: str | None,
                    auto_class: str = "AutoModelForSequenceClassification") -> None:
    """Refuse a checkpoint that names its own code, in ``auto_map``, for ``auto_class`` (in config.json: the class
    every caller here loads with) or for ``AutoTokenizer`` (in tokenizer_config.json, where transformers reads it),
    unless ``trust_remote_code``: without it transformers loads its built-in class instead without a word where the
    ``model_type`` (the ``tokenizer_class``) is one it knows, which may not be the model that was trained (another head
    or forward) or the tokens it was trained on, and every influence would be of that one (a review: a folder whose
    tokenizer code sat beside it loaded as a plain BertTokenizer). An ``auto_map`` that names other classes only (a
    config, a causal LM's: Phi-3's, kept by ``save_pretrained`` in a model fine-tuned from it with transformers' own
    class) is no reason: the class loaded is the built-in one either way; nor is a folder or Hub repo without the code
    it names (``--trust_remote_code`` could not run it, and a model or tokenizer saved from such a class has its code
    copied beside it: `_code_there`)."""
    if trust_remote_code:
        return
    where = Path(name_or_path).expanduser()
    for file, names_for, kind in (("config.json", auto_class, "model"),
                                  ("tokenizer_config.json", "AutoTokenizer", "tokenizer")):
        own = _named_code(name_or_path, revision, file, names_for)
        if own is None:
            continue
        if not any(_code_there(name_or_path, where, n, revision) for n in own):
            # (its code is not there to run: a model fine-tuned with transformers' own class from a base whose config
            # names its code, as falcon's did, keeps that auto_map through save_pretrained; the built-in class is it)
            logger.info(f"{name_or_path!r} names {' / '.join(own)} for {names_for} in {file}, but that code is not "
                        "there: transformers' built-in class is loaded, as without trust_remote_code.")
            continue
        allow = (f"Pass {remote_code_flag} to run the checkpoint's code (only code you trust)" if remote_code_flag else
                 "hf_fastif's recipes and Space do not run a checkpoint's own code: load the model and tokenizer "
                 "yourself and use the Python API (hf_fastif.compute_influences, InfluenceTrainer)")
        raise ValueError(
            f"{name_or_path!r} names its own code for {names_for} in {file} (auto_map: {' / '.join(own)}). Without "
            f"trust_remote_code, transformers would load its built-in {kind} class instead where it has one, without "
            "an error, and that may not be the "
            + ("model that was trained" if kind == "model" else "tokenizer the model was trained with") + ". "
            f"{allow}; or, to use transformers' built-in class on purpose, save a copy of the checkpoint whose {file} "
            f"has no {names_for} entry in auto_map" + (" (its auto_map is the older list form: remove auto_map)"
                                                        if isinstance(_auto_map(name_or_path, revision, file), list)
                                                        else "") + ".")


def _auto_map(name_or_path: str, revision: str | None, file: str):
    """``file``'s ``auto_map`` (config.json or tokenizer_config.json), or None where it has none or cannot be read
    (the loading's own error follows; a file that is not a JSON object: a review's list crashed the check)."""
    try:
        config = (PreTrainedConfig.get_config_dict(name_or_path, revision=revision)[0] if file == "config.json"
                  else get_tokenizer_config(name_or_path, revision=revision))
    except (OSError, ValueError):
        return None
    return config.get("auto_map") if isinstance(config, dict) else None


def _code_there(name_or_path: str, where: Path, named: str, revision: str | None) -> bool:
    """Whether the module an ``auto_map`` entry names is there to run: in the local folder, or in the Hub repo of
    ``name_or_path``, or in another repo (``repo--module.Class``, taken as there). A tokenizer loaded without
    trust_remote_code and saved again keeps its auto_map without the code (a review), as a model fine-tuned with
    transformers' own class from a base naming its code does. A Hub repo's module counts as absent only where the
    Hub says so (now, or as the cache recorded it): offline, or where the Hub cannot be asked, one the cache lacks
    counts as there (a cache holding only a repo's config and weights would load the built-in class unsaid)."""
    if "--" in named:
        return True
    module = f"{named.rpartition('.')[0]}.py"
    if where.is_dir():
        return (where / module).is_file()
    cached = try_to_load_from_cache(name_or_path, module, revision=revision)
    if isinstance(cached, str) or cached is _CACHED_NO_EXIST:
        return isinstance(cached, str)
    if hub_offline():
        return True
    try:
        return cached_file(name_or_path, module, revision=revision,
                           _raise_exceptions_for_missing_entries=False) is not None
    except (OSError, ValueError):  # (the Hub could not be asked: counted as there, as offline)
        return True


def _named_code(name_or_path: str, revision: str | None, file: str, auto_class: str) -> list[str] | None:
    """The classes ``file``'s ``auto_map`` names for ``auto_class`` (a tokenizer's slow / fast pair, or the legacy
    list of a tokenizer_config.json, its missing half left out); None where none is named."""
    own = _auto_map(name_or_path, revision, file)
    named = own.get(auto_class) if isinstance(own, dict) else own if file != "config.json" else None
    named = [n for n in (named if isinstance(named, (list, tuple)) else [named]) if isinstance(n, str) and n]
    return named or None


def is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def config_positions(config: PreTrainedConfig) -> int | None:
    """The positions a row of a sequence classifier built from ``config`` may take, as ``hf-fastif build`` counts
    them (`hf_fastif.batches.usable_positions`: RoBERTa's table numbers from its pad id + 1), read from the model
    built on the meta device (no weights are loaded); None where there is no limit (XLNet's relative positions)."""
    try:
        with torch.device("meta"):
            positions = usable_positions(AutoModelForSequenceClassification.from_config(config))
    except Exception:  # an architecture without a sequence-classification class: the config's own number
        positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def _model_config(data_args: ModelDataArguments, checkpoint) -> PreTrainedConfig:
    """The config of the model the recipe will use: the checkpoint's, or the embedded model's."""
    if checkpoint is not None:
        return checkpoint[1]
    if data_args.kind == "minilm":
        from ..pretrained import minilm_path

        return AutoConfig.from_pretrained(minilm_path())
    return BertConfig(num_labels=2, **TINY_CONFIG)


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\.")


_EMBEDDING = re.compile(r"embed|(?:^|_)emb(?:_|$)|^project_in$")
"""A module or parameter name (its last part) on the input side: ``embeddings``, ``embed_tokens``, XLNet's
``word_embedding`` and ``mask_emb``, ELECTRA's ``embeddings_project``, OPT's ``project_in`` (embeddings → hidden)."""


_ATTENTION_TABLE = re.compile(r"relative_attention_bias")
"""An embedding table every layer's attention reads (MPNet's ``encoder.relative_attention_bias``): part of the
layers that stay trainable, not of the input side."""


def input_side(model: nn.Module) -> set[str]:
    """Names of the parameters below the layers: the input embeddings (``model.get_input_embeddings()``) and, where
    they sit in a module of their own (BERT's ``embeddings``: positions, token types, LayerNorm), that whole module;
    every embedding table (GPT-2's ``wpe``, OPT's ``embed_positions``); and modules or parameters named as embeddings
    (`_EMBEDDING`). Not the final norm, the pooler or the head. Parameters inside numbered layers are left to the
    caller (XLNet's per-layer ``seg_embed`` belongs to its layer)."""
    modules = [module for name, module in model.named_modules()
               if (isinstance(module, nn.Embedding) or _EMBEDDING.search(name.rpartition(".")[2]))
               and not _ATTENTION_TABLE.search(name)]
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if isinstance(embeddings, nn.Module):
        modules.append(embeddings)
        name = next((n for n, module in model.named_modules() if module is embeddings), None)
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        if parent is not None and parent is not model and not any(
                _LAYER.search(n) for n, _ in parent.named_parameters()):
            modules.append(parent)  # an embeddings module of its own, holding no layer
    ids = {id(p) for module in modules for p in module.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids or _EMBEDDING.search(n.rpartition(".")[2])}


def freeze_lower_layers(model: nn.Module, trainable_layers: int) -> list[str]:
    """Freeze the embeddings and all but the last ``trainable_layers`` layers (the paper freezes bert-base's
    embeddings and layers 0-9); return the names that stay trainable: the last layers and what lies above them
    (the final norm, the pooler, the head). The embeddings are the input side of every architecture (`input_side`:
    GPT-2's ``wte`` / ``wpe``, OPT's ``embed_tokens`` / ``embed_positions``, XLNet's ``word_embedding`` /
    ``mask_emb``), not only modules named ``embeddings`` (BERT's), which left the others' trainable."""
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER.search(n))]
    if not indices:
        raise ValueError(f"Cannot find numbered layers in {type(model).__name__}'s parameter names; pass "
                         "--trainable_layers only for encoder models (BERT-like).")
    layers = max(indices) + 1
    if not 0 <= trainable_layers <= layers:  # (100 trained every layer, the embeddings still frozen, without a word)
        raise ValueError(f"--trainable_layers {trainable_layers}: {type(model).__name__} has {layers} layers; pass 0 to "
                         f"{layers} (or leave it unset to train every layer and the embeddings).")
    first = layers - trainable_layers
    below = input_side(model)
    trainable = []
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        keep = (m is not None and int(m.group(1)) >= first) or (m is None and name not in below)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def _subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    return dataset.select(np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n]))


def load_data(data_args: ModelDataArguments, seed: int) -> dict[str, Dataset | None]:
    """Raw (untokenized) ``train``, ``hans`` and ``pool`` (pool: the generated one when training data are
    generated, else None). Bad files fail here, before any model is built."""
    generated = None
    if data_args.train_dataset is None or data_args.hans_file is None:
        sizes = embedded_kind(data_args.kind or DEFAULT_KIND).data
        n_train = data_args.max_train_samples if data_args.train_dataset is None else None
        generated = generate_nli(seed=seed, **(sizes | {"n_train": n_train or sizes["n_train"]}))
    if data_args.train_dataset is None:
        if data_args.num_labels != 2:
            raise ValueError("The generated training data have 2 labels; pass --num_labels 2 or --train_dataset.")
        train = generated["train"]
    else:
        train = _subsample(load_mnli(data_args.train_dataset, split=data_args.train_split,
                                     num_labels=data_args.num_labels), data_args.max_train_samples, seed)
    hans = generated["hans"] if data_args.hans_file is None else load_hans(data_args.hans_file,
                                                                           split=data_args.hans_split)
    return {"train": train, "hans": hans, "pool": generated["pool"] if data_args.train_dataset is None else None}


def prepare(data_args: ModelDataArguments, args: InfluenceArguments, *, required_labels: tuple[int, ...] = (2,),
            what: str = "This application", heuristics: Sequence[str] | None = None,
            heuristic_splits: Sequence[str] = (), num_anchors: int | None = None,
            checks: Callable[[Setup], None] | None = None, argv: Sequence[str] | None = ()) -> Setup:
    """Check the model and the data, then load or train the model; return everything an application needs.

    Cheap checks come first (label counts, the checkpoint can be found, the data files parse), so bad input
    fails before any training: on the real command line (``argv`` None, as a recipe's ``main`` has it) as one line
    and exit status 2, as a bad flag's parse (a missing simulator folder printed a traceback and exited with 1);
    otherwise raised.

    Args:
        data_args: the recipe's model and data flags.
        args: training (when the model is trained here) and influence settings, used as they are; a model
            fine-tuned here is saved to ``<args.output_dir>/model``.
        required_labels: label counts the application accepts (HANS correction: 2).
        what: the application's name, for error messages.
        heuristics: the heuristics the application will run (None: every heuristic of the first of
            ``heuristic_splits``), checked to have rows in each HANS split of ``heuristic_splits`` (``"validation"``,
            ``"test"``) right after the split, before any model is built or trained.
        heuristic_splits: the HANS splits that need rows of every heuristic (correction and augmentation:
            validation and test; the influence graph: test); empty: no check.
        num_anchors: anchors a step draws from each heuristic's validation rows (correction and augmentation),
            checked to be there before training (it failed after).
        checks: the application's own checks of its settings against the tokenized data, called before any model
            is built or trained with a `Setup` whose ``model`` is None (its ``description`` says only ``setup``,
            ``embedded_model`` and ``trained_here``); they raise a `ValueError` naming the fix.
        argv: the recipe's ``argv`` (None: the real command line).
    """
    started = time.perf_counter()
    with flag_refusals(argv):  # (the checks and what they read, before any model is built or trained)
        configure_threads(data_args)
        if data_args.num_labels not in required_labels:
            raise ValueError(f"{what} needs a {' or '.join(map(str, required_labels))}-label model; got "
                             f"--num_labels {data_args.num_labels}.")
        _check_embedded_flags(data_args, args)
        check_output_dir(args.output_dir)
        checkpoint = None if data_args.embedded else _check_checkpoint(data_args, required_labels, what)
        _check_resume(args.resume_from_checkpoint, checkpoint)
        # --max_length by hf-fastif build's rule, before any data are loaded: at most the model's positions
        data_args = dataclasses.replace(data_args, max_length=resolve_max_length(
            data_args.max_length, config_positions(_model_config(data_args, checkpoint)),
            repr(data_args.model_name_or_path) if checkpoint is not None
            else f"the embedded model ({data_args.kind})"))
        raw = load_data(data_args, args.seed)
        # a fraction that empties a split, or a heuristic missing from a split the application needs: here
        raw_split = split_hans(raw["hans"], data_args.validation_fraction, seed=args.seed)
        if heuristic_splits:
            used = heuristics_in({f"the HANS {name} split": raw_split[name]["heuristic"]
                                  for name in heuristic_splits},
                                 heuristics, what, "Name heuristics the HANS data have with --heuristics, or omit it "
                                 "for all; with few rows per subcase, a --validation_fraction nearer 0.5 keeps rows on "
                                 "both sides.")
            if num_anchors is not None:
                from .correction import sample_anchors

                validation = np.asarray(raw_split["validation"]["heuristic"], dtype=object)
                for heuristic in used:
                    sample_anchors(validation, heuristic, num_anchors, np.random.default_rng(0))
        kind = data_args.kind
        if kind == "tiny" and data_args.train_dataset is not None:
            logger.warning("The tiny embedded model's word-level tokenizer knows only the generated vocabulary; "
                           f"other words of {data_args.train_dataset} become [UNK]. Pass --model_name_or_path for "
                           "real data.")
        tokenizer = (embedded_tokenizer(kind) if data_args.embedded
                     else AutoTokenizer.from_pretrained(checkpoint[0]))
        tokenized = {k: tokenize_nli(v, tokenizer, max_length=data_args.max_length) if v is not None else None
                     for k, v in raw.items()}
        collator = DataCollatorWithPadding(tokenizer)
        split = split_hans(tokenized["hans"], data_args.validation_fraction, seed=args.seed)
        data = ApplicationData(train=tokenized["train"], hans_validation=split["validation"],
                               hans_test=split["test"], collator=collator, raw_train=raw["train"])
        if checks is not None:  # the application's settings against the data the run will use: before training
            checks(Setup(model=None, tokenizer=tokenizer, args=args, data=data, pool=tokenized["pool"],
                         data_args=data_args, started=started,
                         description={"setup": "embedded" if data_args.embedded else "paper",
                                      "embedded_model": kind,
                                      "trained_here": True if checkpoint is None else checkpoint[2]}))
    trained, info = True, {}
    if kind == "minilm":  # fine-tuned once per content, then loaded from the cache
        model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=kind,
                                           trainable_layers=data_args.trainable_layers,
                                           max_length=data_args.max_length,
                                           description=data_description(args.seed, len(raw["train"])))
    else:
        if kind == "tiny":
            model = embedded_model(tokenizer, seed=args.seed, kind=kind)
        else:
            model, trained = _pretrained_model(data_args, checkpoint, required_labels, seed=args.seed)
        if data_args.trainable_layers is not None:
            freeze_lower_layers(model, data_args.trainable_layers)
        if trained:
            model = _train(model, args, tokenized["train"], tokenizer, save=not data_args.embedded)
        else:
            model.to(args.device)
    model.eval()
    check_num_labels(model, required_labels, what)
    # training accuracy as recorded at fine-tuning (MiniLM), else measured on a seeded sample of training rows
    report = model_report(model, tokenized["hans"], collator, train=tokenized["train"],
                          train_accuracy=info.get("train_accuracy"), seed=args.seed)
    influence_params = sum(p.numel() for n, p in model.named_parameters()
                           if (args.influence_params is None and p.requires_grad)
                           or any(re.search(r, n) for r in args.influence_params or []))
    description = {
        "setup": "embedded" if data_args.embedded else "paper",
        "model": data_args.model_name_or_path or (
            minilm_description(finetune_settings(args, data_args.trainable_layers, data_args.max_length))
            if kind == "minilm" else embedded_kind(kind).description),
        "embedded_model": kind,
        "trained_here": trained, "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_influence_parameters": influence_params,
        "train_data": data_args.train_dataset or "generated (hf_fastif.data.generate_nli)",
        "num_train": len(tokenized["train"]), "hans": data_args.hans_file or "generated HANS-style",
        "num_hans_validation": len(split["validation"]), "num_hans_test": len(split["test"]),
        "influence_lambda": args.influence_lambda,
    }
    if info:
        description["fine_tuning"] = info
    logger.info(f"Setup: {description}")
    return Setup(model=model, tokenizer=tokenizer, args=args, data=data, pool=tokenized["pool"], data_args=data_args,
                 description=description, report=report, started=started)


def _check_checkpoint(data_args: ModelDataArguments, required_labels, what) -> tuple[str, object, bool]:
    """``(name, config, train)`` for a pretrained model; raises before any download of weights or data."""
    name = resolve_model(data_args.model_name_or_path, remote_code_flag=None)
    config = AutoConfig.from_pretrained(name)
    classifier = is_sequence_classifier(config)
    train = data_args.fine_tune == "always" or (data_args.fine_tune == "auto" and not classifier)
    if not train:
        if not classifier:
            raise ValueError(f"--fine_tune never, but {name!r} is not a sequence-classification checkpoint "
                             f"(architectures {config.architectures}); fine-tune it first or use --fine_tune auto.")
        if config.num_labels not in required_labels or config.num_labels != data_args.num_labels:
            raise ValueError(
                f"{what} needs a {' or '.join(map(str, required_labels))}-label model matching --num_labels "
                f"{data_args.num_labels}, but the checkpoint {name!r} has {config.num_labels} labels "
                f"({config.id2label}). Use a 2-label (entailment / non_entailment, MNLI-2) checkpoint, pass "
                "--num_labels to match it where the application allows, or fine-tune a base model with "
                "--fine_tune always."
            )
    return name, config, train


def _check_embedded_flags(data_args: ModelDataArguments, args: InfluenceArguments) -> None:
    """What the embedded default (no ``--model_name_or_path``) cannot take: ``--fine_tune never`` and
    ``--resume_from_checkpoint``."""
    if not data_args.embedded:
        return
    if data_args.fine_tune == "never":
        raise ValueError("--fine_tune never needs --model_name_or_path (a fine-tuned checkpoint); the embedded "
                         "model is always trained here.")
    _check_resume(args.resume_from_checkpoint, None)


def _check_resume(resume: str | None, checkpoint) -> None:
    """``--resume_from_checkpoint`` only where a model is fine-tuned here by a Trainer, and only from a folder that
    exists (it was ignored: the run trained from scratch)."""
    if resume is None:
        return
    if checkpoint is None:
        raise ValueError("--resume_from_checkpoint resumes the fine-tuning of --model_name_or_path; the embedded "
                         "default's model is trained in one go (MiniLM once per content, then cached), so there is "
                         "nothing to resume. Drop it.")
    if not checkpoint[2]:
        raise ValueError(f"--resume_from_checkpoint: {checkpoint[0]!r} is a fine-tuned classifier used as it is (no "
                         "training here), so there is nothing to resume. Drop it, or pass --fine_tune always.")
    if not Path(resume).expanduser().is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a folder; pass a checkpoint folder a previous "
                         "run saved (<output_dir>/checkpoint-<step>, with --save_strategy steps or epoch).")


def _pretrained_model(data_args: ModelDataArguments, checkpoint, required_labels,
                      seed: int = 0) -> tuple[nn.Module, bool]:
    """The checkpoint's model (a fresh classification head when it is fine-tuned here) and whether to train it."""
    name, _, do_train = checkpoint
    kwargs = {"attn_implementation": "eager"}
    if do_train:
        names = label_names(data_args.num_labels)
        kwargs |= {"num_labels": data_args.num_labels, "id2label": dict(enumerate(names)),
                   "label2id": {n: i for i, n in enumerate(names)}, "ignore_mismatched_sizes": True}
    # the new head's initialisation: unseeded, every run (and every process of a launch) drew its own, so one --seed
    # gave other numbers each time (accuracy 49.8 vs 50.3 before correction), and a launch was refused after training
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(name, **kwargs), do_train


def check_launch_training(args: InfluenceArguments) -> None:
    """Refuse training under ``accelerate launch`` on a machine without GPUs unless ``use_cpu`` is set:
    `TrainingArguments` trains the processes as one (DDP over gloo) only then; without it every process trained alone,
    to other weights, and the influence step refused them as processes that "disagree on ['model']" after the whole
    fine-tuning."""
    processes = D.world()[1]
    if processes > 1 and not args.use_cpu and not torch.cuda.is_available():
        raise ValueError(f"Training under accelerate launch ({processes} processes) on a machine without GPUs needs "
                         "--use_cpu: TrainingArguments trains the processes together (DDP) only with it, and without "
                         "it each process trains its own model alone. Pass --use_cpu (or run one process).")


def _train(model: nn.Module, args: InfluenceArguments, train: Dataset, tokenizer, save: bool) -> nn.Module:
    """Train ``model`` with ``args`` (the training fields); a pretrained model fine-tuned here is saved to
    ``<output_dir>/model`` for the next run."""
    check_launch_training(args)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if save:
        directory = f"{args.output_dir}/model"
        trainer.save_model(directory)
        tokenizer.save_pretrained(directory)
        logger.info(f"Saved the fine-tuned model to {directory}; pass it as --model_name_or_path next time.")
    return trainer.model
