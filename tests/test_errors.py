"""Bad input: each a clear error naming the fix, raised before expensive work."""

import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_fastif import InfluenceArguments, InfluenceEngine, compute_influences
from hf_fastif.influence import default_arguments
from hf_fastif.solvers import LissaDivergenceError
from tests.tiny import TOP, VOCAB, make_token_dataset, tiny_model

FAST = dict(influence_solver="cg", influence_damping=0.05, influence_scale=20.0, influence_knn_k=None,
            influence_params=[r"classifier\."], disable_tqdm=True)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("bert"), make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)


def test_untokenized_dataset(setup, pad_collator):
    model, train, test = setup
    text = Dataset.from_dict({"sentence": ["a b", "c d"], "labels": [0, 1]})
    with pytest.raises(ValueError, match="tokenize them first"):
        compute_influences(model, train, text, default_arguments(**FAST), data_collator=pad_collator)


def test_not_a_dataset(setup):
    model, train, _ = setup
    with pytest.raises(TypeError, match="Dataset.from_list"):
        compute_influences(model, train, [{"input_ids": [1, 2]}], default_arguments(**FAST))


def test_empty_dataset(setup, pad_collator):
    model, train, test = setup
    with pytest.raises(ValueError, match="test_dataset is empty"):
        compute_influences(model, train, test.select([]), default_arguments(**FAST), data_collator=pad_collator)


def test_missing_labels(setup, pad_collator):
    model, train, test = setup
    with pytest.raises(ValueError, match=r"train_dataset has no `labels`.* as InfluenceTrainer\(influence_loss_fn="
                                         r"\.\.\.\) or compute_influences\(\.\.\., loss_fn=\.\.\.\)"):
        compute_influences(model, train.remove_columns("labels"), test, default_arguments(**FAST),
                           data_collator=pad_collator)


def test_rows_without_a_label_are_named(setup, pad_collator):
    """A labels column of None (test rows to explain, unlabelled) was blamed on padding: "Could not collate rows
    ... Rows of different lengths need a padding collator", with that collator given."""
    model, train, test = setup
    unlabelled = test.remove_columns("labels").add_column("labels", [None] * len(test))
    with pytest.raises(ValueError, match=r"test_dataset row 0 has no label \(None in its 'labels' column\)"):
        compute_influences(model, train, unlabelled, default_arguments(**FAST), data_collator=pad_collator)
    some = train.remove_columns("labels").add_column("labels", [*train["labels"][:3], None, *train["labels"][4:]])
    with pytest.raises(ValueError, match="train_dataset row 3 has no label"):
        compute_influences(model, some, test, default_arguments(**FAST), data_collator=pad_collator)


def test_two_label_columns_are_refused_as_ambiguous(setup, pad_collator):
    """'label' and 'labels' side by side: the checks read 'labels' while DataCollatorWithPadding trains on 'label' (a bad
    'label' came out as a bare IndexError from the loss; a bad 'labels' refused rows whose 'label' was fine)."""
    model, train, test = setup
    both = train.add_column("label", [1 - y for y in train["labels"]])
    ids = test.add_column("label_ids", [1 - y for y in test["labels"]])
    for data, which, removed in ((both, "train_dataset", "labels"), (ids, "test_dataset", "label_ids")):
        with pytest.raises(ValueError, match=rf"{which} has the label columns \['labels', 'label(_ids)?'\], with other "
                                             rf"values: .*remove_columns\(\['{removed}'\]\) keeps 'label"):
            compute_influences(model, data if which == "train_dataset" else train,
                               data if which == "test_dataset" else test, default_arguments(**FAST),
                               data_collator=pad_collator)
    same = train.add_column("label", train["labels"])  # (a copy, e.g. map(lambda r: {"labels": r["label"]})): no doubt
    expected = compute_influences(model, train, test, default_arguments(**FAST), data_collator=pad_collator)
    got = compute_influences(model, same, test, default_arguments(**FAST), data_collator=pad_collator)
    assert got.to_pandas().equals(expected.to_pandas())


def test_token_ids_in_another_column_are_named(setup, pad_collator):
    """input_ids renamed: the attention mask alone reached the collator, and the error said to drop it."""
    model, train, test = setup
    renamed = train.rename_column("input_ids", "ids")
    for collator in (None, pad_collator):
        with pytest.raises(ValueError, match=r"train_dataset has no 'input_ids' column, the model's input .*only "
                                             r"\['attention_mask'\] are there\)\. Is it 'ids'\? "
                                             r"dataset.rename_column\('ids', 'input_ids'\)"):
            compute_influences(model, renamed, test, default_arguments(**FAST), data_collator=collator)


