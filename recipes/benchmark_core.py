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
from scipy.stats import spearmanr
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

from hf_fastif import compute_influences
from hf_fastif.batches import Batcher
from hf_fastif.ground_truth import (
    LogisticRegression,
    digits_data,
    fit_logistic_regression,
    leave_one_out_loss_changes,
)
from hf_fastif.influence import default_arguments, influence_mode
from hf_fastif.loss import FunctionalModel
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


def digits_benchmark(args: BenchmarkArguments) -> list[dict]:
    wd = 0.005
    train, test, x, y, xt, yt = digits_data(num_train=args.num_train, num_test=args.num_test, seed=0)
    model = fit_logistic_regression(LogisticRegression(64, 2).double(), x, y, wd)
    start = time.perf_counter()
    loo = leave_one_out_loss_changes(model, x, y, xt, yt, wd)
    t_loo = time.perf_counter() - start

    def measurement(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs["logits"], batch["labels"], reduction="none")

    settings = {
        "exact": dict(influence_solver="exact", influence_damping=0.0),
        "cg": dict(influence_solver="cg", influence_damping=0.0),
        "lissa (B=32, J=1500, T=4)": dict(influence_solver="lissa", influence_damping=0.001, influence_scale=2.0,
                                          influence_batch_size=32, influence_recursion_depth=1500,
                                          influence_repetitions=4),
        # single-row Hessians reach p(1-p)·‖x‖² ≈ 16, so B = 1 needs a larger scale (λ kept at 0.002)
        "lissa (B=1, J=1000, T=4; paper's FastIF)": dict(influence_solver="lissa", influence_damping=0.0001,
                                                         influence_scale=20.0, influence_batch_size=1,
                                                         influence_recursion_depth=1000, influence_repetitions=4),
    }
    matrices, rows = {}, []
    for name, kw in settings.items():
        iargs = default_arguments(influence_weight_decay=wd, influence_knn_k=None, disable_tqdm=True,
                                  influence_hvp_batch_size=1000, influence_scoring_batch_size=1000, **kw)
        start = time.perf_counter()
        table = compute_influences(model, train, test, iargs, measurement_fn=measurement)
        seconds = time.perf_counter() - start
        df = table.to_pandas()
        mat = np.zeros((len(test), len(train)))
        mat[df.test_id, df.train_id] = df.influence
        matrices[name] = mat
        rows.append({"solver": name, "seconds": seconds, "lambda": iargs.influence_lambda,
                     "spearman_vs_loo": float(np.mean([spearmanr(-mat[t], loo[:, t]).statistic
                                                       for t in range(len(test))]))})
    for row in rows:
        mat = matrices[row["solver"]]
        row["spearman_vs_exact"] = float(np.mean([spearmanr(mat[t], matrices["exact"][t]).statistic
                                                  for t in range(len(test))]))
    rows.append({"solver": "leave-one-out retraining (Newton)", "seconds": t_loo, "spearman_vs_loo": 1.0,
                 "spearman_vs_exact": float(np.mean([spearmanr(-matrices["exact"][t], loo[:, t]).statistic
                                                     for t in range(len(test))]))})
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.quick:
        args.hidden_sizes, args.num_candidates, args.loop_candidates = [32], 32, 8
        args.num_train, args.num_test = 200, 5
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    scoring = scoring_benchmark(args)
    print("## Scoring -∇L(z)·s_test: batched JVP vs. the 2021 per-example loop (random-init BERT, 2 layers)\n")
    print(markdown(scoring, ["hidden", "parameters", "num_parameters", "forward_cand_per_s", "loop_cand_per_s",
                             "jvp_cand_per_s", "grad_cand_per_s", "jvp_speedup_over_loop", "jvp_cost_in_forwards"]))
    digits = digits_benchmark(args)
    print(f"\n## Solvers on L2-regularised logistic regression (digits, {args.num_test} test x "
          f"{args.num_train} train)\n")
    print(markdown(digits, ["solver", "seconds", "lambda", "spearman_vs_exact", "spearman_vs_loo"]))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_core.json").write_text(json.dumps({"scoring": scoring, "digits": digits}, indent=2))
    print(f"\nwrote {out / 'benchmark_core.json'}")


if __name__ == "__main__":
    main()
