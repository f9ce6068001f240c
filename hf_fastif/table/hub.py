"""Influence tables on the Hugging Face Hub: a table folder pushed as a dataset repo, pulled back from the very
commit its metadata came from, and the Hub's exceptions turned into `InfluenceTableError` with the fix.

The token (argument, ``HF_TOKEN`` or the saved login) goes to `huggingface_hub` only; it is never logged or put
in an error message."""

from __future__ import annotations

import contextlib
import importlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from ..cache import remove_stale_staging
from .format import CARD_FILE, DATA_DIR, METADATA_FILE, SHARD_ROWS, InfluenceTableError

if TYPE_CHECKING:
    from .table import InfluenceTable

logger = logging.get_logger(__name__)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """A network failure as the Hub client raises it: `ConnectionError` (offline mode's OfflineModeIsEnabled too),
    and the transport errors of its HTTP library (httpx for huggingface_hub 1.x, httpx2 for 2.x: neither subclasses
    the other's)."""
    errors: list[type[BaseException]] = [ConnectionError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(errors)


TRANSPORT_ERRORS = _transport_errors()


_COMMIT = re.compile(r"[0-9a-f]{40}")
"""A full commit id (a revision that names one snapshot for good)."""


def _status(err: Exception) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def _where(repo_id: str, revision: str | None) -> str:
    return f"dataset repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _pull_message(err: Exception, repo_id: str, revision: str | None) -> str:
    """What a failed download means, and what to do (the Hub's exception types subclass each other, so the
    most specific come first)."""
    where = _where(repo_id, revision)
    if isinstance(err, RevisionNotFoundError):
        return (f"Revision {revision!r} does not exist in dataset repo {repo_id!r}; use a branch, tag or commit "
                "id of that repo.")
    if isinstance(err, RepositoryNotFoundError):
        return (f"No dataset repo {repo_id!r} on the Hub (or it is private or gated: use a token of an account "
                "with access: `hf auth login` or HF_TOKEN, or token=... in Python).")
    if isinstance(err, LocalEntryNotFoundError):
        return (f"Could not reach the Hub for {where}, and it is not in the local cache (offline, "
                "HF_HUB_OFFLINE=1, or a network error). Go online or download it once while online.")
    if isinstance(err, EntryNotFoundError):
        return (f"{where} is not an influence table: it has no {METADATA_FILE}. Push tables with "
                "InfluenceTable.push_to_hub or `hf-fastif push`.")
    if isinstance(err, HFValidationError):
        return f"{repo_id!r} is not a valid Hub repo id (expected 'user/name')."
    if _status(err) in (401, 403):  # a token was sent and refused (expired, revoked, mistyped; no read access)
        return (f"The Hub answered HTTP {_status(err)} for {where}: the token sent (token=..., HF_TOKEN or "
                "`hf auth login`) was refused or lacks read access. Pass a valid token with access to the repo, or "
                "none for a public repo (unset HF_TOKEN).")
    return f"The Hub answered HTTP {_status(err)} for {where}."


@contextlib.contextmanager
def _pull_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    try:
        yield
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError) as err:
        raise InfluenceTableError(_pull_message(err, repo_id, revision)) from err
    except OSError as err:  # a transfer cut short (the client's size check), a full disk...: the partial file is gone
        raise InfluenceTableError(f"The download of {_where(repo_id, revision)} failed ({type(err).__name__}: {err}). Run it again: the "
                                  "files downloaded whole are kept, the partial one is discarded.") from err


def push_table(table: InfluenceTable, repo_id: str, *, private: bool | None = None, token: str | None = None,
               commit_message: str = "Upload influence table with hf_fastif", revision: str | None = None,
               license: str | None = None, shard_rows: int = SHARD_ROWS) -> str:
    """Create (or update) the dataset repo ``repo_id`` with ``table`` (its old shards replaced); returns the
    commit id."""
    return push_table_resolved(table, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision, license=license, shard_rows=shard_rows)[1]