def test_audio_inputs_in_another_column_are_named():
    """An audio classifier's input_values stored as 'input_features' (three-dimensional rows): the error path read a
    dtype the nested list feature lacks and raised a bare AttributeError; now it names the model's input and the
    rename."""
    import transformers
    from datasets import Dataset

    model = transformers.ASTForAudioClassification(transformers.ASTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2, max_length=16,
        num_mel_bins=8, patch_size=8, frequency_stride=8, time_stride=8)).eval()
    rng = np.random.default_rng(0)
    rows = Dataset.from_dict({"input_features": rng.standard_normal((4, 16, 8)).tolist(), "labels": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"train_dataset has no column the model takes as input .*The model's input "
                                         r"is 'input_values'\. Is it 'input_features'\? "
                                         r"dataset.rename_column\('input_features', 'input_values'\)"):
        compute_influences(model, rows, rows, default_arguments(**FAST))


def test_token_ids_stored_as_floats_are_named_with_the_cast(setup, pad_collator):
    """Float input_ids were blamed on padding ("Rows of different lengths need a padding collator: pass
    DataCollatorWithPadding"), with that collator given."""
    from datasets import Sequence, Value

    model, train, test = setup
    floats = train.cast_column("input_ids", Sequence(Value("float32")))
    with pytest.raises(ValueError, match=r"train_dataset's 'input_ids' column holds float values: .*must be "
                                         r"integers\. Cast them, e\.g\. dataset\.cast_column\('input_ids', "
                                         r"Sequence\(Value\('int64'\)\)\)"):
        compute_influences(model, floats, test, default_arguments(**FAST), data_collator=pad_collator)
    fixed = compute_influences(model, floats.cast_column("input_ids", Sequence(Value("int64"))), test,
                               default_arguments(**FAST), data_collator=pad_collator)
    assert np.isfinite(fixed.to_pandas().influence).all()
    ids = train["input_ids"]
    holed = train.remove_columns("input_ids").add_column("input_ids", [*ids[:3], [ids[3][0], None, *ids[3][2:]],
                                                                       *ids[4:]])
    with pytest.raises(ValueError, match=r"train_dataset row 3 has a missing token id \(None in its input_ids\)"):
        compute_influences(model, holed, test, default_arguments(**FAST), data_collator=pad_collator)


def test_string_labels_are_named_as_such(setup, pad_collator):
    model, train, test = setup
    words = train.map(lambda r: {"labels": ["no", "yes"][r["labels"]]})
    with pytest.raises(ValueError, match=r"'labels' column holds strings .*config.label2id"):
        compute_influences(model, words, test, default_arguments(**FAST), data_collator=pad_collator)


def test_boolean_labels_are_named_with_the_cast(setup, pad_collator):
    """True / False labels (what from_pandas gives a bool column) failed with torch's bare "expected target dtype to be
    Long or Byte, but got Bool"."""
    model, train, test = setup
    flags = train.map(lambda r: {"label": bool(r["labels"])}, remove_columns="labels")
    assert flags.features["label"].dtype == "bool"
    with pytest.raises(ValueError, match=r"The 'label' column of train_dataset holds booleans .*cast_column\('label', "
                                         r"Value\('int64'\)\)"):
        compute_influences(model, flags, test, default_arguments(**FAST), data_collator=pad_collator)
    from datasets import Value

    fixed = compute_influences(model, flags.cast_column("label", Value("int64")), test, default_arguments(**FAST),
                               data_collator=pad_collator)
    assert np.isfinite(fixed.to_pandas().influence).all()


def test_one_label_id_per_row_with_the_default_collator_is_named(setup, pad_collator):
    """A 'label_ids' column of one class id per row with transformers' default_data_collator (which reads
    'label_ids' as a list per row) failed with a bare "'int' object is not subscriptable" from inside the collator;
    a padding collator takes it, and a collator's TypeError that the rename does not cure is left as it is (the
    first version named the rename for any TypeError on such rows: a review's repro)."""
    from transformers import default_data_collator

    model, train, test = setup
    same_length = make_token_dataset(20, seed=0, min_len=6, max_len=6)
    ids = same_length.rename_column("labels", "label_ids")
    with pytest.raises(ValueError, match=r"'label_ids' column holds one value per row .*rename_column\('label_ids', "
                                         r"'labels'\)"):
        compute_influences(model, ids, ids.select([0]), default_arguments(**FAST), data_collator=default_data_collator)
    renamed = ids.rename_column("label_ids", "labels")
    fixed = compute_influences(model, renamed, renamed.select([0]), default_arguments(**FAST),
                               data_collator=default_data_collator)
    padded = compute_influences(model, ids, ids.select([0]), default_arguments(**FAST), data_collator=pad_collator)
    np.testing.assert_allclose(padded.to_pandas().influence, fixed.to_pandas().influence, rtol=1e-10, atol=0)

    def broken(features):  # (a bug of its own: renaming the column does not help, so its error comes as it is)
        raise TypeError("a collator's own bug")

    for rows in (train, ids):
        with pytest.raises(TypeError, match="a collator's own bug"):
            compute_influences(model, rows, rows.select([0]), default_arguments(**FAST), data_collator=broken)


def test_ragged_rows_without_padding_collator(setup):
    model, train, test = setup
    with pytest.raises(ValueError, match="DataCollatorWithPadding"):
        compute_influences(model, train, test, default_arguments(**FAST))


@pytest.mark.usefixtures("propagating")
def test_a_lissa_batch_larger_than_the_training_set_is_warned_of(setup, pad_collator, caplog):
    """B 30 over 20 rows: every step's batch holds rows twice (a helper's new-user trial: B 100 over 40 rows ran
    without a word); the influence is still finite, from batches that weigh every row alike over the steps."""
    model, train, test = setup
    with caplog.at_level(logging.WARNING):
        table = compute_influences(model, train, test, default_arguments(
            **(FAST | {"influence_solver": "lissa", "influence_batch_size": 30})), data_collator=pad_collator)
    assert "influence_batch_size=30 is more than the 20 training rows" in caplog.text
    assert "influence_batch_size=20 or less" in caplog.text
    assert np.isfinite(table.to_pandas().influence).all()


@pytest.mark.usefixtures("propagating")
def test_k_larger_than_the_training_set_is_clamped_with_a_warning(setup, pad_collator, caplog):
    model, train, test = setup
    with caplog.at_level(logging.WARNING):
        table = compute_influences(model, train, test, default_arguments(**(FAST | {"influence_knn_k": 500})),
                                   data_collator=pad_collator)
    assert "exceeds the 20 candidate rows" in caplog.text
    assert len(table) == 2 * 20
    assert table.metadata["settings"]["influence_knn_k_used"] is None


def test_params_matching_nothing(setup, pad_collator):
    model, train, test = setup
    with pytest.raises(ValueError, match="matches no parameter.*bert.embeddings"):
        compute_influences(model, train, test, default_arguments(**(FAST | {"influence_params": ["nope"]})),
                           data_collator=pad_collator)


@pytest.mark.usefixtures("propagating")
def test_a_pattern_matching_nothing_next_to_others_is_named(pad_collator, caplog):
    """A typo in one of several patterns ran silently on what the others select (a warning, not a refusal: a list
    written for several architectures may miss a part on one of them, as the paper's `pooler` on RoBERTa)."""
    from hf_fastif.params import select_parameters

    with caplog.at_level(logging.WARNING):
        chosen = select_parameters(tiny_model("bert"), [r"classifier\.", r"encoder\.layers\.1\."])
    assert list(chosen) == ["classifier.weight", "classifier.bias"]
    assert r"['encoder\\.layers\\.1\\.'] match no parameter of BertForSequenceClassification" in caplog.text


@pytest.mark.parametrize(
    "field,value,match",
    [("influence_solver", "newton", "use one of lissa, cg, exact"),
     ("influence_scale", 0.0, "influence_scale must be a finite number > 0"),
     # infinite damping / scale made s_test 0 and every influence 0 without a word; an infinite CG tolerance ran 0
     # iterations (the same zeros); a NaN / inf L2 term failed later as an "overflow"; a string met a bare TypeError
     ("influence_damping", float("inf"), "influence_damping must be a finite number >= 0, got inf"),
     ("influence_scale", float("inf"), "influence_scale must be a finite number > 0"),
     ("influence_cg_tol", float("inf"), "influence_cg_tol must be a finite number > 0"),
     ("influence_weight_decay", float("nan"), "influence_weight_decay must be a finite number >= 0, got nan"),
     ("influence_weight_decay", -0.1, "influence_weight_decay must be a finite number >= 0"),
     ("influence_damping", "0.01", r"influence_damping must be a number >= 0, got '0.01' \(str\)"),
     ("influence_knn_k", 0, "influence_knn_k must be a whole number >= 1, or None"),
     ("influence_knn_k", 2.5, r"influence_knn_k must be a whole number >= 1, or None .* got 2\.5"),
     ("influence_recursion_depth", 10.5, "influence_recursion_depth must be a whole number >= 1, got 10.5"),
     ("influence_params", ["("], "not a valid regex"),
     ("influence_knn_features", "max", "use one of auto"),
     ("influence_repetitions", 0, "influence_repetitions must be a whole number >= 1"),
     # numpy refused a negative seed after s_test (lissa, arnoldi); damping >= 2 blamed the scale
     ("influence_seed", -1, "influence_seed must be a whole number >= 0, got -1"),
     ("influence_damping", 2.0, r"influence_damping=2 is >= 2: LiSSA's step multiplies the iterate by \(1 - damping\)"),
     # undamped LiSSA on a singular Hessian returned 7% of the answer without a word; a number among the patterns met
     # re.compile's bare TypeError
     ("influence_damping", 0.0, r"influence_damping=0 with influence_solver='lissa'.*influence_solver='exact' or 'cg' "
                                r"\(undamped, where the test gradient lies in the Hessian's range"),
     ("influence_params", [r"classifier\.", 5], r"influence_params entries are regexes \(strings\); got 5 \(int\)")],
)
def test_invalid_arguments(field, value, match):
    with pytest.raises(ValueError, match=match):
        InfluenceArguments(output_dir="unused", report_to="none", **{field: value})


def test_unknown_combine(setup, pad_collator):
    model, train, test = setup
    with pytest.raises(ValueError, match="combine='sum' is unknown"):
        compute_influences(model, train, test, default_arguments(**FAST), combine="sum", data_collator=pad_collator)


def test_sdpa_attention_is_switched_to_eager_and_back(pad_collator):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, attn_implementation="sdpa")
    model = BertForSequenceClassification(cfg).double()
    assert model.config._attn_implementation == "sdpa"
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**(FAST | {"influence_params": None}))
    table = compute_influences(model, train, test, args, data_collator=pad_collator)
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_model("bert")
    eager.load_state_dict(model.state_dict())
    expected = compute_influences(eager, train, test, args, data_collator=pad_collator)
    torch.testing.assert_close(torch.tensor(table.to_pandas().influence.values),
                               torch.tensor(expected.to_pandas().influence.values), rtol=1e-8, atol=1e-12)


