"""The paper table's report: the project's own targets, two plots and the markdown of a result."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib
import numpy as np

from hf_fastif.readout import cut_in_words
from hf_fastif.utils import markdown_table, to_json, write_atomic

from .paper_setup import FAST, FASTIF, LOW_RANK, PARALLEL, STACKED

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import matplotlib.ticker  # noqa: E402

QUALITY_COLUMNS = ["pearson", "spearman"]
"""The quality columns every row has; its recall@n columns follow (n = 10 and 100, capped at N: hf_fastif.recall.recall_ns)."""


def check_unit(u: dict, key: str) -> str:
    """The convergence check's unit at B = ``key``, with how it ended where it did not simply pass."""
    status = u.get("check_confirmed", {}).get(key, "passed")
    return f"power_iteration[B={key}] {u['power_iteration'][key]:.3g}" + ("" if status == "passed" else f" ({status})")


def _cell(value, format_: Callable | None) -> str:
    if value is None or value == "":
        return ""
    if format_ is not None:
        return format_(value)
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def save_and_print(folder: str | Path, stem: str, results: dict, text: str) -> None:
    """Write ``<stem>.json`` (the raw results) and ``<stem>.md`` (the report) to ``folder``, then print the report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{stem}.json", to_json(results, indent=1))
    write_atomic(folder / f"{stem}.md", text)
    print(text)


def rows_table(rows: list[dict], columns: list[str], formats: dict[str, Callable] | None = None) -> str:
    """A markdown table of ``rows`` (dicts), one column per name in ``columns``: floats to 3 significant
    digits, booleans as yes / **no**, ``formats[column]`` where given."""
    formats = formats or {}
    return markdown_table(columns, [[_cell(row.get(c), formats.get(c)) for c in columns] for row in rows])


def targets(rows: list[dict], paper_rows: list[dict], paper_t: int) -> list[dict]:
    """The project's pass marks: speed-ups at the paper's scale (FastIF >= 80x as in the paper, hf_fastif fast
    >= 200x), each against the 2021 code path's original and an original with hf_fastif's kernels, and measured
    Spearman with original (FastIF >= 0.9, fast >= 0.95); the same marks as "fast"'s for "low-rank" (the arnoldi
    solver, the library's other fast setting), listed as its own lines."""
    by_name = {r["row"]: r for r in rows}
    paper = {r["row"]: r for r in paper_rows}

    def speedups(name: str) -> tuple[float, float]:
        r = paper[name]
        return r["speed-up vs original (hf_fastif kernels)"], r["speed-up vs original (2021 code path)"]

    f_same, _ = speedups(FASTIF)
    f_2021 = paper["original (2021 code path)"]["seconds"] / paper["FastIF (2021 code path)"]["seconds"]
    x_same, x_2021 = speedups(FAST)
    fastif_q, fast_q = by_name[FASTIF]["spearman"], by_name[FAST]["spearman"]
    out = [
        {"target": "FastIF >= 80x at paper scale, both as the 2021 code scores (per-example loop; the paper's "
                   "measurement)", "measured": f"{f_2021:.1f}x", "met": f_2021 >= 80},
        {"target": "FastIF >= 80x at paper scale, both with hf_fastif kernels", "measured": f"{f_same:.1f}x",
         "met": f_same >= 80},
        {"target": "hf_fastif fast >= 200x at paper scale, vs original as the 2021 code scores",
         "measured": f"{x_2021:.1f}x", "met": x_2021 >= 200},
        {"target": "hf_fastif fast >= 200x at paper scale, vs original with hf_fastif kernels",
         "measured": f"{x_same:.1f}x", "met": x_same >= 200},
        {"target": "FastIF Spearman with original >= 0.9 (measured, shared candidates)",
         "measured": f"{fastif_q:.3f} (min over test points {by_name[FASTIF]['spearman_min']:.3f})",
         "met": fastif_q >= 0.9},
        {"target": "hf_fastif fast Spearman with original >= 0.95 (measured, shared candidates)",
         "measured": f"{fast_q:.3f} (min over test points {by_name[FAST]['spearman_min']:.3f})", "met": fast_q >= 0.95},
    ]
    ideal = f"{PARALLEL} (P={paper_t}, ideal)"
    if ideal in paper:
        p_same, p_2021 = speedups(ideal)
        out.insert(2, {"target": f"(FastIF parallel over P = T = {paper_t} processes, the paper's GPUs, "
                                 "ideal split) >= 80x at paper scale, vs original as the 2021 code scores",
                       "measured": f"{p_2021:.1f}x", "met": p_2021 >= 80})
        out.insert(3, {"target": f"(FastIF parallel, P = {paper_t}, ideal) >= 80x at paper scale, vs "
                                 "original with hf_fastif kernels", "measured": f"{p_same:.1f}x", "met": p_same >= 80})
    if STACKED in paper:  # (where this run's setting stacks the repetitions: the engine's default there)
        s_same, _ = speedups(STACKED)
        out.insert(2, {"target": f"({STACKED}: one step's T = {paper_t} products as one computation) >= 80x at "
                                 "paper scale, vs original with hf_fastif kernels", "measured": f"{s_same:.1f}x",
                       "met": s_same >= 80})
    if LOW_RANK in paper and LOW_RANK in by_name:
        r_same, r_2021 = speedups(LOW_RANK)
        r_q = by_name[LOW_RANK]["spearman"]
        out += [
            {"target": f"({LOW_RANK}, the arnoldi solver) >= 200x at paper scale, vs original as the 2021 code "
                       "scores", "measured": f"{r_2021:.1f}x", "met": r_2021 >= 200},
            {"target": f"({LOW_RANK}) >= 200x at paper scale, vs original with hf_fastif kernels",
             "measured": f"{r_same:.1f}x", "met": r_same >= 200},
            {"target": f"({LOW_RANK}) Spearman with original >= 0.95 (measured, shared candidates)",
             "measured": f"{r_q:.3f} (min over test points {by_name[LOW_RANK]['spearman_min']:.3f})",
             "met": r_q >= 0.95},
        ]
    return out