def push_table_resolved(table: InfluenceTable, repo_id: str, *, private: bool | None = None,
                        token: str | None = None, commit_message: str = "Upload influence table with hf_fastif",
                        revision: str | None = None, license: str | None = None,
                        shard_rows: int = SHARD_ROWS) -> tuple[str, str]:
    """`push_table`, returning ``(repo id as the Hub resolved it, commit id)``: a bare name is created under the
    token's namespace (``user/name``), which `from_hub` needs."""
    api = HfApi(token=token)
    try:
        # a bare name is the token's namespace's (as create_repo resolves it; it skipped this check, and the repo
        # was created before the branch was refused)
        if revision not in (None, "main", "refs/heads/main") and not api.repo_exists(
                repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}", repo_type="dataset"):
            raise InfluenceTableError(f"No dataset repo {repo_id!r} this token can see (it does not exist yet, or it is "
                                      f"private: pass token=... with access), so no branch {revision!r} in it: push "
                                      "without revision first (to main), then create the branch. Nothing was created.")
        if not len(table):  # (datasets cannot read a parquet file without rows: the card's load_dataset would fail)
            raise InfluenceTableError(f"The table has no rows; nothing was pushed to dataset repo {repo_id!r}. Build "
                                      "it with test and training rows first.")
        table.verify()  # a shard damaged on disk would be uploaded with new sha256s, and pass every later check
        # a bare name is the token's namespace's: resolved first, so the card names the repo (staged once)
        validate_repo_id(repo_id)
        try:
            resolved = repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"
        except LocalTokenNotFoundError as err:
            raise InfluenceTableError(f"Pushing to dataset repo {repo_id!r} needs a token with write access (token=..., "
                                      "HF_TOKEN or `hf auth login`); nothing was created.") from err
        with _staging_folder() as tmp:
            # (staged before the repo is made: a temporary folder without room left an empty repo behind)
            _stage(table, tmp, shard_rows=shard_rows, license=license, repo_id=resolved)
            url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            if private and not api.repo_info(url.repo_id, repo_type="dataset").private:
                # create_repo leaves an existing repo's visibility as it is: the table would have been public
                raise InfluenceTableError(
                    f"Dataset repo {url.repo_id!r} exists and is public, and a push does not change an existing repo's "
                    "visibility, so the table would be public; nothing was uploaded. Make the repo private first "
                    f"(HfApi().update_repo_settings({url.repo_id!r}, private=True, repo_type='dataset')), or push to "
                    "a new repo.")
            _check_repo_holds_a_table(api, url.repo_id, revision)
            if url.repo_id != resolved:  # (the Hub resolved it otherwise: the card names the repo it made)
                shutil.rmtree(tmp)
                _stage(table, tmp, created=url.repo_id, shard_rows=shard_rows, license=license, repo_id=url.repo_id)
            info = api.upload_folder(repo_id=url.repo_id, repo_type="dataset", folder_path=tmp,
                                     commit_message=commit_message, revision=revision,
                                     delete_patterns=[f"{DATA_DIR}/*.parquet"])
    except HfHubHTTPError as err:
        hint = (" Pass a token with write access (token=..., HF_TOKEN or `hf auth login`)."
                if _status(err) in (401, 403) else "")
        raise InfluenceTableError(f"Could not push the influence table to dataset repo {repo_id!r}: "
                                  f"HTTP {_status(err)}.{hint}") from err
    except HFValidationError as err:
        raise InfluenceTableError(f"{repo_id!r} is not a valid Hub repo id (expected 'user/name').") from err
    except RuntimeError as err:  # (the client wraps a failed file upload: "Error while uploading '...' to the Hub")
        cause = err.__cause__
        if not isinstance(cause, (HfHubHTTPError, *TRANSPORT_ERRORS)):
            raise
        why = f"HTTP {_status(cause)}" if isinstance(cause, HfHubHTTPError) else type(cause).__name__
        raise InfluenceTableError(f"Could not push the influence table to dataset repo {repo_id!r}: {err} ({why}). "
                                  "Nothing was committed (the repo may exist, without this table); push again, "
                                  "which uploads what is missing. The table on disk is unchanged.") from err
    except TRANSPORT_ERRORS as err:  # offline mode (OfflineModeIsEnabled), no network
        raise InfluenceTableError(f"Could not reach the Hub to push the influence table to dataset repo {repo_id!r} "
                                  f"({type(err).__name__}: {err}). Go online (HF_HUB_OFFLINE unset) and push again; "
                                  "the table on disk is unchanged.") from err
    logger.info(f"Pushed {len(table)} influence rows to {url.repo_id} (commit {info.oid}).")
    return url.repo_id, info.oid


PUSH_STAGING = "hf_fastif_push_"
"""The prefix of the temporary folder a push copies the table into before it uploads it."""


@contextlib.contextmanager
def _staging_folder():
    """A temporary folder for a push's copy of the table (``$TMPDIR``), removed afterwards; those of pushes killed
    before they ended (SIGTERM, SIGKILL: a whole copy of a table, for good) are removed once untouched for
    `hf_fastif.cache.STALE_STAGING_S`."""
    root = Path(tempfile.gettempdir())
    remove_stale_staging(root, f"{PUSH_STAGING}*", lambda path: path.is_dir())
    with tempfile.TemporaryDirectory(prefix=PUSH_STAGING) as tmp:
        yield Path(tmp)