def test_sdpa_inside_a_plain_module_and_in_each_part_of_a_composite_is_switched_and_restored(pad_collator):
    """Only the top module's attention was read: a transformers model inside a plain nn.Module (a head of one's own
    on an AutoModel backbone) kept SDPA, and the first HVP failed with torch's "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"; a composite model (an SDPA
    encoder, an eager decoder) got the top's setting back on every part (the decoder came back "sdpa")."""
    from torch import nn
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertLMHeadModel,
        BertModel,
        EncoderDecoderModel,
    )

    from hf_fastif.mode import influence_mode

    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    torch.manual_seed(0)
    inner = BertForSequenceClassification(BertConfig(**small, attn_implementation="sdpa")).double()
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**(FAST | {"influence_params": [r"encoder\.layer\.1\.", r"classifier\."]}))
    got = compute_influences(Wrapped(inner), train, test, args, data_collator=pad_collator)
    assert inner.config._attn_implementation == "sdpa"
    eager = BertForSequenceClassification(BertConfig(**small, attn_implementation="eager")).double()
    eager.load_state_dict(inner.state_dict())
    expected = compute_influences(Wrapped(eager), train, test, args, data_collator=pad_collator)
    np.testing.assert_allclose(got.to_pandas().influence.values, expected.to_pandas().influence.values,
                               rtol=1e-9, atol=1e-12)

    one_layer = dict(small, num_hidden_layers=1)
    composite = EncoderDecoderModel(
        encoder=BertModel(BertConfig(**one_layer, attn_implementation="sdpa")),
        decoder=BertLMHeadModel(BertConfig(**one_layer, is_decoder=True, add_cross_attention=True,
                                           attn_implementation="eager")))
    with influence_mode(composite, []):
        assert composite.encoder.config._attn_implementation == "eager"
    assert composite.encoder.config._attn_implementation == "sdpa"
    assert composite.decoder.config._attn_implementation == "eager"


def test_a_plain_module_exposing_its_backbones_config_is_switched_with_it():
    """A head of one's own that sets ``self.config = backbone.config`` (as PEFT and Trainer code expect) was refused
    ("uses attn_implementation='sdpa'"), though switching its SDPA backbone switches that very config; one whose
    config no transformers model inside holds is still refused."""
    import copy

    from torch import nn
    from transformers import BertConfig, BertModel

    from hf_fastif.mode import influence_mode

    class Head(nn.Module):
        def __init__(self, config=None):
            super().__init__()
            self.backbone = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32,
                                                 max_position_embeddings=32, attn_implementation="sdpa"))
            self.config = self.backbone.config if config is None else config

    head = Head()
    with influence_mode(head, []):
        assert head.backbone.config._attn_implementation == "eager"
    assert head.backbone.config._attn_implementation == "sdpa"
    other = Head()
    other.config = copy.deepcopy(other.backbone.config)  # (a copy: switching the backbone does not reach it)
    with pytest.raises(ValueError, match="Head uses attn_implementation='sdpa'"):
        with influence_mode(other, []):
            pass
    assert other.backbone.config._attn_implementation == "sdpa"


def test_lissa_refuses_a_scale_below_the_top_eigenvalue(setup, pad_collator):
    model, train, test = setup
    args = default_arguments(**(FAST | {"influence_solver": "lissa", "influence_scale": 0.01,
                                        "influence_damping": 1.0, "influence_recursion_depth": 50}))
    with pytest.raises(LissaDivergenceError, match=r"too small.*influence_scale >= "):
        compute_influences(model, train, test, args, data_collator=pad_collator)


def test_lissa_detects_divergence_when_the_check_is_off(setup, pad_collator):
    model, train, test = setup
    args = default_arguments(**(FAST | {"influence_solver": "lissa", "influence_scale": 0.01,
                                        "influence_damping": 1.0, "influence_recursion_depth": 200,
                                        "influence_check_convergence": False}))
    with pytest.raises(LissaDivergenceError, match="LiSSA diverged at step"):
        compute_influences(model, train, test, args, data_collator=pad_collator)


@pytest.mark.usefixtures("propagating")
def test_a_recursion_too_short_for_its_damping_is_warned(setup, pad_collator, caplog):
    """J 5 at damp 0.01 returned s_test 44% off the exact solve without a word (a review's repro): J·damp well below
    1 is named, with the depth that reaches the paper's J·damp = 5; a converging depth is not."""
    model, train, test = setup
    lissa = FAST | {"influence_solver": "lissa", "influence_damping": 0.0123, "influence_scale": 20.0,
                    "influence_check_convergence": False}
    logging.Logger.warning_once.cache_clear()  # (transformers' once per process: other tests may have said it)
    for depth in (500, 3):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            table = compute_influences(model, train, test, default_arguments(**(lissa | {
                "influence_recursion_depth": depth})), data_collator=pad_collator)
        # the share left out is in the table's diagnostics, warned of or not
        assert table.metadata["diagnostics"]["lissa_truncation_share"] == pytest.approx(
            (1 - 0.0123) ** (depth + 1), rel=1e-9)
        if depth == 500:  # (1 - 0.0123)^501 = 0.2%
            assert "LiSSA stops" not in caplog.text
    assert ("influence_recursion_depth=3 with influence_damping=0.0123: LiSSA stops after J steps, where along "
            "directions of little curvature it has summed only 5% of its series (up to 95% of s_test missing there)"
            in caplog.text)
    assert "raise influence_recursion_depth to 407" in caplog.text


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_indefinite_hessian_is_reported(pad_collator, solver):
    """A random-init BERT is not at a minimum: its Hessian over layer 1 + head has negative eigenvalues."""
    model = tiny_model("bert")
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**(FAST | {"influence_solver": solver, "influence_damping": 1e-6,
                                        "influence_scale": 1.0,
                                        "influence_params": TOP["bert"]}))
    with pytest.raises(ValueError, match="not positive definite.*raise influence_damping"):
        compute_influences(model, train, test, args, data_collator=pad_collator)


def test_exact_refuses_too_many_parameters(pad_collator):
    model = tiny_model("bert")
    train, test = make_token_dataset(4, seed=0), make_token_dataset(1, seed=1)
    from hf_fastif.solvers import exact

    old, exact.MAX_EXACT_PARAMS = exact.MAX_EXACT_PARAMS, 100  # raised before any gradient is computed
    try:
        with pytest.raises(ValueError, match="Use influence_solver='cg' or 'lissa'"):
            compute_influences(model, train, test, default_arguments(**(FAST | {"influence_solver": "exact",
                                                                               "influence_params": None})),
                               data_collator=pad_collator)
    finally:
        exact.MAX_EXACT_PARAMS = old


def _with(dataset: Dataset, row: int, **values) -> Dataset:
    """``dataset`` with ``values`` at ``row`` (a column it lacks, token_type_ids, is zeros on the other rows)."""
    def edit(r, i):
        return values if i == row else {k: r[k] if k in r else [0] * len(r["input_ids"]) for k in values}

    return dataset.map(edit, with_indices=True)


def test_a_test_set_of_empty_rows_only_is_named_as_empty(setup, pad_collator):
    """Every row's input_ids empty: Arrow types the column list<null> (no value to type it by), and the dtype check
    asked for a cast, which then led to the empty-row message (a helper's new-user trial)."""
    model, train, _ = setup
    empty = Dataset.from_dict({"input_ids": [[]], "attention_mask": [[]], "labels": [0]})
    with pytest.raises(ValueError, match=r"test_dataset row 0 has no tokens \(empty input_ids\)"):
        compute_influences(model, train, empty, default_arguments(**FAST), data_collator=pad_collator)


