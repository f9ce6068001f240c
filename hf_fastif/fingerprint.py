"""Content fingerprints: what a cache, a build or a table depends on, hashed from content (never ``id()``).

Tensors are hashed with xxh3-128 (`xxhash`, which `datasets` uses too): some 10 GB/s on one core against sha256's
1 GB/s, and every call of the engine hashes every weight of the model (0.08 s a call for MiniLM's 91 MB with
sha256, 0.01 s with xxh3). It is not a cryptographic hash: it tells versions of weights apart, it does not defend
against weights crafted to collide. The digests of the tensors are combined with sha256. Model fingerprints
recorded before this scheme (tensors hashed with sha256, `LEGACY_SCHEME`) carry no prefix; `model_fingerprint`
can still compute them, so a table recorded then is still checked (`InfluenceTable.check_model`).

- `model_fingerprint`: parameters *and* buffers (names, shapes, dtypes, values), the model's semantic
  config, and the adapters of a PEFT model (the active ones, and the plain settings of PEFT's layers such as
  LoRA's scaling and disabled adapters: `adapter_state`): equal for the same model loaded from anywhere.
- `tensors_fingerprint`: the same for a subset of named tensors (e.g. the frozen trunk below the
  influence parameters).
- `dataset_fingerprint`: every value of the given columns (Arrow IPC bytes), so two processes that
  loaded the same rows agree, and an edit anywhere in a dataset changes it.
- `callable_fingerprint`: a function's code, constants, defaults and closure values; for a collator
  (a dataclass or any object) its type and settings, including its tokenizer's.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import pathlib
import re
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
import xxhash
from torch import nn

from .utils import HALF_DTYPES

SCHEME = "xxh3-128"
"""How tensors are hashed; `model_fingerprint` prefixes its fingerprints with it."""
LEGACY_SCHEME = "sha256"
"""How tensors were hashed before `SCHEME` (fingerprints without a prefix)."""
_HASHES = {SCHEME: xxhash.xxh3_128, LEGACY_SCHEME: hashlib.sha256}

# config keys that do not change what a model computes (paths, versions, how attention is implemented)
_CONFIG_IGNORED = {"transformers_version", "attn_implementation", "dtype", "torch_dtype", "use_cache",
                   "output_attentions", "output_hidden_states", "return_dict", "architectures", "name_or_path"}


def tensor_digest(tensor: torch.Tensor, scheme: str = SCHEME) -> str:
    """Hash (`SCHEME`, or `LEGACY_SCHEME`) of one tensor's shape, dtype and values (half types hashed as float32)."""
    digest = _HASHES[scheme](f"{tuple(tensor.shape)}:{str(tensor.dtype)}".encode())
    data = tensor.detach().to("cpu")
    if data.dtype in HALF_DTYPES or not data.is_contiguous():
        data = data.to(torch.float32 if data.is_floating_point() else data.dtype).contiguous()
    if data.numel():  # (a view of zero bytes cannot be cast; the header holds all there is)
        digest.update(memoryview(data.numpy()).cast("B"))
    return digest.hexdigest()


def tensor_digests(model: nn.Module, scheme: str = SCHEME) -> dict[str, str]:
    """`tensor_digest` of every parameter and buffer by name (hash once, derive several fingerprints)."""
    return {name: tensor_digest(t, scheme) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor | str]]) -> str:
    """sha256 over named tensors' names and `tensor_digest`s (shapes, dtypes, values) in the given order; a value
    may be given as its digest already."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}={tensor if isinstance(tensor, str) else tensor_digest(tensor)};".encode())
    return digest.hexdigest()


def config_fingerprint(model: nn.Module, adapter_settings: bool = True, inferred_problem_type: bool = True) -> str:
    """sha256 of the config entries that decide what the model computes (not paths, versions or the attention
    implementation), plus the adapters of a PEFT model (`adapter_state`)."""
    config = getattr(model, "config", None)
    values = {}
    if config is not None and hasattr(config, "to_dict"):
        values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_IGNORED}
        if inferred_problem_type and values.get("problem_type") == _inferred_problem_type(values):
            # what transformers writes into the config on the first forward with class-id labels (an evaluation
            # loop), and what an unset one means for them: the same model before and after that forward
            values["problem_type"] = None
    adapters = getattr(model, "active_adapters", None)
    if callable(adapters):
        try:
            adapters = adapters()
        except (ValueError, AttributeError):  # transformers raises when no adapter is loaded
            adapters = None
    values["__active_adapters__"] = adapters
    state = adapter_state(model) if adapter_settings else {}
    if state:  # (only then: the fingerprints of models without adapters stay what tables recorded before)
        values["__adapter_state__"] = state
    values["__class__"] = type(model).__name__
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _inferred_problem_type(config: dict) -> str | None:
    """The ``problem_type`` a transformers classifier sets on its first forward with class ids (or, for one label,
    regression targets)."""
    num_labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    if num_labels is None:
        return None
    return "regression" if num_labels == 1 else "single_label_classification"


ADAPTER_SETTINGS = frozenset({
    "scaling", "r", "lora_alpha", "alpha", "use_dora", "use_rslora", "fan_in_fan_out", "is_feedforward",
    "_disable_adapters", "merged_adapters", "_active_adapter", "active_adapter", "_adapters_disabled"})
"""Attributes of PEFT's modules that change what they compute and live outside tensors (`adapter_state`)."""
_SKIP = object()
_SCALARS = (str, int, float, bool, type(None))  # plain values: what the settings fingerprints read


