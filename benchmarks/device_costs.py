"""Unit costs of a BERT-base-sized model built from a config, on the device that is there (a GPU when present), and the
paper-scale speed-ups they give: the one prepared script for a GPU machine.

    python -m benchmarks.device_costs [--output_dir outputs/benchmark_device_costs]
    python -m benchmarks.device_costs --quick        # a 2-layer model on the CPU: proves the script works (CI)

The model is ``BertForSequenceClassification(BertConfig())`` (BERT-base: 12 layers, hidden 768, 110M parameters,
random weights, 3 labels, eager attention), float32, on CUDA when available (else the CPU); influence over the
paper's parameters (layers 10-11, pooler, classifier), the trunk below cached as the engine does. The rows are
``--num_train`` random token rows of ``--seq_len`` tokens (the paper's max_seq_length 128). It measures, with
`benchmarks.costs.measure_unit_costs` (the paper table's units: medians of single calls, the device synchronised):
a LiSSA step ``hvp[B x m]`` from the cached trunk for B in 1, 8 and 128 (or every row, if fewer) with m = 1 and
``--num_shared`` vectors, the same single-vector step through the whole model (``hvp_full[B x1]``, the 2021 code
path), JVP scoring per candidate, the 2021 per-example scoring loop, a test gradient, the convergence check; plus a
no-grad forward of the whole model (rows per second). A step's batch is collated on the CPU and its trunk states
copied to the device, as the engine runs it: on a GPU the single-row steps measure that too. From the units it prints the
paper-scale table (N 392,702, B 128 for the original; FastIF's k, J, B and T are ``--influence_knn_k``,
``--influence_recursion_depth``, ``--influence_batch_size`` and ``--influence_repetitions``, by default the paper's
1000, 1000, 1 and 4; `benchmarks.costs.paper_scale_rows`): seconds per test point and speed-ups over the original
with hf_fastif's kernels and with the 2021 code path's.
Writes ``device_costs.json`` (with the settings used) and ``device_costs.md`` to --output_dir and prints the report.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from datasets import Dataset
from scipy.stats import spearmanr
from transformers import BertConfig, BertForSequenceClassification, default_data_collator
from transformers.utils import logging

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif.params import PAPER_BERT_PARAMS
from hf_fastif.solvers.lissa import LissaDivergenceError
from hf_fastif.utils import library_version

from .arguments import output_folder, parse_with_defaults
from .costs import COST_MODEL, measure_unit_costs, paper_scale_rows
from .paper_setup import BenchmarkArguments, Setup, influence_fields
from .report import rows_table, save_and_print
from .timing import median_seconds, timed

logger = logging.get_logger(__name__)

QUICK_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
"""--quick: a 2-layer BERT whose layers 0-1 are all there is, so the influence parameters are its last layer."""
QUICK_PARAMS = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]


@dataclass
class DeviceCostsArguments:
    """The script's own settings; influence settings are `InfluenceArguments` flags (default: the paper's
    parameters, k 1000, J 1000, B 1, T 4)."""

    num_train: int = field(default=512, metadata={"help": "Random training rows (the units are per row or step)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per row (the paper's max_seq_length)."})
    num_shared: int = field(default=8, metadata={"help": "Test vectors per LiSSA step of the 'fast' row (m)."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})
    end_to_end_rows: int = field(default=128, metadata={
        "help": "Training rows of the end-to-end call (`end_to_end`: a first compute_influences call on the device "
                "and on the CPU, full scan); 0 skips it."})
    end_to_end_depth: int = field(default=100, metadata={"help": "LiSSA depth J of the end-to-end call."})
    quick: bool = field(default=False, metadata={"help": "A 2-layer model, 64 rows of 32 tokens, on the CPU."})


def device_costs_defaults(own) -> dict:
    quick = dict(influence_params=QUICK_PARAMS, use_cpu=True,
                 num_train=64, seq_len=32) if own.quick else {}
    return dict(influence_params=PAPER_BERT_PARAMS, influence_knn_k=1000, influence_recursion_depth=1000,
                influence_batch_size=1, influence_repetitions=4, influence_weight_decay=0.0,
                output_dir="outputs/benchmark_device_costs", report_to="none") | quick


def validate(own: DeviceCostsArguments, args: InfluenceArguments) -> None:
    """Refuse settings the cost model cannot take, before any work."""
    if own.num_train < 2 or own.seq_len < 2 or own.num_shared < 1:
        raise ValueError("--num_train and --seq_len must be at least 2 and --num_shared at least 1.")
    if own.end_to_end_rows < 0 or own.end_to_end_depth < 1:
        raise ValueError("--end_to_end_rows must be at least 0 (0 skips the end-to-end call) and --end_to_end_depth "
                         "at least 1.")
    if args.influence_knn_k is None or args.influence_repetitions is None:
        raise ValueError("The paper-scale cost model takes FastIF's k and T as counts: give --influence_knn_k and "
                         f"--influence_repetitions as integers (the paper's: 1000 and 4), got {args.influence_knn_k} "
                         f"and {args.influence_repetitions}.")
    if args.influence_batch_size > own.num_train:
        raise ValueError(f"--influence_batch_size {args.influence_batch_size} exceeds the --num_train "
                         f"{own.num_train} rows its LiSSA steps draw from; lower it or raise --num_train.")
    if args.influence_knn_features == "gradient":
        raise ValueError("The cost model's kNN query is over model features: pass --influence_knn_features auto, "
                         "pooler, cls, mean or last (not 'gradient').")


def paper_settings(own: DeviceCostsArguments, args: InfluenceArguments) -> BenchmarkArguments:
    """The paper-scale settings of the cost model: N and the original's B are the paper's (B capped at
    ``--num_train``); FastIF's k, J and T are the `InfluenceArguments` flags (its B too: `main`)."""
    bench = BenchmarkArguments(quick=own.quick, paper_k=args.influence_knn_k, paper_j=args.influence_recursion_depth,
                               paper_t=args.influence_repetitions)
    bench.paper_b = min(bench.paper_b, own.num_train)  # the original's B: 128, or every row of a smaller set
    return bench


