"""Where one LiSSA step's time goes on the device, and what a step replayed from a CUDA graph would cost: the third
prepared script for a GPU machine (`benchmarks.device_costs`, `benchmarks.device_agreement`).

    python -m benchmarks.device_step [--output_dir outputs/benchmark_device_step]
    python -m benchmarks.device_step --quick        # a 2-layer model on the CPU (CI): the CUDA parts are skipped

The model and rows are `benchmarks.device_costs`' (BERT-base from a config, the paper's layers 10-11 + pooler +
classifier; ``--num_train`` rows of ``--seq_len`` tokens), the trunk cached and the last layer cut as the engine runs
them. It measures (medians of single calls, the device synchronised): collating one row with its trunk states; one
Hessian-vector product of a pre-collated batch (``batch_hvp``) for B 1 with the cut, B 1 without it, B 1 through the
whole model, and B 8 with the cut; a torch.profiler run of 10 B-1 steps with the cut (host milliseconds a step, and
on CUDA the kernels a step and the GPU's busy milliseconds a step; the operators that take the host's time). Then the
same products with the attention mask given as a 4-D additive mask (how far they are from the 2-D mask's: they
should be equal), and on CUDA one step captured with ``torch.cuda.CUDAGraph`` in fixed buffers and replayed: its
time against the eager step's, and whether the replay reproduces the eager product (for the vector captured and for
twice it, written into the same buffer), with the 4-D mask (transformers' 2-D mask path copies a CPU scalar to the
GPU during the capture, which CUDA refuses; that attempt is reported too). None of this changes how the library
runs: it measures what a captured step would give.
Writes ``device_step.json`` and ``device_step.md`` to --output_dir and prints the report.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from hf_fastif import InfluenceArguments
from hf_fastif.hvp import batch_hvp
from hf_fastif.mode import influence_mode
from hf_fastif.params import num_parameters, select_parameters
from hf_fastif.readout import cut_in_words
from hf_fastif.utils import library_version

from .arguments import output_folder, parse_with_defaults
from .costs import step_models
from .device_costs import DeviceCostsArguments, build_setup, device_costs_defaults
from .report import rows_table, save_and_print
from .timing import median_seconds, sync

PROFILED_STEPS = 10
TOP_OPERATORS = 12


@dataclass
class DeviceStepArguments:
    num_train: int = field(default=64, metadata={"help": "Random training rows (at least 8)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per row (the paper's max_seq_length)."})
    calls: int = field(default=20, metadata={"help": "Timed calls per median."})
    quick: bool = field(default=False, metadata={"help": "A 2-layer model, 16 rows of 32 tokens, on the CPU."})


def device_step_defaults(own) -> dict:
    quick = dict(num_train=16, seq_len=32, calls=3) if own.quick else {}
    return device_costs_defaults(own) | dict(output_dir="outputs/benchmark_device_step") | quick


def four_d_mask(batch: dict) -> dict:
    """``batch`` with its ``(b, s)`` 0/1 attention mask as the ``(b, 1, s, s)`` additive mask the model would build
    (0 where a key is attended, the dtype's lowest value where not): transformers then uses it as it is."""
    mask = batch["attention_mask"]
    additive = torch.zeros(mask.shape[0], 1, mask.shape[1], mask.shape[1], device=mask.device)
    additive.masked_fill_(~mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    return dict(batch) | {"attention_mask": additive}


def profile_steps(step, device: str) -> dict:
    """Host milliseconds a step, and on CUDA the kernels and the GPU's busy milliseconds a step, over
    `PROFILED_STEPS` steps; the operators with the most host time (self)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:TOP_OPERATORS]
    return {"wall_ms_per_step_profiled": 1e3 * wall / PROFILED_STEPS,
            "kernels_per_step": sum(e.count for e in on_gpu) / PROFILED_STEPS if device == "cuda" else None,
            "gpu_busy_ms_per_step": (sum(e.self_device_time_total for e in on_gpu) / 1e3 / PROFILED_STEPS
                                     if device == "cuda" else None),
            "top_host_operators": [{"operator": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / PROFILED_STEPS,
                                    "calls_per_step": e.count / PROFILED_STEPS} for e in top]}


def captured_step(fm, params, batch: dict, vector: torch.Tensor, calls: int) -> dict:
    """One ``batch_hvp`` captured in a CUDA graph (the batch's tensors and a copy of ``vector`` as its fixed
    buffers) and replayed: milliseconds against the eager step, and the replay's largest difference from the eager
    product (relative), for the vector captured and for twice it. ``{"error": ...}`` where the capture fails."""
    static = vector.clone()
    try:
        eager = batch_hvp(fm, params, batch, static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture wants
            for _ in range(3):
                batch_hvp(fm, params, batch, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = batch_hvp(fm, params, batch, static)
        graph.replay()
        sync()
        scale = float(eager.abs().max())
        same = float((out - eager).abs().max()) / scale
        static.copy_(2 * vector)
        graph.replay()
        sync()
        doubled = float((out - 2 * eager).abs().max()) / (2 * scale)
        replay = median_seconds(lambda: (graph.replay(), sync()), calls)
        static.copy_(vector)
        return {"replay_ms": 1e3 * replay, "eager_ms": 1e3 * median_seconds(
            lambda: batch_hvp(fm, params, batch, static), calls), "difference": same, "difference_2v": doubled}
    except RuntimeError as error:
        sync()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, args = parse_with_defaults((DeviceStepArguments, InfluenceArguments), device_step_defaults, argv)
    if own.num_train < 8 or own.seq_len < 2 or own.calls < 1:
        raise ValueError(f"--num_train must be at least 8 (the B 8 step), --seq_len at least 2 and --calls at least 1; "
                         f"got {own.num_train}, {own.seq_len} and {own.calls}.")
    output_folder(args.output_dir)
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    setup = build_setup(DeviceCostsArguments(num_train=own.num_train, seq_len=own.seq_len, quick=own.quick), args,
                        device)
    model, train = setup.model, setup.train
    params = select_parameters(model, args.influence_params)
    names = list(params)
    rng = np.random.default_rng(args.seed)
    out: dict = {"command": "python -m benchmarks.device_step " + " ".join(argv), "library_version": library_version(),
                 "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "model": setup.description["model"], "num_influence_parameters": num_parameters(params),
                 "num_train": own.num_train, "seq_len": own.seq_len}
    with influence_mode(model, names):
        steps = step_models(setup, params, args)
        whole, rows, top, cut, cached = steps.whole, steps.rows, steps.top, steps.cut, steps.cached
        out |= {"trunk_split": steps.split, "readout": None if cut.readout is None else cut.readout.name,
                "readout_why": steps.readout_why or None}
        vector = torch.randn(num_parameters(params), device=device) * 1e-2
        one = [int(rng.integers(len(train)))]
        batches = {"B 1, cut": (cut, cached.batch(one)), "B 1, no cut": (top, cached.batch(one)),
                   "B 1, whole model": (whole, rows.batch(one)), "B 8, cut": (cut, cached.batch(list(range(8))))}
        ms = {"collate a row with its trunk states": median_seconds(
            lambda: cached.batch([int(rng.integers(len(train)))]), own.calls)}
        ms |= {f"hvp {name}": median_seconds(lambda f=f, b=b: batch_hvp(f, params, b, vector), own.calls)
               for name, (f, b) in batches.items()}
        out["eager_ms"] = {k: 1e3 * v for k, v in ms.items()}
        out["profile"] = profile_steps(lambda: batch_hvp(cut, params, batches["B 1, cut"][1], vector), device)
        out["four_d_mask_difference"] = {}
        for name, (f, b) in batches.items():
            two = batch_hvp(f, params, b, vector)
            four = batch_hvp(f, params, four_d_mask(b), vector)
            out["four_d_mask_difference"][name] = float((two - four).abs().max() / two.abs().max())
        if device == "cuda":
            out["captured"] = {f"{name}, 4-D mask": captured_step(f, params, four_d_mask(b), vector, own.calls)
                               for name, (f, b) in batches.items() if name != "B 1, no cut"}
            out["captured"]["B 1, cut, 2-D mask"] = captured_step(cut, params, batches["B 1, cut"][1], vector,
                                                                  own.calls)
        else:
            out["captured"] = None
    save_and_print(args.output_dir, "device_step", out, render(out))
    return out


def render(out: dict) -> str:
    prof = out["profile"]
    lines = [f"# One LiSSA step on {out['device']}: {out['model']}\n", f"`{out['command']}`\n",
             f"torch {out['torch']}; {out['num_influence_parameters']:,} influence parameters; {out['num_train']} rows "
             f"of {out['seq_len']} tokens; trunk split {out['trunk_split']}, last layer cut "
             f"{cut_in_words(out['readout'])}.\n",
             "## Eager (median ms)\n",
             rows_table([{"what": k, "ms": v} for k, v in out["eager_ms"].items()], ["what", "ms"]),
             f"\n## Profiled: {PROFILED_STEPS} steps of B 1 with the cut\n",
             f"{prof['wall_ms_per_step_profiled']:.2f} ms a step under the profiler"
             + (f"; CUDA kernels a step: {prof['kernels_per_step']:.0f}; GPU busy a step: "
                f"{prof['gpu_busy_ms_per_step']:.2f} ms.\n" if prof["kernels_per_step"] is not None else ".\n"),
             rows_table(prof["top_host_operators"], ["operator", "self_ms_per_step", "calls_per_step"]),
             "\n## The 4-D additive mask against the 2-D mask (largest difference of the products, relative)\n",
             rows_table([{"step": k, "difference": v} for k, v in out["four_d_mask_difference"].items()],
                        ["step", "difference"])]
    if out["captured"] is None:
        lines.append("\nCUDA graph capture: needs a CUDA device (not measured here).\n")
    else:
        lines += ["\n## One step captured in a CUDA graph and replayed\n",
                  rows_table([{"step": k} | v for k, v in out["captured"].items()],
                             ["step", "replay_ms", "eager_ms", "difference", "difference_2v", "error"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
