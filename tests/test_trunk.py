"""The frozen-trunk split: the top-only forward reproduces the full model, per architecture; no split where a
selected parameter is used below the top; the cache is exact, bounded, and refuses rows it was not built for."""

import errno
import gc
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_fastif import InfluenceArguments, InfluenceEngine, compute_influences
from hf_fastif import trunk as T
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.influence import default_arguments
from hf_fastif.knn import model_features
from hf_fastif.loss import FunctionalModel
from hf_fastif.params import select_parameters
from tests.tiny import HEAD_ONLY, TOP, longformer, make_token_dataset, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def exact_top_arguments():
    """The exact solver over BERT's top layer, every row scored: the settings of the trunk-cache tests that compare
    influence values."""
    return default_arguments(influence_solver="exact", influence_knn_k=None, influence_damping=0.1,
                             influence_params=TOP["bert"], disable_tqdm=True)


def setup(kind, patterns, pad_collator, n=24):
    model = tiny_model(kind, num_labels=3)
    data = make_token_dataset(n, seed=0, num_labels=3, causal=kind == "gpt2-lm")
    names = list(select_parameters(model, patterns))
    collator = pad_collator
    if kind == "gpt2-lm":
        from transformers import DataCollatorForLanguageModeling

        data, collator = data.remove_columns("labels"), DataCollatorForLanguageModeling(pad_collator.tokenizer, mlm=False)
    batcher = Batcher(data, validate_dataset(data, "train", model), collator, "cpu")
    probe = T.model_inputs(batcher.batch(range(4), trunk=False))
    return model, names, batcher, probe


@pytest.mark.parametrize("kind", list(TOP))
def test_top_only_forward_reproduces_the_full_model(kind, pad_collator):
    model, names, batcher, probe = setup(kind, TOP[kind], pad_collator)
    split, reason = T.find_split(model, names, probe)
    assert split is not None, reason
    assert split.first == 1
    cache = T.TrunkCache(split, batcher, key="k", batch_size=5)
    assert T.verify_split(split, cache, batcher, range(len(batcher))) < 1e-10  # float64 tiny models
    fm_full = FunctionalModel(model, names)
    fm_top = FunctionalModel(model, names, split=split)
    params = select_parameters(model, TOP[kind])
    rows = [3, 17, 0, 9]
    full = fm_full.losses(params, batcher.batch(rows, trunk=False))
    top = fm_top.losses(params, batcher.with_trunk(cache).batch(rows))
    torch.testing.assert_close(top, full, rtol=1e-10, atol=1e-12)
    assert not split._active and all("forward" not in layer.__dict__ for layer in split.layers)  # restored


@pytest.mark.parametrize("kind", list(HEAD_ONLY))
def test_only_modules_after_the_stack(kind, pad_collator):
    model, names, batcher, probe = setup(kind, HEAD_ONLY[kind], pad_collator)
    split, reason = T.find_split(model, names, probe)
    assert split is not None and split.first == len(split.layers), reason
    cache = T.TrunkCache(split, batcher, key="k")
    assert T.verify_split(split, cache, batcher, range(8)) < 1e-10


def test_no_split_when_a_selected_parameter_is_used_below_the_top(pad_collator):
    model, names, batcher, probe = setup("bert", None, pad_collator)  # every parameter, embeddings included
    split, reason = T.find_split(model, names, probe)
    assert split is None and "bert.encoder.layer.0" in reason
    # GPT-2 LM: the output head is tied to the input embeddings, used before the stack
    model, names, batcher, probe = setup("gpt2-lm", [r"transformer\.h\.1\.", r"wte\."], pad_collator)
    split, reason = T.find_split(model, names, probe)
    assert split is None and "before" in reason


def test_a_weight_the_top_shares_with_the_trunk_keys_the_trunk_states(pad_collator):
    """GPT-2's lm_head (run after the stack) is tied to wte (read by the trunk): the fingerprint left out every
    tensor of the top, wte with it, so an engine kept the old embeddings' trunk states after an in-place edit
    (73% off a fresh engine)."""
    model, names, batcher, probe = setup("gpt2-lm", [r"transformer\.h\.1\.", r"ln_f\."], pad_collator)
    assert model.lm_head.weight is model.transformer.wte.weight
    split, reason = T.find_split(model, names, probe)
    assert split is not None, reason
    before, wte = split.fingerprint(), model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.5)
    assert split.fingerprint() != before
    with torch.no_grad():  # a top-only weight still does not re-key the trunk states
        model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
        model.transformer.wte.weight.copy_(wte)
    assert split.fingerprint() == before


def test_a_module_the_top_runs_again_after_the_trunk_keys_the_trunk_states():
    """One norm module applied to the embeddings and again before the head is in the top (it runs after the stack),
    so its weights were left out of the trunk's fingerprint, though the trunk states depend on them: an in-place edit
    kept the old states."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm = nn.Embedding(20, 8), nn.LayerNorm(8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None):
            h = self.norm(self.embed(input_ids))
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return self.head(self.norm(h))

    torch.manual_seed(0)
    model = Net().eval()
    probe = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    split, reason = T.find_split(model, ["head.weight", "head.bias"], probe)
    assert split is not None, reason
    before = split.fingerprint()
    with torch.no_grad():
        model.head.weight.mul_(3.0)  # a top-only weight does not re-key the trunk states
    assert split.fingerprint() == before
    with torch.no_grad():
        model.norm.weight.mul_(3.0)
    assert split.fingerprint() != before


def _mapped_trunk_files() -> set[str]:
    """The trunk states files this process maps (deleted ones end in " (deleted)")."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6 and "/trunk-" in line}


