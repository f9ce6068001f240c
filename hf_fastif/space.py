"""What the Gradio Space (spaces_demo/app.py) shows, without Gradio: starting up in the background, loading a
table, choosing test examples, the rows and how many of each sign there are, the plots, and live influence for a
pair the user types. The app only lays out components and turns the `ValueError`s raised here into messages.

The Space serves its page at once and builds its state in a background thread (`Startup`), reporting each stage.
The default table comes from the embedded default (generated NLI data and all-MiniLM-L6-v2 fine-tuned on them,
`hf_fastif.embedded`; the fine-tuned model itself is cached by content), computed with the same settings as the live
explanations (`LIVE_SETTINGS`) by the one `InfluenceEngine` that then serves them, and saved with that engine's caches
(``engine/``) so that the next start reads everything from disk and answers within seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from datasets import Dataset
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from matplotlib.figure import Figure
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging

from .annotate import TRAIN_TEXT, TextSource, save_with_text
from .applications.common import at_chance, predict, training_accuracy
from .arguments import InfluenceArguments
from .batches import usable_positions
from .cache import SPACE_ENGINES, SPACE_READY_FILE, SPACE_SUBDIR, cache_root, mark_used
from .data import NLI_MAX_LENGTH, tokenize_nli
from .distributed import on_main
from .embedded import (
    data_description,
    embedded_arguments,
    embedded_data,
    embedded_kind,
    train_embedded_model,
    training_settings,
)
from .engine import InfluenceEngine
from .fingerprint import dataset_fingerprint
from .influence import default_arguments
from .params import num_parameters, select_parameters
from .table import METADATA_FILE, InfluenceTable, InfluenceTableError, read_metadata
from .table.format import candidate_pool, label_id, label_text
from .utils import Timer, check_build_folder, library_version, to_json, write_atomic

logger = logging.get_logger(__name__)

CACHE_ENV = "HF_FASTIF_SPACE_CACHE"
TABLE_ENV = "HF_FASTIF_TABLE"
REVISION_ENV = "HF_FASTIF_TABLE_REVISION"
MODEL_ENV = "HF_FASTIF_MODEL"
KIND_ENV = "HF_FASTIF_EMBEDDED_MODEL"
MAX_TEXT_CHARS = 300
MAX_PAIR_TOKENS = 256
"""Word pieces of a typed pair (with [CLS] / [SEP]); 300 characters of English are ~70 per sentence."""
MAX_ROWS = 50
MAX_CANDIDATES = 500
MAX_TRAIN_ROWS = 5000
MAX_LIVE_PARAMETERS = 20_000_000
"""Influence parameters above which live explanations are off: the low-rank Hessian holds 2 × rank vectors of them."""
MAX_GRAPH_TESTS = 6
READY_FILE = SPACE_READY_FILE
ENGINE_DIR = "engine"
BUILD_ENTRIES = {"table": "folder", "model": "folder", ENGINE_DIR: "folder", "train.parquet": "file"}
"""What an embedded build writes in its folder, and whether each is a folder or a file."""
ENGINE_MANIFEST = "space_engine.json"
ALL = "all"

LIVE_SETTINGS: dict = dict(
    influence_solver="arnoldi", influence_arnoldi_rank=16, influence_arnoldi_rows=1024,
    influence_knn_features="gradient", influence_projection_dim=4096, influence_knn_k=100,
    influence_scoring_batch_size=256, influence_check_convergence=False, influence_trunk_cache=True,
)
"""How the Space's engine computes influence, chosen for about half a second per typed pair on 2 CPU cores:
s_test from the top 16 eigenpairs of H (Lanczos on 1,024 seeded training rows, computed once at start-up: on the
MiniLM default ~1.4 s, and closer to the full Hessian than 256 rows, which was the larger error; a rank of 32 or 64
changed nothing), candidates from the gradient index (a 4,096-bucket count sketch of per-example gradients: far
higher recall than [CLS] kNN), and exact JVP scoring of the k candidates. The table's own influence parameters, λ
and L2 term are kept. docs/space.md has the measurements (``python -m benchmarks.space_latency --quality``)."""
LIVE_FROM_TABLE = ("influence_params", "influence_damping", "influence_scale", "influence_weight_decay",
                   "influence_weight_decay_in_gradients", "influence_seed", "label_smoothing_factor")
"""Settings of a table that its live explanations keep (what decides the numbers, apart from the solver)."""
CACHED = ("trunk", "low_rank", "gradient_index")
"""The engine caches a warm start needs (`InfluenceEngine.load_caches` names)."""


def default_cache_dir() -> Path:
    """Where the Space keeps its builds: ``$HF_FASTIF_SPACE_CACHE``, else ``space_default`` in hf_fastif's cache
    (`hf_fastif.cache.cache_root`: ``$HF_FASTIF_CACHE`` or ``~/.cache/hf_fastif``), where ``hf-fastif cache`` lists
    them."""
    return Path(os.environ.get(CACHE_ENV) or cache_root() / SPACE_SUBDIR).expanduser()


def default_build_dir(kind: str | None = None) -> Path:
    """The folder of the default table of embedded model ``kind``: ``<default_cache_dir()>/<kind>``."""
    return default_cache_dir() / embedded_kind(kind).name


def live_settings(table_settings: dict, num_influence_parameters: int, k: int | None = None) -> dict:
    """The ``influence_*`` settings of the live engine: `LIVE_FROM_TABLE` from the table's settings, then
    `LIVE_SETTINGS` (the projection no larger than the number of influence parameters), then ``k``."""
    out = {key: table_settings[key] for key in LIVE_FROM_TABLE if table_settings.get(key) is not None}
    if "influence_weight_decay_in_gradients" not in table_settings and table_settings.get("influence_weight_decay"):
        out["influence_weight_decay_in_gradients"] = True  # a table from before the setting: the L2 term in every loss
    out |= LIVE_SETTINGS
    out["influence_projection_dim"] = min(LIVE_SETTINGS["influence_projection_dim"], int(num_influence_parameters))
    if k is not None:
        out["influence_knn_k"] = int(k)
    return out


def runtime_versions() -> dict:
    """What the engine's cache keys depend on beyond content (the code hashed into the collator's fingerprint)."""
    return {"hf_fastif": library_version(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


# ---- the default table ----------------------------------------------------------------------------------
def build_default(directory: str | os.PathLike | None = None, args: InfluenceArguments | None = None, *,
                  max_train_samples: int | None = None, max_test_samples: int | None = None,
                  kind: str | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Train (or, for MiniLM, load from the fine-tuning cache) the embedded model, compute its influence table on
    HANS-style test rows, and save ``table/`` (with text, predictions and label names), ``model/`` (model +
    tokenizer), ``train.parquet`` and, for the Space's settings, ``engine/`` (the live engine's caches) under
    ``directory``. Reuses a finished build with the same settings and model.

    Args:
        directory: where the build goes (default: the Space's, `default_build_dir`).
        args: training and influence settings as given (``hf-fastif build``). Default: the Space's: the embedded
            default's for its table (``embedded_arguments(directory, use="table", kind=kind)``) with
            `LIVE_SETTINGS`, computed by the live engine, whose caches are saved with the table.
        max_train_samples: generated training rows (default: the kind's ``table_data``, 2,000).
        max_test_samples: use the first N of the 30 HANS-style test rows.
        kind: the embedded model, ``"minilm"`` (default) or ``"tiny"``.
        progress: called with a short description as each stage starts.
    """
    return _build_default(directory, args, max_train_samples=max_train_samples, max_test_samples=max_test_samples,
                          kind=kind, progress=progress)[0]


def build_config(args, kind: str, sizes: dict, max_test_samples: int | None, live: bool) -> dict:
    """What an embedded build depends on, as `READY_FILE` records it: a finished build is reused only for an equal
    one (model kind, data, seed, library version, the training settings the model depends on, the influence
    settings and the influence loss's label smoothing)."""
    settings = embedded_kind(kind)
    return json.loads(to_json({
        "model": settings.description, "kind": settings.name, "data": sizes, "max_test_samples": max_test_samples,
        "seed": args.seed, "library_version": library_version(), "live_engine": live,
        "training": training_settings(args, settings.name),
        "label_smoothing_factor": args.label_smoothing_factor,  # (the influence loss's: default_loss_smoothing)
        "influence": args.influence_settings()}))


