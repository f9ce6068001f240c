"""Shared fixtures: tiny models built from configs and synthetic tokenized data. Fully offline."""

import atexit
import fcntl
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# hf_fastif's cache (the extracted MiniLM, fine-tuned embedded models) and the datasets cache (the parquet shards a
# loaded table is converted into) are private to the test session: tests never read a model fine-tuned elsewhere, nor
# leave one behind (the datasets cache in ~/.cache had grown by 657 entries over two days of test runs)
_CACHE_PREFIX = "hf_fastif_test_cache_"


_LOCK_NAME = ".session.lock"
"""The lock file a session holds (`fcntl.flock`) while it runs: a folder whose lock can be taken is no live
session's, whatever its process id says."""


def _remove_orphaned_caches() -> None:
    """Remove the private caches (up to ~350 MB each) of earlier sessions that are gone: a session stopped by SIGKILL
    runs no exit handler. A session holds an exclusive lock on its folder's lock file while it runs (released by the
    kernel when it ends, however it ends), so a folder whose lock can be taken is an orphan; a live session in another
    process namespace sharing this TMPDIR holds its lock too. A folder without a lock file (from before the lock) is
    removed when its process is gone and nothing in it changed for an hour."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_CACHE_PREFIX}*_*"):
        try:
            handle = os.open(folder / _LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            if _unlocked_orphan(folder):
                shutil.rmtree(folder, ignore_errors=True)
            continue
        except OSError:  # another user's, or removed meanwhile
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live session holds it
            continue
        else:  # (a session starting now creates its lock file, then locks it: a folder made minutes ago is kept)
            if time.time() - folder.stat().st_mtime > 600:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(handle)


def _unlocked_orphan(folder: Path) -> bool:
    pid = folder.name.removeprefix(_CACHE_PREFIX).split("_", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        newest = max([folder.stat().st_mtime] + [p.lstat().st_mtime for p in folder.rglob("*")])
        if time.time() - newest < 3600:
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's; or removed meanwhile
        return False
    return False


def _stop_on_sigterm(signum, frame) -> None:
    """A CI timeout or cancel sends SIGTERM, which by default ends Python without its exit handlers, leaving the
    private cache behind: stop as on Ctrl-C instead (pytest then finishes the session and the cache is removed)."""
    raise KeyboardInterrupt(f"signal {signum}")


_remove_orphaned_caches()
_CACHE = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}_")
_SESSION_LOCK = os.open(os.path.join(_CACHE, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(_SESSION_LOCK, fcntl.LOCK_EX)  # held until this process ends (see _remove_orphaned_caches)
os.environ["HF_FASTIF_CACHE"] = _CACHE
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and oversubscribed threads on a shared 2-core machine
# make them many times slower.
torch.set_num_threads(1)


@pytest.fixture
def pad_collator():
    from tests.tiny import pad_collator_for_tests

    return pad_collator_for_tests()


@pytest.fixture
def propagating():
    """For a test that reads warnings with ``caplog``: transformers' loggers (the Trainer's, which stop at
    transformers' root) propagate to it, and so do hf_fastif's through an in-process ``hf-fastif`` run (whose
    ``_library_logging`` gives a logger without handlers its own and stops its propagation: it finds one here, and
    leaves it). After the test, pass or fail, both are as they were (a test that ran ``main`` first left the
    ``hf_fastif`` logger unpropagating: the build warning test passed in the suite's order and failed alone)."""
    import logging

    from transformers.utils import logging as hf_logging

    library = logging.getLogger("hf_fastif")
    propagate, level, handlers = library.propagate, library.level, list(library.handlers)
    library.handlers[:] = [logging.NullHandler()]
    library.propagate = True
    hf_logging.enable_propagation()
    try:
        yield
    finally:
        hf_logging.disable_propagation()
        library.propagate, library.handlers[:] = propagate, handlers
        library.setLevel(level)
