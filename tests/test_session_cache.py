"""The test session's private cache (tests/conftest.py): the caches of sessions that are gone are removed, a live
session's never, whatever its process id says."""

import fcntl
import os
import tempfile
import time

from tests import conftest


def _folder(root, pid: int, *, lock: bool, hours: float, fresh_file: bool = False):
    folder = root / f"{conftest._CACHE_PREFIX}{pid}_x{len(list(root.iterdir()))}"
    (folder / "minilm-nli").mkdir(parents=True)
    (folder / "minilm-nli" / "model.safetensors").write_bytes(b"w")
    if lock:
        (folder / conftest._LOCK_NAME).touch()
    then = time.time() - hours * 3600
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (then, then))
    if fresh_file:  # being written just now, one level down: the top folder's time does not change
        (folder / "minilm-nli" / "model.safetensors").write_bytes(b"more")
    return folder


def test_a_live_sessions_cache_is_kept_and_orphans_are_removed(tmp_path, monkeypatch):
    """A live session whose process id is not visible here (another process namespace sharing TMPDIR) and whose
    cache folder's own time was 2 hours old lost its cache while it was still writing into it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = 2**22 + 12345  # above any pid this machine hands out
    live = _folder(tmp_path, gone, lock=True, hours=2, fresh_file=True)
    held = os.open(live / conftest._LOCK_NAME, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # (another open file: the check's own open conflicts with it)
    try:
        ended = _folder(tmp_path, gone, lock=True, hours=1)  # its lock is free: the session ended, however
        starting = _folder(tmp_path, gone, lock=True, hours=0)  # created its lock file, not locked it yet
        legacy_old = _folder(tmp_path, gone, lock=False, hours=2)
        legacy_writing = _folder(tmp_path, gone, lock=False, hours=2, fresh_file=True)
        conftest._remove_orphaned_caches()
    finally:
        os.close(held)
    assert live.is_dir() and legacy_writing.is_dir() and starting.is_dir()
    assert not ended.exists() and not legacy_old.exists()