def build_setup(own: DeviceCostsArguments, args: InfluenceArguments, device: str, num_test: int = 1) -> Setup:
    """The model from a config and random token rows (``num_train`` + ``num_test`` test rows), on ``device``."""
    torch.manual_seed(args.seed)
    config = BertConfig(num_labels=3, attn_implementation="eager", **(QUICK_CONFIG if own.quick else {}))
    model = BertForSequenceClassification(config).to(device).eval()
    rng = np.random.default_rng(args.seed)
    n = own.num_train + num_test
    ids = rng.integers(1000, config.vocab_size, size=(n, own.seq_len))
    ids[:, 0] = 101  # [CLS]
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": rng.integers(0, 3, size=n).tolist()})
    return Setup(model, None, default_data_collator, rows.select(range(own.num_train)),
                 rows.select(range(own.num_train, n)),
                 {"model": f"BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}) from a config"})


def forward_rows_per_s(setup: Setup, device: str, batch_size: int = 64) -> float:
    """Rows per second of a no-grad forward of the whole model (pre-collated batches on the device)."""
    n = len(setup.train)
    batches = [{k: v.to(device) for k, v in setup.collator([setup.train[i] for i in range(s, min(s + batch_size, n))])
                .items() if k != "labels"} for s in range(0, n, batch_size)]

    def forward():
        with torch.no_grad():
            for batch in batches:
                setup.model(**batch)
        if device == "cuda":
            torch.cuda.synchronize()

    return n / median_seconds(forward, 3)


