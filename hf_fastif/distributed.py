"""The few collective operations influence needs, through Accelerate. One process: all are no-ops.

Only two stages are distributed: solvers (repetitions / Hessian batches split, one all-reduce) and
scoring (candidates split, results gathered). Nothing else knows how many processes there are.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState


def world() -> tuple[int, int]:
    """``(rank, number of processes)``, from the initialised process group where there is one.

    Under ``accelerate launch --multi_gpu`` on a machine without GPUs, Accelerate initialises a gloo
    process group but reports ``DistributedType.NO``; the process group is the truth.
    """
    if not (dist.is_available() and dist.is_initialized()):
        state = PartialState()  # initialises the process group under accelerate launch / torchrun
        if not dist.is_initialized():
            return state.process_index, state.num_processes
    return dist.get_rank(), dist.get_world_size()


def training_replicas(device: str = "cpu") -> dict:
    """How many copies of a model a Trainer started here trains at once (each takes its own batch of
    ``per_device_train_batch_size`` rows, so the optimizer steps on that many times more rows, and fewer steps):
    ``processes`` (one per process under ``accelerate launch`` / ``torchrun``) and ``gpus_per_process`` (the GPUs a
    single CUDA process spreads each batch over with ``DataParallel``). Part of every key of a cached trained model:
    the same settings trained under 2 processes give other weights."""
    processes = world()[1]
    gpus = torch.cuda.device_count() if device == "cuda" and processes == 1 and torch.cuda.is_available() else 1
    return {"processes": processes, "gpus_per_process": max(1, gpus)}


def is_main_process() -> bool:
    return world()[0] == 0


def shard(items: Sequence, rank: int | None = None, size: int | None = None) -> list:
    """This process's contiguous share of ``items`` (shares differ in length by at most one)."""
    if rank is None or size is None:
        rank, size = world()
    bounds = np.linspace(0, len(items), size + 1).round().astype(int)
    return list(items[bounds[rank] : bounds[rank + 1]])


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def finish() -> None:
    """End of a launched script: wait for every process, then close the process group. A gloo group left to the
    interpreter's exit can abort a process whose work is done ("terminate called without an active exception",
    seen here once in a 2-process benchmark), which fails the whole launch. A no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (returned on every process)."""
    if world()[1] == 1:
        return tensor
    out = tensor.clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows in rank order (each process gets the whole array). A process without rows
    (more processes than rows) may pass any empty array, whatever its other dimensions."""
    if world()[1] == 1:
        return array
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, array)
    filled = [part for part in parts if len(part)]
    return np.concatenate(filled, 0) if filled else array


def gather_objects(value) -> list:
    """Every process's ``value`` (picklable), in rank order, on every process."""
    if world()[1] == 1:
        return [value]
    everyone: list = [None] * world()[1]
    dist.all_gather_object(everyone, value)
    return everyone


T = TypeVar("T")


def together(work: Callable[[], T], what: str) -> T:
    """Run this process's share of ``what`` (work on rows split over processes, before a collective); if it fails in
    any process, every process raises (see `collectively`). Without this, the others went on into the next
    collective and received the wrong objects, or waited for ever. One process: ``work()``."""
    with collectively(what):
        return work()


@contextlib.contextmanager
def collectively(what: str) -> Iterator[None]:
    """The block's work in every process; if it raises in any, every process raises when the block ends: the failing
    ones their own error, the others one naming the process and its error, of the same class where it is one of this
    library's (a `LissaDivergenceError`), else a `ValueError` if it was one, else a `RuntimeError`. Checks that can
    fail in one process only (its copy of a dataset lost a column) run in such a block: a script that caught the
    error and called again met the other process's first call at the next collective. One process: the block."""
    if world()[1] == 1:
        yield
        return
    try:
        yield
    except Exception as error:  # (KeyboardInterrupt and the like end the launch anyway)
        if not getattr(error, GATHERED, False):  # (raised where every process met: an enclosing block gathers no more)
            # plain strings: an exception (or its class) defined in a function cannot be pickled, and that process
            # alone would fail in the gather while the others waited
            try:
                in_step(what, Failure(type(error).__module__, type(error).__qualname__, isinstance(error, ValueError),
                                      f"{type(error).__name__}: {error}"))
            except Exception as other:  # (the others were at another stage, and were told of this error there)
                if not getattr(other, GATHERED, False):
                    raise
            setattr(error, GATHERED, True)
        raise
    failed = [(rank, failure) for rank, failure in enumerate(in_step(what, None)) if failure is not None]
    if failed:
        rank, failure = failed[0]
        raise failure.error(f"{what} failed in process {rank} ({failure.message}); every process stops. Fix what it "
                            "names and run again.")


