"""Core benchmark: batched JVP scoring vs. the 2021 per-example loop, and solvers against leave-one-out retraining
on two convex models: a logistic regression on the digits, and the pretrained MiniLM's classification head.

    python -m benchmarks.core [--quick] [--output_dir outputs/benchmark_core] [--influence_scoring_batch_size 64]

Prints markdown tables and writes them as JSON. Everything runs side by side in one process, so the
ratios are comparable on a shared, noisy machine; the absolute numbers are not. The scoring part times the
library's kernels directly (hf_fastif.batches, loss, mode, params, scoring).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_fastif import InfluenceArguments
from hf_fastif.batches import Batcher
from hf_fastif.ground_truth import check_digits_sizes
from hf_fastif.loss import FunctionalModel
from hf_fastif.mode import influence_mode
from hf_fastif.params import select_parameters
from hf_fastif.scoring import score_candidates, score_per_example_loop
from hf_fastif.utils import to_json, write_atomic

from .arguments import output_folder, parse_with_defaults
from .digits_anchor import ground_truth_anchor, minilm_head_anchor
from .report import rows_table
from .timing import median_seconds

PAPER_SELECTION = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]  # last layer of 2, pooler, classifier


@dataclass
class CoreArguments:
    """The core benchmark's own settings; the scoring batch size is --influence_scoring_batch_size."""

    hidden_sizes: list[int] = field(default_factory=lambda: [128, 256, 384], metadata={"help": "BERT widths."})
    num_candidates: int = field(default=256, metadata={"help": "Candidates scored per measurement."})
    loop_candidates: int = field(default=64, metadata={"help": "Candidates for the slow per-example loop."})
    seq_len: int = field(default=32, metadata={"help": "Tokens per candidate."})
    digits_train: int = field(default=1000, metadata={"help": "Digits training rows."})
    digits_test: int = field(default=50, metadata={"help": "Digits test rows."})
    minilm_train: int = field(default=300, metadata={
        "help": "Generated NLI rows for the pretrained MiniLM head's anchor (0 leaves that section out)."})
    minilm_test: int = field(default=8, metadata={"help": "HANS-style test rows for the MiniLM head's anchor."})
    lds_subsets: int = field(default=100, metadata={"help": "Random half-size subsets for the LDS (each retrained)."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes: proves the script works (CI)."})


def core_defaults(own: Namespace) -> dict:
    """Defaults given the core benchmark's own flags: ``--quick`` shrinks every size."""
    out = dict(output_dir="outputs/benchmark_core", report_to="none")
    if own.quick:
        out |= dict(hidden_sizes=[32], num_candidates=32, loop_candidates=8, digits_train=200, digits_test=5,
                    lds_subsets=10, minilm_train=0)
    return out


def validate(core: CoreArguments) -> None:
    """Refuse sizes the benchmark cannot run, before any work starts."""
    for name in ("num_candidates", "loop_candidates", "seq_len", "digits_train", "digits_test", "lds_subsets"):
        if getattr(core, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(core, name)}.")
    check_digits_sizes(core.digits_train, core.digits_test)
    if core.minilm_train and (core.minilm_train < 2 or core.minilm_test < 1):
        raise ValueError(f"--minilm_train {core.minilm_train} --minilm_test {core.minilm_test}: the MiniLM head's "
                         "anchor needs at least 2 training rows and 1 test row (--minilm_train 0 leaves it out).")
    if core.loop_candidates > core.num_candidates:
        raise ValueError(f"--loop_candidates {core.loop_candidates} exceeds --num_candidates {core.num_candidates}: "
                         "the per-example loop times a subset of the candidates; lower it or raise --num_candidates.")
    if not core.hidden_sizes or any(h < 4 or h % 4 for h in core.hidden_sizes):
        raise ValueError(f"--hidden_sizes {core.hidden_sizes}: give positive multiples of 4 (the BERTs have 4 "
                         "attention heads).")


def scoring_benchmark(core: CoreArguments, batch_size: int) -> list[dict]:
    """Candidates per second of a forward pass, the per-example loop, batched JVP and per-example gradients,
    for random-init 2-layer BERTs of each width, over the paper's parameter selection and over all."""
    rows = []
    rng = np.random.default_rng(0)
    n = core.num_candidates
    ids = rng.integers(5, 1000, size=(n, core.seq_len))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": rng.integers(0, 3, size=n).tolist()})
    for hidden in core.hidden_sizes:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=4 * hidden, num_labels=3, attn_implementation="eager")
        model = BertForSequenceClassification(cfg).eval()
        batcher = Batcher(data, ["input_ids", "attention_mask", "labels"], None, "cpu")

        def forward():  # (collating inside, as the scorings timed against it do: a review)
            with torch.no_grad():
                for _, b in batcher.batches(range(n), batch_size):
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        t_forward = median_seconds(forward, 1)
        for selection, patterns in (("paper (last layer, pooler, classifier)", PAPER_SELECTION), ("all", None)):
            params = select_parameters(model, patterns)
            fm = FunctionalModel(model, list(params))
            p = sum(v.numel() for v in params.values())
            s = torch.randn(1, p) * 1e-3
            with influence_mode(model, list(params)):
                t_jvp = median_seconds(lambda: score_candidates(fm, params, batcher, range(n), s,
                                                                batch_size=batch_size, progress=False), 1)
                t_grad = median_seconds(lambda: score_candidates(fm, params, batcher, range(n), s, method="grad",
                                                                 batch_size=batch_size, progress=False), 1)
                m = core.loop_candidates
                t_loop = median_seconds(lambda: score_per_example_loop(fm, params, batcher, range(m), s), 1) * n / m
            rows.append({
                "hidden": hidden, "parameters": selection, "num_parameters": p,
                "forward_cand_per_s": n / t_forward, "loop_cand_per_s": n / t_loop,
                "jvp_cand_per_s": n / t_jvp, "grad_cand_per_s": n / t_grad,
                "jvp_speedup_over_loop": t_loop / t_jvp, "jvp_cost_in_forwards": t_jvp / t_forward,
            })
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    core, args = parse_with_defaults((CoreArguments, InfluenceArguments), core_defaults, argv)
    validate(core)
    out = output_folder(args.output_dir)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    scoring = scoring_benchmark(core, args.influence_scoring_batch_size)
    print("## Scoring -∇L(z)·s_test: batched JVP vs. the 2021 per-example loop (random-init BERT, 2 layers)\n")
    print(rows_table(scoring, ["hidden", "parameters", "num_parameters", "forward_cand_per_s", "loop_cand_per_s",
                               "jvp_cand_per_s", "grad_cand_per_s", "jvp_speedup_over_loop", "jvp_cost_in_forwards"]))
    digits = ground_truth_anchor(core.digits_train, core.digits_test, core.lds_subsets)["rows"]
    print(f"\n## Solvers on L2-regularised logistic regression (digits, {core.digits_test} test x "
          f"{core.digits_train} train)\n")
    columns = ["solver", "seconds", "lambda", "spearman_vs_exact", "spearman_vs_loo", "lds"]
    print(rows_table(digits, columns))
    results = {"scoring": scoring, "digits": digits}
    if core.minilm_train:
        results["minilm_head"] = minilm_head_anchor(core.minilm_train, core.minilm_test, core.lds_subsets)["rows"]
        print(f"\n## Solvers through the pretrained MiniLM, its classification head at an L2 optimum (generated NLI, "
              f"{core.minilm_test} HANS-style test x {core.minilm_train} train)\n")
        print(rows_table(results["minilm_head"], columns))
    write_atomic(out / "benchmark_core.json", to_json(results, indent=2))
    print(f"\nwrote {out / 'benchmark_core.json'}")
    return results


if __name__ == "__main__":
    main()