def test_memory_mapped_cache_is_identical(pad_collator, monkeypatch, tmp_path):
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    in_memory = T.TrunkCache(split, batcher, key="a")
    monkeypatch.setattr(T, "MEMORY_LIMIT_BYTES", 1024)
    mapped = T.TrunkCache(split, batcher, key="b", directory=tmp_path)
    # mapped, and its name deleted at once (nothing reads it by name): no file is ever left behind
    assert not list(tmp_path.iterdir()) and in_memory.nbytes == mapped.nbytes
    assert any(f.startswith(str(tmp_path)) and f.endswith("(deleted)") for f in _mapped_trunk_files())
    batch = batcher.batch([5, 1, 2], trunk=False)
    torch.testing.assert_close(mapped.hidden([5, 1, 2], batch), in_memory.hidden([5, 1, 2], batch), rtol=0, atol=0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    temp = T.TrunkCache(split, batcher, key="c")
    assert temp.nbytes == mapped.nbytes and not list((tmp_path / "temp").iterdir())  # its temporary folder too
    temp.close()
    mapped.close()
    gc.collect()
    assert not any(f.startswith(str(tmp_path)) for f in _mapped_trunk_files())  # the space is freed


def test_memory_mapped_caches_of_one_model_do_not_share_a_file(pad_collator, monkeypatch, tmp_path):
    """The train, test and candidate caches of one model have keys that start alike (the trunk's fingerprint); in
    ``influence_cache_dir`` they were written to one file, ``trunk-{key[:24]}.bin``, and overwrote each other's
    states: influence 0.19 off (of 0.49), silently. Each cache now has a file of its own, deleted with it."""
    model = tiny_model("bert")
    train, test = make_token_dataset(16, seed=0), make_token_dataset(3, seed=1, min_len=12, max_len=20)
    args = exact_top_arguments()
    expected = compute_influences(model, train, test, args, data_collator=pad_collator).to_pandas()
    monkeypatch.setattr(T, "MEMORY_LIMIT_BYTES", 0)  # every cache memory-mapped
    mapped = replace(args, influence_cache_dir=str(tmp_path))
    with InfluenceEngine(model, mapped, data_collator=pad_collator) as engine:
        table = engine.compute_influences(train, test)
        mine = [f for f in _mapped_trunk_files() if f.startswith(str(tmp_path))]
        assert len(mine) == 2  # the train and the test rows' states, each its own (deleted-once-mapped) file
        assert not list(tmp_path.iterdir())
    assert table.metadata["diagnostics"]["trunk"].get("split") is not None
    np.testing.assert_allclose(table.to_pandas().influence, expected.influence, rtol=1e-9, atol=1e-12)
    assert not list(tmp_path.iterdir())  # closed with the engine
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(OSError, match="set influence_cache_dir to a writable folder"):
        compute_influences(model, train, test, replace(args, influence_cache_dir=str(blocked)),
                           data_collator=pad_collator)


def test_a_full_disk_under_the_mapped_trunk_file_raises(pad_collator, monkeypatch, tmp_path):
    """The mapped file was made sparse (torch.from_file extends it): when the disk filled up under it, writing a
    state killed the process with SIGBUS, no error, all work lost. Its space is now reserved first: a full disk is
    an OSError naming the folder and the setting, and nothing is left in the folder."""
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    monkeypatch.setattr(T, "MEMORY_LIMIT_BYTES", 1024)

    def full(handle, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match=f"{tmp_path} cannot hold one .*No space left on device.*: set "
                                      "influence_cache_dir to a writable folder with room for it"):
        T.TrunkCache(split, batcher, key="k", directory=tmp_path)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(OSError, match=f"the temporary folder {tmp_path} cannot hold one"):
        T.TrunkCache(split, batcher, key="k")
    assert not list(tmp_path.iterdir())  # nor its temporary folder


def test_ctrl_c_while_the_trunk_file_is_reserved_leaves_no_file(pad_collator, monkeypatch, tmp_path):
    """A KeyboardInterrupt during the reservation (glibc writes every block where the file system lacks fallocate:
    slow for GB files) skipped the clean-up, and the full-size file stayed in the folder."""
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    monkeypatch.setattr(T, "MEMORY_LIMIT_BYTES", 1024)

    def interrupted(handle, offset, length):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "posix_fallocate", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        T.TrunkCache(split, batcher, key="k", directory=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fallocate", [True, False])
def test_a_file_size_limit_on_the_mapped_trunk_file_is_an_os_error(pad_collator, monkeypatch, tmp_path, fallocate):
    """Under a per-file size limit (RLIMIT_FSIZE) torch.from_file failed with a bare RuntimeError ('File too
    large') that named neither the folder nor the setting; with or without posix_fallocate it is the OSError."""
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    monkeypatch.setattr(T, "MEMORY_LIMIT_BYTES", 1024)
    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # (Python ignores SIGXFSZ: writes fail with EFBIG)
    try:
        with pytest.raises(OSError, match="cannot hold one .*File too large.*set influence_cache_dir"):
            T.TrunkCache(split, batcher, key="k", directory=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list(tmp_path.iterdir())


_HOLDS_AND_ENDS = r"""
import os, signal, sys
from hf_fastif import trunk as T
from hf_fastif.batches import Batcher, validate_dataset
from hf_fastif.params import select_parameters
from tests.tiny import make_token_dataset, pad_collator_for_tests, tiny_model

T.MEMORY_LIMIT_BYTES = 0
model, data = tiny_model("bert"), make_token_dataset(8)
batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator_for_tests(), "cpu")
names = list(select_parameters(model, [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]))
split, _ = T.find_split(model, names, T.model_inputs(batcher.batch(range(2), trunk=False)))
held = [T.TrunkCache(split, batcher, key="in-folder", directory=sys.argv[2]), T.TrunkCache(split, batcher, key="tmp")]
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
unlink = os.unlink

def refused(path, *args, **kwargs):  # once: a system that cannot delete a file while it is mapped
    os.unlink = unlink
    raise PermissionError(1, "Operation not permitted", path)

os.unlink = refused
held.append(T.TrunkCache(split, batcher, key="undeletable", directory=sys.argv[2]))
assert os.unlink is unlink  # (refused)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_mapped_trunk_files_are_not_left_behind(tmp_path, end):
    """A script that ended holding an engine (no `with`, no close) left its mapped trunk files in the temporary
    folder and in influence_cache_dir (TrunkCache.__del__ ran at interpreter exit, after shutil was torn down, and
    its error was swallowed), and so did a killed run. The file is now deleted once mapped; where it cannot be, at
    exit, before the modules are torn down."""
    folder, temp = tmp_path / "cache_dir", tmp_path / "temp"
    folder.mkdir()
    temp.mkdir()
    env = os.environ | {"TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _HOLDS_AND_ENDS, end, str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == (-signal.SIGKILL if end == "kill" else 0), done.stderr[-2000:]
    assert not list(folder.iterdir()) and not list(temp.iterdir())


def test_rows_tokenised_differently_are_refused(pad_collator):
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    cache = T.TrunkCache(split, batcher, key="k")

    def truncating(features):
        return pad_collator([{**f, "input_ids": f["input_ids"][:3], "attention_mask": f["attention_mask"][:3]}
                             for f in features])

    other = Batcher(batcher.dataset, batcher.dataset.column_names, truncating, "cpu").with_trunk(cache)
    with pytest.raises(ValueError, match="collator changed"):
        other.batch([0, 1])


def test_subset_batchers_map_to_dataset_rows(pad_collator):
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    cache = T.TrunkCache(split, batcher, key="k")
    sub = batcher.with_trunk(cache).subset([7, 3, 11]).subset([2, 0])
    np.testing.assert_array_equal(sub.base_rows([0, 1]), [11, 7])
    fm = FunctionalModel(model, names, split=split)
    params = select_parameters(model, TOP["bert"])
    torch.testing.assert_close(fm.losses(params, sub.batch([0, 1])), fm.losses(params, batcher.batch([11, 7])))


def _multiple_choice_data(n, seed, choices=3, length=9):
    """Rows of ``choices`` sequences each, padded to ``length`` with their own lengths (mask zeros at the end)."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids, masks = np.zeros((n, choices, length), dtype=np.int64), np.zeros((n, choices, length), dtype=np.int64)
    for i in range(n):
        for c in range(choices):
            k = int(rng.integers(3, length + 1))
            ids[i, c, :k], masks[i, c, :k] = rng.integers(3, 64, size=k), 1
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": masks.tolist(),
                              "labels": rng.integers(0, choices, size=n).tolist()})


def test_multiple_choice_rows_are_cached_per_choice(tmp_path):
    """A multiple-choice model flattens its (b, c, s) inputs into b·c sequences: each row's choices are cached
    and laid out again as the model's stack sees them, a row's kNN feature holds its choices' features, and
    influence is the same with the cache on and off."""
    from transformers import BertConfig, BertForMultipleChoice


    torch.manual_seed(0)
    model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32,
                                             attn_implementation="eager")).double().eval()
    train, test = _multiple_choice_data(14, seed=0), _multiple_choice_data(3, seed=1)
    names = list(select_parameters(model, TOP["bert"]))
    batcher = Batcher(train, validate_dataset(train, "train", model), None, "cpu")
    split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(range(4), trunk=False)))
    assert split is not None, reason
    cache = T.TrunkCache(split, batcher, key="k", batch_size=4)
    assert T.verify_split(split, cache, batcher, range(len(batcher))) < 1e-10
    params = select_parameters(model, TOP["bert"])
    rows = [5, 0, 13]
    torch.testing.assert_close(FunctionalModel(model, names, split=split).losses(params, batcher.with_trunk(cache).batch(rows)),
                               FunctionalModel(model, names).losses(params, batcher.batch(rows)), rtol=1e-10, atol=1e-12)
    # kNN features: a row's choices side by side, each as the model's base gives it for that sequence alone
    batch = batcher.batch(rows, trunk=False)
    alone = [model.bert(input_ids=batch["input_ids"][:, c], attention_mask=batch["attention_mask"][:, c]).pooler_output
             for c in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(model_features(model, batch), torch.cat(alone, 1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model_features(model, batcher.with_trunk(cache).batch(rows), split=split),
                                   torch.cat(alone, 1), rtol=1e-10, atol=1e-12)
        embeds = model.bert.embeddings.word_embeddings(batch["input_ids"])  # (b, c, s, h), no mask: all positions
        alone = [model.bert(inputs_embeds=embeds[:, c]).pooler_output for c in range(3)]
        torch.testing.assert_close(model_features(model, {"inputs_embeds": embeds}), torch.cat(alone, 1))
    for k in (None, 6):  # the full scan, and kNN candidates on those features
        cached, diagnostics = _influence(model, train, test, TOP["bert"], tmp_path, influence_knn_k=k)
        uncached, _ = _influence(model, train, test, TOP["bert"], tmp_path, influence_knn_k=k, influence_trunk_cache=False)
        assert diagnostics["trunk"]["split"] == "bert.encoder.layer.1"
        assert diagnostics["readout"]["cut_after"] == "bert.encoder.layer.1.attention.output (inputs)"
        assert len(cached) == len(test) * (k or len(train))
        np.testing.assert_allclose(cached, uncached, rtol=1e-9, atol=1e-14)
    # a choice without tokens (a mask of zeros) still runs its padding through the trunk: no state to cache, so no
    # cache (with one, its zeros made the loss of such a row wrong and s_test blow up), and the uncached numbers
    rows = train.to_dict()
    rows["attention_mask"][11][2] = [0] * len(rows["attention_mask"][11][2])
    empty = type(train).from_dict(rows)
    with pytest.raises(T.TrunkLayoutError, match="row 11 has a sequence without tokens"):
        T.TrunkCache(split, Batcher(empty, validate_dataset(empty, "train", model), None, "cpu"), key="e")
    cached, diagnostics = _influence(model, empty, test, TOP["bert"], tmp_path)
    assert diagnostics["trunk"]["split"] is None and "without tokens" in diagnostics["trunk"]["reason"]
    np.testing.assert_allclose(cached, _influence(model, empty, test, TOP["bert"], tmp_path,
                                                  influence_trunk_cache=False)[0], rtol=1e-9, atol=1e-14)


def test_a_model_that_pads_inside_gets_no_split(pad_collator, tmp_path, caplog):
    """Longformer pads every batch to a multiple of its attention window inside its forward, so hidden states in the
    stack do not line up with the batch's tokens: no split where the probe shows it, and where the probe rows need
    no padding, building the cache finds it (`TrunkLayoutError`); the engine then runs the full forward, says why,
    and gives the uncached numbers."""
    model = longformer()  # attention window 4
    data = make_token_dataset(20, seed=0, num_labels=3)
    lengths = np.array([len(x) for x in data["input_ids"]])
    batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")
    patterns = [r"encoder\.layer\.1\.", r"classifier\."]
    names = list(select_parameters(model, patterns))
    odd = np.flatnonzero(lengths % 4)[:2]
    split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(odd, trunk=False)))
    assert split is None and "pads or drops positions" in reason
    eight = np.flatnonzero(lengths == 8)[:2]
    split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(eight, trunk=False)))
    assert split is not None, reason
    with pytest.raises(T.TrunkLayoutError, match="pads or drops positions"):
        T.TrunkCache(split, batcher, key="k")
    train = data.select([*eight, *[i for i in range(len(data)) if i not in set(eight)]])  # the engine probes rows 0-1
    test = make_token_dataset(2, seed=7, num_labels=3)
    with caplog.at_level("WARNING"):
        cached, diagnostics = _influence(model, train, test, patterns, tmp_path, pad_collator)
    assert diagnostics["trunk"]["split"] is None and "pads or drops positions" in diagnostics["trunk"]["reason"]
    assert "No frozen-trunk cache" in caplog.text
    uncached, _ = _influence(model, train, test, patterns, tmp_path, pad_collator, influence_trunk_cache=False)
    np.testing.assert_allclose(cached, uncached, rtol=1e-9, atol=1e-14)


