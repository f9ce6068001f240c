"""The gradient index: per-example gradients sketched from module hooks equal the sketch of autograd's per-example
gradients (every architecture, embeddings included); the sketch keeps inner products on average."""

import faiss
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
    as_tuples = CountSketch({n: tuple(s) for n, s in shapes.items()}, 16, 3, factored=["w"], dtype=torch.float64)
    as_sizes = CountSketch(shapes, 16, 3, factored=["w"], dtype=torch.float64)  # (shapes given as plain tuples work)
    torch.testing.assert_close(as_tuples.project(torch.stack([a, b])), as_sizes.project(torch.stack([a, b])),
                               rtol=0, atol=0)


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


def test_an_index_factory_that_passed_is_not_probed_again(monkeypatch):
    """Every call probed the factory anew, drawing the candidates' shape of random numbers (2,000 x 8,192: 64 MB) even
    for a Flat index, which trains on nothing: 0.17 s of a 0.2 s later call of the Space's settings. A factory that
    passed is remembered for its shape; one that failed is refused again."""
    from hf_fastif.gradient_index import check_index_factory

    made = []
    factory = faiss.index_factory
    monkeypatch.setattr(faiss, "index_factory", lambda *args: made.append(args) or factory(*args))
    drawn = []

    class Numbers:
        def __init__(self, seed):
            self.rng = rng(seed)

        def standard_normal(self, shape, dtype=np.float64):
            drawn.append(shape)
            return self.rng.standard_normal(shape, dtype=dtype)

    rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", Numbers)
    for _ in range(3):
        check_index_factory("Flat", 2001, 8192)
    assert len(made) == 1 and drawn == [(8, 8192)]  # (the 8 rows added)
    check_index_factory("Flat", 2001, 4096)  # another shape: probed
    assert len(made) == 2
    for _ in range(2):
        with pytest.raises(ValueError, match="built over 100 rows .*at least as large as number of clusters"):
            check_index_factory("IVF128,Flat", 100, 16)


@pytest.mark.parametrize("failure", ["file size limit", "faiss error"])
def test_a_gradient_index_that_does_not_fit_leaves_the_saved_one(tmp_path, failure, monkeypatch):
    """faiss.write_index wrote in place: on a full disk it left a truncated gradient.faiss (over the one saved before,
    filling the disk) and raised a RuntimeError with a C++ trace. It is now written next to it and renamed into
    place; a failure removes the partial file and is an OSError naming the path and what to do."""
    import resource
    from types import SimpleNamespace

    import faiss

    from hf_fastif.gradient_index import GradientIndex

    sketch = SimpleNamespace(dtype=torch.float32, project=lambda v: v)
    small = GradientIndex(sketch, np.eye(4, 64, dtype=np.float32))
    path = tmp_path / "gradient.faiss"
    small.save(path)
    big = GradientIndex(sketch, np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if failure == "file size limit":  # a real failed write (EFBIG, as ENOSPC on a full disk); Python ignores SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    else:
        write_index = faiss.write_index

        def full_disk(index, name):
            write_index(small.index, name)  # part of it reached the file
            raise RuntimeError(f"Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:"
                               f"499: Error: 'ret == (size * 4)' failed: write error in {name}: 1024 != 16384 (No "
                               "space left on device)")

        monkeypatch.setattr(faiss, "write_index", full_disk)
    try:
        with pytest.raises(OSError, match=f"Could not write {path} \\((File too large|No space left on device)\\): "
                                          "free space on its disk"):
            big.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["gradient.faiss"]  # no partial file beside it
    assert GradientIndex.load(path, sketch).num_rows == 4  # the one saved before, whole
    big.save(path)
    assert GradientIndex.load(path, sketch).num_rows == 64


def test_the_gradient_index_build_holds_one_batch_of_sketches_at_a_time(pad_collator, monkeypatch):
    """Building the index kept every batch's sketched rows in a list, then their concatenation, then faiss's copy:
    a peak of 2.5-3x the N x D x 4 bytes the index is documented to take (N = 100,000, D = 1,024: +1,124 MB for a
    391 MB index). The rows now go into one preallocated array as each batch is sketched (+784 MB: the array and
    faiss's own copy), in the same order and with the same values."""
    import weakref

    import hf_fastif.gradient_index as G

    model = tiny_model("bert", dtype=torch.float32)
    data = make_token_dataset(40, seed=0)
    params = select_parameters(model, None)
    fm = FunctionalModel(model, list(params))
    batcher = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu")
    sketched, alive, most = G.sketched_gradients, [], [0]

    def tracked(*args, **kwargs):
        memory = sketched(*args, **kwargs).numpy().copy()  # the rows' memory, alive while a tensor or view holds it
        alive[:] = [ref for ref in alive if ref() is not None]  # earlier batches' rows still held by the build
        most[0] = max(most[0], len(alive))
        alive.append(weakref.ref(memory))
        return torch.from_numpy(memory)

    monkeypatch.setattr(G, "sketched_gradients", tracked)
    index = G.build_gradient_index(fm, params, batcher, dim=64, seed=0, batch_size=4)
    assert most[0] <= 1 and index.num_rows == 40
    recorder = G._Recorder(model, list(params))
    want = sketched(fm, params, batcher.batch(range(40)), G.sketch_of(params, recorder, 64, 0, torch.float32), recorder)
    np.testing.assert_allclose(index.index.reconstruct_n(0, 40), want.numpy(), rtol=1e-4, atol=1e-6)


def test_the_hooks_check_takes_a_nan_row_for_a_disagreement(pad_collator, monkeypatch):
    """A NaN in a hooked row is neither above nor below the check's tolerance: it must fail the check (and send the
    layers to autograd), not pass it."""
    import hf_fastif.gradient_index as G

    seen = []

    def spy(fm, params, batch, sketch, out, hooked):  # (out: the hooks' rows, completed in place afterwards)
        seen.append(((fm, params, batch, sketch, out.clone(), hooked), G._hooks_agree.__wrapped__(
            fm, params, batch, sketch, out, hooked)))
        return seen[-1][1]

    spy.__wrapped__ = G._hooks_agree
    monkeypatch.setattr(G, "_hooks_agree", spy)
    model = tiny_model("bert").double()
    data = make_token_dataset(4, seed=0)
    batch = Batcher(data, validate_dataset(data, "d", model), pad_collator, "cpu").batch(range(4))
    params = select_parameters(model, None)
    recorder = _Recorder(model, list(params))
    sketch = CountSketch({n: p.shape for n, p in params.items()}, 64, seed=0, factored=recorder.linear_weights(),
                         dtype=torch.float64)
    sketched_gradients(FunctionalModel(model, list(params)), params, batch, sketch, recorder)
    assert recorder.verified and len(seen) == 1 and seen[0][1]  # the hooks' rows as the check saw them: agreed
    fm, params, batch, sketch, out, hooked = seen[0][0]
    broken = out.clone()
    broken[-1, 3] = float("nan")
    assert not spy.__wrapped__(fm, params, batch, sketch, broken, hooked)
