"""Small helpers with one home each: JSON encoding, atomic writes, markdown tables, timers, the version, and
silencing `datasets`' progress bars for the library's small internal operations."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled
from filelock import FileLock, Timeout

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The half-precision float dtypes: computed in float32 where precision matters (losses, digests, statistics)."""
DIFFERENCE_CHUNK = 1 << 18  # entries: `relative_difference` compares larger tensors chunk by chunk


def half_dtypes(params: Mapping[str, torch.Tensor]) -> list[str]:
    """The half-precision dtypes among ``params`` (``["bfloat16"]``): the influence parameters' for overflow
    messages, the model's for the precision warning."""
    return sorted(str(d).removeprefix("torch.") for d in {p.dtype for p in params.values()} & set(HALF_DTYPES))


def overflow_advice(params: Mapping[str, torch.Tensor]) -> str:
    """What to do where inf / NaN may be an overflow of half-precision parameters (a float32 copy, leaving the caller's
    model as it is), or "" for a model in float32 / float64, where that advice would be wrong."""
    half = half_dtypes(params)
    return (f"or it overflowed in {', '.join(half)}: compute influence on a float32 copy of the model, "
            "copy.deepcopy(model).float()" if half else "")


def pin_memory_default() -> bool:
    """The recipes' default for ``dataloader_pin_memory``: pin only where an accelerator would use it.
    `TrainingArguments`' True pins nothing on a machine without one, and torch warned "'pin_memory' argument is set
    as true but no accelerator is found" at every fine-tuning of a recipe's paper path (the embedded default and
    MiniLM's fine-tuning set ``use_cpu``, which turns pinning off); a flag the user gives still wins."""
    return torch.accelerator.is_available()


def relative_difference(value: torch.Tensor, reference: torch.Tensor,
                        floor: float = torch.finfo(torch.float64).tiny) -> float:
    """How far ``value`` is from ``reference``: the largest entry of ``|value - reference|`` over the larger of
    ``reference``'s largest absolute entry and ``floor`` (a floor of 1, for losses near 0, makes it absolute there).
    ``inf`` where either holds NaN or inf: they do not agree, and a NaN compared with a tolerance would pass as
    ``False`` against ``>``. Every check of two computations that should agree (a split, a cut, stacked products,
    padding) goes through it, so that they all read a difference the same way.

    Tensors of the same shape beyond `DIFFERENCE_CHUNK` entries are compared chunk by chunk through one reused
    buffer: the same value (a maximum is exact), without two full-size temporaries on fresh memory (4 × 1.9M
    entries, a stacked step's check on MiniLM: ~30 → ~15 ms on one thread)."""
    if value.shape != reference.shape or value.numel() <= DIFFERENCE_CHUNK:
        gap, top = (value - reference).abs().max(), reference.abs().max()
    else:
        flat_value, flat_reference = value.reshape(-1), reference.reshape(-1)
        buffer = torch.empty(DIFFERENCE_CHUNK, dtype=torch.promote_types(value.dtype, reference.dtype),
                             device=value.device)
        gaps, tops = [], []
        for start in range(0, flat_value.numel(), DIFFERENCE_CHUNK):
            end = min(start + DIFFERENCE_CHUNK, flat_value.numel())
            part = torch.sub(flat_value[start:end], flat_reference[start:end], out=buffer[: end - start])
            gaps.append(part.abs_().max())
            tops.append(flat_reference[start:end].abs().max())
        gap, top = torch.stack(gaps).max(), torch.stack(tops).max()
    scale = max(float(top), floor)
    if scale == 0.0:  # (a floor of 0 and a reference of zeros: equal where the value is zeros too)
        return 0.0 if float(gap) == 0.0 else math.inf
    out = float(gap) / scale
    return out if math.isfinite(out) else math.inf


def batched_grad(outputs, inputs: list[torch.Tensor], grad_outputs,
                 allow_unused: bool = False) -> list[torch.Tensor | None]:
    """``autograd.grad`` for a stack of ``grad_outputs`` (one ``(m, ...)`` tensor, or one per output): one batched
    backward (``is_grads_batched``), or a loop where vmap cannot go. The graph is retained."""
    try:
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, is_grads_batched=True,
                                        retain_graph=True, allow_unused=allow_unused))
    except RuntimeError:
        stacked = isinstance(grad_outputs, torch.Tensor)
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=g if stacked else [s[i] for s in grad_outputs],
                                    retain_graph=True, allow_unused=allow_unused)
                for i, g in enumerate(grad_outputs if stacked else grad_outputs[0])]
        return [None if parts[0] is None else torch.stack(parts) for parts in zip(*rows)]


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_input_embeddings()``, or None where the model has none: not a transformers model, or one whose
    inputs are not token ids (Wav2Vec2, HuBERT: transformers raises ``NotImplementedError`` there)."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


