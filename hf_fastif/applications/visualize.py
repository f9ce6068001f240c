"""The train → test influence graph (FastIF §5.2): a bipartite graph linking HANS test points (grouped by heuristic)
to their most helpful and most harmful training rows, edges weighted by |influence|. Training rows that serve
many test points, or test points of several heuristics, stand out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from datasets import Dataset
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn
from transformers.utils import logging

from .. import distributed as D
from ..annotate import TextSource, save_with_text
from ..arguments import InfluenceArguments
from ..data import HANS_HEURISTICS, NLI2_LABELS
from ..engine import InfluenceEngine
from ..table import InfluenceTable
from ..utils import markdown_table
from .common import (
    ApplicationData,
    check_heuristics,
    check_num_labels,
    heuristic_order,
    heuristic_seed,
    heuristics_in,
    predict,
)

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    import networkx as nx

HEURISTIC_COLORS = {"lexical_overlap": "tab:orange", "subsequence": "tab:green", "constituent": "tab:purple"}


def _networkx():
    """networkx, imported on use: an optional dependency (``pip install hf_fastif[demo]``)."""
    try:
        import networkx
    except ImportError as err:
        raise ImportError("The influence graph needs networkx: pip install networkx (or hf_fastif[demo]).") from err
    return networkx


@dataclass
class VisualizationArguments:
    """The influence-graph protocol, passed whole to `run_visualization` (defaults: the paper's)."""

    PAPER: ClassVar[dict] = dict(test_points_per_heuristic=100, edges_per_test_point=10)
    """The paper's protocol, for the table of settings that differ from it."""
    QUICK: ClassVar[dict] = dict(test_points_per_heuristic=3)
    """``--quick``: a smoke run (not a measurement)."""

    test_points_per_heuristic: int = field(default=100, metadata={
        "help": "HANS test points per heuristic (paper: 100; embedded default: 30)."})
    edges_per_test_point: int = field(default=10, metadata={"help": "Most helpful and most harmful rows per test point."})
    heuristics: list[str] | None = field(default=None, metadata={
        "help": "Heuristics to show (default: all of the test split); HANS' names in any case, a near miss refused."})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the fix for a bad setting (also called by `run_visualization`)."""
        for name in ("test_points_per_heuristic", "edges_per_test_point"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        # at parse time, before any training: HANS' spelling, "did you mean" for a near miss, no repeats, not empty
        self.heuristics = check_heuristics(self.heuristics)

    def used(self) -> dict:
        """The settings `PAPER` names, as used."""
        return {k: getattr(self, k) for k in self.PAPER}


def sample_per_heuristic(heuristics: Sequence[str], n: int, seed: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Up to ``n`` rows of each heuristic, in heuristic order; each heuristic's draw is seeded by ``seed`` and the
    heuristic alone (`heuristic_seed`), so its rows do not change with the other heuristics named or their order."""
    heuristics = np.asarray(heuristics, dtype=object)
    names = names or [h for h in HANS_HEURISTICS if h in set(heuristics.tolist())]
    rows = []
    for h in names:
        candidates = np.flatnonzero(heuristics == h)
        if len(candidates) == 0:
            raise ValueError(f"No test rows of heuristic {h!r}; the split has {sorted(set(heuristics.tolist()))}.")
        rng = np.random.default_rng([seed, 5, heuristic_seed(h)])
        rows.append(np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False)))
    return np.concatenate(rows).astype(np.int64)


