"""Gradient-space candidates (beyond the paper): the rows most likely to have the largest |influence| at either end.

Influence is an inner product, ``-∇L(z) · s_test``. A seeded count sketch ``P`` (each parameter hashed to one of
``D`` buckets with a random sign; ``E[(Pa)·(Pb)] = a·b``) keeps inner products, so a maximum-inner-product faiss
index over the sketched per-example training gradients ``P∇L(z)``, queried with ``+P s_test``, returns the rows
with the largest ``∇L(z)·s_test`` (the most helpful: most negative influence), and queried with ``-P s_test`` the
most harmful. Half of the ``k`` candidates come from each end; they are then scored exactly, as kNN candidates are.

Per-example gradients are computed in batches without a per-row loop: one backward pass of the summed loss, with
hooks on the modules that own influence parameters (``nn.Linear``, transformers' ``Conv1D``, ``nn.LayerNorm``,
``nn.Embedding``) turning each module's inputs and output gradients into per-example gradients, which are
sketched at once (never holding N × p). Parameters of other module types fall back to batched autograd.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from . import distributed as D
from .hvp import batch_gradient
from .knn import index_error
from .loss import FunctionalModel
from .params import flat_ranges
from .utils import file_digest, write_atomic, write_error

logger = logging.get_logger(__name__)

ROW_CHUNK = 16
"""Rows whose dense per-example gradients of one module exist at a time while being sketched."""


class CountSketch:
    """A seeded count sketch of parameter space into ``dim`` buckets (one bucket and one sign per parameter).

    Matrices named in ``factored`` (weights of linear layers) are sketched as a tensor sketch (Pham & Pagh 2013):
    entry ``(i, j)`` goes to bucket ``(h₁(i) + h₂(j)) mod D`` with sign ``s₁(i)·s₂(j)``. Its sketch of a per-example
    weight gradient ``Σₜ δₜ xₜᵀ`` is then the circular convolution of the sketches of ``δₜ`` and ``xₜ``, summed
    over tokens: ``IFFT(Σₜ FFT(CS₁δₜ) ⊙ FFT(CS₂xₜ))``, computed from the layer's inputs and output gradients without
    the dense ``(out, in)`` gradient. Any two entries collide with probability 1/D (also within a row, unlike a
    product of two small hashes), and inner products stay unbiased: ``E[(Pa)·(Pb)] = a·b``.

    Args:
        shapes: parameter name → shape, in the order of flat vectors.
        dim: number of buckets D (the projection size).
        seed: the sketch's seed (the same seed gives the same sketch on any machine).
        factored: names of 2-D parameters that get the tensor sketch.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], dim: int, seed: int, *, factored=(), dtype=torch.float32,
                 device="cpu"):
        check_projection_dim(dim, sum(math.prod(s) for s in shapes.values()))
        self.dim, self.dtype, self.device = dim, dtype, device
        gen = torch.Generator().manual_seed(int(seed))
        self.buckets, self.signs, self.factors = {}, {}, {}
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}  # (a tuple given: numel below)
        for name, shape in self.shapes.items():
            if name in factored and len(shape) == 2:
                self.factors[name] = (self._hash(shape[0], gen), self._hash(shape[1], gen))
            else:
                self.buckets[name], self.signs[name] = self._hash(shape.numel(), gen)

    def _hash(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buckets (n,) in [0, D), signs (n,) ±1)``."""
        buckets = torch.randint(0, self.dim, (n,), generator=gen).to(self.device)
        signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=self.device, dtype=self.dtype)
        return buckets, signs

    def _sketch_vectors(self, vectors: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Count sketch of each vector along the last dimension: ``(..., n)`` → ``(..., D)``."""
        out = torch.zeros(*vectors.shape[:-1], self.dim, dtype=self.dtype, device=vectors.device)
        return out.index_add_(-1, buckets, vectors.to(self.dtype) * signs)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Sketch flat vectors ``(m, p)`` → ``(m, D)``."""
        out = torch.zeros(vectors.shape[0], self.dim, dtype=self.dtype, device=vectors.device)
        self.add_flat(out, list(self.shapes), vectors)
        return out

    def add_flat(self, out: torch.Tensor, names: list[str], vectors: torch.Tensor) -> None:
        """``out += sketch of vectors`` ``(b, Σ numel)``: the parameters ``names`` laid end to end, in that order
        (a subset's flat gradients, as `batch_gradient` gives them)."""
        for name, (lo, hi) in flat_ranges({name: self.shapes[name] for name in names}).items():  # (Size.numel)
            self.add(out, name, vectors[:, lo:hi])

    def add(self, out: torch.Tensor, name: str, values: torch.Tensor) -> None:
        """``out += sketch of values`` where ``values`` is ``(b, numel)`` for parameter ``name``."""
        b = values.shape[0]
        if name in self.factors:  # the tensor sketch's buckets and signs, entry by entry
            (h1, s1), (h2, s2) = self.factors[name]
            buckets = ((h1[:, None] + h2[None, :]) % self.dim).reshape(-1)
            signs = (s1[:, None] * s2[None, :]).reshape(-1)
        else:
            buckets, signs = self.buckets[name], self.signs[name]
        out.index_add_(1, buckets, values.reshape(b, -1).to(self.dtype) * signs)

    def add_outer(self, out: torch.Tensor, name: str, left_vectors: torch.Tensor, right_vectors: torch.Tensor) -> None:
        """``out += sketch of Σₜ aₜ bₜᵀ`` per example, for a factored ``(rows, cols)`` parameter, from ``a``
        ``(b, T, rows)`` and ``b`` ``(b, T, cols)``, without forming the ``(rows, cols)`` products."""
        (left_buckets, left_signs), (right_buckets, right_signs) = self.factors[name]
        a = torch.fft.rfft(self._sketch_vectors(left_vectors, left_buckets, left_signs), dim=-1)
        c = torch.fft.rfft(self._sketch_vectors(right_vectors, right_buckets, right_signs), dim=-1)
        out += torch.fft.irfft((a * c).sum(1), n=self.dim, dim=-1).to(self.dtype)

    def add_rows(self, out: torch.Tensor, name: str, rows: torch.Tensor, values: torch.Tensor,
                 example: torch.Tensor) -> None:
        """Sparse update for an embedding weight ``(V, d)``: ``values[i]`` (a ``d``-vector) is added to row
        ``rows[i]`` of example ``example[i]``'s gradient, sketched directly."""
        d = values.shape[-1]
        flat = (rows[:, None] * d + torch.arange(d, device=rows.device)).reshape(-1)
        contrib = (values.to(self.dtype) * self.signs[name][flat].view(-1, d)).reshape(-1)
        target = example[:, None].expand(-1, d).reshape(-1) * self.dim + self.buckets[name][flat]
        out.view(-1).index_add_(0, target, contrib)


class _Recorder:
    """Forward / backward hooks on the modules owning influence parameters: what each call saw."""

    SUPPORTED = (nn.Linear, Conv1D, nn.LayerNorm, nn.Embedding)

    def __init__(self, model: nn.Module, names: list[str]):
        params = dict(model.named_parameters())
        by_id = {id(params[n]): n for n in names}
        owners = collections.Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
        self.owned: dict[nn.Module, dict[str, str]] = {}  # module → {attribute: parameter name}
        self.other: list[str] = []
        covered = set()
        for module in model.modules():
            # a weight two modules hold (GPT-2's embedding tied to its LM head) gets gradients from both: autograd
            own = {attr: by_id[id(p)] for attr, p in module.named_parameters(recurse=False)
                   if id(p) in by_id and owners[id(p)] == 1}
            if not own:
                continue
            # an embedding subclass computes its rows itself (BART's / OPT's positions from the input's shape or
            # mask): the hook's input is not the rows looked up
            custom = isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward
            if isinstance(module, self.SUPPORTED) and not custom:
                self.owned[module] = own
                covered |= set(own.values())
        self.other = [n for n in names if n not in covered]
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, list]] = []
        self.verified = False  # whether the hooks' per-example gradients were seen to equal autograd's
        self._plain: tuple[tuple, FunctionalModel] | None = None

    def plain_model(self, fm: FunctionalModel) -> FunctionalModel:
        """``fm``'s loss without the L2 term (added once, separately) over the parameters in `other`, built once
        per set of them (a fall-back adds to it), through ``fm``'s trunk split and readout."""
        if self._plain is None or self._plain[0] != tuple(self.other):
            self._plain = (tuple(self.other), FunctionalModel(fm.model, self.other, fm.loss_fn))
        return _on_forward_path(self._plain[1], fm)

    def linear_weights(self) -> list[str]:
        """Weights of linear layers (``nn.Linear``, ``Conv1D``): their sketch is taken from the layer's factors."""
        return [own["weight"] for module, own in self.owned.items()
                if isinstance(module, (nn.Linear, Conv1D)) and "weight" in own]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = []

        def forward_hook(module, args, output):
            entry = [module, args[0].detach(), None]
            self.calls.append(entry)
            if output.requires_grad:
                output.register_hook(lambda grad, entry=entry: entry.__setitem__(2, grad.detach()))

        for module in self.owned:
            handles.append(module.register_forward_hook(forward_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def unbatched(self, b: int) -> list[nn.Module]:
        """Modules called on inputs without the batch dimension first (e.g. position embeddings broadcast over
        the batch): their output gradient is summed over rows, so they need the autograd fallback."""
        return list({id(m): m for m, x, g in self.calls if x.shape[0] != b or (g is not None and g.shape[0] != b)}
                    .values())

    def fall_back(self, modules: list[nn.Module]) -> None:
        for module in modules:
            self.other += list(self.owned.pop(module).values())

    def uncalled(self) -> list[nn.Module]:
        """Modules owning influence parameters whose forward did not run, though the loss may read their weights
        (``nn.MultiheadAttention`` reads ``out_proj.weight`` through ``F.multi_head_attention_forward``): their
        gradients would be left out; they need the autograd fallback."""
        called = {id(m) for m, _, _ in self.calls}
        return [module for module in self.owned if id(module) not in called]

    def sketch(self, sketch: CountSketch, out: torch.Tensor) -> None:
        """Add every recorded call's per-example gradients to ``out`` ``(b, D)``."""
        for module, inputs, grad in self.calls:
            if grad is None:
                continue
            own = self.owned[module]
            b = out.shape[0]
            x = inputs.reshape(b, -1, inputs.shape[-1]) if not isinstance(module, nn.Embedding) else inputs.reshape(b, -1)
            g = grad.reshape(b, -1, grad.shape[-1])
            if isinstance(module, nn.Embedding):
                if "weight" in own:
                    example = torch.arange(b, device=g.device)[:, None].expand_as(x).reshape(-1)
                    values = g.reshape(-1, g.shape[-1])
                    if module.padding_idx is not None:  # autograd gives the padding row no gradient
                        values = values * (x.reshape(-1, 1) != module.padding_idx).to(values.dtype)
                    sketch.add_rows(out, own["weight"], x.reshape(-1), values, example)
                continue
            if "bias" in own:
                sketch.add(out, own["bias"], g.sum(1))
            if "weight" not in own:
                continue
            if isinstance(module, nn.LayerNorm):
                normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
                sketch.add(out, own["weight"], (g * normed).sum(1))
                continue
            if own["weight"] in sketch.factors:  # Σₜ δₜ xₜᵀ sketched from its factors
                if isinstance(module, Conv1D):  # weight (in, out)
                    sketch.add_outer(out, own["weight"], x, g)
                else:  # nn.Linear: weight (out, in)
                    sketch.add_outer(out, own["weight"], g, x)
                continue
            for lo in range(0, b, ROW_CHUNK):  # dense (rows, out, in) gradients, a few rows at a time
                part = slice(lo, min(lo + ROW_CHUNK, b))
                if isinstance(module, Conv1D):  # weight (in, out)
                    dense = torch.einsum("bti,bto->bio", x[part], g[part])
                else:  # nn.Linear: weight (out, in)
                    dense = torch.einsum("bto,bti->boi", g[part], x[part])
                rows = out[part]
                sketch.add(rows, own["weight"], dense)
                out[part] = rows
        self.calls.clear()


def check_projection_dim(dim: int, num_params: int, flag: str = "influence_projection_dim={}") -> None:
    """Refuse a projection of the gradients (`CountSketch`) larger than the ``num_params`` gradient it projects,
    suggesting a dimension; ``flag``: how the setting is written where it was given (``"--x {}"`` on a command line)."""
    if not 1 <= dim <= num_params:
        raise ValueError(f"{flag.format(dim)} must be between 1 and the number of influence parameters "
                         f"({num_params}); a projection larger than the gradient only adds noise. Lower it (e.g. "
                         f"{flag.format(max(1, num_params // 4))}; the default, 8192, is sized for models with millions "
                         "of influence parameters).")


def sketched_gradients(fm: FunctionalModel, params: dict[str, torch.Tensor], batch: dict, sketch: CountSketch,
                       recorder: _Recorder) -> torch.Tensor:
    """``(b, D)``: the sketch of each row's training-loss gradient (with the explicit L2 term)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with recorder.recording():
        losses = fm.loss_fn(fm.outputs(leaves, batch), batch)
    out = torch.zeros(losses.shape[0], sketch.dim, dtype=sketch.dtype, device=losses.device)
    torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    unbatched = recorder.unbatched(losses.shape[0]) + recorder.uncalled()
    if unbatched:
        recorder.calls.clear()
        recorder.fall_back(unbatched)
        return sketched_gradients(fm, params, batch, sketch, recorder)
    hooked = [n for own in recorder.owned.values() for n in own.values()]
    recorder.sketch(sketch, out)
    if not recorder.verified and hooked:  # once per build: the hooks' rows against autograd's, row by row
        if not _hooks_agree(fm, params, batch, sketch, out, hooked):
            logger.warning(f"Gradient index: the per-example gradients of {', '.join(hooked[:3])}"
                           f"{', ...' if len(hooked) > 3 else ''} from the layers' hooks differ from autograd's "
                           "(a weight read outside its layer's forward?); they come from batched autograd (slower).")
            recorder.calls.clear()
            recorder.fall_back(list(recorder.owned))
            return sketched_gradients(fm, params, batch, sketch, recorder)
        recorder.verified = True
    if recorder.other:  # parameters without a per-example rule: batched autograd over just those
        grads = batch_gradient(recorder.plain_model(fm), {n: params[n] for n in recorder.other}, batch,
                               reduction="none")
        sketch.add_flat(out, recorder.other, grads)
    if fm.decayed and fm.l2_in_gradients:
        decay = {n: 2.0 * fm.weight_decay * params[n].detach().reshape(1, -1) for n in fm.decayed}
        row = torch.zeros(1, sketch.dim, dtype=sketch.dtype, device=out.device)
        for name, value in decay.items():
            sketch.add(row, name, value)
        out += row
    return out


def _on_forward_path(plain: FunctionalModel, fm: FunctionalModel) -> FunctionalModel:
    """``plain`` (``fm``'s loss without the L2 term, over some of its parameters) through ``fm``'s trunk split and
    readout: the call's forward path, whichever it is now."""
    plain.split, plain.readout = fm.split, fm.readout
    return plain


def _hooks_agree(fm: FunctionalModel, params: dict[str, torch.Tensor], batch: dict, sketch: CountSketch,
                 out: torch.Tensor, hooked: list[str]) -> bool:
    """Whether the hooked sketches of the batch's first and last rows equal the sketch of each row's own autograd
    gradient over the hooked parameters, to the parameters' precision (row by row: a sum over the batch is ~0 at a
    converged model, where rounding alone would differ; in bfloat16 the gradients carry ~2^-9 rounding)."""
    b = out.shape[0]
    plain = _on_forward_path(FunctionalModel(fm.model, hooked, fm.loss_fn), fm)
    tolerance = max(1e-4, 16 * max(torch.finfo(params[n].dtype).eps for n in hooked))
    for i in sorted({0, b - 1}):
        row = {key: value[i : i + 1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == b
               else value for key, value in batch.items()}
        gradient = batch_gradient(plain, {n: params[n] for n in hooked}, row, reduction="sum")
        want = torch.zeros(1, sketch.dim, dtype=sketch.dtype, device=out.device)
        sketch.add_flat(want, hooked, gradient.reshape(1, -1))
        scale = max(float(want.norm()), float(out[i].norm()), 1e-30)
        if not float((out[i] - want[0]).norm()) <= tolerance * scale:  # (NaN: no agreement)
            return False
    return True


INDEX_PROBE_BYTES = 64 * 2**20
"""The largest random set `check_index_factory` tries an index factory's training on."""


def _trained_index(factory: str, shape: tuple[int, int], vectors: np.ndarray | None = None,
                   metric=faiss.METRIC_INNER_PRODUCT):
    """influence_knn_index's faiss factory string over inner products (or ``metric``) for ``shape`` (rows,
    dimensions), trained on ``vectors`` where it needs training and they are given; one faiss cannot make (an unknown
    string, or too few rows to train it) is refused with the fix."""
    try:
        index = faiss.index_factory(shape[1], factory, metric)
        if not index.is_trained and vectors is not None:
            index.train(vectors)
        return index
    except RuntimeError as err:
        raise index_error(factory, shape, err) from err


def check_index_factory(factory: str, rows: int, dim: int, metric=faiss.METRIC_INNER_PRODUCT) -> None:
    """The gradient index is built after s_test: a factory string faiss cannot make, or whose training needs more
    rows than there are candidates (an IVF index with more lists), is refused before it. An index that needs training
    is trained on random vectors of the candidates' shape while they take at most `INDEX_PROBE_BYTES` (beyond, few
    indexes need more rows than that; there the lists and codebooks the index would train are counted against the
    rows). ``metric``: the feature index's L2 for kNN candidates. What passed is remembered for the process (a later
    call with the same factory and shape costs nothing: the probe drew 64 MB of random numbers on every call)."""
    _check_index_factory(factory, int(rows), int(dim), int(metric))


@functools.lru_cache(maxsize=256)  # (successes only: an error is raised, and lru_cache keeps no result)
def _check_index_factory(factory: str, rows: int, dim: int, metric: int) -> None:
    index = _trained_index(factory, (rows, dim), None, metric)
    rng = np.random.default_rng(0)
    if not index.is_trained and rows * dim * 4 <= INDEX_PROBE_BYTES:
        index = _trained_index(factory, (rows, dim), rng.standard_normal((rows, dim), dtype=np.float32), metric)
    needed = _training_rows(index)
    if rows < needed:  # (an IVF4096 over 3,000 rows of 6,000 dimensions failed after s_test)
        raise index_error(factory, (rows, dim), RuntimeError(f"its training needs at least {needed} rows"))
    if index.is_trained:  # adding rows can fail too ('IDMap,Flat' takes rows only with ids)
        try:
            index.add(rng.standard_normal((min(rows, 8), dim), dtype=np.float32))
        except RuntimeError as err:
            raise index_error(factory, (rows, dim), err) from err


def _training_rows(index) -> int:
    """The fewest rows faiss trains ``index`` on: an IVF index's lists, a product quantizer's centroids per code."""
    ivf = faiss.try_extract_index_ivf(index)
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    needed = [ivf.nlist] if ivf is not None else [1]
    needed += [pq.ksub for pq in (getattr(inner, "pq", None), getattr(ivf, "pq", None)) if pq is not None]
    return max(needed)


class GradientIndex:
    """A faiss inner-product index over the sketched per-example gradients of the candidate rows."""

    def __init__(self, sketch: CountSketch, vectors: np.ndarray | None = None, *, index=None, factory: str = "Flat"):
        self.sketch = sketch
        if index is None:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (float32 rows in order: no copy)
            index = _trained_index(factory, vectors.shape, vectors)
            try:
                index.add(vectors)
            except RuntimeError as err:
                raise index_error(factory, vectors.shape, err) from err
        self.index = index
        self.num_rows = index.ntotal

    def save(self, path) -> None:
        """Write the faiss index (faiss's own binary format; the sketch is rebuilt from its seed) to a temporary file
        next to ``path``, then rename it into place (as `hf_fastif.utils.write_atomic` does): a failed write (a full
        disk) leaves no truncated index and no temporary file, and raises an `OSError` naming ``path``, not faiss's
        RuntimeError with its C++ trace."""
        try:
            write_atomic(path, writer=lambda tmp: faiss.write_index(self.index, str(tmp)))
        except RuntimeError as err:
            # faiss: "Error in ... at index_write.cpp:499: Error: 'ret == (n)' failed: write error in <tmp>: 8388563
            # != 20480000 (No space left on device)": the last parenthesis is the reason
            found = re.search(r"\(([^()]*)\)\s*$", str(err))
            reason = found.group(1) if found else (str(err).strip().splitlines() or [type(err).__name__])[-1]
            raise write_error(path, err, reason) from err

    @classmethod
    def load(cls, path, sketch: CountSketch) -> GradientIndex:
        return cls(sketch, index=faiss.read_index(str(path)))

    def candidates(self, s_test: torch.Tensor, k: int) -> list[np.ndarray]:
        """Per row of ``s_test`` ``(m, p)``: ``ceil(k/2)`` rows with the largest sketched ``g·s`` (helpful end) and
        the rest with the smallest (harmful end), sorted, k distinct rows (every row for k >= the rows indexed).

        Each end is searched k deep: rows that tie (duplicate rows) can sit at both ends, and a row taken from one end
        is passed over at the other (two searches of ceil(k/2) and floor(k/2) gave one row twice: k = N missed rows)."""
        query = self.sketch.project(s_test.to(self.sketch.dtype)).cpu().numpy().astype(np.float32)
        rows = self.index.ntotal
        if k >= rows:
            return [np.arange(rows, dtype=np.int64) for _ in range(len(query))]
        _, top = self.index.search(np.ascontiguousarray(query), k)
        _, bottom = self.index.search(np.ascontiguousarray(-query), k)
        out = []
        for t in range(len(query)):
            chosen: dict[int, None] = {}
            for found, stop in ((top[t], -(-k // 2)), (bottom[t], k), (top[t], k)):  # then the helpful end's rest
                for row in found[found >= 0].tolist():
                    if len(chosen) >= stop:
                        break
                    chosen.setdefault(row)
            out.append(np.sort(np.fromiter(chosen, dtype=np.int64, count=len(chosen))))
        return out


def sketch_of(params: dict[str, torch.Tensor], recorder: _Recorder, dim: int, seed: int,
              dtype: torch.dtype) -> CountSketch:
    """The sketch of ``params`` (the weights of linear layers tensor-sketched), the same for an index built here and
    one loaded from disk: it is rebuilt from its seed, never saved."""
    return CountSketch({n: p.shape for n, p in params.items()}, dim, seed, factored=recorder.linear_weights(),
                       dtype=dtype, device=next(iter(params.values())).device)


def build_gradient_index(fm: FunctionalModel, params: dict[str, torch.Tensor], batcher, *, dim: int, seed: int,
                         batch_size: int, progress: bool = False, factory: str = "Flat") -> GradientIndex:
    """Sketch every row's gradient (rows split over processes, gathered) and index them."""
    work = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
    recorder = _Recorder(fm.model, list(params))
    sketch = sketch_of(params, recorder, dim, seed, work)
    if recorder.other:
        logger.info(f"Gradient index: {len(recorder.other)} parameters sit in modules without a per-example rule "
                    f"(e.g. {recorder.other[0]}); their gradients come from batched autograd (slower).")
    mine = D.shard(range(len(batcher)))

    def sketched() -> np.ndarray:
        # this process's rows, filled in place: a list of the batches' sketches and their concatenation (then
        # faiss's copy) were alive at once, a peak of 2.5-3x the N x D x 4 bytes the index holds
        # batches of rows alike in length (less padding), each row's sketch written at its place in the share
        out = np.empty((len(mine), dim), dtype=np.float32)
        first = mine[0] if mine else 0
        for rows, batch in tqdm(batcher.batches(batcher.length_order(mine), batch_size), desc="gradient index",
                                disable=not progress, total=-(-len(mine) // batch_size), leave=False):
            out[np.asarray(rows) - first] = sketched_gradients(fm, params, batch, sketch, recorder).to(
                "cpu", torch.float32).numpy()
        return out

    return GradientIndex(sketch, D.gather_rows(D.together(sketched, "The gradient index")), factory=factory)


def cache_file_digest(path: Path) -> str:
    """xxh3-128 of a saved engine cache file's bytes (~5 GB/s, so checking them costs little beside reading)."""
    return file_digest(path, xxhash.xxh3_128)


def saved_index_intact(saved: tuple) -> bool:
    """Whether a loaded-but-unread gradient index file (``(key, path, dtype, digest)``) still holds what was saved:
    it is read on first use, and another engine's save into its folder may have replaced it since (its candidates
    were served under the old key)."""
    path, digest = saved[1], saved[3]
    return path.is_file() and (digest is None or cache_file_digest(path) == digest)


def load_gradient_index(fm: FunctionalModel, params: dict[str, torch.Tensor], path: Path, *, dim: int, seed: int,
                        dtype: torch.dtype) -> GradientIndex:
    """A gradient index written by `GradientIndex.save`, with its sketch rebuilt from its seed (as
    `build_gradient_index` makes it for the same parameters, dimension and seed)."""
    return GradientIndex.load(path, sketch_of(params, _Recorder(fm.model, list(params)), dim, seed, dtype))
