"""hf_fastif's disk cache: where it is, what it holds, and removing what is no longer needed.

The root is ``$HF_FASTIF_CACHE`` (default ``~/.cache/hf_fastif``). It holds:

- ``all-MiniLM-L6-v2-<revision>``: the pretrained MiniLM extracted from its wheel (`hf_fastif.pretrained`, 90 MB);
- ``minilm-nli/<key>``: fine-tuned MiniLMs, one per training data and settings (`hf_fastif.minilm_default`,
  88 MB each);
- ``space_default/<kind>``: the Space's default builds, when ``$HF_FASTIF_SPACE_CACHE`` does not move them (one
  without its ``ready.json`` is being built, or its build failed), and ``space_default/engines``, the engine caches
  of the Space's other tables;
- ``.<name>.<random>.tmp``: the staging folder of a write under way, or killed before it finished.

Every entry is keyed on content, so nothing stale is ever read, but nothing is evicted either: an entry costs a
minute or more to rebuild. `cache_entries` lists them with their size, their last use and whether this install can
still use them; ``hf-fastif cache`` prints that list and removes entries (``--prune``: the ones this install cannot
use and unfinished writes; ``--unused-days N``: also the ones unused for N days; ``--clear``: every entry). Only
entries of these kinds, named as hf_fastif names them, are ever removed; anything else in the folder (and any
symbolic link, which is never followed) is listed as ``other`` and left alone. A write counts as under way (kept
even by ``--clear``) while anything in its tree changed within `STALE_STAGING_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "HF_FASTIF_CACHE"
"""Environment variable: hf_fastif's cache root (default ``~/.cache/hf_fastif``)."""

STALE_STAGING_S = 6 * 3600
"""A staging folder untouched this long is a killed write's (extracting MiniLM takes a second, fine-tuning the
default about a minute)."""

KINDS = ("pretrained", "fine-tuned", "space build", "unfinished write", "other")

SPACE_SUBDIR = "space_default"
"""The cache's folder of the Space's builds (`hf_fastif.space.default_cache_dir`, unless ``$HF_FASTIF_SPACE_CACHE``
moves them): one folder per embedded model kind, and `SPACE_ENGINES`."""
SPACE_ENGINES = "engines"
"""The folder (in the Space's) of the engine caches of tables other than the default."""
SPACE_READY_FILE = "ready.json"
"""What a finished Space build writes last (`hf_fastif.space.build.READY_FILE`); a hit records its use in its time."""
SPACE_BUILDING_FILE = ".hf_fastif_building"
"""What a Space build writes first and removes once finished (`hf_fastif.space.build.BUILDING_FILE`): a folder that
holds it is a build under way (or cut short), however old its ``ready.json``."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HF_FASTIF_CACHE``, else ``~/.cache/hf_fastif``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_fastif").expanduser()


def cache_write_error(path: Path, err: BaseException, detail: str = "") -> OSError:
    """`hf_fastif.utils.write_error` for a write into the cache: the reason names `CACHE_ENV`, which moves it."""
    from .utils import write_error

    return write_error(path, err, f"{getattr(err, 'strerror', None) or err}; the cache root is ${CACHE_ENV}{detail}")


def mark_used(path: Path) -> None:
    """Record a cache hit in ``path``'s modification time (what ``--unused-days`` reads); a read-only cache is
    fine."""
    with contextlib.suppress(OSError):
        os.utime(path)


_STAGING = re.compile(r"\.(all-MiniLM-L6-v2-[0-9a-f]{40}|[0-9a-f]{20})\.([^.]+\.tmp|stale-[0-9a-f]{32})")
"""The staging folders hf_fastif writes: ``.all-MiniLM-L6-v2-<revision>.<random>.tmp`` (the extraction) and
``.<key[:20]>.<random>.tmp`` (a fine-tuning), and ``.<key[:20]>.stale-<uuid>``, an invalid fine-tuned model moved
aside to be removed; another tool's ``.x.tmp`` in a shared folder is not one."""
_PRETRAINED = re.compile(r"all-MiniLM-L6-v2-[0-9a-f]{40}")
_FINETUNED = re.compile(r"[0-9a-f]{20}")


def is_staging(path: Path) -> bool:
    """Whether ``path`` is the staging folder of one of hf_fastif's cache writes (`_STAGING`)."""
    return _STAGING.fullmatch(path.name) is not None


def remove_stale_staging(root: Path, pattern: str = ".*", match=is_staging) -> list[Path]:
    """Remove the staging folders (``pattern`` in ``root`` that ``match``; default `is_staging`) of writes killed
    before they finished (SIGKILL leaves up to ~90 MB each), untouched for `STALE_STAGING_S`; returns them."""
    removed = []
    for folder in [p for p in root.glob(pattern) if match(p)] if root.is_dir() else []:
        try:
            stale = folder.is_dir() and time.time() - _newest_change(folder) > STALE_STAGING_S
        except FileNotFoundError:  # removed meanwhile by its own process
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@dataclass
class CacheEntry:
    """One entry of the cache: its folder, kind (one of `KINDS`), size in bytes, last use (a POSIX time), and why
    this install cannot use it (``None`` when it can)."""

    path: Path
    kind: str
    size: int
    last_used: float
    unusable: str | None = None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _newest_change(path: Path) -> float:
    """The latest modification time in the tree at ``path``: a write under way changes files in subfolders, not the
    top folder's time."""
    newest = path.stat().st_mtime
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _entry(path: Path, kind: str, stamp: Path | None = None, unusable: str | None = None, *,
           newest: bool = False) -> CacheEntry:
    """``path``'s entry; its last use is ``stamp``'s time, else the newest change in its tree (``newest``, and every
    unfinished write), else its own time."""
    try:
        if newest or kind == "unfinished write":
            last_used = _newest_change(path)
        else:
            last_used = (stamp if stamp is not None and stamp.exists() else path).stat().st_mtime
    except FileNotFoundError:  # removed meanwhile
        last_used = 0.0
    return CacheEntry(path, kind, _size(path), last_used, unusable)