def on_main(work: Callable[[], T], what: str) -> T | None:
    """``work()`` on the main process only (a write), the others waiting for it as `together` does: an error there
    (a full disk) stops every process, the others with one naming it. After a write and a plain barrier the others
    failed with a bare gloo error, or waited for ever where a script caught the error and went on. Returns the main
    process's result (None elsewhere)."""
    return together(lambda: work() if is_main_process() else None, what)


def in_step(stage: str, value) -> list:
    """`gather_objects` of ``value`` tagged with ``stage``: processes that reach different stages (a script that caught
    an error raised in one process only, and went on) get a `RuntimeError` saying where each one is, instead of another
    stage's objects (which failed with an unpacking error, then waited for ever)."""
    everyone = gather_objects((stage, value))
    stages = [s for s, _ in everyone]
    if len(set(stages)) > 1:
        rank = world()[0]
        # a process that failed where the others do not gather (its own stage of a call, `collectively`), met at their
        # next stage: its error, named (they went on, and waited for ever or failed with a bare gloo error)
        failed = next(((r, s, v) for r, (s, v) in enumerate(everyone) if r != rank and isinstance(v, Failure)), None)
        if failed is not None:
            other, where, failure = failed
            raise failure.error(f"{where} failed in process {other} ({failure.message}) while this process was at "
                                f"{stage!r}; every process stops. Fix what it names and run again.")
        other = next(r for r, s in enumerate(stages) if s != stage)
        raise _gathered(RuntimeError(
            f"The processes are out of step: process {rank} is at {stage!r}, process {other} at {stages[other]!r} (an "
            "error raised in one process only was caught and the script went on in it?). Every process of a launch "
            "must make the same calls: stop every process on an error (hf_fastif's own errors do), then run again."))
    return [v for _, v in everyone]


class Failure(NamedTuple):
    """What `collectively` gathers of an error (plain strings: an exception, or its class, defined in a function
    cannot be pickled)."""

    module: str
    name: str
    value_error: bool
    message: str

    def error(self, text: str) -> Exception:
        """This failure raised again in every process, with ``text``: of its class where `_error_like` can make
        one, marked as gathered."""
        return _gathered(_error_like(self.module, self.name, self.value_error, text))


GATHERED = "_hf_fastif_gathered"
"""The attribute that marks an error every process of a launch raised at the same gather (`collectively`, `in_step`):
an enclosing `collectively` raises it as it is, without a gather the others would not make."""


def _gathered(error: Exception) -> Exception:
    setattr(error, GATHERED, True)
    return error


def _error_like(module: str, name: str, value_error: bool, text: str) -> Exception:
    """An error of class ``module.name`` where it is one of this library's taking a message, else a `ValueError` /
    `RuntimeError`."""
    fallback = ValueError(text) if value_error else RuntimeError(text)
    if not module.startswith("hf_fastif.") or "." in name:
        return fallback
    kind = getattr(importlib.import_module(module), name, None)
    try:
        return kind(text) if isinstance(kind, type) and issubclass(kind, Exception) else fallback
    except Exception:  # a constructor that takes other arguments
        return fallback


class _Missing:
    """What `differences` gives for a key one side lacks (shown as "(missing)")."""

    def __repr__(self) -> str:
        return "(missing)"


MISSING = _Missing()


def differences(old, new, key: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every leaf where two JSON-like values differ; `MISSING` for a key
    one side lacks (it differs from a key holding None: a process of another version lacked one, and the check
    found no difference to name)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            a, b = old.get(k, MISSING), new.get(k, MISSING)
            if a is MISSING or b is MISSING:
                out.append((f"{key}.{k}" if key else k, a, b))
            elif a != b:
                out.extend(differences(a, b, f"{key}.{k}" if key else k))
        return out
    return [(key, old, new)]


def check_same_everywhere(description: dict) -> None:
    """Refuse to run when processes were launched with different settings or data (they would mix
    results): every process compares its ``description`` with every other's."""
    rank, size = world()
    if size == 1:
        return
    everyone = in_step("the settings check", description)
    for other, theirs in enumerate(everyone):
        if theirs != description:
            diff = sorted(k for k in set(theirs) | set(description)
                          if theirs.get(k, MISSING) != description.get(k, MISSING))
            # the first differing leaf, not the whole entry (two 27-key settings dicts to compare by eye)
            key, mine, other_value = differences(description, theirs)[0]
            raise ValueError(
                f"Process {rank} and process {other} disagree on {diff} (e.g. {key}: {mine!r} vs {other_value!r}). "
                "Launch every process with the same script, arguments and data."
            )
