"""Ground-truth anchors: influence on L2-regularised logistic regression, where exact influence, leave-one-out
retraining and the linear datamodeling score (LDS) can all be computed: on sklearn's digits (two classes), and on
the pretrained all-MiniLM-L6-v2's classification head over its own features of generated NLI rows."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from transformers import DataCollatorWithPadding

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif.data import NLI2_LABELS, generate_nli, tokenize_nli
from hf_fastif.ground_truth import (
    LogisticRegression,
    digits_data,
    fit_linear_head,
    fit_logistic_regression,
    head_features,
    leave_one_out_loss_changes,
)
from hf_fastif.pretrained import load_minilm_for_sequence_classification, load_minilm_tokenizer
from hf_fastif.quality import dense_reference, influence_by_test

WEIGHT_DECAY = 0.005  # the reference code's explicit L2 term
NO_INVERSE = "no H⁻¹ (λ = 1e6: the gradient dot product)"
"""A row with the inverse Hessian taken out (s_test ∝ ∇L_test): what H⁻¹ adds to the ranking on each anchor."""
SOLVERS = {
    "exact": dict(influence_solver="exact", influence_damping=0.0),
    "cg": dict(influence_solver="cg", influence_damping=0.0),
    "lissa (B=32, J=1500, T=4)": dict(influence_solver="lissa", influence_damping=0.001, influence_scale=2.0,
                                      influence_batch_size=32, influence_recursion_depth=1500, influence_repetitions=4),
    # single-row Hessians reach p(1-p)·‖x‖² ≈ 16, so B = 1 needs a larger scale (λ kept at 0.002)
    "lissa (B=1, J=1000, T=4; FastIF)": dict(influence_solver="lissa", influence_damping=0.0001, influence_scale=20.0,
                                             influence_batch_size=1, influence_recursion_depth=1000,
                                             influence_repetitions=4),
    NO_INVERSE: dict(influence_solver="exact", influence_damping=1e6, influence_scale=1.0),
}
# MiniLM's pooled features are small (‖x‖² 1.2-2.6 on the anchor's rows: single-row Hessian tops ≤ 1.1), so B = 1
# converges at the same scale as B = 32; J·(2wd + λ)/scale = 6-9: both LiSSA rows run their series to the end
MINILM_SOLVERS = {
    "exact": SOLVERS["exact"], "cg": SOLVERS["cg"], "lissa (B=32, J=1500, T=4)": SOLVERS["lissa (B=32, J=1500, T=4)"],
    "lissa (B=1, J=1000, T=4; FastIF)": dict(influence_solver="lissa", influence_damping=0.001, influence_scale=2.0,
                                             influence_batch_size=1, influence_recursion_depth=1000,
                                             influence_repetitions=4),
    NO_INVERSE: SOLVERS[NO_INVERSE],
}


def _measurement(outputs, batch):
    return F.cross_entropy(outputs["logits"], batch["labels"], reduction="none")


def ground_truth_anchor(num_train: int, num_test: int, lds_subsets: int, seed: int = 0) -> dict:
    """Each solver's Spearman vs exact influence and vs leave-one-out retraining, and its LDS: Spearman, over
    ``lds_subsets`` random 50% training subsets each retrained to its optimum (Newton), between the predicted
    test loss Σ_{i∈S} I(z_i, z_test) and the actual one; means over test points."""
    train, test, x, y, xt, yt = digits_data(num_train=num_train, num_test=num_test, seed=0)
    model = fit_logistic_regression(LogisticRegression(x.shape[1], 2).double(), x, y, WEIGHT_DECAY)
    return solver_agreement(model, model, train, test, (x, y, xt, yt), SOLVERS, lds_subsets, seed,
                            influence_hvp_batch_size=1000, influence_scoring_batch_size=1000)


def minilm_head_anchor(num_train: int, num_test: int, lds_subsets: int, seed: int = 0,
                       solvers: dict | None = None) -> dict:
    """The same on a real pretrained transformer: all-MiniLM-L6-v2's classification head (bias 0, everything below
    frozen) at the optimum of ``mean CE + wd·‖W‖²`` over its pooled features of generated NLI rows
    (`hf_fastif.ground_truth.fit_linear_head`); influence runs through the whole model (the trunk cached below the
    head), leave-one-out and the LDS retrain the head on the features. Test points: HANS-style rows.
    ``solvers``: name -> settings, `MINILM_SOLVERS` by default (its first must be exact)."""
    tokenizer = load_minilm_tokenizer()
    torch.manual_seed(seed)
    model = load_minilm_for_sequence_classification(len(NLI2_LABELS), id2label=dict(enumerate(NLI2_LABELS))).eval()
    raw = generate_nli(seed=seed, n_train=num_train, n_hans_per_subcase=-(-num_test // 30), n_pool_per_subcase=0)
    train = tokenize_nli(raw["train"], tokenizer)
    test = tokenize_nli(raw["hans"].shuffle(seed=seed).select(range(num_test)), tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    fitted, x, y = fit_linear_head(model, train, collator, WEIGHT_DECAY)
    xt, yt = head_features(model, test, collator).to(x.dtype), torch.as_tensor(test["labels"])
    return solver_agreement(model, fitted, train, test, (x, y, xt, yt), solvers or MINILM_SOLVERS, lds_subsets, seed,
                            data_collator=collator, influence_params=None)  # (what requires grad: the head's weight)


def solver_agreement(model, head: LogisticRegression, train, test, tensors, solvers: dict, lds_subsets: int,
                     seed: int, data_collator=None, **settings) -> dict:
    """Each of ``solvers``' influence through ``model`` against leave-one-out retraining of ``head`` (the convex
    model on the features ``tensors = (x, y, x_test, y_test)``), its LDS and its agreement with exact."""
    x, y, xt, yt = tensors
    n = len(train)
    start = time.perf_counter()
    loo = leave_one_out_loss_changes(head, x, y, xt, yt, WEIGHT_DECAY)  # (n, num_test)
    loo_s = time.perf_counter() - start

    rng = np.random.default_rng(seed + 3)
    subsets = np.zeros((lds_subsets, n), dtype=bool)
    for s in range(lds_subsets):
        subsets[s, rng.choice(n, n // 2, replace=False)] = True
    start = time.perf_counter()
    actual = np.zeros((lds_subsets, len(test)))
    for s in range(lds_subsets):
        sub = LogisticRegression(x.shape[1], head.linear.out_features).to(x.dtype)
        sub.load_state_dict(head.state_dict())
        fit_logistic_regression(sub, x[subsets[s]], y[subsets[s]], WEIGHT_DECAY)
        with torch.no_grad():
            actual[s] = F.cross_entropy(sub(xt)["logits"], yt, reduction="none").numpy()
    lds_s = time.perf_counter() - start

    def lds(scores: np.ndarray) -> float:  # scores (num_test, n): predicted loss(S) ∝ Σ_{i∈S} scores
        predicted = subsets.astype(np.float64) @ scores.T  # (subsets, num_test)
        return float(np.mean([spearmanr(predicted[:, t], actual[:, t]).statistic for t in range(len(test))]))

    def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:  # row by row, (num_test, n) each
        return float(np.mean([spearmanr(a[t], b[t]).statistic for t in range(len(test))]))

    rows, matrices = [], {}
    for name, solver_settings in solvers.items():
        args = InfluenceArguments(report_to="none", disable_tqdm=True, influence_weight_decay=WEIGHT_DECAY,
                                  influence_knn_k=None, **settings, **solver_settings)
        start = time.perf_counter()
        table = compute_influences(model, train, test, args, measurement_fn=_measurement, data_collator=data_collator)
        seconds = time.perf_counter() - start
        matrices[name] = dense_reference(influence_by_test(table, len(test)), n)
        # removing a helpful row (negative influence) raises the test loss: compare -influence with leave-one-out
        rows.append({"solver": name, "seconds": seconds, "lambda": args.influence_damping * args.influence_scale,
                     "spearman_vs_loo": mean_spearman(-matrices[name], loo.T), "lds": lds(matrices[name])})
    for row in rows:
        row["spearman_vs_exact"] = mean_spearman(matrices[row["solver"]], matrices["exact"])
    rows.append({"solver": "leave-one-out retraining (Newton)", "seconds": loo_s, "spearman_vs_loo": 1.0,
                 "spearman_vs_exact": mean_spearman(-matrices["exact"], loo.T), "lds": lds(-loo.T)})
    return {"rows": rows, "num_train": n, "num_test": len(test), "weight_decay": WEIGHT_DECAY,
            "lds_subsets": lds_subsets, "lds_retraining_s": lds_s}
