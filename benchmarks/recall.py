"""Candidate recall on the fine-tuned MiniLM: do the k candidates hold the training rows that influence the
prediction most?

    python -m benchmarks.recall [--quick] [--output_dir outputs/benchmark_recall] [--projection_dims 4096 8192]

MiniLM (all-MiniLM-L6-v2, verified offline) is fine-tuned on 2,000 generated NLI rows as `hf-fastif build`'s embedded
default and the Space fine-tune it (`hf_fastif.recall.finetuned_minilm`: last 2 layers + pooler + classifier, 1 epoch,
lr 2e-4, 10% warm-up, weight decay 0.01; the same cached model, trained once); influence is over those same
parameters. For 8 HANS-style
test points (the generated hans split, drawn with --seed), `InfluenceEngine.candidate_recall` computes s_test once,
scores every training row (the full scan), and for every candidate method and k (1%, 5%, 10%, 33% of N) reports
recall@10 / recall@100 of the full scan's most helpful and most harmful rows among the candidates, the index build
seconds and the seconds per query. Methods: kNN on the pooled [CLS] feature (``auto``: the paper's), kNN on mean-pooled
tokens (``mean``), gradient-space candidates (``gradient``) at each ``--projection_dims`` (one engine per
dimension: s_test and the full scan are recomputed, identically, for each) and random candidates.

Training and influence flags are `InfluenceArguments`' own (defaults: `hf_fastif.recall.MINILM_RECALL_SETTINGS`).
Writes ``recall.json`` and ``recall.md`` to --output_dir and prints the table.
"""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from hf_fastif import InfluenceArguments
from hf_fastif.data import hans_row_count
from hf_fastif.engine import InfluenceEngine
from hf_fastif.params import num_parameters, select_parameters
from hf_fastif.recall import (
    MINILM_RECALL_N_TRAIN,
    MINILM_RECALL_SETTINGS,
    RECALL_HANS_PER_SUBCASE,
    check_methods,
    finetuned_minilm,
    recall_ns,
    recall_table,
    resolve_ks,
)
from hf_fastif.utils import library_version

from .arguments import output_folder, parse_with_defaults
from .report import save_and_print