@pytest.mark.usefixtures("propagating")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_split_refused_by_its_logits_says_when_half_precision_rounding_can_be_why(pad_collator, tmp_path, caplog,
                                                                                   monkeypatch, dtype):
    """On a GPU a bf16 model's kernels may round differently by batch shape, beyond the split check's tolerance: the
    warning blamed the split alone. (Here the tolerance is set below 0 so that the check refuses the split.)"""
    from hf_fastif.engine import trunk_states

    monkeypatch.setattr(trunk_states, "split_tolerance", lambda model: -1.0)
    model = tiny_model("bert", dtype=dtype)
    train, test = make_token_dataset(12, seed=0), make_token_dataset(1, seed=1)
    with caplog.at_level("WARNING"):
        _, diagnostics = _influence(model, train, test, TOP["bert"], tmp_path, pad_collator)
    assert "not using the trunk cache" in caplog.text and diagnostics["trunk"]["split"] is None
    assert ("bfloat16 rounding can differ" in caplog.text) == (dtype == torch.bfloat16)


def test_a_batch_the_model_reshapes_runs_whole(pad_collator, tmp_path, caplog):
    """Longformer again, where neither the probe nor the cache build sees its padding (the whole dataset is one
    cache batch, its longest row 8 tokens, a multiple of the window): later batches of shorter rows are padded inside
    the model. Such a forward puts the trunk back and runs whole (the numbers are the uncached ones), the table says
    so, and the engine's next call runs without the cache, whose states are freed."""
    model = longformer()
    embeddings = model.longformer.embeddings  # a user's patch: the forward that runs whole is the model's own
    embeddings.forward = lambda *a, **k: type(embeddings).forward(embeddings, *a, **k) * 1.5
    data = make_token_dataset(20, seed=0, num_labels=3, max_len=8)
    lengths = np.array([len(x) for x in data["input_ids"]])
    eight = list(np.flatnonzero(lengths == 8)[:2])
    train = data.select([*eight, *[i for i in range(len(data)) if i not in set(eight)]])
    test = make_token_dataset(6, seed=7, num_labels=3, max_len=8)
    assert lengths.max() == 8 and (lengths % 4).any()
    patterns = [r"encoder\.layer\.1\.", r"classifier\."]
    uncached, _ = _influence(model, train, test, patterns, tmp_path, pad_collator, influence_batch_size=2,
                             influence_trunk_cache=False)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=patterns, influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, influence_batch_size=2,
                              influence_knn_k=None, disable_tqdm=True, influence_check_convergence=False)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    for call in ("first", "again"):
        with caplog.at_level("WARNING"):
            table = engine.compute_influences(train, test)
        trunk = table.metadata["diagnostics"]["trunk"]
        if call == "first":
            assert trunk["split"] == "longformer.encoder.layer.1"
            assert "positions for cached states" in trunk["failed_on_a_batch"]
            assert "does not line up with this batch" in caplog.text
        else:  # the engine dropped the split, and the states cached for it
            assert trunk["split"] is None and "did not line up" in trunk["reason"] and not engine._trunks
        np.testing.assert_allclose(table.to_pandas().sort_values(["test_id", "train_id"])["influence"].to_numpy(),
                                   uncached[:, 1], rtol=1e-9, atol=1e-14)