def _plain(value):
    """``value`` made JSON-stable (sets sorted, tuples as lists) when it is built of numbers, strings, booleans and
    None (a dict: its entries that are); `_SKIP` for anything else (tensors, modules, functions) and for empty
    containers, so a cache that fills with tensors in a forward (DoRA's) reads the same before and after."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        if not items or any(v is _SKIP for v in items):
            return _SKIP
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):  # its plain entries (a config's nested objects are left out)
        items = {str(k): v for k, v in ((k, _plain(v)) for k, v in value.items()) if v is not _SKIP}
        return items or _SKIP
    return _SKIP


def adapter_state(model: nn.Module) -> dict:
    """What a PEFT model computes with beyond its tensors: the `ADAPTER_SETTINGS` of every module PEFT made (a
    LoRA layer's ``scaling``, set by ``rescale_adapter_scale`` / ``set_scale`` or by ``lora_alpha``; its disabled,
    merged and active adapters). Without them, a second call after ``with model.disable_adapter():`` or a rescale
    was served the first call's trunk states and Hessian. Named settings only, not every attribute: accelerate
    marks a prepared model (``_is_accelerate_prepared``), and PEFT's internals change between its versions, neither
    of which changes a number. Not the adapters' configs either: they hold paths, versions and ``inference_mode``,
    which differ between loads of the same model, and what they set lives in the layers. Empty for a model
    without adapters."""
    state: dict = {}
    for name, module in model.named_modules():
        if not type(module).__module__.startswith("peft."):
            continue
        settings = {k: _plain(v) for k, v in vars(module).items() if k in ADAPTER_SETTINGS}
        settings = {k: v for k, v in settings.items() if v is not _SKIP}
        if settings:
            state[name] = settings
    return state


STATE_IGNORED = frozenset({"training", "name_or_path", "gradient_checkpointing"})
"""Module attributes `module_state_description` leaves out (with private ones, such as transformers' ``_use_kernels``):
the train / eval flag, where the weights were loaded from (a model loaded again from its saved folder is the same
model: a Space's warm start rebuilt every saved cache), and gradient checkpointing's flag, which influence turns off
(`hf_fastif.mode.influence_mode`) and which a layer holds only once it was ever set (a build of a model trained with
checkpointing could not be resumed from the same model loaded again)."""


_HELD_CONTAINERS = (torch.Tensor, np.ndarray, dict, list, tuple, set, frozenset)
"""A module's public attributes that `module_state_description` describes by what they hold (beside plain values)."""

_HELD_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)
"""A module's public attributes that are functions (``GELUActivation.act``; an activation set as ``module.act =
torch.tanh``): `module_state_description` follows them by what they compute (`_settings`)."""


def module_state_description(model: nn.Module) -> tuple:
    """What a module computes with besides its tensors, config and code, for the engine's cache keys (not a table's
    recorded fingerprint), as a `_settings` description: every module's public plain attributes but `STATE_IGNORED`
    (a LayerNorm's ``eps``, a dropout's ``p``), its public tensors, arrays and containers by what they hold, its
    public functions (`_HELD_FUNCTIONS`), its class, its forward, pre-forward and backward hooks and a ``forward``
    replaced on the instance, with torch's global module hooks. A held engine kept the trunk states and kNN index of
    the model before a hook was registered (activation patching, an ablation: values 0.014 off a fresh engine's) or
    an ``eps`` was set, and, before the class was part of it, the Hessian and trunk states of a model whose activation
    module was swapped for another without parameters (``layer.intermediate.intermediate_act_fn = nn.Tanh()``, in a
    review: 4-17% off a fresh engine's values). What hooks record grows with every forward: `settings_differences`
    tells it from a change."""
    from torch.nn.modules import module as torch_module

    names = _MODULE_NAMES.set({id(m): name for name, m in model.named_modules()})
    try:
        parts = []  # (tuples throughout: only a list the modules hold may grow, `settings_differences`)
        for name, module in model.named_modules():
            public = _public_attributes(module)
            attributes = tuple(sorted((k, v) for k, v in public if isinstance(v, _SCALARS)))
            # a tensor or array held as a plain attribute (not a parameter or buffer), alone or in a container, or
            # a settings container, which a hook or a patched forward reads (a steering vector set as module.steer,
            # {"v": t}, [t]; {"scale": 1.2}; PEFT's per-adapter dicts): by its values, as a hook's own
            attributes += tuple((k, _settings(v)) for k, v in sorted(public, key=lambda kv: kv[0])
                                if isinstance(v, _HELD_CONTAINERS + _HELD_FUNCTIONS))
            hooks = [_settings(hook) for hooks in (module._forward_pre_hooks, module._forward_hooks,
                                                   module._backward_pre_hooks, module._backward_hooks)
                     for hook in hooks.values()]
            own = vars(module).get("forward")
            if own is not None and "_original_forward" not in vars(module):  # (accelerate's autocast wrapper:
                # influence runs without it, `hf_fastif.mode.influence_mode`) a forward replaced on the instance (a
                # partial bound to the module, as accelerate's device-map hooks make, counts the module by its name)
                hooks.append(("forward", _settings(own)))
            parts.append((name, f"{type(module).__module__}.{type(module).__qualname__}", attributes, tuple(hooks)))
        parts.append(("<global hooks>", tuple(_settings(hook) for hooks in (
            torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks,
            torch_module._global_backward_pre_hooks, torch_module._global_backward_hooks) for hook in hooks.values())))
    finally:
        _MODULE_NAMES.reset(names)
    return tuple(parts)


def _public_attributes(module: nn.Module) -> list[tuple[str, object]]:
    """A module's public attributes but `STATE_IGNORED` and PEFT's adapter configs (its plain settings live there: a
    LayerNorm's ``eps``, a loss module's ``label_smoothing``). The configs hold ``inference_mode`` and a
    ``modules_to_save`` list that loading extends in place: the same adapter reloaded had another key (a build could
    not be resumed); what they set lives in the layers, which `adapter_state` and the tensors count."""
    return [(k, v) for k, v in vars(module).items()
            if k not in STATE_IGNORED and not k.startswith("_") and not _peft_configs(v)]


def _peft_configs(value) -> bool:
    """Whether ``value`` is a PEFT config, or a dict of them (``peft_config``: one per adapter)."""
    def config(v) -> bool:
        return type(v).__module__.startswith("peft.") and hasattr(v, "peft_type")

    return config(value) or (isinstance(value, dict) and bool(value) and all(map(config, value.values())))


def module_settings(module: nn.Module) -> tuple:
    """The plain settings (`_SCALARS` among `_public_attributes`) of a module and each of its submodules, by name: what
    a module outside the model computes with beside its tensors (``nn.CrossEntropyLoss(label_smoothing=0.1)`` in a
    loss function: changed in place, or another value in the next process, it was served the first one's Hessian,
    13% off)."""
    return tuple((name, tuple(sorted((k, v) for k, v in _public_attributes(m) if isinstance(v, _SCALARS))))
                 for name, m in module.named_modules())


def description_key(description) -> str:
    """The sha256 of a `_settings` description."""
    return hashlib.sha256(repr(description).encode()).hexdigest()


def settings_differences(old, new) -> dict[tuple, str]:
    """Where the `_settings` description ``new`` differs from ``old``: ``{path: "grew"}`` for a list that only grew
    (its first entries as they were: a hook appending gradient norms or activations; a long one under the same
    identity and first entries), ``{path: "changed"}`` for anything else (a path is the keys and indices from the
    top). A held engine absorbs only what it saw happen in its own calls (`InfluenceEngine._module_state`)."""
    out: dict[tuple, str] = {}
    _differences(old, new, (), out)
    return out


def _differences(old, new, path: tuple, out: dict) -> None:
    if old == new:
        return
    if isinstance(old, list) and isinstance(new, list) and len(new) > len(old) and new[:len(old)] == old:
        out[path] = "grew"
        return
    if isinstance(old, list) and isinstance(new, _Big) and new[0] == "list" and len(old) < new[3] \
            and tuple(old[:8]) == new[2][:len(old[:8])]:
        out[path] = "grew"  # (a list past `SETTINGS_BREADTH`: described by identity from then on)
        return
    if isinstance(old, _Big) and isinstance(new, _Big) and old[0] == "list" and old[:3] == new[:3] \
            and new[3] > old[3]:
        out[path] = "grew"
        return
    if type(old) is type(new) and not isinstance(old, _Big):
        if isinstance(old, (tuple, list)) and len(old) == len(new):
            for i, (o, n) in enumerate(zip(old, new)):
                _differences(o, n, (*path, i), out)
            return
        if isinstance(old, dict) and old.keys() == new.keys():
            for k in old:
                _differences(old[k], new[k], (*path, k), out)
            return
    out[path] = "changed"


def model_fingerprint(model: nn.Module, digests: dict[str, str] | None = None, scheme: str = SCHEME, *,
                      adapter_settings: bool = True, inferred_problem_type: bool = True) -> str:
    """Fingerprint of a model's parameters and buffers (names, shapes, dtypes, values), its semantic config and its
    adapters' settings: equal for the same model loaded from anywhere, different after any change of weights.
    ``"xxh3-128:"`` and a sha256 over the tensors' digests.

    Args:
        digests: `tensor_digests(model, scheme)` if already computed (the model is not hashed again); they must be
            of the same ``scheme``.
        scheme: `LEGACY_SCHEME` computes the fingerprint that hf_fastif recorded before `SCHEME` (no prefix).
        adapter_settings: include a PEFT model's `adapter_state`; False computes what hf_fastif recorded for such a model
            before it did (`InfluenceTable.check_model` falls back to it).
        inferred_problem_type: hash a ``problem_type`` that transformers infers for class ids as unset (see
            `config_fingerprint`); False computes what hf_fastif recorded before it did."""
    digests = digests if digests is not None else tensor_digests(model, scheme)
    config = config_fingerprint(model, adapter_settings, inferred_problem_type)
    combined = tensors_fingerprint([("__config__", config), *digests.items()])
    return combined if scheme == LEGACY_SCHEME else f"{scheme}:{combined}"


def fingerprint_scheme(fingerprint: str) -> str:
    """The scheme a `model_fingerprint` was made with (`LEGACY_SCHEME` for one without a prefix).

    Raises:
        ValueError: the prefix names a scheme this hf_fastif does not know (a fingerprint from a newer version)."""
    prefix, found, _ = fingerprint.partition(":")
    if not found:
        return LEGACY_SCHEME
    if prefix not in _HASHES:
        raise ValueError(f"The fingerprint {fingerprint[:40]!r}... was made with the hashing scheme {prefix!r}, which "
                         f"this hf_fastif does not know (it knows {sorted(_HASHES)}): it was recorded by a newer "
                         "version; upgrade hf_fastif to check it.")
    return prefix


class _HashWriter:
    """A file-like sink that hashes what is written to it (for Arrow's IPC writer)."""

    def __init__(self, digest):
        self.digest = digest
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def dataset_fingerprint(dataset, columns: Sequence[str] | None = None) -> str:
    """sha256 of every value of ``columns`` (default: all) of a `datasets.Dataset`, in row order.

    In-memory datasets get random ``_fingerprint`` values, so processes that loaded the same rows cannot
    compare those, and two datasets with other rows can share one (a ``map`` that draws at random, run twice);
    this hashes the rows themselves (Arrow IPC stream of the columns, sha256: about 1 GB/s on one core, 0.06 s for
    100,000 rows of 128 token ids with their attention mask and token types; 0.3 s for rows behind an indices
    mapping, which are gathered). The stream is written in blocks of
    `HASH_BLOCK_ROWS` rows, each one contiguous chunk, so the same values hash the same however Arrow holds them
    (one chunk in memory, several after ``save_to_disk`` / ``load_from_disk`` or ``concatenate_datasets``, an
    indices mapping or a slice after ``select``); one block is read and copied at a time."""
    columns = list(columns) if columns is not None else list(dataset.column_names)
    digest = hashlib.sha256(json.dumps([len(dataset), columns]).encode())
    if not len(dataset):
        return digest.hexdigest()
    rows = dataset.select_columns(columns)
    # the stored rows, and an indices mapping onto them (select, shuffle, train_test_split), taken a block at a time
    # (datasets' own slicing of a mapping reads its rows one at a time: 30x slower)
    table, indices = rows.data.table, getattr(rows, "_indices", None)
    schema = table.schema.remove_metadata()
    sink = _HashWriter(digest)
    with pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(dataset), HASH_BLOCK_ROWS):
            block = (table.slice(start, HASH_BLOCK_ROWS) if indices is None
                     else table.take(indices.column(0).slice(start, HASH_BLOCK_ROWS).combine_chunks()))
            # each column concatenated into fresh buffers: the IPC bytes of a zero-copy slice depend on where it
            # was cut from (the same bytes as `take` gave, which copied 8x slower)
            block = pa.Table.from_arrays([pa.concat_arrays(column.chunks) for column in block.columns], schema=schema)
            writer.write_batch(block.to_batches()[0])
    return digest.hexdigest()


