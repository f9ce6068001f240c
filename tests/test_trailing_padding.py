"""Rows stored padded (``padding="max_length"``) are collated without the positions after every row's last token,
where the engine's probe finds the loss the same without them; the influence is the one with the padding kept."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_fastif import InfluenceEngine, compute_influences
from hf_fastif.batches import without_trailing_padding
from hf_fastif.influence import default_arguments
from tests.tiny import make_token_dataset, tiny_model

WIDTH = 24
EXACT = dict(influence_solver="exact", influence_damping=5.0, influence_scale=1.0, influence_knn_k=None,
             disable_tqdm=True)
LISSA = dict(influence_solver="lissa", influence_damping=0.05, influence_scale=500.0, influence_recursion_depth=6,
             influence_batch_size=2, influence_repetitions=2, influence_knn_k=6, disable_tqdm=True)


def stored_padded(dataset: Dataset, width: int = WIDTH, label_pad: int | None = None) -> Dataset:
    """Every row padded to ``width`` as stored (pad id 0, mask 0; sequence labels padded with ``label_pad``)."""
    def pad(row):
        extra = width - len(row["input_ids"])
        out = {"input_ids": row["input_ids"] + [0] * extra, "attention_mask": row["attention_mask"] + [0] * extra}
        if isinstance(row["labels"], list):
            out["labels"] = row["labels"] + [label_pad] * extra
        return out
    return dataset.map(pad)


def influence_values(table) -> np.ndarray:
    return table.to_pandas().sort_values(["test_id", "train_id"]).influence.to_numpy()


class Widths:
    """The widths of the batches the model's embeddings see."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: self.seen.append(args[0].shape[-1]))

    def close(self):
        self.handle.remove()


# --- the cut itself ---------------------------------------------------------------------------------------------

def test_a_batch_keeps_the_positions_up_to_its_widest_row():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(10).reshape(2, 5), "attention_mask": mask,
             "token_type_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1]),
             "embeddings": torch.ones(2, 5, 7), "name": "kept"}
    cut = without_trailing_padding(batch)
    assert cut["input_ids"].tolist() == [[0, 1, 2], [5, 6, 7]]
    assert cut["attention_mask"].shape == cut["token_type_ids"].shape == (2, 3)
    assert cut["embeddings"].shape == (2, 3, 7)  # (laid out like the mask, with a dimension after)
    assert cut["labels"] is batch["labels"] and cut["name"] == "kept"
    # multiple choice: (rows, choices, positions), the widest choice of any row decides
    choices = {"input_ids": torch.ones(2, 3, 6, dtype=torch.long),
               "attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0]] * 5 + [[1, 1, 1, 1, 0, 0]]).reshape(2, 3, 6)}
    assert without_trailing_padding(choices)["input_ids"].shape == (2, 3, 4)


@pytest.mark.parametrize("case", ["no trailing padding", "a target in a cut position", "ambiguous", "float mask",
                                  "no mask"])
def test_a_batch_whose_cut_could_change_what_is_read_is_left_as_it_is(case):
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask}
    if case == "no trailing padding":
        batch["attention_mask"] = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])  # (a left-padded row, say)
    elif case == "a target in a cut position":
        batch["labels"] = torch.tensor([[3, 4, -100, 5], [3, -100, -100, -100]])
    elif case == "ambiguous":
        batch["pair_scores"] = torch.ones(2, 4, 4)  # (positions × positions: which dimension to cut?)
    elif case == "float mask":
        batch["attention_mask"] = mask.float()
    else:
        del batch["attention_mask"]
    assert without_trailing_padding(batch) is batch
    # targets only where the mask is 1: the labels are cut with the rest
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask,
             "labels": torch.tensor([[3, 4, -100, -100], [3, -100, -100, -100]])}
    assert without_trailing_padding(batch)["labels"].tolist() == [[3, 4], [3, -100]]


# --- the engine -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [None, [r"encoder\.layer\.1\.", r"pooler", r"classifier"]],
                         ids=["every parameter", "a cached trunk"])
