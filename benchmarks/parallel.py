"""Parallel-variant benchmark: 1 vs. 2 processes, and many test points in one call vs. one at a time.

    python -m benchmarks.parallel [--quick] [--num_test 8] [--influence_knn_k 500] [--influence_recursion_depth 100]

The 1-process run happens here; the 2-process run is this module relaunched with the same flags through
`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU). Influence settings are `InfluenceArguments`
flags; the defaults are LiSSA B = 1, T = 4, damping 5e-3, scale 1e3, J = 100 on the (untrained) tiny embedded
model: a timing of process scaling, which needs no trained weights.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from dataclasses import dataclass, field

import torch
from transformers import DataCollatorWithPadding

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif.data import hans_row_count
from hf_fastif.distributed import finish, world
from hf_fastif.embedded import TINY, embedded_data, embedded_model
from hf_fastif.utils import markdown_table, to_json, write_atomic

from .arguments import output_folder, parse_with_defaults
from .launch import accelerate_launch
from .timing import timed


@dataclass
class ParallelArguments:
    """The parallel benchmark's own settings; influence settings are `InfluenceArguments` flags."""

    num_test: int = field(default=8, metadata={"help": "Test points per call."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes (CI)."})
    worker: str | None = field(default=None, metadata={"help": "Internal: write timings here (launched run)."})


def parallel_defaults(own: Namespace) -> dict:
    """The embedded default's LiSSA settings with J = 100 and k = 500; ``--quick`` shrinks them."""
    out = dict(output_dir="outputs/benchmark_parallel", report_to="none", disable_tqdm=True,
               influence_solver="lissa", influence_params=TINY.influence["influence_params"], influence_damping=5e-3,
               influence_scale=1e3, influence_recursion_depth=100, influence_batch_size=1, influence_repetitions=4,
               influence_knn_k=500)
    if own.quick:
        out |= dict(num_test=2, influence_knn_k=50, influence_recursion_depth=10)
    return out


def hans_rows() -> int:
    """HANS-style rows of the generated data `workload` takes its test points from (the tiny kind's rows per
    subcase, 30 subcases), counted without generating them."""
    return hans_row_count(TINY.data["n_hans_per_subcase"])


def validate(own: ParallelArguments) -> None:
    """Refuse a --num_test the generated data cannot give, before any work (it failed after the set-up: an
    IndexError, or 'test_dataset is empty')."""
    available = hans_rows()
    if own.num_test < 1:
        raise ValueError(f"--num_test must be at least 1 (test points per call), got {own.num_test}.")
    if own.num_test > available:
        raise ValueError(f"--num_test {own.num_test} exceeds the {available} HANS-style test rows of the generated "
                         f"data; use at most {available}.")


def workload(own: ParallelArguments, args: InfluenceArguments) -> dict:
    """Time the same influence job on the (untrained) embedded model; seconds are identical on every process."""
    torch.set_num_threads(1)
    _, data, tokenizer = embedded_data(seed=0, n_train=1000 if own.quick else 3000, kind="tiny")
    model = embedded_model(tokenizer, kind="tiny").eval()
    collator = DataCollatorWithPadding(tokenizer)
    test = data["hans"].select(range(own.num_test))

    def run(rows):
        return compute_influences(model, data["train"], rows, args, data_collator=collator)

    run(test.select([0]))  # warm-up
    table, together = timed(lambda: run(test), collected=True)
    processes = world()[1]
    out = {"many_in_one_call_s": together, "diagnostics": table.metadata["diagnostics"], "num_processes": processes}
    if processes == 1:
        out["one_at_a_time_s"] = sum(timed(lambda t=t: run(test.select([t])), collected=True)[1]
                                     for t in range(len(test)))
    return out


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, args = parse_with_defaults((ParallelArguments, InfluenceArguments), parallel_defaults, argv)
    validate(own)
    if own.worker:
        result = workload(own, args)
        if world()[0] == 0:
            write_atomic(own.worker, to_json(result))
        finish()
        return None
    out = output_folder(args.output_dir).resolve()
    single = workload(own, args)
    done, command = accelerate_launch("benchmarks.parallel", [*argv, f"--worker={out / 'two.json'}"], 2)
    if done.returncode != 0:
        raise RuntimeError(f"The 2-process run failed ({command}):\n{done.stderr[-3000:]}")
    double = json.loads((out / "two.json").read_text())
    base = single["many_in_one_call_s"]
    runs = [("1 process, many test points in one call", base),
            ("1 process, one test point per call", single["one_at_a_time_s"]),
            ("2 processes, many test points in one call", double["many_in_one_call_s"])]
    print(f"## {own.num_test} test points, k = {args.influence_knn_k}, LiSSA J = {args.influence_recursion_depth}, "
          f"B = {args.influence_batch_size}, T = {args.influence_repetitions}\n")
    print(markdown_table(["run", "seconds", "speed-up vs. 1 process, one call"],
                         [[name, f"{seconds:.2f}", f"{base / seconds:.2f}x"] for name, seconds in runs]))
    results = {"one_process": single, "two_processes": double, "command": command}
    write_atomic(out / "benchmark_parallel.json", to_json(results, indent=2))
    return results


if __name__ == "__main__":
    main()