def content_fingerprint(dataset, columns: Sequence[str] | None = None) -> str:
    """What every cache and build of a dataset is keyed on: `dataset_fingerprint` of ``columns`` (default: all),
    and where it changes the rows the collator gets, what turns the stored values into them: the format (numpy's
    float64 labels stay float64; a format's ``columns`` hands out only some: without a stored attention mask the
    collator makes its own) and the features that decode them (a cast to another sampling rate or image mode keeps
    the stored bytes). A dataset without a format or decoded features keeps its plain `dataset_fingerprint`."""
    from datasets.features.features import require_decoding

    digest = dataset_fingerprint(dataset, columns)
    fmt = dataset.format
    kind, kwargs, shown = fmt.get("type"), fmt.get("format_kwargs") or {}, fmt.get("columns")
    shown = None if shown is None or list(shown) == dataset.column_names else list(shown)
    decoded = any(require_decoding(feature) for feature in dataset.features.values())
    if kind is not None or kwargs or shown is not None or fmt.get("output_all_columns") or decoded:
        described = [kind, repr(sorted(kwargs.items())), shown, bool(fmt.get("output_all_columns")),
                     repr(dataset.features) if decoded else None]
        digest = hashlib.sha256(f"{digest}|{json.dumps(described)}".encode()).hexdigest()
    return digest


HASH_BLOCK_ROWS = 65_536
"""Rows per block of `dataset_fingerprint`'s stream (part of the hash: changing it changes every fingerprint)."""


MAX_DEPTH = 3
"""How deep `callable_fingerprint` follows values (closures, defaults, a bound method's object, containers); deeper
values count by their type's name."""


class _Fields(dict):
    """A callable's own keyword defaults, a partial's keywords or an object's attributes, gathered to be described."""


