"""The read-position cut (`hf_fastif.readout`): the last layer's per-position work runs only where the loss reads it.

Cut where the head reads the first token (BERT, RoBERTa, DistilBERT classifiers), never where it reads others
(GPT-2's last token, token classification, a causal LM, a loss over every token, layers shared across the stack);
and wherever it is cut, losses, gradients, Hessian-vector products and influence equal the uncut ones."""

import numpy as np
import pytest
import torch

from hf_fastif import InfluenceArguments, InfluenceEngine
from hf_fastif import trunk as T
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.hvp import batch_gradient, batch_hvp
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import select_parameters
from hf_fastif.readout import find_readout
from tests.tiny import TOP, longformer, make_token_dataset, tiny_model

CUT = {"bert": "bert.encoder.layer.1.attention.output (inputs)",
       "roberta": "roberta.encoder.layer.1.attention.output (inputs)",
       "distilbert": "distilbert.transformer.layer.1.sa_layer_norm"}


def batcher_for(model, pad_collator, n=12, seed=0):
    data = make_token_dataset(n, seed=seed, num_labels=3)
    return Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")


@pytest.mark.parametrize("kind", list(CUT))
@pytest.mark.parametrize("with_trunk", [False, True])
def test_the_cut_changes_no_derivative(kind, with_trunk, pad_collator):
    model = tiny_model(kind, num_labels=3)
    batcher = batcher_for(model, pad_collator)
    names = list(select_parameters(model, TOP[kind] if with_trunk else None))
    params = select_parameters(model, TOP[kind] if with_trunk else None)
    split = None
    if with_trunk:
        split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(range(4), trunk=False)))
        assert split is not None, reason
        batcher = batcher.with_trunk(T.TrunkCache(split, batcher, key="k"))
    fm = FunctionalModel(model, names, weight_decay=0.01, split=split)
    readout, reason = find_readout(fm, params, [batcher.batch(range(4))])
    assert readout is not None and readout.name == CUT[kind], reason
    cut = FunctionalModel(model, names, weight_decay=0.01, split=split, readout=readout)
    batch = batcher.batch([5, 0, 11, 3])  # rows of different lengths: padded
    last = T.layer_stacks(model)[0][1][-1]
    seen = []
    handle = last.register_forward_hook(lambda m, a, out: seen.append(T_len(out)))
    try:
        torch.testing.assert_close(cut.losses(params, batch), fm.losses(params, batch), rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
    assert seen == [1, batch["input_ids"].shape[1]]  # the cut layer returned one position, the whole one all
    if readout.inputs:  # BERT's, RoBERTa's: the attention's output projection (and its norm) ran at one position
        projection = last.attention.output.dense
        widths = []
        handle = projection.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
        try:
            cut.losses(params, batch)
        finally:
            handle.remove()
        assert widths == [1]
    torch.testing.assert_close(batch_gradient(cut, params, batch, reduction="none"),
                               batch_gradient(fm, params, batch, reduction="none"), rtol=1e-10, atol=1e-12)
    v = torch.randn(2, sum(p.numel() for p in params.values()), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch_hvp(cut, params, batch, v, reduction="sum"),
                               batch_hvp(fm, params, batch, v, reduction="sum"), rtol=1e-10, atol=1e-12)


def T_len(output):
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden.shape[1]


def test_heads_that_read_other_positions_are_not_cut(pad_collator):
    # GPT-2's classifier reads each row's last token
    model = tiny_model("gpt2", num_labels=3)
    batcher = batcher_for(model, pad_collator)
    params = select_parameters(model, None)
    readout, reason = find_readout(FunctionalModel(model, list(params)), params, [batcher.batch(range(4))])
    assert readout is None and "other positions" in reason
    # a loss over every token's output (a mean-pooled probe of the last layer) on a BERT
    model = tiny_model("bert", num_labels=3)
    wrapped = _HiddenStates(model)
    params = select_parameters(wrapped, None)

    def mean_pooled(outputs, batch):
        return outputs.hidden_states[-1].mean(1).pow(2).sum(1)

    readout, reason = find_readout(FunctionalModel(wrapped, list(params), mean_pooled), params, [batcher.batch(range(4))])
    assert readout is None and "other positions" in reason


def test_a_measurement_that_reads_other_positions_blocks_the_cut(pad_collator):
    wrapped = _HiddenStates(tiny_model("bert", num_labels=3))
    params = select_parameters(wrapped, None)
    probe = batcher_for(wrapped.inner, pad_collator).batch(range(4))
    assert find_readout(FunctionalModel(wrapped, list(params)), params, [probe])[0] is not None

    def last_token(outputs, batch):  # a test-side quantity read at the last position
        return outputs.hidden_states[-1][:, -1].sum(1)

    readout, reason = find_readout(FunctionalModel(wrapped, list(params), measurement_fn=last_token), params, [probe])
    assert readout is None and "other positions" in reason


class _HiddenStates(torch.nn.Module):
    """A model that also returns its hidden states (a loss may read them)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**kw, output_hidden_states=True)


def test_a_layer_shared_across_the_stack_is_not_cut(pad_collator):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, num_labels=3, attn_implementation="eager")
    model = AlbertForSequenceClassification(cfg).double().eval()
    params = select_parameters(model, None)
    readout, reason = find_readout(FunctionalModel(model, list(params)), params,
                                   [batcher_for(model, pad_collator).batch(range(4))])
    assert readout is None, readout


def test_token_classification_is_not_cut(pad_collator):
    from transformers import BertConfig, BertForTokenClassification, DataCollatorForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=3, attn_implementation="eager")
    model = BertForTokenClassification(cfg).double().eval()
    data = make_token_dataset(8, seed=0, num_labels=3)
    data = data.map(lambda r: {"labels": [t % 3 for t in r["input_ids"]]})
    collator = DataCollatorForTokenClassification(pad_collator.tokenizer)
    batcher = Batcher(data, validate_dataset(data, "train", model), collator, "cpu")
    params = select_parameters(model, None)
    readout, reason = find_readout(FunctionalModel(model, list(params)), params, [batcher.batch(range(4))])
    assert readout is None and "other positions" in reason


@pytest.mark.parametrize("solver", ["lissa", "exact"])
def test_influence_is_the_same_with_and_without_the_cut(solver, pad_collator, tmp_path):
    model = tiny_model("bert", num_labels=3)
    train = make_token_dataset(24, seed=0, num_labels=3)
    test = make_token_dataset(3, seed=7, num_labels=3)
    tables = {}
    for on in (True, False):
        args = InfluenceArguments(output_dir=str(tmp_path), influence_params=TOP["bert"], influence_solver=solver,
                                  influence_knn_k=None, influence_recursion_depth=20, influence_scale=50.0,
                                  influence_damping=0.05, influence_skip_unread_positions=on, disable_tqdm=True,
                                  influence_check_convergence=False)
        engine = InfluenceEngine(model, args, data_collator=pad_collator)
        table = engine.compute_influences(train, test)
        tables[on] = (table, table.metadata)
    cut, full = tables[True], tables[False]
    assert cut[1]["diagnostics"]["readout"] == {"cut_after": "bert.encoder.layer.1.attention.output (inputs)"}
    assert full[1]["diagnostics"]["readout"]["cut_after"] is None
    a = cut[0].to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()
    b = full[0].to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


class _MeanPooled(torch.nn.Module):
    """A sentence-transformers-style head: the mean of the last layer over the tokens, then a linear classifier."""

    def __init__(self, zero_head: bool):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(16, 3)
        if zero_head:
            torch.nn.init.zeros_(self.classifier.weight)

    def forward(self, input_ids=None, attention_mask=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return SequenceClassifierOutput(logits=self.classifier((hidden * mask).sum(1) / mask.sum(1)))


def test_a_head_that_reads_nothing_at_these_weights_is_not_cut(pad_collator):
    """A zero-initialised classifier over mean-pooled tokens: the loss's gradient is zero at every position, and
    the cut losses equal the uncut ones (logits = bias), yet the head reads every position. Undecided: not cut."""
    model = _MeanPooled(zero_head=True).double().eval()
    params = select_parameters(model, None)
    probe = [batcher_for(model, pad_collator).batch(range(4))]
    readout, reason = find_readout(FunctionalModel(model, list(params)), params, probe)
    assert readout is None and "at these weights" in reason
    with torch.no_grad():
        model.classifier.weight.normal_()
    readout, reason = find_readout(FunctionalModel(model, list(params)), params, probe)
    assert readout is None and "other positions" in reason


def test_the_engine_decides_again_when_the_weights_change(pad_collator, tmp_path):
    """A BERT classifier whose head starts at zero (undecided: no cut); once its weights change, the same engine
    (as InfluenceTrainer keeps it) cuts, and the numbers still equal the uncut ones."""
    model = tiny_model("bert", num_labels=3)
    with torch.no_grad():
        model.classifier.weight.zero_()
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(2, seed=7, num_labels=3)

    def arguments(on):
        return InfluenceArguments(output_dir=str(tmp_path), influence_params=TOP["bert"], influence_solver="exact",
                                  influence_knn_k=None, influence_damping=0.05, influence_scale=50.0,
                                  influence_skip_unread_positions=on, disable_tqdm=True,
                                  influence_check_convergence=False)

    engine = InfluenceEngine(model, arguments(True), data_collator=pad_collator)
    first = engine.compute_influences(train, test).metadata["diagnostics"]["readout"]
    assert first["cut_after"] is None and "at these weights" in first["reason"]
    with torch.no_grad():
        model.classifier.weight.normal_(std=0.3)
    table = engine.compute_influences(train, test)
    assert table.metadata["diagnostics"]["readout"] == {"cut_after": "bert.encoder.layer.1.attention.output (inputs)"}
    whole = InfluenceEngine(model, arguments(False), data_collator=pad_collator).compute_influences(train, test)
    a = table.to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()
    b = whole.to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_cut_that_fails_on_a_later_batch_falls_back_to_the_whole_layer(pad_collator, caplog):
    """Longformer pads every batch to a multiple of its attention window and drops that padding after the stack:
    a cut that passed on rows needing no padding fails on rows that do. That forward runs uncut (a warning), the
    cut is marked failed, and the values are the whole layer's; rows of mixed lengths among the probes refuse it
    from the start."""
    model = longformer()
    data = make_token_dataset(40, seed=0, num_labels=3)
    lengths = [len(x) for x in data["input_ids"]]
    eight = [i for i, n in enumerate(lengths) if n == 8][:4]
    shorter = [i for i, n in enumerate(lengths) if n in (5, 6, 7)][:4]
    assert len(eight) == 4 and len(shorter) == 4
    batcher = batcher_for(model, pad_collator, n=40)
    params = select_parameters(model, None)
    fm = FunctionalModel(model, list(params))
    readout, reason = find_readout(fm, params, [batcher.batch(eight)])
    assert readout is not None, reason
    cut = FunctionalModel(model, list(params), readout=readout)
    batch = batcher.batch(shorter)
    with caplog.at_level("WARNING"):
        values = cut.losses(params, batch)
    assert readout.failed is not None and "failed on a batch" in caplog.text
    torch.testing.assert_close(values, fm.losses(params, batch), rtol=1e-12, atol=1e-12)
    assert find_readout(fm, params, [batcher.batch(eight), batcher.batch(shorter[:1])])[0] is None


class _AssertsOnThreeCutRows(torch.nn.Module):
    """BertIntermediate that asserts, as model code does, on a batch of three rows at one position: the probes (4, 1
    and 2 rows) pass, a later 3-row batch fails only under the cut."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        assert hidden.shape[1] > 1 or hidden.shape[0] != 3, "three rows at one position"
        return self.inner(hidden)


def test_an_assertion_in_the_model_after_the_cut_falls_back_to_the_whole_layer(pad_collator, caplog):
    """An ``assert`` in the model's code that a cut forward trips (on a batch the probes did not show, or on a cut
    tried in `find_readout`) is the cut's failure like an IndexError: the forward runs whole and the cut is marked
    failed, not raised at the caller."""
    model = tiny_model("bert", num_labels=3)
    layer = model.bert.encoder.layer[-1]
    layer.intermediate = _AssertsOnThreeCutRows(layer.intermediate)
    batcher = batcher_for(model, pad_collator)
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params))
    readout, reason = find_readout(fm, params, [batcher.batch(range(4)), batcher.batch([0]), batcher.batch([0, 5])])
    assert readout is not None and readout.inputs, reason
    cut = FunctionalModel(model, list(params), readout=readout)
    batch = batcher.batch([1, 2, 3])
    with caplog.at_level("WARNING"):
        values = cut.losses(params, batch)
    assert readout.failed is not None and "three rows at one position" in readout.failed
    assert "at the inputs of bert.encoder.layer.1.attention.output failed on a batch" in caplog.text
    torch.testing.assert_close(values, fm.losses(params, batch), rtol=1e-12, atol=1e-12)
    # with a 3-row batch among the probes, the cuts before the assert are refused (no error reaches the caller), and
    # the first that gives one position after it is taken: after the output block (a cut after the intermediate
    # block meets the residual at every position)
    readout, reason = find_readout(fm, params, [batcher.batch(range(3))])
    assert readout is not None and readout.name == "bert.encoder.layer.1.output", reason