def compare(a, b) -> dict:
    """How far two influence tables over the same (test, train) pairs agree, pooled over their test points:
    Spearman, the largest difference relative to the largest influence, the 10 most helpful pairs in common, on the
    pairs finite on both sides (``non_finite``: how many are not, on either side); ``{"same_pairs": False}`` where the
    two scored different pairs."""
    frames = [t.to_pandas().sort_values(["test_id", "train_id"]) for t in (a, b)]
    pairs = [f[["test_id", "train_id"]].to_numpy() for f in frames]
    if pairs[0].shape != pairs[1].shape or not bool((pairs[0] == pairs[1]).all()):
        return {"same_pairs": False}
    x, y = (f["influence"].to_numpy() for f in frames)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    out = {"same_pairs": True, "pairs": len(finite), "non_finite": int((~finite).sum())}
    if len(x) < 2:
        return out
    top = min(10, len(x))
    return out | {"spearman": float(spearmanr(x, y).statistic),
                  "max_abs_difference_relative": float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)),
                  "top10_helpful_in_common": len(set(np.argsort(x)[:top]) & set(np.argsort(y)[:top]))}


PHASES = ("trunk_s", "test_gradients_s", "s_test_s", "scoring_s")


def end_to_end(setup: Setup, own: DeviceCostsArguments, args: InfluenceArguments, device: str) -> dict | None:
    """One first `compute_influences` call (a fresh engine: trunk states, convergence check, T repetitions of J
    LiSSA steps, JVP scoring of every row) on ``device`` with the library's defaults, the same call there with
    ``influence_stack_repetitions`` the other way (where the default stacked the repetitions' products of a step,
    `hf_fastif.stacked` / `hf_fastif.grouped_products`, the other side runs them one at a time, and the other way
    round), and the
    call on a CPU copy of the model: seconds, the engine's phases, whether the repetitions were stacked, and how far
    each device table agrees with the CPU one (Spearman, the largest difference relative to the largest influence,
    the top-10 most helpful rows in common: `compare`). On a CPU-only machine the CPU side is a fresh engine on the
    CPU again. The check can find a random model's Hessian indefinite at these settings, on any side: every side
    then runs without it, and ``check`` says so."""
    if own.end_to_end_rows == 0:
        return None
    train = setup.train.select(range(min(own.end_to_end_rows, len(setup.train))))
    run_args = replace(args, influence_recursion_depth=own.end_to_end_depth, influence_knn_k=None)
    cpu_model = copy.deepcopy(setup.model).cpu() if device != "cpu" else setup.model

    def run(model, settings) -> dict:
        table, seconds = timed(lambda: compute_influences(model, train, setup.test, settings,
                                                          data_collator=setup.collator), collected=True)
        diagnostics = table.metadata["diagnostics"]
        return {"seconds": seconds, "phases": {k: diagnostics.get(k, 0.0) for k in PHASES},
                "stacked": bool(diagnostics.get("lissa_stacked", False)), "table": table}

    def flipped(device_side: dict) -> str:
        """The other stacking: the device side's own turned round (the grouped route stacks on CPUs too)."""
        return "no" if device_side["stacked"] else "yes"

    def sides(settings) -> dict:
        first = run(setup.model, settings)
        return {"device": first,
                "device, other stacking": run(setup.model, replace(settings,
                                                                   influence_stack_repetitions=flipped(first))),
                "cpu": run(cpu_model, settings)}

    check = "on"
    try:  # a check that refuses on any side (rounding can put a borderline Hessian either way) turns it off
        ran = sides(run_args)
    except LissaDivergenceError as error:
        check, run_args = f"off (the check refused: {str(error).splitlines()[0]})", replace(
            run_args, influence_check_convergence=False)
        ran = sides(run_args)
    return {"rows": len(train), "test_points": len(setup.test), "depth": own.end_to_end_depth,
            "repetitions": run_args.influence_repetitions, "batch_size": run_args.influence_batch_size,
            "check": check, "sides": {"device": device, "device, other stacking":
                                      f"{device}, influence_stack_repetitions={flipped(ran['device'])}",
                                      "cpu": "cpu" if device != "cpu" else "cpu (a fresh engine)"},
            "seconds": {k: r["seconds"] for k, r in ran.items()}, "phases": {k: r["phases"] for k, r in ran.items()},
            "stacked": {k: r["stacked"] for k, r in ran.items()},
            "other_stacking_vs_cpu": compare(ran["device, other stacking"]["table"], ran["cpu"]["table"])
            } | compare(ran["device"]["table"], ran["cpu"]["table"])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, args = parse_with_defaults((DeviceCostsArguments, InfluenceArguments), device_costs_defaults, argv)
    validate(own, args)
    output_folder(args.output_dir)
    if own.threads:
        torch.set_num_threads(own.threads)
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    if device == "cpu" and not own.quick:  # the full model on a CPU runs for many minutes before it prints anything
        reason = "--use_cpu was given" if torch.cuda.is_available() else "No GPU found"
        logger.warning(f"{reason}: running BERT-base (110M parameters; {own.num_train} rows of {own.seq_len} tokens) "
                       "on the CPU, which takes many minutes before anything is printed. --quick runs a 2-layer "
                       "model on the CPU in seconds instead.")
    started = time.perf_counter()
    setup = build_setup(own, args, device)
    bench = paper_settings(own, args)
    b_fastif = args.influence_batch_size
    batch_sizes = sorted({1, 8, b_fastif, bench.paper_b})
    unit = measure_unit_costs(setup, bench, args, own.num_shared, batch_sizes)
    fast = {"b": 8, "t": 1, "j": args.influence_recursion_depth}  # B 8, T 1, m test points per call, J as FastIF's
    rows, _ = paper_scale_rows(unit, bench, args, fast, own.num_shared, b_fastif=b_fastif)
    forward = forward_rows_per_s(setup, device)
    failed = None
    try:
        call = end_to_end(setup, own, args, device)
    except Exception as error:  # the units measured above are written first, then the error is raised
        failed, call = error, {"error": f"{type(error).__name__}: {error}"}
    environment = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": "float32",
                   "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device == "cuda" else None,
                   "load_average": [round(x, 2) for x in os.getloadavg()]}
    throughput = {"forward rows/s (whole model, batches of 64)": forward,
                  "JVP scoring rows/s (trunk cached)": 1.0 / unit["score"]["1"],
                  "2021 per-example scoring rows/s": 1.0 / unit["score_loop"],
                  "LiSSA steps/s, B 1 (trunk cached)": 1.0 / unit["hvp"]["1x1"],
                  "LiSSA steps/s, B 1, whole model (2021 code path)": 1.0 / unit["hvp_full"]["1x1"],
                  f"LiSSA steps/s, B {batch_sizes[-1]} (trunk cached)": 1.0 / unit["hvp"][f"{batch_sizes[-1]}x1"]}
    throughput |= {f"LiSSA steps/s, B {key.replace('x', ', T ')} stacked (all T repetitions a step)": 1.0 / seconds
                   for key, seconds in unit["hvp_stacked"].items()}
    scale_settings = {k: getattr(bench, k) for k in ("paper_n", "paper_k", "paper_j", "paper_b", "paper_t")}
    out = {"command": "python -m benchmarks.device_costs " + " ".join(argv), "library_version": library_version(),
           "influence_arguments": influence_fields(args) | {"seed": args.seed, "use_cpu": args.use_cpu},
           "environment": environment, "model": setup.description["model"],
           "num_parameters": sum(p.numel() for p in setup.model.parameters()),
           "num_influence_parameters": unit["num_parameters"], "num_train": own.num_train, "seq_len": own.seq_len,
           "num_shared": own.num_shared, "unit_costs_s": unit, "throughput": throughput, "paper_scale": rows,
           "paper_scale_settings": scale_settings | {"fastif_b": b_fastif}, "end_to_end": call,
           "cost_model": COST_MODEL,
           "total_s": time.perf_counter() - started}
    save_and_print(args.output_dir, "device_costs", out, render(out))
    if failed is not None:
        raise failed
    return out