def _describe_value(value, depth: int = 0):
    """A JSON-able description of a value captured by a callable (closure cells, defaults, attributes). An empty
    container is described whole at any depth: nothing of it is cut (an empty closure past the depth limit recorded a
    cut, and `portable_fingerprint` fell back to addresses for a function three calls down)."""
    if isinstance(value, (list, tuple, dict)) and not value:
        return {} if isinstance(value, dict) else []  # (as the branches below describe them)
    if _beyond(depth):
        return type(value).__qualname__
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return "tensor:" + _tensor_content(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:  # its bytes are pointers: the elements instead
            return {"object_array": str(value.shape), "values": _describe_value(value.ravel().tolist(), depth + 1)}
        return "array:" + hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest() + str(value.shape)
    if isinstance(value, (list, tuple)):
        return [_describe_value(v, depth + 1) for v in value]
    if isinstance(value, dict):
        # keys by str where all are strings; else typed ({1: ..} and {"1": ..} were alike by str)
        key = str if all(isinstance(k, str) for k in value) else (lambda k: f"{type(k).__qualname__}:{k!r}")
        return {key(k): _describe_value(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: key(kv[0]))}
    if isinstance(value, (set, frozenset)) and _PORTABLE.get():  # (a set's repr orders by hash: per process)
        return {type(value).__name__: sorted((_describe_value(v, depth + 1) for v in value), key=repr)}
    if isinstance(value, nn.Module):  # (its tensors and config, and its plain settings: a loss module's smoothing)
        return ("module:" + type(value).__qualname__ + ":" + model_fingerprint(value) + ":"
                + description_key(module_settings(value)))
    if inspect.ismodule(value) or inspect.isclass(value):  # (reached through an object's attributes: by name)
        return f"{type(value).__qualname__}:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}" \
            if inspect.isclass(value) else f"module:{value.__name__}"
    # a tokenizer (callable, so before the callable branch, whose depth limit would cut it to type names):
    # its settings and vocabulary
    if _is_tokenizer(value):
        vocab = hashlib.sha256(json.dumps(sorted(value.get_vocab().items())).encode()).hexdigest()
        return {type(value).__qualname__: {"vocab": vocab, **{k: repr(getattr(value, k, None))
                                                               for k in TOKENIZER_SETTINGS}}}
    if callable(value):
        return callable_fingerprint(value, depth + 1)
    if dataclasses.is_dataclass(value):
        return {type(value).__qualname__: {f.name: _describe_value(getattr(value, f.name, None), depth + 1)
                                           for f in dataclasses.fields(value)}}
    # another object: by its repr (for a plain object, its address: two live instances never look alike) and its own
    # plain attributes (values, tensors, arrays, modules: one changed in place is seen, and so is a freed object's
    # address given to one with other settings); attributes that are objects by their identity only (following them
    # walked whole object graphs on every call)
    if _PORTABLE.get():  # nothing process-specific: the type, a repr of its own without addresses, the attributes
        return _portable_object(value, depth)
    described = type(value).__qualname__ + ":" + _repr_or_identity(value)
    attributes = {str(k): _describe_value(v, depth + 1) if _plain_attribute(v) else f"{type(v).__qualname__}@{id(v)}"
                  for k, v in sorted(_attributes(value).items(), key=lambda kv: str(kv[0]))}
    if not attributes and type(value).__repr__ is not object.__repr__ and not isinstance(value, COMPLETE_REPR):
        # state Python cannot see, shown by a repr of its own that may leave values out (a pyarrow Table's shows its
        # first and last rows): by its identity too, so two such objects are never taken for one another
        described += f"@{id(value)}"
    return {described: attributes} if attributes else described


_PORTABLE = contextvars.ContextVar("hf_fastif_portable_fingerprint", default=None)
"""While `portable_fingerprint` runs: a one-element list, set to True when a value was cut at the depth limit."""
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
PORTABLE_MAX_DEPTH = 6
"""How deep `portable_fingerprint` follows values (plain objects by their attributes, so deeper than `MAX_DEPTH`)."""


COMPLETE_REPR = (torch.dtype, torch.device, np.dtype, enum.Enum, pathlib.PurePath, re.Pattern, range, slice, complex)
"""Types whose repr holds all their state (`portable_fingerprint` describes them by it)."""


def _portable_object(value, depth: int):
    """A plain object as `portable_fingerprint` describes it: its type, its repr where that holds its state, and its
    attributes followed by content. An object whose state Python cannot see (no attributes: a C object such as a
    random generator, a pandas block manager), or whose repr cannot be read, is recorded as a cut: the fingerprint
    then falls back to the address-based one (two such objects never look alike)."""
    if isinstance(value, COMPLETE_REPR):
        return f"{type(value).__qualname__}:{value!r}"
    attributes = _attributes(value)
    try:
        shown = repr(value) if type(value).__repr__ is not object.__repr__ else ""
    except Exception:  # a repr that raises
        shown, attributes = "", {}
    if not attributes:
        _record_cut()
        return type(value).__qualname__
    described = type(value).__qualname__ + (":" + _ADDRESS.sub("", shown) if shown else "")
    return {described: {str(k): _describe_value(v, depth + 1)
                        for k, v in sorted(attributes.items(), key=lambda kv: str(kv[0]))}}


def _record_cut() -> None:
    """Under `portable_fingerprint`: a value could not be described without its address (it falls back)."""
    cut = _PORTABLE.get()
    if cut is not None:
        cut[0] = True


def _beyond(depth: int) -> bool:
    """Whether a value at ``depth`` is past the depth limit (and so counts by its type's name only); under
    `portable_fingerprint`, such a cut is recorded."""
    beyond = depth > (MAX_DEPTH if _PORTABLE.get() is None else PORTABLE_MAX_DEPTH)
    if beyond:
        _record_cut()
    return beyond


def portable_fingerprint(fn) -> str:
    """`callable_fingerprint` without anything that differs between processes: a plain object (a collator's options)
    counts by its type and its attributes, followed to `PORTABLE_MAX_DEPTH`, not by its address. What processes of a
    launch compare, and what a build's manifest records for the next run: with addresses, every launch with such a
    collator was refused as "processes disagree", and a build could never be resumed. Where that depth does not
    reach every value (a settings object nested deeper), two such callables could look alike, so the address-based
    `callable_fingerprint` is returned instead (such a build is not resumed, and such processes are refused, as
    before). Within one process the engine keys its caches on `callable_fingerprint`, which tells two live
    instances apart."""
    cut = [False]
    token = _PORTABLE.set(cut)
    try:
        portable = callable_fingerprint(fn)
    finally:
        _PORTABLE.reset(token)
    return callable_fingerprint(fn) if cut[0] else portable


def portable_module_state(model: nn.Module) -> str:
    """`description_key` of `module_state_description`, described as `portable_fingerprint` describes a callable's
    values: what a build's manifest records of the modules' state beside the weights, config and code (an ``eps`` set
    in place, a hook, an activation swapped: a resumed build served the shards computed before such a change, 2.3 off
    a fresh build's values, in a review). Take it as influence runs the model (`hf_fastif.mode.influence_mode`: without
    gradient checkpointing and its input-gradient hook, which a trained model carries and a loaded one does not). The
    same for a model loaded again in another process; a value held only by identity (a tensor over
    `DIGEST_BYTES` or in a long list a hook keeps, a list of over `SETTINGS_BREADTH` other objects) makes it this
    process's own: such a build is not resumed, and the processes of a launch are refused as holding other builds."""
    token = _PORTABLE.set([False])
    try:
        return description_key(module_state_description(model))
    finally:
        _PORTABLE.reset(token)


LIBRARY_MODULES = ("torch", "transformers", "peft", "builtins")
"""Top-level packages whose classes' code `model_code_fingerprint` counts by the transformers version (or not at all)."""


def model_code_fingerprint(model: nn.Module) -> dict:
    """What a model computes besides its weights and config, for what is kept across runs (a build's manifest): the
    transformers version (its modelling code) and the code of every module class from elsewhere (a trust_remote_code
    model's ``modeling_*.py``, a head of one's own, and their bases): each class's own functions by
    `portable_fingerprint` (code, constants, defaults, the module-level functions and values they read). A build
    whose model code changed was resumed with the old code's shards (80% off a fresh build)."""
    import transformers

    custom = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            name = f"{cls.__module__}.{cls.__qualname__}"
            if cls.__module__.split(".")[0] in LIBRARY_MODULES or name in custom:
                continue
            functions = _class_functions(cls, portable_fingerprint)
            custom[name] = hashlib.sha256(json.dumps(functions, sort_keys=True).encode()).hexdigest()
    return {"transformers": transformers.__version__, "classes": dict(sorted(custom.items()))}


def _class_functions(cls: type, describe: Callable[[Callable], str], *,
                     callable_object: bool = False) -> dict[str, list[str]]:
    """``describe`` of each function a class defines itself (methods, static and class methods, a property's
    getter, setter and deleter), by name. ``callable_object``: for a callable object's key, not its dunder methods
    but ``__call__``, and also what wraps a function (``functools.lru_cache``, ``cached_property``,
    ``partialmethod`` with its plain arguments) and the class's plain values (``FACTOR = 2`` read as
    ``self.FACTOR``)."""
    functions = {}
    for key, value in vars(cls).items():
        dunder = key.startswith("__") and key.endswith("__")
        if callable_object and dunder and key != "__call__":
            continue
        extra = []
        if isinstance(value, property):
            parts = [value.fget, value.fset, value.fdel]
        elif callable_object and isinstance(value, functools.cached_property):
            parts = [value.func]
        elif callable_object and isinstance(value, functools.partialmethod):
            parts = [value.func]
            plain = lambda v: v if isinstance(v, _SCALARS) else type(v).__qualname__  # noqa: E731
            extra = [repr([*map(plain, value.args), *((k, plain(v)) for k, v in sorted(value.keywords.items()))])]
        else:
            parts = [getattr(value, "__func__", value)]
        if callable_object:
            parts = [inspect.unwrap(f) if callable(f) and hasattr(f, "__wrapped__") else f for f in parts]
        described = [describe(f) for f in parts if inspect.isfunction(f)] + extra
        if callable_object and not described and not dunder and isinstance(value, _SCALARS):
            described = [repr(value)]
        if described:
            functions[key] = described
    return functions


def _is_tokenizer(value) -> bool:
    """A transformers tokenizer (described by its vocabulary and its padding / truncation settings)."""
    try:  # (an options object whose __getattr__ raises KeyError, not AttributeError: not a tokenizer)
        return hasattr(value, "init_kwargs") and callable(getattr(value, "get_vocab", None))
    except Exception:
        return False


def _plain_attribute(value) -> bool:
    """Values `_describe_value` describes by their content: plain values, tensors, arrays, modules, containers of
    plain values (an object's attributes and a function's globals)."""
    return (isinstance(value, (*_PLAIN, torch.Tensor, np.ndarray, nn.Module))
            or (isinstance(value, (list, tuple, dict)) and _plain_container(value)))


def _attributes(value) -> dict:
    """An object's own attributes: its ``__dict__`` and its ``__slots__`` values."""
    out = dict(getattr(value, "__dict__", None) or {})
    for cls in type(value).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                out.setdefault(name, getattr(value, name))
    return out


def callable_fingerprint(fn, depth: int = 0) -> str:
    """sha256 of what a callable computes, as far as Python shows it: its code (bytecode, constants, names),
    defaults, closure values and the module-level values it reads (`_read_globals`); for bound methods also the
    object's settings; for other callable objects (a collator) their type and attributes. Two different lambdas
    differ even if they once shared an address."""
    if fn is None:
        return "none"
    if isinstance(fn, functools.partial):
        description = {"partial": callable_fingerprint(fn.func, depth + 1),
                       "args": _describe_value(tuple(fn.args), depth + 1),
                       "kwargs": _describe_value(_Fields(fn.keywords), depth + 1)}
    elif inspect.ismethod(fn):
        description = {"method": callable_fingerprint(fn.__func__, depth + 1),
                       "self": _describe_value(fn.__self__, depth + 1) if not _beyond(depth + 1)
                       else type(fn.__self__).__qualname__}
    elif inspect.isfunction(fn):
        code = fn.__code__
        closure = [c.cell_contents for c in fn.__closure__ or () if _cell_filled(c)]
        description = {"qualname": fn.__qualname__, "module": fn.__module__, "code": _code_digest(code),
                       "defaults": _describe_value(tuple(fn.__defaults__ or ()), depth + 1),
                       "kwdefaults": _describe_value(_Fields(fn.__kwdefaults__ or {}), depth + 1),
                       "closure": _describe_value(tuple(closure), depth + 1),
                       "globals": _read_globals(fn, depth + 1)}
    elif inspect.isbuiltin(fn) or inspect.isclass(fn):
        bound = getattr(fn, "__self__", None)
        name = getattr(fn, "__qualname__", None) or _repr_or_identity(fn)
        description = {"builtin": f"{getattr(fn, '__module__', '')}.{name}"}
        if bound is not None and not inspect.ismodule(bound) and not inspect.isclass(bound):  # t.matmul: t's data
            description["self"] = _describe_value(bound, depth + 1)
    else:
        # dataclass fields read directly (dataclasses.asdict would deep-copy a collator's tokenizer)
        attributes = ({f.name: getattr(fn, f.name, None) for f in dataclasses.fields(fn)}
                      if dataclasses.is_dataclass(fn) else _attributes(fn))
        if not attributes and not hasattr(type(fn).__call__, "__code__"):  # a C callable (itemgetter("a")): its repr
            attributes = {"__repr__": _repr_or_identity(fn)}
            if _ADDRESS.search(attributes["__repr__"]):
                _record_cut()
        description = {"object": type(fn).__qualname__, "module": type(fn).__module__,
                       "call": _code_digest(type(fn).__call__.__code__) if hasattr(type(fn).__call__, "__code__") else "",
                       "attributes": _describe_value(_Fields(attributes), depth + 1)}
        if not _beyond(depth):
            # the functions of its classes outside torch / transformers / peft, with what they close over and read:
            # ``__call__`` reaching a helper through ``self.`` (a method, a static method, a DataCollatorMixin's
            # ``torch_call``) changed what the object computes without changing its key, and a held trainer or
            # saved caches served the old loss's table (72% off) or trunk states (8.7% off), in a review. (Not the
            # other dunders: what ``__init__`` sets is in the attributes, and a dataclass's ``__repr__`` closes over
            # a set, which counts by its address.)
            # (at the object's own depth, as a function loss's code is: one level deeper, a loss object whose
            # helper called three nested module-level functions was cut there, and `portable_fingerprint` fell
            # back to addresses, different in every process; left out where there are none, so that a library
            # collator's key is the one it had)
            methods = {f"{cls.__module__}.{cls.__qualname__}": _class_functions(
                cls, lambda f: callable_fingerprint(f, depth), callable_object=True)
                for cls in type(fn).__mro__ if (cls.__module__ or "").split(".")[0] not in LIBRARY_MODULES}
            methods = {name: functions for name, functions in methods.items() if functions}
            if methods:
                description["methods"] = methods
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _repr_or_identity(value) -> str:
    """`repr(value)`; one that raises gives the value's address (in the " at 0x.." form, so that
    `portable_fingerprint` records a cut and falls back): such a value is never taken for another."""
    try:
        return repr(value)
    except Exception:
        return f"<unreadable {type(value).__qualname__} at {id(value):#x}>"


def _read_globals(fn, depth: int) -> dict:
    """The module-level values a function reads (class weights in a global tensor, a temperature, a helper function
    it calls, recursively), so that changing one changes its fingerprint. Imported modules and classes are left out
    (library code); another object counts by its type and public plain attributes (`_global_object`), never by a
    repr with an address, which would differ between processes: a build resumed in a new process would look like
    another build."""
    out = {}
    for name, value in _global_reads(fn):
        hashed = (_plain_attribute(value) or isinstance(value, functools.partial) or inspect.isfunction(value)
                  or _is_tokenizer(value))  # (a collator lambda padding with a global tokenizer: its padding side)
        if _beyond(depth):
            out[name] = type(value).__qualname__
        elif hashed:
            out[name] = _describe_value(_without_records(fn, name, value), depth)
        else:  # another object (a script's settings: CFG.temperature, an argparse Namespace): its public plain
            # attributes, without its address (a loss reading one was keyed by the type's name alone: changed, the
            # held engine served the old loss's Hessian, 20% off; and a build resumed with another value)
            out[name] = _global_object(value)
    return out


def _global_reads(fn) -> list[tuple[str, object]]:
    """``(name, value)`` of the module-level values a function's code loads, by name, but imported modules and
    classes (their code is the library's: hashed by version where it matters)."""
    scope = getattr(fn, "__globals__", {})
    return [(name, scope[name]) for name in sorted(_loaded_globals(fn.__code__) & scope.keys())
            if not (inspect.ismodule(scope[name]) or inspect.isclass(scope[name]))]


def _global_object(value) -> object:
    """A module-level object a function reads, as `_read_globals` and `_settings` describe it where nothing else does:
    an object of a class of the user's own (a script's ``CFG``; not a library's: a logger, an ``Accelerator`` or
    ``PartialState``, a ``Trainer``) by its type and its public plain values (`_SCALARS`: ``CFG.temperature``), but
    `PER_PROCESS_ATTRIBUTES`; anything else by its type's name. No address, so processes agree (a build's manifest,
    a launch's check). Bounded: no tensors, modules or containers are followed (a tracker's history, a model behind a
    trainer were hashed on every call), and an object whose attributes cannot be read counts by its type."""
    name = type(value).__qualname__
    values = _settings_values(value)
    kind = (type(value).__module__, name)
    plain = {k: v for k, v in (values or {}).items()
             if not k.startswith("_") and k not in PER_PROCESS_ATTRIBUTES and (*kind, k) not in _CALL_RECORDS}
    return {name: dict(sorted(plain.items()))} if plain else name


def _settings_values(value) -> dict[str, object] | None:
    """The scalar attributes (`_SCALARS`) of an object `_global_object` follows, one of a class of the user's own or
    a namespace; None for any other, and for one whose attributes cannot be read (a ``__getattr__`` that raises
    KeyError, a proxy whose ``__dict__`` raises)."""
    if not (_users_class(type(value)) or isinstance(value, _NAMESPACES)):
        return None
    try:
        attributes = _attributes(value)
    except Exception:
        return None
    return {str(k): v for k, v in attributes.items() if isinstance(v, _SCALARS)}


_CALL_RECORDS: set[tuple[str, str, str]] = set()
"""``(module, class, attribute)`` of user objects' values that changed during an engine's own call (`note_records`):
a counter a loss keeps (``STATS.calls += 1``) is a record, not a setting, and `_global_object` leaves it out (it keyed
the held engine's caches anew on every call). A module-level dict's scalar entry is recorded the same way, and a
module-level list that grew during two calls (`_container_values`, keyed by `_container_key`): ``CALLS["n"] += 1``, ``LOSSES.append(...)``; `_without_records` leaves them
out."""


_LIST_LENGTH = "len"
"""The entry of a module-level list's `_container_key` (a dict's entries are their keys' reprs, quoted)."""


def _container_key(fn, name: str, entry: str) -> tuple[str, str, str]:
    """The `_CALL_RECORDS` key of ``entry`` of the module-level container ``fn`` reads as ``name``: its module, the
    global's name, and a dict key's repr or `_LIST_LENGTH`."""
    return getattr(fn, "__globals__", {}).get("__name__", ""), f"global {name}", entry


def _is_list_length(key: tuple[str, str, str]) -> bool:
    """Whether a `global_values` key is a module-level list's length (`_container_key`)."""
    return key[1].startswith("global ") and key[2] == _LIST_LENGTH


def _container_values(fn, name: str, value) -> dict[tuple[str, str, str], object]:
    """What `note_records` watches of a module-level dict or list that ``fn`` reads as ``name``: a dict's scalar
    entries, a list's length (a list a loss appends to grows; its items are not compared, which would cost what it
    holds)."""
    if isinstance(value, dict):
        return {_container_key(fn, name, repr(k)): v for k, v in value.items() if isinstance(v, _SCALARS)}
    return {_container_key(fn, name, _LIST_LENGTH): len(value)} if isinstance(value, list) else {}


def _without_records(fn, name: str, value):
    """A module-level dict or list ``fn`` reads as ``name``, less what `_CALL_RECORDS` holds of it: a dict without
    its recorded entries, a recorded list by its type alone (a loss's log grows with every call)."""
    if not _CALL_RECORDS or not isinstance(value, (dict, list)):
        return value
    if isinstance(value, list):
        return "list (a record)" if _container_key(fn, name, _LIST_LENGTH) in _CALL_RECORDS else value
    return {k: v for k, v in value.items() if _container_key(fn, name, repr(k)) not in _CALL_RECORDS}


def global_values(*fns) -> dict[tuple[str, str, str], object]:
    """The plain values `_global_object` reads from the module-level user objects that ``fns`` (and the functions
    they call from their modules, a few levels) read, and what `_container_values` watches of their module-level dicts
    and lists: what `note_records` compares before and after a call."""
    out: dict = {}
    seen: set[int] = set()
    stack = [(fn, 0) for fn in fns if fn is not None]
    while stack:
        fn, depth = stack.pop()
        fn = getattr(fn, "func", fn) if isinstance(fn, functools.partial) else getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None) if inspect.isfunction(fn) else None
        if code is None or id(fn) in seen or depth > MAX_DEPTH:
            continue
        seen.add(id(fn))
        for name, value in _global_reads(fn):
            if inspect.isfunction(value):
                stack.append((value, depth + 1))
                continue
            out |= _container_values(fn, name, value)
            kind = (type(value).__module__, type(value).__qualname__)
            out |= {(*kind, k): v for k, v in (_settings_values(value) or {}).items()}
    return out


