"""The model state influence needs, set for the computation and restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from transformers.utils import logging

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def influence_mode(model: nn.Module, names: Sequence[str]):
    """The state every influence computation runs in; everything is restored afterwards.

    - eval mode (dropout off; each module's own train / eval flag comes back, not the top one's spread over
      them), and a refusal (`ValueError`, before any forward pass) of modules that
      normalise with the statistics of the batch (BatchNorm without running statistics, or left training):
      their loss of a row depends on the other rows of its batch, so influence would depend on batching;
    - eager attention (SDPA/flash kernels support neither double backward nor forward-mode AD);
    - gradient checkpointing off, and the input-embedding hooks it (or PEFT) installs removed: the hook calls
      ``requires_grad_`` inside ``torch.func`` transforms, which they refuse (and in eval mode checkpointing
      saves nothing);
    - only the selected parameters requiring grad, so autograd does not walk frozen layers;
    - the eager forward of a model compiled in place (``model.compile()``; a ``torch.compile(model)`` wrapper is
      replaced by its module before, `uncompiled`): compiled graphs support neither double backward nor forward AD;
    - the model's own forward, not the mixed-precision wrapper accelerate leaves on it after ``Trainer.train()``
      with ``bf16`` / ``fp16`` (``model._original_forward``): under its autocast every product ran in half
      precision, whatever the weights' dtype (Spearman 0.82 with the float64 values on a bf16-trained tiny BERT);
      kept, with a warning, where the weights are of several dtypes that the forward needs it to mix
      (`_uncast_dtypes`: a bf16 body under a float32 classifier), as an ambient ``torch.autocast`` is;
    - gradients on, outside inference mode: a call made inside ``torch.no_grad()`` or ``torch.inference_mode()``
      (a common reflex around analysis code) failed in autograd with an error that named nothing.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    selected = set(names)
    # every module with a transformers config (the model, a backbone inside a plain nn.Module, the encoder and decoder
    # of a composite model), outermost first, with its own attention implementation: each is switched and restored
    attns = [(m, a) for m in model.modules() if (m is model or hasattr(m, "set_attn_implementation"))
             and (a := _attention_implementation(m)) is not None]
    switched = [(m, a) for m, a in attns if a != "eager"]
    # a plain module that exposes a transformers model's config as its own (``self.config = backbone.config``) is
    # switched with that model: only one whose config no switchable module holds is refused
    settable = {id(m.config) for m, _ in attns if hasattr(m, "set_attn_implementation")}
    for m, attn in switched:
        if not hasattr(m, "set_attn_implementation") and id(m.config) not in settable:
            raise ValueError(
                f"{type(m).__name__} uses attn_implementation={attn!r}, which supports neither double backward nor "
                "forward-mode AD; load it with attn_implementation='eager' for influence."
            )
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    hooked = [m for m in model.modules() if getattr(m, "_require_grads_hooks", None)
              and hasattr(m, "enable_input_require_grads") and hasattr(m, "disable_input_require_grads")]
    # a second enable_input_require_grads (a second Trainer.train() with checkpointing) forgets the hook it had
    # registered, which disable_input_require_grads then cannot remove: transformers' hook, found by its name
    tracked = {handle.id for m in hooked for handle in m._require_grads_hooks}
    orphans = [(m, hook_id, hook) for m in model.modules() for hook_id, hook in list(m._forward_hooks.items())
               if getattr(hook, "__name__", "") == "make_inputs_require_grads" and hook_id not in tracked]
    autocast = {m: vars(m)["forward"] for m in model.modules() if "forward" in vars(m) and "_original_forward" in vars(m)}
    # (a bf16 body with a float32 head runs only under an autocast, ambient or accelerate's)
    mixed = len(_uncast_dtypes(model)) > 1
    # model.compile() compiles in place: every call goes through the compiled graph, which refuses double backward
    compiled = {m: vars(m)["_compiled_call_impl"] for m in model.modules() if vars(m).get("_compiled_call_impl")}
    with evaluating(model):
        try:
            _refuse_batch_statistics(model)
            if switched:
                logger.info(f"Switching attention from {switched[0][1]!r} to 'eager' for influence (SDPA/flash kernels "
                            "support neither double backward nor forward-mode AD); it is switched back afterwards.")
            for m, _ in switched:
                if _attention_implementation(m) != "eager" and hasattr(m, "set_attn_implementation"):
                    m.set_attn_implementation("eager")  # (an outer model's switch may have reached it)
            if checkpointed or hooked or orphans:
                logger.info("Turning gradient checkpointing and its input-gradient hook off for influence "
                            "(torch.func transforms refuse the hook's requires_grad_, and in eval mode checkpointing "
                            "saves nothing); they are turned back on afterwards.")
            for m in checkpointed:
                m.gradient_checkpointing = False
            for m in hooked:
                m.disable_input_require_grads()
            for m, hook_id, _ in orphans:
                m._forward_hooks.pop(hook_id, None)
            for n, p in model.named_parameters():
                p.requires_grad_(n in selected)
            if autocast and mixed:  # (removed, the forward failed: "mat1 and mat2 must have the same dtype")
                logger.warning("The model's forward carries accelerate's mixed-precision autocast (a bf16 / fp16 "
                               "Trainer) and its weights are of several dtypes, which its forward needs the autocast "
                               "to mix: it is kept, so products run in reduced precision. For float32 values, compute "
                               "influence on a float32 copy of the model (copy.deepcopy(model).float()).")
                autocast = {}
            elif autocast:
                logger.info("The model's forward carries accelerate's mixed-precision autocast (a bf16 / fp16 Trainer); "
                            "influence runs the forward without it, in the weights' own dtype, and puts it back "
                            "afterwards.")
            for m in autocast:
                m.forward = vars(m)["_original_forward"]
            if compiled:
                logger.info("The model was compiled in place (model.compile()); influence runs its eager forward "
                            "(compiled graphs support neither double backward nor forward-mode AD) and the "
                            "compiled one is put back afterwards.")
            for m in compiled:
                m._compiled_call_impl = None
            ambient = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
            if ambient and mixed:
                logger.warning(f"The call is made inside torch.autocast ({', '.join(ambient)}) and the model's "
                               "weights are of several dtypes, which its forward needs the autocast to mix: it is "
                               "kept, so products run in reduced precision. For float32 values, compute influence on "
                               "a float32 copy of the model (copy.deepcopy(model).float()), outside the autocast.")
                ambient = []
            elif ambient:
                logger.info(f"The call is made inside torch.autocast ({', '.join(ambient)}); influence runs without "
                            "it, in the weights' own dtype (under a bf16 autocast the rankings of a float32 model "
                            "fell to Spearman 0.75 against float32's).")
            with contextlib.ExitStack() as stack:
                for device in ambient:
                    stack.enter_context(torch.autocast(device, enabled=False))
                with torch.inference_mode(False), torch.enable_grad():  # a call made under no_grad / inference_mode
                    yield
        finally:
            for m, forward in autocast.items():
                m.forward = forward
            for m, call in compiled.items():
                m._compiled_call_impl = call
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            for m in hooked:
                if not getattr(m, "_require_grads_hooks", None):
                    m.enable_input_require_grads()
            for m, hook_id, hook in orphans:  # back as they were: training runs as it did
                m._forward_hooks.setdefault(hook_id, hook)
            for m in checkpointed:
                m.gradient_checkpointing = True
            if switched:  # outermost first, so that an inner model's own setting is the one it keeps
                for m, attn in attns:
                    if _attention_implementation(m) != attn and hasattr(m, "set_attn_implementation"):
                        m.set_attn_implementation(attn)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper runs (its ``_orig_mod``), else ``model``. Influence needs
    double backward and forward-mode AD, which compiled graphs refuse ("aot_autograd does not currently support
    double backward"), and the wrapper's ``forward(*args, **kwargs)`` names no input of the model (every column was
    dropped and BERT answered "You must specify exactly one of input_ids or inputs_embeds"). The weights are the
    same tensors, so the numbers are the model's."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and isinstance(inner, nn.Module):
        return inner
    return model


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode within the block; afterwards each module gets its own train / eval flag back (not
    ``model.train(was)``, which spreads the top module's flag over all: a BatchNorm or a layer the user froze with
    ``.eval()`` inside a training model would come back training)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        # through train(), which some modules override (LeViT drops a cache of eval-mode biases there), top down:
        # a module's call sets its children, and those whose own flag differs are set after it
        for m, training in modes.items():
            if m.training != training:
                m.train(training)