def _prepadded(data, length, side="right"):
    """Rows padded to ``length`` in the dataset itself (no collator padding), on the right or the left."""
    from datasets import Dataset

    rows = data.to_dict()
    for i, ids in enumerate(rows["input_ids"]):
        pad = [0] * (length - len(ids))
        rows["input_ids"][i] = ids + pad if side == "right" else pad + ids
        mask = rows["attention_mask"][i]
        rows["attention_mask"][i] = mask + pad if side == "right" else pad + mask
    return Dataset.from_dict(rows)


def _influence(model, train, test, patterns, tmp_path, collator=None, **settings):
    """``((pairs, 2) train ids and values sorted by test and train id, diagnostics)`` of a short LiSSA call."""
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=patterns, influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, **{"influence_knn_k": None, **settings})
    table = InfluenceEngine(model, args, data_collator=collator).compute_influences(train, test)
    return (table.to_pandas().sort_values(["test_id", "train_id"])[["train_id", "influence"]].to_numpy(),
            table.metadata["diagnostics"])


def _table(engine, train, test):
    table = engine.compute_influences(train, test)
    return (table.to_pandas().sort_values(["test_id", "train_id"])[["train_id", "influence"]].to_numpy(),
            table.metadata["diagnostics"])


def test_a_split_after_the_stack_keeps_the_first_position_only(pad_collator, tmp_path):
    """Only the pooler and the classifier take part: the trunk runs the last layer at its first position (all the
    top reads) and keeps one state per row, and nothing changes: influence with every position kept and without
    the cache, kNN candidates of a method that reads the first position; a method that reads others keeps every
    position; the layout survives a save and a load."""
    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(30, seed=0, num_labels=3), make_token_dataset(3, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=None)
    hidden = model.config.hidden_size
    for settings in ({}, {"influence_knn_k": 8}, {"influence_knn_k": 8, "influence_knn_features": "cls"}):
        run = replace(args, **settings)
        engine = InfluenceEngine(model, run, data_collator=pad_collator)
        cut, diagnostics = _table(engine, train, test)
        assert diagnostics["trunk"]["first_position_cut"] == "at the inputs of bert.encoder.layer.1.attention.output"
        caches = list(engine._trunks.values())
        assert {c.per_row for c in caches} == {1}
        assert sorted(tuple(c.flat.shape) for c in caches) == [(len(test), hidden), (len(train), hidden)]
        every, kept = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, pad_collator,
                                 influence_skip_unread_positions=False, **settings)
        assert kept["trunk"]["first_position_cut"] == "none (influence_skip_unread_positions=False)"
        uncached, _ = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, pad_collator,
                                 influence_trunk_cache=False, **settings)
        for other in (every, uncached):
            np.testing.assert_array_equal(cut[:, 0], other[:, 0])  # the same candidates
            np.testing.assert_allclose(cut[:, 1], other[:, 1], rtol=1e-9, atol=1e-14)
    # predictions on the same rows are served from the cut cache (it passed the same check of the logits)
    held = len(engine._trunks)
    with torch.no_grad():
        expected = model(**T.model_inputs(Batcher(train, validate_dataset(train, "train", model), pad_collator,
                                                  "cpu").batch(range(len(train)), trunk=False))).logits
    np.testing.assert_allclose(engine.logits(train, batch_size=len(train)), expected.float().numpy(), rtol=1e-5,
                               atol=1e-6)
    assert len(engine._trunks) == held
    # saved and loaded: the first-position layout comes back, and so do the values
    folder = engine.save_caches(tmp_path / "caches")
    loaded = InfluenceEngine(model, run, data_collator=pad_collator)
    assert "trunk" in loaded.load_caches(folder)
    assert {c.per_row for c in loaded._trunks.values()} == {1}
    np.testing.assert_allclose(_table(loaded, train, test)[0], cut, rtol=1e-12, atol=1e-15)
    # mean features read every position: the trunk keeps them all (a cut trunk would give the first one's state)
    mean, diagnostics = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, pad_collator, influence_knn_k=8,
                                   influence_knn_features="mean")
    assert diagnostics["trunk"]["first_position_cut"] == "none (influence_knn_features='mean' reads other positions)"
    whole, _ = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, pad_collator, influence_knn_k=8,
                          influence_knn_features="mean", influence_trunk_cache=False)
    np.testing.assert_array_equal(mean[:, 0], whole[:, 0])
    # GPT-2's score reads the last token: nothing is cut
    gpt2 = tiny_model("gpt2", num_labels=3)
    _, diagnostics = _influence(gpt2, train, test, HEAD_ONLY["gpt2"], tmp_path, pad_collator)
    assert diagnostics["trunk"]["first_position_cut"].startswith("none (the loss reads the last layer at other positions")


def test_a_new_test_point_reuses_the_first_position_decision(pad_collator, tmp_path, monkeypatch):
    """Later calls with new test points (the default measurement) decide the cut once: no probes again, the new
    one-row cache keeps its first position from the forward its check reads, and the values are the uncut ones."""
    from hf_fastif import engine as engine_module

    model = tiny_model("bert", num_labels=3)
    train, tests = make_token_dataset(30, seed=0, num_labels=3), make_token_dataset(4, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=8)
    whole = [_influence(model, train, tests.select([i]), HEAD_ONLY["bert"], tmp_path, pad_collator,
                           influence_knn_k=8, influence_trunk_cache=False)[0] for i in range(len(tests))]
    decisions = []
    find = engine_module.trunk_states.find_readout

    def counted(fm, *a, **k):
        decisions.append(fm.split is None)  # (the trunk's decision runs on the whole model, the readout's on the top)
        return find(fm, *a, **k)

    monkeypatch.setattr(engine_module.trunk_states, "find_readout", counted)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    for i, uncached in enumerate(whole):
        cut, diagnostics = _table(engine, train, tests.select([i]))
        assert diagnostics["trunk"]["first_position_cut"] == "at the inputs of bert.encoder.layer.1.attention.output"
        np.testing.assert_array_equal(cut[:, 0], uncached[:, 0])
        np.testing.assert_allclose(cut[:, 1], uncached[:, 1], rtol=1e-9, atol=1e-14)
    assert decisions.count(True) == 1
    assert {c.per_row for c in engine._trunks.values()} == {1}