def influence_graph(table: InfluenceTable, test_info: Sequence[dict], train_info: Callable[[int], dict],
                    edges_per_test_point: int = 10) -> nx.DiGraph:
    """The bipartite graph: nodes ``test:<i>`` (``test_info[i]`` attributes, bipartite 1) and ``train:<id>``
    (``train_info(id)``, bipartite 0); per test point its ``edges_per_test_point`` most helpful (negative
    influence) and most harmful (positive) rows, edges directed from the training row to the test point it
    influences (as saved: ``source`` the training row, ``target`` the test point; undirected, networkx wrote either
    end first), with ``kind``, ``influence`` and ``weight`` = |influence|."""
    graph = _networkx().DiGraph()
    for t in table.test_ids:
        graph.add_node(f"test:{t}", bipartite=1, side="test", **test_info[t])
        for kind, frame in (("helpful", table.helpful(t, edges_per_test_point)),
                            ("harmful", table.harmful(t, edges_per_test_point))):
            for train_id, value in zip(frame["train_id"].tolist(), frame["influence"].tolist()):
                if (kind == "helpful") != (value < 0):
                    continue  # fewer than n rows of this sign among the candidates
                node = f"train:{train_id}"
                if node not in graph:
                    graph.add_node(node, bipartite=0, side="train", **train_info(int(train_id)))
                graph.add_edge(node, f"test:{t}", kind=kind, influence=float(value), weight=abs(float(value)))
    return graph


