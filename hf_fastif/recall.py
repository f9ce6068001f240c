"""Candidate recall as a user asks for it: k as a count or a share of N, the candidate methods, and the table.

`InfluenceEngine.candidate_recall` measures how many of the full scan's most helpful / harmful training rows
each candidate method finds among its k candidates. This module turns what a user types (``--ks 20 5% 10%``,
``--methods auto gradient random``) into its arguments, refusing bad input before any work, and prints its
rows as one markdown table (``hf-fastif recall``, ``python -m benchmarks.recall``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .arguments import FEATURES
from .data import generate_nli, tokenize_nli
from .embedded import data_description, embedded_tokenizer, train_embedded_model
from .minilm_default import FinetuneSettings, minilm_influence_params
from .quality import RECALL_NS, recall_ns  # (in quality: the engine reads them too)
from .utils import markdown_table

RECALL_METHODS = (*FEATURES, "random")
"""Candidate methods a recall can compare: every ``influence_knn_features`` value and seeded uniform candidates."""

MINILM_RECALL_N_TRAIN = 2000
"""Generated training rows (N) of a recall on the fine-tuned MiniLM (``hf-fastif recall`` without a model)."""

_BUILD = FinetuneSettings()  # how `hf-fastif build`'s embedded default and the Space fine-tune MiniLM

MINILM_RECALL_SETTINGS: dict = dict(
    seed=_BUILD.seed, num_train_epochs=_BUILD.epochs, learning_rate=_BUILD.lr,
    per_device_train_batch_size=_BUILD.batch_size, warmup_steps=_BUILD.warmup_ratio, weight_decay=_BUILD.weight_decay,
    influence_params=minilm_influence_params(_BUILD.trainable_layers), influence_solver="lissa",
    influence_recursion_depth=200, influence_batch_size=8, influence_repetitions=1, influence_damping=0.025,
    influence_scale=400.0, influence_check_convergence=False)
"""Settings of a recall on the fine-tuned MiniLM: fine-tuned as `hf-fastif build`'s embedded default and the Space
fine-tune it (`FinetuneSettings`' defaults: last 2 layers + pooler + classifier, 1 epoch, lr 2e-4, 10% warm-up,
weight decay 0.01; on the same 2,000 generated rows it is the same cached model), influence over the fine-tuned
parameters (3.7M), not the default table's pooler + classifier. LiSSA J 200, B 8, T 1, damping 0.025 (J·damp = 5, as
the paper's 1000 × 5e-3), scale 400 (λ = 10). The convergence check measured, on that model and its 2,000 rows: 8-row
batch Hessians reach a top eigenvalue of ~97 (scale must exceed ~49); the mean Hessian is not at a minimum after one
epoch (smallest eigenvalue ~-23 over 32 rows, ~-0.7 over 256; largest ~34 over 32), so λ = 10 keeps H + λI positive
definite and leaves the top of the spectrum to the Hessian; the check (~60 s a call) is off."""


RECALL_HANS_PER_SUBCASE = 1  # the test rows of a recall without a model: one HANS-style row per subcase


def finetuned_minilm(n_train: int, args) -> tuple:
    """The model of a recall without one (``hf-fastif recall``, ``python -m benchmarks.recall``): MiniLM fine-tuned
    with ``args``' training fields (`MINILM_RECALL_SETTINGS` by default) on ``n_train`` generated rows (seed
    ``args.seed``), from the content-keyed fine-tuning cache after the first time; with the default settings and
    2,000 rows it is the model of `hf-fastif build`'s embedded default. Returns ``(model, tokenizer, train, test,
    name, info)``: the tokenized training rows, the generated HANS-style rows (one per subcase) tokenized, a name for
    reports, and `train_embedded_model`'s ``info`` (``cached``, ``key``, ...)."""
    raw = generate_nli(seed=args.seed, n_train=n_train, n_hans_per_subcase=RECALL_HANS_PER_SUBCASE, n_pool_per_subcase=0)
    tokenizer = embedded_tokenizer("minilm")
    train = tokenize_nli(raw["train"], tokenizer)
    model, info = train_embedded_model(raw["train"], train, tokenizer, args, kind="minilm",
                                       description=data_description(args.seed, n_train))
    name = f"all-MiniLM-L6-v2 fine-tuned on {n_train} generated NLI rows"
    return model, tokenizer, train, tokenize_nli(raw["hans"], tokenizer), name, info


def parse_k(spec: str | int) -> tuple[str, float]:
    """``("count", k)`` for ``"20"`` / ``20``, ``("share", p)`` for ``"5%"`` (0 < p <= 100); a ValueError naming the
    fix otherwise."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100 or not math.isfinite(share):
                raise ValueError
            return "share", share
        count = float(text)
        if not math.isfinite(count) or count != int(count) or count < 1:
            raise ValueError
        return "count", int(count)
    except ValueError:
        raise ValueError(f"k={text!r} is not a number of candidates (an integer >= 1, e.g. 20) or a share of the "
                         "training rows (above 0% and at most 100%, e.g. 5%).") from None


def resolve_ks(specs: Sequence[str | int], num_rows: int) -> list[int]:
    """k per spec for ``num_rows`` candidate rows: counts as given, shares rounded (at least 1); every k must be at
    most ``num_rows``. Duplicates are kept once, in order."""
    parsed = [parse_k(s) for s in specs]
    if not parsed:
        raise ValueError("Give at least one k (e.g. --ks 1% 5% 10% or --ks 20 100).")
    out = []
    for (kind, value), spec in zip(parsed, specs):
        k = int(value) if kind == "count" else max(1, round(value / 100 * num_rows))
        if k > num_rows:
            raise ValueError(f"k={spec} exceeds the {num_rows} candidate rows; use at most {num_rows} or a share "
                             "such as 10%.")
        if k not in out:
            out.append(k)
    return out


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods, checked: each one of `RECALL_METHODS`, at least one, duplicates dropped."""
    if not methods:
        raise ValueError(f"Give at least one method: {', '.join(RECALL_METHODS)}.")
    unknown = [m for m in methods if m not in RECALL_METHODS]
    if unknown:
        raise ValueError(f"Unknown candidate method(s) {', '.join(map(repr, unknown))}; use any of "
                         f"{', '.join(RECALL_METHODS)}.")
    return list(dict.fromkeys(methods))


def recall_table(rows: Sequence[dict], ns: Sequence[int] = RECALL_NS) -> str:
    """`InfluenceEngine.candidate_recall`'s rows as a markdown table: method, k, k/N, recall@n helpful / harmful
    for each n, the random expectation (k/N), the index build seconds (once per method) and seconds per query."""
    header = ["method", "k", "k/N", *[f"recall@{n} {d}" for n in ns for d in ("helpful", "harmful")],
              "random expectation", "build s", "query s"]
    body = [[r["method"], r["k"], f"{100 * r['k_fraction']:.1f}%",
             *[f"{r[f'recall@{n} {d}']:.2f}" for n in ns for d in ("helpful", "harmful")],
             f"{r['random_expectation']:.3f}", f"{r['build_s']:.2f}", f"{r['query_s']:.3g}"] for r in rows]
    return markdown_table(header, body)


__all__ = ["MINILM_RECALL_N_TRAIN", "MINILM_RECALL_SETTINGS", "RECALL_METHODS", "RECALL_NS", "check_methods",
           "finetuned_minilm", "parse_k", "recall_ns", "recall_table", "resolve_ks"]
