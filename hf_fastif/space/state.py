"""What the page shows of a loaded table: `SpaceState` (choosing test examples, the rows, their counts, the histogram
and the influence graph, the summary) and the Markdown of its notes and of a live explanation."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from transformers.utils import logging

from ..table import InfluenceTable
from ..table.format import label_id, label_text
from .explainer import Explainer, Explanation
from .inputs import check_int, check_test_id
from .settings import MAX_GRAPH_TESTS, MAX_ROWS

logger = logging.get_logger(__name__)

ALL = "all"


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
            return f"**No {side} training row** among the {_candidates(total)}: none has {sign} influence."
        if found < n:
            return (f"Only **{found}** of the {_candidates(total)} {'has' if found == 1 else 'have'} {sign} influence "
                    f"({side}); {'it is' if found == 1 else 'all of them are'} shown.")
        return f"The {n} most {side} of the **{found:,}** candidates with {sign} influence (of {total:,})."

    return note(counts["num_helpful"], "helpful", "negative"), note(counts["num_harmful"], "harmful", "positive")


def _candidates(n: int) -> str:
    """``"1 candidate"``, ``"2 candidates"``."""
    return f"{n:,} candidate{'' if n == 1 else 's'}"


def _code(text: str) -> str:
    """``text`` as one Markdown code span, fenced by more backticks than it holds in a row (a typed ` ended a
    single-backtick span, and typed Markdown outside one rendered: *z* in italics)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def counts_note(counts: dict, note: str | None = None) -> str:
    """Markdown: the sign counts, ties and range of one test example's candidate influences, then ``note`` (how the
    candidates were chosen, e.g. `InfluenceTable.candidates_note`) in italics."""
    total, distinct = counts["num_candidates"], counts["num_distinct_values"]
    parts = [f"**{_candidates(total)}:** {counts['num_helpful']:,} helpful (< 0), {counts['num_harmful']:,} "
             f"harmful (> 0), {counts['num_zero']:,} exactly 0" + (f", {counts['num_nan']:,} NaN" if counts.get(
                 "num_nan") else "")]
    finite = total - counts.get("num_nan", 0)
    if finite and distinct == 1:
        parts.append(f"**every candidate has the same influence ({counts['min']:+.3e}): the lists rank nothing**")
    elif distinct < finite:
        tied = finite - distinct
        parts.append(f"{distinct:,} distinct values (ties: {tied:,} {'row shares' if tied == 1 else 'rows share'} a "
                     "value with another)")
    else:
        parts.append(f"{distinct:,} distinct values")
    if counts.get("min") is not None:
        parts.append(f"min {counts['min']:+.3e} · median {counts['median']:+.3e} · max {counts['max']:+.3e}")
    return " · ".join(parts) + (f"\n\n*{note}*" if note else "")


def explanation_summary(explanation: Explanation, state: SpaceState | None = None) -> str:
    """Markdown for a live explanation: how the model read the pair (word pieces; unknown words named), the
    candidates' counts and the time it took."""
    lines = [f"**How the model reads it** ({len(explanation.pieces)} word pieces): {_code(' '.join(explanation.pieces))}"]
    if explanation.length is not None and explanation.length > len(explanation.pieces):
        lines.append(f"**Cut** from {explanation.length} to {len(explanation.pieces)} word pieces (longest sentence "
                     "first), as the table's pairs were cut: the model reads the pair as shown.")
    if explanation.unknown:
        words = ", ".join(_code(w) for w in explanation.unknown)
        lines.append(f"**Unknown to the tokenizer** (read as its unknown token, so they carry no meaning): {words}")
    lines.append(counts_note(explanation.counts, explanation.candidates_note))
    lines.append(f"Computed in {explanation.seconds:.2f} s over {_candidates(explanation.k)}.")
    if explanation.stages:
        lines.append("Steps (s): " + " · ".join(f"{name} {seconds:.3f}" for name, seconds in explanation.stages.items()))
    return "\n\n".join(lines)
