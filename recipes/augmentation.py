"""Data augmentation with unseen data (FastIF §5.4): HANS correction whose rows come from a pool the model never saw.

    python recipes/augmentation.py                        # embedded default: the generated HANS-style pool
    accelerate launch recipes/augmentation.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt \
        --pool heuristics_train_set.txt                   # the paper: HANS train as the pool (+2.8%)
    ... --num_labels 3 --pool facebook/anli               # the paper: ANLI for a 3-label MNLI model (+1.7%)

Flags: ModelDataArguments, PoolArguments, CorrectionArguments and InfluenceArguments.
Writes augmentation.json / .md / .png to --output_dir and prints the table.
"""

from __future__ import annotations

import dataclasses

from hf_fastif.applications import (
    CorrectionArguments,
    PoolArguments,
    finished_runs_kept,
    parse_recipe,
    prepare,
    run_augmentation,
    write_report,
)
from hf_fastif.applications.augmentation import check_augmentation, load_pool, pool_dataset
from hf_fastif.distributed import finish
from hf_fastif.parsing import flag_refusals


def main(argv: list[str] | None = None) -> dict:
    data_args, pool_args, protocol, args = parse_recipe("augmentation", [PoolArguments, CorrectionArguments], argv)
    with flag_refusals(argv):  # checked before any training
        raw_pool = load_pool(pool_args, data_args.num_labels)
        if raw_pool is None and data_args.train_dataset is not None:  # generated pool: only with generated data
            raise ValueError("--pool generated needs the generated data (unset --train_dataset); with your own "
                             "training data pass a pool file or Hub id, e.g. --pool heuristics_train_set.txt.")
    pools = {}

    def checks(early):  # the tokenized pool against the protocol and the HANS rows: before any training
        pools["pool"] = pool_dataset(pool_args, raw_pool, early)
        check_augmentation(dataclasses.replace(early.data, candidates=pools["pool"][0]), early.args, protocol)

    setup = prepare(data_args, args, required_labels=(2, 3), what="Data augmentation",
                    heuristics=protocol.heuristics, heuristic_splits=("validation", "test"),
                    num_anchors=protocol.num_anchors, checks=checks, argv=argv)
    pool, pool_name = pools["pool"]
    print(f"model ready in {setup.seconds():.0f}s: {setup.description}; {len(pool)} pool rows")
    data = dataclasses.replace(setup.data, candidates=pool)
    extra = {"pool": pool_name, "num_pool": len(pool)}
    if "pool_row" in pool.column_names:  # a --max_pool_samples subset: the steps' ids are its positions
        extra["pool_rows"] = [int(row) for row in pool["pool_row"]]
    with finished_runs_kept("augmentation", setup, protocol, argv=argv, extra=extra):  # (a late failure)
        result = run_augmentation(setup.model, data, setup.args, protocol, pool_name=pool_name)
    return write_report("augmentation", result, setup, protocol, argv=argv, extra=extra)


if __name__ == "__main__":
    main()
    finish()  # under `accelerate launch`: close the process group before the interpreter exits
