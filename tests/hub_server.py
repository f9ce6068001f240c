"""A loopback test double of the Hugging Face Hub HTTP API.

This module speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.x and ``datasets`` 5.x use to
create a repo, upload files and commit them, and to download them again (``hf_hub_download``,
``snapshot_download``, ``HfFileSystem`` and therefore ``datasets.load_dataset(repo_id)``). It is meant for tests:
the real client libraries talk to it over HTTP exactly as they would talk to https://huggingface.co, so the tests
exercise the real request/response code paths without any network access.

Design
------
* Standard library only: :class:`http.server.ThreadingHTTPServer` serving from a daemon thread, bound to
  ``127.0.0.1`` on a free port (never to a public interface).
* Repos, branches, tags and commits live in memory; file contents are stored content-addressed (by sha256) in a
  directory (``storage_dir``, or a temporary directory removed by :meth:`HubServer.stop`).
* Every commit is a full immutable snapshot: ``revision=`` accepts a branch name, a tag name, ``refs/heads/<b>``,
  ``refs/tags/<t>``, ``refs/pr/<n>``, a full 40-hex commit id, or an unambiguous prefix (>= 7 hex) of one.
* Like the real Hub, a new repo starts with an "initial commit" holding a default ``.gitattributes`` that marks
  ``*.parquet``, ``*.arrow``, ... as LFS. The preupload endpoint answers ``"lfs"`` for those files (and for files
  over 10 MB or with a binary-looking sample) and ``"regular"`` otherwise, so with ``HF_HUB_DISABLE_XET=1`` the client
  uploads parquet shards through the LFS batch API + a single-part ``PUT`` and small text files inline (base64) in
  the ndjson commit -- the same two paths it takes against the real Hub. ``HubServer(lfs="never")`` forces every
  file inline; ``lfs="always"`` forces every non-empty file through LFS.
* LFS files are served the way the real Hub serves them: ``resolve`` answers ``302`` with ``X-Linked-Etag`` (the
  sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, redirecting to a signed URL on a *different origin*
  (``http://localhost:<port>/...``, a stand-in for the CDN). The client therefore stops its metadata ``HEAD`` at the
  302 and drops the ``Authorization`` header for the download, as it does against the real CDN. If ``localhost``
  does not resolve to ``127.0.0.1`` the double falls back to serving LFS files directly (``200`` + the same
  ``X-Linked-*`` headers).
* Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers the client maps onto its exceptions:
  ``RepoNotFound`` -> ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``,
  ``EntryNotFound`` -> ``RemoteEntryNotFoundError`` / ``EntryNotFoundError``.
* Auth: one bearer token (``HubServer(token=...)``, random by default). Writes need it; a wrong token gets the Hub's
  ``401 Invalid credentials in Authorization header``; private repos answer ``401`` + ``RepoNotFound`` to anonymous
  or wrongly-authenticated readers. Tokens are never written to the request log (see :attr:`HubServer.log_lines`);
  the log only holds method, path, query, status and whether the request was authenticated.

Client configuration
--------------------
``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` at import time
(and ``datasets.config`` copies some of them at its own import), so the client must be configured *before* it is
imported. :func:`run_client` runs client code in a fresh ``sys.executable`` subprocess with the environment from
:func:`client_env` (``HF_ENDPOINT=<server url>``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_OFFLINE=0``,
``HF_DATASETS_OFFLINE=0``, ``HF_TOKEN=<server token>``, a fresh ``HF_HOME`` / caches under the given directory, no
proxies). The pytest fixture :func:`hub_server` yields a started server.

Usage::

    from tests.hub_server import hub_server_fixture, run_client, run_client_json  # noqa: F401 (fixture)

    def test_roundtrip(hub_server, tmp_path):
        out = run_client_json('''
            import json, sys
            from huggingface_hub import HfApi
            info = HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="meta.json",
                                       repo_id=sys.argv[1], repo_type="dataset")
            print(json.dumps({"oid": info.oid}))
        ''', hub_server, tmp_path / "client", args=["test-user/ds"])   # (create_repo first)
        assert hub_server.head("test-user/ds") == out["oid"]

In-process helpers for assertions: :meth:`HubServer.head`, :meth:`HubServer.files`,
:meth:`HubServer.commit_history`, :meth:`HubServer.repo_exists`, :attr:`HubServer.requests`,
:attr:`HubServer.log_lines`.

Limits (what the real Hub does and this double does not) are listed in ``LIMITS`` below.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "HubServer",
    "HubError",
    "client_env",
    "run_client",
    "run_client_json",
    "hub_server",
    "hub_server_fixture",
    "LIMITS",
]

LIMITS = """\
What the real Hub does that this double does not:
- Xet storage (X-Xet-* headers, CAS upload/download): not implemented; clients must run with HF_HUB_DISABLE_XET=1.
- LFS multipart uploads (chunk_size / per-part URLs / completion call): the batch API only offers single-part PUT.
- The dataset viewer / datasets-server (parquet export, /info): not served. datasets derives its host from
  HF_ENDPOINT (http://datasets-server.127.0.0.1:<port>), the lookup fails and datasets falls back to reading the
  repo; on a machine whose DNS resolver hangs instead of failing, load_dataset(..., revision="main") waits for it.
- cardData in repo info (parsing README YAML), /api/validate-yaml does only a front-matter delimiter check.
- .gitignore handling in preupload (shouldIgnore is always false).
- Namespaces and permissions: any namespace is writable with the one token; no orgs ACLs, gating, read-only tokens,
  rate limits (429), or resource groups.
- Pull requests / discussions beyond create_pr=True creating a refs/pr/<n> branch (no merge, comments, status).
- Spaces runtime, inference, webhooks, collections, likes, search/listing endpoints (list_models, list_datasets...),
  super-squash, LFS file listing/deletion, repo move/settings update, gated access, safetensors metadata.
- Response compression (gzip) and CDN caching semantics; Content-Type is guessed from the extension only.
- Commit ids are sha1 over a synthetic commit body, not real git objects; there is no git smart-HTTP (no clone/push).
"""

# ----------------------------------------------------------------------------------------------------------------------
# Constants mirroring the Hub
# ----------------------------------------------------------------------------------------------------------------------

# Default `.gitattributes` pushed in the "initial commit" of new repos (subset of the Hub's default).
_LFS_PATTERNS_COMMON = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.lz4",
    "*.mds", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar",
    "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
]
_LFS_PATTERNS_DATASET_MEDIA = [
    "*.pcm", "*.sam", "*.raw", "*.aac", "*.flac", "*.mp3", "*.ogg", "*.wav",
    "*.bmp", "*.gif", "*.png", "*.tiff", "*.jpg", "*.jpeg", "*.webp", "*.mp4", "*.webm",
]


def _default_gitattributes(repo_type: str) -> bytes:
    patterns = list(_LFS_PATTERNS_COMMON)
    if repo_type == "dataset":
        patterns += _LFS_PATTERNS_DATASET_MEDIA
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns).encode()


_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub routes regular files over 10 MB to LFS
_TREE_PAGE_SIZE = 1000  # Hub pagination: 1000 entries per page...
_TREE_PAGE_SIZE_EXPAND = 50  # ... 50 with expand=True
_COMMITS_PAGE_SIZE = 50

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_CONTENT_TYPES = {
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".yml": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".gitattributes": "text/plain; charset=utf-8",
}


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answered the way the Hub answers it (status + X-Error-Code + X-Error-Message + JSON body)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # additional keys of the JSON error body


def _repo_not_found(status: int = 404) -> HubError:
    return HubError(status, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# ----------------------------------------------------------------------------------------------------------------------
# Storage model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One file in a commit snapshot."""

    size: int
    sha256: str
    git_oid: str  # git blob sha1 (of the content for regular files, of the LFS pointer for LFS files)
    lfs: bool
    pointer_size: int | None
    last_commit: str  # oid of the commit that last modified this path


@dataclass
class _Commit:
    oid: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    files: dict[str, _Entry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid (PR refs are "refs/pr/<n>")
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of LFS objects uploaded to this repo
    next_pr: int = 1


class _BlobStore:
    """Content-addressed blob storage (sha256 -> bytes) on disk."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if not path.exists():
            tmp = path.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def has(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self._path(sha256).stat().st_size

    def read(self, sha256: str, start: int = 0, end: int | None = None) -> bytes:
        with open(self._path(sha256), "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(end - start)


# ----------------------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------------------


class HubServer:
    """In-process test double of the Hugging Face Hub, on ``http://127.0.0.1:<free port>``.

    Args:
        storage_dir: where blobs are stored. Defaults to a temporary directory deleted by :meth:`stop`.
        token: the bearer token the server accepts (default: a random ``hf_...`` string).
        user: the user name the token belongs to (returned by ``whoami``; namespace of repos created without one).
        lfs: ``"auto"`` (Hub-like: ``.gitattributes`` patterns, > 10 MB or binary sample -> LFS), ``"never"``
            (every file inline in the commit) or ``"always"`` (every non-empty file through LFS).
        verbose: also print the request log lines to stderr.

    Attributes:
        url: base URL (``HF_ENDPOINT``), available after :meth:`start`.
        requests: list of dicts ``{method, path, query, status, authenticated, auth, host, error, error_code}``, one
            per request served (``auth``: ``"none"``, ``"valid"`` or ``"invalid"`` Authorization header;
            ``authenticated``: ``auth == "valid"``). The token itself is never stored.
        log_lines: the same, formatted as text lines. Never contains tokens.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike | None = None,
        *,
        token: str | None = None,
        user: str = "test-user",
        lfs: str = "auto",
        verbose: bool = False,
    ):
        if lfs not in ("auto", "never", "always"):
            raise ValueError("lfs must be 'auto', 'never' or 'always'")
        self.token = token or f"hf_test_{secrets.token_hex(16)}"
        self.user = user
        self.lfs_mode = lfs
        self.verbose = verbose
        self._own_storage = storage_dir is None
        self._storage_arg = storage_dir
        self.storage_dir: Path | None = None
        self._blobs: _BlobStore | None = None
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(32)
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0
        self.requests: list[dict[str, Any]] = []
        self.log_lines: list[str] = []
        self.url: str = ""
        self.cdn_url: str = ""
        self.host = "127.0.0.1"
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        if self._own_storage:
            self.storage_dir = Path(tempfile.mkdtemp(prefix="hub-server-"))
        else:
            self.storage_dir = Path(self._storage_arg)  # type: ignore[arg-type]
            self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._blobs = _BlobStore(self.storage_dir / "blobs")

        server = self

        class Handler(_Handler):
            hub = server

        httpd = _QuietThreadingHTTPServer((self.host, 0), Handler)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        # Stand-in for the CDN: same socket, different origin (so the client strips auth, as with the real CDN).
        self.cdn_url = f"http://localhost:{self.port}" if _localhost_is_loopback() else self.url
        self._thread = threading.Thread(target=httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_storage and self.storage_dir is not None:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            self.storage_dir = None
            with self._lock:
                self._repos.clear()  # their blobs are gone with the temporary directory

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def bound_address(self) -> tuple[str, int]:
        """The (host, port) the listening socket is actually bound to."""
        assert self._httpd is not None, "server not started"
        return self._httpd.socket.getsockname()[:2]

    @property
    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    # -- direct (in-process) helpers for tests -----------------------------------------------------------------------

    def repo_exists(self, repo_id: str, repo_type: str = "dataset") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, repo_type: str = "dataset", branch: str = "main") -> str:
        """Commit id at the head of ``branch``."""
        with self._lock:
            return self._repos[(repo_type, repo_id)].branches[branch]

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """All files of a repo at ``revision`` (path -> content), read directly from the store."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid = self._resolve(repo, revision)
            if oid is None:
                raise KeyError(revision)
            entries = dict(repo.commits[oid].files)
        assert self._blobs is not None
        return {path: self._blobs.read(e.sha256) for path, e in entries.items()}

    def damage(self, repo_id: str, path: str, data: bytes, repo_type: str = "dataset", revision: str = "main") -> bytes:
        """Serve ``data`` for ``path`` at ``revision`` from now on, under the file's recorded sha256 and size (a store
        that went bad, a transfer changed in flight); returns the bytes it held, for `damage` to put back."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            entry = repo.commits[self._resolve(repo, revision)].files[path]
        assert self._blobs is not None
        blob = self._blobs._path(entry.sha256)
        before = blob.read_bytes()
        blob.write_bytes(data)
        return before

    def commit_history(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> list[str]:
        """Commit ids reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid = self._resolve(repo, revision)
            out = []
            while oid is not None:
                out.append(oid)
                parents = repo.commits[oid].parents
                oid = parents[0] if parents else None
            return out

    # -- logging ---------------------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self.token, "<redacted>") if self.token else text

    def _record(self, entry: dict[str, Any]) -> None:
        entry = {k: (self._redact(v) if isinstance(v, str) else v) for k, v in entry.items()}
        line = (
            f"{entry['method']} {entry['path']}{('?' + entry['query']) if entry['query'] else ''} "
            f"-> {entry['status']}{' (auth)' if entry['authenticated'] else ''}"
        )
        if entry.get("error"):
            line += f" [{entry.get('error_code') or 'error'}: {entry['error']}]"
        with self._lock:
            self.requests.append(entry)
            self.log_lines.append(line)
        if self.verbose:
            print(f"[hub-server] {line}", file=sys.stderr)

    # -- repo state helpers (call with the lock held) -----------------------------------------------------------------

    def _new_commit_oid(self, tree_files: dict[str, _Entry], parents: list[str], title: str) -> str:
        self._commit_counter += 1
        h = hashlib.sha1()
        for path in sorted(tree_files):
            h.update(f"{path}\0{tree_files[path].git_oid}\n".encode())
        h.update(f"parents {' '.join(parents)}\n{title}\n{time.time_ns()}\n{self._commit_counter}".encode())
        return h.hexdigest()

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
        assert self._blobs is not None
        data = _default_gitattributes(repo_type)
        sha = self._blobs.put(data)
        entry_files: dict[str, _Entry] = {}
        oid = self._new_commit_oid(entry_files, [], "initial commit")
        entry_files[".gitattributes"] = _Entry(len(data), sha, _git_blob_oid(data), False, None, oid)
        repo.commits[oid] = _Commit(oid, [], "initial commit", "", _now_iso(), self.user, entry_files)
        repo.branches["main"] = oid
        self._repos[(repo_type, repo_id)] = repo
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str | None:
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
            return repo.branches.get(rev)
        if rev.startswith("refs/tags/"):
            return repo.tags.get(rev[len("refs/tags/") :])
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        lowered = rev.lower()
        if lowered in repo.commits:
            return lowered
        if 7 <= len(lowered) < 40 and all(c in "0123456789abcdef" for c in lowered):
            matches = [oid for oid in repo.commits if oid.startswith(lowered)]
            if len(matches) == 1:
                return matches[0]
        return None

    def _lfs_patterns(self, files: dict[str, _Entry]) -> list[str]:
        entry = files.get(".gitattributes")
        if entry is None:
            return []
        assert self._blobs is not None
        patterns = []
        for line in self._blobs.read(entry.sha256).decode("utf-8", "replace").splitlines():
            parts = line.strip().split()
            if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    def _upload_mode(self, path: str, size: int, sample: bytes, patterns: list[str]) -> str:
        if size == 0 or self.lfs_mode == "never":
            return "regular"
        if self.lfs_mode == "always":
            return "lfs"
        name = path.rsplit("/", 1)[-1]
        for pattern in patterns:
            target = path if "/" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                return "lfs"
        if size > _LFS_SIZE_THRESHOLD or b"\x00" in sample[:8000]:
            return "lfs"
        return "regular"

    def _sign(self, sha256: str) -> str:
        return hmac.new(self._secret, sha256.encode(), hashlib.sha256).hexdigest()[:32]


class _QuietThreadingHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (aborted downloads, closed keep-alive sockets) are routine: stay quiet.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def _localhost_is_loopback() -> bool:
    try:
        return socket.gethostbyname("localhost") == "127.0.0.1"
    except OSError:
        return False


def _dir_oid(files: dict[str, _Entry], prefix: str) -> str:
    h = hashlib.sha1(b"tree\0" + prefix.encode())
    for path in sorted(files):
        if path.startswith(prefix):
            h.update(f"{path}\0{files[path].git_oid}\n".encode())
    return h.hexdigest()


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------------------------------
# Request handler
# ----------------------------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "hub-server-double/1.0"

    # -- plumbing ------------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence BaseHTTPRequestHandler's stderr log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._method = method
        self._raw_path = split.path
        self._query_string = split.query
        self.query = parse_qs(split.query, keep_blank_values=True)
        self._body: bytes | None = None
        self._status = 0
        self._authenticated = False
        self._error: HubError | None = None
        try:
            self._auth_state = self._check_auth()
            self._route(method)
        except HubError as e:
            self._send_error(e)
        except (ConnectionError, TimeoutError):
            # client went away (e.g. closed a streamed download early): nothing left to answer
            self.close_connection = True
        except Exception as e:  # pragma: no cover - a bug in the double: answer 500 with the reason
            self._send_error(HubError(500, f"hub-server-double internal error: {type(e).__name__}: {e}"))
        finally:
            # Drain any unread request body so the keep-alive connection stays in sync.
            if self._body is None and method in ("POST", "PUT", "DELETE"):
                with contextlib.suppress(Exception):
                    self._read_body()
            self.hub._record(
                {
                    "method": method,
                    "path": self._raw_path,
                    "query": self._query_string,
                    "status": self._status,
                    "authenticated": self._authenticated,
                    "auth": getattr(self, "_auth_state", "none"),
                    "host": self.headers.get("Host", ""),
                    "error": self._error.message if self._error else None,
                    "error_code": self._error.code if self._error else None,
                }
            )

    def _read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length else b""
        return self._body

    def _json_body(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str | None = None) -> None:
        self._status = status
        self.send_response(status)
        headers = dict(headers or {})
        if content_type is not None:
            headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, content_type: str | None = None
    ) -> None:
        self._send(status, json.dumps(payload).encode(), headers, content_type or "application/json; charset=utf-8")

    def _send_error(self, err: HubError) -> None:
        self._error = err
        if self._status:  # a response was already started: we cannot send another one, drop the connection
            self.close_connection = True
            return
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._send_json(err.status, {"error": err.message, **err.extra}, headers)

    # -- auth ----------------------------------------------------------------------------------------------------------

    def _check_auth(self) -> str:
        """Returns 'none', 'valid' or 'invalid'."""
        header = self.headers.get("Authorization")
        if not header:
            return "none"
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.hub.token.encode()):
            self._authenticated = True
            return "valid"
        return "invalid"

    def _require_write(self) -> None:
        if self._auth_state == "invalid":
            raise HubError(401, "Invalid credentials in Authorization header")
        if self._auth_state != "valid":
            raise HubError(401, "Invalid username or password.")

    def _reject_invalid_token(self) -> None:
        if self._auth_state == "invalid":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> _Repo:
        if write:
            self._require_write()
        else:
            self._reject_invalid_token()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found()
        if repo.private and self._auth_state != "valid":
            raise _repo_not_found(401)
        return repo

    # -- routing -------------------------------------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        segs = [unquote(s) for s in self._raw_path.split("/")[1:]]
        raw = self._raw_path.split("/")[1:]
        if not segs or segs == [""]:
            return self._send(200, b"hub-server-double\n", content_type="text/plain")
        head = segs[0]

        if head == "api":
            return self._route_api(method, segs[1:], raw[1:])
        if head == "__cdn__" and method in ("GET", "HEAD") and len(segs) == 2:
            return self._serve_cdn(segs[1])
        if head == "__lfs_upload__" and method == "PUT" and len(segs) == 4:
            return self._lfs_put(_TYPE_FROM_PLURAL.get(segs[1], ""), segs[2], segs[3])

        repo_type = "model"
        rest = segs
        if head in ("datasets", "spaces"):
            repo_type = _TYPE_FROM_PLURAL[head]
            rest = segs[1:]
        # /{ns}/{name}.git/info/lfs/objects/{batch,verify}
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{rest[0]}/{rest[1][:-4]}"
            if rest[5] == "batch":
                return self._lfs_batch(repo_type, repo_id)
            if rest[5] == "verify":
                return self._lfs_verify(repo_type, repo_id)
        # /{ns}/{name}/resolve/{rev}/{path...}
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{rest[0]}/{rest[1]}"
            return self._resolve_file(repo_type, repo_id, rest[3], "/".join(rest[4:]))
        raise HubError(404, f"hub-server-double: no route for {method} {self._raw_path}")

    def _route_api(self, method: str, segs: list[str], raw: list[str]) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segs == ["agent-harnesses"] and method == "GET":
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(segs) >= 3 and segs[0] in _TYPE_FROM_PLURAL:
            repo_type = _TYPE_FROM_PLURAL[segs[0]]
            repo_id = f"{segs[1]}/{segs[2]}"
            action = segs[3] if len(segs) > 3 else None
            args = segs[4:]
            if action is None and method == "GET":
                return self._repo_info(repo_type, repo_id, None)
            if action == "revision" and method == "GET" and args:
                return self._repo_info(repo_type, repo_id, "/".join(args))
            if action == "tree" and method == "GET" and args:
                # revision is quoted with safe="" (one segment); the path may be one quoted segment or several
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
            if action == "paths-info" and method == "POST" and args:
                return self._paths_info(repo_type, repo_id, "/".join(args))
            if action == "preupload" and method == "POST" and args:
                return self._preupload(repo_type, repo_id, "/".join(args))
            if action == "commit" and method == "POST" and args:
                return self._commit(repo_type, repo_id, "/".join(args))
            if action == "refs" and method == "GET" and not args:
                return self._refs(repo_type, repo_id)
            if action == "commits" and method == "GET" and args:
                return self._list_commits(repo_type, repo_id, "/".join(args))
            if action == "branch" and args and method in ("POST", "DELETE"):
                return self._branch(method, repo_type, repo_id, "/".join(args))
            if action == "tag" and args and method in ("POST", "DELETE"):
                return self._tag(method, repo_type, repo_id, "/".join(args))
        raise HubError(404, f"hub-server-double: no route for {method} /api/{'/'.join(raw)}")

    # -- account -------------------------------------------------------------------------------------------------------

    def _whoami(self) -> None:
        if self._auth_state != "valid":
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(self.hub.user.encode()).hexdigest()[:24],
                "name": self.hub.user,
                "fullname": self.hub.user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "hub-server-double", "role": "write", "createdAt": _now_iso()},
                },
            },
        )

    def _validate_yaml(self) -> None:
        payload = self._json_body()
        content = payload.get("content", "")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            return self._send_json(
                400, {"errors": [{"message": "YAML front matter is not closed by '---'"}], "warnings": []}
            )
        self._send_json(200, {"errors": [], "warnings": []})

    # -- repos ---------------------------------------------------------------------------------------------------------

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, "Invalid repo name")
        namespace = payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo_id = f"{namespace}/{name}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                raise HubError(
                    409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(repo_type, repo_id)}
                )
            self.hub._create_repo(repo_type, repo_id, private)
        self._send_json(200, {"url": self._repo_url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        with self.hub._lock:
            if self.hub._repos.pop((repo_type, repo_id), None) is None:
                raise _repo_not_found()
        self._send(200, b"", content_type="text/plain")

    def _entry_json(self, repo: _Repo, path: str, entry: _Entry, expand: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            commit = repo.commits[entry.last_commit]
            out["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
            out["securityFileStatus"] = {
                "status": "safe",
                "avScan": {"virusFound": False, "virusNames": None},
                "pickleImportScan": None,
            }
        return out

    def _dir_json(self, repo: _Repo, files: dict[str, _Entry], path: str, expand: bool) -> dict[str, Any]:
        prefix = path + "/"
        out: dict[str, Any] = {"type": "directory", "oid": _dir_oid(files, prefix), "size": 0, "path": path}
        if expand:
            latest = max(
                (repo.commits[e.last_commit] for p, e in files.items() if p.startswith(prefix)),
                key=lambda c: c.date,
            )
            out["lastCommit"] = {"id": latest.oid, "title": latest.title, "date": latest.date}
        return out

    def _snapshot(self, repo_type: str, repo_id: str, revision: str) -> tuple[_Repo, _Commit]:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = self.hub._resolve(repo, revision)
            if oid is None:
                raise _revision_not_found(revision)
            return repo, repo.commits[oid]

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        repo, commit = self._snapshot(repo_type, repo_id, revision or "main")
        blobs = _is_true((self.query.get("blobs") or [None])[0])
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib["size"] = entry.size
                sib["blobId"] = entry.git_oid
                if entry.lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(200, info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, commit = self._snapshot(repo_type, repo_id, revision)
        path = path.strip("/")
        recursive = _is_true((self.query.get("recursive") or [None])[0])
        expand = _is_true((self.query.get("expand") or [None])[0])
        files = commit.files
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for file_path, entry in files.items():
            if not file_path.startswith(prefix):
                continue
            rel_parts = file_path[len(prefix) :].split("/")
            # intermediate directories
            depth = len(rel_parts) - 1 if recursive else min(1, len(rel_parts) - 1)
            for i in range(1, depth + 1):
                dir_path = prefix + "/".join(rel_parts[:i])
                if dir_path not in entries:
                    entries[dir_path] = self._dir_json(repo, files, dir_path, expand)
            if recursive or len(rel_parts) == 1:
                entries[file_path] = self._entry_json(repo, file_path, entry, expand)
        ordered = [entries[k] for k in sorted(entries)]
        page_size = _TREE_PAGE_SIZE_EXPAND if expand else _TREE_PAGE_SIZE
        cursor = int((self.query.get("cursor") or ["0"])[0] or 0)
        page = ordered[cursor : cursor + page_size]
        headers = {"X-Repo-Commit": commit.oid}
        if cursor + page_size < len(ordered):
            params = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + page_size}"
            headers["Link"] = f'<{self.hub.url}{self._raw_path}?{params}>; rel="next"'
        self._send_json(200, page, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._read_body()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = json.loads(body or b"{}")
            paths = payload.get("paths", [])
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _is_true((form.get("expand") or [None])[0])
        repo, commit = self._snapshot(repo_type, repo_id, revision)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry_json(repo, p, commit.files[p], expand))
            elif p and any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_json(repo, commit.files, p, expand))
        self._send_json(200, out, {"X-Repo-Commit": commit.oid})

    def _refs(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                for n, o in sorted(repo.branches.items())
                if not n.startswith("refs/pr/")
            ]
            prs = [
                {"name": n, "ref": n, "targetCommit": o}
                for n, o in sorted(repo.branches.items())
                if n.startswith("refs/pr/")
            ]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(repo.tags.items())]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if _is_true((self.query.get("include_prs") or [None])[0]):
            payload["pullRequests"] = prs
        self._send_json(200, payload)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, commit = self._snapshot(repo_type, repo_id, revision)
        items = []
        with self.hub._lock:
            oid: str | None = commit.oid
            while oid is not None:
                c = repo.commits[oid]
                items.append(
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "authors": [{"user": c.author}],
                        "date": c.date,
                        "formatted": {"title": c.title, "message": c.message},
                    }
                )
                oid = c.parents[0] if c.parents else None
        cursor = int((self.query.get("p") or ["0"])[0] or 0)
        page = items[cursor * _COMMITS_PAGE_SIZE : (cursor + 1) * _COMMITS_PAGE_SIZE]
        headers = {}
        if (cursor + 1) * _COMMITS_PAGE_SIZE < len(items):
            headers["Link"] = f'<{self.hub.url}{self._raw_path}?p={cursor + 1}>; rel="next"'
        self._send_json(200, page, headers)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            if method == "DELETE":
                if branch not in repo.branches:
                    raise _revision_not_found(branch)
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json(200, {})
            payload = self._json_body()
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            oid = self.hub._resolve(repo, start)
            if oid is None:
                raise _revision_not_found(start)
            repo.branches[branch] = oid
        self._send_json(200, {})

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            if method == "DELETE":
                if arg not in repo.tags:
                    raise _revision_not_found(arg)
                del repo.tags[arg]
                return self._send_json(200, {})
            payload = self._json_body()
            tag = payload.get("tag")
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            oid = self.hub._resolve(repo, arg)
            if oid is None:
                raise _revision_not_found(arg)
            repo.tags[tag] = oid
        self._send_json(200, {})

    # -- uploads -------------------------------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        payload = self._json_body()
        create_pr = _is_true((self.query.get("create_pr") or [None])[0])
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            oid = self.hub._resolve(repo, revision)
            if oid is None:
                if not create_pr:
                    raise _revision_not_found(revision)
                oid = repo.branches["main"]
            files = repo.commits[oid].files
        patterns = self.hub._lfs_patterns(files)
        out = []
        for f in payload.get("files", []):
            path = f["path"]
            sample = base64.b64decode(f.get("sample", "") or "")
            size = int(f.get("size", 0))
            mode = self.hub._upload_mode(path, size, sample, patterns)
            item: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = files.get(path)
            if existing is not None:
                item["oid"] = existing.sha256 if existing.lfs else existing.git_oid
            out.append(item)
        self._send_json(200, {"files": out, "commitOid": oid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        payload = self._json_body()
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            if payload.get("operation") != "upload":
                raise HubError(400, "hub-server-double only supports the 'upload' LFS batch operation")
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or len(oid) != 64 or not isinstance(size, int):
                    objects.append(
                        {"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}}
                    )
                    continue
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if not (oid in repo.lfs_objects and self.hub._blobs.has(oid)):  # type: ignore[union-attr]
                    prefix = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
                    item["actions"] = {
                        "upload": {
                            "href": f"{self.hub.url}/__lfs_upload__/{prefix}/{quote(repo_id, safe='')}/{oid}"
                            f"?size={size}&sig={self.hub._sign(repo_type + repo_id + oid)}",
                            "expires_at": "2099-01-01T00:00:00.000Z",
                        },
                        "verify": {
                            "href": f"{self._repo_url(repo_type, repo_id)}.git/info/lfs/objects/verify",
                            "header": {"Content-Type": "application/vnd.git-lfs+json"},
                        },
                    }
                objects.append(item)
        self._send_json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, repo_type: str, repo_id: str, oid: str) -> None:
        # Like a pre-signed S3 URL: no Authorization header, the signature in the query authorizes the upload.
        sig = (self.query.get("sig") or [""])[0]
        if not repo_type or not hmac.compare_digest(sig, self.hub._sign(repo_type + repo_id + oid)):
            raise HubError(403, "SignatureDoesNotMatch")
        data = self._read_body()
        expected_size = int((self.query.get("size") or ["-1"])[0])
        if expected_size >= 0 and len(data) != expected_size:
            raise HubError(400, f"Size mismatch: expected {expected_size}, got {len(data)}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 oid")
        assert self.hub._blobs is not None
        self.hub._blobs.put(data)
        with self.hub._lock:
            repo = self.hub._repos.get((repo_type, repo_id))
            if repo is None:
                raise HubError(404, "NoSuchBucket")
            repo.lfs_objects.add(oid)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        payload = self._json_body()
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            oid, size = payload.get("oid"), payload.get("size")
            if oid not in repo.lfs_objects or self.hub._blobs.size(oid) != size:  # type: ignore[union-attr]
                raise HubError(404, f"LFS object {oid} not found")
        self._send_json(200, {"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._read_body()
        create_pr = _is_true((self.query.get("create_pr") or [None])[0])
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid ndjson payload: {e}") from e
        if "json" in self.headers.get("Content-Type", "") and "ndjson" not in self.headers.get("Content-Type", ""):
            # legacy JSON payload {"summary":..., "files": [...], ...} is not supported
            raise HubError(400, "hub-server-double only supports the ndjson commit payload")
        header = next((item["value"] for item in lines if item.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "Missing commit header")
        assert self.hub._blobs is not None
        blobs = self.hub._blobs
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id, write=True)
            if create_pr:
                base = self.hub._resolve(repo, revision)
                if base is None:
                    raise _revision_not_found(revision)
                pr_num = repo.next_pr
                repo.next_pr += 1
                branch = f"refs/pr/{pr_num}"
                repo.branches[branch] = base
            else:
                branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
                if branch not in repo.branches:
                    if self.hub._resolve(repo, revision) is not None:
                        raise HubError(400, f"Can only commit to a branch, got: {revision}")
                    raise _revision_not_found(revision)
            head = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            ops = [item for item in lines if item.get("key") != "header"]
            pending: list[tuple[str, _Entry]] = []  # path -> entry (last_commit filled in below)
            for item in ops:
                key, value = item.get("key"), item.get("value") or {}
                path = value.get("path", "")
                if key in ("file", "lfsFile"):
                    _validate_repo_path(path)
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, "Only base64 encoding is supported")
                    data = base64.b64decode(value.get("content", ""))
                    sha = blobs.put(data)
                    pending.append((path, _Entry(len(data), sha, _git_blob_oid(data), False, None, "")))
                    files.pop(path, None)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if value.get("algo", "sha256") != "sha256":
                        raise HubError(400, "Only sha256 LFS oids are supported")
                    if oid not in repo.lfs_objects or not blobs.has(oid):
                        raise HubError(
                            422,
                            f"Your push was rejected because an LFS pointer pointed to a file that does not exist "
                            f"(path: {path}, oid: {oid})",
                        )
                    size = blobs.size(oid)
                    pointer = _lfs_pointer(oid, size)
                    pending.append((path, _Entry(size, oid, _git_blob_oid(pointer), True, len(pointer), "")))
                    files.pop(path, None)
                elif key == "deletedFile":
                    _validate_repo_path(path)
                    if path not in files and path not in dict(pending):
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    files.pop(path, None)
                    pending = [(p, e) for p, e in pending if p != path]
                elif key == "deletedFolder":
                    prefix = path.strip("/") + "/"
                    before = len(files) + len(pending)
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                    pending = [(p, e) for p, e in pending if not p.startswith(prefix)]
                    if len(files) + len(pending) == before:
                        raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                else:
                    raise HubError(400, f"Unknown commit operation: {key!r}")
            new_files_preview = dict(files)
            new_files_preview.update(dict(pending))
            oid = self.hub._new_commit_oid(new_files_preview, [head], header.get("summary", ""))
            for path, entry in pending:
                files[path] = _Entry(entry.size, entry.sha256, entry.git_oid, entry.lfs, entry.pointer_size, oid)
            summary = header.get("summary") or "Upload files"
            repo.commits[oid] = _Commit(oid, [head], summary, header.get("description", ""), _now_iso(),
                                        self.hub.user, files)
            repo.branches[branch] = oid
        response: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{oid}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }
        if create_pr:
            response["pullRequestUrl"] = f"{self._repo_url(repo_type, repo_id)}/discussions/{pr_num}"
        self._send_json(200, response)

    # -- downloads -----------------------------------------------------------------------------------------------------

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, commit = self._snapshot(repo_type, repo_id, revision)
        entry = commit.files.get(path)
        base_headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        if entry.lfs:
            headers = dict(base_headers)
            headers["ETag"] = f'"{entry.sha256}"'
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            if self.hub.cdn_url != self.hub.url:
                headers["Location"] = f"{self.hub.cdn_url}/__cdn__/{entry.sha256}?sig={self.hub._sign(entry.sha256)}"
                return self._send(302, b"", headers)
            return self._serve_blob(entry.sha256, path, headers)
        headers = dict(base_headers)
        headers["ETag"] = f'"{entry.git_oid}"'
        return self._serve_blob(entry.sha256, path, headers)

    def _serve_cdn(self, sha256: str) -> None:
        sig = (self.query.get("sig") or [""])[0]
        if not hmac.compare_digest(sig, self.hub._sign(sha256)):
            raise HubError(403, "Access denied: invalid signature")
        assert self.hub._blobs is not None
        if not self.hub._blobs.has(sha256):
            raise HubError(404, "Not found")
        self._serve_blob(sha256, sha256, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                         content_type="application/octet-stream")

    def _serve_blob(self, sha256: str, path: str, headers: dict[str, str], content_type: str | None = None) -> None:
        assert self.hub._blobs is not None
        size = self.hub._blobs.size(sha256)
        if content_type is None:
            suffix = "." + path.rsplit(".", 1)[-1] if "." in path else ""
            content_type = _CONTENT_TYPES.get(suffix, "application/octet-stream")
        headers = dict(headers)
        headers["Content-Type"] = content_type
        range_header = self.headers.get("Range")
        if range_header:
            rng = _parse_range(range_header, size)
            if rng is None:
                headers["Content-Range"] = f"bytes */{size}"
                raise HubError(416, "Requested Range Not Satisfiable", headers=headers)
            start, end = rng  # inclusive end
            body = self.hub._blobs.read(sha256, start, end + 1) if self._method == "GET" else b""
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
            return self._send(206, body, headers)
        body = self.hub._blobs.read(sha256) if self._method == "GET" else b""
        headers["Content-Length"] = str(size)
        self._send(200, body, headers)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range; None if unsatisfiable/unsupported."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def _validate_repo_path(path: str) -> None:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if path == ".git" or path.startswith(".git/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Running client code in a subprocess
# ----------------------------------------------------------------------------------------------------------------------

_STRIPPED_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def client_env(server: HubServer, home: str | os.PathLike, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a client subprocess talking to ``server``, with a fresh HF home under ``home``.

    Every ``HF_*`` / ``HUGGINGFACE_*`` / ``TRANSFORMERS_*`` variable of the current process (e.g. a global
    ``HF_HUB_OFFLINE=1`` from the test suite, a real ``HF_TOKEN``) is dropped, proxies are disabled, and the repo root
    is put on ``PYTHONPATH`` (before anything inherited) so the client code can import the project and ``tests``.
    """
    home = Path(home)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_STRIPPED_ENV_PREFIXES) and k not in _PROXY_VARS and k not in ("NO_PROXY", "no_proxy")
    }
    repo_root = str(Path(__file__).resolve().parent.parent)
    src = Path(repo_root) / "src"
    pythonpath = [repo_root] + ([str(src)] if src.is_dir() else [])
    if env.get("PYTHONPATH"):
        pythonpath.append(env["PYTHONPATH"])
    env.update(
        {
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": server.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "HF_HOME": str(home / "hf_home"),
            "HF_HUB_CACHE": str(home / "hf_home" / "hub"),
            "HF_DATASETS_CACHE": str(home / "hf_home" / "datasets"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
            "HF_HUB_DISABLE_EXPERIMENTAL_WARNING": "1",
            "HF_HUB_ETAG_TIMEOUT": "30",
            "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
            "HUB_SERVER_URL": server.url,
        }
    )
    if extra:
        env.update(extra)
    return env


def run_client(
    code: str,
    server: HubServer,
    tmp_path: str | os.PathLike,
    timeout: float = 120,
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    args: Iterable[str] = (),
) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) with ``sys.executable`` in a subprocess configured for ``server``.

    ``tmp_path`` holds the script and the fresh HF home/caches (reuse the same ``tmp_path`` across calls to share the
    client cache, pass different directories for independent clients). ``env`` adds/overrides variables.
    With ``check=True`` (default) a non-zero exit raises ``AssertionError`` showing stdout/stderr (token redacted).
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / f"hub_client_{secrets.token_hex(4)}.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=client_env(server, tmp_path, env),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"client subprocess failed (exit {proc.returncode})\n"
            f"--- stdout ---\n{server._redact(proc.stdout)}\n--- stderr ---\n{server._redact(proc.stderr)}\n"
            f"--- server log (last 40) ---\n" + "\n".join(server.log_lines[-40:])
        )
    return proc


def run_client_json(code: str, server: HubServer, tmp_path: str | os.PathLike, timeout: float = 120, **kwargs: Any) -> Any:
    """Like :func:`run_client`, then parse the last non-empty stdout line as JSON (print it from the client code)."""
    proc = run_client(code, server, tmp_path, timeout, **kwargs)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"client printed nothing on stdout; stderr:\n{server._redact(proc.stderr)}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------------
# pytest fixture
# ----------------------------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the double is usable without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(name="hub_server")
    def hub_server_fixture(tmp_path_factory):  # type: ignore[no-untyped-def]
        """The ``hub_server`` fixture: a started :class:`HubServer` (fresh state, blobs under a pytest tmp dir),
        stopped after the test. Import it as ``from tests.hub_server import hub_server_fixture  # noqa: F401``
        (no shadowing of the ``hub_server`` test argument) or ``from tests.hub_server import hub_server``."""
        server = HubServer(storage_dir=tmp_path_factory.mktemp("hub_server_storage"))
        server.start()
        try:
            yield server
        finally:
            server.stop()

    hub_server = hub_server_fixture
