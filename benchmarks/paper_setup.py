"""The paper table's settings and shared set-up: its own flags (`BenchmarkArguments`), the defaults it gives
`InfluenceArguments`, the model and data every row uses, and one timed `compute_influences` call.

`InfluenceArguments` describes the "FastIF" row (the paper's method): solver, damping, scale, J, B, T, k,
parameters, weight decay, seed. Every other row is derived from it by replacing a few fields.
"""

from __future__ import annotations

import dataclasses
import re
from argparse import Namespace
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
)

from hf_fastif import InfluenceArguments, InfluenceTable, compute_influences
from hf_fastif.data import load_hans, load_mnli, tokenize_nli
from hf_fastif.embedded import DEFAULT_KIND, KINDS, QUICK_KIND, embedded_data, embedded_kind, train_embedded
from hf_fastif.ground_truth import check_digits_sizes
from hf_fastif.minilm_default import minilm_influence_params
from hf_fastif.params import PAPER_BERT_PARAMS

from .timing import timed

ORIGINAL, FASTIF, PARALLEL, FAST = "original", "FastIF", "FastIF parallel", "hf_fastif fast"
LOW_RANK = "hf_fastif low-rank"
STACKED = "FastIF, repetitions stacked"  # the T repetitions' products of a step as one computation (grouped or vmapped)
FLOOR, GRADIENT = "original, another seed", "reference: gradient dot product"
CONVERGENCE = 5.0  # J·damp of the paper's LiSSA (1000 × 5e-3): the series has shrunk by (1 - damp)^J ≈ e^-5
TEST_FORMATS = ("mnli", "hans")
MINILM_LAYERS = 2  # fine-tuned and influence layers of --embedded_model minilm (minilm_default's default)
MINILM_SCALE = 200.0
"""LiSSA scale of --embedded_model minilm: single-row batch Hessians of the fine-tuned MiniLM reach eigenvalues of
~75 (the engine's convergence check), and a B = 1 step converges only below (2 - damp)·scale."""