def test_rows_stored_padded_give_the_influence_of_rows_stored_unpadded(pad_collator, params):
    """A tiny BERT (float64; LiSSA and kNN candidates, seeded alike) on rows stored padded to 24 positions: with the
    padding skipped (the default) the model sees batches no wider than their widest row once the probe has decided
    (only the checks before it see the stored width), and the influence equals the one with every padded position
    kept and the one of the same rows stored unpadded (collated with dynamic padding)."""
    model = tiny_model("bert", num_labels=2)
    train, test = make_token_dataset(16, seed=0, max_len=12), make_token_dataset(3, seed=1, max_len=12)
    padded_train, padded_test = stored_padded(train), stored_padded(test)
    args = default_arguments(**LISSA, influence_params=params)
    values, widths = {}, {}
    for name, skip, data in [("skipped", True, (padded_train, padded_test)),
                             ("kept", False, (padded_train, padded_test)), ("unpadded", True, (train, test))]:
        seen = Widths(model)
        try:
            table = compute_influences(model, *data, replace(args, influence_skip_trailing_padding=skip),
                                       data_collator=pad_collator)
        finally:
            seen.close()
        values[name], widths[name] = influence_values(table), seen.seen
        if name != "unpadded":
            diagnostics = table.metadata["diagnostics"]["trailing_padding"]
            assert diagnostics == ({"train_dataset": "skipped", "test_dataset": "skipped"} if skip else
                                   {"train_dataset": "kept: influence_skip_trailing_padding=False",
                                    "test_dataset": "kept: influence_skip_trailing_padding=False"})
    assert np.abs(values["kept"]).max() > 0
    np.testing.assert_allclose(values["skipped"], values["kept"], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(values["skipped"], values["unpadded"], rtol=1e-9, atol=1e-13)
    assert set(widths["kept"]) == {WIDTH}
    assert set(widths["skipped"]) - set(range(1, 13)) == {WIDTH}  # (12: the rows' longest)
    # two forwards see the stored width: a check before the probe, and the probe's batch with its padding
    assert widths["skipped"].count(WIDTH) == 2 and len(widths["skipped"]) > 10


def token_classifier():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, attn_implementation="eager")).double().eval()


def token_rows(n: int, seed: int) -> Dataset:
    """Rows stored padded, a label per token (-100 at the padding)."""
    rows = make_token_dataset(n, seed=seed, max_len=10)
    return stored_padded(rows.map(lambda r: {"labels": [t % 3 for t in r["input_ids"]]}), label_pad=-100)


def test_token_labels_padded_with_minus_100_are_cut_with_the_rows(pad_collator):
    """A token classifier whose stored labels are -100 at the padding: cut with the rows, the same influence."""
    model = token_classifier()
    train, test = token_rows(12, 0), token_rows(2, 1)
    args = default_arguments(**EXACT, influence_params=[r"classifier"])
    seen = Widths(model)
    try:
        skipped = compute_influences(model, train, test, args, data_collator=pad_collator)
    finally:
        seen.close()
    kept = compute_influences(model, train, test, replace(args, influence_skip_trailing_padding=False),
                              data_collator=pad_collator)
    assert skipped.metadata["diagnostics"]["trailing_padding"]["train_dataset"] == "skipped"
    assert set(seen.seen) - set(range(1, 11)) == {WIDTH} and seen.seen.count(WIDTH) == 2  # (as above)
    np.testing.assert_allclose(influence_values(skipped), influence_values(kept), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("position", [-1, WIDTH - 1], ids=["the last position", "a position by number"])
def test_a_loss_that_reads_the_padding_keeps_it(pad_collator, position):
    """A loss of one's own that reads the logits at a padded position of rows stored padded: without the padding it
    would read another position (-1) or fail (23 of a narrower batch), so the probe keeps every batch's padding,
    and the influence is the one with the padding kept."""
    model = token_classifier()
    train, test = token_rows(12, 0), token_rows(2, 1)

    def padded_position(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits[:, position], batch["labels"][:, 0],
                                                 reduction="none")

    args = default_arguments(**EXACT, influence_params=[r"classifier"])
    tables = [compute_influences(model, train, test, replace(args, influence_skip_trailing_padding=skip),
                                 data_collator=pad_collator, loss_fn=padded_position) for skip in (True, False)]
    reason = tables[0].metadata["diagnostics"]["trailing_padding"]["train_dataset"]
    assert reason.startswith("kept: the loss or logits of rows" if position < 0 else "kept: rows")
    assert ("change by" if position < 0 else "raise IndexError") in reason and "without their trailing" in reason
    np.testing.assert_allclose(influence_values(tables[0]), influence_values(tables[1]), rtol=1e-12, atol=0)
    assert np.abs(influence_values(tables[0])).max() > 0


def test_a_held_engine_decides_once_and_lissa_agrees(pad_collator):
    """The decision is kept per model, data and functions (one probe over later calls), and LiSSA over rows stored
    padded gives the values of the same rows stored unpadded (the same seeded batches, the same products)."""
    model = tiny_model("bert", num_labels=2)
    train, test = make_token_dataset(20, seed=0, max_len=12), make_token_dataset(2, seed=1, max_len=12)
    padded_train, padded_test = stored_padded(train), stored_padded(test)
    args = default_arguments(**LISSA)
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        probes = []
        original = engine._skips_padding

        def counted(call, batcher, measurement, key):
            probes.append(key in engine._trailing_padding)
            return original(call, batcher, measurement, key)

        engine._skips_padding = counted
        first = influence_values(engine.compute_influences(padded_train, padded_test))
        again = influence_values(engine.compute_influences(padded_train, padded_test))
        assert probes == [False, False, True, True]  # (training and test rows: decided on the first call only)
    unpadded = influence_values(compute_influences(model, train, test, args, data_collator=pad_collator))
    np.testing.assert_allclose(first, again, rtol=1e-12, atol=0)
    np.testing.assert_allclose(first, unpadded, rtol=1e-7, atol=1e-12)
