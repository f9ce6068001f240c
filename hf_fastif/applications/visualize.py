"""The train → test influence graph (FastIF §5.2): a bipartite graph linking HANS test points (grouped by heuristic)
to their most helpful and most harmful training rows, edges weighted by |influence|. Training rows that serve
many test points, or test points of several heuristics, stand out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset
from torch import nn

from ..arguments import InfluenceArguments
from ..data import HANS_HEURISTICS
from ..influence import compute_influences
from ..table import InfluenceTable
from .common import markdown_table, predict, pyplot

if TYPE_CHECKING:
    import networkx as nx


def _networkx():
    """networkx, imported on use (it is an optional dependency: ``pip install hf_fastif[demo]``)."""
    try:
        import networkx
    except ImportError as err:
        raise ImportError("The influence graph needs networkx: pip install networkx (or hf_fastif[demo]).") from err
    return networkx

PAPER_VISUALIZATION: dict = dict(test_points_per_heuristic=100, edges_per_test_point=10)
HEURISTIC_COLORS = {"lexical_overlap": "tab:orange", "subsequence": "tab:green", "constituent": "tab:purple"}


def sample_per_heuristic(heuristics: Sequence[str], n: int, seed: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Up to ``n`` rows of each heuristic (seeded), in heuristic order."""
    heuristics = np.asarray(heuristics, dtype=object)
    names = names or [h for h in HANS_HEURISTICS if h in set(heuristics.tolist())]
    rng = np.random.default_rng([seed, 5])
    rows = []
    for h in names:
        candidates = np.flatnonzero(heuristics == h)
        if len(candidates) == 0:
            raise ValueError(f"No test rows of heuristic {h!r}; the split has {sorted(set(heuristics.tolist()))}.")
        rows.append(np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False)))
    return np.concatenate(rows).astype(np.int64)


def influence_graph(table: InfluenceTable, test_info: Sequence[dict], train_info: Callable[[int], dict],
                    edges_per_test_point: int = 10) -> nx.Graph:
    """The bipartite graph: nodes ``test:<i>`` (``test_info[i]`` attributes, bipartite 1) and ``train:<id>``
    (``train_info(id)``, bipartite 0); per test point its ``edges_per_test_point`` most helpful (negative
    influence) and most harmful (positive) rows, edges with ``kind``, ``influence`` and ``weight`` = |influence|."""
    graph = _networkx().Graph()
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
                graph.add_edge(f"test:{t}", node, kind=kind, influence=float(value), weight=abs(float(value)))
    return graph


@dataclass
class InfluenceGraphResult:
    """The graph, the influence table behind it, and the settings."""

    graph: nx.Graph
    table: InfluenceTable
    settings: dict

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
        header = ["edges", "heuristic", "test points", "edges", "training rows", "shared with other heuristics",
                  "rows labelled non_entailment", "commonest training genres"]
        hubs = []
        for kind, nodes in summary["hubs"].items():
            for n in nodes[:3]:
                hubs.append(f"- {kind} hub {n['node']} ({n['test_points']} test points): {n.get('premise')} / "
                            f"{n.get('hypothesis')} [{n.get('label')}, {n.get('genre')}]")
        return ("### Influence graph\n\n"
                f"{self.settings['edges_per_test_point']} most helpful and most harmful training rows of each test "
                "point (k kNN candidates each).\n\n" + markdown_table(header, rows) + "\n\n" + "\n".join(hubs))

    def plot(self, seed: int = 0):
        """Two panels (helpful / harmful edges): test points coloured by heuristic, training rows grey, edge
        width ∝ |influence|; a spring layout pulls training rows that serve many test points together."""
        plt = pyplot()
        nx = _networkx()
        fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
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
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=h) for h, c in HEURISTIC_COLORS.items()]
        handles.append(plt.Line2D([], [], marker="o", linestyle="", color="lightgray", label="training row"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
        fig.suptitle("Training → HANS test influence")
        return fig


def run_visualization(model: nn.Module, train_dataset: Dataset, hans_dataset: Dataset, args: InfluenceArguments, *,
                      test_points_per_heuristic: int = 100, edges_per_test_point: int = 10, seed: int = 0,
                      heuristics: Sequence[str] | None = None, data_collator: Callable | None = None,
                      raw_train: Dataset | None = None) -> InfluenceGraphResult:
    """Influence of the training rows on HANS test points grouped by heuristic, as a bipartite graph.

    Args:
        model: the trained model.
        train_dataset: tokenized training rows.
        hans_dataset: tokenized HANS rows with ``labels`` and ``heuristic`` (e.g. the held-out test split).
        args: the ``influence_*`` settings (one s_test per test point; k kNN candidates each).
        test_points_per_heuristic / edges_per_test_point: the paper's 100 / 10.
        raw_train: the untokenized training rows (premise, hypothesis, genre) to label the training nodes.
    """
    if "heuristic" not in hans_dataset.column_names:
        raise ValueError(f"hans_dataset needs a 'heuristic' column (found {hans_dataset.column_names}).")
    names = list(heuristics) if heuristics else None
    rows = sample_per_heuristic(hans_dataset["heuristic"], test_points_per_heuristic, seed, names)
    tests = hans_dataset.select(rows)
    table = compute_influences(model, train_dataset, tests, args, data_collator=data_collator)
    predictions = predict(model, tests, data_collator).argmax(-1)
    test_info = [{"heuristic": tests[i]["heuristic"], "label": int(tests[i]["labels"]),
                  "subcase": tests[i].get("subcase"), "correct": bool(predictions[i] == tests[i]["labels"]),
                  "row": int(rows[i])} for i in range(len(tests))]
    text = raw_train if raw_train is not None else train_dataset
    columns = [c for c in ("premise", "hypothesis", "genre") if c in text.column_names]
    labels = np.asarray(train_dataset["labels"])

    def train_info(i: int) -> dict:
        info = {"label": int(labels[i])}
        if columns:
            row = text[i]
            info |= {c: row[c] for c in columns}
        return info

    graph = influence_graph(table, test_info, train_info, edges_per_test_point)
    settings = {"test_points_per_heuristic": test_points_per_heuristic, "edges_per_test_point": edges_per_test_point,
                "heuristics": sorted(set(t["heuristic"] for t in test_info), key=lambda h: (h not in HANS_HEURISTICS,
                                     HANS_HEURISTICS.index(h) if h in HANS_HEURISTICS else 0, h)),
                "num_test_points": len(tests), "seed": seed, "influence": args.influence_settings()}
    return InfluenceGraphResult(graph=graph, table=table, settings=settings)