@pytest.mark.parametrize("which, edit, match", [
    ("train", dict(labels=7), r"train_dataset row 3 has label 7, but the model has 2 classes"),
    ("test", dict(labels=-100), r"test_dataset row 3 is labelled -100 \(ignored\): its loss is 0"),
    ("test", dict(input_ids=[1, 5, VOCAB + 3], attention_mask=[1, 1, 1]),
     rf"test_dataset row 3 has token id {VOCAB + 3}, but the model's input embeddings hold {VOCAB} tokens"),
    ("test", dict(input_ids=[1, 5, 6], attention_mask=[1, 1, 1], token_type_ids=[0, 1, 2]),
     r"test_dataset row 3 has token type 2, but the model has 2 \(config.type_vocab_size\)"),
    ("train", dict(input_ids=[1, -100, 5], attention_mask=[1, 1, 1]),
     r"train_dataset row 3 has token id -100: token ids .* cannot be negative"),
    ("train", dict(input_ids=[1] * 35, attention_mask=[1] * 35),
     r"train_dataset row 3 has a sequence of 35 tokens, more than the model's 32 positions.*max_length=32"),
    # an empty test row was scored from padding alone, its value depending on the rows batched with it
    ("test", dict(input_ids=[], attention_mask=[]), r"test_dataset row 3 has no tokens \(empty input_ids\)"),
    ("train", dict(input_ids=[], attention_mask=[]), r"train_dataset row 3 has no tokens"),
])
def test_bad_values_are_named_before_any_work(which, edit, match, setup, pad_collator, monkeypatch):
    """Labels out of range, a test row without a target, token ids of another tokenizer and rows longer than
    the position table: named by row before s_test (they failed deep in a forward after it, or gave zeros)."""
    model, train, test = setup
    train, test = (_with(train, 3, **edit), test) if which == "train" else (train, _with(
        make_token_dataset(4, seed=1), 3, **edit))

    def no_work(*_):
        raise AssertionError("the check came after the work")

    monkeypatch.setattr("hf_fastif.engine.InfluenceEngine._prepare", no_work)  # the first stage of any work
    with pytest.raises(ValueError, match=match):
        compute_influences(model, train, test, default_arguments(**FAST), data_collator=pad_collator)


def _head(kind: str):
    """A tiny float64 BERT with another head, and rows for it (token labels, choices, float targets)."""
    from transformers import (
        BertConfig,
        BertForMultipleChoice,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=32, attn_implementation="eager")
    rows = make_token_dataset(6, seed=0)
    if kind == "token":
        model = BertForTokenClassification(BertConfig(num_labels=3, **cfg))
        rows = rows.map(lambda r: {"labels": [-100] + [t % 3 for t in r["input_ids"][1:]]})
    elif kind == "choice":
        model = BertForMultipleChoice(BertConfig(**cfg))
        rows = rows.map(lambda r: {"input_ids": [r["input_ids"]] * 3, "attention_mask": [r["attention_mask"]] * 3,
                                   "labels": r["labels"]})
    elif kind == "regression":
        model = BertForSequenceClassification(BertConfig(num_labels=1, **cfg))
        rows = rows.map(lambda r: {"labels": float(r["labels"]) + 0.5})
    else:  # a multi-label classifier whose labels are lists of class ids (go_emotions' layout)
        model = BertForSequenceClassification(BertConfig(num_labels=6, problem_type="multi_label_classification", **cfg))
        rows = rows.map(lambda r: {"labels": [r["labels"] + 1]}, remove_columns="labels")
    return model.double().eval(), rows


@pytest.mark.parametrize("kind, edit, match", [
    ("token", dict(labels=[-100, 1, 7]), r"candidate_dataset row 2 has token label 7, but the model has 3 classes"),
    ("choice", dict(labels=5), r"candidate_dataset row 2 has label 5, but it has 3 choices"),
    ("choice", dict(labels=-1), r"candidate_dataset row 2 has label -1, but it has 3 choices"),
    ("regression", dict(labels=float("nan")), r"candidate_dataset row 2 has label nan: a NaN / inf target"),
    ("multi-label", None, r"train_dataset row 0 has labels \[\d\], but a sequence classifier's labels .*multi-hot"),
])
def test_bad_labels_of_other_heads_are_named_before_any_work(kind, edit, match, monkeypatch):
    """Token labels and multiple-choice labels out of range failed with a bare IndexError (after s_test when the
    row was a candidate); a NaN regression target failed as an 'overflow' after the Hessian, or turned the
    whole batch's gradient scores into NaN; lists of class ids as multi-label labels were blamed on padding."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    from tests.tiny import pad_collator_for_tests

    model, rows = _head(kind)
    tokenizer = pad_collator_for_tests().tokenizer
    collator = DataCollatorForTokenClassification(tokenizer) if kind == "token" else (
        None if kind == "choice" else DataCollatorWithPadding(tokenizer))
    if kind == "choice":  # equal lengths: no padding needed
        rows = rows.map(lambda r: {"input_ids": [ids[:4] for ids in r["input_ids"]],
                                   "attention_mask": [m[:4] for m in r["attention_mask"]]})
    candidates = rows if edit is None else rows.map(lambda r, i: edit if i == 2 else {}, with_indices=True)

    def no_work(*_):
        raise AssertionError("the check came after the work")

    monkeypatch.setattr("hf_fastif.engine.InfluenceEngine._prepare", no_work)
    with pytest.raises(ValueError, match=match):
        compute_influences(model, rows.select(range(4)) if edit is not None else rows, rows.select([0]),
                           default_arguments(**FAST | dict(influence_params=None)), data_collator=collator,
                           candidate_dataset=candidates)


@pytest.mark.usefixtures("propagating")
def test_a_multi_label_target_outside_0_1_is_warned(pad_collator, caplog):
    """A -100 in a multi-hot row (meant as "ignored") is a target value for binary cross-entropy: that row's influence
    came out ~30x larger, without a word (a review's repro). Warned once with its row; 0 / 1 and soft targets are not,
    nor lists of class ids, which are refused instead."""
    model = tiny_model("bert", num_labels=3)
    model.config.problem_type = "multi_label_classification"
    rows = make_token_dataset(6, seed=0).map(lambda r, i: {"labels": [1.0, 0.25, float(i % 2)]}, with_indices=True,
                                             remove_columns="labels")
    bad = rows.map(lambda r, i: {"labels": [1.0, -100.0, 0.0] if i in (2, 4) else r["labels"]}, with_indices=True)
    args = default_arguments(**FAST)
    with caplog.at_level(logging.WARNING):
        compute_influences(model, rows, rows.select([0]), args, data_collator=pad_collator)
        assert "multi-label target" not in caplog.text
        compute_influences(model, bad, rows.select([0]), args, data_collator=pad_collator)
    assert caplog.text.count("multi-label target") == 1
    assert ("train_dataset row 2 has the multi-label target -100, outside [0, 1]: binary cross-entropy reads it as a "
            "target value (-100 means 'ignored' only for class ids)" in caplog.text)


def test_integer_multi_hot_labels_without_a_problem_type_name_the_fix(pad_collator):
    model = tiny_model("bert", num_labels=4)
    rows = make_token_dataset(4, seed=0).map(lambda r: {"labels": [1, 0, r["labels"], 0]})
    with pytest.raises(ValueError, match=r"look like multi-hot rows.*problem_type = 'multi_label_classification'"):
        compute_influences(model, rows, rows.select([0]), default_arguments(**FAST), data_collator=pad_collator)


@pytest.mark.parametrize("make, match", [
    (lambda d: d.train_test_split(test_size=1), r"got DatasetDict; pass one of its datasets, e.g. data\['train'\]"),
    # a Trainer's eval_dataset as a dict of datasets got the "one row" hint
    (lambda d: {"dev": d, "ood": d}, r"got dict; pass one of its datasets, e.g. data\['dev'\]"),
    (lambda d: d[0], r"got dict; one row .*Dataset.from_list\(\[row\]\).*dataset.select\(\[i\]\)"),
    (lambda d: d[:2], r"got dict; a dict of columns .*Dataset.from_dict\(columns\)"),
    (lambda d: d.to_pandas(), r"got DataFrame; convert it with datasets.Dataset.from_pandas"),
    (lambda d: [d[0], d[1]], r"got list; a list of rows .*Dataset.from_list\(rows\)"),
])
def test_what_is_not_a_dataset_gets_the_conversion_it_needs(setup, make, match):
    model, train, test = setup
    with pytest.raises(TypeError, match=match):
        compute_influences(model, train, make(test), default_arguments(**FAST))


def test_untokenized_rows_name_both_texts_and_the_tokenizing_collator(setup):
    """Untokenized pairs: the hint tokenized the premise alone, and said datasets come tokenized "as the Trainer takes
    them", though a Trainer with remove_unused_columns=False trains with a collator that tokenizes at batch time."""
    model, train, _ = setup
    rows = Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "labels": [0]})
    with pytest.raises(ValueError, match=r"a collator that tokenizes text at batch time .* not supported.*"
                                         r"tokenizer\(b\['premise'\], b\['hypothesis'\]\)"):
        compute_influences(model, train, rows, default_arguments(**FAST))