def test_a_loss_of_ones_own_keeps_every_position(pad_collator, tmp_path):
    """A loss_fn may read the last layer at a position that depends on the row (here a marker token's state, on
    training rows the probes do not include): the trunk keeps every position for it. Cut on the probes' evidence,
    the marked rows' influence was 0.44 off and every other row's ~1e-3 (a review's repro), without a word."""
    import torch.nn.functional as F
    from datasets import Dataset

    mark = 3

    def loss_fn(outputs, batch):
        states = outputs.hidden_states[-1]
        at = (batch["input_ids"] == mark).to(torch.int64).argmax(1)  # position 0 where a row has no marker
        weight = 1 + torch.sigmoid(3 * states[torch.arange(len(at)), at][:, 0])
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") * weight

    model = tiny_model("bert", num_labels=3)
    model.config.output_hidden_states = True
    rows = make_token_dataset(30, seed=0, num_labels=3).to_dict()
    for i in range(20, 24):  # (the probes: the first 4 rows, the shortest and the longest)
        rows["input_ids"][i][2] = mark
    train, test = Dataset.from_dict(rows), make_token_dataset(3, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=None)
    values = {}
    # (the reference: the whole model, and no read-position cut inside the last layer either, which the marked rows
    # would make raise an IndexError in this loss)
    whole = replace(args, influence_trunk_cache=False, influence_skip_unread_positions=False)
    values["whole"], _ = _table(InfluenceEngine(model, whole, data_collator=pad_collator, loss_fn=loss_fn), train, test)
    engine = InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss_fn)
    values["default"], diagnostics = _table(engine, train, test)
    np.testing.assert_allclose(values["default"][:, 1], values["whole"][:, 1], rtol=1e-9, atol=1e-14)
    assert diagnostics["trunk"]["first_position_cut"] == ("none (a loss_fn or measurement_fn of one's own may read "
                                                          "other positions)")
    assert {c.per_row for c in engine._trunks.values()} == {0}


@pytest.mark.parametrize("failure", ["logits", "a batch"])
def test_a_first_position_cache_that_fails_keeps_every_position(pad_collator, tmp_path, monkeypatch, failure):
    """A cut cache whose logits differ from the full model's, or whose cut forward fails on a batch unlike the probes,
    is replaced by one of every position (the split stays), and the decision is kept for later calls."""
    from hf_fastif import engine as engine_module

    verify, capture = engine_module.trunk_states.verify_split, T.TrunkSplit.capture

    def strict(split, cache, batcher, rows, **kwargs):  # as if the first position alone changed the logits
        return 1.0 if cache.per_row else verify(split, cache, batcher, rows, **kwargs)

    def failing(self, model, inputs, **kwargs):  # as if a batch unlike the probes failed after the cut
        out = capture(self, model, inputs, **kwargs)
        cut = next((r for r in [engine._trunk_cut[1]] if r is not None and r.fired), None)
        if cut is not None:
            raise IndexError("index 3 is out of bounds for dimension 1 with size 1")
        return out

    if failure == "logits":
        monkeypatch.setattr(engine_module.trunk_states, "verify_split", strict)
    else:
        monkeypatch.setattr(T.TrunkSplit, "capture", failing)
    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(30, seed=0, num_labels=3), make_token_dataset(3, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=None)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    reason = ("none (the first position alone changed the logits by 1)" if failure == "logits" else
              "none (the last layer cut at the inputs of bert.encoder.layer.1.attention.output failed on a batch "
              "(IndexError: index 3 is out of bounds for dimension 1 with size 1))")
    for _ in range(2):
        values, diagnostics = _table(engine, train, test)
        assert diagnostics["trunk"]["split"] == "bert.encoder.layer.2"
        assert diagnostics["trunk"]["first_position_cut"] == reason
        assert {c.per_row for c in engine._trunks.values()} == {0}
    uncached, _ = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, pad_collator, influence_trunk_cache=False)
    np.testing.assert_allclose(values[:, 1], uncached[:, 1], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.usefixtures("propagating")
def test_a_failed_cut_says_only_speed_is_lost_and_names_half_precision_rounding(pad_collator, tmp_path, monkeypatch,
                                                                                caplog, dtype):
    """The warning of a cut that failed its check: nothing but speed is lost, and in half precision the likely cause
    is the rounding of the cut's smaller products (a new user's trained bfloat16 tiny BERT: 0.0068 against the
    1e-4 every split is held to), which a float32 copy avoids; a float64 model's is not blamed on rounding."""
    from hf_fastif import engine as engine_module

    verify = engine_module.trunk_states.verify_split
    monkeypatch.setattr(engine_module.trunk_states, "verify_split", lambda split, cache, batcher, rows, **kwargs: (
        0.0068 if cache.per_row else verify(split, cache, batcher, rows, **kwargs)))
    model = tiny_model("bert", dtype=dtype)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], influence_solver="cg",
                              influence_damping=0.05, influence_scale=20.0, disable_tqdm=True, influence_knn_k=None)
    with caplog.at_level("WARNING"):
        _table(InfluenceEngine(model, args, data_collator=pad_collator), make_token_dataset(12, seed=0),
               make_token_dataset(2, seed=1))
    assert "The trunk keeps every position (only speed is lost): the first position alone changed the logits by " \
           "0.0068" in caplog.text
    assert ("bfloat16 rounding, most likely" in caplog.text) == (dtype == torch.bfloat16)


def test_a_first_position_cache_of_multiple_choice_rows_keeps_each_choice(tmp_path):
    """Rows of c sequences keep c first-position states each, laid out as the model flattens them."""
    from transformers import BertConfig, BertForMultipleChoice

    torch.manual_seed(0)
    model = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32,
                                             attn_implementation="eager")).double().eval()
    train, test = _multiple_choice_data(14, seed=0), _multiple_choice_data(3, seed=1)
    for k in (None, 6):
        args = InfluenceArguments(output_dir=str(tmp_path), influence_params=HEAD_ONLY["bert"], disable_tqdm=True,
                                  influence_solver="lissa", influence_recursion_depth=10, influence_scale=100.0,
                                  influence_check_convergence=False, influence_knn_k=k)
        engine = InfluenceEngine(model, args)
        cut, diagnostics = _table(engine, train, test)
        assert diagnostics["trunk"]["first_position_cut"] == "at the inputs of bert.encoder.layer.1.attention.output"
        assert {c.per_row for c in engine._trunks.values()} == {3}
        assert sorted(tuple(c.flat.shape) for c in engine._trunks.values()) == [(3 * len(test), 16), (3 * len(train), 16)]
        uncached, _ = _influence(model, train, test, HEAD_ONLY["bert"], tmp_path, influence_knn_k=k,
                                 influence_trunk_cache=False)
        np.testing.assert_array_equal(cut[:, 0], uncached[:, 0])
        np.testing.assert_allclose(cut[:, 1], uncached[:, 1], rtol=1e-9, atol=1e-14)


def test_a_first_position_cache_needs_a_split_after_the_stack(pad_collator):
    model, names, batcher, probe = setup("bert", TOP["bert"], pad_collator)
    split, _ = T.find_split(model, names, probe)
    with pytest.raises(ValueError, match="after the whole layer stack"):
        T.TrunkCache(split, batcher, key="k", first_position=object())