def sweep_title(points: list[dict], original_batch_size: int, original_depth: int) -> str:
    """The sweep plot's title: its grid, and the original it is compared with, as this run configured it."""
    batch_sizes = sorted({p["B"] for p in points})
    depths = sorted({p["J"] for p in points})
    return (f"s_test sweep: J ∈ {depths}, B ∈ {batch_sizes}, T repetitions (vs original: B={original_batch_size}, "
            f"J={original_depth}, T=1)")


def plot_sweep(points: list[dict], path: Path, original_batch_size: int, original_depth: int) -> None:
    """Agreement with original (B = ``original_batch_size``, J = ``original_depth``, T = 1) vs s_test seconds per
    test point, one series per (B, T), marker size by J (points the engine refused are left out; the table lists
    them)."""
    points = [p for p in points if "refused" not in p]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    batch_sizes = sorted({p["B"] for p in points})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(batch_sizes)))
    markers = {1: "o", 2: "s", 3: "^", 4: "D"}
    depths = sorted({p["J"] for p in points})
    for ax, metric in zip(axes, ("spearman", "pearson")):
        for color, b in zip(colors, batch_sizes):
            for t in sorted({p["T"] for p in points if p["B"] == b}):
                sel = [p for p in points if p["B"] == b and p["T"] == t]
                ax.plot([p["s_test_s_per_test_point"] for p in sel], [p[metric] for p in sel],
                        marker=markers.get(t, "x"), color=color, alpha=0.85, linestyle=":",
                        label=f"B={b}, T={t}")
                for p in sel:
                    size = 5 + 4 * depths.index(p["J"])
                    ax.plot(p["s_test_s_per_test_point"], p[metric], marker=markers.get(t, "x"), color=color,
                            markersize=size, alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("s_test seconds per test point (larger marker: larger J)")
        ax.set_ylabel(f"{metric.capitalize()} with original")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(sweep_title(points, original_batch_size, original_depth))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_knn_recall(curve: dict, path: Path, n_rows: int) -> None:
    """`knn_recall_curve` on a log k axis, with random candidates (k/N) for comparison."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, style in ((k, "-" if "helpful" in k else "--") for k in curve if k.startswith("recall@")):
        ax.plot(curve["k"], curve[key], style, marker="o", markersize=3, label=key)
    ax.plot(curve["k"], curve["random"], ":", color="gray", label="random candidates (k/N)")
    ax.set_xscale("log")
    ax.set_xlabel(f"k nearest neighbours (N = {n_rows})")
    ax.set_ylabel("share of the full scan's top rows inside the k NN")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("kNN recall vs k (helpful and harmful separately)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict) -> str:
    """The markdown report of a `benchmarks.paper_table` result."""
    s, env = results["scale"], results["environment"]
    lines = ["# hf_fastif benchmark: the paper's speed–quality table\n",
             f"`{results['command']}`\n",
             f"hf_fastif {env['hf_fastif']}, torch {env['torch']}, {env['threads']} torch thread(s) "
             f"(set by the benchmark for stable timings on a shared machine), {env['cpus']} CPUs, "
             f"load average {env['load_before']} before / {env['load_after']} "
             f"after, device {env['device']}; total {results['total_s']:.0f}s ("
             + ", ".join(f"{k} {v:.0f}s" for k, v in results.get("stages_s", {}).items()) + ").\n",
             f"**Scale of this run.** {s['statement']}\n",
             "## Measured, side by side in one run\n",
             "Seconds per test point: the median over a row's calls, the rows' calls interleaved test point by "
             "test point (a shared machine's load falls on all alike); every kNN row's index (training features, "
             f"influence_knn_features={results['knn'].get('features', 'auto')!r}) is built once "
             f"({results['knn']['index_build_s']:.2f}s here) and each query costs {results['knn']['query_s'] * 1e3:.1f} ms. "
             "Every row's seconds leave out its calls' trunk phase (`trunk_s`: the training rows' frozen-layer states, "
             f"{results['rows'][0]['diagnostics'].get('trunk_s', 0.0):.2f}s in the original's first call), a one-off "
             "per model and data as in the cost model, so the rows on a fresh engine per call and the low-rank row's "
             "kept engine, whose later calls find them cached, are charged alike. "
             "Quality: Pearson / Spearman with original on the candidates each row scores, recall@n of the original's "
             "n most helpful / harmful rows among all N; means over the test points.\n"]
    recalls = [key for key in results["rows"][0] if key.startswith("recall@")]
    cols = ["row", "settings", "seconds", "speed-up", *QUALITY_COLUMNS, *recalls, "cost model / measured"]
    lines.append(rows_table(results["rows"], cols, {"seconds": lambda v: f"{v:.3g}", "speed-up": lambda v: f"{v:.2f}x"}))
    for r in results["rows"]:
        if r.get("error"):
            lines.append(f"\n- {r['row']}: **failed**: `{r['error'][-300:]}`")
        elif r.get("sanity"):
            lines.append(f"\n- {r['row']} sanity: {to_json(r['sanity'])}")
    lines.append(f"\n**hf_fastif fast, the choice.** {results['fast']['choice']}\n")
    if results.get("low_rank"):
        lines.append(f"**hf_fastif low-rank, the choice.** {results['low_rank']['choice']}\n")
    u = results["unit_costs"]
    paper = results["paper"]
    lines += ["## At the paper's scale (cost model from the unit costs measured above)\n",
              f"Paper scale: N = {paper['n']:,}, k = {paper['k']}, J = {paper['j']}, "
              f"B = {paper['b']} vs 1, T = {paper['t']}; the same model and kernels as measured. "
              "Unit costs (seconds): " + ", ".join(
                  [f"hvp[{key}] {v:.3g}" for key, v in u["hvp"].items()]
                  + [f"hvp_full[{key}] {v:.3g}" for key, v in u.get("hvp_full", {}).items()]
                  + [f"score[m={key}] {v:.3g}" for key, v in u["score"].items()]
                  + [f"low_rank_solve[m={key}] {v:.3g}" for key, v in u.get("low_rank_solve", {}).items()]
                  + [check_unit(u, key) for key in u["power_iteration"]]
                  + [f"{key} {u[key]:.3g}" for key in ("score_loop", "test_gradient", "test_gradient_full", "trunk",
                                                        "feature", "knn_row") if key in u])
              + f"; trunk split: {u.get('trunk_split') or 'none (every forward runs the whole model)'}"
              + f"; last layer cut: {cut_in_words(u.get('readout'))}.\n",
              "```\n" + results["cost_model"] + "\n```\n"]
    speed = ["speed-up vs original (hf_fastif kernels)", "speed-up vs original (2021 code path)"]
    lines.append(rows_table(results["paper_rows"], ["row", "seconds", *speed],
                            {"seconds": lambda v: f"{v:.4g}", **{c: (lambda v: f"{v:.1f}x") for c in speed}}))
    lines.append(f"\nOne-off at paper scale, shared by every test point: the kNN index needs N·u.feature = "
                 f"{paper['index_build_s']:.0f}s of features, and the trunk states N·u.trunk = "
                 f"{paper.get('trunk_build_s', 0.0):.0f}s"
                 + (f"; the low-rank Hessian of \"{LOW_RANK}\" {paper['low_rank_build_s']:.3g}s (measured in this run: "
                    "its R rows and rank do not grow with N; scaled to --low_rank_rows where N was smaller)"
                    if paper.get("low_rank_build_s") is not None else "")
                 + ".\n" + (f"\n{results['stacked_row']}\n" if results.get("stacked_row") else ""))
    lines += ["## Targets\n", rows_table(results["targets"], ["target", "measured", "met"]), ""]
    sweep = results.get("sweep") or []
    if sweep:
        lines += ["## s_test sweep (J, B, T) against original\n",
                  f"![sweep]({results['files']['sweep_png']}) — {results['sweep_note']}\n",
                  rows_table(sweep, ["J", "B", "T", "s_test_s_per_test_point", "spearman", "pearson", "refused"],
                             {"refused": lambda v: f"refused: {v[:160]}"}), ""]
    curve = results.get("knn_recall_curve")
    if curve:
        keys = [k for k in curve if k.startswith("recall@")]
        table = [{"k": k, **{key: curve[key][i] for key in keys}, "random (k/N)": curve["random"][i]}
                 for i, k in enumerate(curve["k"])]
        lines += ["## kNN recall vs k (the paper's recall study)\n",
                  f"![knn recall]({results['files']['knn_png']}) — share of the full scan's (original's) n most "
                  "helpful / harmful rows inside the k nearest neighbours of the test point's feature "
                  f"(influence_knn_features={results['knn'].get('features', 'auto')!r}).\n",
                  rows_table(table, ["k", *keys, "random (k/N)"]), ""]
    gt = results.get("ground_truth")
    if gt:
        lines += [f"## Ground-truth anchor: digits logistic regression ({gt['num_test']} test × {gt['num_train']} "
                  f"train, wd = {gt['weight_decay']})\n",
                  f"LDS: Spearman between predicted (Σ_{{i∈S}} influence) and actual test loss over "
                  f"{gt['lds_subsets']} random 50% subsets, each retrained to its optimum (Newton); mean over test "
                  "points. Published reference for the same kind of model: dattri's MNIST logistic regression, "
                  "LDS ≈ 0.8 for exact / CG / LiSSA.\n",
                  rows_table(gt["rows"], ["solver", "seconds", "spearman_vs_exact", "spearman_vs_loo", "lds"]), ""]
    return "\n".join(lines)


class _ShortOnPurpose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LiSSA stops after J steps" not in record.getMessage()


@contextlib.contextmanager
def short_on_purpose() -> Iterator[None]:
    """Leave out the library's warning that J stops LiSSA before it converges, inside a call whose J is short on
    purpose (a warm-up's J 2, a probe's or the gradient dot product's J 1): it advised raising J to 100,000,000 in a
    benchmark's output (a review). Other warnings pass. The library says it with ``warning_once``, whose cache keeps
    the message as said: a later row whose warning reads exactly the same (the same J, damping and smallest
    eigenvalue as a probe's) would not say it either; no row of these benchmarks does at their defaults."""
    log, quiet = logging.getLogger("hf_fastif.engine.s_test"), _ShortOnPurpose()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)