@dataclass
class BenchmarkArguments:
    """The paper table's own settings; influence settings are `InfluenceArguments` flags (FastIF's row)."""

    quick: bool = field(default=False, metadata={"help": "Tiny sizes: proves the benchmark works in seconds (CI)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A fine-tuned sequence-classification model (Hub id or directory). Default: the embedded "
                          "model (--embedded_model), trained here on the embedded NLI data."},
    )
    embedded_model: str | None = field(
        default=None,
        metadata={"help": f"The embedded model: {' or '.join(KINDS)} (default {DEFAULT_KIND}: all-MiniLM-L6-v2 "
                          f"fine-tuned once and cached; --quick: {QUICK_KIND})."},
    )
    train_dataset: str | None = field(
        default=None, metadata={"help": "MNLI-format training data (Hub id or file; hf_fastif.data.load_mnli)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of --train_dataset."})
    test_dataset: str | None = field(
        default=None, metadata={"help": "Test data (default: --train_dataset's validation_matched split)."}
    )
    test_split: str = field(default="validation_matched", metadata={"help": "Split of --test_dataset."})
    test_format: str = field(default="mnli", metadata={"help": "'mnli' or 'hans': loader of --test_dataset."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use a seeded sample of this many rows."})
    embedded_train_rows: int = field(default=3000, metadata={"help": "Training rows of the embedded data."})
    num_threads: int = field(default=1, metadata={"help": "torch threads (1: stable timings on a shared machine)."})
    num_test: int = field(default=8, metadata={"help": "Test points whose influence is compared."})
    original_batch_size: int = field(default=128, metadata={"help": "B of 'original' (the paper's LiSSA batch)."})
    knn_sweep: list[int] = field(
        default_factory=lambda: [100, 1000],
        metadata={"help": "k of the '+kNN' rows (the original's s_test, k candidates). FastIF's k is --influence_knn_k."},
    )
    fast_batch_size: int = field(
        default=4, metadata={"help": "B of 'hf_fastif fast' (4: about B = 8's agreement with the original in a "
                                     "sweep on MiniLM, at less cost; 2 lost it on the quick tiny model; "
                                     "docs/benchmarks.md)."}
    )
    fast_repetitions: int = field(default=1, metadata={"help": "T of 'hf_fastif fast'."})
    fast_calls: int = field(default=3, metadata={"help": "Calls of 'hf_fastif fast' (timing: the median)."})
    fast_scale_factor: float = field(
        default=1.5, metadata={"help": "'hf_fastif fast' LiSSA scale = this x the top Hessian eigenvalue estimate."}
    )
    low_rank_rank: int = field(
        default=16, metadata={"help": "'hf_fastif low-rank': eigenpairs of H kept (influence_arnoldi_rank)."}
    )
    low_rank_rows: int = field(
        default=256,
        metadata={"help": "'hf_fastif low-rank': seeded training rows whose mean Hessian is decomposed, once per "
                          "model (influence_arnoldi_rows; capped at N)."},
    )
    low_rank_calls: int = field(default=3, metadata={"help": "Timed calls of 'hf_fastif low-rank' (the median)."})
    noise_floor_test: int = field(
        default=4, metadata={"help": "Test points of 'original, another seed' (the original's own noise)."}
    )
    parallel_processes: int = field(default=2, metadata={"help": "Processes of 'FastIF parallel' (0: skip)."})
    sweep_depths: list[float] = field(
        default_factory=lambda: [0.7, 1.0, 1.3], metadata={"help": "s_test sweep: J as fractions of J (paper 700-1300)."}
    )
    sweep_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 128], metadata={"help": "Sweep B."})
    sweep_repetitions: int = field(
        default=4, metadata={"help": "Sweep T up to this, while T·B <= the original's B (never more rows per step)."}
    )
    sweep_num_test: int = field(default=2, metadata={"help": "Test points of the sweep (one call)."})
    sweep_pool: int = field(default=500, metadata={"help": "Random training rows the sweep scores."})
    ground_truth: bool = field(default=True, metadata={"help": "Run the digits ground-truth anchor."})
    digits_train: int = field(default=1000, metadata={"help": "Digits training rows."})
    digits_test: int = field(default=50, metadata={"help": "Digits test rows."})
    lds_subsets: int = field(default=100, metadata={"help": "Random half-size subsets for the LDS (each retrained)."})
    paper_n: int = field(default=392_702, metadata={"help": "Paper scale: training rows (MNLI)."})
    paper_k: int = field(default=1000, metadata={"help": "Paper scale: kNN candidates."})
    paper_j: int = field(default=1000, metadata={"help": "Paper scale: LiSSA J."})
    paper_b: int = field(default=128, metadata={"help": "Paper scale: B of 'original'."})
    paper_t: int = field(default=4, metadata={"help": "Paper scale: T of FastIF."})


def benchmark_kind(own: Namespace | BenchmarkArguments) -> str:
    """The embedded model of a run: ``--embedded_model``, else the tiny one for ``--quick``, else MiniLM."""
    return own.embedded_model or (QUICK_KIND if own.quick else DEFAULT_KIND)