class NonFiniteError(ValueError, FloatingPointError):
    """Values computed from the data came out inf / NaN (the training Hessian; training rows whose loss is): a
    `ValueError`, as the library's refusals are (the command line reports those in one line), and a
    `FloatingPointError`, as its other errors about non-finite values are."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), to name it inside another message."""
    return (str(err).strip().splitlines() or [""])[0][:200]


def library_version() -> str:
    """The installed hf_fastif version."""
    from . import __version__  # here: the package imports this module

    return __version__


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays, sets and anything else (as ``str``)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def to_json(value: Any, **kwargs) -> str:
    """``json.dumps`` with `json_default` (numpy values, sets, paths...)."""
    return json.dumps(value, default=json_default, **kwargs)


def check_output_dir(output_dir: str | Path, flag: str = "--output_dir") -> Path:
    """Refuse, before any work, an ``output_dir`` that cannot be a folder: an existing file, or a path below one.
    Nothing is created (it is made when the results are written); the recipes call this when their flags are
    parsed, and `prepare` again (a file there made `write_results` fail after the whole protocol had run), and the
    benchmarks' `output_folder`."""
    folder = Path(output_dir).expanduser()
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == folder else f"lies under {str(path)!r}, which is"
                raise ValueError(f"{flag} {str(output_dir)!r} {where} an existing file, not a folder; pass a folder "
                                 "(it is created if missing).")
            break
    return folder


def check_build_folder(directory: str | Path, entries: dict[str, str], flag: str = "--output_dir") -> Path:
    """`check_output_dir`, and refuse, before any work, a file where a build writes one of its folders or a folder
    where it writes a file (``entries``: name → ``"folder"`` / ``"file"``): ``save_pretrained`` only logged a file at
    ``model`` and skipped the save, and a ``table`` file failed once the whole table was computed."""
    folder = check_output_dir(directory, flag)
    for name, kind in entries.items():
        path = folder / name
        if path.exists() and path.is_dir() != (kind == "folder"):
            raise ValueError(f"{path} is a {'folder' if path.is_dir() else 'file'}, where the build writes its {name} "
                             f"{kind}; move it away, or build into another folder.")
    return folder


BUILD_LOCK = ".hf_fastif_build.lock"
"""The lock a build (`hf_fastif.builder.build_influence_table`, the embedded default's) holds on its folder."""


def hold_build_lock(directory: Path) -> FileLock:
    """Create ``directory`` and take its build lock (`BUILD_LOCK`), held until released: a second build into the
    folder meanwhile is refused at once (two builds at a time each wrote over the other's files: one failed only at
    assembly, all its work lost; two embedded builds both said they had finished over a mix of their files). A
    folder that cannot be made or written is an `OSError` naming it and what to do (`write_error`)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory / BUILD_LOCK))
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"Another build is writing {directory} now: wait for it to end, or build into another "
                         "folder.") from None
    except OSError as err:
        raise write_error(directory / BUILD_LOCK, err) from err
    return lock


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], object] | None = None, *,
                 writer: Callable[[Path], object] | None = None) -> Path:
    """Write text or bytes (or what ``content(handle)`` writes to a binary file: a large array streamed; or what
    ``writer(temporary_path)`` writes, for a library that writes a file by name) to a temporary file next to
    ``path``, then rename it into place: readers never see a half-written file, and one that holds the old file open
    (a memory map) keeps it.

    Any failure removes the temporary file (a full disk kept the part written, filling it); an `OSError` (a full
    disk, a read-only folder) is raised again naming ``path`` and what to do, the original chained."""
    if (content is None) == (writer is None):
        raise TypeError("write_atomic takes content or writer, one of them")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if writer is not None:
            writer(tmp)
        elif callable(content):
            with open(tmp, "wb") as handle:
                content(handle)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    return path


def write_error(path: str | os.PathLike, err: BaseException, reason: str | None = None) -> OSError:
    """An `OSError` (of ``err``'s errno, so its subclass: `PermissionError`...) saying that ``path`` could not be
    written, why (``reason``, default ``err``'s own), and what to do."""
    reason = reason or getattr(err, "strerror", None) or str(err)
    message = (f"Could not write {path} ({reason}): free space on its disk or make its folder writable, or write to "
               "another folder, then try again.")
    errno = getattr(err, "errno", None)
    return OSError(errno, message) if isinstance(errno, int) else OSError(message)


def file_digest(path: str | os.PathLike, new_hash) -> str:
    """The hex digest of a file's bytes under ``new_hash`` (``hashlib.sha256``, ``xxhash.xxh3_128``), read in 8 MiB
    blocks."""
    digest = new_hash()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    """Wall-clock seconds of named phases: ``with timer("s_test"): ...`` adds to ``timer.seconds["s_test_s"]``
    (``suffix`` appended to the name)."""

    def __init__(self, suffix: str = "_s"):
        self.seconds: dict[str, float] = {}
        self.suffix = suffix

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = name + self.suffix
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Within the block, datasets shows no progress bars (restored afterwards)."""
    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()
