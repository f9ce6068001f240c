"""Convex reference models whose influence can be checked against leave-one-out retraining.

`LogisticRegression` is a plain `nn.Module` written in the transformers calling convention (batch dict in,
``{"logits": ...}`` out), trained to its optimum with Newton's method on the objective
``mean CE + wd·‖W‖²`` — the same objective hf_fastif differentiates with ``influence_weight_decay=wd``: its
Hessian, while each row's (and the test point's) gradient is of its own loss, as removing the row changes the
objective (with ``influence_weight_decay_in_gradients=True``, the 2021 code's convention, they carry the L2 term).

`fit_linear_head` makes the same problem out of a real transformer: a pretrained model's linear classification
head, put at that optimum over the features the model feeds it (everything below frozen), is a logistic
regression on those features, so leave-one-out retraining of the head is ground truth for influence computed
through the whole model (trunk cache, kernels and all).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from .batches import model_input_columns
from .mode import evaluating


class LogisticRegression(nn.Module):
    """Multinomial logistic regression without bias (so the L2 term makes it strictly convex)."""

    def __init__(self, num_features: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_labels, bias=False)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return {"logits": self.linear(features.to(self.linear.weight.dtype))}


def _newton(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float, *, tol: float = 1e-12,
            max_steps: int = 50) -> torch.Tensor:
    """Minimise ``mean CE + wd·‖W‖²`` over ``W`` (K, d) by damped Newton steps with the explicit Hessian."""
    n, d = x.shape
    k = w.shape[0]
    onehot = F.one_hot(y, k).to(x.dtype)

    def objective(w):
        return F.cross_entropy(x @ w.T, y) + weight_decay * (w**2).sum()

    for _ in range(max_steps):
        p = torch.softmax(x @ w.T, dim=1)
        grad = (p - onehot).T @ x / n + 2 * weight_decay * w
        if grad.norm() < tol:
            break
        curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, K, K)
        hess = torch.einsum("nkl,na,nb->kalb", curv, x, x).reshape(k * d, k * d) / n
        hess += 2 * weight_decay * torch.eye(k * d, dtype=x.dtype)
        step = torch.linalg.solve(hess, grad.reshape(-1)).reshape(k, d)
        t, before = 1.0, objective(w)
        while objective(w - t * step) > before and t > 1e-8:
            t /= 2
        w = w - t * step
    return w


def fit_logistic_regression(model: LogisticRegression, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                            *, tol: float = 1e-12) -> LogisticRegression:
    """Minimise ``mean CE + wd·‖W‖²`` to (near) machine precision with Newton's method, in place."""
    with torch.no_grad():
        w = _newton(model.linear.weight.detach().to(x.dtype), x, y, weight_decay, tol=tol)
        model.linear.weight.copy_(w)
    return model


def head_features(model: nn.Module, rows: Dataset, collator, *, head: str = "classifier",
                  batch_size: int = 64) -> torch.Tensor:
    """What the linear module ``head`` of ``model`` reads for each of ``rows`` (in eval mode, without gradients;
    every module's own mode restored after): ``(len(rows), in_features)`` on the CPU, e.g. BERT's pooled output for
    its ``classifier``. Only the columns the model takes (`model_input_columns`) reach the collator."""
    module = _linear_head(model, head)
    columns = [c for c in model_input_columns(model, rows) if c not in ("labels", "label")]
    rows = rows.select_columns(columns)
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _module, args, _out: seen.append(args[0].detach().cpu()))
    device = module.weight.device
    try:
        with evaluating(model), torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        hook.remove()
    features = torch.cat(seen) if seen else torch.empty(0)
    if features.dim() != 2 or features.shape[0] != len(rows):
        raise ValueError(f"The head {head!r} read {tuple(features.shape)} for {len(rows)} rows, not one vector per "
                         "row: use a sequence classifier whose last linear layer reads one pooled vector per row.")
    return features


def _linear_head(model: nn.Module, head: str) -> nn.Linear:
    module = model.get_submodule(head)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{head!r} is a {type(module).__name__}, not an nn.Linear: name the model's last linear "
                         "layer (RoBERTa's is 'classifier.out_proj').")
    return module