def _stage(table: InfluenceTable, folder: Path, created: str | None = None, **save) -> None:
    """``table`` saved in ``folder`` for upload; no room there is named with the way out (the error named a file in
    a folder the user never chose, and said to write to another folder, which a push cannot). ``created``: the repo
    this push has made already, if any."""
    try:
        table.save(folder, **save)
    except OSError as err:
        where = (f"dataset repo {created!r} was created, empty of this table" if created else
                 "nothing was created on the Hub")
        raise InfluenceTableError(
            f"Could not copy the table into the temporary folder {folder.parent} before uploading it "
            f"({getattr(err, 'strerror', None) or err}): a push stages the whole table there. Free space in it, or set "
            f"TMPDIR to a folder with room for the table, and push again; {where}.") from err


def _check_repo_holds_a_table(api: HfApi, repo_id: str, revision: str | None) -> None:
    """Refuse a repo (at ``revision``) that holds files but no influence table: a push replaces its
    ``data/*.parquet`` and ``README.md`` (a plain dataset's own files); and a branch that does not exist."""
    try:
        files = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
    except RevisionNotFoundError as err:
        raise InfluenceTableError(f"Branch {revision!r} does not exist in dataset repo {repo_id!r}: create it first "
                                  f"(HfApi().create_branch({repo_id!r}, branch={revision!r}, repo_type='dataset')) "
                                  "or push without revision.") from err
    others = [f for f in files if f != ".gitattributes"]
    if others and METADATA_FILE not in files:
        raise InfluenceTableError(
            f"Dataset repo {repo_id!r} holds files but no influence table ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}; no {METADATA_FILE}): a push would replace its {DATA_DIR}/*.parquet "
            f"and {CARD_FILE}. Push to a new repo, or to one an influence table was pushed to.")


def offline() -> bool:
    """Whether the Hub client runs offline (``HF_HUB_OFFLINE``): nothing can be downloaded again."""
    return bool(constants.is_offline_mode())


def unreachable(repo_id: str, revision: str | None, token: str | None = None, *, refusals: bool = False) -> str | None:
    """Why the Hub cannot serve ``repo_id`` at ``revision`` now (offline mode, no network), or None when it answers.
    A forced download of a commit already in the cache falls back on the cached folder when the Hub cannot be
    reached, so a download that "fails again" proves nothing about the Hub's copy unless the Hub answered.
    ``refusals``: an answer that this token may not see the repo (HTTP 401 / 403 / 404: a private repo without a
    token or with a refused one, a repo deleted) is raised: the download falls back on a cached copy on such an
    answer too, without a word (a private table pushed since was not seen, and `show` printed the old values)."""
    if offline():
        return "HF_HUB_OFFLINE=1"
    try:
        HfApi(token=token).repo_info(repo_id, repo_type="dataset", revision=revision)
    except (*TRANSPORT_ERRORS, LocalEntryNotFoundError) as err:
        return f"{type(err).__name__}: {err}"
    except HfHubHTTPError as err:
        if refusals and _status(err) in (401, 403, 404):
            raise
        return None  # it answered (the download's own errors say what the answer means)
    return None


def download_table(repo_id: str, *, revision: str | None = None, token: str | None = None,
                   cache_dir: str | None = None, force_download: bool = False) -> Path:
    """The local snapshot folder of a table pushed with `push_table` (``revision``: branch, tag or commit;
    ``force_download``: the shards downloaded again even if cached)."""
    if force_download and offline():
        raise InfluenceTableError(f"force_download=True downloads dataset repo {repo_id!r} again, but the Hub client is "
                                  "offline (HF_HUB_OFFLINE=1): go online, or load the cached copy without it.")
    with _pull_errors(repo_id, revision):
        # asked first whether the Hub answers: when it cannot be reached, the Hub client falls back on the cached copy
        # of a branch without a word (a table pushed since was not seen, and `show` printed the old values with exit
        # status 0), so that is said, with the commit loaded (a commit id names one snapshot for good)
        stale = None if offline() or (revision is not None and _COMMIT.fullmatch(revision)) \
            else unreachable(repo_id, revision, token, refusals=True)
        # the metadata first: it says whether this is a table at all before any shard is downloaded,
        # and its snapshot folder names the commit, so the shards come from the very same commit
        meta = Path(hf_hub_download(repo_id, METADATA_FILE, repo_type="dataset", revision=revision, token=token,
                                    cache_dir=cache_dir))
        commit = meta.parent.name
        if stale is not None:
            logger.warning(f"The Hub could not be reached ({stale}): loading the cached copy of "
                           f"{_where(repo_id, revision)}, commit {commit}; the Hub's may be newer. Run it again once "
                           "online.")
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=commit, token=token, cache_dir=cache_dir,
                                      allow_patterns=[METADATA_FILE, CARD_FILE, f"{DATA_DIR}/*.parquet"],
                                      force_download=force_download))
