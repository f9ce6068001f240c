"""HANS error correction (FastIF §5.3): fix a model's HANS mistakes with SGD steps on its most helpful training rows.

    python recipes/hans_correction.py            # embedded default, offline, a few minutes on 2 CPU cores
    accelerate launch recipes/hans_correction.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt      # the paper's setup

Per heuristic: 10 steps, each on the 10 most helpful of k kNN candidates for 10 anchors sampled from the HANS
validation split; compared with the 10 most harmful, 10 random rows and the anchors themselves; 3 replicas.
Writes hans_correction.json / .md / .png to --output_dir and prints the table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_fastif import distributed as D
from hf_fastif.applications import (
    CorrectionArguments,
    SetupArguments,
    apply_quick,
    compare_with_paper,
    comparison_markdown,
    prepare,
    run_correction,
    write_results,
)
from hf_fastif.applications.correction import PAPER_CORRECTION


@dataclass
class RecipeArguments:
    output_dir: str = field(default="outputs/hans_correction", metadata={"help": "Where the results go."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke run: 2 steps, 1 replica, 600 training rows, 1 epoch, small k (not a measurement)."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, SetupArguments, CorrectionArguments))
    recipe, setup_args, protocol = parser.parse_args_into_dataclasses(args=argv)
    if recipe.quick:
        apply_quick(setup_args)
        protocol.num_steps, protocol.replicas = min(protocol.num_steps, 2), 1
    start = time.perf_counter()
    setup = prepare(setup_args, recipe.output_dir, required_labels=(2,), what="HANS correction")
    print(f"model ready in {time.perf_counter() - start:.0f}s: {setup.description}")

    result = run_correction(
        setup.model, setup.train, setup.hans_validation, setup.hans_test, setup.args,
        strategies=protocol.strategies, heuristics=protocol.heuristics, num_steps=protocol.num_steps,
        num_anchors=protocol.num_anchors, num_points=protocol.num_points,
        learning_rate=protocol.resolved_learning_rate(setup_args.embedded), replicas=protocol.replicas,
        seed=setup_args.seed, data_collator=setup.data_collator, eval_every_step=protocol.eval_every_step,
    )
    changes = compare_with_paper(setup, PAPER_CORRECTION, protocol.protocol(setup_args.embedded))
    markdown = result.to_markdown() + "\n\n" + comparison_markdown(changes, setup)
    results = result.to_dict() | {"setup": setup.description, "changes_from_paper": changes,
                                  "argv": list(sys.argv[1:] if argv is None else argv),
                                  "seconds": time.perf_counter() - start}
    if D.is_main_process():
        paths = write_results(recipe.output_dir, "hans_correction", results, markdown, result.plot())
        print(markdown)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
