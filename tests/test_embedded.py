"""The embedded default: MiniLM (verified) fine-tuned on generated NLI, cached on disk by content; the tiny model
stays for --quick."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from hf_fastif.data import generate_nli, tokenize_nli
from hf_fastif.embedded import (
    DEFAULT_KIND,
    MINILM,
    QUICK_KIND,
    embedded_arguments,
    embedded_kind,
    embedded_tokenizer,
    train_embedded_model,
)
from hf_fastif.minilm_default import (
    FINETUNE_KEY_FIELDS,
    MANIFEST_NAME,
    FinetuneSettings,
    cache_problems,
    cached_finetune_minilm,
    finetune_cache_root,
    finetune_key,
)
from hf_fastif.pretrained import MINILM_FILES, minilm_file_problems, minilm_path

# 64 rows, 2 optimizer steps: enough to change the weights, a few seconds on a CPU
SMALL = FinetuneSettings(seed=0, epochs=1.0, lr=1e-3, batch_size=32)


@pytest.fixture(scope="module")
def raw():
    return generate_nli(seed=0, n_train=64, n_hans_per_subcase=0, n_pool_per_subcase=0)["train"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune_cache")


@pytest.fixture(scope="module")
def first(raw, cache):
    return cached_finetune_minilm(raw, SMALL, cache_dir=cache, description={"rows": 64})


def test_the_embedded_default_is_the_verified_minilm(raw, tmp_path, monkeypatch):
    assert DEFAULT_KIND == "minilm" and QUICK_KIND == "tiny" and embedded_kind() is MINILM
    monkeypatch.setenv("HF_FASTIF_CACHE", str(tmp_path))
    tokenizer = embedded_tokenizer()
    assert len(tokenizer) == 30522  # MiniLM's WordPiece vocabulary, not the generated word list
    args = embedded_arguments(str(tmp_path / "out"), num_train_epochs=1.0, per_device_train_batch_size=32)
    model, info = train_embedded_model(raw, None, tokenizer, args)
    folder = minilm_path()
    assert not minilm_file_problems(folder) and folder.parent == tmp_path  # extracted and hashed under the cache
    assert info["cached"] is False and finetune_cache_root() == tmp_path / "minilm-nli"
    assert info["folder"].startswith(str(tmp_path / "minilm-nli"))
    # the frozen part is exactly the verified checkpoint; the top 2 layers, pooler and classifier were trained
    pretrained = load_file(folder / "model.safetensors")
    weights = dict(model.named_parameters())
    assert MINILM_FILES["model.safetensors"].size == (folder / "model.safetensors").stat().st_size
    for layer in range(6):
        name = f"encoder.layer.{layer}.attention.self.query.weight"
        same = torch.equal(weights[f"bert.{name}"].detach(), pretrained[name])
        assert same == (layer < 4) and weights[f"bert.{name}"].requires_grad == (layer >= 4), layer
    assert torch.equal(weights["bert.embeddings.word_embeddings.weight"].detach(),
                       pretrained["embeddings.word_embeddings.weight"])
    assert 0.0 <= info["train_accuracy"] <= 1.0 and model.config.num_labels == 2


def test_a_second_call_loads_the_cached_model(raw, cache, first):
    assert not first.cached and first.folder.parent == cache / "minilm-nli"
    manifest = json.loads((first.folder / MANIFEST_NAME).read_text())
    assert manifest["content"]["settings"]["lr"] == 1e-3 and "model.safetensors" in manifest["files"]
    assert manifest["content"]["base"]["files"]["model.safetensors"] == MINILM_FILES["model.safetensors"].sha256
    assert manifest["description"] == {"rows": 64} and 0 <= manifest["report"]["train_accuracy"] <= 1
    assert not list(first.folder.glob("*.bin")) and not list(first.folder.glob("*.pt"))  # no pickles, safetensors only
    assert tuple(manifest["content"]) == FINETUNE_KEY_FIELDS  # what `hf-fastif cache` checks an entry against
    week_ago = time.time() - 7 * 86400
    os.utime(first.folder / MANIFEST_NAME, (week_ago, week_ago))
    again = cached_finetune_minilm(raw, SMALL, cache_dir=cache)
    assert again.cached and again.folder == first.folder
    assert (first.folder / MANIFEST_NAME).stat().st_mtime > week_ago + 86400  # a hit records its use
    assert torch.equal(again.model.classifier.weight, first.model.classifier.weight)
    # the tokenized rows are keyed, not max_length: a longer limit that truncates nothing is the same model
    longer = cached_finetune_minilm(raw, FinetuneSettings(**{**SMALL.__dict__, "max_length": 128}), cache_dir=cache)
    assert longer.cached and longer.folder == first.folder


@pytest.mark.parametrize("change", ["lr", "seed", "trainable_layers", "data", "processes"])
def test_another_setting_or_other_data_is_another_folder(raw, first, change, monkeypatch):
    """``processes``: a fine-tuning under ``accelerate launch`` with 2 processes steps on twice the rows, half as
    often: other weights, which were served to one-process runs under the same key."""
    settings, rows = SMALL, raw
    if change == "processes":
        import hf_fastif.distributed

        monkeypatch.setattr(hf_fastif.distributed, "world", lambda: (0, 2))
    elif change == "data":
        rows = raw.map(lambda row, i: {"label": 1 - row["label"] if i == 0 else row["label"]}, with_indices=True)
    else:
        settings = FinetuneSettings(**{**SMALL.__dict__, change: {"lr": 2e-3, "seed": 1, "trainable_layers": 1}[change]})
    key, content = finetune_key(tokenize_nli(rows, first.tokenizer), settings)
    assert key != first.manifest["key"]
    assert cache_problems(first.folder, key, content)  # the existing folder is refused for these settings


def test_a_tampered_or_foreign_cache_folder_is_rebuilt(raw, cache, first, caplog):
    # a changed byte in the weights
    path = first.folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("model.safetensors has sha256" in p for p in cache_problems(first.folder, first.manifest["key"],
                                                                          first.manifest["content"]))
    with caplog.at_level(logging.WARNING, logger="hf_fastif.minilm_default"):
        rebuilt = cached_finetune_minilm(raw, SMALL, cache_dir=cache)
    assert not rebuilt.cached and rebuilt.folder == first.folder
    assert "is not used and will be rebuilt" in caplog.text and "model.safetensors" in caplog.text
    assert not cache_problems(rebuilt.folder, rebuilt.manifest["key"], rebuilt.manifest["content"])
    # a manifest claiming other settings (a folder made for another configuration)
    manifest_path = rebuilt.folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["content"]["settings"]["lr"] = 5e-5
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fastif.minilm_default"):
        again = cached_finetune_minilm(raw, SMALL, cache_dir=cache)
    assert not again.cached and "made for other content" in caplog.text and "settings" in caplog.text
    # an extra file slipped into the folder
    (again.folder / "extra.bin").write_bytes(b"x")
    assert "extra.bin was added after the model was cached" in cache_problems(
        again.folder, again.manifest["key"], again.manifest["content"])


def test_training_flags_minilm_does_not_read_are_named():
    """`--max_steps 3`, `--optim sgd`, `--label_smoothing_factor 0.2`, ... were accepted on the MiniLM default and
    silently ignored (its fine-tuning reads a fixed set of fields): they are now named, in a warning."""
    from hf_fastif.embedded import FINETUNE_READS, embedded_arguments, ignored_training_flags

    for use in ("table", "hans_correction", None):
        assert ignored_training_flags(embedded_arguments("out", use=use, kind="minilm")) == []
    changed = embedded_arguments("out", use="table", kind="minilm", max_steps=3, optim="sgd", num_train_epochs=2.0,
                                 label_smoothing_factor=0.2, logging_steps=7)
    assert ignored_training_flags(changed) == ["max_steps=3", "optim='sgd'", "label_smoothing_factor=0.2"]
    assert "num_train_epochs" in FINETUNE_READS  # read: part of the cache key, so not named


def test_every_embedded_default_checks_lissa_before_it_runs():
    """The tiny model ran without the convergence check (its reason, "~1 s per call", was ~0.1 s when measured): the
    HANS correction's steps move either model to where H + λI nears or leaves positive definiteness (the tiny model's
    smallest eigenvalue reached ~-4.7 against λ = 5), and LiSSA's estimate there came back without a word."""
    from hf_fastif.embedded import EMBEDDED

    for kind, settings in EMBEDDED.items():
        for use in (None, *settings.uses):
            assert embedded_arguments("out", use=use, kind=kind).influence_check_convergence, (kind, use)
        assert settings.why["influence_check_convergence"].startswith("on:"), kind


