"""Live influence for a pair the user types: `Explainer` holds one `InfluenceEngine` for the Space's life (its caches
saved to and read from disk, `runtime_versions` naming what they depend on), `encode_pair` checks and tokenizes the
pair, and `Explanation` is one answer."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
import transformers
from datasets import Dataset
from transformers import DataCollatorWithPadding
from transformers.utils import logging

from ..annotate import TRAIN_TEXT
from ..applications.common import predict
from ..arguments import InfluenceArguments
from ..batches import usable_positions
from ..data import NLI_MAX_LENGTH, tokenize_nli
from ..engine import InfluenceEngine
from ..influence import default_arguments
from ..params import num_parameters, select_parameters
from ..table import InfluenceTable
from ..utils import Timer, library_version, to_json, write_atomic
from .inputs import check_int, check_text
from .settings import (
    CACHED,
    LIVE_SETTINGS,
    MAX_CANDIDATES,
    MAX_LIVE_PARAMETERS,
    MAX_PAIR_TOKENS,
    MAX_ROWS,
    live_settings,
)

logger = logging.get_logger(__name__)

ENGINE_MANIFEST = "space_engine.json"


def runtime_versions() -> dict:
    """What the engine's cache keys depend on beyond content (the code hashed into the collator's fingerprint)."""
    return {"hf_fastif": library_version(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


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
        cache_dir: where `save_caches` writes the engine's caches and where they are read from now (unless
            ``load`` is False: a new build, whose caches replace what is there).
        max_length: the token limit the table's pairs were cut to (`table_max_length`): the training rows and typed
            pairs are cut the same way.

    Attributes:
        loaded: the caches read from ``cache_dir`` (`InfluenceEngine.load_caches` names).
        saved: whether this process wrote them (`save_caches`).
    """

    def __init__(self, model, tokenizer, train: Dataset, table_settings: dict, label_names: list[str],
                 train_ids: np.ndarray | None = None, *, cache_dir: str | os.PathLike | None = None,
                 max_length: int = NLI_MAX_LENGTH, load: bool = True):
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
        if self.cache_dir is not None and load:
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
        the default table, computed by the live engine (so its caches are built on the way) with the live settings'
        k, whatever k an `explain` call before it asked for."""
        with self._lock:
            self.engine.args = self._arguments(self.settings["influence_knn_k"])
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
