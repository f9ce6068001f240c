"""The frozen trunk: everything below the first layer that holds an influence parameter, computed once per row.

Influence (LiSSA's Hessian-vector products, test gradients, JVP scoring, per-example gradients, kNN features)
only differentiates the selected parameters. When those sit in the top layers of a layer stack (the paper: layers
10-11 of bert-base, the pooler and the classifier), the hidden states entering the first of those layers depend on
nothing that changes during a computation, so they are computed once per row in large no-grad batches and every
later forward runs only the top.

How, for any transformers model with one stack of layers (an ``nn.ModuleList``: BERT ``encoder.layer``, RoBERTa,
DistilBERT ``transformer.layer``, GPT-2 ``h``, Llama ``layers``...):

- `find_split` locates the stack and the first layer ``f`` holding a selected parameter, and checks with one probe
  forward that no selected parameter is used before the stack (tied input embeddings, for instance).
- `TrunkCache` runs the model up to the output of layer ``f - 1`` (a forward hook stops it there) and keeps each
  row's hidden states without padding (positions where ``attention_mask`` is 1), in memory or, beyond
  `MEMORY_LIMIT_BYTES`, in a memory-mapped file. A multiple-choice row (``(c, s)`` inputs) keeps its ``c``
  sequences, as the model flattens them; a model whose stack sees another number of positions than the batch
  has tokens (it pads inside its forward, as Longformer does) has no clean split (`TrunkLayoutError`).
- `injected` runs the model's own forward with layers ``0 … f-2`` skipped and layer ``f - 1`` returning the cached
  states, so the model still builds its own attention masks and position embeddings; the embeddings layer runs
  (a lookup) and its output is discarded.
- Every split is checked once against the full model's logits (`TrunkSplit.verify`); a split that changes them
  beyond float tolerance is dropped with a log line and the full forward is used.
- A split after the whole stack (only a pooler and a head take part) can keep the first position alone: `TrunkCache`'s
  ``first_position`` computes the last layer under a `hf_fastif.readout.Readout` cut and stores one state per
  sequence (the engine decides where that is safe: `InfluenceEngine._first_position_cut`).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import inspect
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .fingerprint import config_fingerprint, tensors_fingerprint
from .utils import relative_difference

logger = logging.get_logger(__name__)

HIDDEN_KEY = "__hf_fastif_trunk_hidden__"
"""Batch key under which a batch carries its rows' cached trunk states (never passed to the model)."""

MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Trunk states above this size go to a memory-mapped file instead of memory (see `TrunkCache`)."""

TRUNK_BATCH_SIZE = 64
"""Rows per no-grad batch when the trunk states are computed."""


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


class FirstPositionError(ValueError):
    """The last layer cut to its first position (`TrunkCache`'s ``first_position``) failed on a batch: the trunk can
    still keep every position."""


class TrunkLayoutError(ValueError):
    """The hidden states inside the layer stack are not laid out like the batch's tokens (the model pads or drops
    positions on the way in, as Longformer pads every batch to a multiple of its attention window, or lays its states
    out otherwise), or a sequence has no token whose state could be cached: cached states would not stand in for
    the trunk's. There is no clean split; the full forward runs instead."""


