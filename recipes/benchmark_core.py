"""Core benchmark: batched JVP scoring vs. the 2021 per-example loop, and solvers on a convex model.

    python recipes/benchmark_core.py [--quick] [--output_dir outputs/benchmark_core]

Prints markdown tables and writes them as JSON. Everything runs side by side in one process, so the
ratios are comparable on a shared, noisy machine; the absolute numbers are not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

from hf_fastif.batches import Batcher
from hf_fastif.benchmark import BenchmarkConfig, ground_truth_anchor, markdown_rows
from hf_fastif.loss import FunctionalModel
from hf_fastif.mode import influence_mode
from hf_fastif.params import select_parameters
from hf_fastif.scoring import score_candidates, score_per_example_loop


@dataclass
class BenchmarkArguments:
    output_dir: str = field(default="outputs/benchmark_core", metadata={"help": "Where the JSON goes."})
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 256, 384], metadata={"help": "BERT widths."})
    num_candidates: int = field(default=256, metadata={"help": "Candidates scored per measurement."})
    loop_candidates: int = field(default=64, metadata={"help": "Candidates for the slow per-example loop."})
    seq_len: int = field(default=32, metadata={"help": "Tokens per candidate."})
    batch_size: int = field(default=64, metadata={"help": "Scoring batch size."})
    num_train: int = field(default=1000, metadata={"help": "Digits training rows."})
    num_test: int = field(default=50, metadata={"help": "Digits test rows."})
    lds_subsets: int = field(default=100, metadata={"help": "Random 50% subsets for the LDS (each retrained)."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes: proves the script works (CI)."})


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def scoring_benchmark(args: BenchmarkArguments) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    n = args.num_candidates
    ids = rng.integers(5, 1000, size=(n, args.seq_len))
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": rng.integers(0, 3, size=n).tolist()})
    for hidden in args.hidden_sizes:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=4 * hidden, num_labels=3, attn_implementation="eager")
        model = BertForSequenceClassification(cfg).eval()
        batcher = Batcher(data, ["input_ids", "attention_mask", "labels"], None, "cpu")
        forward_batches = [b for _, b in batcher.batches(range(n), args.batch_size)]

        def forward():
            with torch.no_grad():
                for b in forward_batches:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        t_forward = timed(forward)
        for selection, patterns in (("paper (last layer, pooler, classifier)",
                                     [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]), ("all", None)):
            params = select_parameters(model, patterns)
            fm = FunctionalModel(model, list(params))
            p = sum(v.numel() for v in params.values())
            s = torch.randn(1, p) * 1e-3
            with influence_mode(model, list(params)):
                t_jvp = timed(lambda: score_candidates(fm, params, batcher, range(n), s,
                                                       batch_size=args.batch_size, progress=False))
                t_grad = timed(lambda: score_candidates(fm, params, batcher, range(n), s, method="grad",
                                                        batch_size=args.batch_size, progress=False))
                m = args.loop_candidates
                t_loop = timed(lambda: score_per_example_loop(fm, params, batcher, range(m), s)) * n / m
            rows.append({
                "hidden": hidden, "parameters": selection, "num_parameters": p,
                "forward_cand_per_s": n / t_forward, "loop_cand_per_s": n / t_loop,
                "jvp_cand_per_s": n / t_jvp, "grad_cand_per_s": n / t_grad,
                "jvp_speedup_over_loop": t_loop / t_jvp, "jvp_cost_in_forwards": t_jvp / t_forward,
            })
    return rows


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.quick:
        args.hidden_sizes, args.num_candidates, args.loop_candidates = [32], 32, 8
        args.num_train, args.num_test, args.lds_subsets = 200, 5, 10
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    scoring = scoring_benchmark(args)
    print("## Scoring -∇L(z)·s_test: batched JVP vs. the 2021 per-example loop (random-init BERT, 2 layers)\n")
    print(markdown_rows(scoring, ["hidden", "parameters", "num_parameters", "forward_cand_per_s", "loop_cand_per_s",
                             "jvp_cand_per_s", "grad_cand_per_s", "jvp_speedup_over_loop", "jvp_cost_in_forwards"]))
    digits = ground_truth_anchor(BenchmarkConfig(digits_train=args.num_train, digits_test=args.num_test,
                                                 lds_subsets=args.lds_subsets))["rows"]
    print(f"\n## Solvers on L2-regularised logistic regression (digits, {args.num_test} test x "
          f"{args.num_train} train)\n")
    print(markdown_rows(digits, ["solver", "seconds", "lambda", "spearman_vs_exact", "spearman_vs_loo", "lds"]))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_core.json").write_text(json.dumps({"scoring": scoring, "digits": digits}, indent=2))
    print(f"\nwrote {out / 'benchmark_core.json'}")


if __name__ == "__main__":
    main()