def benchmark_defaults(own: Namespace) -> dict:
    """Defaults of both argument classes given the benchmark's own flags: the embedded model (its training and
    influence parameters, hf_fastif.embedded) runs a CPU-sized LiSSA (J = 100 with damp = 0.05, so J·damp = 5 as
    the paper's 1000 × 5e-3; the kind's benchmark scale, a few times its top Hessian eigenvalue), a given model
    the paper's settings (`InfluenceArguments`' own defaults, the paper's BERT layers); ``--quick`` shrinks every
    size. A flag given on the command line overrides any of these."""
    out = dict(output_dir="outputs/benchmark", seed=0, report_to="none", disable_tqdm=True)
    if own.model_name_or_path is None and benchmark_kind(own) == "minilm":
        # the paper's kind of selection (the fine-tuned layers 4-5, pooler and classifier, 3.7M parameters); MiniLM's
        # steps cost ~30x the tiny BERT's on a CPU: fewer rows, test points and sweep points, the original's B = 32
        # (the cost model still takes B = 128 at the paper's scale), no digits anchor (it does not depend on the model)
        out |= embedded_kind("minilm").training | dict(
            use_cpu=True, influence_params=minilm_influence_params(MINILM_LAYERS), influence_recursion_depth=100,
            influence_damping=CONVERGENCE / 100, influence_scale=MINILM_SCALE, embedded_train_rows=1000,
            num_train_epochs=1.0, num_test=2, noise_floor_test=1, original_batch_size=32, knn_sweep=[300],
            influence_knn_k=300, sweep_batch_sizes=[1, 8], sweep_depths=[1.0], sweep_repetitions=2, sweep_num_test=1,
            sweep_pool=300, ground_truth=False)
    elif own.model_name_or_path is None:
        settings = embedded_kind(benchmark_kind(own))
        out |= settings.training | dict(use_cpu=True, influence_params=settings.influence["influence_params"],
                                        influence_recursion_depth=100, influence_damping=CONVERGENCE / 100,
                                        influence_scale=settings.uses["benchmark"]["influence_scale"])
    else:
        out |= dict(influence_params=PAPER_BERT_PARAMS)
    if own.quick:  # damp = 0.25 at J = 20: single-row Hessians of the tiny model need room (scale 10)
        out |= dict(embedded_train_rows=400, num_test=2, influence_recursion_depth=20,
                    influence_damping=CONVERGENCE / 20, influence_scale=10.0, original_batch_size=32,
                    knn_sweep=[20, 80], influence_knn_k=80, sweep_depths=[0.5, 1.0], sweep_batch_sizes=[1, 8],
                    sweep_repetitions=2, sweep_num_test=2, sweep_pool=60, digits_train=120, digits_test=4,
                    lds_subsets=12, low_rank_rank=4, low_rank_rows=64, low_rank_calls=2)
        if own.model_name_or_path is None and benchmark_kind(own) == "minilm":
            out["influence_scale"] = MINILM_SCALE
    return out


def validate(bench: BenchmarkArguments, args: InfluenceArguments) -> None:
    """Refuse settings the table cannot run, before any work starts."""
    if args.influence_solver != "lissa":
        raise ValueError(f"influence_solver={args.influence_solver!r}: the InfluenceArguments describe the paper "
                         "table's FastIF row, which is LiSSA (the low-rank row takes --low_rank_rank and "
                         "--low_rank_rows; the digits anchor compares the solvers); pass --influence_solver lissa.")
    if args.influence_knn_k is None or args.influence_repetitions is None:
        raise ValueError("FastIF's row needs --influence_knn_k and --influence_repetitions as integers "
                         f"(got {args.influence_knn_k}, {args.influence_repetitions}).")
    if args.influence_knn_features == "gradient" or args.influence_knn_index != "Flat":
        raise ValueError(f"influence_knn_features={args.influence_knn_features!r}, influence_knn_index="
                         f"{args.influence_knn_index!r}: the kNN study behind the '+kNN' rows and the recall curve ranks "
                         "every training row by its exact distance to the test point's model feature; pass "
                         "--influence_knn_features auto, pooler, cls, mean or last and --influence_knn_index Flat "
                         "(gradient candidates: benchmarks.recall).")
    if bench.embedded_model is not None and bench.embedded_model not in KINDS:
        raise ValueError(f"embedded_model={bench.embedded_model!r} is unknown; use one of {', '.join(KINDS)}.")
    if bench.test_format not in TEST_FORMATS:
        raise ValueError(f"test_format={bench.test_format!r} is unknown; use 'mnli' or 'hans'.")
    positive = {name: getattr(bench, name) for name in (
        "num_test", "num_threads", "original_batch_size", "fast_batch_size", "fast_repetitions", "fast_calls",
        "noise_floor_test", "low_rank_rank", "low_rank_rows", "low_rank_calls", "sweep_repetitions",
        "sweep_num_test", "sweep_pool", "digits_train", "digits_test", "lds_subsets")}
    positive |= {"knn_sweep": min(bench.knn_sweep, default=0), "sweep_depths": min(bench.sweep_depths, default=0),
                 "sweep_batch_sizes": min(bench.sweep_batch_sizes, default=0)}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive (lists: non-empty and positive), got {value}.")
    check_digits_sizes(bench.digits_train, bench.digits_test)
    if bench.parallel_processes < 0:
        raise ValueError(f"--parallel_processes must be >= 0 (0 or 1: skip the row), got {bench.parallel_processes}.")