@dataclass
class TrunkSplit:
    """Where a model splits into a frozen trunk and the top that holds the influence parameters.

    Attributes:
        path: dotted name of the layer stack (e.g. ``bert.encoder.layer``).
        first: index of the first layer holding an influence parameter (``len(layers)`` if only modules after the
            stack, such as a pooler or a classifier, take part).
    """

    model: nn.Module
    layers: nn.ModuleList
    path: str
    first: int
    after: list = field(default_factory=list)  # modules that run after the stack (pooler, classifier, final norm)
    before: list = field(default_factory=list)  # modules that run before the stack is entered (embeddings)
    feeder: nn.Module | None = None  # the module whose output enters the stack (skipped under injection)
    tuple_output: int = 0  # 0: layers return a tensor; n: a tuple of length n with the hidden states first
    failed: str | None = None  # why an injected forward ran whole (see `injected`); the split is not used again
    verified: set = field(default_factory=set)  # the engine's (trunk fingerprint, module state) keys under which a
    # cache of it passed the check against two forwards of its own (`verify_split`): under those, a one-row cache may
    # be checked on the forward that captured it. A trunk whose forward is not a function of its inputs (a noise
    # hook) agrees with itself, and only a second forward shows it; a hook registered later, or new weights, is
    # another state, checked on two forwards again
    _active: list = field(default_factory=list)

    def fingerprint(self, digests: dict[str, str] | None = None) -> str:
        """Content hash of what the trunk states depend on: every parameter and buffer that is not in the top
        (embeddings and layers ``0 … first-1``), the config and the split point. A tensor the top shares with a
        module below it (GPT-2's ``lm_head`` is tied to ``wte``, which the trunk reads) counts: leaving it out kept
        trunk states of the old embeddings after an in-place edit; so does a module the top runs that also ran
        before the stack (one norm applied to the embeddings and again before the head).

        Args:
            digests: `hf_fastif.fingerprint.tensor_digests` of the model, if already computed."""
        ran_below = {id(m) for m in self.before}
        top_modules = {id(m) for layer in [*self.layers[self.first:], *self.after] for m in layer.modules()
                       if id(m) not in ran_below}
        below = {id(t) for m in self.model.modules() if id(m) not in top_modules
                 for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
        top = {id(t) for layer in [*self.layers[self.first:], *self.after]
               for t in [*layer.parameters(), *layer.buffers()]} - below
        named = [(n, t) for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if id(t) not in top]
        if digests is not None:
            named = [(n, digests[n]) for n, _ in named]
        return tensors_fingerprint([("__split__", f"{self.path}:{self.first}"),
                                    ("__config__", config_fingerprint(self.model)), *named])

    def part_of(self, model: nn.Module) -> bool:
        """Whether every module this split runs or skips is still ``model``'s (a layer stack replaced by another
        ``nn.ModuleList`` under the same names left a held split hooked on the old one: "The forward never reached
        ...")."""
        if self.model is not model:
            return False
        try:
            if model.get_submodule(self.path) is not self.layers:
                return False
        except AttributeError:
            return False
        modules = {id(m) for m in model.modules()}
        return all(id(m) in modules for m in [*self.before, *self.after, *([self.feeder] if self.feeder else [])])

    def _wrap(self, hidden: torch.Tensor):
        return hidden if not self.tuple_output else (hidden,) + (None,) * (self.tuple_output - 1)

    @contextlib.contextmanager
    def injected(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the block, the model's forward skips the trunk: layer ``first - 1`` returns ``hidden``
        (``(b, s, h)``, aligned with the batch's tokens) and the layers below it pass their input through.

        Where the model reshapes the batch on the way in (Longformer pads each batch to a multiple of its attention
        window, so a batch of rows shorter than those the cache was built on arrives longer), the stack would get
        states that do not line up: the first skipped module sees that from its input's shape, puts the trunk back
        and runs itself, so that forward is the model's own, whole; ``failed`` records why, with a warning, and the
        engine drops the split for later calls."""
        if self._active:
            raise RuntimeError("Trunk injection is not re-entrant.")
        last = self.first - 1
        modules = [*self.layers[: self.first], *([self.feeder] if self.feeder is not None else [])]

        own = {module: vars(module).get("forward") for module in modules}  # accelerate's hooks, a user's patch

        def restore():
            for module, forward in own.items():
                if forward is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = forward

        def whole(module, args, kwargs):
            """``module``'s forward as it was before the injection (its instance ``forward`` if it had one)."""
            return (own[module] or functools.partial(type(module).forward, module))(*args, **kwargs)

        def lined_up(module, args, kwargs) -> bool:
            """Does the first skipped module's input (the feeder's token ids or embeddings, or layer 0's hidden
            states) have the positions of ``hidden``? If not, put the trunk back and say why."""
            x = next((t for t in [*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"),
                                  kwargs.get("hidden_states")] if isinstance(t, torch.Tensor)), None)
            if x is None or x.dim() < 2 or x.shape[1] == hidden.shape[1]:
                return True
            restore()
            if self.failed is None:
                self.failed = (f"{type(self.model).__name__} gave {type(module).__name__} {x.shape[1]} positions "
                               f"for cached states of {hidden.shape[1]}: it reshapes the batch inside its forward")
                logger.warning(f"The frozen-trunk cache does not line up with this batch ({self.failed}); this "
                               "forward runs the whole model (as will any batch that does not line up), and later "
                               "calls do not use the cache.")
            return False

        def standing_in(i: int):
            layer = self.layers[i]

            def forward(*args, **kwargs):
                if i == 0 and self.feeder is None and not lined_up(layer, args, kwargs):
                    # the trunk put back: this layer runs (its own forward: its hooks already run around this
                    # call) and so do those above it
                    return whole(layer, args, kwargs)
                return self._wrap(hidden if i == last else args[0] if args else kwargs["hidden_states"])
            return forward

        def placeholder(*args, **kwargs):  # the feeder's output only flows into the skipped layers
            if not lined_up(self.feeder, args, kwargs):
                return whole(self.feeder, args, kwargs)
            return hidden

        self._active.append(True)
        for i in range(self.first):
            self.layers[i].forward = standing_in(i)
        if self.feeder is not None:
            self.feeder.forward = placeholder
        try:
            yield
        finally:
            restore()
            self._active.clear()

    def capture(self, model: nn.Module, inputs: dict, *, finish: bool = False):
        """The hidden states leaving layer ``first - 1`` for ``inputs``; the rest of the forward is skipped, or with
        ``finish`` run too: then ``(hidden states, the model's outputs)`` (the states copied, in case a layer above
        writes into its input)."""
        out: dict = {}

        def hook(module, args, output):
            sequence = isinstance(output, (tuple, list))  # (a list: OpenAI GPT's blocks; read by index alike)
            hidden = output[0] if sequence else output
            self.tuple_output = len(output) if sequence else 0
            out["hidden"] = hidden.detach().clone() if finish else hidden.detach()
            if not finish:
                raise _StopForward

        handle = self.layers[self.first - 1].register_forward_hook(hook)
        try:
            outputs = model(**inputs)
        except _StopForward:
            outputs = None
        finally:
            handle.remove()
        if "hidden" not in out:
            raise RuntimeError(f"The forward never reached {self.path}.{self.first - 1}.")
        return (out["hidden"], outputs) if finish else out["hidden"]


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """``nn.ModuleList`` s of same-type modules that hold parameters, outermost only."""
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module.parameters()):
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        stacks.append((name, module))
    return stacks


def find_split(model: nn.Module, names: Sequence[str], probe: dict) -> tuple[TrunkSplit | None, str]:
    """Where ``model`` splits into a trunk that no selected parameter touches and a top; ``(None, reason)`` when
    there is no such split.

    Args:
        names: the selected (influence) parameter names.
        probe: one collated batch of model inputs (no labels), used to see which modules run before the stack.
    """
    stacks = layer_stacks(model)
    if len(stacks) != 1:
        return None, (f"{type(model).__name__} has {len(stacks)} layer stacks"
                      + (" (an encoder-decoder?)" if len(stacks) > 1 else "") + "; the trunk cache needs exactly one")
    path, layers = stacks[0]
    selected = set(names)
    params = dict(model.named_parameters())
    indices = []
    for name in selected:
        if name.startswith(path + "."):
            indices.append(int(name[len(path) + 1:].split(".", 1)[0]))
    first = min(indices) if indices else len(layers)
    if first == 0:
        return None, f"the first influence parameter is in {path}.0: there is no frozen trunk to cache"
    # which modules run before the stack is entered, and which after it is left?
    order: list[nn.Module] = []
    entered: dict = {}

    outputs: dict[int, tuple[nn.Module, int]] = {}  # data_ptr of a module's output → (module, its position)

    def record(module, args):  # hooks must return None, or they replace the arguments
        order.append(module)

    def produced(module, args, output):
        if isinstance(output, torch.Tensor) and "at" not in entered:
            outputs[output.data_ptr()] = (module, len(order))

    def enter(module, args, kwargs):
        entered.setdefault("at", len(order))
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            entered["input"] = hidden.data_ptr()
            entered["shape"] = tuple(hidden.shape)

    def leave(module, args, output):
        entered.setdefault("left", len(order))

    calls: list[tuple[int, type]] = []  # (layer index, its output's type) per layer call, in order

    def called(i):
        return lambda module, args, output: calls.append((i, type(output)))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if m is not model and not isinstance(m, nn.ModuleList)]
    handles += [m.register_forward_hook(produced) for m in model.modules()
                if m is not model and not isinstance(m, nn.ModuleList)]
    handles.append(layers[0].register_forward_pre_hook(enter, with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(leave))
    handles += [layer.register_forward_hook(called(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for h in handles:
            h.remove()
    if "at" not in entered:
        return None, f"the forward never entered {path}"
    if [i for i, _ in calls] != list(range(len(layers))):
        return None, (f"the layers of {path} do not run once each, in order (they are shared across depth, as "
                      "ALBERT's layer groups are): a cached state would stand in for more than one call")
    odd = {kind for _, kind in calls if not issubclass(kind, torch.Tensor) and kind not in (tuple, list)}
    if odd:
        return None, (f"the layers of {path} return {', '.join(sorted(k.__name__ for k in odd))}, not a tensor or a "
                      "plain tuple the cached states could stand in for")
    if "shape" in entered:
        try:
            _check_layout(entered["shape"], _token_mask(probe))
        except TrunkLayoutError as err:
            return None, str(err)
    inside = {id(m) for layer in layers for m in layer.modules()}
    before = [m for m in order[: entered["at"]] if id(m) not in inside]
    after = [m for m in order[entered.get("left", len(order)):] if id(m) not in inside]
    selected_ids = {id(params[n]) for n in selected if n in params}
    for module in before:
        shared = [t for t in module.parameters(recurse=False) if id(t) in selected_ids]
        if shared:
            return None, (f"an influence parameter is used before {path} (by {type(module).__name__}, e.g. tied "
                          "input embeddings), so the states entering the top depend on it")
    outside = [n for n in selected if not n.startswith(path + ".")]
    after_ids = {id(t) for m in after for t in m.parameters(recurse=False)}
    unplaced = [n for n in outside if id(params[n]) not in after_ids]
    if unplaced:
        return None, f"influence parameters {unplaced[:3]} are neither in {path} nor in a module run after it"
    # the outermost module whose output is exactly the stack's input (BERT's embeddings): under injection its work
    # is discarded, so it is skipped too (verify_split checks the result against the full model)
    feeder = outputs.get(entered.get("input"))
    feeder = feeder[0] if feeder is not None and feeder[0] in before else None
    return TrunkSplit(model=model, layers=layers, path=path, first=first, after=after, feeder=feeder,
                      before=before), ""


class TrunkCache:
    """The trunk states of every row of one dataset (as its collator tokenises it), without padding.

    Rows are stored flat, ``(total tokens, hidden)``, with each row's offset and length. Up to
    `MEMORY_LIMIT_BYTES` they stay in memory; beyond, they go to a memory-mapped file of its own in ``directory``
    (default: a new temporary folder), so memory stays bounded at any dataset size. Its disk space is reserved
    before any state is computed (a folder without room raises an `OSError`), and the file is deleted as soon as it
    is mapped: its space is freed when the cache is closed or collected, or the process ends, killed or not.

    Args:
        split: the model's `TrunkSplit`.
        batcher: a `hf_fastif.batches.Batcher` over the whole dataset (its collator decides the tokens).
        key: the content key this cache was built for (trunk fingerprint, data, collator); its owner compares it.
        full_forward: a dataset of one row: run the whole model on it while its states are captured, and keep its
            outputs (`full_outputs`), which `verify_split` then compares with the top-only forward instead of running
            the model again on the same row collated alone (a later call's new test point: one forward fewer).
        first_position: for a split after the whole stack (only a pooler and a head take part), a
            `hf_fastif.readout.Readout` cutting the stack's last layer to its first position, which is all the top
            reads (the caller has shown that, `hf_fastif.readout.find_readout`): the states are computed under the
            cut and one state per sequence is kept, the first position's (`per_row`). The last layer's work after
            the cut is then done at one position, and the cache holds one state per sequence instead of one per
            token. `hidden` lays that state out at every position of the batch. With ``full_forward`` the row runs
            whole (its outputs are the check's reference) and its first position is kept.
    """

    def __init__(self, split: TrunkSplit, batcher, key: str, *, directory: str | os.PathLike | None = None,
                 batch_size: int = TRUNK_BATCH_SIZE, progress: bool = False, full_forward: bool = False,
                 first_position=None):
        if batcher.index is not None:
            raise ValueError("A trunk cache covers a whole dataset; build it from the dataset's own Batcher.")
        if full_forward and len(batcher) != 1:
            raise ValueError(f"full_forward is for a dataset of one row; this one has {len(batcher)}.")
        if first_position is not None and split.first != len(split.layers):
            raise ValueError("first_position is for a split after the whole layer stack (only modules after it take "
                             f"part), not one at {split.path}.{split.first}.")
        self.split, self.key, self.device = split, key, batcher.device
        self.per_row = 0  # states per row: 0 every token's; c the first position of each of its c sequences
        self.full_outputs = None  # the whole model's outputs on the one row (full_forward), until verify_split
        self._cleanup: weakref.finalize | None = None  # deletes the mapped file where it could not be at once
        n = len(batcher)
        order = batcher.length_order()  # (less padding per batch)
        starts = range(0, n, batch_size)
        self.lengths = np.zeros(n, dtype=np.int64)
        stored = batcher.stored_lengths("input_ids")
        for start in starts:  # tokenisation only: the lengths decide the layout
            rows = order[start : start + batch_size]
            batch = batcher.batch(rows, trunk=False)
            if "attention_mask" not in batch and (stored is None or stored.min() != stored.max()):
                raise TrunkLayoutError("the batches carry no attention_mask, so a row's tokens cannot be told from "
                                       "the padding its batch adds (a collator that returns an attention mask, "
                                       "e.g. DataCollatorWithPadding, lets the trunk be cached)")
            mask = _token_mask(batch)
            empty = (mask.sum(-1) == 0).reshape(len(rows), -1).any(1)
            if bool(empty.any()):
                where = int(rows[int(empty.nonzero()[0, 0])])
                raise TrunkLayoutError(f"row {where} has a sequence without tokens (an attention mask of zeros, e.g. "
                                       "an empty choice): the model still runs its padding through the trunk, and "
                                       "there is no token state to cache for it")
            self.lengths[rows] = mask.flatten(1).sum(1).cpu().numpy()
            if first_position is not None:
                self.per_row = int(mask.shape[1]) if mask.dim() == 3 else 1
        if first_position is not None:  # (rows in their own order: one state per sequence)
            self.offsets = np.arange(n, dtype=np.int64) * self.per_row
            total = n * self.per_row
        else:
            position = np.zeros(n, dtype=np.int64)
            position[order] = np.concatenate([[0], np.cumsum(self.lengths[order])[:-1]])
            self.offsets = position
            total = int(self.lengths.sum())
        self.flat: torch.Tensor | None = None
        cut = first_position is not None and not full_forward  # (whole, the check reads its outputs)
        for start in tqdm(starts, desc="trunk states", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            batch = batcher.batch(rows, trunk=False)
            try:
                with torch.no_grad(), (first_position.active() if cut else contextlib.nullcontext()):
                    captured = split.capture(split.model, model_inputs(batch, split.model), finish=full_forward)
            except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as err:  # a batch unlike the probes
                if not cut or not first_position.fired or isinstance(err, torch.OutOfMemoryError):
                    raise  # not the cut's doing
                raise FirstPositionError(f"the last layer cut {first_position.where} failed on a batch "
                                         f"({type(err).__name__}: {err})") from err
            hidden, self.full_outputs = captured if full_forward else (captured, None)
            mask = _token_mask(batch)
            if cut:
                _check_first_positions(hidden.shape, mask)
            else:
                _check_layout(hidden.shape, mask)
            if self.flat is None:
                self.flat = self._allocate(total, hidden, directory)
            if first_position is not None:
                self.flat[self._sequences(rows)] = hidden[:, 0].to("cpu")
                continue
            values = hidden.reshape(*mask.shape, hidden.shape[-1])[mask].to("cpu")
            first = int(self.offsets[rows[0]])
            self.flat[first : first + len(values)] = values

    @classmethod
    def from_arrays(cls, key: str, lengths: np.ndarray, offsets: np.ndarray, flat: torch.Tensor, device,
                    per_row: int = 0) -> TrunkCache:
        """A cache restored from saved arrays (see `hf_fastif.engine.InfluenceEngine.save_caches`)."""
        cache = cls.__new__(cls)
        cache.split, cache.key, cache.device, cache._cleanup, cache.full_outputs = None, key, device, None, None
        cache.lengths, cache.offsets, cache.flat = np.asarray(lengths), np.asarray(offsets), flat
        cache.per_row = int(per_row)
        return cache

    def _allocate(self, total: int, hidden: torch.Tensor, directory) -> torch.Tensor:
        """``(total, hidden)`` states of ``hidden``'s dtype: in memory up to `MEMORY_LIMIT_BYTES`, beyond in a
        memory-mapped file in ``directory`` (default: a new temporary folder).

        The file's disk space is reserved before it is mapped (``posix_fallocate``): a mapped file that was only
        sparse killed the process with SIGBUS (no error, all work lost) when the disk filled up under it. A folder
        without room (or a per-file size limit, RLIMIT_FSIZE) raises an `OSError` naming it and the setting. Once
        mapped, the file is deleted (its name, not its space): the mapping keeps it, nothing reads it by name, and
        no file is left behind by a script that ends without closing its engine or by a killed run."""
        size = total * hidden.shape[-1]
        nbytes = size * hidden.element_size()
        if nbytes <= MEMORY_LIMIT_BYTES:
            return torch.empty((total, hidden.shape[-1]), dtype=hidden.dtype)
        temporary = directory is None
        folder = name = None
        try:
            folder = Path(tempfile.mkdtemp(prefix="hf_fastif_trunk_")) if temporary else Path(directory)
            folder.mkdir(parents=True, exist_ok=True)
            # a file of its own: the caches of one model (train, test, candidates) share the trunk's fingerprint,
            # and two of them under one name overwrote each other's states
            handle, name = tempfile.mkstemp(prefix="trunk-", suffix=".bin", dir=folder)
            try:
                _reserve(handle, nbytes)
            finally:
                os.close(handle)
            flat = torch.from_file(name, shared=True, size=size, dtype=hidden.dtype)
        except BaseException as err:
            _remove_mapped(name, folder if temporary else None)  # (Ctrl-C during a slow reservation left it behind)
            if not isinstance(err, (OSError, RuntimeError)):  # (torch.from_file: RuntimeError, 'File too large')
                raise
            where = directory if not temporary else f"the temporary folder {tempfile.gettempdir()}"
            size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"  # (small: "0.00 GB")
            raise OSError(f"Trunk states of {size} go to a memory-mapped file, and {where} cannot "
                          f"hold one ({err}): set influence_cache_dir to a writable folder with room for it (a file "
                          "of that size), or influence_trunk_cache=False.") from err
        logger.info(f"Trunk states: {nbytes / 1e9:.2f} GB, above the {MEMORY_LIMIT_BYTES / 1e9:.1f} GB memory "
                    f"limit: memory-mapped from {folder} (the file is deleted once mapped; its space is freed when "
                    "the cache is closed).")
        try:
            _remove_mapped(name, folder if temporary else None, strict=True)
        except OSError:  # (a system that cannot delete a mapped file): deleted when the cache is closed or
            # collected, or at the latest at interpreter exit (before module teardown, unlike __del__)
            self._cleanup = weakref.finalize(self, _remove_mapped, name, folder if temporary else None)
        return flat.view(total, hidden.shape[-1])

    def hidden(self, rows: Sequence[int], batch: dict) -> torch.Tensor:
        """The cached states of dataset rows ``rows`` laid out like ``batch`` (``(b, s, h)``; ``(b·c, s, h)`` for
        rows of ``c`` sequences each, as a multiple-choice model flattens its ``(b, c, s)`` inputs).

        Padding positions get a copy of the row's first token's state: the loss never reads them (the attention
        mask hides them as keys, and their own outputs are not used), but they still run through the layers, and
        zeros there, a state the layers never saw, made half-precision second derivatives overflow; the 0 · inf
        of the backward pass then turned every parameter's product into NaN. A cache of first positions
        (`per_row`) gives each sequence's one state at all of its positions."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = _token_mask(batch).cpu()
        if not np.array_equal(mask.flatten(1).sum(1).numpy(), self.lengths[rows]):
            raise ValueError("These rows tokenise to other lengths than when their trunk states were cached: the data "
                             "or the collator changed under the cache. Build a new InfluenceEngine.")
        if self.per_row:  # the first position's state, laid out at every position (the top reads the first)
            states = self.flat[self._sequences(rows)]
            return states[:, None, :].expand(-1, mask.shape[-1], -1).contiguous().to(self.device)
        index = np.concatenate([np.arange(o, o + n) for o, n in zip(self.offsets[rows], self.lengths[rows])])
        out = torch.zeros((*mask.shape, self.flat.shape[-1]), dtype=self.flat.dtype)
        out[mask] = self.flat[torch.from_numpy(index)]
        mask, out = mask.reshape(-1, mask.shape[-1]), out.reshape(-1, mask.shape[-1], self.flat.shape[-1])
        first = out[torch.arange(mask.shape[0]), mask.to(torch.int8).argmax(1)]
        return torch.where(mask[..., None], out, first[:, None, :]).to(self.device)

    def _sequences(self, rows: np.ndarray) -> torch.Tensor:
        """Where the states of ``rows``' sequences are in a cache of first positions (`per_row` a row), row by row."""
        return torch.from_numpy((self.offsets[rows][:, None] + np.arange(self.per_row)).flatten())

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()

    def close(self) -> None:
        """Release the states (a memory-mapped file's space is freed once no tensor views them; its name is
        deleted as soon as it is mapped, see `_allocate`)."""
        self.flat = None
        cleanup, self._cleanup = getattr(self, "_cleanup", None), None
        if cleanup is not None:
            cleanup()


def _reserve(handle: int, nbytes: int) -> None:
    """Give the open file ``handle`` ``nbytes`` of disk space now (``posix_fallocate``), so a full disk or a file
    size limit raises here (`OSError`: ENOSPC, EFBIG) rather than as SIGBUS when a mapped page is written later.
    Where the call is missing (macOS) or the file system cannot reserve space, the file is only extended (sparse)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(handle, 0, nbytes)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                raise
    os.ftruncate(handle, nbytes)


def _remove_mapped(name: str | None, folder: Path | None, strict: bool = False) -> None:
    """Delete a trunk states file (``name``, if made) and the temporary ``folder`` it was made in (if any); with
    ``strict``, an `OSError` if the file could not be deleted."""
    try:
        if name is not None:
            os.unlink(name)
    except FileNotFoundError:
        pass
    except OSError:
        if strict:
            raise
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``get_base_model()``, its adapters in place), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_inputs(batch: dict, model: nn.Module | None = None) -> dict:
    """The model's inputs of a collated batch: without labels and without the cached trunk states; with ``model``
    and a ``forward`` that takes no ``**kwargs``, only the inputs it names (a column kept for a loss of one's own, as
    the arguments' ``label_names`` keep one, is not an input)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", HIDDEN_KEY)}
    named = None if model is None else _named_inputs(type(transformers_model(model)).forward)
    return inputs if named is None else {k: v for k, v in inputs.items() if k in named}


@functools.lru_cache(maxsize=256)
def _named_inputs(forward: Callable) -> frozenset[str] | None:
    """The parameter names of a ``forward`` (None when it takes ``**kwargs``: every input goes through)."""
    params = inspect.signature(forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def _token_mask(batch: dict) -> torch.Tensor:
    """``(b, s)`` bool: the tokens of each row (the attention mask, or every position of ``input_ids``);
    ``(b, c, s)`` for rows of ``c`` sequences (multiple choice)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.bool()
    ids = batch.get("input_ids")
    if ids is None:
        raise TrunkLayoutError("the trunk cache needs input_ids or an attention_mask in the batch")
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)


def _check_layout(shape: Sequence[int], mask: torch.Tensor) -> None:
    """Raise `TrunkLayoutError` unless hidden states of ``shape`` (``(sequences, s, h)``) hold one position per
    token position of ``mask`` (``(b, s)``, or ``(b, c, s)`` flattened to ``b·c`` sequences)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[1] == mask.shape[-1] and shape[0] * shape[1] == mask.numel():
        return
    raise TrunkLayoutError(
        f"the hidden states entering the layer stack are {shape[:-1]} for a batch of {tuple(mask.shape)} token "
        "positions: the model pads or drops positions inside its forward (as Longformer pads to a multiple of its "
        "attention window) or lays its states out otherwise, so cached states would not line up with its batches")


def _check_first_positions(shape: Sequence[int], mask: torch.Tensor) -> None:
    """Raise `TrunkLayoutError` unless states of ``shape`` hold one position of each sequence of ``mask``."""
    sequences = mask.numel() // mask.shape[-1]
    if len(shape) != 3 or shape[0] != sequences or shape[1] != 1:
        raise FirstPositionError(f"the stack's last layer, cut to its first position, gave states of {tuple(shape)[:-1]} "
                               f"for {sequences} sequences: they cannot be cached one per sequence")


@contextlib.contextmanager
def forward_context(split: TrunkSplit | None, batch: dict) -> Iterator[None]:
    """Inject the batch's cached trunk states (if it carries any) for the forwards inside the block."""
    hidden = batch.get(HIDDEN_KEY)
    if hidden is None or split is None:
        yield
        return
    with split.injected(hidden):
        yield


def split_tolerance(model: nn.Module) -> float:
    """The largest relative change of the logits `verify_split` accepts: 1e-9 for a float64 model (a clean split
    changes its logits by rounding only, ~1e-15; 1e-9 leaves room for float32 computed inside some models' attention),
    1e-4 otherwise."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return 1e-9 if dtypes == {torch.float64} else 1e-4


def verify_split(split: TrunkSplit, cache: TrunkCache, batcher, rows: Sequence[int], *,
                 reads: Callable[[object, dict], torch.Tensor] | None = None) -> float:
    """Largest difference between the full model's logits and the top-only logits (trunk states from ``cache``)
    on ``rows`` (collated together, so the shorter ones are padded), relative to the largest logit (compare it with
    `split_tolerance`). The rows are collated afresh, so a model whose states depend on the batch they were computed
    in (left padding without position ids, for instance), or whose top reads padding positions (their cached states
    are copies of the row's first token's), shows up here. A one-row cache built with ``full_forward`` holds the
    full model's outputs on that row collated alone, the same batch as here: they are used (and let go of) instead
    of running the model again.

    ``reads``: a ``loss_fn`` / ``measurement_fn`` of one's own, ``(outputs, batch) -> values``, which may read more
    than the logits. The model's other outputs that differ beyond `split_tolerance` (`_every_output`: the hidden
    states below the split, which the trunk does not compute under it; attentions) then count too where ``reads``
    depends on them (`reads_any`): a review's loss reading ``hidden_states[0]`` was 1.4% off, its split passing
    the check of the logits. One that reads only the last hidden state keeps the split."""
    batch = batcher.batch(rows, trunk=False)
    inputs = model_inputs(batch, split.model)
    full, cache.full_outputs = cache.full_outputs, None
    if full is not None and (len(batcher) != 1 or list(batcher.base_rows(rows)) != [0]):
        full = None  # (not the batch they were computed on)
    with torch.no_grad():
        full = split.model(**inputs) if full is None else full
        with split.injected(cache.hidden(batcher.base_rows(rows), batch)):
            top = split.model(**inputs)
    mask = _read_positions(batch, split.model)
    compared = _compared(full, mask), _compared(top, mask)
    if not compared[0] or len(compared[0]) != len(compared[1]) or any(
            f.shape != t.shape for f, t in zip(*compared)):
        return math.inf  # nothing to compare: the split is not used
    error = relative_difference(torch.cat([t.flatten() for t in compared[1]]),
                                torch.cat([f.flatten() for f in compared[0]]))
    if reads is None:
        return error
    full_all, top_all = dict(_every_output(full, mask)), dict(_every_output(top, mask))
    tolerance = split_tolerance(split.model)
    differing = {}  # (an output on one side only, a layer's attentions below the split, counts as differing: a
    # function that reads it from the top-only outputs raises there, which `reads_any` takes as a read)
    for path in full_all.keys() | top_all.keys():
        f, t = full_all.get(path), top_all.get(path)
        if t is None and f is None and path in full_all and path in top_all:
            continue
        off = math.inf if t is None or f is None or f.shape != t.shape else relative_difference(t.flatten(),
                                                                                                f.flatten())
        if off > tolerance:
            differing[path] = off
    leaves = [path for path in differing if top_all.get(path) is not None]
    if differing and reads_any(reads, top, leaves, batch):
        return max(error, *differing.values())
    return error


def output_entries(outputs) -> list[tuple[tuple, object]]:
    """``(path, value)`` for every entry of a model's ``outputs`` that is not a mapping or a sequence, through nested
    mappings and sequences (``hidden_states``, ``attentions``; a path is the keys and indices from the top), the loss
    aside."""
    found: list[tuple[tuple, object]] = []

    def walk(value, path: tuple) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if key != "loss":
                    walk(item, (*path, key))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, (*path, i))
        else:
            found.append((path, value))

    walk(outputs, ())
    return found


def _every_output(outputs, mask: torch.Tensor) -> list[tuple[tuple, torch.Tensor | None]]:
    """``(path, tensor)`` for every floating tensor in ``outputs`` but a loss (`output_entries`), in float64, those
    laid out by the batch's positions at ``mask``'s positions only; an entry that is None is listed with None."""
    return [(path, None if value is None else _at_tokens(value, mask).double())
            for path, value in output_entries(outputs)
            if value is None or (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0)]


def _at_tokens(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value`` at ``mask``'s positions where it is laid out like the mask, or like the mask with its leading
    dimensions flattened (a multiple-choice model's ``(rows × choices, s, h)`` hidden states against its ``(rows,
    choices, s)`` mask); else all of it."""
    flat = mask.reshape(-1, mask.shape[-1])
    for m in (mask, flat):
        if value.shape[:m.dim()] == m.shape:
            return value[m]
    return value


def reads_any(reads: Callable[[object, dict], torch.Tensor], outputs, paths: list[tuple], batch: dict) -> bool:
    """Whether ``reads(outputs, batch)`` depends on any of the tensors at ``paths`` in ``outputs``: each replaced by a
    leaf that requires a gradient, and the values' graph reaching one of them (a zero gradient counts: a marker mask
    that picks no row of these). A function that raises here counts as reading them. A read decided in Python on
    the rows' contents (an ``if`` on a marker token) is not seen on rows without it."""
    leaves: list[torch.Tensor] = []

    def swapped(value, path: tuple):
        if path in paths:
            leaves.append(value.detach().clone().requires_grad_(True))
            return leaves[-1]
        if isinstance(value, Mapping):
            out = copy.copy(value)
            for key in list(value.keys()):
                if key != "loss":
                    out[key] = swapped(value[key], (*path, key))
            return out
        if isinstance(value, (tuple, list)):
            return type(value)(swapped(item, (*path, i)) for i, item in enumerate(value))
        return value

    try:
        with torch.enable_grad():
            changed = swapped(outputs, ())
            values = reads(changed, batch)
            if not leaves or not isinstance(values, torch.Tensor) or not values.requires_grad:
                return False
            grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
    except Exception:  # noqa: BLE001 (whatever the function raised on these rows: taken as a read)
        return True
    return any(g is not None for g in grads)


def _read_positions(batch: dict, model: nn.Module) -> torch.Tensor:
    """The positions whose outputs a loss may read: the row's tokens, and padding positions with a label (token
    losses) or, for a causal LM (its labels shifted), followed by one: rows stored left-padded, whose first real token
    is predicted from the last pad, or labels copied over stored padding. Their cached states are copies of the first
    token's, so the cache was 63% off there while the tokens' logits agreed exactly."""
    from .loss import shifts_labels  # local: loss.py imports this module

    mask = _token_mask(batch)
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape and not labels.is_floating_point():
        labelled = labels != -100
        mask = mask | labelled
        if shifts_labels(model):
            mask[..., :-1] |= labelled[..., 1:]
    return mask


def _compared(outputs, mask: torch.Tensor) -> list[torch.Tensor]:
    """What `verify_split` compares, in float64: the logits (of real tokens only, for token logits laid out like the
    batch's tokens; all of them otherwise, so a state the cache does not hold shows up), or, for an
    output without logits (question answering's start / end logits), every floating tensor in it but a loss (by name,
    or any 0-dim tensor: a tuple output, ``return_dict=False``, names nothing, and a loss reduced over the batch
    covers the padding the cache does not hold), those with a value per position (``(b, s)``) at real tokens only."""
    from .loss import find_logits  # local: loss.py imports this module

    logits = find_logits(outputs)
    if logits is not None:
        return [(logits[mask] if logits.dim() == 3 and logits.shape[:2] == mask.shape else logits).double()]
    items = (outputs.items() if isinstance(outputs, Mapping)
             else enumerate(outputs) if isinstance(outputs, (tuple, list)) else ())
    tensors = [t for name, t in items
               if name != "loss" and isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]
    return [(t[mask] if t.shape == mask.shape else t).double() for t in tensors]
