"""Shared fixtures: tiny models built from configs and synthetic tokenized data. Fully offline."""

import atexit
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


def _remove_orphaned_caches() -> None:
    """Remove the private caches (up to ~350 MB each) of earlier sessions whose process is gone: a session stopped
    by SIGKILL runs no exit handler. The folder's name carries its session's process id; a live session in another
    process namespace sharing this TMPDIR looks gone, so only a folder untouched for an hour is removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_CACHE_PREFIX}*_*"):
        pid = folder.name.removeprefix(_CACHE_PREFIX).split("_", 1)[0]
        try:
            recent = time.time() - folder.stat().st_mtime < 3600
        except FileNotFoundError:
            continue
        if not pid.isdigit() or int(pid) == os.getpid() or recent:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def _stop_on_sigterm(signum, frame) -> None:
    """A CI timeout or cancel sends SIGTERM, which by default ends Python without its exit handlers, leaving the
    private cache behind: stop as on Ctrl-C instead (pytest then finishes the session and the cache is removed)."""
    raise KeyboardInterrupt(f"signal {signum}")


_remove_orphaned_caches()
_CACHE = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}_")
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
