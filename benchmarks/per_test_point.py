"""Seconds per test point on the embedded default, as a user meets them: FastIF at the paper's settings, the
default's own (fast) settings, and the Space's live settings.

    python -m benchmarks.per_test_point [--num_test_points 4] [--output_dir outputs/benchmark_per_test_point]
    python -m benchmarks.per_test_point --quick        # the tiny model, a few rows: proves the script works (CI)

The model is the embedded default (MiniLM fine-tuned on 2,000 generated NLI rows, read from the fine-tuning cache or
fine-tuned once; influence over the pooler and the classifier), the training rows its table's, the test points its
first HANS-style rows. Rows of the table (each with its own `InfluenceEngine`):

- ``FastIF``: the paper's LiSSA (J 1000, B 1, T 4, its convergence check on) with k 1000 kNN candidates, λ and the
  parameters the default's: `InfluenceArguments` as parsed, so ``--influence_recursion_depth 500`` changes this row;
- ``fast``: the embedded default's table settings (`hf_fastif.embedded`: J 20, B 8, T 4; k 100 from the gradient index);
- ``live``: the Space's settings (`hf_fastif.space.LIVE_SETTINGS`: arnoldi s_test, gradient-index candidates).

For each: the first call on a fresh engine with one test point (trunk states, kNN or gradient index, convergence
check or low-rank Hessian included; the process's own one-time costs fall on untimed warm-up calls before the rows,
one with each row's settings), then one test point per call on the same engine (median over the other test points),
then all test points in one call (seconds per test point), and its share of s_test / candidates / scoring.
Torch runs on --threads threads. Writes ``per_test_point.json`` and ``per_test_point.md`` to --output_dir and prints
the table.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from hf_fastif import InfluenceArguments
from hf_fastif.embedded import (
    QUICK_KIND,
    data_description,
    embedded_arguments,
    embedded_data,
    embedded_defaults,
    embedded_kind,
    train_embedded_model,
)
from hf_fastif.engine import InfluenceEngine
from hf_fastif.solvers.lissa import LissaDivergenceError
from hf_fastif.space import LIVE_SETTINGS
from hf_fastif.utils import library_version, markdown_table

from .arguments import output_folder, parse_with_defaults
from .report import save_and_print, short_on_purpose
from .timing import timed

FASTIF = dict(influence_solver="lissa", influence_recursion_depth=1000, influence_batch_size=1,
              influence_repetitions=4, influence_knn_k=1000, influence_knn_features="auto",
              influence_check_convergence=True)
"""The paper's FastIF settings (k 1000 of the pooled-[CLS] kNN, J 1000, B 1, T 4); λ and the parameters stay the
default's."""
PHASES = ("trunk_s", "candidates_s", "s_test_s", "scoring_s")
WARM_UP_ROWS = 64
"""Training rows of the untimed warm-up call (`warm_up`)."""