def render(out: dict) -> str:
    env, unit = out["environment"], out["unit_costs_s"]
    units = [{"unit": f"{kind}[{key}]", "ms": 1e3 * value} for kind in ("hvp", "hvp_full", "score")
             for key, value in unit[kind].items()]
    units += [{"unit": f"power_iteration[B={key}]", "ms": 1e3 * value}
              for key, value in unit["power_iteration"].items()]
    units += [{"unit": name, "ms": 1e3 * unit[name]} for name in ("score_loop", "test_gradient", "trunk", "feature")]
    return "\n".join([
        f"# Unit costs on {env['device']}: {out['model']}\n",
        f"`{out['command']}`\n",
        f"{out['num_parameters']:,} parameters, {out['num_influence_parameters']:,} influence parameters; "
        f"{out['num_train']} rows of {out['seq_len']} tokens; torch {env['torch']}, {env['threads']} CPU thread(s), "
        f"float32 (TF32 matmuls: {env['tf32_matmul']}); load average {env['load_average']}; "
        f"{out['total_s']:.0f} s in all.\n",
        "## Throughput\n", rows_table([out["throughput"]], list(out["throughput"])),
        "\n## Unit costs (median of single calls)\n", rows_table(units, ["unit", "ms"]),
        "\n## At the paper's scale, from these units\n",
        "N {paper_n:,}, k {paper_k}, J {paper_j}, B {paper_b} (original) vs {fastif_b}, T {paper_t}; 'fast': B 8, "
        "T 1, {m} test points per call.\n".format(**out["paper_scale_settings"], m=out["num_shared"]),
        rows_table(out["paper_scale"], ["row", "seconds", "speed-up vs original (hf_fastif kernels)",
                                        "speed-up vs original (2021 code path)"]),
        *render_end_to_end(out["end_to_end"]),
        f"\n```\n{out['cost_model']}\n```\n"])