def _finetuned_unusable(folder: Path) -> str | None:
    """Why this install cannot use the fine-tuned model in ``folder`` (its key can no longer match), or None."""
    from .minilm_default import FINETUNE_CODE_VERSION, FINETUNE_KEY_FIELDS, MANIFEST_NAME
    from .pretrained import MINILM_REVISION

    try:
        content = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))["content"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    missing = sorted(set(FINETUNE_KEY_FIELDS) - set(content))
    if missing:
        return f"written by an older hf_fastif (its key lacks {', '.join(missing)})"
    revision = (content.get("base") or {}).get("revision") if isinstance(content.get("base"), dict) else None
    if revision != MINILM_REVISION:
        return f"fine-tuned from MiniLM revision {str(revision)[:8]}, this install reads {MINILM_REVISION[:8]}"
    if content.get("code_version") != FINETUNE_CODE_VERSION:
        return f"fine-tuning code version {content.get('code_version')}, this install's is {FINETUNE_CODE_VERSION}"
    import torch
    import transformers

    here = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    other = [f"{name} {content.get(name)}" for name in here if content.get(name) != here[name]]
    return f"trained under {', '.join(other)}" if other else None


def cache_entries(cache_dir: str | os.PathLike | None = None) -> list[CacheEntry]:
    """The entries of the cache at ``cache_root(cache_dir)``, largest first (empty when there is no cache)."""
    from .minilm_default import FINETUNE_CACHE_SUBDIR
    from .pretrained import MINILM_REVISION

    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if path.is_symlink():  # never followed: what it points to is not the cache's
            entries.append(CacheEntry(path, "other", 0, path.lstat().st_mtime))
        elif is_staging(path) and path.is_dir():
            entries.append(_entry(path, "unfinished write"))
        elif _PRETRAINED.fullmatch(path.name) and path.is_dir():
            revision = path.name.removeprefix("all-MiniLM-L6-v2-")
            entries.append(_entry(path, "pretrained", unusable=None if revision == MINILM_REVISION
                                  else f"revision {revision[:8]}, this install reads {MINILM_REVISION[:8]}"))
        elif path.name in (FINETUNE_CACHE_SUBDIR, SPACE_SUBDIR) and path.is_dir():
            for sub in sorted(path.iterdir()):
                entries.append(_sub_entry(path.name == FINETUNE_CACHE_SUBDIR, sub))
        else:
            entries.append(_entry(path, "other"))
    return sorted(entries, key=lambda e: -e.size)


def _sub_entry(finetuned: bool, sub: Path) -> CacheEntry:
    """An entry inside ``minilm-nli`` (``finetuned``) or ``space_default``."""
    from .embedded import KINDS as EMBEDDED_KINDS
    from .minilm_default import MANIFEST_NAME

    if sub.is_symlink() or not sub.is_dir():
        return CacheEntry(sub, "other", 0 if sub.is_symlink() else _size(sub), sub.lstat().st_mtime)
    if is_staging(sub):
        return _entry(sub, "unfinished write")
    if finetuned:
        if not _FINETUNED.fullmatch(sub.name):
            return _entry(sub, "other")
        return _entry(sub, "fine-tuned", sub / MANIFEST_NAME, _finetuned_unusable(sub))
    if sub.name == SPACE_ENGINES:  # (the engine caches of several tables, read without a stamp: by their newest)
        return _entry(sub, "space build", newest=True)
    if sub.name not in EMBEDDED_KINDS:
        return _entry(sub, "other")
    if not (sub / SPACE_READY_FILE).is_file() or (sub / SPACE_BUILDING_FILE).is_file():  # being built (a rebuild
        # keeps the finished build's ready.json until it writes: it was removed as an old finished build under the
        # running one), or a build that failed
        return _entry(sub, "unfinished write")
    return _entry(sub, "space build", sub / SPACE_READY_FILE)


def removable(entries: list[CacheEntry], *, clear: bool = False, unused_days: float | None = None,
              now: float | None = None) -> list[CacheEntry]:
    """The entries ``hf-fastif cache`` removes: the ones this install cannot use, unfinished writes untouched for
    `STALE_STAGING_S` (a younger one may be a write under way, even with ``clear``), with ``unused_days`` the ones
    unused that long, and with ``clear`` every other one but ``other``."""
    now = time.time() if now is None else now
    out = []
    for entry in entries:
        age = now - entry.last_used
        if entry.kind == "other":
            continue
        if entry.kind == "unfinished write":
            if age > STALE_STAGING_S:
                out.append(entry)
        elif clear or entry.unusable is not None or (unused_days is not None and age > unused_days * 86400):
            out.append(entry)
    return out


def remove_entries(entries: list[CacheEntry]) -> int:
    """Delete ``entries``; returns the bytes freed."""
    freed = 0
    for entry in entries:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        freed += entry.size if not os.path.lexists(entry.path) else 0
    return freed


__all__ = [
    "CACHE_ENV",
    "CacheEntry",
    "STALE_STAGING_S",
    "cache_entries",
    "cache_root",
    "cache_write_error",
    "mark_used",
    "remove_entries",
    "remove_stale_staging",
    "removable",
]
