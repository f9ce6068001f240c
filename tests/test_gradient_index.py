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
