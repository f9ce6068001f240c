"""Simulatability (FastIF §5.1): does one SGD step on an influential training row make a separate simulator model
agree more with the task model than a step on a random row?

    python recipes/simulatability.py              # embedded default, offline, about a minute on 2 CPU cores
    accelerate launch recipes/simulatability.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --num_labels 3 --test_dataset nyu-mll/multi_nli   # the paper's setup

Writes simulatability.json / .md / .png to --output_dir and prints the table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_fastif import distributed as D
from hf_fastif.applications import (
    SetupArguments,
    apply_quick,
    compare_with_paper,
    comparison_markdown,
    prepare,
)
from hf_fastif.applications.common import write_results
from hf_fastif.applications.simulatability import (
    PAPER_SIMULATABILITY,
    SimulatabilityArguments,
    build_simulator,
    load_test_points,
    run_simulatability,
    test_points,
)


@dataclass
class RecipeArguments:
    output_dir: str = field(default="outputs/simulatability", metadata={"help": "Where the results go."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke run: 2 + 2 test points, 3 rates, 600 training rows, 1 epoch (not a measurement)."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, SetupArguments, SimulatabilityArguments))
    recipe, setup_args, sim_args = parser.parse_args_into_dataclasses(args=argv)
    if recipe.quick:
        apply_quick(setup_args)
        sim_args.num_correct, sim_args.num_incorrect = min(sim_args.num_correct, 2), min(sim_args.num_incorrect, 2)
        sim_args.learning_rates = sim_args.learning_rates or [0.01, 0.1, 1.0]
    start = time.perf_counter()
    raw_tests = load_test_points(sim_args, setup_args.num_labels)  # checked before any training
    # the paper's k for simulatability is 10000; the embedded training set is smaller, so every row is scored
    setup = prepare(setup_args, recipe.output_dir, required_labels=(2, 3), what="Simulatability",
                    influence_defaults={"influence_knn_k": None if setup_args.embedded else 10000})
    simulator = build_simulator(setup, setup_args, sim_args, recipe.output_dir)
    tests = test_points(raw_tests, setup)
    rates = sim_args.resolved_learning_rates(setup_args.embedded)
    print(f"task model and simulator ready in {time.perf_counter() - start:.0f}s: {setup.description}")

    result = run_simulatability(
        setup.model, simulator, setup.train, tests, setup.args, num_correct=sim_args.num_correct,
        num_incorrect=sim_args.num_incorrect, num_points=sim_args.num_points, learning_rates=rates,
        explain=sim_args.explain, row_labels=sim_args.row_labels, seed=setup_args.seed, data_collator=setup.data_collator,
    )
    used = dict(num_correct=sim_args.num_correct, num_incorrect=sim_args.num_incorrect,
                num_points=sim_args.num_points,
                learning_rates=f"{len(rates)} rates, {rates[0]:.3g} … {rates[-1]:.3g} (log-spaced)"
                if sim_args.learning_rates is None else ", ".join(f"{r:g}" for r in rates),
                test_points="HANS validation split" if raw_tests is None else sim_args.test_dataset)
    changes = compare_with_paper(setup, PAPER_SIMULATABILITY, used, paper_influence={"influence_knn_k": 10000})
    markdown = result.to_markdown() + "\n\n" + comparison_markdown(changes, setup)
    results = result.to_dict() | {"setup": setup.description, "changes_from_paper": changes,
                                  "argv": list(sys.argv[1:] if argv is None else argv),
                                  "seconds": time.perf_counter() - start}
    if D.is_main_process():
        paths = write_results(recipe.output_dir, "simulatability", results, markdown, result.plot())
        print(markdown)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
