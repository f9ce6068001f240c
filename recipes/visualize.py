"""The train → test influence graph (FastIF §5.2): HANS test points grouped by heuristic, linked to their most
helpful and most harmful training rows, edges weighted by |influence|.

    python recipes/visualize.py                   # embedded default, offline, about a minute on 2 CPU cores
    accelerate launch recipes/visualize.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt   # the paper's setup

Writes visualize.json (summary + the graph as node-link data), visualize.md, visualize.png and the influence
table behind the graph (influence_table/, parquet) to --output_dir, and prints the table.
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
    write_results,
)
from hf_fastif.applications.visualize import PAPER_VISUALIZATION, run_visualization


@dataclass
class RecipeArguments:
    output_dir: str = field(default="outputs/visualize", metadata={"help": "Where the results go."})
    test_points_per_heuristic: int | None = field(default=None, metadata={
        "help": "HANS test points per heuristic (paper: 100; embedded default: 30)."})
    edges_per_test_point: int = field(default=10, metadata={"help": "Most helpful and most harmful rows per test point."})
    heuristics: list[str] | None = field(default=None, metadata={"help": "Heuristics to show (default: all three)."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke run: 3 test points per heuristic, 600 training rows, 1 epoch (not a measurement)."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, SetupArguments))
    recipe, setup_args = parser.parse_args_into_dataclasses(args=argv)
    if recipe.quick:
        apply_quick(setup_args)
        recipe.test_points_per_heuristic = recipe.test_points_per_heuristic or 3
    per_heuristic = recipe.test_points_per_heuristic or (30 if setup_args.embedded else 100)
    start = time.perf_counter()
    setup = prepare(setup_args, recipe.output_dir, required_labels=(2,), what="The HANS influence graph")
    print(f"model ready in {time.perf_counter() - start:.0f}s: {setup.description}")

    result = run_visualization(
        setup.model, setup.train, setup.hans_test, setup.args, test_points_per_heuristic=per_heuristic,
        edges_per_test_point=recipe.edges_per_test_point, seed=setup_args.seed, heuristics=recipe.heuristics,
        data_collator=setup.data_collator, raw_train=setup.raw_train,
    )
    used = dict(test_points_per_heuristic=per_heuristic, edges_per_test_point=recipe.edges_per_test_point)
    changes = compare_with_paper(setup, PAPER_VISUALIZATION, used)
    markdown = result.to_markdown() + "\n\n" + comparison_markdown(changes, setup)
    results = result.to_dict() | {"setup": setup.description, "changes_from_paper": changes,
                                  "argv": list(sys.argv[1:] if argv is None else argv),
                                  "seconds": time.perf_counter() - start}
    if D.is_main_process():
        result.table.add_text(setup.raw_train).save(f"{recipe.output_dir}/influence_table")
        paths = write_results(recipe.output_dir, "visualize", results, markdown, result.plot(seed=setup_args.seed))
        print(markdown)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} and {recipe.output_dir}/influence_table "
              f"in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
