"""hf_fastif against the 2021 reference code (salesforce/fast-influence-functions), side by side in one run.

    python -m benchmarks.reference --reference_path /path/to/fast-influence-functions [--profile]

``--reference_path`` is the folder that holds the reference's ``influence_utils/``; its
``influence_utils/nn_influence_utils.py`` is imported from there as it is (never copied or edited). Without it the
script says how to get the code and exits with status 2.

Both sides get the same model, rows, parameters and LiSSA settings, one test point, and score every training row
(no kNN): the 2021 ``compute_influences`` (its per-step HVP through the whole model, its per-row gradient loop) and
``hf_fastif.compute_influences`` on a first call (a fresh engine: trunk states, test gradient, LiSSA with the
convergence check, batched JVP scoring). Settings (the issue's): J = 100, B = 1, damp = 5e-3, scale = 1e4, the
reference's L2 term wd = 0.005 (not on biases / LayerNorm weights), T = 1 and 4, 200 training rows, 1 torch thread.
Models: a random-init 2-layer BERT (hidden 128, every parameter) and the pretrained all-MiniLM-L6-v2 with a new
2-label head (the paper's kind of selection: last layer, pooler, classifier). ``--stored_padding max_length`` stores
MiniLM's rows padded to ``--max_length``, as the 2021 code's GLUE features are (``pad_to_max_length``): both sides get
the same rows; hf_fastif collates them without their trailing padding where its probe allows
(``influence_skip_trailing_padding``, on by default).

How the two sides are kept the same (read from the reference code):
- loss: the model's own mean cross-entropy of the batch plus ``wd·Σθ²`` over the selected parameters that are not
  biases or LayerNorm weights, in the test gradient, the HVPs and every scored row (the reference adds the term to
  every loss; its ``params_filter`` / ``weight_decay_ignores`` are the unselected parameters, which are frozen, as
  its experiments freeze them);
- LiSSA: ``h_j = v + (1 - damp)·h_{j-1} - HVP(h_{j-1})/scale``, ``s_test = h_J/scale`` averaged over T
  repetitions; each step's B rows are the next B of a fresh random permutation of the training rows (its
  ``RandomSampler``; ours: successive seeded permutations). Its loop runs ``num_samples + 2`` steps, so it is given
  ``s_test_num_samples = J - 2``: both sides take exactly J steps;
- eval mode, eager attention, float32, rows padded per batch by the same collator (B = 1: no padding).
Mismatches that remain are listed in `MISMATCHES` and in the report.

Each configuration runs ``--runs`` times per side, alternating which side goes first, with seed ``seed + run``
(the reference's sampler draws from torch's global generator, seeded before its call). Reported: median and range
of the wall seconds, the ratio of the medians, the Spearman of our influence values with the reference's (median
over run pairs), and as the noise floor the Spearman between two seeds of each side. hf_fastif's phases come from
the table's ``metadata["diagnostics"]``. Also: the scoring throughput (rows per second of JVP scoring, from the same
calls, vs a plain no-grad forward of the whole model at the same batch size), the Spearman of the reference's
values with the plain gradient dot product (how much H⁻¹ changes the ranking at these settings) and, with
``--profile``, where each side's time goes (hf_fastif: the convergence check's two Lanczos parts vs the recursion
vs scoring, ms per LiSSA step, one HVP at 1 / 4 / 64 rows with and without the L2 term; both: torch.profiler's top
operators of one LiSSA step). Writes benchmark_reference.json, benchmark_reference.md and the influence values
(influence_values.npz) to ``--output_dir``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import sys
import time
from argparse import Namespace
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from datasets import Dataset
from datasets.utils import disable_progress_bars
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    default_data_collator,
)

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif import engine as engine_module
from hf_fastif.data import NLI2_LABELS, generate_nli, tokenize_nli
from hf_fastif.engine import InfluenceEngine
from hf_fastif.engine.s_test import CHECK_BATCHES, CHECK_ITERATIONS, CHECK_ROWS
from hf_fastif.hvp import batch_hvp
from hf_fastif.loss import FunctionalModel
from hf_fastif.minilm_default import freeze_minilm, minilm_influence_params
from hf_fastif.pretrained import load_minilm_for_sequence_classification, load_minilm_tokenizer
from hf_fastif.solvers.lanczos import extreme_eigenvalues
from hf_fastif.utils import library_version, to_json, write_atomic

from .arguments import output_folder, parse_with_defaults
from .report import rows_table, short_on_purpose
from .timing import median_seconds, timed

REFERENCE_REPO = "https://github.com/salesforce/fast-influence-functions"
REFERENCE_FILE = Path("influence_utils") / "nn_influence_utils.py"
HOW_TO = (
    "benchmarks.reference compares hf_fastif with the 2021 reference code, which is not part of this project.\n"
    "Get it (a few MB) and point --reference_path at the folder that holds influence_utils/:\n\n"
    f"    git clone --depth 1 {REFERENCE_REPO} /tmp/fast-influence-functions\n"
    "    python -m benchmarks.reference --reference_path /tmp/fast-influence-functions\n\n"
    "Its code is imported from there as it is; nothing is copied into this repository."
)
MODELS = ("tiny_bert", "minilm")
REFERENCE_WEIGHT_DECAY = 0.005  # experiments/constants.py WEIGHT_DECAY
REFERENCE_IGNORES = ["bias", "LayerNorm.weight"]  # its weight_decay_ignores (substrings of parameter names)
PHASES = ("trunk_s", "test_gradients_s", "s_test_s", "candidates_s", "scoring_s")
MISMATCHES = [
    "The reference computes the test gradient once per repetition (T times, with create_graph=True); hf_fastif once.",
    f"hf_fastif runs its LiSSA convergence check (Lanczos on {CHECK_BATCHES} B-row batch Hessians and on a "
    f"{CHECK_ROWS}-row mean Hessian) before the recursion; the reference has none. It is part of hf_fastif's time "
    "(a first call).",
    "Random streams differ: the reference's RandomSampler draws from torch's global generator, hf_fastif from "
    "numpy seeded by (influence_seed, repetition); the same distribution (rows without replacement within a pass), "
    "not the same rows, so values agree up to LiSSA's noise (see the noise floor).",
    "hf_fastif scores in batches of influence_scoring_batch_size with per-batch padding (the attention mask hides "
    "it); the reference scores row by row without padding. Same values up to float32 rounding.",
    "The reference logs ‖h‖ of the first parameter tensor through tqdm every step (one .item() per step).",
]


@dataclass
class ReferenceArguments:
    """The comparison's own settings; LiSSA and influence settings are `InfluenceArguments` flags."""

    reference_path: str | None = field(
        default=None, metadata={"help": "Folder holding the 2021 code's influence_utils/ (a clone of "
                                        f"{REFERENCE_REPO}). Without it: how to get it, exit status 2."})
    models: list[str] = field(default_factory=lambda: list(MODELS),
                              metadata={"help": f"Models to compare, of {', '.join(MODELS)}."})
    repetitions_sweep: list[int] = field(default_factory=lambda: [1, 4],
                                         metadata={"help": "T values (LiSSA repetitions) compared."})
    runs: int = field(default=2, metadata={"help": "Calls per side and configuration (alternating which goes "
                                                   "first; run r uses seed + r)."})
    num_train: int = field(default=200, metadata={"help": "Training rows (every one is scored)."})
    num_threads: int = field(default=1, metadata={"help": "torch threads, for both sides."})
    tiny_seq_len: int = field(default=32, metadata={"help": "Tokens per row of the tiny BERT's random rows."})
    max_length: int = field(default=128, metadata={"help": "MiniLM: pairs truncated to this many tokens."})
    stored_padding: str = field(
        default="longest", metadata={"help": "MiniLM's rows as stored: 'longest' (as tokenised; the collator pads "
                                             "each batch to its longest row) or 'max_length' (every row padded to "
                                             "--max_length, as the 2021 code's GLUE features and transformers' "
                                             "run_glue store them)."})
    forward_calls: int = field(default=5, metadata={"help": "Timed calls of the plain forward (median)."})
    profile: bool = field(default=False, metadata={"help": "Also profile one call of each side per model (T = 1): "
                                                           "phases, the convergence check, one LiSSA step."})