def test_layers_that_run_more_than_once_get_no_split():
    """ALBERT runs its layer groups several times (4 layers from 2 groups): one cached state cannot stand in for
    every call of a group, so there is no split (it used to pass the check on small logits and change influence)."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=4, num_hidden_groups=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, num_labels=3,
        attn_implementation="eager")).double().eval()
    data = _prepadded(make_token_dataset(6, seed=0, num_labels=3), 9)
    batcher = Batcher(data, validate_dataset(data, "train", model), None, "cpu")
    names = list(select_parameters(model, [r"albert_layer_groups\.1\.", r"pooler", r"^classifier"]))
    split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(range(2), trunk=False)))
    assert split is None and "do not run once each" in reason


@pytest.mark.parametrize("case", ["left-padded pooler", "span convolution over padding"])
def test_a_top_that_reads_padding_is_caught_on_padded_rows(case, tmp_path):
    """The cached states of padding positions are copies of each row's first token's: exact only where the top
    never reads a padding position. A BERT whose rows are padded on the left reads one at position 0 (its pooler);
    ConvBERT's span convolution reads those within 4 positions. The first 8 rows are full length, so only checking
    them passed both; the check now also collates the shortest of the first rows with the longest, with a float64
    tolerance of 1e-9 (ConvBERT's change is ~1e-6 of the logits), and the numbers are the uncached ones."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ConvBertConfig,
        ConvBertForSequenceClassification,
    )

    torch.manual_seed(0)
    raw = make_token_dataset(40, seed=0, num_labels=3)
    lengths = np.array([len(x) for x in raw["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # full-length rows first
    rows = raw.select([*order[:16].tolist(), *order[-8:].tolist()])
    if case == "left-padded pooler":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, num_labels=3, attn_implementation="eager")).double().eval()
        side, patterns = "left", [r"encoder\.layer\.2\.", r"pooler\.", r"^classifier\."]
    else:
        model = ConvBertForSequenceClassification(ConvBertConfig(
            vocab_size=64, embedding_size=16, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
            head_ratio=2, intermediate_size=32, max_position_embeddings=64, num_labels=3,
            attn_implementation="eager")).double().eval()
        side, patterns = "right", [r"encoder\.layer\.2\.", r"^classifier\."]
    train = _prepadded(rows, 9, side)
    test = _prepadded(make_token_dataset(3, seed=1, num_labels=3), 9, side)
    cached, diagnostics = _influence(model, train, test, patterns, tmp_path)
    assert diagnostics["trunk"]["split"] is None and "top-only logits differ" in diagnostics["trunk"]["reason"]
    uncached, _ = _influence(model, train, test, patterns, tmp_path, influence_trunk_cache=False)
    np.testing.assert_allclose(cached, uncached, rtol=1e-9, atol=1e-14)


def test_layers_returning_a_list_are_cached(pad_collator, tmp_path):
    """OpenAI GPT's blocks return a list: the cache stands in for it as for a tuple (it crashed), same numbers."""
    from transformers import OpenAIGPTConfig, OpenAIGPTForSequenceClassification

    torch.manual_seed(0)
    model = OpenAIGPTForSequenceClassification(OpenAIGPTConfig(
        vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32, num_labels=3, pad_token_id=0,
        attn_implementation="eager")).double().eval()
    train, test = make_token_dataset(12, seed=0, num_labels=3), make_token_dataset(3, seed=1, num_labels=3)
    patterns = [r"transformer\.h\.2\.", r"^score\."]
    cached, diagnostics = _influence(model, train, test, patterns, tmp_path, pad_collator)
    assert diagnostics["trunk"]["split"] == "transformer.h.2"
    uncached, _ = _influence(model, train, test, patterns, tmp_path, pad_collator, influence_trunk_cache=False)
    np.testing.assert_allclose(cached, uncached, rtol=1e-9, atol=1e-14)


def test_a_forward_that_puts_the_trunk_back_runs_each_module_once(pad_collator):
    """The in-flight fallback (a batch Longformer pads inside) runs the skipped module's own forward, so hooks around
    it (the caller's) fire once, and the logits are the full model's."""
    model = longformer()
    data = make_token_dataset(20, seed=0, num_labels=3, max_len=8)
    lengths = np.array([len(x) for x in data["input_ids"]])
    batcher = Batcher(data, validate_dataset(data, "train", model), pad_collator, "cpu")
    names = list(select_parameters(model, [r"encoder\.layer\.1\.", r"classifier\."]))
    split, reason = T.find_split(model, names, T.model_inputs(batcher.batch(np.flatnonzero(lengths == 8)[:2],
                                                                            trunk=False)))
    assert split is not None and split.feeder is not None, reason
    inputs = T.model_inputs(batcher.batch(np.flatnonzero(lengths == 7)[:1], trunk=False))
    calls = []
    handle = split.feeder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    try:
        with torch.no_grad(), split.injected(torch.zeros(1, 7, 16, dtype=torch.float64)):
            top = model(**inputs).logits
    finally:
        handle.remove()
    assert split.failed is not None and len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(top, model(**inputs).logits, rtol=0, atol=0)


def test_a_models_own_forwards_and_each_modules_mode_come_back(pad_collator, tmp_path):
    """The injection stands in for the trunk's forwards and the call runs in eval mode; afterwards the model is as it
    was: an accelerate hook (what ``dispatch_model`` puts on a model split over devices) or a user's patched
    ``forward`` on the skipped modules is back, not deleted, and a layer the user put in eval mode inside a
    training model stays in eval mode (``model.train(was)`` used to turn every module back to training)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def post_forward(self, module, output):
            Counting.calls += 1
            return output

    model = tiny_model("bert")
    train, test = make_token_dataset(12, seed=0), make_token_dataset(2, seed=1)
    for layer in model.bert.encoder.layer:
        add_hook_to_module(layer, Counting())
    embeddings = model.bert.embeddings
    patched = embeddings.forward = lambda *a, **k: type(embeddings).forward(embeddings, *a, **k) * 1.5
    hooked = vars(model.bert.encoder.layer[0])["forward"]
    inputs = {k: v for k, v in pad_collator([train[0], train[1]]).items() if k != "labels"}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits  # through the patch (x 1.5) and the hooks
    model.train()
    model.bert.encoder.layer[0].eval()
    before = {n: m.training for n, m in model.named_modules()}
    dropout, restored = model.bert.encoder.layer[1].output.dropout, []
    dropout.train = lambda mode=True: (restored.append(mode), type(dropout).train(dropout, mode))[1]
    _, diagnostics = _influence(model, train, test, TOP["bert"], tmp_path, pad_collator)
    assert diagnostics["trunk"]["split"] == "bert.encoder.layer.1"
    assert vars(model.bert.encoder.layer[0])["forward"] is hooked and vars(embeddings)["forward"] is patched
    assert {n: m.training for n, m in model.named_modules()} == before
    assert restored == [False, True]  # through train(), which a module may override (LeViT drops a cache there)
    Counting.calls = 0
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, expected)
    assert Counting.calls == 2


def test_a_held_engine_reads_a_datasets_lengths_and_the_trunk_fingerprint_once(pad_collator, monkeypatch):
    """An engine builds its batchers anew each call: it read the training rows' stored lengths again every call (four
    Arrow columns behind the padding probes: ~14 ms of a 0.13 s later call on the MiniLM default), and fingerprinted
    the trunk once per dataset (three times a call, ~5 ms each). The lengths are kept by the rows' content, and the
    trunk is fingerprinted once a call; rows of other content read their own, and the values do not change."""
    model = tiny_model("bert", num_labels=3)
    train = make_token_dataset(24, seed=0, num_labels=3)
    other = make_token_dataset(24, seed=5, num_labels=3)  # as many rows, other lengths
    tests = make_token_dataset(3, seed=1, num_labels=3)
    assert [len(x) for x in other["input_ids"]] != [len(x) for x in train["input_ids"]]
    args = exact_top_arguments()
    reads, prints = [], []
    read, fingerprint = Batcher._stored_lengths, T.TrunkSplit.fingerprint

    def counted_read(self, column, count):
        reads.append(len(self.dataset))
        return read(self, column, count)

    def counted_fingerprint(self, digests=None):
        prints.append(digests is not None)
        return fingerprint(self, digests)

    monkeypatch.setattr(Batcher, "_stored_lengths", counted_read)
    monkeypatch.setattr(T.TrunkSplit, "fingerprint", counted_fingerprint)
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        first = engine.compute_influences(train, tests.select([0]))
        assert first.metadata["diagnostics"]["trunk"]["split"] is not None
        assert 24 in reads and prints == [True]  # one fingerprint for the train and test rows' caches
        reads.clear()
        engine.compute_influences(train, tests.select([1]))
        assert reads and 24 not in reads  # the new test row's lengths are read, the training rows' kept
        reads.clear()
        table = engine.compute_influences(other, tests.select([1]))
        assert 24 in reads  # other content: its own lengths
    expected = compute_influences(model, other, tests.select([1]), args, data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().sort_values("train_id").influence,
                               expected.to_pandas().sort_values("train_id").influence, rtol=1e-9, atol=1e-14)


def test_a_new_one_row_cache_is_checked_on_the_forward_that_captured_it(pad_collator, monkeypatch, caplog):
    """A later call's new test point (a one-row dataset) is cached and checked against the full model: the capture
    stopped at the split and the check ran the whole model again on the same row collated alone (the MiniLM default's
    live later call: 13.6 ms capture + 13.1 ms check of 73 ms). The capture now runs the rest of that forward and the
    check compares with its outputs: the trunk runs once for the row, a top that disagrees is still caught (and the
    engine then gives the uncached numbers), and the outputs are let go of after the check."""
    model = tiny_model("bert", num_labels=3)
    train = make_token_dataset(24, seed=0, num_labels=3)
    tests = make_token_dataset(3, seed=1, num_labels=3)
    args = exact_top_arguments()
    runs, checked = [], []
    # (the first layer's attention: under injection the layer's own forward stands in and runs no submodule)
    handle = model.bert.encoder.layer[0].attention.register_forward_pre_hook(
        lambda module, inputs: runs.append(inputs[0].shape[0]))
    verify = T.verify_split

    def counted_verify(split, cache, batcher, rows, **kwargs):
        error = verify(split, cache, batcher, rows, **kwargs)
        checked.append((len(batcher), error, getattr(cache, "full_outputs", None)))
        return error

    monkeypatch.setattr("hf_fastif.engine.trunk_states.verify_split", counted_verify)
    reads, read = [], Batcher._stored_lengths

    def counted_read(self, column, count):
        reads.append((len(self.dataset), column, count))
        return read(self, column, count)

    monkeypatch.setattr(Batcher, "_stored_lengths", counted_read)
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
        engine.compute_influences(train, tests.select([0]))
        runs.clear(), checked.clear(), reads.clear()
        table = engine.compute_influences(train, tests.select([1]))
        assert runs == [1]  # the new row's trunk ran once (before: capture, then the check's full forward)
        assert [(n, e < 1e-10, kept) for n, e, kept in checked] == [(1, True, None)]  # checked; outputs let go of
        # a single row has no other to be padded to: only its width is read (the cache's layout), not the probes'
        # other columns (before: token counts and targets too)
        assert reads == [(1, "input_ids", "width")]
    expected = compute_influences(model, train, tests.select([1]), args, data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().sort_values("train_id").influence,
                               expected.to_pandas().sort_values("train_id").influence, rtol=1e-9, atol=1e-14)
    handle.remove()

    hidden = T.TrunkCache.hidden  # a top that reads a later call's one-row cached states wrong: still caught, by
    wrong = []  # the check on the capturing forward (the first call's caches read right: the split passed its checks)

    def shifted(self, rows, batch):
        states = hidden(self, rows, batch)
        return states + 1.0 if wrong and len(self.lengths) == 1 else states

    monkeypatch.setattr(T.TrunkCache, "hidden", shifted)
    built, init = [], T.TrunkCache.__init__
    monkeypatch.setattr(T.TrunkCache, "__init__", lambda self, *a, **k: built.append(k.get("full_forward"))
                        or init(self, *a, **k))
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine, caplog.at_level("WARNING"):
        first = engine.compute_influences(train, tests.select([0]))
        assert first.metadata["diagnostics"]["trunk"]["split"] is not None and "changes the logits" not in caplog.text
        wrong.append(True)
        built.clear()
        table = engine.compute_influences(train, tests.select([2]))
    assert built == [True]  # the new row's cache: checked on the forward that captured it, and caught there
    assert "changes the logits" in caplog.text and table.metadata["diagnostics"]["trunk"]["split"] is None
    monkeypatch.setattr(T.TrunkCache, "hidden", hidden)
    uncached = compute_influences(model, train, tests.select([2]), replace(args, influence_trunk_cache=False),
                                  data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().sort_values("train_id").influence,
                               uncached.to_pandas().sort_values("train_id").influence, rtol=1e-9, atol=1e-14)


def test_a_trunk_whose_forward_is_not_a_function_of_its_inputs_is_caught_on_one_row(pad_collator, tmp_path,
                                                                                    monkeypatch):
    """A one-row cache is checked on the forward that captured it only once a cache of the split passed the check
    against two forwards of its own: a trunk that adds noise in eval mode (a hook) agrees with the very forward that
    captured it, and a split first checked on one row (`InfluenceEngine.logits` of a typed pair) was kept (a
    review's repro: 0.014 relative, dropped before the one-forward check)."""
    model = tiny_model("bert", num_labels=3)
    rows = make_token_dataset(3, seed=1, num_labels=3)
    args = exact_top_arguments()
    handle = model.bert.encoder.layer[0].attention.register_forward_hook(
        lambda module, inputs, out: (out[0] + 1e-2 * torch.randn_like(out[0]), *out[1:]))
    try:
        with InfluenceEngine(model, args, data_collator=pad_collator) as engine:
            engine.logits(rows.select([0]))
            assert engine._split[1] is None and "differ" in engine._split[2]
    finally:
        handle.remove()
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:  # without the noise: kept, and a
        engine.logits(rows)  # one-row cache after a checked one reuses the capture's forward
        split = engine._split[1]
        assert split is not None and split.verified
        engine.logits(rows.select([2]))
        assert engine._split[1] is split
        folder = engine.save_caches(tmp_path / "caches")
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:  # checked, then the noise registered:
        engine.logits(rows)  # another state of the model, whose one-row cache is checked on two forwards again (the
        assert engine._split[1] is not None  # split stayed checked: the noisy states were kept and served)
        handle = model.bert.encoder.layer[0].attention.register_forward_hook(
            lambda module, inputs, out: (out[0] + 1e-2 * torch.randn_like(out[0]), *out[1:]))
        try:
            engine.logits(rows.select([1]))
            assert engine._split[1] is None and "differ" in engine._split[2]
        finally:
            handle.remove()
    built, init = [], T.TrunkCache.__init__
    monkeypatch.setattr(T.TrunkCache, "__init__", lambda self, *a, **k: built.append(k.get("full_forward"))
                        or init(self, *a, **k))
    with InfluenceEngine(model, args, data_collator=pad_collator) as engine:  # caches saved after their check
        assert "trunk" in engine.load_caches(folder)  # (the Space's warm start) count as checked
        engine.logits(rows)
        assert built == [] and engine._split[1].verified  # served from the loaded caches
        engine.logits(rows.select([1]))
        assert built == [True]  # the new one-row cache: checked on the forward that captured it


@pytest.mark.usefixtures("propagating")
def test_a_loss_of_ones_own_that_reads_hidden_states_below_the_split_runs_the_whole_model(pad_collator, tmp_path,
                                                                                           caplog):
    """Under the split the trunk does not run, so the hidden states it would return below the split are not the
    model's. A loss_fn reading them (``hidden_states[0]``, the embeddings' output) passed the split's check of the
    logits, and its influence was 1.4% off without a word, in a review: with a loss_fn or measurement_fn of one's
    own, the split's check also compares the outputs such a function reads, and refuses this one with a warning;
    the values are the whole model's. One that reads the last hidden state (above the split) or the logits alone
    keeps the split; of these, the one reading a per-position output is not cut to the read position either."""
    import logging

    import torch.nn.functional as F

    def reads(low_layer):
        def loss_fn(outputs, batch):
            low, top = outputs.hidden_states[low_layer][:, 0], outputs.hidden_states[-1][:, 0]
            return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") + ((top - 0.5 * low) ** 2).sum(-1)
        return loss_fn

    def reads_the_logits(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none", label_smoothing=0.1)

    model = tiny_model("bert")
    model.config.output_hidden_states = True
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    args = InfluenceArguments(output_dir=str(tmp_path), influence_params=TOP["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=None)
    whole = replace(args, influence_trunk_cache=False, influence_skip_unread_positions=False)
    # (split at layer 1: hidden_states[0] is the embeddings' output, below it; [-1] the last layer's, above)
    for loss_fn, split, cut in ((reads(0), False, False), (reads(-1), True, False), (reads_the_logits, True, True),
                                (None, True, True)):
        expected, _ = _table(InfluenceEngine(model, whole, data_collator=pad_collator, loss_fn=loss_fn), train, test)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_fastif"):
            values, diagnostics = _table(InfluenceEngine(model, args, data_collator=pad_collator, loss_fn=loss_fn),
                                         train, test)
        np.testing.assert_allclose(values[:, 1], expected[:, 1], rtol=1e-9, atol=1e-14)
        assert (diagnostics["trunk"]["split"] is not None) == split, (loss_fn, diagnostics["trunk"])
        assert (diagnostics["readout"]["cut_after"] is not None) == cut, (loss_fn, diagnostics["readout"])
        assert ("changes the model's outputs that a loss_fn or measurement_fn of one's own reads" in caplog.text
                ) == (not split)
    # the outputs a split leaves out (the attentions of the layers below it) or pads (a multiple-choice model's
    # flattened choices) count only where the function reads them (a review: both split refused for a loss reading
    # the logits, or the last hidden state, alone)
    from transformers import BertConfig, BertForMultipleChoice

    def last_state(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") + 0.1 * (
            outputs.hidden_states[-1][:, 0] ** 2).sum(-1).reshape(len(batch["labels"]), -1).sum(-1)

    def attention_below(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") + outputs.attentions[0].sum((1, 2, 3))

    model.config.output_attentions = True
    torch.manual_seed(0)
    choice = BertForMultipleChoice(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=32, max_position_embeddings=32,
                                              output_hidden_states=True, attn_implementation="eager")).double().eval()
    for net, rows, loss_fn, kept in ((model, train, reads_the_logits, True), (model, train, attention_below, False),
                                     (choice, _multiple_choice_data(12, seed=0), last_state, True),
                                     (choice, _multiple_choice_data(12, seed=0), reads(0), False)):
        names = list(select_parameters(net, TOP["bert"]))
        batcher = Batcher(rows, validate_dataset(rows, "train", net), pad_collator if net is model else None, "cpu")
        split, reason = T.find_split(net, names, T.model_inputs(batcher.batch(range(4), trunk=False)))
        cache = T.TrunkCache(split, batcher, key="k", batch_size=4)
        error = T.verify_split(split, cache, batcher, range(len(batcher)), reads=loss_fn)
        assert (error <= T.split_tolerance(net)) == kept, (loss_fn.__name__, error)


def test_a_held_engine_finds_its_split_again_after_the_stack_is_replaced_or_a_hook_removed(pad_collator):
    """A held engine kept its split by the parameters' names alone: after ``model.bert.encoder.layer = new stack``
    (same names) its capture hook sat on the old stack ("The forward never reached bert.encoder.layer.1"); and a
    split dropped while a hook below it made the top-only forward differ stayed dropped after the hook was removed
    (every later forward the whole model's). Each call equals a fresh engine's, with the split where one has it."""
    import copy

    model = tiny_model("bert", num_labels=3)
    train, test = make_token_dataset(16, seed=0, num_labels=3), make_token_dataset(2, seed=1, num_labels=3)
    args = InfluenceArguments(output_dir="unused", influence_params=TOP["bert"], influence_solver="lissa",
                              influence_recursion_depth=10, influence_scale=100.0, disable_tqdm=True,
                              influence_check_convergence=False, influence_knn_k=None)
    engine = InfluenceEngine(model, args, data_collator=pad_collator)

    def agrees_with_a_fresh_engine(split):
        held, fresh = (e.compute_influences(train, test) for e in (engine, InfluenceEngine(model, args,
                                                                                          data_collator=pad_collator)))
        assert held.metadata["diagnostics"]["trunk"]["split"] == split
        np.testing.assert_allclose(held.to_pandas().sort_values(["test_id", "train_id"]).influence,
                                   fresh.to_pandas().sort_values(["test_id", "train_id"]).influence, rtol=1e-9)
        return held.metadata["diagnostics"]["trunk"]

    agrees_with_a_fresh_engine("bert.encoder.layer.1")
    stack = copy.deepcopy(model.bert.encoder.layer)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.bert.encoder.layer = stack
    agrees_with_a_fresh_engine("bert.encoder.layer.1")
    # a hook that runs twice under the top-only forward (once in the cached states, once as the layer returns them)
    hook = model.bert.encoder.layer[0].register_forward_hook(lambda m, i, out: tuple(o * 1.5 if torch.is_tensor(o)
                                                                                    else o for o in out)
                                                            if isinstance(out, tuple) else out * 1.5)
    assert "top-only logits differ" in engine.compute_influences(train, test).metadata["diagnostics"]["trunk"]["reason"]
    hook.remove()
    agrees_with_a_fresh_engine("bert.encoder.layer.1")