def _build_default(directory, args, *, max_train_samples=None, max_test_samples=None, kind=None,
                   progress=None) -> tuple[Path, Explainer | None]:
    """`build_default`, and the live `Explainer` whose engine computed the table when it was built just now."""
    progress = progress or (lambda stage: None)
    settings = embedded_kind(kind)
    directory = Path(directory) if directory is not None else default_build_dir(settings.name)
    live = args is None
    if live:  # both embedded models have more than 4,096 influence parameters: LIVE_SETTINGS apply unclamped
        args = embedded_arguments(str(directory), use="table", kind=settings.name, **LIVE_SETTINGS)
    sizes = settings.table_data | ({"n_train": max_train_samples} if max_train_samples else {})
    build = build_config(args, settings.name, sizes, max_test_samples, live)
    check_build_folder(directory, BUILD_ENTRIES, "The build folder")
    ready = directory / READY_FILE
    if ready.is_file() and json.loads(ready.read_text()).get("config") == build:
        missing = _missing_build_files(directory)
        if _built_table(directory) == build and not missing:
            progress(f"reusing the finished build in {directory} (the same settings and model)")
            mark_used(ready)  # what `hf-fastif cache --unused-days` reads
            return directory, None
        logger.warning(f"{directory} does not hold the finished build {ready} records ("
                       + (f"{', '.join(missing)} missing" if missing else "its table is another build's, or gone")
                       + "): building again.")
    directory.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    shutil.rmtree(directory / ENGINE_DIR, ignore_errors=True)  # caches of an earlier build
    progress("generating the training data")
    raw, tokenized, tokenizer = embedded_data(seed=args.seed, **sizes, kind=settings.name)
    progress("the fine-tuned MiniLM (read from the fine-tuning cache, or fine-tuned now: about a minute on a CPU, "
             "once per machine)" if settings.name == "minilm" else f"training the {settings.name} model")
    model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=settings.name,
                                       description=data_description(args.seed, len(raw["train"])))
    collator = DataCollatorWithPadding(tokenizer)
    if info.get("train_accuracy") is None:  # (MiniLM's fine-tuning records it; the tiny model is trained here)
        info = info | {"train_accuracy": training_accuracy(model, tokenized["train"], collator, seed=args.seed)[0]}
    warning = at_chance(info["train_accuracy"], tokenized["train"]["labels"])
    if warning:
        logger.warning(warning)
    hans, raw_hans = tokenized["hans"], raw["hans"]
    if max_test_samples:
        hans, raw_hans = (d.select(range(min(max_test_samples, len(d)))) for d in (hans, raw_hans))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    explainer = None
    progress(f"computing the influence table of {len(hans)} test rows over {len(raw['train']):,} training rows")
    if live:
        explainer = Explainer(model, tokenizer, raw["train"], args.influence_settings(), names,
                              cache_dir=directory / ENGINE_DIR, max_length=NLI_MAX_LENGTH)
        table, predictions = explainer.table(hans)
    else:
        with InfluenceEngine(model, args, data_collator=collator) as engine:
            table = engine.compute_influences(tokenized["train"], hans)
            predictions = predict(model, hans, engine=engine).argmax(-1)
    progress("saving the table, the model and the engine's caches" if explainer is not None  # (only a Space's
             else "saving the table and the model")  # live engine has caches to save)
    table.metadata["embedded_build"] = build | {"fine_tuning": info}
    table.metadata["tokenization"] = {"max_length": NLI_MAX_LENGTH}
    def write() -> None:  # under `accelerate launch` every process holds the table and the model; one writes them
        save_with_text(table, directory / "table", model=model,
                       model_name=f"hf_fastif embedded default ({settings.description})",
                       train=TextSource(raw["train"], "hf_fastif generated NLI (embedded default)", "train"),
                       test=TextSource(raw_hans, "hf_fastif generated HANS-style NLI", "hans"), predictions=predictions)
        model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
        raw["train"].to_parquet(str(directory / "train.parquet"))
        if explainer is not None:
            explainer.save_caches()
        write_atomic(ready, to_json({"config": build}))

    on_main(write, f"Writing {directory}")  # the others return once the build is on disk (or fail with its error)
    return directory, explainer


def _missing_build_files(directory: Path) -> list[str]:
    """What the Space and `hf-fastif build`'s report read from a finished build and ``directory`` lacks (a user
    freed the model's space, say): the model's config and weights, the training rows."""
    model = directory / "model"
    missing = [] if (model / "config.json").is_file() else ["model/config.json"]
    if not any(model.glob("*.safetensors")) and not (model / "pytorch_model.bin").is_file():
        missing.append("model/ weights")
    return missing + ([] if (directory / "train.parquet").is_file() else ["train.parquet"])


def _built_table(directory: Path) -> dict | None:
    """The embedded build config (`build_config`) the table in ``directory`` was written with; None when there is
    none (no table, a table of another build, e.g. ``hf-fastif build --model_name_or_path`` into the same folder)."""
    try:
        built = read_metadata(directory / "table").get("embedded_build")
    except InfluenceTableError:
        return None
    return {k: v for k, v in built.items() if k != "fine_tuning"} if isinstance(built, dict) else None


