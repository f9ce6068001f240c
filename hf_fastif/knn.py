"""kNN candidates: model features of every row, indexed with faiss through ``datasets``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import faiss
import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .batches import Batcher
from .mode import evaluating
from .trunk import forward_context, model_inputs, transformers_model
from .utils import quiet_datasets

logger = logging.get_logger(__name__)

INDEX_NAME = "features"
FeatureFn = Callable[[nn.Module, dict], torch.Tensor]
DECODER_ONLY_INPUTS = ("labels", "past_key_values", "use_cache", "cross_attn_head_mask", "cache_position")


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _token(hidden: torch.Tensor, mask: torch.Tensor | None, which: str) -> torch.Tensor:
    """The state of each row's ``"first"`` or ``"last"`` real token (the attention mask's first / last 1), so
    padding on either side gives the feature the row has alone."""
    if mask is None:
        return hidden[:, 0 if which == "first" else -1]
    positions = torch.arange(mask.shape[1], device=mask.device)
    real = mask.bool()
    index = (torch.where(real, positions, mask.shape[1]).amin(1) if which == "first"
             else torch.where(real, positions, -1).amax(1)).clamp(0, mask.shape[1] - 1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def causal_states(model: nn.Module) -> bool:
    """Whether the states kNN features read see only the positions before them: a decoder-only model whose config or
    attention says so (``config.is_decoder``, XLM's ``config.causal``, an attention module marked ``is_causal``:
    GPT-2, Llama, a BERT built as a decoder), or, where no module says either way (BLOOM, XGLM, MPT, Mamba), whose
    first state is the same for two probe rows that differ only after their first token. An encoder-decoder's features are
    its encoder's, which see every position."""
    target = transformers_model(model)
    if _encoder(target) is not None:
        return False
    config = getattr(target, "config", None)
    if getattr(config, "is_decoder", False) is True or getattr(config, "causal", False) is True:
        return True
    marks = [m.is_causal for m in target.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if marks:  # (attention modules that say, True or False, are taken at their word: no probe forward)
        return any(marks)
    return _first_state_blind(target)


def _first_state_blind(target: nn.Module) -> bool:
    """True where the base model's state at the first position is the same for two rows that share their first
    token and differ after it (and differs at the second): it sees that token alone. False where no such probe runs
    (no token vocabulary, a forward that takes more than token ids)."""
    vocab = getattr(getattr(target, "config", None), "vocab_size", None)
    base = getattr(target, "base_model", None)
    if not isinstance(vocab, int) or vocab < 8 or not isinstance(base, nn.Module):
        return False
    device = next(target.parameters()).device
    ids = torch.tensor([[3, 4, 5, 6], [3, 7, 6, 4]], device=device)
    try:
        with torch.no_grad(), evaluating(target):
            states = base(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    except Exception as err:  # (a model the probe cannot run: its features are not read this way either)
        logger.info(f"The first-position probe of {type(target).__name__} could not run ({type(err).__name__}: "
                    f"{err}): its first-token features are not refused as causal.")
        return False
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[:2] != ids.shape:
        return False
    return bool(torch.equal(states[0, 0], states[1, 0])) and not bool(torch.equal(states[0, 1], states[1, 1]))


def check_feature_methods(model: nn.Module, methods) -> None:
    """Refuse, before any work, features read at the first token on a model whose states are causal
    (`causal_states`): ``cls``, ``pooler``, and ``auto`` where the model has a pooler (a BERT built as a decoder).
    That state sees the first token alone, so every row that starts with the same token (a BOS) had the same
    feature and the same k nearest rows, unsaid (a review's GPT-2: rows 0-4 for every test row)."""
    target = transformers_model(model)
    pooled = getattr(getattr(target, "base_model", None), "pooler", None) is not None
    first = [m for m in methods if m in ("cls", "pooler") or (m == "auto" and pooled)]
    if first and causal_states(target):
        raise ValueError(
            f"influence_knn_features={first[0]!r} reads the first token's state"
            + (" (through the model's pooler)" if first[0] != "cls" else "")
            + f", and {type(target).__name__}'s attention is causal: that state sees the first "
            "token alone, so rows that start alike (with a BOS token, every row) would share one feature and one set "
            "of nearest rows. Use 'last' (the last real token's state, 'auto''s choice for a causal LM), 'mean', or "
            "'gradient'.")


def model_features(model: nn.Module, batch: dict, method: str = "auto", split=None) -> torch.Tensor:
    """Feature vectors ``(b, d)`` of a batch, from the model's base (encoder/decoder) outputs.

    ``auto``: the pooled [CLS] output where the model has a pooler (BERT, as in the paper), the last
    non-padding token for causal LMs, else the mask-weighted mean of the last hidden states. An encoder-decoder's
    features are of its encoder's states (the rows' inputs), for every method. With a
    `hf_fastif.trunk.TrunkSplit` and a batch carrying trunk states, only the top of the model runs. Rows of ``c``
    sequences (a multiple-choice model's ``(b, c, s)`` inputs) run through the base as the ``b·c`` sequences the model
    flattens them into, and a row's feature is its sequences' features side by side, ``(b, c·d)``. A
    vision model's ``(b, c, h, w)`` or ``(b, h, w, c)`` states are read as ``h·w`` positions of ``c`` features
    (``auto`` without a pooler, and ``mean``: the average pool; `_map_positions`), and a pooled ``(b, c, 1, 1)`` map
    as ``(b, c)``.
    """
    inputs = model_inputs(batch, model)
    choices = _choices(inputs)
    if choices:
        inputs = {k: v.flatten(0, 1) if isinstance(v, torch.Tensor) and v.dim() > 2 else v for k, v in inputs.items()}
    mask = inputs.get("attention_mask")
    target = transformers_model(model)  # a PEFT model's, adapters in place
    base = getattr(target, "base_model", None)
    encoder = _encoder(target)
    with forward_context(split, batch):
        if encoder is not None:  # an encoder-decoder: the encoder's states of the input (the decoder's are of
            # the targets, laid out by another mask), as a sequence-to-sequence retriever embeds its inputs
            last, pooled = encoder(**_encoder_inputs(encoder, inputs)).last_hidden_state, None
            if mask is not None and tuple(mask.shape) != tuple(last.shape[:2]):
                mask = None  # a mask of other positions (audio frames a convolution strides over): every state
        elif base is None or base is target:
            accepts = "output_hidden_states" in inspect.signature(target.forward).parameters
            hidden = getattr(target(**inputs, output_hidden_states=True), "hidden_states", None) if accepts else None
            if hidden is None:
                raise ValueError(f"{type(target).__name__} returns no hidden_states for kNN features; pass "
                                 "`features=callable(model, batch) -> (b, d) tensor` or influence_knn_k=None.")
            last, pooled = hidden[-1], None
        else:
            out = base(**inputs)
            last, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
    if pooled is not None and pooled.dim() > 2:  # (a pooled feature map: ResNet's (b, c, 1, 1))
        pooled = pooled.flatten(1)
    uses_pooler = method == "pooler" or (method == "auto" and pooled is not None)
    if last.dim() == 4 and mask is None and not uses_pooler:  # a vision model's feature map: its positions as a
        last = _map_positions(last, target, pooled)  # sequence, (b, h·w, c), so that `mean` is the average pool
    if uses_pooler:
        if pooled is None:
            instead = "'last' or 'mean'" if causal_states(target) else "'cls' or 'mean'"
            raise ValueError(f"{type(target).__name__} has no pooler output; use influence_knn_features={instead}.")
        feats = pooled
    elif method == "cls":
        feats = _token(last, mask, "first")
    elif method == "last" or (method == "auto" and encoder is None
                              and getattr(target, "can_generate", lambda: False)()):
        feats = _token(last, mask, "last")
    else:
        feats = _masked_mean(last, mask)
    return feats.reshape(-1, choices * feats.shape[-1]) if choices else feats


def _map_positions(states: torch.Tensor, model: nn.Module, pooled: torch.Tensor | None) -> torch.Tensor:
    """A vision model's ``(b, c, h, w)`` (convolutional: ResNet, SegFormer) or ``(b, h, w, c)`` (NAT-style) states as
    ``(b, h·w, c)``. The channels are the pooled output's width, else the config's last ``hidden_sizes`` or its
    ``hidden_size``; where that does not tell the layouts apart, a clear error."""
    config = getattr(model, "config", None)
    sizes = getattr(config, "hidden_sizes", None)
    channels = (pooled.shape[-1] if pooled is not None else sizes[-1] if isinstance(sizes, (list, tuple)) and sizes
                else getattr(config, "hidden_size", None))
    first, last = states.shape[1] == channels, states.shape[-1] == channels
    if first != last:
        return states.flatten(2).transpose(1, 2) if first else states.flatten(1, 2)
    raise ValueError(f"{type(model).__name__}'s states are {tuple(states.shape)}, and which dimension holds the "
                     f"{channels} channels is not clear: pass `features=callable(model, batch) -> (b, d) tensor`, "
                     "or influence_knn_features='pooler' where the model has a pooler.")


def _encoder(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder's encoder (BART, T5, their classifiers), else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    return encoder if isinstance(encoder, nn.Module) else None


def _encoder_inputs(encoder: nn.Module, inputs: dict) -> dict:
    """The inputs an encoder-decoder's encoder takes (token ids, pixel values, audio features, their masks): every
    input but the decoder's and the targets, those its ``forward`` names unless it takes ``**kwargs``."""
    parameters = inspect.signature(encoder.forward).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in inputs.items() if not k.startswith("decoder_") and k not in DECODER_ONLY_INPUTS
            and (any_keyword or k in parameters)}


def _choices(inputs: dict) -> int:
    """``c`` where the batch's rows are ``c`` sequences each (``input_ids`` or ``attention_mask`` of ``(b, c, s)``,
    ``inputs_embeds`` of ``(b, c, s, h)``, as multiple-choice models take them), else 0."""
    for key, dims in (("input_ids", 3), ("attention_mask", 3), ("inputs_embeds", 4)):
        x = inputs.get(key)
        if isinstance(x, torch.Tensor):
            return int(x.shape[1]) if x.dim() == dims else 0
    return 0


@torch.no_grad()
def extract_features(model: nn.Module, batcher: Batcher, method: str | FeatureFn = "auto", *,
                     batch_size: int = 64, split=None, progress: bool = True, desc: str = "features") -> np.ndarray:
    """Features of every row of ``batcher``, ``(N, d)`` float32. A callable ``method`` gets plain batches (no
    trunk states) and the full model. Features of another shape than ``(rows, d)`` with one ``d`` for every batch,
    or not finite, raise a `ValueError` naming the rows (faiss drops a row whose distance is not finite: a test row
    lost all its candidates and left the table without a word). Rows run in batches of like length
    (`Batcher.length_order`), each row's features written at its own place."""
    out = None
    for rows, batch in tqdm(batcher.batches(batcher.length_order(), batch_size), desc=desc, disable=not progress,
                            total=-(-len(batcher) // batch_size), leave=False):
        feats = method(model, batch) if callable(method) else model_features(model, batch, method, split)
        feats = feats.detach().float().cpu().numpy()
        what = "the features= callable" if callable(method) else f"influence_knn_features={method!r}"
        if feats.ndim != 2 or len(feats) != len(rows) or (out is not None and feats.shape[1] != out.shape[1]):
            raise ValueError(f"{what} gave features of shape {tuple(feats.shape)} for a batch of {len(rows)} rows"
                             + (f" (the first batch's had {out.shape[1]} columns)" if out is not None and feats.ndim == 2
                                else "")
                             + "; kNN needs one (rows, d) tensor per batch, d the same for every row (not one that "
                             "grows with the padding).")
        bad = ~np.isfinite(feats).all(1)
        if bad.any():
            named = batcher.named_rows(np.asarray(rows)[bad][:5])  # (rows of the whole dataset)
            raise ValueError(f"{what} gave features that are not finite (inf or NaN) for the rows at positions "
                             f"{named} ({desc}); faiss cannot place them. Check those rows (and the model's weights) "
                             "for inf/NaN, or pass influence_knn_k=None to score every row.")
        if out is None:
            out = np.empty((len(batcher), feats.shape[1]), dtype=np.float32)
        out[rows] = feats
    if out is None:  # no rows (a process whose share of the candidates is empty): (0, 0), which gather_rows skips
        return np.zeros((0, 0), dtype=np.float32)
    return out


def build_index(features: np.ndarray, factory: str = "Flat") -> Dataset:
    """A dataset of row ids with a faiss L2 index over ``features``; search ids are row indices."""
    with quiet_datasets():
        ids = Dataset.from_dict({"row": np.arange(features.shape[0])})
    train_size = None if factory == "Flat" else features.shape[0]
    # faiss-gpu when it is installed and this process has a GPU; faiss-cpu otherwise
    device = torch.cuda.current_device() if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() else None
    try:
        with quiet_datasets():
            ids.add_faiss_index_from_external_arrays(features, index_name=INDEX_NAME, string_factory=factory,
                                                     metric_type=faiss.METRIC_L2, train_size=train_size, device=device)
    except RuntimeError as err:  # faiss: an unknown factory string, or too few rows to train the index
        raise index_error(factory, features.shape, err) from err
    return ids


def index_error(factory: str, shape: tuple[int, int], err: Exception) -> ValueError:
    """What to do when faiss cannot build ``influence_knn_index`` over vectors of ``shape``."""
    first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return ValueError(f"influence_knn_index={factory!r} could not be built over {shape[0]} rows of {shape[1]} "
                      f"features ({first}). Use a faiss index factory string whose training needs no more rows than "
                      "there are (an IVF index needs at least as many rows as lists), or 'Flat' (exact).")


def search(index: Dataset, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of each query: ``(scores, ids)``, each ``(q, k)``, nearest first."""
    with quiet_datasets():
        result = index.search_batch(INDEX_NAME, np.ascontiguousarray(queries, dtype=np.float32), k=k)
    return np.asarray(result.total_scores), np.asarray(result.total_indices)


def warn_short(found: list[np.ndarray], k: int, rows: int, what: str, factory: str = "") -> None:
    """Warn when an approximate faiss index found fewer than ``min(k, rows)`` candidates for a query: an IVF index
    searches one list by default (an HNSW graph a bounded neighbourhood), so a call got fewer candidates than
    ``influence_knn_k`` without a word."""
    short = [i for i, ids in enumerate(found) if len(ids) < min(k, rows)]
    if short:
        kind = factory.upper()  # (an IVF index with an HNSW quantizer, "IVF64_HNSW32,Flat", falls short as IVF)
        cause = ("an HNSW index searches a bounded neighbourhood of its graph (it falls short for k near the row "
                 "count)" if "HNSW" in kind and "IVF" not in kind
                 else "an approximate index (IVF) searches one list by default")
        logger.warning(f"{what} found fewer than influence_knn_k = {k} candidates for {len(short)} of {len(found)} "
                       f"quer{'ies' if len(found) > 1 else 'y'} (e.g. {len(found[short[0]])} for query {short[0]}): "
                       f"{cause}. Those are scored over fewer candidates; use influence_knn_index='Flat' (or, for "
                       "IVF, fewer lists) for k candidates each.")