_GREW_ONCE: set[tuple[str, str, str]] = set()
"""Module-level lists (`_container_values`' `_LIST_LENGTH` keys) seen growing during one call: a list becomes a record
when it grows during a second (a log grows every call; one a loss fills on its first call is a setting after it)."""


def note_records(before: dict, after: dict) -> bool:
    """Record (`_CALL_RECORDS`) the values of `global_values` that changed between a call's start (``before``) and its
    end (``after``), a module-level list's length the second time (`_GREW_ONCE`); returns whether any was new.
    NaN left NaN is no change (a NaN placeholder is a setting)."""
    changed = {key for key, value in after.items()
               if key in before and not _same(before[key], value)} - _CALL_RECORDS
    lists = {key for key in changed if _is_list_length(key)}
    new = (changed - lists) | (lists & _GREW_ONCE)
    _GREW_ONCE.update(lists)
    _CALL_RECORDS.update(new)
    return bool(new)


def _same(a, b) -> bool:
    """``a == b``, NaN counting as equal to NaN (`note_records`: a NaN placeholder unchanged is no record)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@functools.lru_cache(maxsize=1024)
def _users_class(cls: type) -> bool:
    """Whether ``cls`` is defined in the user's code (a script, ``__main__``, a project's module), not in Python's
    standard library, an installed package or this library. Kept per class (read for every module-level object a
    loss reads, on every call)."""
    module = cls.__module__ or ""
    if module == "__main__":
        return True
    if module.split(".")[0] in ("hf_fastif", "builtins"):
        return False
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:  # (a C extension's or a built-in module's class)
        return False
    path = os.path.realpath(path)
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not any(path.startswith(root + os.sep) for root in _PYTHON_ROOTS)


_PYTHON_ROOTS = tuple({os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")})
"""Where Python's standard library lives (its classes are not the user's)."""


PER_PROCESS_ATTRIBUTES = frozenset({"rank", "local_rank", "global_rank", "process_index", "local_process_index"})
"""Attributes that differ between the processes of a launch by design (a script's ``args.local_rank``): left out of
`_global_object`, or a launch whose loss reads them was refused as processes that disagree."""


@functools.lru_cache(maxsize=4096)
def _loaded_globals(code) -> frozenset[str]:
    """The global names a code object loads, and those of the code nested in it (lambdas, comprehensions); not its
    co_names, which also holds attribute names (`.logits` is not a global logits). Kept per code object."""
    names, stack = set(), [code]
    while stack:
        code = stack.pop()
        names.update(i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"))
        stack.extend(c for c in code.co_consts if inspect.iscode(c))
    return frozenset(names)


_PLAIN = (*_SCALARS, complex, bytes)  # (values hashed by their repr)


def _plain_container(value, depth: int = 0) -> bool:
    """A list / tuple / dict of plain values, tensors or arrays (nested up to 3 deep)."""
    if depth > 3:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(isinstance(v, (*_PLAIN, torch.Tensor, np.ndarray)) or (isinstance(v, (list, tuple, dict))
                                                                         and _plain_container(v, depth + 1))
               for v in items)


TOKENIZER_SETTINGS = ("padding_side", "truncation_side", "model_max_length", "pad_token_id", "model_input_names")
"""A tokenizer's settings that change a collator's batches and live outside its plain attributes (the pad token is in
its special-tokens map; ``model_input_names`` says which columns ``pad`` returns: one without ``attention_mask``
served trunk states cached with it, and the call failed on their lengths)."""


def _tokenizer_settings(tokenizer) -> tuple:
    """A tokenizer's plain settings (`_plain_settings`) and `TOKENIZER_SETTINGS`, without its vocabulary (which
    `callable_fingerprint` reads: 34 ms on MiniLM's)."""
    return (*_plain_settings(tokenizer), *((k, repr(getattr(tokenizer, k, None))) for k in TOKENIZER_SETTINGS))


def _plain_settings(obj) -> tuple:
    """An object's type and the plain values among its ``__dict__`` entries (a tokenizer's padding side), but where
    it was loaded from (`STATE_IGNORED`: a tokenizer saved with the model and loaded again is the same tokenizer, and
    a Space's warm start rebuilt every saved cache)."""
    values = getattr(obj, "__dict__", {})
    return (type(obj).__qualname__, *sorted((k, v) for k, v in values.items()
                                            if isinstance(v, _SCALARS) and k not in STATE_IGNORED))


def _settings(value, depth: int = 0):
    """What a value a collator (or a module's own ``forward``) reaches holds, cheaply, for comparing between calls:
    plain values and containers (followed, up to `SETTINGS_BREADTH` entries), a tokenizer's settings
    (`_tokenizer_settings`; its vocabulary is left to `callable_fingerprint`), a function's code with what it closes
    over, its parameters' defaults, what it is bound to and reads from its module (plain values, containers of them,
    tokenizers, functions, settings namespaces and dataclasses), and another object's attributes (and, for a
    callable object of the user's code, what its ``__call__`` reads), followed to `MAX_DEPTH`. A tensor or array held
    directly or in a dict counts by its values (a steering vector changed in place: `_data_settings`); one in a list
    by its values among the first entries, else by its identity and in-place version (`_list_entry`: a hook's record
    of activations). A module
    counts by its name in the model being described (a forward replaced by another layer's bound forward; the model
    itself is keyed by its tensors), another (a criterion, a probe a hook applies) by its plain settings
    (`module_settings`) and its tensors' identities; classes by their type; a module-level object a function reads that none of these
    describe, by its public plain attributes (`_global_object`)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, np.generic):  # (a numpy integer: by its value, as its repr shows it)
        return repr(value)
    if _is_tokenizer(value):
        return _tokenizer_settings(value)
    if isinstance(value, nn.Module):  # (the model's own module by its name in it: a forward replaced by another
        # layer's bound forward; the model itself is keyed by its tensors)
        name = (_MODULE_NAMES.get() or {}).get(id(value))
        if name is not None:
            return f"module:{name}"
        # a module outside the model (a criterion, a probe a hook applies; the model a DataCollatorForSeq2Seq holds):
        # its plain settings, and its tensors by identity and in-place version (by their values, a seq2seq collator's
        # model was hashed whole on every call)
        return (type(value).__qualname__, module_settings(value),
                tuple((k, _tensor_identity(t)) for k, t in itertools.chain(value.named_parameters(),
                                                                            value.named_buffers())))
    if isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype != object):
        return _data_settings(value)  # held directly (a steering vector, a token-id map): by its values
    if depth > MAX_DEPTH or inspect.ismodule(value) or inspect.isclass(value) or isinstance(value, np.ndarray):
        return type(value).__qualname__
    if isinstance(value, (dict, list, tuple)) and len(value) > SETTINGS_BREADTH:  # (data, not settings: a collator
        # reading 100,000 module-level rows took 3.5 s a call to describe entry by entry)
        entries = list(value.items() if isinstance(value, dict) else value)
        head = tuple(_list_entry(v, i, depth + 1) for i, v in enumerate(entries[:8]))
        if all(isinstance(v, _SCALARS) for entry in entries for v in (entry if isinstance(value, dict) else (entry,))):
            # (a token map, a long record of floats: by a hash of all of it)
            return _Big((type(value).__qualname__, "plain", head, len(value),
                         hashlib.sha256(repr(value).encode()).hexdigest()))
        tail = tuple(_list_entry(v, len(entries), depth + 1) for v in entries[-8:])  # (tensors by identity)
        return _Big((type(value).__qualname__, id(value), head, len(value), tail))  # (its first and last entries: an
        # address freed and given to other rows)
    if isinstance(value, dict):  # (a partial's keywords, settings, vectors by layer: tensors by their values)
        return {str(k): _settings(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_list_entry(v, i, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_settings(v, depth + 1) for v in value)
    if isinstance(value, (set, frozenset)):
        plain = _plain(value)
        return type(value).__qualname__ if plain is _SKIP else (type(value).__qualname__, *plain)  # (not a list,
        # which `settings_differences` lets grow)
    if isinstance(value, functools.partial):
        return ("partial", _settings(value.func, depth + 1), _settings(tuple(value.args), depth + 1),
                _settings(dict(value.keywords), depth + 1))
    if isinstance(value, types.BuiltinFunctionType):  # by its qualified name (as `callable_fingerprint` does), and
        # what it is bound to: as another object, every builtin read alike (``act = torch.tanh`` for ``F.gelu``)
        bound = getattr(value, "__self__", None)
        return ("builtin", getattr(value, "__module__", None), getattr(value, "__qualname__", value.__name__),
                None if bound is None or inspect.ismodule(bound) or inspect.isclass(bound)
                else _settings(bound, depth + 1))
    code = value.__code__ if inspect.isfunction(value) or inspect.ismethod(value) else None  # (not getattr: an
    # options object's __getattr__ may raise another error than AttributeError)
    if inspect.iscode(code):  # a function, or a method bound to an object (whose settings count too)
        closure = [c.cell_contents for c in getattr(value, "__closure__", None) or () if _cell_filled(c)]
        # and the module-level values it reads (a global tokenizer's padding_side, a global constant or dict, a
        # helper it calls): a held engine kept the old trunk states, index and padding check after one changed
        scope = getattr(value, "__globals__", {})
        read = [(name, scope[name]) for name in sorted(_loaded_globals(code) & scope.keys())]
        bound = getattr(value, "__self__", None)
        # and its parameters' defaults (``def hook(module, args, out, cfg=cfg)``, the usual way to bind a loop's
        # value: a hook's setting changed there kept a held engine's trunk states and LiSSA graphs, 5% off)
        # (each default as deep as a closure's value: the tuple of defaults followed as a container put a default's
        # contents, cfg={"scale": [1.0]}, past MAX_DEPTH)
        defaults = (tuple(_settings(v, depth + 1) for v in getattr(value, "__defaults__", None) or ()),
                    {str(k): _settings(v, depth + 1) for k, v in (getattr(value, "__kwdefaults__", None) or {}).items()})
        return (getattr(value, "__qualname__", ""), _code_digest(code),
                tuple(_settings(v, depth + 1) for v in closure), defaults,
                tuple((name, _settings(v, depth + 1)
                       if isinstance(v, (*_SCALARS, *_HELD_CONTAINERS, functools.partial, *_NAMESPACES, nn.Module))
                       or _is_tokenizer(v) or callable(v) or (dataclasses.is_dataclass(v) and not isinstance(v, type))
                       else _global_object(v))
                      for name, v in read if not inspect.ismodule(v)),
                # (a collator object it calls, a helper, a tensor, a settings namespace or dataclass followed; other
                # objects by their public plain attributes: a script's CFG.mask_id)
                None if bound is None or inspect.ismodule(bound) else _settings(bound, depth + 1))
    # another object (a collator, one wrapped by a function, a settings object): its type and what it holds, and for
    # a callable one of this project's kind (a class defined outside the libraries), what its __call__ reads
    call = type(value).__call__ if callable(value) else None
    own_call = _settings(call, depth + 1) if inspect.isfunction(call) and not _library_code(call) else None
    return (type(value).__qualname__,
            tuple((str(k), _settings(v, depth + 1)) for k, v in sorted(_attributes(value).items(),
                                                                         key=lambda kv: str(kv[0]))),
            own_call)


SETTINGS_BREADTH = 256
"""`_settings` follows lists, tuples and dicts up to this many entries; a larger one of plain values (a token map)
counts by a hash of its repr, another (rows a collator reads, a hook's long record) by its identity, length and first
and last entries: changed in the middle at the same length, it is not seen (`_Big`)."""

DIGEST_BYTES = 256 * 2**20
"""Tensors and arrays `_settings` hashes by their values up to this size; larger ones (a memory-mapped array would
be read whole on every call) by identity, shape, dtype and torch's in-place version counter."""


class _Data(str):
    """A `_settings` description of a tensor's or array's values (or identity): what a record may change."""


class _Big(tuple):
    """A `_settings` description of a long list or dict: (type, identity, its first 8 entries, length, its last 8);
    of plain values: (type, "plain", its first 8, length, a hash of all of it)."""


_SERIALS: dict[int, tuple[weakref.ref, int]] = {}
_NEXT_SERIAL = itertools.count()


def _serial(tensor: torch.Tensor) -> int:
    """A number for this tensor, never given to another one (an address is reused once a tensor is freed: a steering
    vector deleted and made anew for every call was taken for the first one)."""
    key = id(tensor)
    found = _SERIALS.get(key)
    if found is not None and found[0]() is tensor:
        return found[1]
    serial = next(_NEXT_SERIAL)
    _SERIALS[key] = (weakref.ref(tensor, lambda _, key=key: _SERIALS.pop(key, None)), serial)
    return serial


def _tensor_identity(tensor: torch.Tensor) -> _Data:
    """A tensor by identity (`_serial`), shape, dtype, layout and in-place version (`in_place_version`)."""
    shape = "nested" if tensor.is_nested else tuple(tensor.shape)
    return _Data(f"tensor#{_serial(tensor)}:{shape}:{tensor.dtype}:{tensor.layout}:v{in_place_version(tensor)}")


def in_place_version(tensor: torch.Tensor) -> int:
    """torch's count of the in-place writes to ``tensor``'s storage (``Tensor._version``); -1 for a tensor made under
    ``torch.inference_mode``, which keeps none (reading it raises) and which no graph can hold (autograd refuses to
    save it): a buffer a pipeline's forward re-registered under inference mode stopped every call."""
    return -1 if tensor.is_inference() else tensor._version


def _tensor_content(tensor: torch.Tensor) -> str:
    """`tensor_digest` of any tensor a callable reaches: a sparse one by its dense values, a nested one by its parts',
    a meta one (no data) by its shape and dtype, a quantized one by its integers, scale and zero point, a dtype numpy
    lacks (float8) by its bytes."""
    if tensor.is_meta:
        return f"meta:{tuple(tensor.shape)}:{tensor.dtype}"
    if tensor.is_nested:
        return "nested:" + ",".join(_tensor_content(part) for part in tensor.unbind())
    if tensor.is_quantized:
        scale = (tensor.q_scale(), tensor.q_zero_point()) if tensor.qscheme() in (
            torch.per_tensor_affine, torch.per_tensor_symmetric) else "per-channel"
        return f"quantized:{tensor.dtype}:{scale}:" + tensor_digest(tensor.int_repr())
    if tensor.layout != torch.strided:
        return f"{tensor.layout}:" + _tensor_content(tensor.to_dense())
    try:
        return tensor_digest(tensor)
    except (TypeError, RuntimeError):  # (float8 and other dtypes numpy has no type for: their bytes)
        data = tensor.detach().to("cpu").contiguous()
        return f"{tensor.dtype}:" + tensor_digest(data.view(torch.uint8) if data.numel() else data.to(torch.uint8))


LIST_VALUES = 8, 2**20
"""A list's first 8 entries count by their values when their tensors hold at most 1 MB (a steering vector or two
changed through ``.data``, which keeps torch's version counter); other tensors in a list (a hook's record of
activations) by `_tensor_identity`, not hashed on every call."""


def _list_entry(value, index: int, depth: int):
    """`_settings` of a list's entry (`LIST_VALUES`)."""
    if not _holds_tensors(value):
        return _settings(value, depth)
    entries, most = LIST_VALUES
    tensors = [value] if isinstance(value, torch.Tensor) else [
        v for v in (value.values() if isinstance(value, dict) else value) if isinstance(v, torch.Tensor)]
    try:
        small = sum(t.numel() * t.element_size() for t in tensors) <= most
    except RuntimeError:  # (a nested tensor has no single size)
        small = False
    return _settings(value, depth) if index < entries and small else _tensor_identities(value)


def _holds_tensors(value) -> bool:
    """A tensor, or a list / tuple / dict with one (an entry of a hook's record: ``out`` or ``(out, ...)``)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple, dict)):
        return any(isinstance(v, torch.Tensor) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _tensor_identities(value):
    """The tensors of a container entry (a tensor, or a tuple / list / dict holding some) by `_tensor_identity`; its
    other values by `_settings` (a scale beside a vector)."""
    if isinstance(value, torch.Tensor):
        return _tensor_identity(value)
    items = value.values() if isinstance(value, dict) else value
    return tuple(_tensor_identity(v) if isinstance(v, torch.Tensor) else _settings(v, MAX_DEPTH) for v in items)


def _data_settings(value: torch.Tensor | np.ndarray) -> str:
    """A tensor or array by its values (up to `DIGEST_BYTES`; a sparse, nested or meta tensor as `_tensor_content`
    reads it); a larger one by `_tensor_identity` (an array by identity and shape)."""
    if isinstance(value, np.ndarray):
        if value.nbytes > DIGEST_BYTES:
            return _Data(f"array@{id(value)}:{value.shape}:{value.dtype}")
        return _Data(f"array:{value.shape}:{value.dtype}:"
                     + xxhash.xxh3_128_hexdigest(np.ascontiguousarray(value).view(np.uint8).data))
    strided = value.layout == torch.strided and not value.is_nested
    if strided and value.numel() * value.element_size() > DIGEST_BYTES:
        return _tensor_identity(value)
    return _Data("tensor:" + _tensor_content(value))

_NAMESPACES = (argparse.Namespace, types.SimpleNamespace)

_MODULE_NAMES: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("hf_fastif_module_names",
                                                                                     default=None)
"""While `module_state_description` describes a model: its modules' names by identity, for `_settings`."""


def _library_code(fn) -> bool:
    """A function of an installed library (transformers' collators' ``__call__``), not of the user's code: its module
    is under a site-packages / dist-packages folder, or torch's / transformers' own."""
    module = getattr(fn, "__module__", "") or ""
    if module.split(".")[0] in ("transformers", "torch", "datasets", "accelerate", "hf_fastif"):
        return True
    path = getattr(getattr(fn, "__code__", None), "co_filename", "")
    return "site-packages" in path or "dist-packages" in path


def collator_settings(collator) -> tuple:
    """The settings of a collator (`_settings`: its plain settings and its tokenizer's, padding side, pad id,
    lengths...; for a function its code and what it closes over, is bound to, wraps or reads from its module):
    compared on every call, cheaply, so that a collator changed in place gets a new `callable_fingerprint` (which
    reads the tokenizer's vocabulary: 34 ms on MiniLM's). Only the top level was compared: a collator function
    closing over a dict of options, a bound method's object, a global dict, or a partial's tokenizer kept the held
    engine's old trunk states (0.02 off a fresh engine's) and padding check."""
    tokenizer = getattr(collator, "tokenizer", None) or getattr(collator, "processing_class", None)
    return _settings(collator), None if tokenizer is None else _tokenizer_settings(tokenizer)


def collator_key(collator, settings: tuple | None = None) -> str:
    """What keys a collator's caches: its `callable_fingerprint` and its `collator_settings` (given, or read now).
    The two follow values by other rules (the settings skip a tokenizer's vocabulary and follow namespaces, a callable
    object's ``__call__`` and a tokenizer the fingerprint's depth cuts off): a lambda around a collator whose tokenizer
    was set to left padding kept the fingerprint, and a held engine its padding check and trunk states."""
    settings = collator_settings(collator) if settings is None else settings
    return f"{callable_fingerprint(collator)}+{hashlib.sha256(repr(settings).encode()).hexdigest()[:16]}"


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _code_digest(code) -> str:
    digest = hashlib.sha256(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        digest.update((_code_digest(const) if inspect.iscode(const) else _stable_repr(const)).encode())
    return digest.hexdigest()


def _stable_repr(value) -> str:
    """``repr`` that is the same in every process: a frozenset (a set literal's constant) lists its elements in
    hash order, which PYTHONHASHSEED changes, so its elements are sorted by their own repr."""
    if isinstance(value, frozenset):
        return "frozenset(" + repr(sorted(_stable_repr(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ", ".join(_stable_repr(v) for v in value) + ",)"
    return repr(value)