def influence_fields(args: InfluenceArguments) -> dict:
    """The ``influence_*`` fields of ``args`` (what a row's settings are, and what a worker process needs)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name.startswith("influence_")}


@dataclass
class Setup:
    """What every stage shares: the model, its tokenizer and collator, the training and test rows."""

    model: PreTrainedModel
    tokenizer: object
    collator: object
    train: Dataset
    test: Dataset
    description: dict


def _check_params(model: torch.nn.Module, patterns: list[str] | None) -> None:
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns or []:
        if not any(re.search(pattern, name) for name in names):
            raise ValueError(f"--influence_params entry {pattern!r} matches no parameter of "
                             f"{type(model).__name__} (names look like {', '.join(names[:4])}, ...); pass "
                             "--influence_params with regexes over its parameter names.")


def prepare(bench: BenchmarkArguments, args: InfluenceArguments) -> Setup:
    """Load (or train) the model and data and pick the test points (seeded by ``args.seed``)."""
    rng = np.random.default_rng(args.seed)
    if bench.model_name_or_path is None:
        kind = benchmark_kind(bench)
        data = embedded_data(seed=args.seed, n_train=bench.embedded_train_rows, kind=kind,
                             n_hans_per_subcase=4 if bench.quick else 40, n_pool_per_subcase=1 if bench.quick else 40)
        (trainer, _, tokenized), train_s = timed(lambda: train_embedded(args=args, data=data, kind=kind))
        model, tokenizer, collator = trainer.model, data[2], trainer.data_collator
        train, pool = tokenized["train"], tokenized["hans"]
        cfg = model.config
        description = {
            "model": f"embedded {kind} {cfg.model_type} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), "
                     f"{embedded_kind(kind).description} ({train_s:.0f}s here, fine-tuning cached by content)",
            "train": f"embedded NLI train ({len(train)} rows)", "test": "embedded HANS-style split",
        }
    else:
        tokenizer = AutoTokenizer.from_pretrained(bench.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(bench.model_name_or_path,
                                                                   attn_implementation="eager")
        _check_params(model, args.influence_params)
        num_labels = model.config.num_labels
        train_raw = load_mnli(bench.train_dataset or "nyu-mll/multi_nli", bench.train_split, num_labels)
        if bench.max_train_rows and bench.max_train_rows < len(train_raw):
            train_raw = train_raw.select(np.sort(rng.choice(len(train_raw), bench.max_train_rows, replace=False)))
        source = bench.test_dataset or bench.train_dataset or "nyu-mll/multi_nli"
        if bench.test_format == "hans":
            test_raw = load_hans(source, bench.test_split)
        else:
            test_raw = load_mnli(source, bench.test_split, num_labels)
        train, pool = tokenize_nli(train_raw, tokenizer, max_length=128), tokenize_nli(test_raw, tokenizer, max_length=128)
        collator = DataCollatorWithPadding(tokenizer)
        description = {"model": bench.model_name_or_path, "train": f"{bench.train_dataset} [{bench.train_split}]",
                       "test": f"{source} [{bench.test_split}]"}
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    model = model.to(device).eval()
    test = pool.select(np.sort(rng.choice(len(pool), min(bench.num_test, len(pool)), replace=False)))
    return Setup(model, tokenizer, collator, train, test, description)


def call_influences(setup: Setup, test: Dataset, args: InfluenceArguments,
                    candidate_dataset: Dataset | None = None) -> tuple[InfluenceTable, float]:
    """One `compute_influences` call on the set-up's model and training rows: ``(table, wall seconds)``."""
    return timed(lambda: compute_influences(setup.model, setup.train, test, args, data_collator=setup.collator,
                                            candidate_dataset=candidate_dataset), collected=True)
