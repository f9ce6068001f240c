"""Writes that do not fit (a full disk, a file size limit, a read-only folder) leave no partial file and raise an
OSError that names the file and what to do."""

import errno
import os

import numpy as np
import pytest

from hf_fastif.utils import write_atomic


@pytest.mark.parametrize("content", ["streamed", "bytes", "text", "by name"])
def test_write_atomic_that_does_not_fit_removes_its_temporary_file(tmp_path, monkeypatch, content):
    """A failed write kept its temporary file (.NAME.PID.tmp, as large as what fitted: on a full disk, filling it
    for good), and np.save's OSError named no path. It is removed, and the error names the file, the original
    chained."""
    path = tmp_path / "trunk-0.npy"
    path.write_bytes(b"saved before")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if content == "streamed":
        def written(handle):
            handle.write(b"\0" * 4096)  # part of it reached the file
            full_disk()
    elif content == "by name":  # a library that writes a file by its name (faiss.write_index)
        def by_name(tmp):
            tmp.write_bytes(b"\0" * 4096)
            full_disk()
    elif content == "bytes":
        monkeypatch.setattr("pathlib.Path.write_bytes", lambda self, data: full_disk())
        written = b"new bytes"
    else:
        monkeypatch.setattr("pathlib.Path.write_text", lambda self, data, encoding=None: full_disk())
        written = "new text"
    with pytest.raises(OSError, match=f"Could not write {path} \\(No space left on device\\): free space on its "
                                      "disk") as raised:
        write_atomic(path, writer=by_name) if content == "by name" else write_atomic(path, written)
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value.__cause__, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["trunk-0.npy"] and path.read_bytes() == b"saved before"


def test_write_atomic_keeps_other_errors_and_the_os_error_subclass(tmp_path, monkeypatch):
    path = tmp_path / "a.npy"
    for given in ({}, {"content": "x", "writer": lambda tmp: None}):
        with pytest.raises(TypeError, match="content or writer, one of them"):
            write_atomic(path, **given)
    with pytest.raises(ValueError, match="Object arrays cannot be saved"):  # (not an OSError: raised as it is)
        write_atomic(path, lambda handle: np.save(handle, np.array([{}]), allow_pickle=False))
    assert not list(tmp_path.iterdir())

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError, match=f"Could not write {path} \\(Permission denied\\)"):
        write_atomic(path, "x")
    assert not list(tmp_path.iterdir())
