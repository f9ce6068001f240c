"""Data augmentation with unseen data (FastIF §5.4): HANS correction whose rows come from a pool the model never saw.

    python recipes/augmentation.py                        # embedded default: the generated HANS-style pool
    accelerate launch recipes/augmentation.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt \
        --pool heuristics_train_set.txt                   # the paper: HANS train as the pool (+2.8%)
    ... --num_labels 3 --pool facebook/anli               # the paper: ANLI for a 3-label MNLI model (+1.7%)

Writes augmentation.json / .md / .png to --output_dir and prints the table.
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
    write_results,
)
from hf_fastif.applications.augmentation import PoolArguments, load_pool, pool_dataset, run_augmentation
from hf_fastif.applications.correction import PAPER_CORRECTION


@dataclass
class RecipeArguments:
    output_dir: str = field(default="outputs/augmentation", metadata={"help": "Where the results go."})
    quick: bool = field(default=False, metadata={
        "help": "Smoke run: 2 steps, 1 replica, 600 training rows, 1 epoch, small k (not a measurement)."})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((RecipeArguments, SetupArguments, PoolArguments, CorrectionArguments))
    recipe, setup_args, pool_args, protocol = parser.parse_args_into_dataclasses(args=argv)
    if recipe.quick:
        apply_quick(setup_args)
        protocol.num_steps, protocol.replicas = min(protocol.num_steps, 2), 1
    start = time.perf_counter()
    raw_pool = load_pool(pool_args, setup_args.num_labels)  # checked before any training
    setup = prepare(setup_args, recipe.output_dir, required_labels=(2, 3), what="Data augmentation")
    pool, pool_name = pool_dataset(pool_args, raw_pool, setup)
    print(f"model ready in {time.perf_counter() - start:.0f}s: {setup.description}; {len(pool)} pool rows")

    result = run_augmentation(
        setup.model, setup.train, pool, setup.hans_validation, setup.hans_test, setup.args, pool_name=pool_name,
        strategies=protocol.strategies, heuristics=protocol.heuristics, num_steps=protocol.num_steps,
        num_anchors=protocol.num_anchors, num_points=protocol.num_points,
        learning_rate=protocol.resolved_learning_rate(setup_args.embedded), replicas=protocol.replicas,
        seed=setup_args.seed, data_collator=setup.data_collator, eval_every_step=protocol.eval_every_step,
    )
    changes = compare_with_paper(setup, PAPER_CORRECTION, protocol.protocol(setup_args.embedded))
    markdown = result.to_markdown() + "\n\n" + comparison_markdown(changes, setup)
    results = result.to_dict() | {"setup": setup.description, "pool": pool_name, "num_pool": len(pool),
                                  "changes_from_paper": changes, "argv": list(sys.argv[1:] if argv is None else argv),
                                  "seconds": time.perf_counter() - start}
    if D.is_main_process():
        paths = write_results(recipe.output_dir, "augmentation", results, markdown, result.plot())
        print(markdown)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