class _WithMemory(torch.nn.Module):
    """BERT's attention output block given a third argument, a (batch, 7, hidden) memory of fixed length: on a batch
    padded to 7 positions it has the shape of the block's positions."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, input_tensor, memory):
        return self.inner(hidden_states, input_tensor) + memory.mean(1, keepdim=True)


def test_a_cut_at_inputs_cuts_the_arguments_it_cut_on_the_probes_only(pad_collator, caplog):
    """A cut at a block's inputs keeps position 0 of the arguments that had the positions' shape on the probe rows.
    A later batch where another argument has that shape too (a fixed-length memory as long as the batch's padding)
    does not get that argument cut: the forward runs whole, the cut is marked failed, the values are the whole
    layer's."""
    import types

    memory_length = 7
    model = tiny_model("bert", num_labels=3)
    attention = model.bert.encoder.layer[-1].attention
    attention.memory = torch.nn.Parameter(torch.randn(1, memory_length, model.config.hidden_size,
                                                      dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    attention.output = _WithMemory(attention.output)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        context, weights = self.self(hidden_states, attention_mask=attention_mask, **kwargs)
        memory = self.memory.expand(hidden_states.shape[0], -1, -1)
        return self.output(context, hidden_states, memory), weights

    attention.forward = types.MethodType(forward, attention)
    data = make_token_dataset(40, seed=0, num_labels=3)
    lengths = [len(x) for x in data["input_ids"]]
    batcher = batcher_for(model, pad_collator, n=40)
    params = select_parameters(model, [r"layer\.1\.", "classifier", "pooler"])
    fm = FunctionalModel(model, list(params))
    probes = [i for i, n in enumerate(lengths) if n != memory_length][:4]
    readout, reason = find_readout(fm, params, [batcher.batch(probes), batcher.batch(probes[:1])])
    assert readout is not None and readout.name == "bert.encoder.layer.1.attention.output (inputs)", reason
    assert readout.arguments == ((0, 1), ())
    cut = FunctionalModel(model, list(params), readout=readout)
    shorter = batcher.batch([i for i, n in enumerate(lengths) if n == memory_length - 1][:3])
    torch.testing.assert_close(cut.losses(params, shorter), fm.losses(params, shorter), rtol=1e-12, atol=1e-12)
    assert readout.failed is None
    as_long = batcher.batch([i for i, n in enumerate(lengths) if n == memory_length][:3])
    assert as_long["input_ids"].shape[1] == memory_length
    with caplog.at_level("WARNING"):
        values = cut.losses(params, as_long)
    torch.testing.assert_close(values, fm.losses(params, as_long), rtol=1e-12, atol=1e-12)
    assert readout.failed is not None and "not ((0, 1), ())" in readout.failed and "failed on a batch" in caplog.text


def test_an_error_before_the_cut_is_raised_and_leaves_the_cut_in_place(pad_collator):
    """A token id outside the vocabulary fails in the embeddings, before the cut: the error is the caller's and is
    raised as it is; the cut is not blamed (it stays usable); out of memory inside a cut forward is raised too."""
    from tests.tiny import VOCAB

    model = tiny_model("bert", num_labels=3)
    batcher = batcher_for(model, pad_collator)
    params = select_parameters(model, TOP["bert"])
    readout, _ = find_readout(FunctionalModel(model, list(params)), params, [batcher.batch(range(4))])
    cut = FunctionalModel(model, list(params), readout=readout)
    bad = batcher.batch(range(4))
    bad["input_ids"][0, 1] = VOCAB + 5
    with pytest.raises(IndexError):
        cut.losses(params, bad)
    assert readout.failed is None
    real = model.classifier.forward
    model.classifier.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    try:
        with pytest.raises(torch.OutOfMemoryError):
            cut.losses(params, batcher.batch(range(4)))
    finally:
        model.classifier.forward = real
    assert readout.failed is None


def test_a_cut_dropped_during_a_call_is_recorded_in_the_table(pad_collator, tmp_path, caplog, monkeypatch):
    """Longformer: the probe rows (the first 64, all 8 tokens: no internal padding) pass; the last rows (5 tokens)
    make the cut fail during scoring. The values are the uncut ones and the table's diagnostics say what happened.
    (The probes now take the shortest and longest rows of the whole dataset, which catch these rows up front: they
    are turned off here so that a batch the probes miss can be simulated.)"""
    from datasets import concatenate_datasets

    from hf_fastif.batches import Batcher

    monkeypatch.setattr(Batcher, "padding_probes", lambda self, probe_rows=64: [])

    model = longformer()
    train = concatenate_datasets([make_token_dataset(66, seed=0, num_labels=3, min_len=8, max_len=8),
                                  make_token_dataset(6, seed=1, num_labels=3, min_len=5, max_len=5)])
    test = make_token_dataset(2, seed=7, num_labels=3, min_len=8, max_len=8)
    values, diagnostics = {}, {}
    for on in (True, False):
        args = InfluenceArguments(output_dir=str(tmp_path), influence_params=[r"encoder\.layer\.1\.output\.",
                                                                             r"classifier\."],
                                  influence_solver="exact", influence_knn_k=None, influence_damping=1.0,
                                  influence_scale=10.0, influence_skip_unread_positions=on, disable_tqdm=True,
                                  influence_check_convergence=False, influence_scoring_batch_size=6,
                                  influence_trunk_cache=False)
        table = InfluenceEngine(model, args, data_collator=pad_collator).compute_influences(train, test)
        values[on] = table.to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy()
        diagnostics[on] = table.metadata["diagnostics"]["readout"]
    assert diagnostics[True]["cut_after"] == "longformer.encoder.layer.1.attention.output (inputs)"
    assert "IndexError" in diagnostics[True]["failed_on_a_batch"]
    np.testing.assert_allclose(values[True], values[False], rtol=1e-9, atol=1e-12)
    monkeypatch.undo()  # the real probes: the 5-token rows are probed, and the cut is not made
    args.influence_skip_unread_positions = True
    table = InfluenceEngine(model, args, data_collator=pad_collator).compute_influences(train, test)
    assert table.metadata["diagnostics"]["readout"]["cut_after"] is None
    assert "failed_on_a_batch" not in table.metadata["diagnostics"]["readout"]


class _Mixing(torch.nn.Module):
    """BertIntermediate plus the mean over positions: not per position, so cutting before it is wrong."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        return self.inner(hidden + hidden.mean(1, keepdim=True))


@pytest.mark.parametrize("confidence", [1.0, 1e5, 3e5])
def test_tiny_losses_and_gradients_do_not_let_a_wrong_cut_through(confidence, pad_collator):
    """A last layer whose feed-forward mixes positions, on rows the model fits confidently (labels = its own
    predictions, the classifier scaled up): the losses and gradients of the probes are tiny or vanish. The cut must
    never land before the mixing (it is compared relative to the gradients' own size), and where the gradients
    vanish altogether nothing is decided; an accepted cut gives the uncut per-example gradients on every row."""
    model = tiny_model("bert", num_labels=3)
    layer = model.bert.encoder.layer[-1]
    layer.intermediate = _Mixing(layer.intermediate)
    with torch.no_grad():
        model.classifier.weight.mul_(confidence)
        model.classifier.bias.zero_()
    data = make_token_dataset(12, seed=0, num_labels=3)
    batch = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu").batch(range(12))
    with torch.no_grad():
        predicted = model(**T.model_inputs(batch)).logits.argmax(-1).tolist()
    data = data.map(lambda row, i: {"labels": predicted[i]}, with_indices=True)
    batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params))
    readout, reason = find_readout(fm, params, [batcher.batch(range(4)), batcher.batch([0]), batcher.batch([0, 5])])
    if confidence == 3e5:
        assert readout is None and "vanish" in reason
        return
    assert readout is not None and readout.name == "bert.encoder.layer.1.output", reason
    batch = batcher.batch(range(12))
    torch.testing.assert_close(batch_gradient(FunctionalModel(model, list(params), readout=readout), params, batch,
                                              reduction="none"),
                               batch_gradient(fm, params, batch, reduction="none"), rtol=1e-9, atol=0)


class _NotFiniteAlone(torch.nn.Module):
    """BertIntermediate whose output is NaN when it sees one position only: a cut before it turns every loss and
    gradient of the probes into NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        out = self.inner(hidden)
        return out * float("nan") if hidden.shape[1] == 1 else out


def test_a_cut_that_gives_nan_is_not_taken_for_one_that_agrees(pad_collator):
    """A NaN compared with a tolerance is neither above nor below it: the cut's check reads it as a difference
    (`hf_fastif.utils.relative_difference`), so the cut lands after the layer that cannot run on one position."""
    model = tiny_model("bert", num_labels=3)
    layer = model.bert.encoder.layer[-1]
    layer.intermediate = _NotFiniteAlone(layer.intermediate)
    data = make_token_dataset(12, seed=0, num_labels=3)
    batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")
    params = select_parameters(model, TOP["bert"])
    fm = FunctionalModel(model, list(params))
    readout, reason = find_readout(fm, params, [batcher.batch(range(4)), batcher.batch([0]), batcher.batch([0, 5])])
    assert readout is not None and readout.name == "bert.encoder.layer.1.output", reason
    batch = batcher.batch(range(12))
    cut = batch_gradient(FunctionalModel(model, list(params), readout=readout), params, batch, reduction="none")
    assert torch.isfinite(cut).all()
    torch.testing.assert_close(cut, batch_gradient(fm, params, batch, reduction="none"), rtol=1e-9, atol=0)


def test_a_loss_of_ones_own_is_not_cut_where_the_outputs_hold_positions(pad_collator, tmp_path):
    """A loss_fn reading the last layer's states at a marker token, on rows the probes do not include, was cut on
    the probes' evidence: ``hidden_states[-1]`` then held one position, which the loss broadcast against its
    marker mask (influence 1.6% off on the marked rows, without a word) or indexed past (an IndexError from inside
    the loss), in a review. With a loss_fn or measurement_fn of one's own, the cut is made only where the model's
    outputs hold nothing per position: not here, and the values are the uncut ones; a loss of one's own that reads
    the logits of a model that returns only them is still cut."""
    import torch.nn.functional as F
    from datasets import Dataset

    mark = 3  # (in no row but the marked ones)

    def broadcasts(outputs, batch):
        states, marker = outputs.hidden_states[-1], (batch["input_ids"] == mark).to(torch.float64)[..., None]
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") + 0.5 * (
            (states * marker).sum(1) ** 2).sum(-1)

    def indexes(outputs, batch):
        at = (batch["input_ids"] == mark).to(torch.int64).argmax(1)
        weight = 1 + torch.sigmoid(3 * outputs.hidden_states[-1][torch.arange(len(at)), at][:, 0])
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") * weight

    model = tiny_model("bert", num_labels=3)
    model.config.output_hidden_states = True
    rows = make_token_dataset(24, seed=0, num_labels=3).to_dict()
    for i in range(12, 18):  # (not the probes: the first 4 rows, the shortest and the longest)
        rows["input_ids"][i][2] = mark
    train, test = Dataset.from_dict(rows), make_token_dataset(2, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_solver="lissa", influence_recursion_depth=10,
                              influence_scale=1e4, disable_tqdm=True, influence_check_convergence=False,
                              influence_knn_k=None, influence_trunk_cache=False)
    uncut = InfluenceArguments(**{**args.to_dict(), "influence_skip_unread_positions": False})
    for loss_fn in (broadcasts, indexes):
        expected = InfluenceEngine(model, uncut, data_collator=pad_collator, loss_fn=loss_fn).compute_influences(
            train, test)
        table = InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss_fn).compute_influences(
            train, test)
        np.testing.assert_allclose(table.to_pandas().influence, expected.to_pandas().influence, rtol=1e-9,
                                   atol=1e-14)
        readout = table.metadata["diagnostics"]["readout"]
        assert readout["cut_after"] is None and "hidden_states" in readout["reason"], readout
    # what counts as per position: states, attentions, (b, s) scores; not a classifier's (b, classes) logits
    from hf_fastif.readout import per_position_outputs

    b, s = 2, 5
    assert per_position_outputs({"logits": torch.zeros(b, 3), "loss": torch.zeros(b, s, 2)}, s) == []
    assert per_position_outputs({"logits": torch.zeros(b, 3), "attentions": (torch.zeros(b, 2, s, s),)},
                                s) == [("attentions", 0)]
    assert per_position_outputs((torch.zeros(()), torch.zeros(b, s)), s) == [(1,)]
    # a loss of one's own that reads the logits alone is cut, whether or not the model returns its hidden states, and
    # where a probe batch is as wide as the classifier has classes (the rows here are 4-9 tokens long)
    for hidden, labels in ((True, 3), (False, 3), (False, 9)):
        net = tiny_model("bert", num_labels=labels)
        net.config.output_hidden_states = hidden
        rows = Dataset.from_dict({**train.to_dict(), "labels": [i % labels for i in range(len(train))]})
        table = InfluenceEngine(net, args, data_collator=pad_collator, loss_fn=lambda o, batch: F.cross_entropy(
            o.logits, batch["labels"], reduction="none", label_smoothing=0.1)).compute_influences(rows, test)
        assert table.metadata["diagnostics"]["readout"]["cut_after"] == CUT["bert"], (hidden, labels)
