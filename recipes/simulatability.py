"""Simulatability (FastIF §5.1): does one SGD step on an influential training row make a separate simulator model
agree more with the task model than a step on a random row?

    python recipes/simulatability.py              # embedded default, offline, about 4 minutes on 2 CPU cores
    accelerate launch recipes/simulatability.py --model_name_or_path bert-base-cased \
        --train_dataset nyu-mll/multi_nli --num_labels 3 --test_dataset nyu-mll/multi_nli   # the paper's setup

Flags: ModelDataArguments, SimulatabilityArguments and InfluenceArguments.
Writes simulatability.json / .md / .png to --output_dir and prints the table.
"""

from __future__ import annotations

from hf_fastif.applications import (
    SimulatabilityArguments,
    finished_runs_kept,
    parse_recipe,
    prepare,
    run_simulatability,
    write_report,
)
from hf_fastif.applications.simulatability import (
    build_simulator,
    check_simulatability,
    load_test_points,
    test_points,
)
from hf_fastif.distributed import finish
from hf_fastif.parsing import check_flags


def main(argv: list[str] | None = None) -> dict:
    data_args, protocol, args = parse_recipe("simulatability", [SimulatabilityArguments], argv)
    raw_tests = check_flags(lambda: load_test_points(protocol, data_args.num_labels), argv)  # before any training
    setup = prepare(data_args, args, required_labels=(2, 3), what="Simulatability",
                    checks=lambda early: check_simulatability(early, protocol), argv=argv)  # before any training
    simulator = build_simulator(setup, protocol)
    print(f"task model and simulator ready in {setup.seconds():.0f}s: {setup.description}")
    with finished_runs_kept("simulatability", setup, protocol, argv=argv):  # (a late failure: the finished points)
        result = run_simulatability(setup.model, simulator, setup.data, setup.args, protocol,
                                    test_dataset=test_points(raw_tests, setup))
    return write_report("simulatability", result, setup, protocol, argv=argv)


if __name__ == "__main__":
    main()
    finish()  # under `accelerate launch`: close the process group before the interpreter exits