def test_training_arguments_without_the_influence_settings_are_refused(setup):
    from transformers import TrainingArguments

    from hf_fastif import InfluenceEngine

    with pytest.raises(TypeError, match="args must be an InfluenceArguments"):
        InfluenceEngine(setup[0], TrainingArguments(output_dir="unused", report_to=[]))


def test_a_model_that_is_not_a_module_is_refused(setup):
    """``compute_influences(None, ...)`` (a model variable left unset) failed with an AttributeError from inside."""
    _, train, test = setup
    for model in (None, "bert-base-uncased"):
        with pytest.raises(TypeError, match=f"model must be a torch.nn.Module .*got {type(model).__name__}"):
            compute_influences(model, train, test, default_arguments(**FAST))


def test_an_unlabelled_test_row_is_fine_under_a_mean(setup, pad_collator):
    """Under combine="mean" a row labelled -100 adds nothing to the mean loss; the others still make s_test."""
    model, train, _ = setup
    test = _with(make_token_dataset(4, seed=1), 3, labels=-100)
    table = compute_influences(model, train, test, default_arguments(**FAST), data_collator=pad_collator,
                               combine="mean")
    assert len(table) == 20 and (table.to_pandas().influence != 0).any()


def test_a_selected_parameter_the_loss_does_not_use_is_named(setup, pad_collator):
    """A parameter the loss never reaches (here a module the forward never calls; in practice a pooler the head
    does not read) is named, with the fix, instead of autograd's 'Tensor at index N' error."""
    model, train, test = setup
    model.unused = torch.nn.Linear(2, 2)
    try:
        for solver in ("cg", "lissa"):
            args = default_arguments(**FAST | {"influence_params": [r"classifier\.", r"unused\."],
                                               "influence_solver": solver, "influence_recursion_depth": 5})
            with pytest.raises(ValueError, match=r"2 influence parameter\(s\) take no part in the loss's autograd "
                                                 r"graph: unused.weight, unused.bias.*Leave them out of influence_params"):
                compute_influences(model, train, test, args, data_collator=pad_collator)
    finally:
        del model.unused


