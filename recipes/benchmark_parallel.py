"""Parallel-variant benchmark: 1 vs. 2 processes, and many test points in one call vs. one at a time.

    python recipes/benchmark_parallel.py [--quick]

The 1-process run happens here; the 2-process run is this script relaunched with
`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU; `--cpu` would silently run one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_fastif import compute_influences
from hf_fastif.distributed import world
from hf_fastif.embedded import embedded_data, embedded_model
from hf_fastif.influence import default_arguments


@dataclass
class ParallelBenchmarkArguments:
    output_dir: str = field(default="outputs/benchmark_parallel", metadata={"help": "Where the JSON goes."})
    num_test: int = field(default=8, metadata={"help": "Test points per call."})
    knn_k: int = field(default=500, metadata={"help": "Candidates per test point."})
    recursion_depth: int = field(default=100, metadata={"help": "LiSSA J."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes (CI)."})
    worker: str | None = field(default=None, metadata={"help": "Internal: write timings here (launched run)."})


def workload(args: ParallelBenchmarkArguments) -> dict:
    """Time the same influence job; returns seconds per phase (identical on every process)."""
    torch.set_num_threads(1)
    raw, data, tokenizer = embedded_data(seed=0, n_train=1000 if args.quick else 3000)
    model = embedded_model(tokenizer).eval()
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer)
    test = data["hans"].select(range(args.num_test))
    iargs = default_arguments(influence_solver="lissa", influence_repetitions=4, influence_batch_size=1,
                              influence_recursion_depth=args.recursion_depth, influence_knn_k=args.knn_k,
                              influence_damping=5e-3, influence_scale=1e3, disable_tqdm=True,
                              influence_params=[r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."])
    compute_influences(model, data["train"], test.select([0]), iargs, data_collator=collator)  # warm-up
    start = time.perf_counter()
    table = compute_influences(model, data["train"], test, iargs, data_collator=collator)
    together = time.perf_counter() - start
    out = {"many_in_one_call_s": together, "diagnostics": table.metadata["diagnostics"]}
    if world()[1] == 1:
        start = time.perf_counter()
        for t in range(len(test)):
            compute_influences(model, data["train"], test.select([t]), iargs, data_collator=collator)
        out["one_at_a_time_s"] = time.perf_counter() - start
    return out


def main():
    (args,) = HfArgumentParser(ParallelBenchmarkArguments).parse_args_into_dataclasses()
    if args.quick:
        args.num_test, args.knn_k, args.recursion_depth = 2, 50, 10
    if args.worker:
        result = workload(args)
        if world()[0] == 0:
            Path(args.worker).write_text(json.dumps(result))
        return
    single = workload(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "quick", "output_dir")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), __file__, *flags, f"--worker={out / 'two.json'}"]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    double = json.loads((out / "two.json").read_text())
    rows = [
        ("1 process, many test points in one call", single["many_in_one_call_s"]),
        ("1 process, one test point per call", single["one_at_a_time_s"]),
        ("2 processes, many test points in one call", double["many_in_one_call_s"]),
    ]
    base = single["many_in_one_call_s"]
    print(f"## {args.num_test} test points, k = {args.knn_k}, LiSSA J = {args.recursion_depth}, B = 1, T = 4\n")
    print("| run | seconds | speed-up vs. 1 process, one call |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x |")
    (out / "benchmark_parallel.json").write_text(json.dumps({"one_process": single, "two_processes": double},
                                                             indent=2, default=str))


if __name__ == "__main__":
    main()