@dataclass
class InfluenceGraphResult:
    """The graph, the influence table behind it, the settings, and the training rows' text (for the saved table)."""

    graph: nx.DiGraph
    table: InfluenceTable
    settings: dict
    raw_train: Dataset | None = None
    tests: Dataset | None = None  # the sampled test points, in test_id order (rows ``hans_test_rows`` of hans_test)

    def summary(self) -> dict:
        """Per heuristic and edge kind: test points, edges, distinct training rows, rows shared with other
        heuristics, the share of rows labelled non_entailment, and the commonest training genres."""
        out: dict = {}
        graph = self.graph
        for kind in ("helpful", "harmful"):
            edges = [(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == kind]
            heuristics_of: dict[str, set] = {}
            for u, v in edges:
                test, train = (u, v) if u.startswith("test:") else (v, u)
                heuristics_of.setdefault(train, set()).add(graph.nodes[test]["heuristic"])
            for h in self.settings["heuristics"]:
                tests = [n for n, d in graph.nodes(data=True) if d["side"] == "test" and d["heuristic"] == h]
                rows = sorted({train for train, hs in heuristics_of.items() if h in hs})
                labels = [graph.nodes[r].get("label") for r in rows]
                genres = Counter(graph.nodes[r].get("genre") for r in rows if graph.nodes[r].get("genre") is not None)
                out.setdefault(kind, {})[h] = {
                    "test_points": len(tests),
                    "edges": sum(1 for u, v in edges if graph.nodes[u if u.startswith("test:") else v]["heuristic"] == h),
                    "train_rows": len(rows),
                    "shared_with_other_heuristics": sum(1 for r in rows if len(heuristics_of[r]) > 1),
                    "non_entailment_share": float(np.mean([lab == 1 for lab in labels])) if labels else float("nan"),
                    "top_genres": genres.most_common(3),
                }
            degrees = Counter()
            for u, v in edges:
                degrees[u if u.startswith("train:") else v] += 1
            out.setdefault("hubs", {})[kind] = [
                {"node": n, "test_points": d, **{k: graph.nodes[n].get(k) for k in ("premise", "hypothesis", "label",
                                                                                    "genre")}}
                for n, d in degrees.most_common(5)]
        return out

    def to_dict(self) -> dict:
        return {"title": "Influence graph", "settings": self.settings, "summary": self.summary(),
                "graph": _networkx().node_link_data(self.graph, edges="edges")}

    def to_markdown(self) -> str:
        summary = self.summary()
        rows = []
        for kind in ("helpful", "harmful"):
            for h, s in summary[kind].items():
                genres = ", ".join(f"{g} ({c})" for g, c in s["top_genres"])
                rows.append([kind, h, s["test_points"], s["edges"], s["train_rows"], s["shared_with_other_heuristics"],
                             f"{100 * s['non_entailment_share']:.0f}%", genres])
        header = ["kind", "heuristic", "test points", "edges", "training rows", "shared with other heuristics",
                  "rows labelled non_entailment", "commonest training genres"]
        hubs = []
        for kind, nodes in summary["hubs"].items():
            for n in nodes[:3]:
                label = n.get("label")  # (the model's 2 labels in NLI order: run_visualization checks them)
                name = NLI2_LABELS[label] if isinstance(label, int) and 0 <= label < len(NLI2_LABELS) else label
                hubs.append(f"- {kind} hub {n['node']} ({n['test_points']} test points): {n.get('premise')} / "
                            f"{n.get('hypothesis')} [{name}, {n.get('genre')}]")
        influence = self.settings.get("influence") or {}
        k = influence.get("influence_knn_k")
        candidates = ("every training row scored" if k is None or k >= self.settings.get("num_train", k + 1) else
                      f"of {k:,} candidates each, {_candidate_method(influence.get('influence_knn_features'))}")
        return ("### Influence graph\n\n"
                f"{self.settings['edges_per_test_point']} most helpful and most harmful training rows of each test "
                f"point ({candidates}).\n\n" + markdown_table(header, rows) + "\n\n" + "\n".join(hubs))

    def plot(self, seed: int | None = None) -> Figure:
        """Two panels (helpful / harmful edges): test points coloured by heuristic, training rows grey, edge
        width ∝ |influence|; a spring layout (seeded: ``seed``, default the run's) pulls training rows that serve
        many test points together."""
        nx = _networkx()
        seed = self.settings.get("seed", 0) if seed is None else seed
        fig = Figure(figsize=(13, 6.2))
        axes = fig.subplots(1, 2)
        for ax, kind, edge_color in zip(axes, ("helpful", "harmful"), ("tab:blue", "tab:red")):
            sub = nx.Graph()
            sub.add_edges_from((u, v, d) for u, v, d in self.graph.edges(data=True) if d["kind"] == kind)
            if sub.number_of_edges() == 0:
                ax.set_axis_off()
                continue
            weights = np.array([d["weight"] for _, _, d in sub.edges(data=True)])
            scaled = weights / weights.max()
            pos = nx.spring_layout(sub, weight="weight", seed=seed, iterations=60)
            tests = [n for n in sub if n.startswith("test:")]
            trains = [n for n in sub if n.startswith("train:")]
            nx.draw_networkx_edges(sub, pos, ax=ax, width=0.3 + 2.0 * scaled, edge_color=edge_color, alpha=0.35)
            nx.draw_networkx_nodes(sub, pos, nodelist=trains, ax=ax, node_size=[6 + 6 * sub.degree(n) for n in trains],
                                   node_color="lightgray", edgecolors="gray", linewidths=0.3)
            nx.draw_networkx_nodes(sub, pos, nodelist=tests, ax=ax, node_size=28,
                                   node_color=[HEURISTIC_COLORS.get(self.graph.nodes[n]["heuristic"], "black")
                                               for n in tests])
            ax.set_title(f"{kind} edges (width ∝ |influence|)")
            ax.set_axis_off()
        shown = {d.get("heuristic") for _, d in self.graph.nodes(data=True) if d.get("side") == "test"}
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=h) for h, c in HEURISTIC_COLORS.items()
                   if h in shown]
        handles.append(Line2D([], [], marker="o", linestyle="", color="lightgray", label="training row"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
        fig.suptitle("Training → HANS test influence")
        return fig


    def save_files(self, directory: str | Path) -> list[Path]:
        """The influence table behind the graph, as ``<directory>/influence_table``, with the training rows' text
        and the test points' (heuristic, subcase, and their text where the rows carry it). ``test_id`` is the
        test point's position in the sample; its row of ``hans_test`` is in the metadata (``test_data``
        ``hans_test_rows``) and on the graph's test nodes (``row``)."""
        path = Path(directory) / "influence_table"
        save_with_text(self.table, path, train=None if self.raw_train is None else TextSource(self.raw_train),
                       test=None if self.tests is None else TextSource(self.tests))
        return [path]


def _candidate_method(features) -> str:
    """How the report names ``influence_knn_features``' candidates."""
    if features == "gradient":
        return "from the gradient index (projected training gradients along ±s_test)"
    if features in (None, "auto"):
        return ("kNN on the model's own features (auto: the pooled [CLS] output where the model has a pooler, as "
                "the paper's)")
    return f"kNN on {features} features"


def check_visualization(data, args, protocol: VisualizationArguments) -> None:
    """Check the protocol against the data a run will use, before any work (the recipe calls this before the model is
    trained or loaded): its own numbers, and no more edges per test point than the candidates each one scores (the
    report named more edges than there were)."""
    protocol.validate()
    scored = len(data.train) if args.influence_knn_k is None else min(args.influence_knn_k, len(data.train))
    if protocol.edges_per_test_point > scored:
        raise ValueError(f"edges_per_test_point={protocol.edges_per_test_point} exceeds the {scored} candidate rows "
                         f"each test point scores (influence_knn_k={args.influence_knn_k}, {len(data.train)} training "
                         "rows): lower --edges_per_test_point or raise influence_knn_k.")


def run_visualization(model: nn.Module, data: ApplicationData, args: InfluenceArguments,
                      protocol: VisualizationArguments) -> InfluenceGraphResult:
    """Influence of the training rows on HANS test points grouped by heuristic, as a bipartite graph.

    Args:
        model: the trained model.
        data: ``train`` (tokenized training rows), ``hans_test`` (tokenized HANS rows with ``labels`` and
            ``heuristic``: the test points), ``collator``, and ``raw_train`` (the untokenized training rows:
            premise, hypothesis, genre) to label the training nodes and the table.
        args: the ``influence_*`` settings (one s_test per test point; k kNN candidates each); ``seed`` seeds the
            choice of test points and the layout.
        protocol: test points per heuristic, edges per test point (the paper's 100 / 10), which heuristics
            (default: every heuristic of ``hans_test``, HANS' first); each must have test rows, checked with the
            model's labels (2, NLI order) before any influence is computed.
    """
    check_visualization(data, args, protocol)
    data.require("hans_test", what="The influence graph")
    check_num_labels(model, 2, "The HANS influence graph")  # HANS' labels, read as the model's classes
    hans = data.hans_test
    names = heuristics_in({"data.hans_test": hans["heuristic"]}, protocol.heuristics, "The influence graph",
                          "Name others with heuristics=, or omit it for every heuristic of the split.")
    rows = sample_per_heuristic(hans["heuristic"], protocol.test_points_per_heuristic, args.seed, names)
    tests = hans.select(rows)
    taken = dict(Counter(tests["heuristic"]))
    fewer = {h: n for h, n in taken.items() if n < protocol.test_points_per_heuristic}
    if fewer and D.is_main_process():  # (the graph took every row of a smaller heuristic, unsaid)
        logger.warning(f"test_points_per_heuristic={protocol.test_points_per_heuristic}: "
                       f"{', '.join(f'{h} has {n} HANS test rows' for h, n in fewer.items())}, so the graph takes "
                       "every one of them (recorded as settings.test_points_by_heuristic).")
    with InfluenceEngine(model, args, data_collator=data.collator) as engine:
        table = engine.compute_influences(data.train, tests)
        predictions = predict(model, tests, engine=engine).argmax(-1)
    test_info = [{"heuristic": tests[i]["heuristic"], "label": int(tests[i]["labels"]),
                  "subcase": tests[i].get("subcase"), "correct": bool(predictions[i] == tests[i]["labels"]),
                  "row": int(rows[i])} for i in range(len(tests))]
    text = data.raw_train if data.raw_train is not None else data.train
    columns = [c for c in ("premise", "hypothesis", "genre") if c in text.column_names]
    labels = np.asarray(data.train["labels"])

    def train_info(i: int) -> dict:
        info = {"label": int(labels[i])}
        if columns:
            row = text[i]
            info |= {c: row[c] for c in columns}
        return info

    table.metadata["test_data"] = (table.metadata.get("test_data") or {}) | {"hans_test_rows": [int(r) for r in rows]}
    graph = influence_graph(table, test_info, train_info, protocol.edges_per_test_point)
    settings = {"test_points_per_heuristic": protocol.test_points_per_heuristic, "test_points_by_heuristic": taken,
                "edges_per_test_point": protocol.edges_per_test_point,
                "heuristics": sorted(set(t["heuristic"] for t in test_info), key=heuristic_order),
                "num_test_points": len(tests), "num_train": len(data.train), "seed": args.seed,
                "influence": args.influence_settings()}
    return InfluenceGraphResult(graph=graph, table=table, settings=settings, raw_train=data.raw_train, tests=tests)
