"""`InfluenceArguments`: `TrainingArguments` plus the `influence_*` settings of FastIF."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from transformers import TrainingArguments

SOLVERS = ("lissa", "cg", "exact", "arnoldi")
FEATURES = ("auto", "pooler", "cls", "mean", "last", "gradient")
STACK_MODES = ("auto", "yes", "no")
"""Values of ``influence_stack_repetitions``: ``"auto"`` stacks where every influence parameter allows the grouped
route (`hf_fastif.grouped_products`, any device) and on CUDA devices, ``"yes"`` everywhere, ``"no"`` never
(`hf_fastif.stacked`)."""
SCORING = ("jvp", "grad")
NONE_FOR_ZERO = ("influence_knn_k", "influence_repetitions", "influence_arnoldi_rows")
"""Whole-number settings where None means every row (k, the Arnoldi rows) or one repetition per process (T). They are
typed ``int | str | None`` (as TrainingArguments types ``lr_scheduler_kwargs``) so that transformers'
`HfArgumentParser` reads them as text: its ``int`` refused ``--influence_knn_k None`` ("invalid int value"), and the
text ``None`` or ``0`` is read as None by `InfluenceArguments` (`from_command_line`), other text as the number."""
NONE_FOR_WORD = ("influence_params",)
"""List settings where the word ``None`` (``--influence_params None``, which `HfArgumentParser` makes ``['None']``)
means None: every parameter with ``requires_grad``, not a regex that matches no parameter."""


PER_PROCESS_SETTINGS = ("influence_cache_dir",)
"""Settings each process of a launch may give its own value (a node-local scratch folder): where a process keeps its
own trunk states' file, not what it computes; left out of the check that the processes agree (different folders
were refused as "disagree on ['settings']"). Run-time settings of a build too (`hf_fastif.builder.RUNTIME_SETTINGS`)."""


@dataclass
class InfluenceArguments(TrainingArguments):
    """Training arguments plus the settings of influence computation.

    Every solver solves ``(H + λI) s_test = ∇L_test`` with ``λ = influence_damping × influence_scale``
    (LiSSA's fixed point), so solvers are interchangeable. The defaults are the paper's MNLI settings.
    """

    influence_solver: str = field(
        default="lissa",
        metadata={"help": "How s_test is solved: 'lissa' (stochastic), 'cg', 'exact' (dense), or 'arnoldi' (a low-rank "
                          "eigendecomposition of H computed once per model, then each s_test is a few products)."}
    )
    influence_damping: float = field(
        default=5e-3, metadata={"help": "LiSSA damp. The Tikhonov damping of every solver is damping × scale."}
    )
    influence_scale: float = field(
        default=1e4, metadata={"help": "LiSSA scale; must exceed the top Hessian eigenvalue for convergence."}
    )
    influence_recursion_depth: int = field(default=1000, metadata={"help": "LiSSA steps J per repetition."})
    influence_batch_size: int = field(
        default=1, metadata={"help": "B: training points in each LiSSA Hessian-vector product."}
    )
    influence_repetitions: int | str | None = field(
        default=4,
        metadata={"help": "T: independent LiSSA repetitions averaged. None (on the command line: None or 0): one per process (the paper's parallel variant)."},
    )
    influence_knn_k: int | str | None = field(
        default=1000, metadata={"help": "Candidates per query from the kNN index; None (on the command line: None or 0) scores every training point."}
    )
    influence_knn_features: str = field(
        default="auto",
        metadata={"help": "Candidates: 'auto' (kNN on the pooler output if the model has one; else the last token's "
                          "state for a generative decoder (a causal LM), the masked mean for the rest), 'pooler', "
                          "'cls', 'mean', 'last'; or 'gradient': rows whose projected training gradient has the largest "
                          "inner product with ±s_test (a faiss inner-product index; beyond the paper)."},
    )
    influence_projection_dim: int = field(
        default=8192,
        metadata={"help": "Dimension of the random projection (count / tensor sketch) of per-example gradients for "
                          "influence_knn_features='gradient' (8192: recall@10 0.94 / 0.97 at k = N/100 on the "
                          "fine-tuned MiniLM, docs/benchmarks.md; memory N × D × 4 bytes, twice that while it is built)."},
    )
    influence_knn_index: str = field(
        default="Flat", metadata={"help": "faiss index factory string of the candidate index: L2 over model "
                                          "features, inner product over sketched gradients ('Flat' is exact)."}
    )
    influence_params: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes over parameter names that take part; None (on the command line: None): every "
                          "parameter with requires_grad."},
    )
    influence_weight_decay: float = field(
        default=0.0,
        metadata={"help": "Explicit L2 term wd·Σθ² of the training objective (0.005 in the reference code); not on "
                          "biases/norms. It is part of H; influence_weight_decay_in_gradients says whether it also "
                          "enters each row's and the test point's gradient."},
    )
    influence_weight_decay_in_gradients: bool = field(
        default=False,
        metadata={"help": "Also add the L2 term to every row's and the test point's loss, as the 2021 reference code "
                          "does (True). False: Koh & Liang's influence of the row's own loss, the L2 term in H only, "
                          "so the sign agrees with leave-one-out retraining; True shifts each test point's values by "
                          "one constant (about a fifth of the signs flip on an L2-regularised convex model)."},
    )
    influence_seed: int = field(default=42, metadata={"help": "Seed of LiSSA's batch sampling, the convergence check's Lanczos starts and random candidates."})
    influence_hvp_batch_size: int = field(
        default=64, metadata={"help": "Rows per batch for full-data Hessians (cg, exact) and test gradients."}
    )
    influence_scoring_batch_size: int = field(default=64, metadata={"help": "Candidates per scoring batch."})
    influence_scoring: str = field(
        default="jvp",
        metadata={"help": "'jvp' (forward-mode, a few forward passes per batch) or 'grad' (per-example gradients)."},
    )
    influence_cg_max_iterations: int = field(default=200, metadata={"help": "CG iteration limit."})
    influence_cg_tol: float | None = field(
        default=None,
        metadata={"help": "CG stops at this relative residual (default: 1e-5 in float32, 1e-10 in float64)."},
    )
    influence_arnoldi_rank: int = field(
        default=32, metadata={"help": "influence_solver='arnoldi': eigenpairs of H kept (from 2x as many Lanczos steps)."}
    )
    influence_arnoldi_rows: int | str | None = field(
        default=None,
        metadata={"help": "influence_solver='arnoldi': seeded training rows whose mean Hessian is decomposed; None "
                          "(on the command line: None or 0): all."},
    )
    influence_measure_recall: bool = field(
        default=False,
        metadata={"help": "Also score every candidate row with the same s_test and record in the table's metadata how "
                          "many of the 10 / 100 most helpful and harmful rows the k candidates hold (costs a full scan)."},
    )
    influence_trunk_cache: bool = field(
        default=True,
        metadata={"help": "Compute the layers below the first influence parameter once per row and run only the top "
                          "afterwards (checked against the full model; off where no clean split exists)."},
    )
    influence_skip_unread_positions: bool = field(
        default=True,
        metadata={"help": "Run the last layer's per-position part (feed-forward block) only at the position the loss "
                          "reads (the first token of BERT-style classifiers), checked on probe rows; off where the "
                          "head reads other positions (hf_fastif.readout). Where only a pooler and a head take part, "
                          "the trunk cache keeps that position alone (hf_fastif.trunk)."},
    )
    influence_skip_trailing_padding: bool = field(
        default=True,
        metadata={"help": "Collate rows stored padded (padding='max_length') without the positions after every row's "
                          "last real token, where probe rows give the same values and outputs without them, to 100 "
                          "ulps (hf_fastif.batches.without_trailing_padding): those positions cost as much as real "
                          "ones. Off where the model reads its padding."},
    )
    influence_stack_repetitions: str = field(
        default="auto",
        metadata={"help": "Run the T LiSSA repetitions' Hessian-vector products of a step as one computation: "
                          "grouped (one batch of the T repetitions' rows, each repetition's products assembled from "
                          "its own rows' activations, hf_fastif.grouped_products) where every influence parameter "
                          "sits in an nn.Linear, nn.LayerNorm or nn.Embedding, else vmapped (hf_fastif.stacked). "
                          "'auto': grouped on any device, vmapped on CUDA devices (where a step is bound by kernel "
                          "launches); 'yes' everywhere (vmapped is slower on CPUs); 'no'. Checked against the "
                          "products one at a time on each call's first step and on longer rows; vmapped not for "
                          "attention over a window of positions."},
    )
    influence_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for caches too large for memory (trunk states beyond 2 GB); default: a temporary one."},
    )
    influence_check_convergence: bool = field(
        default=True,
        metadata={"help": "LiSSA: first estimate the batch Hessians' top eigenvalue and the mean Hessian's smallest "
                          "(Lanczos), and refuse settings that cannot converge."},
    )

    def __post_init__(self):
        super().__post_init__()
        from_command_line(self)
        validate_influence_settings(self)

    @property
    def influence_lambda(self) -> float:
        """The effective Tikhonov damping λ = damping × scale."""
        return self.influence_damping * self.influence_scale

    def influence_settings(self) -> dict:
        """Every ``influence_*`` field and λ, as recorded in a table's metadata."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k.startswith("influence_")}
        out["influence_lambda"] = self.influence_lambda
        return out


def from_command_line(args) -> None:
    """Read the command line's spellings of None, as the help gives them: ``None`` or ``0`` for the `NONE_FOR_ZERO`
    counts (text there, from `HfArgumentParser`; other text is read as a whole number, and what is not one is left
    for `validate_influence_settings` to refuse), and ``None`` for the `NONE_FOR_WORD` lists. A number 0 given in
    Python stays 0, and is refused: None says "every row" there."""
    for name in NONE_FOR_ZERO:
        value = getattr(args, name)
        if isinstance(value, str):
            text = value.strip()
            with contextlib.suppress(ValueError):
                value = None if text.lower() in ("none", "0") else int(text)
            setattr(args, name, value)
    for name in NONE_FOR_WORD:
        value = getattr(args, name)
        words = [value] if isinstance(value, str) else value
        if isinstance(words, list) and len(words) == 1 and isinstance(words[0], str) and words[0].lower() == "none":
            setattr(args, name, None)


def validate_influence_settings(args) -> None:
    """Raise a `ValueError` naming the fix for any invalid ``influence_*`` setting."""
    if args.influence_solver not in SOLVERS:
        raise ValueError(f"influence_solver={args.influence_solver!r} is unknown; use one of {', '.join(SOLVERS)}.")
    if args.influence_knn_features not in FEATURES:
        raise ValueError(
            f"influence_knn_features={args.influence_knn_features!r} is unknown; use one of {', '.join(FEATURES)} "
            "(or pass a callable as `features=` to compute_influences)."
        )
    if getattr(args, "influence_stack_repetitions", "auto") not in STACK_MODES:
        raise ValueError(f"influence_stack_repetitions={args.influence_stack_repetitions!r} is unknown; use one of "
                         f"{', '.join(STACK_MODES)}.")
    if args.influence_scoring not in SCORING:
        raise ValueError(f"influence_scoring={args.influence_scoring!r} is unknown; use one of {', '.join(SCORING)}.")
    reals = {"influence_damping": (">= 0", lambda x: x >= 0), "influence_scale": ("> 0", lambda x: x > 0),
             "influence_weight_decay": (">= 0", lambda x: x >= 0),
             "influence_cg_tol": ("> 0 (or None for the dtype's default)", lambda x: x > 0)}
    for name, (what, ok) in reals.items():  # finite: inf makes s_test 0 and every influence 0, without a word
        value = getattr(args, name)
        if value is None and name == "influence_cg_tol":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number {what}, got {value!r} ({type(value).__name__}).")
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be a finite number {what}, got {value!r}.")
    counts = {"influence_recursion_depth": "", "influence_batch_size": "", "influence_hvp_batch_size": "",
              "influence_scoring_batch_size": "", "influence_cg_max_iterations": "", "influence_arnoldi_rank": "",
              "influence_projection_dim": "", "influence_repetitions": ", or None for one repetition per process",
              "influence_knn_k": ", or None to score every training point",
              "influence_arnoldi_rows": ", or None to use every training row"}
    for name, none in counts.items():
        value = getattr(args, name)
        if value is None and none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1{none}, got {value!r}.")
    if isinstance(args.influence_params, str):
        args.influence_params = [args.influence_params]
    for name in ("influence_seed", "seed"):  # numpy's seeds: lissa and arnoldi failed after s_test, data generation
        seed = getattr(args, name)  # with a bare numpy error
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {seed!r}.")
    if args.influence_solver == "lissa" and args.influence_damping == 0:
        raise ValueError(
            "influence_damping=0 with influence_solver='lissa': without damping LiSSA's recursion converges only as fast "
            "as the Hessian's smallest eigenvalue / scale allows, which a few thousand steps do not reach on a "
            "singular or nearly singular Hessian (it returned 7% of the answer without a word). Use a small damping "
            "(the paper's 5e-3), or influence_solver='exact' or 'cg' (undamped, where the test gradient lies in the "
            "Hessian's range: its minimum-norm solution; a singular system they refuse).")
    if args.influence_solver == "lissa" and args.influence_damping >= 2:  # (1 - damp)·h: no step contracts
        raise ValueError(
            f"influence_damping={args.influence_damping:g} is >= 2: LiSSA's step multiplies the iterate by (1 - damping) "
            "and contracts only below (2 - damping)·scale, so it cannot converge. λ = damping × scale: keep damping "
            f"small and move λ into the scale (e.g. influence_damping=0.01, influence_scale="
            f"{args.influence_lambda / 0.01:g} for λ = {args.influence_lambda:g}), or use influence_solver='cg'.")
    for pattern in args.influence_params or []:
        if not isinstance(pattern, str):  # (re.compile's bare "first argument must be string or compiled pattern")
            raise ValueError(f"influence_params entries are regexes (strings); got {pattern!r} "
                             f"({type(pattern).__name__}). To select every parameter with requires_grad, pass "
                             "influence_params=None (the setting, not an entry).")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"influence_params entry {pattern!r} is not a valid regex: {err}.") from err