def reference_defaults(own: Namespace) -> dict:
    """The issue's settings: LiSSA J = 100, B = 1, damp = 5e-3, scale = 1e4, the reference's L2 term, full scan."""
    return dict(output_dir="outputs/benchmark_reference", report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
                influence_recursion_depth=100, influence_batch_size=1, influence_damping=5e-3, influence_scale=1e4,
                influence_knn_k=None, influence_weight_decay=REFERENCE_WEIGHT_DECAY,
                influence_weight_decay_in_gradients=True, influence_seed=0)


def load_reference(path: str | None):
    """The reference's ``nn_influence_utils`` module, imported from its file (its package ``__init__`` is not
    needed). Nothing had to be shimmed with transformers 5.24 (its only transformers import,
    ``PreTrainedTokenizer``, still exists); an import that fails says what is missing."""
    file = Path(path).expanduser() / REFERENCE_FILE if path else None
    if file is None or not file.is_file():
        where = f"{path!r} holds no {REFERENCE_FILE}.\n\n" if path else "--reference_path is not set.\n\n"
        print(where + HOW_TO, file=sys.stderr)
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location("fif_reference_nn_influence_utils", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise ImportError(f"The reference code at {file} needs {err.name!r}, which this environment lacks; install "
                          "it, or add a stub module for it in benchmarks/reference.py if the code never uses it.") from err
    if not callable(getattr(module, "compute_influences", None)):
        raise ValueError(f"{file} has no compute_influences(); is --reference_path a clone of {REFERENCE_REPO}?")
    return module


def validate(own: ReferenceArguments, args: InfluenceArguments) -> None:
    """Refuse settings the comparison cannot run, before any work."""
    unknown = [m for m in own.models if m not in MODELS]
    if unknown or not own.models:
        raise ValueError(f"--models {own.models}: use some of {', '.join(MODELS)}.")
    if args.influence_solver != "lissa" or args.influence_knn_k is not None:
        raise ValueError("The reference runs LiSSA over every training row: keep --influence_solver lissa and "
                         "--influence_knn_k None.")
    if min(own.repetitions_sweep, default=0) < 1 or own.runs < 1 or own.num_train < 2 or own.num_threads < 1:
        raise ValueError("--repetitions_sweep, --runs, --num_threads must be positive and --num_train >= 2.")
    depth, bsz = args.influence_recursion_depth, args.influence_batch_size
    if depth < 2:
        raise ValueError("--influence_recursion_depth must be >= 2: the reference runs num_samples + 2 steps, so it "
                         "is given J - 2.")
    if depth > -(-own.num_train // bsz):
        raise ValueError(f"J = {depth} steps of B = {bsz} rows exceed one pass over the {own.num_train} training rows; "
                         "the reference stops at the end of its data loader and refuses the run. Raise --num_train "
                         f"to at least {depth * bsz} or lower J.")


@dataclass
class Setup:
    """One model of the comparison: the model (selection frozen as the reference expects), its rows, collator."""

    name: str
    description: str
    model: torch.nn.Module
    train: Dataset
    test: Dataset
    collator: object
    patterns: list[str] | None


def tiny_bert(own: ReferenceArguments, seed: int) -> Setup:
    """A random-init 2-layer BERT (hidden 128, vocab 1000, 3 labels: 607,491 parameters, all selected) on random
    token rows of ``tiny_seq_len`` tokens."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, num_labels=3, attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    rng = np.random.default_rng(seed)
    n = own.num_train + 1
    ids = rng.integers(5, 1000, size=(n, own.tiny_seq_len))
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": rng.integers(0, 3, size=n).tolist()})
    return Setup("tiny_bert", "random-init BERT (2 layers, hidden 128), every parameter", model,
                 rows.select(range(own.num_train)), rows.select([own.num_train]), default_data_collator, None)


def minilm(own: ReferenceArguments, seed: int) -> Setup:
    """Pretrained all-MiniLM-L6-v2 with a new 2-label head, the last layer + pooler + classifier selected (and the
    rest frozen, as the paper fine-tunes), on generated NLI rows; the test point is a HANS-style row."""
    tokenizer = load_minilm_tokenizer()
    torch.manual_seed(seed)
    model = load_minilm_for_sequence_classification(len(NLI2_LABELS), id2label=dict(enumerate(NLI2_LABELS))).eval()
    freeze_minilm(model, trainable_layers=1)
    raw = generate_nli(seed=seed, n_train=own.num_train, n_hans_per_subcase=1, n_pool_per_subcase=0)
    columns = ["input_ids", "attention_mask", "token_type_ids", "labels"]
    train = tokenize_nli(raw["train"], tokenizer, max_length=own.max_length).select_columns(columns)
    test = tokenize_nli(raw["hans"].select([0]), tokenizer, max_length=own.max_length).select_columns(columns)
    description = "pretrained all-MiniLM-L6-v2, last layer + pooler + classifier"
    if own.stored_padding == "max_length":
        def padded(rows):
            return dict(tokenizer.pad({k: rows[k] for k in columns if k != "labels"}, padding="max_length",
                                      max_length=own.max_length))
        train, test = (rows.map(padded, batched=True) for rows in (train, test))
        description += f", rows stored padded to {own.max_length} positions"
    elif own.stored_padding != "longest":
        raise ValueError(f"--stored_padding is 'longest' or 'max_length', not {own.stored_padding!r}.")
    return Setup("minilm", description, model, train, test,
                 DataCollatorWithPadding(tokenizer), minilm_influence_params(1))


def num_selected(setup: Setup) -> int:
    return sum(p.numel() for p in setup.model.parameters() if p.requires_grad)


def run_reference(reference, setup: Setup, args: InfluenceArguments, repetitions: int, seed: int,
                  num_samples: int | None = None, rows: int | None = None) -> np.ndarray:
    """The 2021 ``compute_influences`` as its experiments call it (frozen parameters filtered, L2 term, random
    B-row loader for s_test, a sequential 1-row loader for scoring): influence of every training row, ``(N,)``."""
    train = setup.train if rows is None else setup.train.select(range(rows))
    model = setup.model.eval()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    torch.manual_seed(seed)  # its RandomSampler draws from torch's global generator
    batches = DataLoader(train, batch_size=args.influence_batch_size, sampler=RandomSampler(train),
                         collate_fn=setup.collator)
    instances = DataLoader(train, batch_size=1, sampler=SequentialSampler(train), collate_fn=setup.collator)
    test_inputs = setup.collator([setup.test[0]])
    depth = args.influence_recursion_depth if num_samples is None else num_samples + 2
    influences, _, _ = reference.compute_influences(
        n_gpu=1, device=torch.device("cpu"), model=model, test_inputs=test_inputs,
        batch_train_data_loader=batches, instance_train_data_loader=instances, params_filter=frozen,
        weight_decay=args.influence_weight_decay, weight_decay_ignores=REFERENCE_IGNORES + frozen,
        s_test_damp=args.influence_damping, s_test_scale=args.influence_scale, s_test_num_samples=depth - 2,
        s_test_iterations=repetitions)
    return np.array([influences[i] for i in range(len(train))])


def run_ours(setup: Setup, args: InfluenceArguments, repetitions: int, seed: int, depth: int | None = None,
             rows: int | None = None, engine_class=None) -> tuple[np.ndarray, dict]:
    """One first call of ``hf_fastif.compute_influences`` (a fresh engine): ``(influence (N,), diagnostics)``."""
    train = setup.train if rows is None else setup.train.select(range(rows))
    run_args = replace(args, influence_repetitions=repetitions, influence_seed=seed, influence_params=setup.patterns,
                       influence_recursion_depth=depth or args.influence_recursion_depth)
    if engine_class is None:
        table = compute_influences(setup.model, train, setup.test, run_args, data_collator=setup.collator)
    else:
        with engine_class(setup.model, run_args, data_collator=setup.collator) as engine:
            table = engine.compute_influences(train, setup.test)
    frame = table.to_pandas().sort_values("train_id")
    if frame["train_id"].tolist() != list(range(len(train))):
        raise RuntimeError("hf_fastif's full scan did not score every training row once.")
    return frame["influence"].to_numpy(), dict(table.metadata["diagnostics"])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def gradient_dot_product(setup: Setup, args: InfluenceArguments) -> np.ndarray:
    """``-∇L(z)·∇L_test`` up to a positive factor (s_test without H⁻¹): one LiSSA step with a scale so large that
    the Hessian term vanishes. How much the Hessian changes the ranking at these settings."""
    lam = args.influence_damping * args.influence_scale
    flat = replace(args, influence_scale=1e9, influence_damping=lam / 1e9, influence_check_convergence=False)
    return run_ours(setup, flat, 1, args.influence_seed, depth=1)[0]


def compare(reference, setup: Setup, own: ReferenceArguments, args: InfluenceArguments, repetitions: int,
            no_hessian: np.ndarray) -> dict:
    """``own.runs`` calls per side, alternating which side goes first; seconds, values and our diagnostics.
    ``no_hessian``: the gradient dot product (`gradient_dot_product`), to compare the rankings with."""
    runs = {"reference": [], "hf_fastif": []}
    for r in range(own.runs):
        seed = args.influence_seed + r
        order = ("reference", "hf_fastif") if r % 2 == 0 else ("hf_fastif", "reference")
        for side in order:
            if side == "reference":
                values, seconds = timed(lambda seed=seed: run_reference(reference, setup, args, repetitions, seed),
                                         collected=True)
                runs[side].append({"seed": seed, "seconds": seconds, "values": values})
            else:
                (values, diagnostics), seconds = timed(lambda seed=seed: run_ours(setup, args, repetitions, seed),
                                                        collected=True)
                runs[side].append({"seed": seed, "seconds": seconds, "values": values, "diagnostics": diagnostics})
            print(f"  {setup.name} T={repetitions} run {r} {side}: {seconds:.2f} s", flush=True)
    ref_s = [x["seconds"] for x in runs["reference"]]
    our_s = [x["seconds"] for x in runs["hf_fastif"]]
    cross = [spearman(o["values"], f["values"]) for o in runs["hf_fastif"] for f in runs["reference"]]

    def floor(side: str) -> float | None:
        values = [x["values"] for x in runs[side]]
        pairs = [spearman(values[i], values[j]) for i in range(len(values)) for j in range(i + 1, len(values))]
        return float(np.median(pairs)) if pairs else None

    phases = {}
    for key in sorted({k for x in runs["hf_fastif"] for k, v in x["diagnostics"].items()
                       if k.endswith("_s") and isinstance(v, (int, float))}):
        phases[key] = float(np.median([x["diagnostics"].get(key, float("nan")) for x in runs["hf_fastif"]]))
    return {
        "model": setup.name, "parameters": num_selected(setup), "T": repetitions,
        "reference_s": float(np.median(ref_s)), "reference_range_s": [min(ref_s), max(ref_s)],
        "hf_fastif_s": float(np.median(our_s)), "hf_fastif_range_s": [min(our_s), max(our_s)],
        "ratio": float(np.median(ref_s) / np.median(our_s)), "ratio_fastest": float(min(ref_s) / min(our_s)),
        "spearman": float(np.median(cross)), "spearman_min": float(min(cross)),
        "noise_floor_hf_fastif": floor("hf_fastif"), "noise_floor_reference": floor("reference"),
        "spearman_no_hessian": float(np.median([spearman(x["values"], no_hessian) for x in runs["reference"]])),
        "phases": phases,
        "runs": {side: [{k: v for k, v in x.items() if k != "values"} for x in items] for side, items in runs.items()},
        "values": {side: [x["values"] for x in items] for side, items in runs.items()},
    }


def forward_throughput(setup: Setup, batch_size: int, calls: int) -> float:
    """Rows per second of a plain no-grad forward of the whole model over the training rows (batches of
    ``batch_size`` collated inside the timing, as the engine's scoring collates its own: they were collated before
    it, a review), taken in order of length as the engine's scoring takes them (in row order MiniLM's forward padded
    to 4,496 tokens against 3,672 and read 160 against 203 rows/s, flattering JVP / forward)."""
    model, n = setup.model.eval(), len(setup.train)
    order = np.argsort([len(row["input_ids"]) for row in setup.train], kind="stable")
    rows = setup.train.to_list()

    def forward():
        with torch.no_grad():
            for s in range(0, n, batch_size):
                batch = setup.collator([rows[int(i)] for i in order[s:s + batch_size]])
                model(**{k: v for k, v in batch.items() if k != "labels"})

    return n / median_seconds(forward, calls)


class _ProfiledEngine(InfluenceEngine):
    """The engine with its LiSSA convergence check timed and, right after it, ``STEP_CALLS`` single LiSSA steps
    profiled on the same batches the recursion uses (trunk states included). Profile only: it follows the engine's
    private ``_check_lissa(call, v)`` and ``Call`` fields (``fm``, ``params``, ``train``)."""

    STEP_CALLS = 10
    found: dict = {}

    def _check_lissa(self, call, v):
        start = time.perf_counter()
        out = super()._check_lissa(call, v)
        found = {"check_s": time.perf_counter() - start}
        start = time.perf_counter()
        rows = iter(np.random.default_rng(0).integers(0, len(call.train), size=(2 * self.STEP_CALLS + 2,
                                                                                  self.args.influence_batch_size)))

        def step():  # as the recursion runs it: the L2 term's diagonal is applied in LiSSA's update instead
            return batch_hvp(call.fm, call.params, call.train.batch(next(rows)), v[0], reduction="mean", l2_term=False)

        found["step_ms"], found["step_ops"] = profile_calls(step, self.STEP_CALLS)
        with FlopCounterMode(display=False) as counter:  # matmul-like operators only: the step's arithmetic floor
            step()
        found["step_gflop"] = counter.get_total_flops() / 1e9
        # what a step's cost scales with: the L2 term's share, more rows per step, a full-data HVP batch
        bare = FunctionalModel(call.fm.model, call.fm.names, weight_decay=0.0, split=call.fm.split,
                               readout=call.fm.readout)
        for b in (1, 4, min(CHECK_ROWS, len(call.train))):
            batch = call.train.batch(range(b))  # collated once: the HVP alone
            found[f"hvp_ms_{b}_rows"] = 1e3 * median_seconds(
                lambda batch=batch: batch_hvp(call.fm, call.params, batch, v[0], reduction="mean"), 5 if b < 8 else 3)
            if b == 1:
                found["hvp_ms_without_l2"] = 1e3 * median_seconds(
                    lambda batch=batch: batch_hvp(bare, call.params, batch, v[0], reduction="mean"), 5)
        found["hook_s"] = time.perf_counter() - start
        type(self).found = found
        return out


def matmul_gflops(size: int = 1024) -> float:
    """This machine's float32 matmul rate at the current torch thread count (a square ``size`` product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, 5) / 1e9


def profile_calls(fn, calls: int, top: int = 12) -> tuple[float, list[dict]]:
    """Median ms of ``fn()`` over ``calls`` calls (after one warm-up), and torch.profiler's top operators by self
    CPU time over ``calls`` more calls (self ms per call). ``fn`` is called ``2·calls + 1`` times."""
    milliseconds = 1e3 * median_seconds(fn, calls)  # timed outside the profiler, which inflates small operators
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    averages = [e for e in prof.key_averages() if not e.key.startswith("enumerate(")]
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    ops = [{"op": e.key, "calls per step": e.count / calls, "self ms per step": e.self_cpu_time_total / 1e3 / calls,
            "share": e.self_cpu_time_total / total}
           for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]
    return milliseconds, ops


def profiled_phases(diagnostics: dict, hook_s: float) -> dict:
    """The timed phases (``*_s``) of the profiled call's diagnostics, with the profiling hook's ``hook_s`` (run
    inside s_test, right after the convergence check) taken out of ``s_test_s``, as the profile's ``total_s`` takes
    it out: the phases describe the call, not the profiling."""
    phases = {k: v for k, v in diagnostics.items() if k.endswith("_s")}
    phases["s_test_s"] -= hook_s
    return phases


def profile(reference, setup: Setup, own: ReferenceArguments, args: InfluenceArguments) -> dict:
    """Where each side's time goes on one first call with T = 1. hf_fastif: its phases with the convergence check
    split from the recursion, ms per LiSSA step (recursion / J, and one step timed alone); the reference: its
    s_test alone (``compute_s_test``) and the rest (test gradient and the per-row scoring loop). For one LiSSA step
    of each side: torch.profiler's top operators (under the profiler, so the ms are inflated alike)."""
    depth, n = args.influence_recursion_depth, len(setup.train)
    _ProfiledEngine.found = {}
    lanczos_s: list[float] = []
    original = engine_module.s_test.extreme_eigenvalues

    def timed_lanczos(*a, **k):  # the check's Lanczos runs: CHECK_BATCHES on B-row batches, then the mean Hessian
        result, seconds = timed(lambda: original(*a, **k))
        lanczos_s.append(seconds)
        return result

    with mock.patch.object(engine_module.s_test, "extreme_eigenvalues", timed_lanczos):
        (_, diagnostics), total = timed(lambda: run_ours(setup, args, 1, args.influence_seed,
                                                         engine_class=_ProfiledEngine), collected=True)
    found = _ProfiledEngine.found
    recursion = diagnostics["s_test_s"] - found["check_s"] - found["hook_s"]
    rows_check = min(CHECK_ROWS, n)
    ours = {"side": "hf_fastif", "total_s": total - found["hook_s"], "convergence_check_s": found["check_s"],
            "check: batch Hessians_s": sum(lanczos_s[:-1]), "check: mean Hessian_s": lanczos_s[-1],
            "s_test_recursion_s": recursion, "step_ms (recursion / J)": 1e3 * recursion / depth,
            "step_ms (alone)": found["step_ms"], "scoring_s": diagnostics["scoring_s"],
            "scoring_row_ms": 1e3 * diagnostics["scoring_s"] / n,
            "other_s": total - diagnostics["s_test_s"] - diagnostics["scoring_s"]}
    diagonal = torch.linspace(1.0, 2.0, num_selected(setup))  # distinct eigenvalues: Lanczos runs every step
    lanczos_alone = median_seconds(
        lambda: extreme_eigenvalues(lambda x: diagonal * x, len(diagonal), iterations=CHECK_ITERATIONS,
                                    reorthogonalise=False), 3)  # (as the check's batch runs go)
    hvp = {"HVP ms, 1 row": found["hvp_ms_1_rows"], "HVP ms, 1 row, no L2 term": found["hvp_ms_without_l2"],
           "HVP ms, 4 rows": found["hvp_ms_4_rows"], f"HVP ms, {rows_check} rows": found[f"hvp_ms_{rows_check}_rows"],
           "check, modelled s": (CHECK_BATCHES * CHECK_ITERATIONS * found["hvp_ms_1_rows"]
                                 + (CHECK_ITERATIONS + 2) * found[f"hvp_ms_{rows_check}_rows"]) / 1e3,
           # one batch run's Lanczos vector work (start vector, three-term recurrence on p-sized vectors)
           f"Lanczos vector work ms, {CHECK_ITERATIONS} steps": 1e3 * lanczos_alone,
           # how far a step is from the arithmetic it needs: its matmul FLOPs at this machine's matmul rate
           "step GFLOP (matmuls)": found["step_gflop"],
           "step GFLOP/s": found["step_gflop"] / (found["step_ms"] / 1e3),
           "matmul GFLOP/s (1024², same threads)": matmul_gflops()}

    model = setup.model.eval()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    decay = dict(params_filter=frozen, weight_decay=args.influence_weight_decay,
                 weight_decay_ignores=REFERENCE_IGNORES + frozen)
    _, ref_total = timed(lambda: run_reference(reference, setup, args, 1, args.influence_seed), collected=True)
    torch.manual_seed(args.influence_seed)
    loader = DataLoader(setup.train, batch_size=args.influence_batch_size, sampler=RandomSampler(setup.train),
                        collate_fn=setup.collator)
    _, ref_s_test = timed(lambda: reference.compute_s_test(
        n_gpu=1, device=torch.device("cpu"), model=model, test_inputs=setup.collator([setup.test[0]]),
        train_data_loaders=[loader], damp=args.influence_damping, scale=args.influence_scale,
        num_samples=depth - 2, **decay))
    vectors = [torch.randn_like(p) * 1e-3 for p in model.parameters() if p.requires_grad]
    rows = iter(np.random.default_rng(0).integers(0, n, size=(2 * _ProfiledEngine.STEP_CALLS + 1,
                                                                 args.influence_batch_size)))

    def ref_step():
        inputs = setup.collator([setup.train[int(i)] for i in next(rows)])
        return reference.compute_hessian_vector_products(device=torch.device("cpu"), n_gpu=1, model=model,
                                                         inputs=inputs, vectors=vectors, **decay)

    ref_step_ms, ref_ops = profile_calls(ref_step, _ProfiledEngine.STEP_CALLS)
    theirs = {"side": "2021 reference", "total_s": ref_total, "s_test_recursion_s": ref_s_test,
              "step_ms (recursion / J)": 1e3 * ref_s_test / depth, "step_ms (alone)": ref_step_ms,
              "scoring_s": ref_total - ref_s_test, "scoring_row_ms": 1e3 * (ref_total - ref_s_test) / n}
    return {"sides": [ours, theirs], "hvp": hvp,
            "hf_fastif_phases": profiled_phases(diagnostics, found["hook_s"]),
            "hf_fastif_step_ops": found["step_ops"], "reference_step_ops": ref_ops,
            "note": "2021 scoring_s = total - s_test: its test gradient and the per-row gradient loop."}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, args = parse_with_defaults((ReferenceArguments, InfluenceArguments), reference_defaults, argv)
    reference = load_reference(own.reference_path)
    validate(own, args)
    disable_progress_bars()
    torch.set_num_threads(own.num_threads)
    out_dir = output_folder(args.output_dir)
    started, load_before = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    rows, throughput, profiles, described = [], [], {}, {}
    for name in own.models:
        setup = (tiny_bert if name == "tiny_bert" else minilm)(own, args.seed)
        described[name] = {"description": setup.description, "parameters": num_selected(setup),
                           "num_train": len(setup.train)}
        # warm-up, not timed: one-time process costs (lazy imports, first kernel dispatch) fall on neither side
        run_reference(reference, setup, args, 1, args.influence_seed, num_samples=0, rows=4)
        with short_on_purpose():
            run_ours(setup, args, 1, args.influence_seed, depth=2, rows=4)
            no_hessian = gradient_dot_product(setup, args)
        for repetitions in own.repetitions_sweep:
            rows.append(compare(reference, setup, own, args, repetitions, no_hessian))
        scoring_s = [x["diagnostics"]["scoring_s"] for r in rows if r["model"] == name
                     for x in r["runs"]["hf_fastif"]]
        jvp = len(setup.train) / float(np.median(scoring_s))
        forward = forward_throughput(setup, args.influence_scoring_batch_size, own.forward_calls)
        throughput.append({"model": name, "parameters": num_selected(setup), "batch_size":
                           args.influence_scoring_batch_size, "jvp_rows_per_s": jvp, "forward_rows_per_s": forward,
                           "jvp_over_forward": jvp / forward,
                           "trunk": rows[-1]["runs"]["hf_fastif"][0]["diagnostics"].get("trunk")})
        if own.profile:
            profiles[name] = profile(reference, setup, own, args)

    results = {
        "command": shlex.join(["python", "-m", "benchmarks.reference", *argv]),
        "arguments": asdict(own),
        "influence": {k: v for k, v in args.influence_settings().items()},
        "environment": {"hf_fastif": library_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before,
                        "load_after": [round(x, 2) for x in os.getloadavg()], "reference": str(own.reference_path)},
        "models": described,
        "rows": [{k: v for k, v in r.items() if k != "values"} for r in rows],
        "throughput": throughput,
        "profiles": profiles,
        "mismatches": MISMATCHES,
        "total_s": time.perf_counter() - started,
    }
    report = render(results)
    print(report)
    write_atomic(out_dir / "benchmark_reference.md", report)
    write_atomic(out_dir / "benchmark_reference.json", to_json(results, indent=2))
    np.savez(out_dir / "influence_values.npz", **{f"{r['model']}_T{r['T']}_{side}_{i}": v
                                                 for r in rows for side, vs in r["values"].items()
                                                 for i, v in enumerate(vs)})
    print(f"\nwrote {out_dir / 'benchmark_reference.md'}, {out_dir / 'benchmark_reference.json'}")
    return results


def _five(value: float | None) -> str:
    return "" if value is None else f"{value:.5f}"


def _range(pair: list[float]) -> str:
    return f"{pair[0]:.2f}-{pair[1]:.2f}"


def render(results: dict) -> str:
    """The markdown report: the side-by-side table, hf_fastif's phases, throughput, profiles, mismatches."""
    env, rows = results["environment"], results["rows"]
    lines = ["# hf_fastif vs the 2021 reference code\n", f"`{results['command']}`\n",
             f"torch {env['torch']}, {env['threads']} thread(s), {env['cpus']} CPUs, load average before "
             f"{env['load_before']}, after {env['load_after']}; total {results['total_s']:.0f} s.\n",
             "## End to end, one test point, every training row scored (first call)\n"]
    table = [{"model": r["model"], "parameters": f"{r['parameters']:,}", "T": r["T"],
              "2021 s": f"{r['reference_s']:.2f} ({_range(r['reference_range_s'])})",
              "hf_fastif s": f"{r['hf_fastif_s']:.2f} ({_range(r['hf_fastif_range_s'])})",
              "ratio": f"{r['ratio']:.2f}x", "ratio, fastest runs": f"{r['ratio_fastest']:.2f}x", "Spearman": f"{r['spearman']:.5f} (min {r['spearman_min']:.5f})",
              "noise floor hf_fastif": _five(r["noise_floor_hf_fastif"]),
              "noise floor 2021": _five(r["noise_floor_reference"]), "2021 vs no H⁻¹": _five(r["spearman_no_hessian"]),
              **{p: r["phases"].get(p) for p in PHASES}} for r in rows]
    columns = ["model", "parameters", "T", "2021 s", "hf_fastif s", "ratio", "ratio, fastest runs", "Spearman", "noise floor hf_fastif",
               "noise floor 2021", "2021 vs no H⁻¹", *PHASES]
    lines.append(rows_table(table, columns))
    extra = sorted({k for r in rows for k in r["phases"] if k not in PHASES})
    if extra:
        lines.append("\nOther timed diagnostics (median s): " + "; ".join(
            f"{r['model']} T={r['T']}: " + ", ".join(f"{k} {r['phases'][k]:.3g}" for k in extra if k in r["phases"])
            for r in rows))
    lines.append("\nSeconds: median (range) over the runs; ratio = 2021 / hf_fastif medians (and of the fastest "
                 "run of each side: on a shared machine the least disturbed). Spearman: ours vs "
                 "theirs, median over run pairs; noise floor: Spearman between two seeds of the same side; 2021 vs no H⁻¹: "
                 "Spearman of the reference's values with the gradient dot product -∇L(z)·∇L_test (how much the "
                 "Hessian changes the ranking at these settings).\n")
    lines.append("## Scoring throughput (trunk cached where the model splits)\n")
    lines.append(rows_table(results["throughput"], ["model", "parameters", "batch_size", "jvp_rows_per_s",
                                                    "forward_rows_per_s", "jvp_over_forward", "trunk"]))
    for name, prof in results["profiles"].items():
        lines.append(f"\n## Profile: {name}, T = 1, one first call per side\n")
        lines.append(rows_table(prof["sides"], ["side", "total_s", "convergence_check_s", "check: batch Hessians_s",
                                                "check: mean Hessian_s", "s_test_recursion_s",
                                                "step_ms (recursion / J)", "step_ms (alone)", "scoring_s",
                                                "scoring_row_ms", "other_s"]))
        lines.append("\nhf_fastif's HVP alone (pre-collated rows, B = 1 unless said; the check runs "
                     f"{CHECK_BATCHES} Lanczos runs of {CHECK_ITERATIONS} B-row HVPs and one of "
                     f"{CHECK_ITERATIONS + 2} HVPs over {CHECK_ROWS} rows; 'modelled' counts the HVPs only):\n")
        lines.append(rows_table([prof["hvp"]], list(prof["hvp"])))
        lines.append(f"\n{prof['note']} hf_fastif phases (s): "
                     + ", ".join(f"{k} {v:.3g}" for k, v in prof["hf_fastif_phases"].items()))
        for side in ("hf_fastif", "reference"):
            lines.append(f"\ntorch.profiler, one LiSSA step of {side}, top operators by self CPU time:\n")
            lines.append(rows_table(prof[f"{side}_step_ops"], ["op", "calls per step", "self ms per step", "share"]))
    lines.append("\n## Differences that remain\n")
    lines += [f"- {m}" for m in results["mismatches"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
