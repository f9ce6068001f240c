"""What the Gradio Space (spaces_demo/app.py) shows, without Gradio: loading a table, choosing test examples,
the rows, the plots, and live influence for a pair the user types. The app only lays out components and
turns the `ValueError`s raised here into messages.

The default table is built from the embedded default (generated NLI data and all-MiniLM-L6-v2 fine-tuned on them,
`hf_fastif.embedded`; the fine-tuned model itself is cached by content), offline, in about a minute on a CPU the
first time, and cached on disk.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from matplotlib.figure import Figure
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging

from .annotate import TRAIN_TEXT, TextSource, save_with_text
from .applications.common import predict
from .arguments import InfluenceArguments
from .data import tokenize_nli
from .embedded import (
    data_description,
    embedded_arguments,
    embedded_data,
    embedded_kind,
    train_embedded_model,
)
from .engine import InfluenceEngine
from .influence import default_arguments
from .table import InfluenceTable, InfluenceTableError
from .utils import to_json, write_atomic

logger = logging.get_logger(__name__)

CACHE_ENV = "HF_FASTIF_SPACE_CACHE"
TABLE_ENV = "HF_FASTIF_TABLE"
REVISION_ENV = "HF_FASTIF_TABLE_REVISION"
MODEL_ENV = "HF_FASTIF_MODEL"
MAX_TEXT_CHARS = 300
MAX_ROWS = 50
MAX_CANDIDATES = 500
MAX_TRAIN_ROWS = 5000
MAX_GRAPH_TESTS = 6
READY_FILE = "ready.json"
ALL = "all"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_fastif" / "space_default")


def build_default(directory: str | os.PathLike | None = None, args: InfluenceArguments | None = None, *,
                  max_train_samples: int | None = None, max_test_samples: int | None = None,
                  kind: str | None = None) -> Path:
    """Train (or, for MiniLM, load from the fine-tuning cache) the embedded model, compute its influence table on
    HANS-style test rows, and save ``table/`` (with text, predictions and label names), ``model/`` (model +
    tokenizer) and ``train.parquet`` under ``directory``. Reuses a finished build with the same settings and model.

    Args:
        directory: where the build goes (default: the Space's cache, `default_cache_dir`).
        args: training and influence settings (default: the embedded default's for the table,
            ``embedded_arguments(directory, use="table", kind=kind)``).
        max_train_samples: generated training rows (default: the kind's ``table_data``, 2,000).
        max_test_samples: use the first N of the 30 HANS-style test rows.
        kind: the embedded model, ``"minilm"`` (default) or ``"tiny"``.
    """
    settings = embedded_kind(kind)
    directory = Path(directory) if directory is not None else default_cache_dir()
    args = args if args is not None else embedded_arguments(str(directory), use="table", kind=settings.name)
    sizes = settings.table_data | ({"n_train": max_train_samples} if max_train_samples else {})
    build = json.loads(to_json({
        "model": settings.description, "kind": settings.name, "data": sizes, "max_test_samples": max_test_samples,
        "seed": args.seed,
        "training": {k: getattr(args, k) for k in ("num_train_epochs", "learning_rate", "per_device_train_batch_size")},
        "influence": args.influence_settings()}))
    ready = directory / READY_FILE
    if ready.is_file() and json.loads(ready.read_text()).get("config") == build:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    raw, tokenized, tokenizer = embedded_data(seed=args.seed, **sizes, kind=settings.name)
    model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=settings.name,
                                       description=data_description(args.seed, len(raw["train"])))
    hans, raw_hans = tokenized["hans"], raw["hans"]
    if max_test_samples:
        hans, raw_hans = (d.select(range(min(max_test_samples, len(d)))) for d in (hans, raw_hans))
    collator = DataCollatorWithPadding(tokenizer)
    with InfluenceEngine(model, args, data_collator=collator) as engine:
        table = engine.compute_influences(tokenized["train"], hans)
        predictions = predict(model, hans, engine=engine).argmax(-1)
    table.metadata["embedded_build"] = build | {"fine_tuning": info}
    save_with_text(table, directory / "table", model=model,
                   model_name=f"hf_fastif embedded default ({settings.description})",
                   train=TextSource(raw["train"], "hf_fastif generated NLI (embedded default)", "train"),
                   test=TextSource(raw_hans, "hf_fastif generated HANS-style NLI", "hans"), predictions=predictions)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    raw["train"].to_parquet(str(directory / "train.parquet"))
    write_atomic(ready, to_json({"config": build}))
    return directory


# ---- the state of the app ------------------------------------------------------------------------------
class Explainer:
    """Live influence for one typed pair: kNN candidates among ``train`` (at most `MAX_CANDIDATES`), s_test with
    the table's solver settings (bounded), one forward for the prediction. One computation at a time, through one
    `InfluenceEngine` held for the app's life: the training rows' trunk states and kNN index are computed on the
    first request and reused by every later one (the model does not change)."""

    def __init__(self, model, tokenizer, train: Dataset, settings: dict, label_names: list[str],
                 train_ids: np.ndarray | None = None):
        self.model, self.tokenizer, self.label_names = model.eval(), tokenizer, label_names
        self.train = train
        self.train_ids = np.arange(len(train)) if train_ids is None else np.asarray(train_ids)
        self.train_tokenized = tokenize_nli(train.select_columns(["premise", "hypothesis", "label"]), tokenizer)
        self.collator = DataCollatorWithPadding(tokenizer)
        self.settings = settings
        self.engine = InfluenceEngine(self.model, self._arguments(1), data_collator=self.collator)
        self._lock = threading.Lock()

    def _arguments(self, k: int) -> InfluenceArguments:
        fields = {f for f, spec in InfluenceArguments.__dataclass_fields__.items() if spec.init}
        settings = {k_: v for k_, v in self.settings.items() if k_.startswith("influence_") and k_ in fields}
        settings["influence_knn_k"] = k
        settings["influence_recursion_depth"] = min(settings.get("influence_recursion_depth") or 100, 200)
        settings["influence_repetitions"] = min(settings.get("influence_repetitions") or 2, 2)
        settings["influence_cg_max_iterations"] = min(settings.get("influence_cg_max_iterations") or 50, 50)
        if settings.get("influence_solver") == "exact":
            settings["influence_solver"] = "cg"
        return default_arguments(**settings, use_cpu=not torch.cuda.is_available())

    def predict(self, premise: str, hypothesis: str) -> dict[str, float]:
        batch = self.collator([self.tokenizer(premise, hypothesis, truncation=True)])
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.model.device) for k, v in batch.items()}).logits[0]
        return {name: float(p) for name, p in zip(self.label_names, torch.softmax(logits, -1).tolist())}

    def explain(self, premise: str, hypothesis: str, label: int, k: int, n: int) -> tuple[dict, pd.DataFrame,
                                                                                        pd.DataFrame]:
        """``(prediction, most helpful rows, most harmful rows)`` for a typed pair with gold ``label``."""
        premise, hypothesis = check_text(premise, "premise"), check_text(hypothesis, "hypothesis")
        k, n = check_int(k, "candidates", 1, min(MAX_CANDIDATES, len(self.train))), check_int(n, "rows", 1, MAX_ROWS)
        if label not in range(len(self.label_names)):
            raise ValueError(f"Choose the gold label of the pair ({' / '.join(self.label_names)}).")
        test = Dataset.from_dict({"premise": [premise], "hypothesis": [hypothesis], "label": [int(label)]})
        with self._lock:
            prediction = self.predict(premise, hypothesis)
            self.engine.args = self._arguments(k)
            table = self.engine.compute_influences(self.train_tokenized, tokenize_nli(test, self.tokenizer))
        table = table.add_text(self.train, columns=TRAIN_TEXT)
        helpful, harmful = table.helpful(0, n), table.harmful(0, n)
        for frame in (helpful, harmful):  # rows of the candidate set -> ids of the training data
            frame["train_id"] = self.train_ids[frame["train_id"].to_numpy()]
        return prediction, helpful, harmful


@dataclass
class SpaceState:
    """A loaded table, its test examples (one row per test id) and, when the model is at hand, an `Explainer`."""

    table: InfluenceTable
    source: str
    tests: pd.DataFrame
    label_names: list[str]
    explainer: Explainer | None = None

    @classmethod
    def from_table(cls, table: InfluenceTable, source: str, explainer: Explainer | None = None) -> SpaceState:
        tests = table.tests().rename(columns=lambda c: c.removeprefix("test_") if c != "test_id" else c)
        names = table.metadata.get("label_names") or (explainer.label_names if explainer else None)
        if not names:
            labels = [int(x) for x in tests["label"].dropna()] if "label" in tests else []
            names = [str(i) for i in range(max(labels, default=1) + 1)]
        if "label" in tests and "prediction" in tests:
            tests["correct"] = tests["label"] == tests["prediction"]
        return cls(table, source, tests, list(names), explainer)

    # ---- choosing a test example -----------------------------------------------------------------------
    def heuristics(self) -> list[str]:
        return sorted(self.tests["heuristic"].dropna().unique().tolist()) if "heuristic" in self.tests else []

    def choices(self, heuristic: str = ALL, correctness: str = ALL) -> list[tuple[str, int]]:
        """``(label, test_id)`` of the test examples matching the filters (``correctness``: all / correct /
        wrong)."""
        tests = self.tests
        if heuristic not in (ALL, None, "") and "heuristic" in tests:
            tests = tests[tests["heuristic"] == heuristic]
        if correctness in ("correct", "wrong") and "correct" in tests:
            tests = tests[tests["correct"] == (correctness == "correct")]
        return [(self._title(row), int(row.test_id)) for row in tests.itertuples()]

    def _title(self, row) -> str:
        mark = "" if not hasattr(row, "correct") else ("✓ " if row.correct else "✗ ")
        tag = f"[{row.heuristic}] " if hasattr(row, "heuristic") else ""
        text = f"{row.premise} ⇒ {row.hypothesis}" if hasattr(row, "premise") else ""
        return f"#{row.test_id} {mark}{tag}{text}".strip()

    def _test(self, test_id) -> pd.Series:
        test_id = check_int(test_id, "test example", 0, None)
        found = self.tests[self.tests["test_id"] == test_id]
        if found.empty:
            raise ValueError(f"Test example {test_id} is not in this table; choose one from the list.")
        return found.iloc[0]

    def describe(self, test_id) -> str:
        """Markdown: the pair, gold label and the model's prediction."""
        row = self._test(test_id)
        lines = [f"### Test example #{int(row.test_id)}"]
        if "premise" in row:
            lines += [f"**Premise:** {row.premise}", f"**Hypothesis:** {row.hypothesis}"]
        if "heuristic" in row:
            lines.append(f"**Heuristic:** {row.heuristic} / {row.get('subcase', '')}")
        if "label" in row:
            lines.append(f"**Gold:** {self.label_name(row.label)}")
        if "prediction" in row:
            verdict = "correct" if row.prediction == row.label else "**wrong**"
            lines.append(f"**Model's prediction:** {self.label_name(row.prediction)} ({verdict})")
        return "\n\n".join(lines)

    def label_name(self, value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        value = int(value)
        return self.label_names[value] if 0 <= value < len(self.label_names) else str(value)

    # ---- rows and plots --------------------------------------------------------------------------------
    def rows(self, test_id, n) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The n most helpful and n most harmful training rows, ready to show."""
        test_id, n = int(self._test(test_id).test_id), check_int(n, "rows", 1, MAX_ROWS)
        return self.display(self.table.helpful(test_id, n)), self.display(self.table.harmful(test_id, n))

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
        """Histogram of the influence of every candidate on one test example, the top n of each side marked."""
        test_id, n = int(self._test(test_id).test_id), check_int(n, "rows", 1, MAX_ROWS)
        values = np.sort(self.table.for_test(test_id)["influence"].to_numpy())
        fig = Figure(figsize=(6.4, 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.hist(values, bins=min(60, max(10, len(values) // 4)), color="#9aa5b1")
        if len(values):
            ax.axvspan(values[0], values[min(n, len(values)) - 1], color="#2e9e5b", alpha=0.25,
                       label=f"{n} most helpful")
            ax.axvspan(values[max(0, len(values) - n)], values[-1], color="#d64545", alpha=0.25,
                       label=f"{n} most harmful")
            ax.legend(loc="upper right", fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("influence  (negative = helpful, positive = harmful)")
        ax.set_ylabel("training rows")
        ax.set_title(f"Influence of {len(values)} candidates on test #{test_id}", fontsize=10)
        return fig

    def graph(self, test_id, heuristic: str = ALL, correctness: str = ALL, n: int = 3):
        """The influence graph: the chosen test example and a few others matching the filters, each linked to
        its n most helpful (green) and harmful (red) training rows; shared training rows join test examples."""
        import networkx as nx  # an optional dependency (hf_fastif[demo]): the rest of the module works without it

        test_id, n = int(self._test(test_id).test_id), check_int(n, "rows", 1, 10)
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
        pos = nx.spring_layout(g, seed=0, k=0.9)
        tests = [v for v, d in g.nodes(data=True) if d["kind"] == "test"]
        train = [v for v, d in g.nodes(data=True) if d["kind"] == "train"]
        nx.draw_networkx_nodes(g, pos, nodelist=train, node_size=60, node_color="#9aa5b1", ax=ax)
        nx.draw_networkx_nodes(g, pos, nodelist=tests, node_shape="s", ax=ax,
                               node_size=[260 if g.nodes[v]["main"] else 140 for v in tests],
                               node_color=["#3558d6" if g.nodes[v]["main"] else "#8fa4ee" for v in tests])
        for side, color in (("helpful", "#2e9e5b"), ("harmful", "#d64545")):
            edges = [(a, b) for a, b, d in g.edges(data=True) if d["side"] == side]
            nx.draw_networkx_edges(g, pos, edgelist=edges, edge_color=color, ax=ax, width=1.4, label=side)
        nx.draw_networkx_labels(g, pos, labels={v: f"test {v[1]}" for v in tests}, font_size=7, ax=ax)
        shared = [v for v in train if g.degree(v) > 1]
        nx.draw_networkx_labels(g, pos, labels={v: f"train {v[1]}" for v in shared}, font_size=6, ax=ax)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"Influence graph: {len(tests)} test examples, {len(train)} training rows "
                     f"({len(shared)} shared)", fontsize=10)
        return fig

    def summary(self) -> str:
        md = self.table.metadata
        model = (md.get("model") or {}).get("name_or_path")
        settings = md.get("settings") or {}
        live = "available" if self.explainer else "not available (no model loaded)"
        return (f"**Table:** {self.source} · {len(self.table):,} rows · {len(self.tests)} test examples · "
                f"model `{model}` · solver {settings.get('influence_solver')} · λ = {md.get('lambda')} · "
                f"kNN k = {settings.get('influence_knn_k_used', settings.get('influence_knn_k'))} · "
                f"live explanations {live}")


def load_state(source: str | None = None, *, revision: str | None = None, model: str | None = None) -> SpaceState:
    """The Space's table: ``source`` is a local table folder, a Hub dataset repo id, or None for the default
    (built on first use). ``model``: a local dir or Hub id of the table's model for live explanations
    (the default build brings its own)."""
    source = source if source is not None else os.environ.get(TABLE_ENV) or None
    revision = revision or os.environ.get(REVISION_ENV) or None
    model = model or os.environ.get(MODEL_ENV) or None
    if source is None:
        directory = build_default()
        table = InfluenceTable.load(directory / "table")
        explainer = _explainer(table, str(directory / "model"), Dataset.from_parquet(str(directory / "train.parquet")))
        built = json.loads((directory / READY_FILE).read_text()).get("config", {})
        return SpaceState.from_table(table, f"embedded default ({built.get('model', 'generated NLI')})", explainer)
    if Path(source).is_dir():
        table, label = InfluenceTable.load(source), f"local folder {source}"
    else:
        table = InfluenceTable.from_hub(source, revision=revision)
        label = f"Hub dataset {source}" + (f"@{revision}" if revision else "")
    explainer = _explainer(table, model, _train_from_table(table)) if model else None
    return SpaceState.from_table(table, label, explainer)


def _train_from_table(table: InfluenceTable) -> Dataset:
    """The training rows a table carries as text (``train_premise`` ...), as a dataset, at most
    `MAX_TRAIN_ROWS` of them: the candidates and Hessian data for live explanations."""
    needed = ["train_id", "train_premise", "train_hypothesis", "train_label"]
    if any(c not in table.column_names for c in needed):
        raise InfluenceTableError("Live explanations need a table that carries the training text "
                                  "(train_premise, train_hypothesis, train_label); build it with text.")
    frame = table.dataset.select_columns(needed).to_pandas().drop_duplicates("train_id").sort_values("train_id")
    frame = frame.head(MAX_TRAIN_ROWS).rename(columns=lambda c: c.removeprefix("train_"))
    return Dataset.from_pandas(frame.rename(columns={"id": "train_id"}), preserve_index=False)


def _explainer(table: InfluenceTable, model_name: str, train: Dataset) -> Explainer:
    model = AutoModelForSequenceClassification.from_pretrained(model_name, attn_implementation="eager")
    table.check_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    names = table.metadata.get("label_names") or [model.config.id2label[i] for i in range(model.config.num_labels)]
    ids = np.asarray(train["train_id"]) if "train_id" in train.column_names else None  # rows taken from a table
    return Explainer(model, tokenizer, train, table.metadata.get("settings") or {}, list(names), ids)


# ---- input checks ------------------------------------------------------------------------------------------
def check_text(text, name: str) -> str:
    text = "" if text is None else str(text).strip()
    if not text:
        raise ValueError(f"Type a {name}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The {name} has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed.")
    return text


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
