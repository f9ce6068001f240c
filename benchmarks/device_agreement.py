"""Whether influence computed on the GPU is the influence computed on the CPU: every solver and candidate path of
`compute_influences` run once with the model on the device that is there and once with a copy on the CPU, the
two tables compared. The second prepared script for a GPU machine (`benchmarks.device_costs` is the first).

    python -m benchmarks.device_agreement [--output_dir outputs/benchmark_device_agreement]

The model is a 2-layer BERT from a config (hidden 64, random weights, 3 labels, eager attention), influence over
its last layer, pooler and classifier; 64 random training rows of 32 tokens and 3 test rows. Each case is one
fresh `compute_influences` call per side with the same settings and seed (LiSSA's rows and the Lanczos start
vectors are drawn on the CPU, so both sides run the same arithmetic up to float rounding and the order of the
device's reductions). A case that raises on one side is reported with its error, and the other cases still run.
On a CPU-only machine both sides are the CPU (the tables must then be equal to the bit).
Writes ``device_agreement.json`` and ``device_agreement.md`` to --output_dir and prints the report.
"""

from __future__ import annotations

import copy
import sys
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from hf_fastif import InfluenceArguments, InfluenceTrainer, compute_influences
from hf_fastif.space import LIVE_SETTINGS
from hf_fastif.utils import library_version

from .arguments import output_folder, parse_with_defaults
from .device_costs import QUICK_PARAMS, DeviceCostsArguments, agreement_line, build_setup, compare
from .report import rows_table, save_and_print

CASES: dict[str, dict] = {
    "LiSSA, full scan": {},
    "LiSSA, kNN k 16": dict(influence_knn_k=16),
    "LiSSA, mean of the test points (combine='mean')": dict(combine="mean"),
    "LiSSA, without the trunk cache": dict(influence_trunk_cache=False),
    "LiSSA, per-example gradient scoring": dict(influence_scoring="grad"),
    "LiSSA, repetitions one product at a time": dict(influence_stack_repetitions="no"),
    "LiSSA, repetitions stacked on both sides": dict(influence_stack_repetitions="yes"),
    "CG": dict(influence_solver="cg"),
    "exact (classifier only)": dict(influence_solver="exact", influence_params=[r"classifier\."]),
    "Arnoldi": dict(influence_solver="arnoldi", influence_arnoldi_rank=8, influence_arnoldi_rows=None),
    "the Space's live settings (Arnoldi, gradient index)": LIVE_SETTINGS | dict(
        influence_arnoldi_rank=8, influence_arnoldi_rows=None, influence_projection_dim=512, influence_knn_k=16),
    "LiSSA, a bfloat16 model": dict(dtype="bfloat16"),
    "LiSSA, through InfluenceTrainer": dict(trainer=True),
}
"""Each case's settings over the base (LiSSA, J 20, B 1, T 2, full scan, check on). With the default
``influence_stack_repetitions="auto"`` both sides stack the T repetitions' products of a step where the grouped route
applies (`hf_fastif.grouped_products`: this BERT's parameters all do), and otherwise a CUDA side stacks them vmapped
(`hf_fastif.stacked`) while the CPU side runs them one at a time; the two stacking cases compare like with like. Not settings: ``combine``
(the call's), ``dtype`` (a copy of each side's model in that dtype), ``trainer`` (the call goes through an
`InfluenceTrainer` built on each side's model, with ``use_cpu`` on the CPU side, and is not trained)."""
CALL_KEYS = ("combine", "dtype", "trainer")


@dataclass
class DeviceAgreementArguments:
    num_train: int = field(default=64, metadata={"help": "Random training rows (at least 32)."})
    seq_len: int = field(default=32, metadata={"help": "Tokens per row (at least 4)."})


def device_agreement_defaults(own) -> dict:
    return dict(influence_params=QUICK_PARAMS, influence_knn_k=None, influence_recursion_depth=20,
                influence_batch_size=1, influence_repetitions=2, influence_weight_decay=0.0,
                output_dir="outputs/benchmark_device_agreement", report_to="none", disable_tqdm=True)