@dataclass
class PerTestPointArguments:
    """The benchmark's settings; each row's influence settings are fixed (above, and the default's own)."""

    num_test_points: int = field(default=4, metadata={"help": "HANS-style test rows (the first ones)."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    quick: bool = field(default=False, metadata={"help": "The tiny model, 200 rows, J 20: proves the script works."})


def kind_of(quick: bool) -> str:
    return QUICK_KIND if quick else embedded_kind().name


def per_test_point_defaults(own) -> dict:
    """The FastIF row's settings (the parsed `InfluenceArguments`): the embedded default's table settings with the
    paper's FastIF ones; ``--quick`` shrinks J and k."""
    quick = dict(influence_recursion_depth=20, influence_knn_k=50) if own.quick else {}
    fields = {f.name for f in dataclasses.fields(InfluenceArguments)}
    table = {k: v for k, v in embedded_defaults("table", kind_of(own.quick)).items() if k in fields}
    return table | FASTIF | quick | dict(output_dir="outputs/benchmark_per_test_point", report_to="none",
                                         use_cpu=True, disable_tqdm=True)


def rows_arguments(args: InfluenceArguments, kind: str, quick: bool) -> dict[str, InfluenceArguments]:
    """The three rows: FastIF (``args`` as parsed), the default's table settings, the Space's live settings."""
    table = embedded_arguments(args.output_dir, use="table", kind=kind, disable_tqdm=True)
    live = LIVE_SETTINGS | (dict(influence_arnoldi_rows=64, influence_projection_dim=256, influence_knn_k=20)
                            if quick else {})
    return {"FastIF": args, "fast": table, "live": replace(table, **live)}


def timed_call(engine: InfluenceEngine, train, test) -> tuple[float, dict]:
    table, seconds = timed(lambda: engine.compute_influences(train, test), collected=True)
    return seconds, table.metadata["diagnostics"]


def warm_up(model, collator, train, test, args: InfluenceArguments) -> None:
    """One untimed call before the timed rows, as `benchmarks.reference` runs one: ``args`` (each row's in turn) with
    J 2 on the first `WARM_UP_ROWS` training rows (k within them) and one test point, on its own engine, so that the
    process's one-time costs (lazy imports, the first dispatch of each kernel) fall on no row; the first row's first
    call paid them (4.5 s against 3.1 s on repeat, --quick). Nothing it computes is kept for the rows."""
    rows = train.select(range(min(WARM_UP_ROWS, len(train))))
    k = args.influence_knn_k
    small = replace(args, influence_recursion_depth=min(2, args.influence_recursion_depth),
                    influence_knn_k=None if k is None else max(1, min(k, len(rows) // 2)))

    def call(settings: InfluenceArguments) -> None:
        with InfluenceEngine(model, settings, data_collator=collator) as engine, short_on_purpose():
            engine.compute_influences(rows, test.select([0]))

    try:
        call(small)
    except LissaDivergenceError:  # a few rows' Hessian can look indefinite: the check ran; warm the rest without it
        call(replace(small, influence_check_convergence=False))


def measure(model, collator, train, test, args: InfluenceArguments) -> dict:
    """One row: first call (fresh engine, 1 test point), later calls (1 test point each), all in one call."""
    with InfluenceEngine(model, args, data_collator=collator) as engine:
        first, first_phases = timed_call(engine, train, test.select([0]))
        later = [timed_call(engine, train, test.select([i]))[0] for i in range(1, len(test))]
        together, phases = timed_call(engine, train, test)
    return {"first_call_s": first, "first_call_phases": {k: first_phases.get(k, 0.0) for k in PHASES},
            "next_calls_s": float(np.median(later)) if later else None,
            "all_in_one_call_s_per_point": together / len(test),
            "all_in_one_call_phases": {k: phases.get(k, 0.0) / len(test) for k in PHASES}}


def main(argv: list[str] | None = None) -> dict:
    bench, args = parse_with_defaults((PerTestPointArguments, InfluenceArguments), per_test_point_defaults, argv)
    if bench.num_test_points < 2:
        raise ValueError("--num_test_points must be at least 2 (a first call and later ones).")
    output_folder(args.output_dir)
    torch.set_num_threads(bench.threads)
    kind = kind_of(bench.quick)
    settings = embedded_kind(kind)
    sizes = settings.table_data | (dict(n_train=200) if bench.quick else {})
    raw, tokenized, tokenizer = embedded_data(seed=args.seed, **sizes, kind=kind)
    if bench.num_test_points > len(tokenized["hans"]):  # before the model is trained
        raise ValueError(f"--num_test_points {bench.num_test_points} exceeds the {len(tokenized['hans'])} HANS-style "
                         f"test rows of the embedded data; use at most {len(tokenized['hans'])}.")
    start = time.perf_counter()
    model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=kind,
                                       description=data_description(args.seed, len(raw["train"])))
    model_s = time.perf_counter() - start
    train, test = tokenized["train"], tokenized["hans"].select(range(bench.num_test_points))
    collator = DataCollatorWithPadding(tokenizer)
    load = os.getloadavg()
    rows = rows_arguments(args, kind, bench.quick)
    for row_args in rows.values():  # (each row's path: the first row's alone left the gradient index cold, a review)
        warm_up(model, collator, train, test, row_args)
    results = []
    for name, row_args in rows.items():
        found = measure(model, collator, train, test, row_args)
        results.append({"row": name, "settings": {k: getattr(row_args, k) for k in (
            "influence_solver", "influence_recursion_depth", "influence_batch_size", "influence_repetitions",
            "influence_knn_k", "influence_knn_features", "influence_check_convergence")}} | found)
        print(f"{name}: first call {found['first_call_s']:.1f} s", flush=True)
    out = {"command": "python -m benchmarks.per_test_point " + " ".join(sys.argv[1:] if argv is None else argv),
           "library_version": library_version(), "torch": torch.__version__, "threads": bench.threads,
           "kind": kind, "model": settings.description, "model_ready_s": model_s, "model_cached": info.get("cached"),
           "n_train": len(train), "num_test_points": len(test), "load_average_before": [round(x, 2) for x in load],
           "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": results}
    save_and_print(args.output_dir, "per_test_point", out, render(out))
    return out


def render(out: dict) -> str:
    def s(value) -> str:
        return "—" if value is None else f"{value:.3g}"

    rows = []
    for r in out["rows"]:
        st = r["settings"]
        how = (f"{st['influence_solver']}, J {st['influence_recursion_depth']}, B {st['influence_batch_size']}, "
               f"T {st['influence_repetitions']}" if st["influence_solver"] == "lissa" else st["influence_solver"])
        how += f"; k {st['influence_knn_k']} ({st['influence_knn_features']})"
        phases = r["all_in_one_call_phases"]
        rows.append([r["row"], how, s(r["first_call_s"]), s(r["next_calls_s"]), s(r["all_in_one_call_s_per_point"]),
                     " / ".join(s(phases[k]) for k in ("s_test_s", "candidates_s", "scoring_s"))])
    header = ["row", "settings", "first call s (1 test point)", "next calls s (1 test point each, median)",
              f"all {out['num_test_points']} in one call, s per test point", "of which s_test / candidates / scoring"]
    return (f"# Seconds per test point on the embedded default ({out['kind']}: {out['n_train']:,} training rows)\n\n"
            f"torch {out['torch']}, {out['threads']} thread(s), load average before {out['load_average_before']}, "
            f"after {out['load_average_after']}; model ready in {out['model_ready_s']:.1f} s "
            f"({'from the fine-tuning cache' if out['model_cached'] else 'trained here'}).\n\n"
            + markdown_table(header, rows) + "\n\nFirst call: a fresh engine, with its one-offs (trunk states of every "
            "training row, the kNN or gradient index, the convergence check or the low-rank Hessian). Next calls: "
            "the same engine, one test point each.\n")


if __name__ == "__main__":
    main()