# ---- live explanations ------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """Live influence of the training rows on one typed pair.

    Attributes:
        prediction: label name → the model's probability.
        helpful / harmful: up to n candidate rows with negative / positive influence, most influential first
            (``train_id``, ``influence``, ``train_<text>`` columns).
        counts: `InfluenceTable.describe` of the candidates (how many of each sign, distinct values, range).
        pieces: the word pieces the model reads, ``[CLS]`` / ``[SEP]`` included.
        unknown: the typed words the tokenizer reads as its unknown token, each once.
        seconds: wall time of the computation (prediction + influence), lock wait excluded.
        k / n: candidates scored / rows asked for per side.
        candidates_note: how the candidates were chosen (`InfluenceTable.candidates_note`; None: every row scored).
        length: the pair's own length in word pieces; more than ``pieces`` when it was cut to the table's token
            limit (`Explainer.max_length`), as the table's rows were.
        stages: seconds of each step (`STAGES`): tokenising (not in ``seconds``), the prediction, then the engine's
            trunk states of the test row, its gradient, s_test, the candidates, their scoring, and ``other`` (the
            engine's checks and weight hashing, the table's assembly).
    """

    prediction: dict[str, float]
    helpful: pd.DataFrame
    harmful: pd.DataFrame
    counts: dict
    pieces: list[str]
    unknown: list[str]
    seconds: float
    k: int
    n: int
    stages: dict[str, float] = field(default_factory=dict)
    candidates_note: str | None = None
    length: int | None = None


STAGES = ("tokenize", "predict", "trunk", "test_gradients", "s_test", "candidates", "scoring", "other")
"""The steps of a live explanation, in order, as `Explanation.stages` names them."""
ENGINE_STAGES = ("trunk", "test_gradients", "s_test", "candidates", "scoring")
"""The steps `InfluenceEngine.compute_influences` times (``<name>_s`` in the table's ``diagnostics``)."""


def encode_pair(tokenizer, premise: str, hypothesis: str, label: int, max_tokens: int = MAX_PAIR_TOKENS, *,
                max_length: int | None = None) -> tuple[Dataset, list[str], list[str], int]:
    """``(one-row tokenized dataset, word pieces read, words read as unknown, the pair's own length in pieces)`` of
    a typed pair. A sentence that tokenizes to nothing, to no known word (only the unknown token and punctuation) or
    holds a special token's text (``[SEP]``), and a pair longer than ``max_tokens`` pieces, are refused with a
    `ValueError` that says what to type instead. With ``max_length`` (the limit the table's rows were cut to), a longer
    pair is cut the same way, longest side first, as the table's rows were (its own length tells)."""
    unk = tokenizer.unk_token
    for text, name in ((premise, "premise"), (hypothesis, "hypothesis")):
        special = [token for token in tokenizer.all_special_tokens if token and token in text]
        if special:  # the tokenizer reads them as its control tokens (a [SEP] starts a third segment), not as words
            raise ValueError(f"The {name} contains {', '.join(dict.fromkeys(special))}, which the model's tokenizer "
                             "reads as a special (control) token, not as text; remove it.")
        pieces = tokenizer.tokenize(text)
        if not pieces:
            raise ValueError(f"The {name} has nothing the model can read (only spaces, control or zero-width "
                             "characters); type a sentence.")
        if not any(p != unk and any(ch.isalnum() for ch in p) for p in pieces):
            raise ValueError(f"The model's tokenizer knows no word of the {name} {text!r} (it reads "
                             f"{' '.join(pieces)}); type words it knows, e.g. in English.")
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(premise, hypothesis, truncation=False, return_offsets_mapping=fast)
    length = len(encoded["input_ids"])
    if length > max_tokens and (max_length is None or max_length > max_tokens):
        raise ValueError(f"The pair has {length} word pieces; at most {max_tokens} are allowed. Shorten the "
                         "sentences.")
    if max_length is not None and length > max_length:
        encoded = tokenizer(premise, hypothesis, truncation=True, max_length=max_length, return_offsets_mapping=fast)
    ids = encoded["input_ids"]
    unknown = []
    if fast and tokenizer.unk_token_id is not None:
        texts = (premise, hypothesis)
        for i, (token, seq) in enumerate(zip(ids, encoded.sequence_ids())):
            if token == tokenizer.unk_token_id and seq is not None:
                start, end = encoded["offset_mapping"][i]
                unknown.append(texts[seq][start:end])
    row = {key: [list(encoded[key])] for key in encoded if key != "offset_mapping"} | {"labels": [int(label)]}
    # each word once, in the order typed (a word in both sentences was named twice)
    return Dataset.from_dict(row), tokenizer.convert_ids_to_tokens(ids), list(dict.fromkeys(unknown)), length


class Explainer:
    """Live influence for typed pairs through ONE `InfluenceEngine` held for the Space's life, with
    `LIVE_SETTINGS`: the training rows' trunk states, the low-rank Hessian and the gradient index are built once
    (or read from ``cache_dir``, see `save_caches`), so each pair costs its own trunk forward, one test gradient, a
    few matrix-vector products and the scoring of its k candidates. One computation at a time (a lock).

    Args:
        model / tokenizer: the table's model and its tokenizer (the model's WordPiece for MiniLM).
        train: the training rows as text (``premise``, ``hypothesis``, ``label``): the Hessian's data and the
            candidates.
        table_settings: the table's ``influence_*`` settings (`LIVE_FROM_TABLE` are kept).
        label_names: label id → name.
        train_ids: the table's ``train_id`` of each row of ``train`` (default: the row numbers).
        cache_dir: where `save_caches` writes the engine's caches and where they are read from now.
        max_length: the token limit the table's pairs were cut to (`table_max_length`): the training rows and typed
            pairs are cut the same way.

    Attributes:
        loaded: the caches read from ``cache_dir`` (`InfluenceEngine.load_caches` names).
        saved: whether this process wrote them (`save_caches`).
    """

    def __init__(self, model, tokenizer, train: Dataset, table_settings: dict, label_names: list[str],
                 train_ids: np.ndarray | None = None, *, cache_dir: str | os.PathLike | None = None,
                 max_length: int = NLI_MAX_LENGTH):
        self.model, self.tokenizer, self.label_names = model.eval(), tokenizer, list(label_names)
        self.train, self.max_length = train, int(max_length)
        self.train_ids = np.arange(len(train)) if train_ids is None else np.asarray(train_ids)
        columns = train.select_columns(["premise", "hypothesis", "label"])
        # (the engine keys its caches on the rows' content, so a saved cache is found again in another process)
        self.train_tokenized = tokenize_nli(columns, tokenizer, max_length=self.max_length)
        self.collator = DataCollatorWithPadding(tokenizer)
        self.num_influence_parameters = num_parameters(select_parameters(model, table_settings.get("influence_params")))
        if self.num_influence_parameters > MAX_LIVE_PARAMETERS:
            raise ValueError(f"Live explanations keep 2 x {LIVE_SETTINGS['influence_arnoldi_rank']} vectors of the "
                             f"{self.num_influence_parameters:,} influence parameters of this table, more than the "
                             f"Space's limit of {MAX_LIVE_PARAMETERS:,}; build the table with fewer influence_params "
                             "(e.g. the pooler and the classifier).")
        self.settings = live_settings(table_settings, self.num_influence_parameters)
        self.max_candidates = min(MAX_CANDIDATES, len(train))
        self._arguments_by_k: dict[int, InfluenceArguments] = {}
        self.engine = InfluenceEngine(self.model, self._arguments(self.settings["influence_knn_k"]),
                                      data_collator=self.collator)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.loaded: list[str] = []
        self.saved = False
        self._lock = threading.Lock()
        if self.cache_dir is not None:
            self.loaded = self.load_caches()

    def _arguments(self, k: int) -> InfluenceArguments:
        if k not in self._arguments_by_k:  # TrainingArguments are slow to build: one per k
            self._arguments_by_k[k] = default_arguments(**self.settings | {"influence_knn_k": k},
                                                        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        return self._arguments_by_k[k]

    # ---- the engine's caches on disk ----------------------------------------------------------------------
    def load_caches(self) -> list[str]:
        """Read the caches `save_caches` wrote (only if written by the same library, Python, torch, transformers
        and datasets versions, which the cache keys' code hashes depend on); returns what was loaded."""
        manifest = self.cache_dir / ENGINE_MANIFEST
        if not manifest.is_file() or json.loads(manifest.read_text()).get("versions") != runtime_versions():
            return []
        return self.engine.load_caches(self.cache_dir)

    def save_caches(self) -> None:
        """Write the engine's caches (trunk states, low-rank Hessian, gradient index) to ``cache_dir``."""
        if self.cache_dir is None:
            return
        with self._lock:
            self.engine.save_caches(self.cache_dir)
        write_atomic(self.cache_dir / ENGINE_MANIFEST, to_json({"versions": runtime_versions()}))
        self.saved = True

    @property
    def warm_from_disk(self) -> bool:
        """Whether every cache a warm start needs (`CACHED`) was read from ``cache_dir``."""
        return set(CACHED) <= set(self.loaded)

    def warm_up(self) -> float:
        """One explanation of the first training row (builds, or checks, every cache), then `save_caches` if they
        were not all read from disk, or some read were stale; returns its seconds."""
        # the first row as the table's rows were tokenized, not as a visitor's pair: a training row may be longer
        # than a visitor may type, or hold what `encode_pair` refuses, and still be the table's
        timer = Timer(suffix="")
        with timer("tokenize"):  # tokenized already, with the table's rows
            row = self.train_tokenized.select([0]).remove_columns(["premise", "hypothesis"])
        explanation = self._explained(row, self._k(None), 1, timer, [], [], len(row[0]["input_ids"]))
        stale = [kind for kind in self.engine.unused_loaded_caches() if kind in CACHED]
        if stale:  # read from disk but made for other keys (e.g. by another hf_fastif version): rebuilt just now
            logger.warning(f"The saved {', '.join(stale)} caches in {self.cache_dir} did not serve this model and data "
                           "(their keys differ: other weights or data, or an hf_fastif that hashed them another way); "
                           "they were rebuilt and are saved again.")
            self.engine.forget_unused_loaded(stale)
            self.loaded = [kind for kind in self.loaded if kind not in stale]
        if not self.warm_from_disk and not self.saved:
            try:
                self.save_caches()
            except OSError as err:  # a read-only folder: the next start builds them again, nothing else is lost
                logger.warning(f"Could not save the live engine's caches to {self.cache_dir}: {err}")
        return explanation.seconds

    # ---- one pair -------------------------------------------------------------------------------------------
    def label_id(self, label) -> int:
        """A gold label given by name or id, as its id."""
        if isinstance(label, str) and label in self.label_names:
            return self.label_names.index(label)
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(self.label_names):
            return int(label)
        raise ValueError(f"Choose the gold label of the pair ({' / '.join(self.label_names)}).")

    def encode(self, premise: str, hypothesis: str, label: int) -> tuple[Dataset, list[str], list[str], int]:
        """`encode_pair` with this explainer's tokenizer, at most `MAX_PAIR_TOKENS` pieces or the positions the model
        can give a row (RoBERTa's table numbers from its pad id + 1: 514 entries, 512 usable), cut to `max_length` as
        the table's rows."""
        positions = usable_positions(self.model) or MAX_PAIR_TOKENS
        return encode_pair(self.tokenizer, premise, hypothesis, label, min(MAX_PAIR_TOKENS, positions),
                           max_length=self.max_length)

    def explain(self, premise: str, hypothesis: str, label, k: int | None = None, n: int = 5) -> Explanation:
        """The prediction and the most helpful / harmful training rows for a typed pair with gold ``label`` (a
        name or an id), over ``k`` gradient-index candidates (default ``LIVE_SETTINGS``' 100, or every training row
        where there are fewer)."""
        premise, hypothesis = check_text(premise, "premise"), check_text(hypothesis, "hypothesis")
        k, n = self._k(k), check_int(n, "number of rows", 1, MAX_ROWS)
        timer = Timer(suffix="")
        with timer("tokenize"):
            test, pieces, unknown, length = self.encode(premise, hypothesis, self.label_id(label))
        return self._explained(test, k, n, timer, pieces, unknown, length)

    def _k(self, k) -> int:
        """The number of candidates asked for, checked; None: the live settings' (100), at most the rows there are
        (a table over fewer rows)."""
        if k is None:
            return min(int(self.settings["influence_knn_k"]), self.max_candidates)
        return check_int(k, "number of candidates", 1, self.max_candidates)

    def _explained(self, test: Dataset, k: int, n: int, timer: Timer, pieces: list[str], unknown: list[str],
                   length: int) -> Explanation:
        """`explain` of a tokenized one-row ``test``."""
        with self._lock:
            start = time.perf_counter()
            with timer("predict"):
                prediction = self.predict(test)
            self.engine.args = self._arguments(k)
            table = self.engine.compute_influences(self.train_tokenized, test)
            seconds = time.perf_counter() - start
        diagnostics = table.metadata.get("diagnostics") or {}
        stages = timer.seconds | {name: float(diagnostics.get(f"{name}_s", 0.0)) for name in ENGINE_STAGES}
        stages["other"] = max(0.0, seconds - sum(v for name, v in stages.items() if name != "tokenize"))
        return Explanation(prediction, self._rows(table.helpful(0, n)), self._rows(table.harmful(0, n)),
                           table.describe(0), pieces, unknown, seconds, k, n, {name: stages[name] for name in STAGES},
                           table.candidates_note(), length)

    def predict(self, test: Dataset) -> dict[str, float]:
        """The model's probability of each label for a one-row tokenized dataset (one full forward)."""
        batch = self.collator([{key: test[0][key] for key in test.column_names if key != "labels"}])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(**{key: value.to(device) for key, value in batch.items()}).logits[0]
        return {name: float(p) for name, p in zip(self.label_names, torch.softmax(logits.float(), -1).tolist())}

    def _rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Candidate rows with their text, ``train_id`` mapped to the table's ids."""
        frame = frame.copy()
        positions = frame["train_id"].to_numpy()
        for column in TRAIN_TEXT:
            if column in self.train.column_names:
                frame[f"train_{column}"] = [self.train[int(i)][column] for i in positions]
        frame["train_id"] = self.train_ids[positions]
        return frame

    def table(self, test: Dataset) -> tuple[InfluenceTable, np.ndarray]:
        """``(influence table, predicted labels)`` of tokenized test rows over every training row's k candidates:
        the default table, computed by the live engine (so its caches are built on the way)."""
        with self._lock:
            table = self.engine.compute_influences(self.train_tokenized, test)
            predictions = predict(self.model, test, engine=self.engine).argmax(-1)
        return table, predictions

    def describe_settings(self) -> str:
        """One line of Markdown: how live influence is computed."""
        s = self.settings
        lam = s.get("influence_damping", 0.0) * s.get("influence_scale", 1.0)
        rows = len(self.train) if s["influence_arnoldi_rows"] is None else min(s["influence_arnoldi_rows"],
                                                                                len(self.train))
        return (f"s_test from the top {s['influence_arnoldi_rank']} eigenpairs of the Hessian (Lanczos over "
                f"{rows:,} seeded training rows, computed once), λ = {lam:g}; candidates: of the "
                f"{len(self.train):,} training rows, the k whose projected gradient ({s['influence_projection_dim']:,}"
                f"-bucket count sketch of the {self.num_influence_parameters:,} influence parameters) has the largest "
                "inner product with s_test (half of them) or with -s_test (the other half), then scored exactly; one "
                "engine for the Space's life.")


# ---- the state of the app ------------------------------------------------------------------------------
@dataclass
class SpaceState:
    """A loaded table, its test examples (one row per test id), an `Explainer` when the model is at hand, and
    notices to show in the page (what could not be loaded and what is shown instead)."""

    table: InfluenceTable
    source: str
    tests: pd.DataFrame
    label_names: list[str]
    explainer: Explainer | None = None
    notices: list[str] = field(default_factory=list)

    @classmethod
    def from_table(cls, table: InfluenceTable, source: str, explainer: Explainer | None = None,
                   notices: list[str] | None = None) -> SpaceState:
        tests = table.tests().rename(columns=lambda c: c.removeprefix("test_") if c != "test_id" else c)
        names = table.metadata.get("label_names") or (explainer.label_names if explainer else None)
        if not names:
            labels = [label_id(x) for x in tests["label"]] if "label" in tests else []
            names = [str(i) for i in range(max((x for x in labels if x is not None), default=1) + 1)]
        if "label" in tests and "prediction" in tests:
            tests["correct"] = [label_text(a, names) == label_text(b, names) != "" for a, b in
                                zip(tests["label"], tests["prediction"])]  # a label stored as its name counts too
        return cls(table, source, tests, list(names), explainer, list(notices or []))

    # ---- choosing a test example -----------------------------------------------------------------------
    def heuristics(self) -> list[str]:
        return sorted(self.tests["heuristic"].dropna().unique().tolist()) if "heuristic" in self.tests else []

    @property
    def has_predictions(self) -> bool:
        """Whether the table records the model's predictions (so examples can be filtered by correct / wrong)."""
        return "correct" in self.tests

    def choices(self, heuristic: str = ALL, correctness: str = ALL) -> list[tuple[str, int]]:
        """``(label, test_id)`` of the test examples matching the filters (``correctness``: all / correct /
        wrong)."""
        if heuristic not in (ALL, None, "") and heuristic not in self.heuristics():
            raise ValueError(f"Unknown heuristic {heuristic!r}; choose one of {', '.join([ALL, *self.heuristics()])}.")
        if correctness not in (ALL, None, "", "correct", "wrong"):
            raise ValueError(f"Unknown filter {correctness!r}; choose all, correct or wrong.")
        tests = self.tests
        if heuristic not in (ALL, None, "") and "heuristic" in tests:
            tests = tests[tests["heuristic"] == heuristic]
        if correctness in ("correct", "wrong"):
            if "correct" not in tests:
                missing = "no predictions" if "prediction" not in tests else "no gold labels of its test rows"
                raise ValueError(f"This table records {missing}, so it cannot tell correct from wrong examples; "
                                 "choose all (build the table with both to filter by them).")
            tests = tests[tests["correct"] == (correctness == "correct")]
        return [(self._title(row), int(row.test_id)) for row in tests.itertuples()]

    def _title(self, row) -> str:
        mark = "" if not hasattr(row, "correct") else ("✓ " if row.correct else "✗ ")
        tag = f"[{row.heuristic}] " if hasattr(row, "heuristic") else ""
        text = f"{row.premise} ⇒ {row.hypothesis}" if hasattr(row, "premise") else \
            str(getattr(row, "sentence", getattr(row, "text", "")))
        return f"#{row.test_id} {mark}{tag}{text}".strip()

    def _test(self, test_id) -> pd.Series:
        test_id = check_test_id(test_id)
        found = self.tests[self.tests["test_id"] == test_id]
        if found.empty:
            raise ValueError(f"Test example {test_id} is not in this table; choose one from the list.")
        return found.iloc[0]

    def describe(self, test_id) -> str:
        """Markdown: the pair, gold label and the model's prediction, after what the lists mean where their headings
        do not say it (`InfluenceTable.caveats`)."""
        row = self._test(test_id)
        test_id = int(row.test_id)
        lines = [f"### Test example #{test_id}", *(f"⚠️ {note}" for note in self.table.caveats(test_id))]
        if "premise" in row:
            lines += [f"**Premise:** {row.premise}", f"**Hypothesis:** {row.hypothesis}"]
        else:  # a single-sentence table's test text
            lines += [f"**{c.capitalize()}:** {row[c]}" for c in ("sentence", "text") if c in row][:1]
        if "heuristic" in row:
            lines.append(f"**Heuristic:** {row.heuristic} / {row.get('subcase', '')}")
        if "label" in row:
            lines.append(f"**Gold:** {self.label_name(row.label)}")
        if "prediction" in row:  # (a verdict only against a gold label: without one, every example failed to show)
            verdict = "" if "label" not in row else (
                " (correct)" if self.label_name(row.prediction) == self.label_name(row.label) else " (**wrong**)")
            lines.append(f"**Model's prediction:** {self.label_name(row.prediction)}{verdict}")
        return "\n\n".join(lines)

    def label_name(self, value) -> str:
        return label_text(value, self.label_names)

    # ---- rows, counts and plots --------------------------------------------------------------------------
    def rows(self, test_id, n) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Up to n helpful (negative influence) and n harmful (positive) training rows, ready to show; fewer when
        fewer candidates have that sign (`counts` says how many)."""
        test_id, n = int(self._test(test_id).test_id), check_int(n, "number of rows", 1, MAX_ROWS)
        return self.display(self.table.helpful(test_id, n)), self.display(self.table.harmful(test_id, n))

    def counts(self, test_id) -> dict:
        """`InfluenceTable.describe` of one test example's candidates."""
        return self.table.describe(int(self._test(test_id).test_id))

    def display(self, frame: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({"rank": np.arange(1, len(frame) + 1), "influence": frame["influence"].map("{:+.3e}".format),
                            "train_id": frame["train_id"]})
        if "train_label" in frame:
            out["label"] = [self.label_name(v) for v in frame["train_label"]]
        for col in ("premise", "hypothesis", "genre", "text", "sentence"):
            if f"train_{col}" in frame:
                out[col] = frame[f"train_{col}"].astype(str)
        return out

    def distribution(self, test_id, n):
        """Histogram of the influence of every candidate on one test example, the n most helpful (negative) and
        most harmful (positive) marked: a side with no candidate of its sign is not marked, and says so."""
        test_id, n = int(self._test(test_id).test_id), check_int(n, "number of rows", 1, MAX_ROWS)
        return influence_histogram(self.table.for_test(test_id)["influence"].to_numpy(), n,
                                   f"test #{test_id}")

    def plots(self, test_id, n, heuristic: str = ALL, correctness: str = ALL,
              render: Callable[[Figure], object] = lambda figure: figure) -> tuple[object, object, list[str]]:
        """``(distribution, graph, notes)`` of one test example, each figure passed through ``render`` (the page's
        conversion to an image, so that its failures are caught here too); a plot that cannot be drawn is None with a
        note saying so, and never takes the rows with it (one inf influence made /show fail and hid every row)."""
        # the filters checked first: a bad one is the input's error (it hid the graph, with a traceback in the log)
        self.choices(heuristic, correctness)
        out, notes = [], []
        for name, draw in (("influence histogram", lambda: self.distribution(test_id, n)),
                           ("influence graph", lambda: self.graph(test_id, heuristic, correctness))):
            try:
                out.append(render(draw()))
            except Exception as err:  # (input errors were raised by `rows` before any plot is drawn)
                logger.exception(f"The {name} of test example {test_id!r} could not be drawn")
                out.append(None)
                notes.append(f"The {name} could not be drawn ({type(err).__name__}: {err}); the rows are complete.")
        return out[0], out[1], notes

    def graph(self, test_id, heuristic: str = ALL, correctness: str = ALL, n: int = 3):
        """The influence graph: the chosen test example and a few others matching the filters, each linked to
        its n most helpful (green) and harmful (red) training rows; shared training rows join test examples."""
        import networkx as nx  # an optional dependency (hf_fastif[demo]): the rest of the module works without it

        test_id, n = int(self._test(test_id).test_id), check_int(n, "number of rows", 1, 10)
        others = [t for _, t in self.choices(heuristic, correctness) if t != test_id][: MAX_GRAPH_TESTS - 1]
        g = nx.Graph()
        for t in [test_id, *others]:
            g.add_node(("test", t), kind="test", main=t == test_id)
            for side, frame in (("helpful", self.table.helpful(t, n)), ("harmful", self.table.harmful(t, n))):
                for r in frame.itertuples():
                    g.add_node(("train", int(r.train_id)), kind="train")
                    g.add_edge(("test", t), ("train", int(r.train_id)), side=side, weight=abs(r.influence))
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        ax.set_axis_off()
        with np.errstate(over="ignore", invalid="ignore"):
            pos = nx.spring_layout(g, seed=0, k=0.9)
            if not all(np.isfinite(p).all() for p in pos.values()):  # an inf (or ±1e308) influence as an edge's
                pos = nx.spring_layout(g, seed=0, k=0.9, weight=None)  # weight: every position NaN, an empty graph
        tests = [v for v, d in g.nodes(data=True) if d["kind"] == "test"]
        train = [v for v, d in g.nodes(data=True) if d["kind"] == "train"]
        nx.draw_networkx_nodes(g, pos, nodelist=train, node_size=60, node_color="#9aa5b1", ax=ax)
        nx.draw_networkx_nodes(g, pos, nodelist=tests, node_shape="s", ax=ax,
                               node_size=[260 if g.nodes[v]["main"] else 140 for v in tests],
                               node_color=["#3558d6" if g.nodes[v]["main"] else "#8fa4ee" for v in tests])
        for side, color in (("helpful", "#2e9e5b"), ("harmful", "#d64545")):
            edges = [(a, b) for a, b, d in g.edges(data=True) if d["side"] == side]
            if edges:
                nx.draw_networkx_edges(g, pos, edgelist=edges, edge_color=color, ax=ax, width=1.4, label=side)
        nx.draw_networkx_labels(g, pos, labels={v: f"test {v[1]}" for v in tests}, font_size=7, ax=ax)
        shared = [v for v in train if g.degree(v) > 1]
        nx.draw_networkx_labels(g, pos, labels={v: f"train {v[1]}" for v in shared}, font_size=6, ax=ax)
        if g.number_of_edges():
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"Influence graph: {len(tests)} test examples, {len(train)} training rows "
                     f"({len(shared)} shared)", fontsize=10)
        return fig

    def summary(self) -> str:
        """Markdown: which table, its model and settings, and how live explanations are computed."""
        md = self.table.metadata
        model = (md.get("model") or {}).get("name_or_path")
        settings = md.get("settings") or {}
        lines = [f"**Table:** {self.source} · {len(self.table):,} rows · {len(self.tests)} test examples · "
                 f"model `{model}` · solver {settings.get('influence_solver')} · λ = {md.get('lambda')} · "
                 f"candidates per test example: {settings.get('influence_knn_k_used', settings.get('influence_knn_k'))}"
                 f" ({settings.get('influence_knn_features', 'auto')})"]
        if self.explainer is not None:
            lines.append(f"**Live explanations:** {self.explainer.describe_settings()}")
        else:
            lines.append("**Live explanations:** not available (see the notice above).")
        return "\n\n".join(lines)


HUGE_INFLUENCE = 1e300
"""Beyond this magnitude `influence_histogram` plots in units of the largest value."""


def influence_histogram(values: np.ndarray, n: int, title: str):
    """Histogram of candidate influences with the n most helpful (negative) and n most harmful (positive) marked
    (only values of that sign: when there are none, the legend says so), and the count of distinct values. Only
    finite values are plotted (a table keeps an inf that flags an overflow, and matplotlib refused the whole plot);
    the title says how many were left out. Values whose range overflows a float (±1e308), or beyond
    `HUGE_INFLUENCE`, are plotted in units of the largest magnitude, which the axis names."""
    values = np.asarray(values, dtype=float)
    left_out = int((~np.isfinite(values)).sum())
    values = np.sort(values[np.isfinite(values)])
    negative, positive = values[values < 0], values[values > 0]
    # bins and axis limits would be inf where the range overflows, and matplotlib's transforms overflow even for a
    # finite range of 1.7e308: both need a value beyond HUGE_INFLUENCE
    unit = float(np.abs(values).max()) if len(values) and np.abs(values).max() > HUGE_INFLUENCE else 1.0
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    spread = values[-1] / unit - values[0] / unit if len(values) else 0.0  # (in units: the range may overflow)
    tiny = 0 < spread <= 1e-9 * float(np.abs(values / unit).max())  # values a few ulps apart: one bin (more failed)
    ax.hist(values / unit, bins=1 if tiny else min(60, max(10, len(values) // 4)), color="#9aa5b1")
    if len(negative):
        shown = min(n, len(negative))
        ax.axvspan(negative[0] / unit, negative[shown - 1] / unit, color="#2e9e5b", alpha=0.25,
                   label=f"{shown} most helpful (of {len(negative)} < 0)")
    else:
        ax.plot([], [], " ", label="no helpful candidate (none < 0)")
    if len(positive):
        shown = min(n, len(positive))
        ax.axvspan(positive[-shown] / unit, positive[-1] / unit, color="#d64545", alpha=0.25,
                   label=f"{shown} most harmful (of {len(positive)} > 0)")
    else:
        ax.plot([], [], " ", label="no harmful candidate (none > 0)")
    ax.legend(loc="upper right", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("influence" + (f" (in units of {unit:.3e})" if unit != 1.0 else "")
                  + "  (negative = helpful, positive = harmful)")
    ax.set_ylabel("training rows")
    of = f"{len(values)} of the {len(values) + left_out}" if left_out else f"{len(values)}"
    skipped = f"; {left_out} not finite (NaN or ±inf), left out" if left_out else ""
    ax.set_title(f"Influence of {of} candidates on {title} ({len(np.unique(values))} distinct values{skipped})",
                 fontsize=10)
    return fig


def list_notes(counts: dict, n: int) -> tuple[str, str]:
    """Markdown above the helpful and the harmful list: how many candidates have that sign, and so why fewer than
    ``n`` rows may show."""
    total = counts["num_candidates"]

    def note(found: int, side: str, sign: str) -> str:
        if found == 0:
            return f"**No {side} training row** among the {total:,} candidates: none has {sign} influence."
        if found < n:
            return (f"Only **{found}** of the {total:,} candidates have {sign} influence ({side}); all of them are "
                    "shown.")
        return f"The {n} most {side} of the **{found:,}** candidates with {sign} influence (of {total:,})."

    return note(counts["num_helpful"], "helpful", "negative"), note(counts["num_harmful"], "harmful", "positive")


def counts_note(counts: dict, note: str | None = None) -> str:
    """Markdown: the sign counts, ties and range of one test example's candidate influences, then ``note`` (how the
    candidates were chosen, e.g. `InfluenceTable.candidates_note`) in italics."""
    total, distinct = counts["num_candidates"], counts["num_distinct_values"]
    parts = [f"**{total:,} candidates:** {counts['num_helpful']:,} helpful (< 0), {counts['num_harmful']:,} "
             f"harmful (> 0), {counts['num_zero']:,} exactly 0" + (f", {counts['num_nan']:,} NaN" if counts.get(
                 "num_nan") else "")]
    finite = total - counts.get("num_nan", 0)
    if finite and distinct == 1:
        parts.append(f"**every candidate has the same influence ({counts['min']:+.3e}): the lists rank nothing**")
    elif distinct < finite:
        parts.append(f"{distinct:,} distinct values (ties: {finite - distinct:,} rows share a value with another)")
    else:
        parts.append(f"{distinct:,} distinct values")
    if counts.get("min") is not None:
        parts.append(f"min {counts['min']:+.3e} · median {counts['median']:+.3e} · max {counts['max']:+.3e}")
    return " · ".join(parts) + (f"\n\n*{note}*" if note else "")


def explanation_summary(explanation: Explanation, state: SpaceState | None = None) -> str:
    """Markdown for a live explanation: how the model read the pair (word pieces; unknown words named), the
    candidates' counts and the time it took."""
    pieces = " ".join(explanation.pieces)
    lines = [f"**How the model reads it** ({len(explanation.pieces)} word pieces): `{pieces}`"]
    if explanation.length is not None and explanation.length > len(explanation.pieces):
        lines.append(f"**Cut** from {explanation.length} to {len(explanation.pieces)} word pieces (longest sentence "
                     "first), as the table's pairs were cut: the model reads the pair as shown.")
    if explanation.unknown:
        words = ", ".join(f"“{w}”" for w in explanation.unknown)
        lines.append(f"**Unknown to the tokenizer** (read as its unknown token, so they carry no meaning): {words}")
    lines.append(counts_note(explanation.counts, explanation.candidates_note))
    lines.append(f"Computed in {explanation.seconds:.2f} s over {explanation.k} candidates.")
    if explanation.stages:
        lines.append("Steps (s): " + " · ".join(f"{name} {seconds:.3f}" for name, seconds in explanation.stages.items()))
    return "\n\n".join(lines)


# ---- loading ---------------------------------------------------------------------------------------------
def open_table(source: str, revision: str | None = None, *, force_download: bool = False
               ) -> tuple[InfluenceTable, str]:
    """``(table, description)`` of a local table folder or a Hub dataset repo id (the Space's ``--table``, ``hf-fastif
    show``). What is neither gets an error saying which was tried: a build folder names its table, a path that does
    not exist says so, and a name that could be either (``out/table``) says both were tried."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"A revision ({revision!r}) picks a version of a Hub repo, but {source!r} is a local "
                             "folder, which holds one version: drop the revision, or pass the Hub repo id.")
        try:
            return InfluenceTable.load(path), f"local folder {source}"
        except InfluenceTableError as err:  # a build folder: its table is one level down
            if (path / "table" / METADATA_FILE).is_file():
                raise InfluenceTableError(f"{err} It holds a build; its table is {path / 'table'}.") from err
            raise
    if path.exists():
        raise ValueError(f"{source!r} is not a table folder (pass the folder holding {METADATA_FILE}).")
    if source.startswith((".", "/", "~")):
        raise ValueError(f"There is no folder {source!r}: for a table on disk, check the path.")
    try:
        table = InfluenceTable.from_hub(source, revision=revision, force_download=force_download)
    except ValueError as err:  # 'out/table' could be either: say both were tried, where no such repo was found
        if not isinstance(err.__cause__, (RepositoryNotFoundError, HFValidationError, LocalEntryNotFoundError)):
            raise  # (a revision, a damaged copy of a repo that exists: not a local folder's matter)
        raise InfluenceTableError(f"{err} Nor is there a local folder {source!r}: for a table on disk, check the "
                                  "path.") from err
    return table, f"Hub dataset {source}" + (f"@{revision}" if revision else "")


def load_default(directory: str | os.PathLike | None = None, *, kind: str | None = None,
                 max_train_samples: int | None = None, progress: Callable[[str], None] | None = None,
                 notices: list[str] | None = None) -> SpaceState:
    """The embedded default's state: its build in ``directory`` (default `default_build_dir`) reused, or made now
    (``kind`` and ``max_train_samples`` as `build_default`), and its live engine warm (caches read from ``engine/``,
    or built and saved there)."""
    progress = progress or (lambda stage: None)
    directory, explainer = _build_default(directory, None, kind=kind, max_train_samples=max_train_samples,
                                          progress=progress)
    table = InfluenceTable.load(directory / "table")
    if explainer is None:
        progress("loading the model and the live engine's caches")
        explainer = _explainer(table, str(directory / "model"), Dataset.from_parquet(str(directory / "train.parquet")),
                               cache_dir=directory / ENGINE_DIR)
    progress(warm_up_stage(explainer))
    explainer.warm_up()
    built = json.loads((directory / READY_FILE).read_text()).get("config", {})
    return SpaceState.from_table(table, f"embedded default ({built.get('model', 'generated NLI')})", explainer,
                                 notices)


def load_state(source: str | None = None, *, revision: str | None = None, model: str | None = None,
               kind: str | None = None, max_train_samples: int | None = None,
               progress: Callable[[str], None] | None = None) -> SpaceState:
    """The Space's state. ``source``: a local table folder, a Hub dataset repo id, or None for the embedded
    default (`load_default`; also the fallback, with a notice, when ``source`` cannot be loaded). ``model``: a local
    dir or Hub id of the table's model for live explanations; without it, or when it does not match the table, the
    table is shown without them (and a notice says why). Environment: `TABLE_ENV`, `REVISION_ENV`, `MODEL_ENV`,
    `KIND_ENV` (``kind`` and ``max_train_samples``: the embedded default's, see `build_default`)."""
    progress = progress or (lambda stage: None)
    source = source if source is not None else os.environ.get(TABLE_ENV) or None
    revision = revision or os.environ.get(REVISION_ENV) or None
    model = model or os.environ.get(MODEL_ENV) or None
    kind = kind or os.environ.get(KIND_ENV) or None
    notices: list[str] = []
    failed: str | None = None  # why the table asked for did not load
    if source is None and (model is not None or revision is not None):
        notices.append(f"The {'model' if model is not None else 'revision'} given ({model or revision!r}) is for a "
                       "--table (HF_FASTIF_TABLE); the embedded default brings its own model, so it is not used.")
    if source is not None:
        progress(f"loading the influence table {source}")
        try:
            table, label = open_table(source, revision)
        except Exception as err:  # an offline Hub, a folder that is not a table...: the default instead
            logger.error(f"Could not load the influence table {source!r}: {type(err).__name__}: {err}")
            failed = f"Could not load the influence table {source!r}: {err}"
            notices.append(f"{failed} Showing the embedded default instead.")
            source = None
    if source is None:
        try:
            return load_default(kind=kind, max_train_samples=max_train_samples, progress=progress, notices=notices)
        except Exception as err:
            if failed is None:
                raise
            # the operator's own mistake (a table that would not load) must not vanish behind the default's failure
            raise RuntimeError(f"{failed} The embedded default could not start either: "
                               f"{type(err).__name__}: {err}") from err
    explainer = None
    if model is None:
        notices.append("Live explanations need the table's model: start the app with --model (or HF_FASTIF_MODEL).")
    else:
        progress(f"loading the model {model} and preparing live explanations")
        try:
            train = _train_from_table(table)
            explainer = _explainer(table, model, train, cache_dir=_engine_dir(table, train))
            progress(warm_up_stage(explainer))
            explainer.warm_up()
            notices += [note for note in [live_rows_notice(table, len(train))] if note]
        except Exception as err:  # a model that does not match the table, a table without text, weights that
            # cannot be read (a truncated safetensors file, a config that does not fit them): the table still shows
            logger.exception(f"Live explanations are off: {type(err).__name__}: {err}")
            why = str(err) if isinstance(err, (ValueError, OSError)) else (
                f"the model {model!r} could not be loaded or run ({type(err).__name__}: {err}; the Space's log has "
                "the details)")
            notices.append(f"Live explanations are off: {why}")
            explainer = None
        differs = settings_differ(table.metadata.get("settings") or {}, explainer)
        if differs:
            notices.append(f"Live explanations compute influence with other settings than this table ({differs}): a "
                           "typed copy of a table row can get other rows and values than the table shows.")
        own = own_functions(table) if explainer is not None else ""
        if own:
            notices.append(f"This table was computed with {own}; live explanations use the model's default loss for "
                           "both, so their values measure another quantity than the table's (and can read the other "
                           "way round).")
    return SpaceState.from_table(table, label, explainer, notices)


def live_rows_notice(table: InfluenceTable, live_rows: int) -> str | None:
    """A notice when live explanations run over other training rows than the table was computed over, else None: a
    table carries the text of the rows it scored (its candidates, of which at most `MAX_TRAIN_ROWS` are used), and
    those are the live engine's Hessian data and candidates. For a table that scored a candidate pool
    (`candidate_pool`) they are the pool's rows, not the training rows of its Hessian, which it does not carry: its
    live values differ from the table's whatever the counts (about 9% on a tiny BERT, with another third row)."""
    md = table.metadata
    if candidate_pool(md):
        pool, train = ((md.get(key) or {}).get("num_rows") for key in ("candidate_data", "train_data"))
        rows = (f"{live_rows:,} of its {pool:,} pool rows" if isinstance(pool, int) and live_rows < pool else
                f"its {live_rows:,} pool rows")
        hessian = f"the {train:,} training rows" if isinstance(train, int) else "the training rows"
        return (f"This table scored a candidate pool with the Hessian of {hessian} it was computed over, which it does "
                f"not carry: live explanations use {rows} as their Hessian data as well as their candidates, so their "
                "values differ from the table's, and they can rank other rows, even for a typed copy of a table row.")
    total = (md.get("train_data") or {}).get("num_rows")
    if not isinstance(total, int) or live_rows >= total:
        return None
    return (f"Live explanations use {live_rows:,} of the {total:,} training rows this table was computed over (the "
            "rows whose text it carries: its candidates, at most "
            f"{MAX_TRAIN_ROWS:,}): their Hessian and candidates are those rows', so a typed copy of a table row gets "
            "other values, and can get other rows, than the table shows.")


def settings_differ(table_settings: dict, explainer: Explainer | None) -> str:
    """The settings that decide the rows and values, where the live engine's differ from the table's (``solver
    cg vs arnoldi``), or "" (also without an explainer)."""
    if explainer is None:
        return ""
    keys = ("influence_solver", "influence_knn_features")  # k: a slider of each request
    return ", ".join(f"{key.removeprefix('influence_')} {table_settings.get(key)} here vs {explainer.settings.get(key)} "
                     "live" for key in keys if table_settings.get(key) != explainer.settings.get(key))


def own_functions(table: InfluenceTable) -> str:
    """The functions of its own a table was computed with (``loss_fn`` / ``measurement_fn``, as its metadata records
    them), which the live engine cannot rebuild, or ""."""
    functions = table.metadata.get("functions") or {}
    return " and ".join(f"a {key} of its own ({(functions[key] or {}).get('name')})"
                        for key in ("loss_fn", "measurement_fn") if functions.get(key))


def warm_up_stage(explainer: Explainer) -> str:
    """The start's stage that warms ``explainer`` up, saying where its caches come from."""
    if explainer.warm_from_disk:
        return "warming up the live engine (caches read from disk)"
    if explainer.saved:
        return "warming up the live engine (caches built with the table)"
    return ("warming up the live engine (building its caches: the training rows' trunk states, the low-rank Hessian "
            "and the gradient index)")


def _engine_dir(table: InfluenceTable, train: Dataset) -> Path:
    """Where the live engine of a table that is not the default keeps its caches: one folder per model and
    training rows."""
    key = hashlib.sha256(((table.metadata.get("model") or {}).get("fingerprint", "") +
                          dataset_fingerprint(train)).encode()).hexdigest()[:20]
    return default_cache_dir() / SPACE_ENGINES / key


def _train_from_table(table: InfluenceTable) -> Dataset:
    """The training rows a table carries as text (``train_premise`` ...), as a dataset, at most
    `MAX_TRAIN_ROWS` of them: the candidates and Hessian data for live explanations. A table of a candidate pool
    carries the pool's rows, not its Hessian's (`live_rows_notice` says so on the page)."""
    needed = ["train_id", "train_premise", "train_hypothesis", "train_label"]
    if any(c not in table.column_names for c in needed):
        raise InfluenceTableError("live explanations need a table that carries the training text (train_premise, "
                                  "train_hypothesis, train_label); build it with text (hf_fastif.annotate."
                                  "save_with_text or `hf-fastif build`).")
    # with the table's other text columns (`genre`): the live lists showed fewer columns than the table's own
    shown = needed + [f"train_{c}" for c in TRAIN_TEXT if f"train_{c}" in table.column_names and f"train_{c}" not in needed]
    frame = table.dataset.select_columns(shown).to_pandas().drop_duplicates("train_id").sort_values("train_id")
    if len(frame) > MAX_TRAIN_ROWS:
        logger.warning(f"Live explanations use the first {MAX_TRAIN_ROWS:,} of the {len(frame):,} training rows this "
                       "table carries (by train_id): their Hessian and candidates are those rows', not the table's.")
    frame = frame.head(MAX_TRAIN_ROWS).rename(columns=lambda c: c.removeprefix("train_"))
    names = [str(n) for n in table.metadata.get("label_names") or []]
    if names and not pd.api.types.is_numeric_dtype(frame["label"]):  # (pandas 3 reads text as "str", not object)
        # labels stored as their names, as ids (live explanations were turned off, advising a dataset.map that the
        # Space's operator, who has the table only, cannot run)
        ids = [names.index(v) if v in names else label_id(v) for v in frame["label"]]
        if all(i is not None for i in ids):
            frame["label"] = ids
    return Dataset.from_pandas(frame.rename(columns={"id": "train_id"}), preserve_index=False)


def _explainer(table: InfluenceTable, model_name: str, train: Dataset, *, cache_dir: Path | None = None) -> Explainer:
    model = AutoModelForSequenceClassification.from_pretrained(model_name, attn_implementation="eager")
    table.check_model(model)
    recorded = (table.metadata.get("model") or {}).get("num_influence_parameters")
    selected = num_parameters(select_parameters(model, (table.metadata.get("settings") or {}).get("influence_params")))
    if recorded is not None and int(recorded) != selected:
        raise ValueError(f"The table's influence is over {int(recorded):,} parameters, but its influence_params select "
                         f"{selected:,} of the model as loaded (influence_params=None takes every trainable parameter, "
                         "and lower layers frozen at build time are trainable again once loaded): live values would "
                         "not be the table's. Build the table with explicit influence_params.")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    names = table.metadata.get("label_names") or [model.config.id2label[i] for i in range(model.config.num_labels)]
    ids = np.asarray(train["train_id"]) if "train_id" in train.column_names else None  # rows taken from a table
    return Explainer(model, tokenizer, train, table.metadata.get("settings") or {}, list(names), ids,
                     cache_dir=cache_dir, max_length=table_max_length(table))


def table_max_length(table: InfluenceTable) -> int:
    """The token limit a table's pairs were cut to (``metadata["tokenization"]``, which `hf-fastif build` records);
    `NLI_MAX_LENGTH` for a table that records none, as `hf-fastif build` cut pairs before it recorded the limit."""
    recorded = (table.metadata.get("tokenization") or {}).get("max_length")
    return int(recorded) if isinstance(recorded, int) and recorded > 0 else NLI_MAX_LENGTH


# ---- starting in the background ----------------------------------------------------------------------------
TRANSIENT_START_ERROR = "AST constructor recursion depth mismatch"
"""A `SystemError` of CPython 3.11's ast.parse when two threads parse at once (not a defect of the Space's inputs):
the start is tried once more."""


class Startup:
    """Builds the Space's `SpaceState` (`load_state`) in a background thread, so the page is served at once and
    says how far the start got (`status`).

    Args:
        source / revision / model / kind / max_train_samples: as `load_state` (environment variables apply the
            same way).
    """

    def __init__(self, source: str | None = None, *, revision: str | None = None, model: str | None = None,
                 kind: str | None = None, max_train_samples: int | None = None):
        self.source, self.revision, self.model, self.kind = source, revision, model, kind
        self.max_train_samples = max_train_samples
        self.state: SpaceState | None = None
        self.error: str | None = None
        self.stages: list[dict] = []
        self._begun = time.perf_counter()
        self._stage_started = self._begun
        self._finished: float | None = None  # (the start's duration stays what it was once it is over)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Startup:
        """Start building in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.run, name="hf_fastif-space-startup", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Build the state now, in this thread (`start` runs it in the background); failures are kept, not raised."""
        try:
            try:
                state = self._load()
            except SystemError as err:
                if TRANSIENT_START_ERROR not in str(err):
                    raise
                # CPython 3.11's ast.parse is not thread-safe: gradio's thread parsing a component's source while
                # this one (an import) parses too fails one of them (seen once in a test run): the start is retried
                logger.warning(f"The Space's start met a transient interpreter error ({err}); starting again.")
                state = self._load()
            self._progress(None)
            self.state = state
        except Exception as err:  # the page must keep serving and say what happened
            logger.error(f"The Space could not start: {type(err).__name__}: {err}")
            self._progress(None)
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self._finished = time.perf_counter()
            self._done.set()

    def _load(self) -> SpaceState:
        return load_state(self.source, revision=self.revision, model=self.model, kind=self.kind,
                          max_train_samples=self.max_train_samples, progress=self._progress)

    def _progress(self, stage: str | None) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.stages and self.stages[-1]["seconds"] is None:
                self.stages[-1]["seconds"] = round(now - self._stage_started, 3)
            if stage is not None:
                self.stages.append({"stage": stage, "seconds": None})
            self._stage_started = now

    def wait(self, timeout: float | None = None) -> SpaceState:
        """Block until the state is built; a `RuntimeError` if it failed or ``timeout`` passed."""
        if not self._done.wait(timeout):
            raise RuntimeError(f"The Space did not start within {timeout} s (stage: {self.status()['stage']}).")
        if self.state is None:
            raise RuntimeError(f"The Space could not start: {self.error}")
        return self.state

    def status(self) -> dict:
        """Where the start is: ``ready``, ``failed``, ``stage`` (now), ``stages`` (each with its seconds, None while
        running), ``elapsed_s``, ``notices``, ``error``, ``source``, ``live`` (live explanations available),
        ``caches_loaded`` (engine caches read from disk) and ``library`` (hf_fastif's version and where it was
        imported from)."""
        with self._lock:
            stages = [dict(s) for s in self.stages]
        state = self.state
        return {
            "ready": state is not None, "failed": self.error is not None,
            "stage": (stages[-1]["stage"] if stages and stages[-1]["seconds"] is None else
                      None if state is not None or self.error is not None else "starting"),
            "stages": stages, "elapsed_s": round((self._finished or time.perf_counter()) - self._begun, 3),
            "notices": list(state.notices) if state is not None else [], "error": self.error,
            "source": state.source if state is not None else None,
            "live": state is not None and state.explainer is not None,
            "caches_loaded": sorted(set(state.explainer.loaded)) if state is not None and state.explainer else [],
            "library": {"version": library_version(), "imported_from": str(Path(__file__).resolve().parent)},
        }


def status_markdown(status: dict) -> str:
    """Markdown of a `Startup.status`: the stages so far while starting; the notices once ready; the error if the
    start failed."""
    if status["failed"]:
        return f"**The Space could not start:** {status['error']}"
    if status["ready"]:
        lines = [f"⚠️ {notice}" for notice in status["notices"]]
        lines.append(f"Ready (started in {status['elapsed_s']:.1f} s"
                     + (", live engine read from its cache)" if set(CACHED) <= set(status["caches_loaded"]) else ")"))
        return "\n\n".join(lines)
    lines = [f"**Starting… ({status['elapsed_s']:.0f} s)** The table and the live engine are being prepared; the "
             "page fills in when they are ready."]
    for stage in status["stages"]:
        done = f"done in {stage['seconds']:.1f} s" if stage["seconds"] is not None else "**now**"
        lines.append(f"- {stage['stage']}: {done}")
    return "\n".join(lines)


# ---- input checks ------------------------------------------------------------------------------------------
def check_text(text, name: str) -> str:
    text = "" if text is None else str(text).strip()
    if not text:
        raise ValueError(f"Type a {name}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The {name} has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed.")
    return text


def check_test_id(value) -> int:
    """A test id as the exact whole number it is, or a ValueError saying what to choose: any id a table can hold
    (int64: negative ids too, and ids past 2**53, which `check_int` rounded through float to a neighbour)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if isinstance(value, (float, np.floating)) and float(value).is_integer():  # a JSON client's 3.0
        return int(value)
    raise ValueError(f"Choose a test example (a test id, a whole number), got {value!r}.")


def candidate_slider(max_candidates: int) -> dict:
    """The live explanation's k slider over ``1 … max_candidates``: steps of 10 from 10 where the maximum is on that
    grid, else steps of 1 from 1 (a training set of fewer than 10 rows got a slider from 10 to its row count, whose
    every position was refused), starting at `LIVE_SETTINGS`' k or the maximum. One row: fixed at 1 (gradio refuses a
    slider whose minimum is its maximum)."""
    if max_candidates <= 1:
        return dict(minimum=0, maximum=1, step=1, value=1, interactive=False)
    tens = max_candidates >= 20 and max_candidates % 10 == 0
    return dict(minimum=10 if tens else 1, maximum=max_candidates, step=10 if tens else 1,
                value=min(LIVE_SETTINGS["influence_knn_k"], max_candidates))


def check_int(value, name: str, low: int, high: int | None) -> int:
    """``value`` as a whole number in ``[low, high]``, or a ValueError saying what to choose."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Choose a {name} (a whole number).") from None
    if not number.is_integer():
        raise ValueError(f"The {name} must be a whole number, got {value!r}.")
    if number < low or (high is not None and number > high):
        raise ValueError(f"The {name} must be between {low} and {high}, got {int(number)}." if high is not None
                         else f"The {name} must be at least {low}, got {int(number)}.")
    return int(number)