def _refuse_batch_statistics(model: nn.Module) -> None:
    """Raise if a module of ``model`` (already in eval mode) normalises with the batch's own statistics."""
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        if module.training:
            why = "it stays in training mode after model.eval()"
        elif module.running_mean is None and module.running_var is None:
            why = "track_running_stats=False"
        else:
            continue
        raise ValueError(
            f"{type(module).__name__} module {name or type(model).__name__!r} normalises each batch with that "
            f"batch's own mean and variance ({why}), so the loss of a row, and its influence, would depend on "
            "which rows share its batch (and a batch of one row fails). Give it running statistics "
            "(track_running_stats=True, estimated during training; eval mode then uses them) or use a per-row "
            "normalisation (LayerNorm, GroupNorm) for influence."
        )


def _attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def _uncast_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The floating dtypes of the parameters a forward meets without casting to them itself: all but PEFT's adapter
    weights (kept in float32 on a half-precision base, their layers cast the input: ``adapter_layer_names``) and the
    modules transformers keeps in float32 (``_keep_in_fp32_modules``, whose forwards cast too). Several of them: the
    forward needs an autocast to mix them (a bf16 body under a float32 classifier failed without one); PEFT LoRA on a
    bf16 base ran under accelerate's bf16 autocast when its adapters counted."""
    cast: set[int] = set()
    kept = set()
    for m in model.modules():
        for name in getattr(m, "adapter_layer_names", ()):
            adapters = getattr(m, name, None)
            if isinstance(adapters, nn.Module):
                cast |= {id(p) for p in adapters.parameters()}
        kept |= set(getattr(m, "_keep_in_fp32_modules", None) or ()) | set(
            getattr(m, "_keep_in_fp32_modules_strict", None) or ())
    return {p.dtype for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in cast
            and not kept & set(n.split("."))}
