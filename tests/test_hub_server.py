"""Tests of the Hub test double (tests/hub_server.py) driven by the REAL huggingface_hub / datasets clients.

The clients run in subprocesses (see `run_client`) because the suite sets HF_HUB_OFFLINE=1 globally and
`huggingface_hub.constants` / `datasets.config` read the endpoint/offline settings at import time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.hub_server import HubServer, hub_server_fixture, run_client, run_client_json  # noqa: F401 (fixture)

REPO = "test-user/influence-table"

README = """\
---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# Influence table

Test fixture.
"""

SHARD0 = {"train_idx": [0, 1, 2], "test_idx": [7, 7, 8], "score": [0.5, -1.25, 3.0]}
SHARD1 = {"train_idx": [3, 4], "test_idx": [9, 9], "score": [2.0, -0.5]}
SHARD1_V2 = {"train_idx": [3, 4, 5], "test_idx": [9, 9, 9], "score": [20.0, -5.0, 1.0]}


def _rows(*shards: dict) -> list[dict]:
    rows = []
    for shard in shards:
        keys = list(shard)
        rows += [dict(zip(keys, values)) for values in zip(*(shard[k] for k in keys))]
    return rows


def _write_table(folder: Path) -> dict[str, bytes]:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(SHARD0), folder / "data/train-00000-of-00002.parquet")
    pq.write_table(pa.table(SHARD1), folder / "data/train-00001-of-00002.parquet")
    (folder / "README.md").write_text(README)
    (folder / "metadata.json").write_text(json.dumps({"version": 1, "method": "fastif"}))
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Client snippets ------------------------------------------------------------------------------------------------------

UPLOAD_AND_SNAPSHOT = """
import json, sys
from huggingface_hub import HfApi, snapshot_download
api = HfApi()
assert api.whoami()["name"] == "test-user"
url = api.create_repo(sys.argv[1], repo_type="dataset", private=False, exist_ok=True)
api.create_repo(sys.argv[1], repo_type="dataset", exist_ok=True)  # 409 -> tolerated
info = api.upload_folder(folder_path=sys.argv[2], repo_id=sys.argv[1], repo_type="dataset",
                         commit_message="Add influence table")
path = snapshot_download(sys.argv[1], repo_type="dataset")
print(json.dumps({"url": str(url), "oid": info.oid, "snapshot": path}))
"""

LOAD_DATASET = """
import json, sys
import datasets
kwargs = {"revision": sys.argv[2]} if len(sys.argv) > 2 else {}
ds = datasets.load_dataset(sys.argv[1], split="train", **kwargs)
print(json.dumps(ds.to_list()))
"""

SECOND_COMMIT = """
import io, json, sys
import pyarrow as pa, pyarrow.parquet as pq
from huggingface_hub import HfApi, CommitOperationAdd
buf = io.BytesIO()
pq.write_table(pa.table(json.loads(sys.argv[2])), buf)
info = HfApi().create_commit(
    sys.argv[1], repo_type="dataset", commit_message="v2",
    operations=[
        CommitOperationAdd("data/train-00001-of-00002.parquet", buf.getvalue()),
        CommitOperationAdd("metadata.json", json.dumps({"version": 2}).encode()),
    ],
)
print(json.dumps({"oid": info.oid}))
"""

READ_REVISIONS = """
import hashlib, json, os, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
repo, first = sys.argv[1], sys.argv[2]
def digest(path):
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(path) for f in fs}
out = {
    "old": digest(snapshot_download(repo, repo_type="dataset", revision=first)),
    "old_short": digest(snapshot_download(repo, repo_type="dataset", revision=first[:12])),
    "new": digest(snapshot_download(repo, repo_type="dataset", revision="main")),
    "old_meta": open(hf_hub_download(repo, "metadata.json", repo_type="dataset", revision=first)).read(),
    "new_meta": open(hf_hub_download(repo, "metadata.json", repo_type="dataset")).read(),
    "commits": [c.commit_id for c in HfApi().list_repo_commits(repo, repo_type="dataset")],
    "main_sha": HfApi().dataset_info(repo).sha,
    "first_sha": HfApi().dataset_info(repo, revision=first).sha,
}
print(json.dumps(out))
"""

ERRORS = """
import json, sys
import datasets
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
repo = sys.argv[1]
api = HfApi()
checks = {
    "repo_info": lambda: api.repo_info("test-user/missing", repo_type="dataset"),
    "hf_hub_download_repo": lambda: hf_hub_download("test-user/missing", "README.md", repo_type="dataset"),
    "snapshot_repo": lambda: snapshot_download("test-user/missing", repo_type="dataset"),
    "upload_repo": lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                           repo_id="test-user/missing", repo_type="dataset"),
    "repo_info_rev": lambda: api.repo_info(repo, repo_type="dataset", revision="no-such-branch"),
    "hf_hub_download_rev": lambda: hf_hub_download(repo, "README.md", repo_type="dataset", revision="no-such-branch"),
    "snapshot_rev": lambda: snapshot_download(repo, repo_type="dataset", revision="0" * 40),
    "hf_hub_download_file": lambda: hf_hub_download(repo, "nope.txt", repo_type="dataset"),
    "load_dataset_repo": lambda: datasets.load_dataset("test-user/missing", split="train"),
    "load_dataset_rev": lambda: datasets.load_dataset(repo, split="train", revision="no-such-branch"),
}
out = {}
for name, fn in checks.items():
    try:
        fn()
        out[name] = None
    except Exception as e:
        out[name] = {
            "type": type(e).__name__,
            "repo_not_found": isinstance(e, RepositoryNotFoundError),
            "revision_not_found": isinstance(e, RevisionNotFoundError),
            "entry_not_found": isinstance(e, EntryNotFoundError),
            "dataset_not_found": isinstance(e, datasets.exceptions.DatasetNotFoundError),
        }
