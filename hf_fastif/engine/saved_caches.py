"""`InfluenceEngine.save_caches` / `load_caches`: an engine's caches written with their content keys, for a
later process (a Space's next start), and read back only where every key matches.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from transformers.utils import logging

from .. import distributed as D
from .. import trunk as trunk_module
from ..fingerprint import model_code_fingerprint
from ..gradient_index import cache_file_digest, saved_index_intact
from ..trunk import TrunkCache
from ..utils import library_version, to_json, write_atomic

logger = logging.get_logger(__name__)

CACHE_MANIFEST = "hf_fastif_caches.json"


CACHE_LOCK = ".hf_fastif_caches.lock"
_NAMES = r"(?:trunk-\d+(?:-[0-9a-f]+)?(?:-rows)?\.npy|low_rank_(?:values|vectors)(?:-[0-9a-f]+)?\.npy|gradient(?:-[0-9a-f]+)?\.faiss)"
CACHE_FILES = re.compile(rf"{_NAMES}|\.{_NAMES}\.\d+\.tmp")
"""The names of the files `save_caches` writes (with a save's token, or the fixed names of saves before 2026-12-07)
and of `write_atomic`'s partial ones: those the manifest does not name are removed after each save; a file of the
user's in the folder (``gradients.faiss``, ``low_rank_approx.npy``) is not one."""


@contextlib.contextmanager
def _reading_lock(folder: Path):
    """The folder's cache lock while reading it; none where it cannot be made (a read-only folder, which no
    `save_caches` can write meanwhile either)."""
    try:
        lock = FileLock(str(folder / CACHE_LOCK))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _saved_index(folder: Path, manifest: dict) -> tuple:
    """The gradient index a saved manifest names, as ``(key, path, dtype, digest)`` (read on first use; a save before
    2026-12-07 named no file: it had a fixed name)."""
    entry = manifest["gradient_index"]
    name = entry.get("file", "gradient.faiss")
    return _freeze(entry["key"]), folder / name, _dtype(entry["dtype"]), manifest.get("files", {}).get(name)


def _freeze(value):
    """JSON lists back into the tuples the cache keys are made of."""
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy without loss (bfloat16, which numpy lacks, as float32: exact)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class SavedCaches:
    """Writing and reading `InfluenceEngine`'s caches, which loaded ones served a call (`_served` / `_replaced`,
    called by the stages that use them), and, under a launch, keeping only those every process holds
    (`_align_caches`). State (made in `InfluenceEngine.__init__`): ``_saved_gradient_index``, ``_from_disk``; it
    writes and restores the stages' ``_trunks``, ``_low_rank``, ``_gradient_index`` and ``_curvature``."""

    def save_caches(self, directory: str | os.PathLike) -> Path:
        """Write the caches this engine holds (trunk states, low-rank Hessian, gradient index, curvature estimates)
        with their content keys, so another engine (a later process: a Space's next start) can `load_caches` them.
        A loaded cache is used only by a call whose own key equals the saved one, so nothing stale is ever used."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        # one save or load of a folder at a time (two Space processes share one): their files were paired with the
        # other engine's keys, and served
        with FileLock(str(folder / CACHE_LOCK)):
            return self._write_caches(folder)

    def _write_caches(self, folder: Path) -> Path:
        # every file of this save is new, named by a token of its own, and the manifest naming them replaces the old
        # one last; then the files no manifest names are removed. A save cut short leaves the last finished one
        # whole (the manifest went first: an interrupted save lost it, and the folder then loaded nothing), files
        # are never rewritten under a name another engine read from the manifest (it found the new gradient index
        # under the old key's name), and a save holding fewer caches leaves no old files behind (GBs, named by no
        # manifest, were never removed)
        token = f"{time.time_ns():x}{os.getpid():x}"
        # the model's code: every key below holds its weights and config, not what its forward does (a
        # trust_remote_code model's modeling file edited between a save and a load was served the old states)
        manifest: dict = {"library_version": library_version(), "model_code": model_code_fingerprint(self.model),
                          "trunks": [], "curvature": []}
        files: list[str] = []  # every file the manifest names, digested below (checked when read back)

        def save_array(name: str, array: np.ndarray) -> None:
            # a new file put in place, not the old one rewritten: an engine that memory-maps the old one keeps it
            write_atomic(folder / name, lambda handle: np.save(handle, array, allow_pickle=False))
            files.append(name)

        for i, (key, cache) in enumerate(self._trunks.items()):
            # bfloat16 (which numpy lacks) as its raw 16-bit patterns: read back, it maps without a conversion
            raw = cache.flat.dtype == torch.bfloat16
            stem = f"trunk-{i}-{token}"
            save_array(f"{stem}.npy", cache.flat.detach().cpu().view(torch.int16).numpy() if raw
                       else _numpy(cache.flat))
            save_array(f"{stem}-rows.npy", np.stack([cache.lengths, cache.offsets]))
            manifest["trunks"].append({"key": key, "file": stem, "dtype": str(cache.flat.dtype), "raw": raw,
                                       "per_row": cache.per_row})
        if self._low_rank is not None:
            key, (values, vectors) = self._low_rank
            names = [f"low_rank_values-{token}.npy", f"low_rank_vectors-{token}.npy"]
            save_array(names[0], _numpy(values))
            save_array(names[1], _numpy(vectors))
            manifest["low_rank"] = {"key": key, "dtype": str(vectors.dtype), "files": names}
        if self._gradient_index is not None:
            key, index = self._gradient_index
            name = f"gradient-{token}.faiss"
            index.save(folder / name)
            manifest["gradient_index"] = {"key": key, "dtype": str(index.sketch.dtype), "file": name}
        elif self._saved_gradient_index is not None and saved_index_intact(self._saved_gradient_index):
            # loaded but not read yet (it is read on first use): kept, not dropped from the new manifest (a file of
            # this folder under its own name: files here are never rewritten)
            key, path, dtype, digest = self._saved_gradient_index
            name = path.name
            if path.parent.resolve() != folder.resolve():
                name = f"gradient-{token}.faiss"
                shutil.copyfile(path, folder / name)
                self._saved_gradient_index = (key, folder / name, dtype, digest)
            manifest["gradient_index"] = {"key": key, "dtype": str(dtype), "file": name}
        files += [manifest["gradient_index"]["file"]] if "gradient_index" in manifest else []
        manifest["curvature"] = [[key, value] for key, value in self._curvature.items()]
        manifest["files"] = {name: cache_file_digest(folder / name) for name in files}
        write_atomic(folder / CACHE_MANIFEST, to_json(manifest, indent=1))
        for path in folder.iterdir():  # what no manifest names now: an earlier save's, or one cut short
            if path.name not in files and CACHE_FILES.fullmatch(path.name):
                with contextlib.suppress(OSError):  # (a system that cannot delete a file another engine maps: the
                    path.unlink(missing_ok=True)  # next save removes it)
        return folder

    def load_caches(self, directory: str | os.PathLike) -> list[str]:
        """Read caches written by `save_caches`; returns what was loaded. A folder with nothing saved in it (missing,
        or without the manifest `save_caches` writes: a typo, or the folder above) loads nothing, with a warning;
        one that cannot be read (damaged, truncated) is skipped with a warning: the caches only save time, and this
        engine's own are left as they were."""
        folder = Path(directory)
        if not (folder / CACHE_MANIFEST).is_file():
            cut_short = folder.is_dir() and any(CACHE_FILES.fullmatch(path.name) for path in folder.iterdir())
            found = ("does not exist" if not folder.exists() else
                     f"holds no {CACHE_MANIFEST}: the save_caches that wrote its files was cut short before it finished"
                     if cut_short else f"holds no {CACHE_MANIFEST} (not a save_caches folder)")
            logger.warning(f"No engine caches loaded: {folder} {found}; they are computed when needed, and "
                           "engine.save_caches(folder) writes them for a later process.")
            return []
        state = (OrderedDict(self._trunks), self._low_rank, self._saved_gradient_index, dict(self._curvature),
                 dict(self._from_disk))
        try:
            with _reading_lock(folder):
                return self._read_caches(folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError) as err:
            (self._trunks, self._low_rank, self._saved_gradient_index, self._curvature, self._from_disk) = state
            logger.warning(f"Could not read the engine caches in {folder} ({type(err).__name__}: {err}); they are "
                           "computed again when needed. Delete the folder (or save_caches over it) to replace them.")
            return []

    def _read_caches(self, folder: Path) -> list[str]:
        manifest = json.loads((folder / CACHE_MANIFEST).read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
            # (JSON of another shape, `[]` or "files" a list: a bare AttributeError from the reads below)
            raise ValueError(f"{CACHE_MANIFEST} is not a manifest save_caches writes (an object with its files' digests)")
        if manifest.get("model_code") != model_code_fingerprint(self.model):
            logger.info(f"The engine caches in {folder} were saved for other model code (another transformers "
                        "version, or a model class of one's own that changed; or saved before the code was recorded): "
                        "not loaded, they are computed again when needed.")
            return []
        for name, digest in manifest.get("files", {}).items():  # (folders saved before digests: not checked)
            if cache_file_digest(folder / name) != digest:
                raise ValueError(f"{name} changed since it was saved (its xxh3 digest differs from the manifest's)")
        loaded = []
        device = next(self.model.parameters()).device
        retired = []  # caches replaced or dropped by this load: closed only once all of it was read (a failure
        # puts the engine's own caches back, and they must still hold their states)
        for entry in manifest.get("trunks", []):
            stored = np.load(folder / f"{entry['file']}.npy", mmap_mode="c")
            dtype = _dtype(entry["dtype"])
            # states beyond the memory limit stay memory-mapped, as built ones do (a copy-on-write map: pages are
            # read from the file when used; `save_caches` puts new files in place, never rewrites this one)
            raw = bool(entry.get("raw"))
            mapped = stored.nbytes > trunk_module.MEMORY_LIMIT_BYTES and (raw or torch.from_numpy(stored[:0]).dtype == dtype)
            flat = torch.from_numpy(stored if mapped else np.array(stored))
            flat = flat.view(dtype) if raw else flat.to(dtype)
            rows = np.load(folder / f"{entry['file']}-rows.npy")
            if entry["key"] in self._trunks:
                retired.append(self._trunks.pop(entry["key"]))
            self._trunks[entry["key"]] = TrunkCache.from_arrays(entry["key"], rows[0], rows[1], flat, device,
                                                                per_row=int(entry.get("per_row", 0)))
            self._from_disk["trunk", entry["key"]] = False
            loaded.append("trunk")
        if "low_rank" in manifest:
            dtype = _dtype(manifest["low_rank"]["dtype"])
            # (saves before 2026-12-07 named no files: they had fixed names)
            names = manifest["low_rank"].get("files", ["low_rank_values.npy", "low_rank_vectors.npy"])
            values = torch.from_numpy(np.load(folder / names[0]))
            vectors = torch.from_numpy(np.load(folder / names[1])).to(device=device, dtype=dtype)
            self._low_rank = (_freeze(manifest["low_rank"]["key"]), (values, vectors))
            self._from_disk["low_rank", self._low_rank[0]] = False
            loaded.append("low_rank")
        if "gradient_index" in manifest:
            self._saved_gradient_index = _saved_index(folder, manifest)
            key = self._saved_gradient_index[0]
            self._from_disk["gradient_index", key] = False
            loaded.append("gradient_index")
        for key, value in manifest.get("curvature", []):
            self._curvature[_freeze(key)] = value
            self._from_disk["curvature", _freeze(key)] = False
            loaded.append("curvature")
        for old in retired + self._evict_trunks():  # the cap holds for loaded caches too
            old.close()
        return loaded

    def _saved_index_now(self, saved: tuple) -> tuple | None:
        """The gradient index a save into ``saved``'s folder since `load_caches` read it put there under the same key
        (another engine's save removes the file this one read the name of, even when it saved the same index), as
        ``(key, path, dtype, digest)``; None when there is none, or it cannot be read."""
        folder = saved[1].parent
        try:
            with _reading_lock(folder):
                manifest = json.loads((folder / CACHE_MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        try:
            now = _saved_index(folder, manifest)
            return now if now[0] == saved[0] and saved_index_intact(now) else None
        except (KeyError, TypeError, AttributeError, OSError):  # (a manifest edited by hand: no index to take)
            return None

    def _align_caches(self, portable: dict[str, str]) -> None:
        """Under a launch, keep only the caches built by collectives (curvature estimates, the exact and low-rank
        Hessians, the gradient and kNN indexes) that every process holds: a process using its own while another
        rebuilds it waited in the other's collectives for ever (caches loaded by one process only, or saved under
        another rank). Trunk states are each process's own work, and stay."""
        device = repr(str(next(self.model.parameters()).device))  # each process's own GPU is the same place
        # the keys hold `_functions`, which tell live objects apart by address: compared as their ``portable``
        # fingerprints (`_portable_functions`), else every cache counted as held by one process only
        to_portable = {self._functions[k]: portable[k] for k in portable if self._functions[k] != portable[k]}

        def name(key) -> str:
            text = repr(key).replace(device, "'<device>'")
            for local, shared in to_portable.items():
                text = text.replace(local, shared)
            return text

        held = {("curvature", name(key)) for key in self._curvature}
        for kind, entry in (("exact", self._exact), ("low_rank", self._low_rank), ("feature_index", self._feature_index),
                            ("gradient_index", self._gradient_index),
                            ("saved_gradient_index", self._saved_gradient_index)):
            if entry is not None:
                held.add((kind, name(entry[0])))
        common = set.intersection(*map(set, D.in_step("the caches every process holds", held)))
        for kind, key in held - common:
            logger.warning(f"Another process does not hold this process's {kind.replace('_', ' ')} cache: every "
                           "process builds it again (load the same caches in every process to reuse them; caches "
                           "saved on a GPU are keyed on its device, cuda:<rank>, so on GPUs they are rebuilt).")
            if kind == "curvature":
                self._curvature = {k: v for k, v in self._curvature.items() if name(k) != key}
            else:
                setattr(self, f"_{kind}", None)
                if kind == "low_rank":
                    self._prepared_solve = None

    def _served(self, kind: str, key) -> None:
        """Note that a cache read by `load_caches` served a call (so it was not stale)."""
        if (kind, key) in self._from_disk:
            self._from_disk[kind, key] = True

    def _replaced(self, kind: str, key) -> None:
        """Note that the cache of this kind and key is no longer the one `load_caches` read (built now, or pushed
        out), so `forget_unused_loaded` never drops a fresh one."""
        self._from_disk.pop((kind, key), None)

    def unused_loaded_caches(self) -> list[str]:
        """Kinds of cache read by `load_caches` of which no entry has served a call since: stale (saved for other
        weights, data, settings or code, e.g. by another hf_fastif version), rebuilt by the calls that needed them."""
        served = {kind for (kind, _), used in self._from_disk.items() if used}
        return sorted({kind for kind, _ in self._from_disk} - served)

    def forget_unused_loaded(self, kinds: Sequence[str]) -> None:
        """Drop the entries of ``kinds`` read by `load_caches` that have served no call (so `save_caches` does not
        write them again)."""
        for (kind, key), used in list(self._from_disk.items()):
            if used or kind not in kinds:
                continue
            if kind == "trunk" and key in self._trunks:
                self._trunks.pop(key).close()
            elif kind == "low_rank" and self._low_rank is not None and self._low_rank[0] == key:
                self._low_rank = None
            elif kind == "gradient_index" and self._saved_gradient_index is not None \
                    and self._saved_gradient_index[0] == key:
                self._saved_gradient_index = None
            elif kind == "curvature":
                self._curvature.pop(key, None)
            del self._from_disk[kind, key]