def render_end_to_end(call: dict | None) -> list[str]:
    if call is None:
        return []
    if "error" in call:
        return ["\n## One first call end to end, and the same call on the CPU\n", f"Failed: {call['error']}\n"]
    rows = [{"side": side, "seconds": call["seconds"][key],
             "repetitions stacked": "yes" if call["stacked"][key] else "no"} | call["phases"][key]
            for key, side in call["sides"].items()]
    other = call["sides"]["device, other stacking"]
    return ["\n## One first call end to end, and the same call on the CPU\n",
            f"`compute_influences`, a fresh engine: {call['test_points']} test point, full scan of {call['rows']} "
            f"rows, J {call['depth']}, B {call['batch_size']}, T {call['repetitions']}, convergence check "
            f"{call['check']}.\n", rows_table(rows, ["side", "seconds", "repetitions stacked", *PHASES]),
            f"\n{call['sides']['device']} (the defaults) against the CPU. {agreement_line(call)}\n",
            f"\n{other} against the CPU. {agreement_line(call['other_stacking_vs_cpu'])}\n"]


def agreement_line(compared: dict) -> str:
    """`compare`'s result in words."""
    if not compared["same_pairs"]:
        return "The two tables scored different pairs."
    if "spearman" not in compared:
        return f"Fewer than 2 pairs finite on both sides ({compared['non_finite']} of {compared['pairs']} are not)."
    return (f"Agreement of the two tables: Spearman {compared['spearman']:.6f}, largest difference "
            f"{compared['max_abs_difference_relative']:.2e} of the largest influence, "
            f"{compared['top10_helpful_in_common']} of the 10 most helpful rows in common"
            + (f"; {compared['non_finite']} pairs not finite on a side, left out." if compared["non_finite"] else "."))


if __name__ == "__main__":
    main()