def fit_linear_head(model: nn.Module, rows: Dataset, collator, weight_decay: float, *, head: str = "classifier",
                    dtype: torch.dtype = torch.float64) -> tuple[LogisticRegression, torch.Tensor, torch.Tensor]:
    """Put the linear ``head`` of ``model`` at the optimum of ``mean CE + wd·‖W‖²`` over ``rows`` (a ``labels`` or
    ``label`` column), its bias set to 0 and every parameter but its weight frozen, in place: influence over the
    head's weight is then that of a strictly convex logistic regression on the features below it, whose
    leave-one-out retraining (`leave_one_out_loss_changes` on the returned model and features) is ground truth.
    Select the head's weight for influence by leaving ``influence_params`` unset (every parameter with
    ``requires_grad``): a pattern such as ``classifier\\.weight`` also matches DistilBERT's ``pre_classifier``.

    Returns:
        ``(the same head as a LogisticRegression, features (n, d), labels (n,))``, in ``dtype``.
    """
    if not weight_decay > 0:  # (without it the softmax's shift along the classes is a flat direction)
        raise ValueError(f"weight_decay={weight_decay}: the head's problem is strictly convex only with an L2 term; "
                         "give a positive weight_decay (the reference code's 0.005).")
    label = next((c for c in ("labels", "label") if c in rows.column_names), None)
    if label is None:
        raise ValueError(f"The rows have no 'labels' or 'label' column (columns: {rows.column_names}).")
    module = _linear_head(model, head)
    features = head_features(model, rows, collator, head=head).to(dtype)
    labels = torch.as_tensor(rows[label])
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # a start of zeros (Newton needs no random one), the
        fitted = LogisticRegression(module.in_features, module.out_features).to(dtype)  # global generator untouched
        fitted.linear.weight.zero_()
    fit_logistic_regression(fitted, features, labels, weight_decay)
    with torch.no_grad():
        module.weight.copy_(fitted.linear.weight)
        if module.bias is not None:
            module.bias.zero_()
    for parameter in model.parameters():
        parameter.requires_grad_(parameter is module.weight)
    return fitted, features, labels


DIGITS_ROWS = 1797  # scikit-learn's bundled digits


def check_digits_sizes(num_train: int, num_test: int) -> None:
    """Refuse a split the digits cannot give (the test rows would silently be fewer, or none)."""
    if num_train < 1 or num_test < 1 or num_train + num_test > DIGITS_ROWS:
        raise ValueError(f"digits: {num_train} training + {num_test} test rows; the digits have {DIGITS_ROWS} rows in "
                         f"all: ask for at least one of each and at most {DIGITS_ROWS} together.")


def digits_data(num_train: int = 1000, num_test: int = 50, seed: int = 0, binary: bool = True,
                dtype=torch.float64) -> tuple[Dataset, Dataset, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits (8x8), standardised; ``binary``: label = digit >= 5, else the 10 digits.

    Returns:
        ``(train, test, x_train, y_train, x_test, y_test)``; datasets have ``features`` and ``labels``.
    """
    # on use: only the digits anchor needs scikit-learn (a dev extra)
    from sklearn.datasets import load_digits

    check_digits_sizes(num_train, num_test)
    x, y = load_digits(return_X_y=True)
    y = (y >= 5).astype(np.int64) if binary else y
    order = np.random.default_rng(seed).permutation(len(y))
    # rounded to float32 so that rows stored in a dataset (float32) are exactly the training tensors
    x = ((x - x.mean(0)) / (x.std(0) + 1e-6)).astype(np.float32)
    tr, te = order[:num_train], order[num_train : num_train + num_test]
    xt, yt = torch.tensor(x[tr], dtype=dtype), torch.tensor(y[tr])
    xs, ys = torch.tensor(x[te], dtype=dtype), torch.tensor(y[te])
    as_ds = lambda a, b: Dataset.from_dict({"features": a.tolist(), "labels": b.tolist()})  # noqa: E731
    ds_train, ds_test = as_ds(xt, yt), as_ds(xs, ys)
    return ds_train, ds_test, xt, yt, xs, ys


def leave_one_out_loss_changes(model: LogisticRegression, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                               y_test: torch.Tensor, weight_decay: float, rows=None) -> np.ndarray:
    """Actual change of each test loss when each training row is removed and the model retrained to its
    optimum (Newton, warm-started): ``(len(rows), num_test)``. Positive = removal raised the test loss.

    The objective keeps the ``1/n`` weight of the remaining rows (``(1/n)Σ_{i≠z} ℓ_i + wd‖W‖²``), which is
    the ε = -1/n upweighting that influence functions linearise; renormalising by ``1/(n-1)`` would add
    the same shift to every row's change.
    """
    w0 = model.linear.weight.detach().to(x.dtype)
    n = len(y)
    with torch.no_grad():
        before = F.cross_entropy(x_test @ w0.T, y_test, reduction="none")
    rows = range(n) if rows is None else rows
    out = []
    for i in rows:
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        # (1/n)Σ_{i≠z} ℓ_i + wd‖W‖² = ((n-1)/n)·[mean_{i≠z} ℓ_i + (n/(n-1))·wd‖W‖²]
        w = _newton(w0, x[keep], y[keep], weight_decay * n / (n - 1))
        out.append((F.cross_entropy(x_test @ w.T, y_test, reduction="none") - before).numpy())
    return np.stack(out)
