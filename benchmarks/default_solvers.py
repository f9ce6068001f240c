"""Does the embedded default's s_test rank the training rows as the exact solve at its λ does?

    python -m benchmarks.default_solvers [--quick] [--output_dir outputs/benchmark_default_solvers]

The embedded default of `hf-fastif build` and the Space (MiniLM fine-tuned on 2,000 generated NLI rows, cached;
influence over its pooler and classifier; λ = damping × scale) scores every training row for ``--num_test_points``
HANS-style test rows (the generated hans split, drawn with --seed) with: CG at the default's λ (the reference: the
solve at that λ, to CG's tolerance), the default's own solver (LiSSA with the paper's 4 repetitions), the same with 1
(4 where a default has 1), FastIF's LiSSA (J 1000, B 1, T 4) at the same λ, the Space's live solver (arnoldi, rank
16) and the gradient dot product (no H⁻¹: how much the inverse Hessian moves the ranking at this λ). Each row gives
its Spearman with CG (mean and smallest over the test points), the share of CG's 10 most helpful rows among its own
10, and its seconds (one call, first on its engine, from a collected heap, after one untimed call of the
cheapest row that takes the process's one-time costs). ``--quick``: the tiny embedded model on 300 rows, 2 test points,
FastIF's J 50 (proves the script works; that model's values nearly tie, so its agreements say nothing).
Writes ``default_solvers.json`` / ``.md`` to --output_dir and prints the table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif.embedded import embedded_data, embedded_defaults, embedded_kind, train_embedded
from hf_fastif.quality import agreement, dense_reference, influence_by_test

from .arguments import output_folder, parse_with_defaults
from .report import rows_table, save_and_print
from .timing import timed

TOP = 10  # the most helpful rows whose overlap with CG's is reported


@dataclass
class DefaultSolversArguments:
    num_test_points: int = field(default=8, metadata={"help": "HANS-style test rows, drawn with --seed."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    quick: bool = field(default=False, metadata={"help": "The tiny embedded model on 300 rows, 2 test points (CI)."})


def default_solvers_defaults(own) -> dict:
    """The embedded default's table settings (`hf_fastif.embedded.embedded_defaults`), of MiniLM or, with --quick,
    the tiny model."""
    names = {f.name for f in fields(InfluenceArguments)}
    table = embedded_defaults("table", "tiny" if own.quick else "minilm")
    out = {k: v for k, v in table.items() if k in names}
    return out | dict(output_dir="outputs/benchmark_default_solvers", report_to="none", disable_tqdm=True) | (
        dict(num_test_points=2) if own.quick else {})


def variants(args: InfluenceArguments, quick: bool) -> dict[str, dict]:
    """Name -> the settings that change from ``args`` (the first, CG at ``args``' λ, is the reference)."""
    lam, fastif_j, scale = args.influence_lambda, 50 if quick else 1000, 1e3
    other_t = 1 if args.influence_repetitions != 1 else 4  # (the table's 4 since 2026-12-07; 1 before)
    own = (f"the default: {args.influence_solver} J {args.influence_recursion_depth}, B {args.influence_batch_size}, "
           f"T {args.influence_repetitions}" if args.influence_solver == "lissa" else f"the default: {args.influence_solver}")
    return {
        f"cg at λ = {lam:g} (the reference)": dict(influence_solver="cg"),
        own: {},
        f"the default with T {other_t}": dict(influence_repetitions=other_t),
        f"FastIF's LiSSA at λ = {lam:g} (J {fastif_j}, B 1, T 4)": dict(
            influence_solver="lissa", influence_recursion_depth=fastif_j, influence_batch_size=1,
            influence_repetitions=4, influence_scale=scale, influence_damping=lam / scale),
        "arnoldi, rank 16 (the Space's live solver)": dict(influence_solver="arnoldi", influence_arnoldi_rank=16),
        "no H⁻¹ (λ = 1e6: the gradient dot product)": dict(influence_solver="cg", influence_scale=1.0,
                                                           influence_damping=1e6),
    }


def main(argv: list[str] | None = None) -> dict:
    own, args = parse_with_defaults((DefaultSolversArguments, InfluenceArguments), default_solvers_defaults, argv)
    if own.num_test_points < 1 or own.threads < 1:
        raise ValueError("--num_test_points and --threads must be positive integers.")
    torch.set_num_threads(own.threads)
    out_dir = output_folder(args.output_dir)
    kind = embedded_kind("tiny" if own.quick else "minilm")
    start = time.perf_counter()
    data = embedded_data(seed=args.seed, **(kind.table_data | ({"n_train": 300} if own.quick else {})), kind=kind.name)
    trainer, _, tokenized = train_embedded(args=args, data=data, kind=kind.name)
    ready_s = time.perf_counter() - start
    hans = tokenized["hans"]
    if own.num_test_points > len(hans):
        raise ValueError(f"--num_test_points {own.num_test_points} exceeds the {len(hans)} HANS-style rows.")
    rows = np.sort(np.random.default_rng(args.seed).choice(len(hans), own.num_test_points, replace=False))
    model, train, test = trainer.model.eval(), tokenized["train"], hans.select(rows)

    estimates, seconds = {}, {}
    settings = variants(args, own.quick)
    # the process's one-time costs (first allocations, lazy set-ups) on no row: one untimed call, the cheapest (a
    # review: the first row, CG, took 1.08 s against 0.70 and 0.53 s in the two calls after it)
    cheapest = replace(args, influence_knn_k=None, **list(settings.values())[-1])
    compute_influences(model, train, test.select([0]), cheapest, data_collator=trainer.data_collator)
    for name, changes in settings.items():
        table, seconds[name] = timed(lambda changes=changes: compute_influences(
            model, train, test, replace(args, influence_knn_k=None, **changes), data_collator=trainer.data_collator),
            collected=True)
        estimates[name] = influence_by_test(table, len(test))
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    reference = dense_reference(next(iter(estimates.values())), len(train))  # (every row scored once, or refused)

    results = []
    for name, per_test in estimates.items():
        found = agreement(reference, per_test, ns=(TOP,))
        results.append({"s_test": name, "spearman_vs_cg": found["spearman"], "min_spearman": found["spearman_min"],
                        f"top{TOP}_helpful_overlap": found[f"recall@{TOP} helpful"], "seconds": seconds[name]})
    report = {"command": "python -m benchmarks.default_solvers " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": kind.description, "n_train": len(train), "test_rows": rows.tolist(), "ready_s": ready_s,
              "lambda": args.influence_lambda, "torch_threads": own.threads, "rows": results}
    text = (f"{kind.description}: {len(train):,} training rows, {len(test)} HANS-style test points, every row "
            f"scored; λ = {args.influence_lambda:g}; {own.threads} torch thread(s).\n\n"
            + rows_table(results, ["s_test", "spearman_vs_cg", "min_spearman", f"top{TOP}_helpful_overlap",
                                   "seconds"]) + "\n")
    save_and_print(out_dir, "default_solvers", report, text)
    return report


if __name__ == "__main__":
    main()