@dataclass
class RecallBenchmarkArguments:
    """The recall benchmark's own settings; training and influence settings are `InfluenceArguments`' flags."""

    n_train: int = field(default=MINILM_RECALL_N_TRAIN, metadata={"help": "Generated training rows (N)."})
    num_test_points: int = field(default=8, metadata={"help": "HANS-style test rows, drawn with --seed."})
    ks: list[str] = field(default_factory=lambda: ["1%", "5%", "10%", "33%"],
                          metadata={"help": "Candidates per query: counts or shares of N."})
    knn_methods: list[str] = field(default_factory=lambda: ["auto", "mean"],
                                   metadata={"help": "Feature kNN methods (influence_knn_features values)."})
    projection_dims: list[int] = field(default_factory=lambda: [4096, 8192],
                                       metadata={"help": "Count-sketch sizes of the gradient method."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes: proves the script works (CI)."})


def recall_defaults(own: Namespace) -> dict:
    """Defaults given the benchmark's own flags: the MiniLM recall settings; ``--quick`` shrinks every size."""
    out = MINILM_RECALL_SETTINGS | dict(output_dir="outputs/benchmark_recall", report_to="none", use_cpu=True)
    if own.quick:
        out |= dict(n_train=120, num_test_points=2, ks=["5%", "25%"], knn_methods=["auto"], projection_dims=[256],
                    influence_recursion_depth=5)
    return out


def main(argv: list[str] | None = None) -> dict:
    bench, args = parse_with_defaults((RecallBenchmarkArguments, InfluenceArguments), recall_defaults, argv)
    check_methods([*bench.knn_methods, "gradient", "random"])
    ks = resolve_ks(bench.ks, bench.n_train)
    if bench.num_test_points < 1 or not bench.projection_dims or min(bench.projection_dims) < 1:
        raise ValueError("--num_test_points and every --projection_dims must be positive integers.")
    top_ns = recall_ns(bench.n_train)
    torch.set_num_threads(bench.threads)
    out_dir = output_folder(args.output_dir)

    hans_rows = hans_row_count(RECALL_HANS_PER_SUBCASE)
    if bench.num_test_points > hans_rows:  # before the fine-tuning
        raise ValueError(f"--num_test_points {bench.num_test_points} exceeds the {hans_rows} generated HANS-style test "
                         f"rows; use at most {hans_rows}.")
    start = time.perf_counter()
    model, tokenizer, train, hans, name, finetuned = finetuned_minilm(bench.n_train, args)
    finetune_s = time.perf_counter() - start
    rows = np.sort(np.random.default_rng(args.seed).choice(len(hans), bench.num_test_points, replace=False))
    test = hans.select(rows)
    params = num_parameters(select_parameters(model, args.influence_params))
    too_big = [d for d in bench.projection_dims if d > params]
    if too_big:
        raise ValueError(f"--projection_dims {too_big} exceed the {params} influence parameters; lower them.")
    collator = DataCollatorWithPadding(tokenizer)

    results, calls = [], []
    for i, dim in enumerate(bench.projection_dims):
        methods = [*bench.knn_methods, "gradient", "random"] if i == 0 else ["gradient"]
        engine = InfluenceEngine(model, _with(args, influence_projection_dim=dim), data_collator=collator)
        start = time.perf_counter()
        found = engine.candidate_recall(train, test, ks, methods=methods, ns=top_ns)
        seconds = time.perf_counter() - start
        candidates_s = sum(r["query_s"] * len(test) for r in found) + sum(  # the first k of a method ran twice
            r["build_s"] + r["query_s"] * len(test) for r in _firsts(found))
        calls.append({"projection_dim": dim, "methods": methods, "seconds": seconds,
                      "shared_s": seconds - candidates_s})  # trunk states, test gradients, s_test, full scan
        for row in found:
            if row["method"] == "gradient":
                row["method"] = f"gradient D={dim}"
            row["projection_dim"] = dim if row["method"].startswith("gradient") else None
            results.append(row)
        print(f"projection {dim}: {seconds:.0f} s", flush=True)
    order = {m: i for i, m in enumerate([*bench.knn_methods, *[f"gradient D={d}" for d in bench.projection_dims],
                                         "random"])}
    results.sort(key=lambda r: (order[r["method"]], r["k"]))

    settings = args.influence_settings()
    report = {
        "command": "python -m benchmarks.recall " + " ".join(sys.argv[1:] if argv is None else argv),
        "library_version": library_version(),
        "model": name, "finetuned": finetuned,
        "n_train": bench.n_train, "test_rows": rows.tolist(), "num_test_points": len(test),
        "num_influence_parameters": params, "recall_ns": top_ns, "finetune_s": finetune_s,
        "torch_threads": bench.threads,
        "training": {k: getattr(args, k) for k in ("seed", "num_train_epochs", "learning_rate",
                                                   "per_device_train_batch_size")},
        "influence": {k: v for k, v in settings.items() if k in _REPORTED}, "calls": calls, "rows": results,
    }
    save_and_print(out_dir, "recall", report, describe(report) + "\n\n" + recall_table(results, top_ns) + "\n")
    return report


_REPORTED = ("influence_solver", "influence_recursion_depth", "influence_batch_size", "influence_repetitions",
             "influence_damping", "influence_scale", "influence_lambda", "influence_params", "influence_seed",
             "influence_scoring")


def _firsts(rows: list[dict]) -> list[dict]:
    """The first row of each method (the one whose call built the index and was timed twice)."""
    seen, out = set(), []
    for row in rows:
        if row["method"] not in seen:
            seen.add(row["method"])
            out.append(row)
    return out


def _with(args: InfluenceArguments, **changes) -> InfluenceArguments:
    """A copy of ``args`` with ``changes`` (validated again)."""
    fields = {k: getattr(args, k) for k, spec in InfluenceArguments.__dataclass_fields__.items() if spec.init}
    return InfluenceArguments(**(fields | changes))


def describe(report: dict) -> str:
    """One paragraph: model, data, solver and timings of the run."""
    inf = report["influence"]
    solver = inf["influence_solver"]
    if solver == "lissa":
        solver += (f" (J {inf['influence_recursion_depth']}, B {inf['influence_batch_size']}, T "
                   f"{inf['influence_repetitions']}, damping {inf['influence_damping']:g}, scale "
                   f"{inf['influence_scale']:g})")
    calls = "; ".join(f"D={c['projection_dim']}: {c['seconds']:.0f} s, of which {c['shared_s']:.0f} s trunk states + "
                      f"s_test + full scan ({', '.join(c['methods'])})" for c in report["calls"])
    return (f"{report['model']}: N = {report['n_train']} training rows, {report['num_test_points']} HANS-style test "
            f"points (hans rows {report['test_rows']}), {report['num_influence_parameters']:,} influence parameters "
            f"({' '.join(map(str, inf['influence_params'] or ['all']))}), s_test by {solver}, λ = {inf['influence_lambda']:g}; "
            f"fine-tuning {report['finetune_s']:.0f} s "
            f"({'from the cache' if report['finetuned']['cached'] else 'trained and cached'}); candidate_recall calls: {calls}; {report['torch_threads']} "
            "torch thread(s).")


if __name__ == "__main__":
    main()