print(json.dumps(out))
"""


# Tests ----------------------------------------------------------------------------------------------------------------


def test_roundtrip_upload_snapshot_load_dataset_and_revisions(hub_server: HubServer, tmp_path: Path) -> None:
    local = _write_table(tmp_path / "upload")
    assert set(local) == {
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "README.md",
        "metadata.json",
    }

    # 1. create + upload_folder + snapshot_download (client A)
    res = run_client_json(UPLOAD_AND_SNAPSHOT, hub_server, tmp_path / "client_a",
                          args=[REPO, str(tmp_path / "upload")])
    first = res["oid"]
    assert res["url"] == f"{hub_server.url}/datasets/{REPO}"
    assert len(first) == 40 and hub_server.head(REPO) == first
    snapshot = Path(res["snapshot"])
    assert snapshot.name == first
    for rel, data in local.items():
        assert (snapshot / rel).read_bytes() == data, rel
    # Like the real Hub, the repo also holds the .gitattributes of its "initial commit".
    assert {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()} == set(local) | {
        ".gitattributes"
    }
    # Parquet shards went through the LFS batch API + PUT, small text files inline in the commit.
    assert sum(r["path"].endswith("/info/lfs/objects/batch") for r in hub_server.requests) >= 1
    assert sum(r["method"] == "PUT" and r["status"] == 200 for r in hub_server.requests) == 2

    # 2. datasets.load_dataset with a fresh cache (client B) reads the rows of both shards
    rows = run_client_json(LOAD_DATASET, hub_server, tmp_path / "client_b", args=[REPO])
    assert rows == _rows(SHARD0, SHARD1)

    # 3. second commit changes a shard and metadata.json
    second = run_client_json(SECOND_COMMIT, hub_server, tmp_path / "client_a",
                             args=[REPO, json.dumps(SHARD1_V2)])["oid"]
    assert second != first and hub_server.head(REPO) == second
    assert hub_server.commit_history(REPO)[:2] == [second, first]

    # 4. revision=<first sha> still gives the old content; main gives the new one (fresh cache, client C)
    out = run_client_json(READ_REVISIONS, hub_server, tmp_path / "client_c", args=[REPO, first])
    old_shard1 = "data/train-00001-of-00002.parquet"
    assert out["old"] == out["old_short"]
    assert out["old"][old_shard1] == _sha(local[old_shard1])
    assert out["old"]["metadata.json"] == _sha(local["metadata.json"])
    assert out["new"][old_shard1] != out["old"][old_shard1]
    assert out["new"]["data/train-00000-of-00002.parquet"] == _sha(local["data/train-00000-of-00002.parquet"])
    assert json.loads(out["old_meta"]) == {"version": 1, "method": "fastif"}
    assert json.loads(out["new_meta"]) == {"version": 2}
    assert out["commits"][:2] == [second, first]
    assert out["main_sha"] == second and out["first_sha"] == first

    # 5. load_dataset at the first sha vs at main (fresh cache, client D)
    assert run_client_json(LOAD_DATASET, hub_server, tmp_path / "client_d", args=[REPO, first]) == _rows(
        SHARD0, SHARD1
    )
    assert run_client_json(LOAD_DATASET, hub_server, tmp_path / "client_d", args=[REPO]) == _rows(
        SHARD0, SHARD1_V2
    )

    # The server's own view agrees.
    assert hub_server.files(REPO, revision=first)["metadata.json"] == local["metadata.json"]
    assert json.loads(hub_server.files(REPO)["metadata.json"]) == {"version": 2}


def test_errors_map_to_client_exceptions(hub_server: HubServer, tmp_path: Path) -> None:
    _write_table(tmp_path / "upload")
    run_client_json(UPLOAD_AND_SNAPSHOT, hub_server, tmp_path / "client", args=[REPO, str(tmp_path / "upload")])
    out = run_client_json(ERRORS, hub_server, tmp_path / "client", args=[REPO])

    for name in ("repo_info", "hf_hub_download_repo", "snapshot_repo", "upload_repo"):
        assert out[name] is not None and out[name]["repo_not_found"], (name, out[name])
    for name in ("repo_info_rev", "hf_hub_download_rev", "snapshot_rev"):
        assert out[name] is not None and out[name]["revision_not_found"], (name, out[name])
        assert not out[name]["repo_not_found"]
    assert out["hf_hub_download_file"]["entry_not_found"], out["hf_hub_download_file"]
    assert out["load_dataset_repo"]["dataset_not_found"], out["load_dataset_repo"]
    assert out["load_dataset_rev"]["dataset_not_found"], out["load_dataset_rev"]

    codes = {(r["path"], r["error_code"]) for r in hub_server.requests if r["status"] == 404}
    assert any(code == "RepoNotFound" for _, code in codes)
    assert any(code == "RevisionNotFound" for _, code in codes)
    assert any(code == "EntryNotFound" for _, code in codes)


def test_token_never_logged_and_not_sent_to_cdn(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    with HubServer(storage_dir=tmp_path / "storage", verbose=True) as server:
        _write_table(tmp_path / "upload")
        run_client_json(UPLOAD_AND_SNAPSHOT, server, tmp_path / "client", args=[REPO, str(tmp_path / "upload")])
        rows = run_client_json(LOAD_DATASET, server, tmp_path / "client2", args=[REPO])
        assert len(rows) == 5
        # a request with a wrong token is logged as invalid, without the token either
        probe = f"probe={secrets.token_hex(8)}"  # marks this test's own request in the log
        with pytest.raises(urllib.error.HTTPError) as err:
            _open(urllib.request.Request(f"{server.url}/api/whoami-v2?{probe}",
                                         headers={"Authorization": "Bearer hf_wrong_token_123"}))
        assert err.value.code == 401
        # a request is logged after its response is sent, so the client saw the 401 before the log has it
        mine = _wait_for_request(server, lambda r: r["query"] == probe)

    stderr = capfd.readouterr().err
    assert "[hub-server]" in stderr  # verbose mode did log every request...
    assert server.token not in stderr  # ...but never the token
    assert "hf_wrong_token_123" not in stderr
    assert server.token not in server.log_text and "Bearer" not in server.log_text
    assert all(server.token not in json.dumps(r) for r in server.requests)
    # the token was actually sent (so the checks above are meaningful)...
    assert any(r["auth"] == "valid" for r in server.requests)
    # ...and the wrong one is logged as invalid (found by its query, not by position: requests are logged as
    # they finish, so the clients' own whoami requests may be logged after it)
    assert mine["path"] == "/api/whoami-v2" and mine["auth"] == "invalid" and mine["status"] == 401
    assert not mine["authenticated"]
    # ...but never to the CDN stand-in that serves the LFS blobs (parquet shards)
    cdn = [r for r in server.requests if r["path"].startswith("/__cdn__/")]
    assert cdn and all(r["auth"] == "none" for r in cdn)


def _wait_for_request(server: HubServer, match, timeout: float = 10) -> dict:
    """The first logged request that ``match`` accepts, waiting up to ``timeout`` seconds for it to be logged."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in list(server.requests) if match(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching request logged within {timeout}s; log:\n{server.log_text}")
        time.sleep(0.01)