def test_the_minilm_description_says_how_it_was_fine_tuned():
    """The recipes' settings table said "last 2 of 6 layers ... 1 epoch at lr 2e-4" whatever the flags were."""
    from hf_fastif.embedded import MINILM, minilm_description
    from hf_fastif.minilm_default import FinetuneSettings

    assert MINILM.description.endswith("last 2 of 6 layers, pooler and classifier, 1 epoch at lr 2e-4")
    assert minilm_description(FinetuneSettings(trainable_layers=4, epochs=2.0, lr=5e-5)).endswith(
        "last 4 of 6 layers, pooler and classifier, 2 epochs at lr 5e-5")


def test_a_cache_that_cannot_take_the_model_leaves_it_in_memory_with_a_warning(raw, first, tmp_path, monkeypatch,
                                                                               caplog):
    """A full disk under the cache failed after the fine-tuning with safetensors' own error (not an OSError), and
    the trained model was lost."""
    from safetensors import SafetensorError

    from hf_fastif.trainer import InfluenceTrainer

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(InfluenceTrainer, "save_model", full)
    with caplog.at_level(logging.WARNING, logger="hf_fastif.minilm_default"):
        found = cached_finetune_minilm(raw, SMALL, cache_dir=tmp_path)
    assert not found.cached and "No space left" in found.manifest["not_cached"]
    assert "going on with the model in memory, uncached" in caplog.text and "HF_FASTIF_CACHE" in caplog.text
    assert list((tmp_path / "minilm-nli").iterdir()) == []  # no staging folder left
    assert not found.model.training and torch.allclose(found.model.classifier.weight, first.model.classifier.weight)


