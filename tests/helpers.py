"""Helpers shared by several test modules that are not tiny model or data builders (those, and the usual
influence-parameter selections, are in `tests.tiny`): a small table of known signs, influence from an explicit
Hessian, and the settings and runner of the stacked (`hf_fastif.stacked`) and grouped (`hf_fastif.grouped_products`)
LiSSA tests."""

import numpy as np
import torch
import torch.nn.functional as F

from hf_fastif import InfluenceArguments, InfluenceEngine, InfluenceTable
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.params import flatten, select_parameters, unflatten
from tests.tiny import make_token_dataset, tiny_model


def sign_table() -> InfluenceTable:
    """test 0: 2 negative and 8 positive values; test 1: ties, zeros and a NaN."""
    t0 = [-0.5, -2.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0]
    t1 = [-1.0, -1.0, 0.0, 0.0, 0.25, 0.25, 0.25, 2.0, float("nan")]
    return InfluenceTable.from_arrays([0] * len(t0) + [1] * len(t1),
                                      list(range(len(t0))) + list(range(len(t1))), t0 + t1)


def explicit_influence(model, names, train, test, collator, lam):
    """Influence from torch.autograd.functional.hessian of the mean training loss (float64)."""
    params = select_parameters(model, [f"^{n}$".replace(".", r"\.") for n in names])
    flat0 = flatten(params)
    tb = collator([train[i] for i in range(len(train))])
    sb = collator([test[i] for i in range(len(test))])

    def losses(flat, batch):
        out = torch.func.functional_call(model, unflatten(flat, params), args=(),
                                         kwargs={k: v for k, v in batch.items() if k != "labels"})
        return F.cross_entropy(out.logits, batch["labels"], reduction="none")

    hessian = torch.autograd.functional.hessian(lambda f: losses(f, tb).mean(), flat0)
    g_train = torch.autograd.functional.jacobian(lambda f: losses(f, tb), flat0)
    g_test = torch.autograd.functional.jacobian(lambda f: losses(f, sb), flat0)
    s = torch.linalg.solve(hessian + lam * torch.eye(len(flat0), dtype=flat0.dtype), g_test.T).T
    return -(s @ g_train.T).numpy(), torch.linalg.eigvalsh(hessian)


# ---- the stacked and grouped LiSSA tests (test_stacked, test_grouped_products)
ARGS = dict(influence_knn_k=None, influence_recursion_depth=12, influence_scale=50.0, influence_damping=0.05,
            influence_repetitions=4, influence_batch_size=2, disable_tqdm=True, influence_check_convergence=False)


def table_values(table) -> np.ndarray:
    return table.to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()


def run(model, train, test, collator, tmp_path, mode: str, engine=None, **settings):
    """``(influence values, diagnostics, engine)`` of one call, on a fresh engine (or ``engine``, whose own settings
    then hold)."""
    args = InfluenceArguments(output_dir=str(tmp_path), influence_stack_repetitions=mode, **(ARGS | settings))
    engine = engine or InfluenceEngine(model, args, data_collator=collator)
    table = engine.compute_influences(train, test)
    return table_values(table), table.metadata["diagnostics"], engine


def group_setup(kind: str, pad_collator, names, pad_token_inside: bool = False):
    model = tiny_model(kind, num_labels=3)
    data = make_token_dataset(6, seed=3, num_labels=3, min_len=3, max_len=9)  # rows of different lengths: padding
    if pad_token_inside:  # the padding id as a real, attended token: its embedding row gets no gradient there
        pad = model.config.pad_token_id
        data = data.map(lambda row: {"input_ids": row["input_ids"][:1] + [pad] + row["input_ids"][2:]})
    batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")
    params = select_parameters(model, names)
    return model, batcher, params