def _open(req, timeout: float = 10):  # no proxies for loopback
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout)


def test_binds_loopback_only(hub_server: HubServer) -> None:
    host, port = hub_server.bound_address
    assert host == "127.0.0.1"
    assert hub_server.url == f"http://127.0.0.1:{port}"
    # The port is not reachable through a non-loopback address of this machine (if it has one).
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.254.254.254", 1))  # no packet is sent for UDP connect
        own_ip = probe.getsockname()[0]
    except OSError:
        own_ip = None
    finally:
        probe.close()
    if own_ip and not own_ip.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((own_ip, port), timeout=2).close()
    # and it is reachable on loopback
    with _open(hub_server.url + "/") as resp:
        assert resp.status == 200


def test_http_layer_errors_and_ranges(hub_server: HubServer) -> None:
    """Raw HTTP checks (no client library): error headers, Range requests, auth on writes."""
    token = {"Authorization": f"Bearer {hub_server.token}"}

    def call(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(hub_server.url + path, data=body, method=method, headers=headers or {})
        try:
            with _open(req) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    status, headers, _ = call("GET", f"/api/datasets/{REPO}")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"

    create = json.dumps({"name": REPO.split("/")[1], "organization": "test-user", "type": "dataset"}).encode()
    assert call("POST", "/api/repos/create", create, {"Content-Type": "application/json"})[0] == 401
    assert call("POST", "/api/repos/create", create, {"Content-Type": "application/json", **token})[0] == 200

    content = bytes(range(256)) * 4
    commit = b"\n".join(
        json.dumps(line).encode()
        for line in [
            {"key": "header", "value": {"summary": "raw", "description": ""}},
            {"key": "file", "value": {"path": "blob.txt", "encoding": "base64",
                                      "content": base64.b64encode(content).decode()}},
        ]
    )
    status, _, body = call("POST", f"/api/datasets/{REPO}/commit/main", commit,
                           {"Content-Type": "application/x-ndjson", **token})
    assert status == 200
    oid = json.loads(body)["commitOid"]

    url = f"/datasets/{REPO}/resolve/main/blob.txt"
    status, headers, body = call("HEAD", url)
    assert status == 200 and headers["X-Repo-Commit"] == oid and int(headers["Content-Length"]) == len(content)
    assert headers["ETag"].strip('"') == hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()
    status, headers, body = call("GET", url, headers={"Range": "bytes=10-19"})
    assert status == 206 and body == content[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    status, _, body = call("GET", url, headers={"Range": "bytes=-5"})
    assert status == 206 and body == content[-5:]
    status, headers, _ = call("GET", url, headers={"Range": f"bytes={len(content)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(content)}"

    status, headers, _ = call("GET", f"/datasets/{REPO}/resolve/nope/blob.txt")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = call("GET", f"/datasets/{REPO}/resolve/{oid}/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == oid
    status, headers, _ = call("GET", f"/api/datasets/{REPO}", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"


def test_inline_upload_mode_and_private_repo(tmp_path: Path) -> None:
    """lfs="never": every file goes inline (base64) in the commit; private repos hide from anonymous readers."""
    code = """
    import json, sys
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError
    api = HfApi()
    api.create_repo(sys.argv[1], repo_type="dataset", private=True)
    api.upload_folder(folder_path=sys.argv[2], repo_id=sys.argv[1], repo_type="dataset")
    path = snapshot_download(sys.argv[1], repo_type="dataset")
    try:
        HfApi(token=False).repo_info(sys.argv[1], repo_type="dataset")
        anonymous = "visible"
    except RepositoryNotFoundError:
        anonymous = "hidden"
    print(json.dumps({"snapshot": path, "anonymous": anonymous}))
    """
    local = _write_table(tmp_path / "upload")
    with HubServer(storage_dir=tmp_path / "storage", lfs="never") as server:
        out = run_client_json(code, server, tmp_path / "client", args=[REPO, str(tmp_path / "upload")])
        assert out["anonymous"] == "hidden"
        for rel, data in local.items():
            assert (Path(out["snapshot"]) / rel).read_bytes() == data
        assert not any("/info/lfs/" in r["path"] or r["method"] == "PUT" for r in server.requests)


def test_run_client_reports_failures(hub_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="RepositoryNotFoundError"):
        run_client(
            "from huggingface_hub import HfApi\nHfApi().repo_info('test-user/missing', repo_type='dataset')\n",
            hub_server,
            tmp_path,
        )
