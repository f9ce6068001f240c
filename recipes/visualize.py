"""The train → test influence graph (FastIF §5.2): HANS test points grouped by heuristic, linked to their most
helpful and most harmful training rows, edges weighted by |influence|.

    python recipes/visualize.py                   # embedded default, offline, about a minute on 2 CPU cores
    accelerate launch recipes/visualize.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --hans_file heuristics_evaluation_set.txt   # the paper's setup

Flags: ModelDataArguments, VisualizationArguments and InfluenceArguments.
Writes visualize.json (summary + the graph as node-link data), visualize.md, visualize.png and the influence
table behind the graph (influence_table/, parquet) to --output_dir, and prints the table.
"""

from __future__ import annotations

from hf_fastif.applications import (
    VisualizationArguments,
    check_visualization,
    parse_recipe,
    prepare,
    run_visualization,
    write_report,
)
from hf_fastif.distributed import finish


def main(argv: list[str] | None = None) -> dict:
    data_args, protocol, args = parse_recipe("visualize", [VisualizationArguments], argv)
    setup = prepare(data_args, args, required_labels=(2,), what="The HANS influence graph",
                    heuristics=protocol.heuristics, heuristic_splits=("test",),
                    checks=lambda early: check_visualization(early.data, early.args, protocol),  # before any training
                    argv=argv)  # (None: a bad input's refusal is one line, exit status 2)
    print(f"model ready in {setup.seconds():.0f}s: {setup.description}")
    result = run_visualization(setup.model, setup.data, setup.args, protocol)
    return write_report("visualize", result, setup, protocol, argv=argv)


if __name__ == "__main__":
    main()
    finish()  # under `accelerate launch`: close the process group before the interpreter exits
