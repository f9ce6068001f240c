"""The paper's speed–quality table, side by side in one run: original, +kNN, FastIF, FastIF parallel and
hf_fastif fast; the s_test sweep; kNN recall vs k; a ground-truth anchor; the speed-up at the paper's scale.

    python recipes/benchmark.py [--quick] [--output_dir outputs/benchmark]     # embedded default, offline, CPU
    python recipes/benchmark.py --model_name_or_path M --train_dataset nyu-mll/multi_nli --max_train_rows 50000

Prints markdown tables and writes benchmark.json, benchmark.md and two PNGs to --output_dir. The logic is in
`hf_fastif.benchmark` (every flag is a field of `BenchmarkConfig`).
"""

from __future__ import annotations

from transformers import HfArgumentParser

from hf_fastif.benchmark import BenchmarkConfig, parallel_worker, run_benchmark


def main():
    (config,) = HfArgumentParser(BenchmarkConfig).parse_args_into_dataclasses()
    if config.parallel_worker:
        parallel_worker(config.parallel_worker)
        return
    run_benchmark(config)


if __name__ == "__main__":
    main()
