"""The gradient index: per-example gradients sketched from module hooks equal the sketch of autograd's per-example
gradients (every architecture, embeddings included); the sketch keeps inner products on average."""

import numpy as np
import pytest
import torch

from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.gradient_index import CountSketch, _Recorder, sketched_gradients
from hf_fastif.hvp import batch_gradient
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import select_parameters
from tests.tiny import make_token_dataset, tiny_model


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2"])
def test_hooked_per_example_sketches_equal_autograd(kind, pad_collator):
    model = tiny_model(kind)
    data = make_token_dataset(6, seed=0)
    params = select_parameters(model, None)  # every parameter: embeddings, norms, linear layers, biases
    fm = FunctionalModel(model, list(params), weight_decay=0.01)
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(6))
    recorder = _Recorder(model, list(params))
    sketch = CountSketch({n: p.shape for n, p in params.items()}, 64, seed=0, factored=recorder.linear_weights(),
                         dtype=torch.float64)
    assert sketch.factors  # linear weights take the factored path
    got = sketched_gradients(fm, params, batch, sketch, recorder)
    want = sketch.project(batch_gradient(fm, params, batch, reduction="none"))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_sketch_keeps_inner_products_on_average():
    shapes = {"w": torch.Size([12, 10]), "b": torch.Size([12])}
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 132, dtype=torch.float64, generator=gen)
    estimates = []
    for seed in range(400):
        sketch = CountSketch(shapes, 16, seed, factored=["w"], dtype=torch.float64)
        pa, pb = sketch.project(torch.stack([a, b]))
        estimates.append(float(pa @ pb))
    error = abs(np.mean(estimates) - float(a @ b))
    assert error < 4 * np.std(estimates) / np.sqrt(len(estimates))  # unbiased within 4 standard errors
    with pytest.raises(ValueError, match="influence_projection_dim=0 must be between 1"):
        CountSketch(shapes, 0, 0)


