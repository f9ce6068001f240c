"""HANS error correction (FastIF §5.3): fix a model's HANS mistakes with SGD steps on its most helpful training rows.

    python recipes/hans_correction.py            # embedded default, offline, a few minutes on 2 CPU cores
    accelerate launch recipes/hans_correction.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt      # the paper's setup

Per heuristic: 10 steps, each on the 10 most helpful of k kNN candidates for 10 anchors sampled from the HANS
validation split; compared with the 10 most harmful, 10 random rows and the anchors themselves; 3 replicas.
Flags: ModelDataArguments, CorrectionArguments and InfluenceArguments (--influence_*, --output_dir, --seed, ...).
Writes hans_correction.json / .md / .png to --output_dir and prints the table.
"""

from __future__ import annotations

from hf_fastif.applications import (
    CorrectionArguments,
    finished_runs_kept,
    parse_recipe,
    prepare,
    run_correction,
    write_report,
)
from hf_fastif.applications.correction import check_correction
from hf_fastif.distributed import finish


def main(argv: list[str] | None = None) -> dict:
    data_args, protocol, args = parse_recipe("hans_correction", [CorrectionArguments], argv)
    setup = prepare(data_args, args, required_labels=(2, 3), what="HANS correction",
                    heuristics=protocol.heuristics, heuristic_splits=("validation", "test"),
                    num_anchors=protocol.num_anchors,
                    checks=lambda early: check_correction(early.data, early.args, protocol),  # before any training
                    argv=argv)  # (None: a bad input's refusal is one line, exit status 2)
    print(f"model ready in {setup.seconds():.0f}s: {setup.description}")
    with finished_runs_kept("hans_correction", setup, protocol, argv=argv):  # (a late failure: the finished runs)
        result = run_correction(setup.model, setup.data, setup.args, protocol)
    return write_report("hans_correction", result, setup, protocol, argv=argv)


if __name__ == "__main__":
    main()
    finish()  # under `accelerate launch`: close the process group before the interpreter exits