def call(model, train, test, settings: InfluenceArguments, case: dict):
    """One side's table for ``case`` (see `CASES`)."""
    combine = case.get("combine", "none")
    if "dtype" in case:
        model = copy.deepcopy(model).to(getattr(torch, case["dtype"]))
    if case.get("trainer"):
        on_cpu = next(model.parameters()).device.type == "cpu"
        trainer = InfluenceTrainer(model=model, args=replace(settings, use_cpu=on_cpu), train_dataset=train)
        return trainer.compute_influences(test, combine=combine)
    return compute_influences(model, train, test, settings, combine=combine)


def run_case(models: dict, train, test, settings: InfluenceArguments, case: dict) -> dict:
    tables, seconds, errors = {}, {}, {}
    for side, model in models.items():
        start = time.perf_counter()
        try:
            tables[side] = call(model, train, test, settings, case)
        except Exception as error:  # reported per case; the other cases still run
            errors[side] = f"{type(error).__name__}: {error}\n" + traceback.format_exc()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds[side] = time.perf_counter() - start
    # whether each side stacked LiSSA's repetitions (None: no LiSSA, or the side failed)
    out = {"seconds": seconds, "errors": errors,
           "stacked": {side: table.metadata["diagnostics"].get("lissa_stacked") for side, table in tables.items()}}
    if len(tables) == 2:
        out |= compare(*tables.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, args = parse_with_defaults((DeviceAgreementArguments, InfluenceArguments), device_agreement_defaults, argv)
    if own.num_train < 32 or own.seq_len < 4:
        raise ValueError(f"--num_train must be at least 32 (the kNN case takes 16 candidates of them) and --seq_len "
                         f"at least 4, got {own.num_train} and {own.seq_len}.")
    output_folder(args.output_dir)
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    setup = build_setup(DeviceCostsArguments(num_train=own.num_train, seq_len=own.seq_len, quick=True), args, "cpu",
                        num_test=3)
    model, train, test = setup.model, setup.train, setup.test
    models = {device: model.to(device), "cpu" if device != "cpu" else "cpu (a fresh engine)":
              copy.deepcopy(model).cpu() if device != "cpu" else model}
    cases = {}
    for name, overrides in CASES.items():
        settings = replace(args, **{k: v for k, v in overrides.items() if k not in CALL_KEYS})
        cases[name] = run_case(models, train, test, settings, {k: v for k, v in overrides.items() if k in CALL_KEYS})
        print(f"  {name}: {cases[name].get('spearman', cases[name]['errors'] or 'pairs differ')}", flush=True)
    out = {"command": "python -m benchmarks.device_agreement " + " ".join(argv),
           "library_version": library_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "sides": list(models),
           "num_train": own.num_train, "seq_len": own.seq_len, "cases": cases}
    save_and_print(args.output_dir, "device_agreement", out, render(out))
    return out


def render(out: dict) -> str:
    here, there = out["sides"]
    rows = []
    for name, case in out["cases"].items():
        row = {"case": name, f"{here} s": case["seconds"].get(here), f"{there} s": case["seconds"].get(there),
               "stacked": " / ".join({True: "yes", False: "no", None: "-"}[case["stacked"].get(side)]
                                     for side in (here, there))}
        if case["errors"]:
            row["result"] = "; ".join(f"{side} failed: {e.splitlines()[0]}" for side, e in case["errors"].items())
        elif "spearman" not in case:
            row["result"] = agreement_line(case)
        else:
            row |= {"Spearman": case["spearman"], "largest difference": case["max_abs_difference_relative"],
                    "top 10 in common": case["top10_helpful_in_common"]}
            if case["non_finite"]:
                row["result"] = f"{case['non_finite']} pairs not finite on a side, left out"
        rows.append(row)
    columns = ["case", f"{here} s", f"{there} s", "stacked", "Spearman", "largest difference", "top 10 in common", "result"]
    errors = [f"\n### {name}, {side}\n\n```\n{error}\n```" for name, case in out["cases"].items()
              for side, error in case["errors"].items()]
    return "\n".join([f"# Influence on {out['device']} against the CPU\n", f"`{out['command']}`\n",
                      f"torch {out['torch']}; a 2-layer BERT from a config, {out['num_train']} rows of "
                      f"{out['seq_len']} tokens, 3 test rows. 'stacked': whether each side ran LiSSA's repetitions "
                      "stacked (hf_fastif.stacked; '-' where no LiSSA ran).\n", rows_table(rows, columns), *errors])


if __name__ == "__main__":
    main()