class _AttentionModel(torch.nn.Module):
    """torch's nn.MultiheadAttention reads its out_proj's weight in F.multi_head_attention_forward, never calling
    out_proj (an nn.Linear) itself."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.classifier = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        from types import SimpleNamespace

        h = self.emb(input_ids)
        a, _ = self.attn(h, h, h)
        return SimpleNamespace(logits=self.classifier(a.mean(1)))


def test_weights_read_outside_their_layer_or_tied_get_their_whole_gradient(pad_collator):
    """Hooks see a layer's own calls only: nn.MultiheadAttention's out_proj weight (read functionally) got no
    per-example gradient (the index 0.93 off, other candidates, no warning), and GPT-2's embedding tied to its LM
    head (two owning modules) crashed the index build with a KeyError after s_test."""
    torch.manual_seed(0)
    model = _AttentionModel().double().eval()
    batch = {"input_ids": torch.randint(0, 30, (4, 6)), "labels": torch.tensor([0, 1, 1, 0])}
    cases = [(model, [r"attn\."], batch)]
    lm = tiny_model("gpt2-lm")
    data = make_token_dataset(4, seed=0).remove_columns("labels")
    from transformers import DataCollatorForLanguageModeling

    lm_batch = Batcher(data, validate_dataset(data, "d", lm), DataCollatorForLanguageModeling(
        pad_collator.tokenizer, mlm=False), "cpu").batch(range(4))
    cases += [(lm, None, lm_batch), (lm, [r"wte\."], lm_batch)]
    for model, patterns, rows in cases:
        params = select_parameters(model, patterns)
        fm = FunctionalModel(model, list(params))
        recorder = _Recorder(model, list(params))
        sketch = CountSketch({n: p.shape for n, p in params.items()}, 32, seed=0, factored=recorder.linear_weights(),
                             dtype=torch.float64)
        got = sketched_gradients(fm, params, rows, sketch, recorder)
        want = sketch.project(batch_gradient(fm, params, rows, reduction="none"))
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_the_hooks_check_keeps_good_hooks_and_sketches_what_autograd_gives(pad_collator):
    """The first-batch check compared the batch's summed gradients: at a converged model (sum ~0) float32 rounding
    failed it, and in bfloat16 it always failed: a warning and every layer on batched autograd (5x slower). It now
    compares the first and last rows. An embedding's padding row got a hooked gradient autograd does not give it
    (a Llama whose pad id is its eos, with real eos tokens), and BART's position tables, which compute their own
    rows, crashed the sketch."""
    from transformers import BartConfig, BartForSequenceClassification, LlamaConfig, LlamaForCausalLM

    cases = []
    bert = tiny_model("bert").to(torch.bfloat16)
    data = make_token_dataset(6, seed=0)
    cases.append((bert, None, Batcher(data, validate_dataset(data, "d", bert), pad_collator, "cpu").batch(range(6))))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=2, eos_token_id=2,
                                         bos_token_id=1, tie_word_embeddings=False)).double().eval()
    ids = torch.randint(5, 40, (4, 8))
    ids[:, 3] = 2  # a real eos inside the rows: the embedding's padding_idx
    cases.append((llama, None, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}))
    bart = BartForSequenceClassification(BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=40, pad_token_id=1,
        num_labels=2)).double().eval()
    ids = torch.randint(4, 40, (4, 6))
    ids[:, -1] = 2
    cases.append((bart, None, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(
        [0, 1, 1, 0])}))
    for model, patterns, batch in cases:
        params = select_parameters(model, patterns)
        fm = FunctionalModel(model, list(params))
        recorder = _Recorder(model, list(params))
        sketch = CountSketch({n: p.shape for n, p in params.items()}, 64, seed=0, factored=recorder.linear_weights(),
                             dtype=torch.float32 if model is bert else torch.float64)
        hooked = len(recorder.owned)
        got = sketched_gradients(fm, params, batch, sketch, recorder)
        assert recorder.verified and len(recorder.owned) >= hooked - 2  # (position tables: autograd, as before)
        if model is not bert:
            want = sketch.project(batch_gradient(fm, params, batch, reduction="none"))
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_tied_rows_do_not_cost_candidates():
    """Six identical rows tie in the middle of the ranking: the two ends' searches (ceil(k/2) and floor(k/2) deep)
    returned some of them twice, so k = N missed a row (recall@N 0.9) and k < N gave fewer than k rows."""
    from types import SimpleNamespace

    from hf_fastif.gradient_index import GradientIndex

    vectors = np.array([[0.0, 0.0]] * 6 + [[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]], dtype=np.float32)
    index = GradientIndex(SimpleNamespace(dtype=torch.float32, project=lambda v: v), vectors)
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for k in (10, 12):
        assert [rows.tolist() for rows in index.candidates(query, k)] == [list(range(10))] * 2
    for k in (9, 5, 3):
        for rows in index.candidates(query, k):
            assert len(rows) == k and len(set(rows.tolist())) == k
    helpful, *_ = index.candidates(query[:1], 5)
    assert {6, 7, 8, 9} <= set(helpful.tolist())  # both ends: the 2 largest and the 2 smallest g·s


def test_an_index_too_big_to_train_on_a_probe_is_still_counted_against_the_rows():
    """Beyond the 64 MB probe an untrained IVF4096 over 3,000 rows was accepted, and failed after s_test."""
    from hf_fastif.gradient_index import INDEX_PROBE_BYTES, check_index_factory

    assert 3000 * 6000 * 4 > INDEX_PROBE_BYTES
    for factory, rows, dim, needed in (("IVF4096,Flat", 3000, 6000, 4096), ("PQ8", 200, 100_000, 256),
                                       ("PCA64,IVF512,PQ8", 300, 60_000, 512)):
        with pytest.raises(ValueError, match=f"could not be built over {rows} rows.*needs at least {needed} rows"):
            check_index_factory(factory, rows, dim)
    check_index_factory("IVF64,Flat", 3000, 6000)  # enough rows: accepted