def test_a_loss_that_is_nan_when_padded_is_named_as_such():
    """Llama's eager attention gives NaN for a left-padded row (its padding queries see no key), even with position
    ids: the error says the loss is not finite there and what to do, not that padding changed it by 'nan'."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.tiny import pad_collator_for_tests

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager")).double().eval()
    left = pad_collator_for_tests()
    left.tokenizer.padding_side = "left"

    def with_positions(features):
        batch = left(features)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return batch

    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(3, seed=1, num_labels=3)
    args = default_arguments(**FAST | {"influence_params": [r"^score\."]})
    with pytest.raises(ValueError, match=r"is not finite padded next to row .*pad on the right"):
        compute_influences(model, train, test, args, data_collator=with_positions)


def test_a_sliding_window_that_sees_only_padding_is_named_as_such(pad_collator):
    """Mistral's eager sliding-window attention gives NaN for a row padded on the right by the window or more (those
    padding positions see no key, and the next layer spreads the NaN into the row): the error named left padding
    and said to pad on the right, which the rows already were (a review's repro). It names the window now, and rows
    whose lengths differ by less than it give a finite table; a row NaN alone is not blamed on the window."""
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    model = MistralForSequenceClassification(MistralConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=32, num_labels=2, pad_token_id=0, sliding_window=3,
        attn_implementation="eager")).double().eval()
    args = default_arguments(**FAST | {"influence_params": [r"^score\."], "influence_damping": 0.5})
    ragged = make_token_dataset(12, seed=0, min_len=2, max_len=9)
    with pytest.raises(ValueError, match=r"is not finite padded .*config.sliding_window = 3.*differ by less than "
                                         r"the window") as err:
        compute_influences(model, ragged, ragged.select([0, 1]), args, data_collator=pad_collator)
    assert "pad on the right" not in str(err.value)
    alike = make_token_dataset(12, seed=0, min_len=4, max_len=6)  # (lengths within 2 of each other)
    table = compute_influences(model, alike, alike.select([0, 1]), args, data_collator=pad_collator)
    assert np.isfinite(table.to_pandas().influence).all()
    # a row NaN alone is not the window's doing (a review's repro blamed it): the message says to check the rows
    tested = {t for row in alike.select([0, 1])["input_ids"] for t in row}
    token = next(t for t in range(VOCAB - 1, 0, -1) if t not in tested)
    poisoned = alike.map(lambda r: {"input_ids": [r["input_ids"][0], token, *r["input_ids"][2:]]})  # (train only)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = 1e308
    with pytest.raises(ValueError, match=r"is not finite alone .*Check the rows' token ids") as err:
        compute_influences(model, poisoned, alike.select([0, 1]), args, data_collator=pad_collator)
    assert "sliding_window" not in str(err.value)


def test_a_collator_that_draws_at_random_is_refused(pad_collator):
    """DataCollatorForLanguageModeling(mlm=True) masks other tokens every time it collates a row: two identical
    calls gave tables that differed by more than their largest value, with a trunk warning at most. Refused before
    any work, naming the fix; the global random state is left as it was."""
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    tokenizer = pad_collator.tokenizer
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=32)).double().eval()
    train = make_token_dataset(8, seed=0, min_len=8, max_len=8).remove_columns("labels")
    masking = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="draws at random.*mask once"):
        compute_influences(model, train, train.select([0]), default_arguments(**(FAST | {"influence_params": [r"cls\."]})),
                           data_collator=masking)
    assert torch.equal(torch.get_rng_state(), state)
    # swapped into an engine that ran with a deterministic collator: the probe runs on every call, so it is seen
    engine = InfluenceEngine(model, default_arguments(**(FAST | {"influence_params": [r"cls\."],
                                                                  "influence_damping": 5.0})),
                             data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    engine.compute_influences(train, train.select([0]))
    engine.data_collator = masking
    with pytest.raises(ValueError, match="draws at random"):
        engine.compute_influences(train, train.select([0]))


@pytest.mark.parametrize("settings, match", [
    ({"influence_knn_features": "pooler"}, "'pooler' reads the first token's state .*causal.*Use 'last'"),
    ({"influence_knn_features": "cls"}, "attention is causal.*Use 'last'"),
    ({"influence_knn_index": "Foo"}, "influence_knn_index='Foo' could not be built over 20 rows"),
    ({"influence_knn_index": "IVF64,Flat"}, "an IVF index needs at least as many rows as lists"),
    ({"influence_knn_features": "gradient", "influence_projection_dim": 16, "influence_knn_index": "Foo"},
     "influence_knn_index='Foo' could not be built over 20 rows of 16"),
    ({"influence_knn_features": "gradient", "influence_projection_dim": 16, "influence_knn_index": "IVF64,Flat"},
     "an IVF index needs at least as many rows as lists"),
])
def test_candidate_settings_are_refused_before_s_test(settings, match, pad_collator, monkeypatch):
    """kNN candidates over model features do not read s_test, so they are found first: a feature or index setting
    that cannot work used to fail only after s_test had been computed (6 s of a 6.2 s call), with faiss's own
    message for an index string."""
    from hf_fastif.engine import InfluenceEngine

    def s_test_ran(self, call):
        raise AssertionError("s_test was computed before the candidates")

    monkeypatch.setattr(InfluenceEngine, "_s_test_of", s_test_ran)
    args = default_arguments(**(FAST | {"influence_knn_k": 3, "influence_params": [r"score\."]} | settings))
    with pytest.raises(ValueError, match=match):
        compute_influences(tiny_model("gpt2"), make_token_dataset(20, seed=0), make_token_dataset(2, seed=1), args,
                           data_collator=pad_collator)


def test_gradient_candidates_named_by_the_engines_features_are_checked_before_s_test(pad_collator, monkeypatch):
    """``InfluenceEngine(features="gradient")`` finds gradient candidates as ``influence_knn_features="gradient"``
    does, but skipped the index and projection checks that setting gets: a bad index failed after s_test."""
    from hf_fastif.engine import InfluenceEngine

    def s_test_ran(self, call):
        raise AssertionError("s_test was computed before the check")

    monkeypatch.setattr(InfluenceEngine, "_s_test_of", s_test_ran)
    args = default_arguments(**(FAST | {"influence_knn_k": 3, "influence_params": [r"score\."],
                                        "influence_projection_dim": 16, "influence_knn_index": "Foo"}))
    engine = InfluenceEngine(tiny_model("gpt2"), args, data_collator=pad_collator, features="gradient")
    with pytest.raises(ValueError, match="influence_knn_index='Foo' could not be built over 20 rows of 16"):
        engine.compute_influences(make_token_dataset(20, seed=0), make_token_dataset(2, seed=1))

def test_first_token_features_only_where_the_states_see_the_whole_row():
    """`cls` features read the first token's state (`pooler` and `auto` through a pooler too): on a decoder-only
    model with causal attention it sees that token alone (a review's GPT-2 LM: every row began with BOS, and rows 0-4
    were every test row's candidates, unsaid), so they are refused there
    (`test_candidate_settings_are_refused_before_s_test`); an encoder's, or an encoder-decoder's encoder states,
    which kNN reads, see every position."""
    from hf_fastif.knn import causal_states, check_feature_methods
    from tests.tiny import tiny_bart

    for kind, causal in (("bert", False), ("roberta", False), ("distilbert", False), ("gpt2", True),
                         ("gpt2-lm", True)):
        model = tiny_model(kind)
        assert causal_states(model) is causal, kind
        check_feature_methods(model, ["auto", "mean", "last", "gradient"])  # those read every position
    assert not causal_states(tiny_bart("BartForSequenceClassification"))  # (its decoder is causal: not read)
    check_feature_methods(tiny_bart("BartForSequenceClassification"), ["cls"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel's attention is causal"):
        check_feature_methods(tiny_model("gpt2-lm"), ["auto", "cls"])
    # marked by the config only (a BERT built as a decoder: its pooler reads the first state, so 'auto' is refused
    # too), or by nothing (BLOOM: found by the probe rows, its modes left as they were)
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BloomConfig,
        BloomForSequenceClassification,
    )

    decoder = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32, is_decoder=True))
    bloom = BloomForSequenceClassification(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2)).train()
    assert not any(getattr(m, "is_causal", False) for m in bloom.modules())  # (what the probe is for)
    for model, refused in ((decoder, ["auto", "pooler", "cls"]), (bloom, ["pooler", "cls"])):
        assert causal_states(model)
        for method in refused:
            with pytest.raises(ValueError, match=f"influence_knn_features='{method}' reads the first token's state"):
                check_feature_methods(model, [method])
    check_feature_methods(bloom, ["auto", "last", "mean"])
    assert bloom.training and all(m.training for m in bloom.modules())
    check_feature_methods(tiny_model("bert"), ["auto", "pooler", "cls"])  # (its pooler sees every position)
    from hf_fastif.knn import model_features

    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="has no pooler output; use influence_knn_features='cls' or 'mean'"):
        model_features(tiny_model("distilbert"), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "pooler")


def test_first_token_features_are_checked_once_per_weights(setup, pad_collator, monkeypatch):
    """The check (a probe forward where the model marks nothing causal) runs once per weights and feature methods in
    an engine, not on every call; new weights are checked again."""
    from hf_fastif.engine import core

    seen = []
    monkeypatch.setattr(core, "check_feature_methods", lambda model, methods: seen.append(list(methods)))
    _, train, test = setup
    model = tiny_model("bert")  # (its own: its weights change below)
    engine = InfluenceEngine(model, default_arguments(**(FAST | {"influence_knn_k": 5, "influence_knn_features": "cls"})),
                             data_collator=pad_collator)
    for _ in range(2):
        engine.compute_influences(train, test)
    assert seen == [["cls"]]
    with torch.no_grad():
        model.classifier.bias.add_(0.1)
    engine.compute_influences(train, test)
    assert seen == [["cls"], ["cls"]]


def test_a_model_whose_weights_were_never_loaded_is_named(setup, pad_collator):
    """Weights on the 'meta' device (built under init_empty_weights) failed with 'Cannot copy out of meta tensor'
    while the model was fingerprinted."""
    from transformers import AutoModelForSequenceClassification

    _, train, test = setup
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(tiny_model("bert").config)
    with pytest.raises(ValueError, match="on the 'meta' device: its weights were never loaded"):
        compute_influences(model, train, test, default_arguments(**FAST), data_collator=pad_collator)


def test_a_dataset_without_any_label_is_refused(setup, pad_collator):
    """Every training label -100: every loss 0, and the table came back all zeros without a word. Rows of
    class ids and of token labels alike; some unlabelled rows are fine (they take no part, as in training)."""
    model, train, test = setup
    args = default_arguments(**FAST)
    unlabelled = train.map(lambda r: {"labels": -100})
    with pytest.raises(ValueError, match="Every row of train_dataset is labelled -100"):
        compute_influences(model, unlabelled, test, args, data_collator=pad_collator)
    some = train.map(lambda r, i: {"labels": -100 if i % 2 else r["labels"]}, with_indices=True)
    table = compute_influences(model, some, test, args, data_collator=pad_collator)
    values = table.to_pandas()
    assert (values[values.train_id % 2 == 1].influence == 0).all() and (values.influence != 0).any()
    from hf_fastif.batches import check_values

    tokens = train.map(lambda r: {"labels": [-100] * len(r["input_ids"])})
    with pytest.raises(ValueError, match="Every row of d is labelled -100"):
        check_values(tokens, tokens.column_names, "d", tiny_model("gpt2-lm"))
    nested = train.map(lambda r: {"labels": [[0, 1]] * len(r["input_ids"])})  # per-token multi-hot: a loss_fn's
    check_values(nested, nested.column_names, "d", tiny_model("bert"), default_loss=False)


def test_the_collator_probe_compares_values_of_every_kind():
    """Nested dicts and lists of tensors, NaN, numpy arrays and objects that compare by identity are the same when
    collated twice by a deterministic collator; a changed value anywhere is not."""
    import numpy as np

    from hf_fastif.batches import _same_value

    def batch():
        return {"ids": torch.tensor([[1, 2]]), "target": torch.tensor([float("nan"), 1.0]),
                "patches": [torch.ones(2, 3), {"x": torch.zeros(1)}], "array": np.array([np.nan, 2.0]),
                "names": ["a", "b"], "weight": float("nan"), "tag": object()}

    first, second = batch(), batch()
    assert all(_same_value(first[k], second[k]) for k in first)
    second["patches"][1]["x"] = torch.ones(1)
    assert not _same_value(first["patches"], second["patches"])
    assert not _same_value(torch.tensor([1.0, float("nan")]), torch.tensor([float("nan"), 1.0]))
    assert not _same_value(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))  # another dtype


def test_a_collator_padding_beyond_the_position_table_is_refused(setup, pad_collator):
    """The stored rows fit the 32 positions, but a collator padding to a multiple of 64 made every batch 64 long:
    the model's own forward failed with a shape error. Refused before any work, naming the collator setting."""
    from transformers import DataCollatorWithPadding

    model, train, test = setup
    wide = DataCollatorWithPadding(pad_collator.tokenizer, pad_to_multiple_of=64)
    with pytest.raises(ValueError, match="pads the rows of train_dataset to 64 positions, more than the model's 32"):
        compute_influences(model, train, test, default_arguments(**FAST), data_collator=wide)

    # RoBERTa numbers real tokens only (pads take padding_idx): the same padding is harmless there, and runs
    roberta, rows = tiny_model("roberta"), make_token_dataset(12, seed=0)
    args = default_arguments(**(FAST | {"influence_solver": "exact"}))
    wide_table = compute_influences(roberta, rows, rows.select([0]), args, data_collator=wide)
    plain_table = compute_influences(roberta, rows, rows.select([0]), args, data_collator=pad_collator)
    assert wide.pad_to_multiple_of == 64 > roberta.config.max_position_embeddings
    np.testing.assert_allclose(wide_table.to_pandas().influence, plain_table.to_pandas().influence, rtol=1e-8)


def test_a_collator_that_overruns_the_position_table_only_on_long_rows_is_refused(setup, pad_collator):
    """The first rows are short and fit ``pad_to_multiple_of``'s padding; a long row further on is padded beyond the
    32 positions, and the model's forward failed there, after s_test. The longest stored row is collated alone
    up front, in the training, test and candidate data alike."""
    from datasets import concatenate_datasets
    from transformers import DataCollatorWithPadding

    model, train, test = setup
    rows = make_token_dataset(1, seed=5, min_len=30, max_len=30)
    long = concatenate_datasets([train, rows.cast(train.features)])
    every = DataCollatorWithPadding(pad_collator.tokenizer, pad_to_multiple_of=12)  # 30 tokens → 36 > 32
    assert every([long[i] for i in range(4)])["input_ids"].shape[-1] <= 32  # the first rows alone would pass
    for data, name in (((long, test, None), "train_dataset"), ((train, long, None), "test_dataset"),
                       ((train, test, long), "candidate_dataset")):
        with pytest.raises(ValueError, match=f"pads the rows of {name} to 36 positions, more than the model's 32"):
            compute_influences(model, data[0], data[1], default_arguments(**FAST), data_collator=every,
                               candidate_dataset=data[2])
    compute_influences(model, train, test, default_arguments(**FAST), data_collator=every)  # short rows: fine


def test_rows_of_stored_inputs_embeds_pass_the_collator_checks():
    """No ``input_ids`` column, so no longest row: the padding check has only the first rows (it crashed on None)."""
    rng = np.random.default_rng(0)

    def rows(n):
        return Dataset.from_dict({"inputs_embeds": [rng.normal(size=(5, 16)).tolist() for _ in range(n)],
                                  "attention_mask": [[1] * 5] * n, "labels": [i % 2 for i in range(n)]})

    for kind in ("bert", "gpt2"):
        args = default_arguments(**(FAST | {"influence_solver": "exact", "influence_params": [r"classifier|score"]}))
        table = compute_influences(tiny_model(kind), rows(8), rows(2), args)
        assert len(table) == 16 and np.isfinite(table.to_pandas().influence).all()


def test_a_packing_collator_is_refused(setup):
    """DataCollatorWithFlattening packs a batch into one row (padding-free): the trunk cache and the scores failed
    on shapes, far from the cause; on a classifier's labels it failed inside transformers with a bare TypeError
    ('int' object is not subscriptable). Refused by its class before any row is collated, and any other collator
    that packs rows by the batch it makes."""
    from transformers import DataCollatorWithFlattening

    args = default_arguments(**(FAST | {"influence_params": [r"ln_f\."]}))
    train, test = make_token_dataset(12, seed=0, causal=True), make_token_dataset(2, seed=1, causal=True)
    flattening = DataCollatorWithFlattening()
    with pytest.raises(ValueError, match="is a DataCollatorWithFlattening: it packs rows.*DataCollatorWithPadding"):
        compute_influences(tiny_model("gpt2-lm"), train, test, args, data_collator=flattening)
    model, cls_train, cls_test = setup
    with pytest.raises(ValueError, match="is a DataCollatorWithFlattening: it packs rows.*DataCollatorWithPadding"):
        compute_influences(model, cls_train, cls_test, default_arguments(**FAST), data_collator=flattening)
    with pytest.raises(ValueError, match="makes 4 rows of train_dataset into a batch of 1 row.*DataCollatorWithPadding"):
        compute_influences(tiny_model("gpt2-lm"), train, test, args,
                           data_collator=lambda rows: flattening(rows))  # (a function: only its batch shows it)


def test_rows_transformed_on_the_fly_or_streamed_are_refused_with_the_fix(setup, pad_collator):
    model, train, test = setup
    with pytest.raises(ValueError, match="transformed on the fly.*dataset.map\\(transform"):
        compute_influences(model, train.with_transform(lambda batch: batch), test, default_arguments(**FAST),
                           data_collator=pad_collator)
    with pytest.raises(ValueError, match="formatted as Arrow tables.*with_format\\(None\\)"):
        compute_influences(model, train.with_format("arrow"), test, default_arguments(**FAST),
                           data_collator=pad_collator)
    with pytest.raises(TypeError, match="got IterableDataset.*Dataset.from_generator"):
        compute_influences(model, train.to_iterable_dataset(), test, default_arguments(**FAST),
                           data_collator=pad_collator)


@pytest.mark.usefixtures("propagating")
def test_scores_that_are_not_finite_are_named(setup, pad_collator, caplog, tmp_path):
    """A float16 causal LM's gradients overflow on some rows: 16 of 24 values came back NaN without a word. They
    stay in the table (everything else was computed), named in a warning and in the diagnostics."""
    model, train, test = setup
    poisoned = Dataset.from_dict({"input_ids": [[1, 7, 8], [1, 2, 3, 4], [1, 9]],
                                  "attention_mask": [[1] * 3, [1] * 4, [1] * 2], "labels": [0, 1, 0]})

    def loss(outputs, batch):  # NaN for a candidate row holding token 2, which no training row holds
        ce = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")
        return ce * torch.where((batch["input_ids"] == 2).any(1), float("nan"), 1.0).to(ce.dtype)

    clean = Dataset.from_dict({k: [[t if t != 2 else 3 for t in row] for row in train[k]] if k == "input_ids"
                               else train[k] for k in train.column_names})
    with caplog.at_level(logging.WARNING):
        table = compute_influences(model, clean, test, default_arguments(**(FAST | {"influence_solver": "exact"})),
                                   data_collator=pad_collator, loss_fn=loss, candidate_dataset=poisoned)
    values = table.to_pandas().set_index(["test_id", "train_id"]).influence
    assert np.isnan(values.xs(1, level="train_id")).all() and np.isfinite(values.drop(1, level="train_id")).all()
    assert table.metadata["diagnostics"]["non_finite_scores"] == {"count": 2, "train_ids": [1], "num_train_ids": 1}
    assert "2 of 6 influence values are not finite, of candidate rows [1]" in caplog.text
    from hf_fastif import build_influence_table

    built = build_influence_table(model, clean, test, tmp_path / "build",
                                  default_arguments(**(FAST | {"influence_solver": "exact"})), shard_size=1,
                                  data_collator=pad_collator, loss_fn=loss, candidate_dataset=poisoned)
    assert built.metadata["diagnostics"]["non_finite_scores"] == {"count": 2, "train_ids": [1], "num_train_ids": 1}


def test_token_types_of_a_model_without_a_token_type_table_are_not_refused(pad_collator):
    """DeBERTa-v3 checkpoints have type_vocab_size 0 (no token type embeddings; the model ignores the ids), and their
    own tokenizer writes token_type_ids: every such row was refused ("has token type 0, but the model has 0 ...
    tokenized for another model"), so no DeBERTa-v3 model could be used."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, type_vocab_size=0, num_labels=2, pooler_hidden_size=16))
    train, test = (make_token_dataset(n, seed=s).map(lambda r: {"token_type_ids": [0] * len(r["input_ids"])})
                   for n, s in ((8, 0), (2, 1)))
    table = compute_influences(model, train, test, default_arguments(**(FAST | {"influence_solver": "cg",
                                                                             "influence_knn_k": None})),
                               data_collator=pad_collator)
    assert len(table) == 16 and np.isfinite(table.to_pandas().influence).all()


def _batch_mean(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])  # reduction="mean": one value


def _column(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")[:, None]


def _first_logit_sum(outputs, batch):
    return outputs.logits[:, 0].sum()


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_fn=_batch_mean), r"loss_fn must return .* shape \(batch_size,\) = \(\d+,\); it returned shape \(\)"),
    (dict(loss_fn=_column), r"loss_fn must return .*; it returned shape \(\d+, 1\).*squeeze"),
    (dict(measurement_fn=_first_logit_sum), r"measurement_fn must return .*; it returned shape \(\).*reduction='none'"),
], ids=["loss batch mean", "loss column", "measurement sum"])
def test_a_loss_function_without_one_value_per_row_is_named_before_any_work(kwargs, match, setup, pad_collator,
                                                                             monkeypatch):
    """A batch mean (cross_entropy's default reduction) failed with "IndexError: slice() cannot be applied to a 0-dim
    tensor" in the padding probe; a (batch_size, 1) column with autograd's shape mismatch in the test gradients,
    after the trunk and candidate stages had run."""
    model, train, test = setup

    def no_work(*_):
        raise AssertionError("the check came after the work")

    monkeypatch.setattr("hf_fastif.engine.InfluenceEngine._attach_trunks", no_work)  # the first stage after the probe
    with pytest.raises(ValueError, match=match):
        compute_influences(model, train, test, default_arguments(**FAST), data_collator=pad_collator, **kwargs)


def _nan_where_second_token(token: int):
    """A loss that is NaN (its gradient too) on the rows whose second token is ``token``."""
    import torch.nn.functional as F

    def loss(outputs, batch):
        values = F.cross_entropy(outputs.logits, batch["labels"], reduction="none")
        bad = batch["input_ids"][:, 1] == token
        return values * torch.where(bad, torch.full_like(values, float("nan")), torch.ones_like(values)).detach()
    return loss


@pytest.mark.parametrize("solver", ["cg", "lissa", "exact", "arnoldi"])
def test_a_training_row_whose_loss_is_nan_is_named(setup, pad_collator, solver):
    """Every solver met the NaN products and said to check "the training rows' losses", naming none of them (and cg
    told a float64 model to use a float32 copy): the rows are now found by one forward over the training set."""
    model, train, test = setup
    marker = VOCAB - 1
    train = _with(train, 13, input_ids=[1, marker, 5, 6], attention_mask=[1] * 4)
    assert [r[1] for r in train["input_ids"]].count(marker) == 1
    args = default_arguments(**FAST | {"influence_solver": solver, "influence_recursion_depth": 20,
                                       "influence_arnoldi_rank": 4, "influence_batch_size": 4})
    with pytest.raises(FloatingPointError, match=r"train_dataset rows \[13\] have a loss that is inf / NaN \(1 of 20 "
                                                 r"rows\).*Drop them") as refused:
        compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=_nan_where_second_token(marker))
    assert isinstance(refused.value, ValueError)  # (a refusal, as the command line reports them: in one line)


def test_a_bad_test_row_in_a_build_is_named_by_its_place_in_the_test_set(setup, pad_collator, tmp_path):
    """A build computes shards of test rows, each handed to the engine as a dataset of its own: the row was named by
    its place in its shard (row 1 for row 5)."""
    from hf_fastif import build_influence_table

    model, train, _ = setup
    marker = VOCAB - 1
    test = _with(make_token_dataset(8, seed=1), 5, input_ids=[1, marker, 5, 6], attention_mask=[1] * 4)
    with pytest.raises(FloatingPointError, match=r"The gradient of test rows \[5\] is not finite"):
        build_influence_table(model, train, test, tmp_path / "build", default_arguments(**FAST), shard_size=2,
                              data_collator=pad_collator, loss_fn=_nan_where_second_token(marker))
    assert sorted(p.name for p in (tmp_path / "build" / "shards").iterdir()) == ["shard-00000", "shard-00001"]


def test_a_collator_failing_on_one_row_is_named_with_that_row(setup, pad_collator):
    """Any error of a collator was read as a padding or column problem: "pass DataCollatorWithPadding" to a
    DataCollatorWithPadding, or "drop attention_mask" to a collator that failed once, naming no row."""
    model, train, test = setup
    marker = VOCAB - 1
    train = _with(train, 17, input_ids=[1, marker, 5, 6], attention_mask=[1] * 4)
    calls = []

    def picky(features):
        if any(f["input_ids"][1] == marker for f in features):
            raise RuntimeError("cannot read this row")
        return pad_collator(features)

    def flaky(features):
        calls.append(len(features))
        if len(calls) == 3:
            raise RuntimeError("lost its connection")
        return pad_collator(features)

    args = default_arguments(**FAST)
    with pytest.raises(ValueError, match=r"The data collator fails on train_dataset row 17 by itself \(RuntimeError: "
                                         r"cannot read this row\)"):
        compute_influences(model, train, test, args, data_collator=picky)
    with pytest.raises(ValueError, match=r"The data collator raised RuntimeError \(lost its connection\) on "
                                         r"(train|test)_dataset rows \[.*\] and batched the same rows when tried again"):
        compute_influences(model, train, test, args, data_collator=flaky)
    # a multiple-choice row whose choices differ in length fails by itself, for want of padding, not of its values:
    # the advice is still the head's padding collator (a review's repro: "look at that row's values")
    from transformers import BertConfig, BertForMultipleChoice

    torch.manual_seed(0)
    choices = BertForMultipleChoice(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                               attn_implementation="eager")).double().eval()

    def as_choices(r, i):
        ids = r["input_ids"]
        options = [ids, ids, ids] if i % 2 == 0 else [ids, ids[:-1], ids[:-2]]
        return {"input_ids": options, "attention_mask": [[1] * len(o) for o in options], "labels": r["labels"]}

    rows = make_token_dataset(8, seed=0).map(as_choices, with_indices=True)
    with pytest.raises(ValueError, match=r"pass data_collator=DataCollatorForMultipleChoice\(tokenizer\)"):
        compute_influences(choices, rows, rows.select([0]), args)


def test_a_damaged_row_or_a_float_among_class_ids_is_named_before_any_work(setup, pad_collator):
    """A row whose attention_mask is shorter than its input_ids was blamed on the column ("drop attention_mask"); one
    float label (2.5) made the column float, and the error spoke of multi-hot labels; neither named the row."""
    model, train, test = setup
    short = _with(train, 11, attention_mask=[1, 1])
    with pytest.raises(ValueError, match=r"train_dataset row 11 holds 2 attention_mask values for its \d+ input_ids"):
        compute_influences(model, short, test, default_arguments(**FAST), data_collator=pad_collator)
    labels = [float(v) for v in train["labels"]]
    labels[12] = 2.5
    floats = Dataset.from_dict({**train.to_dict(), "labels": labels})
    with pytest.raises(ValueError, match=r"train_dataset row 12 has label 2.5, not a class id: the model is a 2-class "
                                         "classifier"):
        compute_influences(model, floats, test, default_arguments(**FAST), data_collator=pad_collator)


@pytest.mark.usefixtures("propagating")
def test_a_token_loss_says_how_it_weighs_rows(setup, pad_collator, caplog):
    """Each row's mean token loss weighs rows alike where transformers' model loss (a Trainer's) weighs them by their
    labelled tokens: documented, and recorded for causal LMs, but said nowhere a user would see it (a review's token
    classifier: Spearman 0.25-0.56 between the two). Said once; not for a sequence classifier."""
    from transformers import BertConfig, BertForTokenClassification, DataCollatorForTokenClassification
    from transformers.utils import logging as hf_logging

    from hf_fastif.loss import TOKEN_WEIGHTING

    torch.manual_seed(0)
    tagger = BertForTokenClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, attn_implementation="eager")).double().eval()
    rows = make_token_dataset(10, seed=0).map(lambda r: {"labels": [i % 3 for i in range(len(r["input_ids"]))]})
    collator = DataCollatorForTokenClassification(pad_collator.tokenizer)
    said = TOKEN_WEIGHTING.format(kind="BertForTokenClassification")
    hf_logging.get_logger("hf_fastif.engine.core").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hf_fastif.engine.core"):
        compute_influences(setup[0], setup[1], setup[2], default_arguments(**FAST), data_collator=pad_collator)
        assert "Influence's default loss" not in caplog.text
        for test in (0, 1):
            compute_influences(tagger, rows, rows.select([test]), default_arguments(**FAST), data_collator=collator)
    assert caplog.text.count(said) == 1