def test_a_killed_fine_tunings_staging_folder_is_removed_later(tmp_path):
    """A fine-tuning killed (SIGKILL) before it finished left its staging folder, up to ~90 MB, for good."""
    from hf_fastif.cache import remove_stale_staging

    old, fresh = tmp_path / f".{'0123abcd' * 2}0123.x1y2.tmp", tmp_path / f".{'0123abcd' * 2}0123.z3w4.tmp"
    foreign = tmp_path / ".another-tools.tmp"  # in a shared folder: not hf_fastif's to remove
    for folder in (old, fresh, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    writing = tmp_path / f".{'4567cdef' * 2}4567.w5v6.tmp"  # its folder's time is old, a file in it written now
    writing.mkdir()
    (writing / "model.safetensors").write_bytes(b"partial")
    for path in (old / "model.safetensors", old, foreign / "model.safetensors", foreign, writing):
        os.utime(path, (time.time() - 7 * 3600, time.time() - 7 * 3600))
    assert remove_stale_staging(tmp_path) == [old]
    assert not old.exists() and fresh.is_dir() and foreign.is_dir()  # one that may still be running is kept
    assert writing.is_dir()  # (its top folder's time alone said 7 hours)
    assert remove_stale_staging(tmp_path / "missing") == []


def test_a_minilm_folder_with_other_files_is_refused_not_served_the_cached_model(raw, cache, first, tmp_path):
    """The cache key holds the official MiniLM's file hashes, not those of the folder given: a folder with other
    weights (the same tokenizer) was served the model fine-tuned from the official MiniLM."""
    import shutil

    from safetensors.torch import save_file

    other = tmp_path / "other_minilm"
    shutil.copytree(minilm_path(), other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if "word_embeddings" in k)
    save_file(weights | {name: weights[name] * 0.5}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors in .* does not match"):
        cached_finetune_minilm(raw, SMALL, cache_dir=cache, minilm_folder=other)
    official = cached_finetune_minilm(raw, SMALL, cache_dir=cache, minilm_folder=minilm_path())  # (verified: taken)
    assert official.folder.parent == finetune_cache_root(cache)
