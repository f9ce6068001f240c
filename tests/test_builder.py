"""Resumable builds: an interrupted build resumes and ends with exactly the uninterrupted table."""

import copy
import json
import logging
import os
import shutil

import numpy as np
import pytest
from datasets import Dataset

import hf_fastif.builder as builder
from hf_fastif import DamagedShardError, InfluenceTable, build_influence_table, compute_influences
from hf_fastif.influence import default_arguments
from tests.tiny import HEAD_ONLY, make_token_dataset, tiny_model

ARGS = dict(influence_solver="lissa", influence_damping=0.05, influence_scale=20.0, influence_recursion_depth=10,
            influence_batch_size=2, influence_repetitions=2, influence_knn_k=6,
            influence_params=HEAD_ONLY["bert"], disable_tqdm=True)


@pytest.fixture(scope="module")
def setup():
    return tiny_model("bert"), make_token_dataset(30, seed=0), make_token_dataset(7, seed=1)


def test_interrupted_build_resumes_to_the_same_table(setup, pad_collator, tmp_path, monkeypatch):
    model, train, test = setup
    args = default_arguments(**ARGS)
    full = build_influence_table(model, train, test, tmp_path / "full", args, shard_size=2,
                                 data_collator=pad_collator)
    assert full.test_ids == list(range(7)) and len(full) == 7 * 6

    calls = {"n": 0}
    real = builder.InfluenceEngine.compute_influences

    def dies_after_two(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed half-way")
        return real(*a, **kw)

    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_influence_table(model, train, test, tmp_path / "resumed", args, shard_size=2, data_collator=pad_collator)
    shards = tmp_path / "resumed" / "shards"
    assert sorted(p.parent.name for p in shards.glob("*/influence_metadata.json")) == ["shard-00000", "shard-00001"]
    assert not list(shards.rglob("*.tmp")) and not list(shards.rglob(".partial*"))

    calls["n"] = -100
    resumed = build_influence_table(model, train, test, tmp_path / "resumed", args, shard_size=2,
                                    data_collator=pad_collator)
    assert calls["n"] == -100 + 2  # only the two missing shards were computed
    assert resumed.metadata["build"]["resumed_shards"] == 2
    a, b = full.to_pandas(), resumed.to_pandas()
    np.testing.assert_array_equal(a.test_id, b.test_id)
    np.testing.assert_array_equal(a.train_id, b.train_id)
    np.testing.assert_array_equal(a.influence, b.influence)
    assert InfluenceTable.load(tmp_path / "resumed" / "table").to_pandas().equals(b)


def test_a_build_resumes_on_the_same_rows_held_in_other_arrow_chunks(setup, pad_collator, tmp_path, monkeypatch):
    """The rows' hash read Arrow's chunking: the same rows reloaded with load_from_disk (several chunks) or joined with
    concatenate_datasets were "another build", and the finished shards were thrown away."""
    from datasets import concatenate_datasets, load_from_disk

    from hf_fastif.fingerprint import dataset_fingerprint

    model, train, test = setup
    args = default_arguments(**ARGS)
    first = build_influence_table(model, train, test, tmp_path / "build", args, shard_size=2,
                                  data_collator=pad_collator).to_pandas()  # read before the rerun writes table/ anew
    train.save_to_disk(tmp_path / "saved", max_shard_size="1KB")
    reloaded = load_from_disk(tmp_path / "saved")
    assert reloaded.data.column(0).num_chunks > 1  # held otherwise than the original
    joined = concatenate_datasets([test.select(range(3)), test.select(range(3, 7))])
    perm = np.random.default_rng(0).permutation(len(train))
    assert dataset_fingerprint(train.select(perm)) == dataset_fingerprint(train.select(perm).flatten_indices())
    assert dataset_fingerprint(train.select(range(1, 30))) == dataset_fingerprint(
        Dataset.from_list(train.select(range(1, 30)).to_list()))
    assert dataset_fingerprint(train.select(perm)) != dataset_fingerprint(train)  # order still counts
    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", _no_work)
    again = build_influence_table(model, reloaded, joined, tmp_path / "build", args, shard_size=2,
                                  data_collator=pad_collator)
    assert again.metadata["build"]["resumed_shards"] == 4
    assert again.to_pandas().equals(first)


def _no_work(*args, **kwargs):
    raise AssertionError("a shard was computed again")


def test_a_build_directory_of_other_settings_is_refused(setup, pad_collator, tmp_path):
    model, train, test = setup
    small = test.select(range(2))
    build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                          data_collator=pad_collator)
    with pytest.raises(ValueError, match=r"another build \(settings.influence_seed: 42 in the manifest, 1 now"):
        build_influence_table(model, train, small, tmp_path, default_arguments(**(ARGS | {"influence_seed": 1})),
                              shard_size=2, data_collator=pad_collator)
    with pytest.raises(ValueError, match=r"another build \(test.num_rows: 2 in the manifest, 3 now"):
        build_influence_table(model, train, test.select(range(3)), tmp_path, default_arguments(**ARGS),
                              shard_size=2, data_collator=pad_collator)
    other = tiny_model("bert", seed=5)
    with pytest.raises(ValueError, match=r"another build \(model.fingerprint: "):
        build_influence_table(other, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                              data_collator=pad_collator)
    manifest = tmp_path / builder.MANIFEST  # a build by an older hf_fastif (version 3: shards not tagged)
    recorded = json.loads(manifest.read_text())
    recorded["signature"]["manifest_version"] = 3
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="made by an older hf_fastif.*Use a new output_dir"):
        build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                              data_collator=pad_collator)


def test_a_refusal_names_each_differing_setting_with_both_values(setup, pad_collator, tmp_path):
    model, train, test = setup
    small = test.select(range(2))
    build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                          data_collator=pad_collator)
    other = default_arguments(**(ARGS | {"influence_damping": 0.5, "influence_scoring_batch_size": 3}))
    with pytest.raises(ValueError) as refused:
        build_influence_table(model, train, small, tmp_path, other, shard_size=2, data_collator=pad_collator)
    message = str(refused.value)
    assert "another build (settings.influence_damping: 0.05 in the manifest, 0.5 now; " in message
    assert "settings.influence_lambda: 1.0 in the manifest, 10.0 now)" in message
    assert "scoring_batch_size" not in message  # a run-time setting: not a different build


def test_a_resume_with_other_run_time_settings_reuses_the_finished_shards(setup, pad_collator, tmp_path,
                                                                          monkeypatch):
    model, train, test = setup
    small = test.select(range(4))
    first = build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                                  data_collator=pad_collator).to_pandas()  # read now: the rerun writes table/ anew
    kept = tmp_path / "shards" / "shard-00000" / "influence_metadata.json"
    written = kept.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "shards" / "shard-00001")  # as if interrupted there
    calls = {"n": 0}
    real = builder.InfluenceEngine.compute_influences

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", counted)
    runtime = {"influence_scoring_batch_size": 1, "influence_hvp_batch_size": 3,
               "influence_cache_dir": str(tmp_path / "cache")}
    resumed = build_influence_table(model, train, small, tmp_path, default_arguments(**(ARGS | runtime)),
                                    shard_size=2, data_collator=pad_collator)
    assert calls["n"] == 1 and resumed.metadata["build"]["resumed_shards"] == 1
    assert kept.stat().st_mtime_ns == written
    a, b = (t.sort_values(["test_id", "train_id"]) for t in (first, resumed.to_pandas()))
    np.testing.assert_array_equal(a.train_id, b.train_id)
    np.testing.assert_allclose(a.influence, b.influence, rtol=1e-9, atol=1e-12)  # float rounding at most


def test_a_build_computes_what_does_not_depend_on_the_test_rows_once(setup, pad_collator, tmp_path, monkeypatch):
    """Each shard ran a fresh engine: a build of 8 shards made the low-rank Hessian and the gradient index 8 times
    (7x the time of one engine); one engine serves every shard now, with the same table as separate calls."""
    import hf_fastif.engine as engine_module
    from hf_fastif import compute_influences

    model, train, test = setup
    args = default_arguments(**(ARGS | {"influence_solver": "arnoldi", "influence_arnoldi_rank": 8,
                                        "influence_knn_k": 4, "influence_knn_features": "gradient",
                                        "influence_projection_dim": 16}))
    built = {"low_rank": 0, "index": 0}
    real_low_rank, real_index = engine_module.s_test.low_rank_hessian, engine_module.candidates.build_gradient_index

    def low_rank(*a, **kw):
        built["low_rank"] += 1
        return real_low_rank(*a, **kw)

    def index(*a, **kw):
        built["index"] += 1
        return real_index(*a, **kw)

    monkeypatch.setattr(engine_module.s_test, "low_rank_hessian", low_rank)
    monkeypatch.setattr(engine_module.candidates, "build_gradient_index", index)
    table = build_influence_table(model, train, test, tmp_path, args, shard_size=2, data_collator=pad_collator)
    assert table.metadata["build"]["shards"] == 4 and built == {"low_rank": 1, "index": 1}
    alone = compute_influences(model, train, test.select(range(2, 4)), args, data_collator=pad_collator).to_pandas()
    part = table.to_pandas()
    part = part[part.test_id.isin([2, 3])].sort_values(["test_id", "train_id"])
    alone = alone.sort_values(["test_id", "train_id"])
    np.testing.assert_array_equal(part.train_id, alone.train_id)
    np.testing.assert_allclose(part.influence, alone.influence, rtol=1e-9, atol=1e-12)


def test_shards_of_another_build_are_computed_again_after_the_manifest_is_deleted(setup, pad_collator, tmp_path,
                                                                                 caplog):
    model, train, test = setup
    small = test.select(range(4))
    build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                          data_collator=pad_collator)
    (tmp_path / builder.MANIFEST).unlink()  # the way past the refusal
    other = default_arguments(**(ARGS | {"influence_damping": 0.5}))
    with caplog.at_level(logging.WARNING, logger="hf_fastif.builder"):
        rebuilt = build_influence_table(model, train, small, tmp_path, other, shard_size=2,
                                        data_collator=pad_collator)
    assert rebuilt.metadata["build"]["resumed_shards"] == 0
    for shard in ("shard-00000", "shard-00001"):
        assert f"Computing {tmp_path / 'shards' / shard} again: it was computed for another build" in caplog.text
    fresh = compute_influences(model, train, small, other, data_collator=pad_collator)
    a, b = (t.to_pandas().sort_values(["test_id", "train_id"]) for t in (fresh, rebuilt))
    np.testing.assert_array_equal(a.test_id, b.test_id)
    np.testing.assert_array_equal(a.train_id, b.train_id)
    np.testing.assert_allclose(a.influence, b.influence, rtol=1e-9, atol=1e-12)


def scaled_loss(weight: float):
    """A per-example cross-entropy times ``weight`` (a closure: equal code, different constant)."""
    import torch.nn.functional as F

    def loss(outputs, batch):
        return weight * F.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    return loss


def truncating(collator, length: int):
    """``collator`` after cutting every row to ``length`` tokens."""
    def collate(rows):
        return collator([{k: v if k == "labels" else v[:length] for k, v in row.items()} for row in rows])

    return collate


def embedding_features(model, batch):
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (the padding left out: one that reads it is refused)
    return (model.bert.embeddings.word_embeddings(batch["input_ids"]) * mask).sum(1) / mask.sum(1)


def test_the_manifest_refuses_whatever_changes_the_numbers(pad_collator, tmp_path, monkeypatch):
    """Edits anywhere in the data, another collator, loss_fn, measurement_fn or features callable: refused on
    resume with the fix; the same data and callables rebuilt from scratch (new objects): resumed."""
    model = tiny_model("bert")
    train, test = make_token_dataset(40, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**ARGS)
    same = dict(data_collator=pad_collator, loss_fn=scaled_loss(1.0), measurement_fn=scaled_loss(1.0),
                features=embedding_features)
    first = build_influence_table(model, train, test, tmp_path, args, shard_size=2, **same).to_pandas()

    def never(*a, **kw):
        raise AssertionError("a finished shard was computed again")

    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", never)
    rebuilt = dict(data_collator=type(pad_collator)(pad_collator.tokenizer), loss_fn=scaled_loss(1.0),
                   measurement_fn=scaled_loss(1.0), features=embedding_features)  # equal, not the same objects
    again = build_influence_table(model, train.add_column("note", ["unread"] * 40), test, tmp_path, args,
                                  shard_size=2, **rebuilt)
    assert again.metadata["build"]["resumed_shards"] == 1 and again.to_pandas().equals(first)

    rows = train.to_dict()
    rows["input_ids"][20] = [rows["input_ids"][20][0], *[5 + (t - 4) % 55 for t in rows["input_ids"][20][1:]]]
    edited = Dataset.from_dict(rows)  # one row in the middle, beyond the first and last 16
    left = type(pad_collator)(copy.deepcopy(pad_collator.tokenizer))
    left.tokenizer.padding_side = "left"
    changes = [
        ("train", dict(train_dataset=edited)),
        ("data_collator", dict(data_collator=truncating(pad_collator, 4))),
        ("data_collator", dict(data_collator=left)),  # the same collator class over a tokenizer padding left
        ("loss_fn", dict(loss_fn=scaled_loss(2.0))),
        ("measurement_fn", dict(measurement_fn=scaled_loss(2.0))),
        ("features", dict(features=lambda model, batch: embedding_features(model, batch) * 2)),
    ]
    for entry, change in changes:
        kwargs = same | {k: v for k, v in change.items() if k != "train_dataset"}
        with pytest.raises(ValueError, match=f"another build \\(.*\\b{entry}\\b.*Use a new output_dir"):
            build_influence_table(model, change.get("train_dataset", train), test, tmp_path, args, shard_size=2,
                                  **kwargs)


def test_a_damaged_shard_is_computed_again_and_unknown_keywords_are_refused(setup, pad_collator, tmp_path):
    model, train, test = setup
    args = default_arguments(**ARGS)
    small = test.select(range(4))
    full = build_influence_table(model, train, small, tmp_path, args, shard_size=2, data_collator=pad_collator)
    full = full.to_pandas()  # read now: the rebuild writes table/ anew
    shard = next((tmp_path / "shards" / "shard-00001" / "data").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, so only the sha256 check can tell
    shard.write_bytes(bytes(data))
    rebuilt = build_influence_table(model, train, small, tmp_path, args, shard_size=2, data_collator=pad_collator)
    assert rebuilt.metadata["build"]["resumed_shards"] == 1
    assert rebuilt.to_pandas().equals(full)
    # the assembled table's shard truncated: a rerun with the same settings writes the same rows under the same name,
    # which the save kept as "saved before", so every rerun failed on it (a review's repro)
    table_shard = next((tmp_path / "table" / "data").glob("*.parquet"))
    os.truncate(table_shard, 100)
    with pytest.raises(DamagedShardError):
        InfluenceTable.load(tmp_path / "table")
    again = build_influence_table(model, train, small, tmp_path, args, shard_size=2, data_collator=pad_collator)
    assert again.to_pandas().equals(full) and InfluenceTable.load(tmp_path / "table").to_pandas().equals(full)
    with pytest.raises(TypeError, match="unknown keyword arguments \\['collator'\\]"):
        build_influence_table(model, train, small, tmp_path, args, shard_size=2, collator=pad_collator)


def test_the_signature_records_the_repetitions_a_build_runs(setup, monkeypatch):
    """With influence_repetitions=None LiSSA runs one repetition per process: resuming under another number of
    processes would mix shards of other T, so the signature records the T used."""
    model, train, test = setup
    per_process = default_arguments(**(ARGS | {"influence_repetitions": None}))
    one = builder.build_signature(model, train, test, per_process, 2)
    monkeypatch.setattr(builder.D, "world", lambda: (0, 4))
    four = builder.build_signature(model, train, test, per_process, 2)
    assert (one["repetitions_used"], four["repetitions_used"]) == (1, 4)
    fixed = default_arguments(**ARGS)
    assert builder.build_signature(model, train, test, fixed, 2)["repetitions_used"] == 2



def test_a_per_process_build_resumed_with_other_processes_says_how_many(setup, pad_collator, tmp_path):
    """It said "run it with the manifest's values", which no setting can do (influence_repetitions=2 is another
    build too): T was the number of processes, and the message now says to launch that many."""
    model, train, test = setup
    per_process = default_arguments(**(ARGS | {"influence_repetitions": None, "influence_knn_k": None}))
    build_influence_table(model, train, test.select(range(2)), tmp_path, per_process, shard_size=2,
                          data_collator=pad_collator)
    manifest = json.loads((tmp_path / builder.MANIFEST).read_text())
    manifest["signature"]["repetitions_used"] = 2  # as a 2-process launch writes it
    (tmp_path / builder.MANIFEST).write_text(json.dumps(manifest))
    test = test.select(range(2))
    with pytest.raises(ValueError, match=r"repetitions_used: 2 in the manifest, 1 now\); results would be mixed\. "
                                         r"To resume that build, launch it with 2 processes"):
        build_influence_table(model, train, test, tmp_path, per_process, shard_size=2, data_collator=pad_collator)


def test_a_damaged_manifest_is_named_or_replaced_where_no_shard_depends_on_it(setup, pad_collator, tmp_path):
    """An empty or cut-short build_manifest.json (a crash between write and flush) stopped a build with a bare
    "Expecting value: line 1 column 1": it is named, with what to do, where shards lie beside it, and replaced with
    a warning where none does (nothing to keep apart)."""
    model, train, test = setup
    test = test.select(range(2))
    args = default_arguments(**(ARGS | {"influence_knn_k": None}))
    build_influence_table(model, train, test, tmp_path, args, shard_size=1, data_collator=pad_collator)
    manifest = tmp_path / builder.MANIFEST
    for damaged in ("", '{"signature": {"cut', "[1, 2]"):
        manifest.write_text(damaged)
        with pytest.raises(ValueError, match=f"{manifest} (cannot be read as|is not) a build's manifest.*Delete that "
                                             "file and run the build again: .* the shards of this build are kept"):
            build_influence_table(model, train, test, tmp_path, args, shard_size=1, data_collator=pad_collator)
    manifest.unlink()  # as the message says: the two shards are this build's, and resumed
    computed = []
    real = builder._write_shard
    builder_write = lambda *a: computed.append(a) or real(*a)  # noqa: E731
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(builder, "_write_shard", builder_write)
        resumed = build_influence_table(model, train, test, tmp_path, args, shard_size=1, data_collator=pad_collator)
    assert not computed and resumed.metadata["build"]["resumed_shards"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / builder.MANIFEST).write_text("")
    table = build_influence_table(model, train, test, empty, args, shard_size=1, data_collator=pad_collator)
    assert len(table.test_ids) == 2 and json.loads((empty / builder.MANIFEST).read_text())["signature"]


def test_a_second_build_into_a_folder_another_is_writing_is_refused_at_once(setup, pad_collator, tmp_path,
                                                                            monkeypatch):
    """Two builds into one output_dir at a time each wrote the manifest and every shard over the other's, and one
    failed only at assembly with all its work lost. A build holds the folder's lock from start to end."""
    from filelock import FileLock

    from hf_fastif.utils import BUILD_LOCK

    model, train, test = setup
    test = test.select(range(2))
    args = default_arguments(**(ARGS | {"influence_knn_k": None}))
    computed = []
    monkeypatch.setattr(builder, "_write_shard", lambda *a: computed.append(a))
    with FileLock(str(tmp_path / BUILD_LOCK)):
        with pytest.raises(ValueError, match=f"Another build is writing {tmp_path} now: wait for it to end"):
            build_influence_table(model, train, test, tmp_path, args, shard_size=1, data_collator=pad_collator)
    assert not computed and not (tmp_path / builder.MANIFEST).exists()
    monkeypatch.undo()
    table = build_influence_table(model, train, test, tmp_path, args, shard_size=1, data_collator=pad_collator)
    assert len(table.test_ids) == 2


def test_parameters_selected_by_requires_grad_are_part_of_the_build(pad_collator, tmp_path):
    """influence_params=None selects what requires grad, which the weights' fingerprint does not see: a build
    resumed after more of the model was unfrozen (a model loaded again with from_pretrained) mixed shards over 34
    and over 306 parameters, 0.02 apart. It is refused, naming the entry."""
    model, train, test = tiny_model("bert"), make_token_dataset(20, seed=0), make_token_dataset(4, seed=1)
    args = default_arguments(**ARGS | {"influence_params": None})
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("classifier."))
    build_influence_table(model, train, test.select(range(2)), tmp_path, args, shard_size=2, data_collator=pad_collator)
    model.bert.pooler.dense.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"another build \(influence_parameters\.names_sha256: .*influence_parameters"
                                         r"\.tensors: 2 in the manifest, 3 now"):
        build_influence_table(model, train, test, tmp_path, args, shard_size=2, data_collator=pad_collator)


def test_a_build_that_fails_before_its_first_shard_leaves_no_manifest(setup, pad_collator, tmp_path, monkeypatch):
    """The first run's error asks for other settings (CG's negative curvature: raise the damping); its manifest,
    written before any work, refused the rerun that followed the advice. A run that computed nothing leaves none; a
    run that finished a shard keeps it, and its manifest."""
    model, train, test = setup
    args = default_arguments(**ARGS)
    calls = {"n": 0}
    real = builder.InfluenceEngine.compute_influences

    def fails_at(n):
        def compute(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] > n:
                raise ValueError("CG met negative curvature; raise influence_damping.")
            return real(self, *a, **kw)
        return compute

    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", fails_at(0))
    with pytest.raises(ValueError, match="negative curvature"):
        build_influence_table(model, train, test, tmp_path, args, shard_size=2, data_collator=pad_collator)
    assert not (tmp_path / builder.MANIFEST).exists()
    calls["n"] = 0
    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", fails_at(1))
    other = default_arguments(**ARGS | {"influence_damping": 0.5})  # the advice followed
    with pytest.raises(ValueError, match="negative curvature"):
        build_influence_table(model, train, test, tmp_path, other, shard_size=2, data_collator=pad_collator)
    assert (tmp_path / builder.MANIFEST).is_file()  # a shard was computed: its build is kept
    with pytest.raises(ValueError, match="another build"):
        build_influence_table(model, train, test, tmp_path, args, shard_size=2, data_collator=pad_collator)


def test_shards_written_by_another_build_at_the_same_time_are_not_assembled(setup, pad_collator, tmp_path,
                                                                          monkeypatch):
    """Two builds into one folder at once, started within the same instant (both saw no manifest): each shard is
    tagged with its build's signature, and the assembly refuses shards of another, naming them."""
    model, train, test = setup
    args = default_arguments(**ARGS)
    small = test.select(range(4))
    build_influence_table(model, train, small, tmp_path / "other", default_arguments(**ARGS | {"influence_damping": 0.5}),
                          shard_size=2, data_collator=pad_collator)
    real = builder._write_shard

    def and_the_other_build(table, folder, *a):
        real(table, folder, *a)
        if folder.name == "shard-00001":  # the other run's shard lands over this one's
            shutil.rmtree(folder)
            shutil.copytree(tmp_path / "other" / "shards" / "shard-00001", folder)

    monkeypatch.setattr(builder, "_write_shard", and_the_other_build)
    with pytest.raises(builder.InfluenceTableError, match=r"Shards \[1\] of .* were computed for another build"):
        build_influence_table(model, train, small, tmp_path / "mine", args, shard_size=2, data_collator=pad_collator)
    assert not (tmp_path / "mine" / "table").exists()

    # the other build's shard lands after the check (the assembly loaded every shard again from disk, and took it):
    # the parts checked, whose files are open, are what is assembled
    monkeypatch.setattr(builder, "_write_shard", real)
    clean = build_influence_table(model, train, small, tmp_path / "clean", args, shard_size=2,
                                  data_collator=pad_collator).to_pandas()
    merge = builder._merge_non_finite

    def landing_after_the_check(metadata, parts):
        merge(metadata, parts)
        folder = tmp_path / "late" / "shards" / "shard-00001"
        shutil.rmtree(folder)
        shutil.copytree(tmp_path / "other" / "shards" / "shard-00001", folder)

    monkeypatch.setattr(builder, "_merge_non_finite", landing_after_the_check)
    late = build_influence_table(model, train, small, tmp_path / "late", args, shard_size=2, data_collator=pad_collator)
    assert late.to_pandas().equals(clean)


def test_a_model_whose_code_changed_is_another_build(pad_collator, tmp_path, monkeypatch):
    """The manifest recorded the weights and the config but not the model's code: a trust_remote_code model whose
    modeling file was edited (here: its logits scaled) resumed the old code's shards (80% off a fresh build). The
    code is part of the build now (classes from outside torch / transformers, and the transformers version)."""
    import importlib
    import sys

    from transformers import BertForSequenceClassification

    source = ("from transformers import BertForSequenceClassification\n"
              "SCALE = {scale}\n\n\n"
              "class Scaled(BertForSequenceClassification):\n"
              "    def forward(self, *args, **kwargs):\n"
              "        out = super().forward(*args, **kwargs)\n"
              "        out.logits = out.logits * SCALE\n"
              "        return out\n")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "scaled_head.py").write_text(source.format(scale=1.0))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    module = importlib.import_module("scaled_head")
    weights = tiny_model("bert")
    model = module.Scaled(weights.config)
    model.load_state_dict(weights.state_dict())
    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = default_arguments(**ARGS | {"influence_solver": "cg", "influence_knn_k": None})
    build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2, data_collator=pad_collator)
    (tmp_path / "code" / "scaled_head.py").write_text(source.format(scale=3.0))
    module = importlib.reload(module)
    edited = module.Scaled(weights.config)
    edited.load_state_dict(weights.state_dict())
    with pytest.raises(ValueError, match=r"another build \(model\.code\.classes\.scaled_head\.Scaled: "):
        build_influence_table(edited, train, test, tmp_path / "out", args, shard_size=2, data_collator=pad_collator)
    sys.modules.pop("scaled_head", None)
    plain = BertForSequenceClassification(weights.config)
    plain.load_state_dict(weights.state_dict())
    signature = builder.build_signature(plain, train, test, args, 2)
    assert signature["model"]["code"]["classes"] == {} and signature["model"]["code"]["transformers"]


@pytest.mark.parametrize("bad", ["label", "token"])
def test_a_bad_test_row_is_named_by_its_row_before_any_shard(setup, pad_collator, tmp_path, bad):
    """Each shard's rows were checked as a dataset of their own: a bad row 3 was "test_dataset row 1" (its place in
    the second shard), found once the first shard had been computed and written."""
    model, train, test = setup
    frame = test.to_pandas()
    if bad == "label":
        frame.loc[3, "labels"] = -100
    else:
        frame.at[3, "input_ids"] = [*frame.at[3, "input_ids"][:-1], model.config.vocab_size + 5]
    broken = Dataset.from_pandas(frame, preserve_index=False)
    with pytest.raises(ValueError, match=r"test_dataset row 3\b"):
        build_influence_table(model, train, broken, tmp_path, default_arguments(**ARGS), shard_size=2,
                              data_collator=pad_collator)
    assert not (tmp_path / "shards").exists() and not (tmp_path / builder.MANIFEST).exists()


@pytest.mark.parametrize("where", ["output_dir", "table", "shards"])
def test_an_output_dir_it_cannot_write_is_refused_before_any_shard(where, setup, pad_collator, tmp_path, monkeypatch):
    """A file at ``output_dir/table`` failed with "Not a directory" once every shard was computed."""
    model, train, test = setup
    out = tmp_path / "build"
    if where == "output_dir":
        out.write_text("")
    else:
        out.mkdir()
        (out / where).write_text("")

    def no_work(*args, **kwargs):
        raise AssertionError("a shard was computed")

    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", no_work)
    match = "is an existing file, not a folder" if where == "output_dir" else f"the build writes its {where} folder"
    with pytest.raises(ValueError, match=match):
        build_influence_table(model, train, test, out, default_arguments(**ARGS), shard_size=2,
                              data_collator=pad_collator)


def test_the_manifest_of_a_run_killed_before_its_first_shard_is_replaced(setup, pad_collator, tmp_path, caplog):
    """A run killed before its first shard (SIGTERM: no exception removed its manifest) refused the rerun with other
    settings as "another build", though it had computed nothing; a manifest whose build computed a shard still
    refuses."""
    model, train, test = setup
    small = test.select(range(2))
    builder._check_or_write_manifest(tmp_path, {"manifest_version": builder.MANIFEST_VERSION, "what": "a killed run"})
    assert (tmp_path / builder.MANIFEST).is_file() and not list((tmp_path / "shards").iterdir())
    with caplog.at_level(logging.WARNING, logger="hf_fastif.builder"):
        table = build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                                      data_collator=pad_collator)
    assert "computed no shard; this build replaces it" in caplog.text and len(table) == 2 * 6
    assert "a killed run" not in (tmp_path / builder.MANIFEST).read_text()
    with pytest.raises(ValueError, match=r"another build \(settings.influence_seed: 42 in the manifest, 1 now"):
        build_influence_table(model, train, small, tmp_path, default_arguments(**(ARGS | {"influence_seed": 1})),
                              shard_size=2, data_collator=pad_collator)


def test_a_finished_build_in_a_folder_it_cannot_write_is_served_reading_only(setup, pad_collator, tmp_path,
                                                                            monkeypatch, caplog, propagating):
    """Run again over a read-only folder (a mounted copy), a finished build failed at its lock file, though its table
    needed no write; a build of other settings there is still the OSError."""
    import errno

    from hf_fastif.utils import write_error

    model, train, test = setup
    out = tmp_path / "build"
    built = build_influence_table(model, train, test, out, default_arguments(**ARGS), shard_size=3,
                                  data_collator=pad_collator)

    def read_only(directory):
        raise write_error(directory / "lock", OSError(errno.EROFS, "Read-only file system"))

    def no_work(*args, **kwargs):
        raise AssertionError("a shard was computed")

    monkeypatch.setattr(builder, "hold_build_lock", read_only)
    monkeypatch.setattr(builder.InfluenceEngine, "compute_influences", no_work)
    with caplog.at_level(logging.WARNING, logger="hf_fastif.builder"):
        served = build_influence_table(model, train, test, out, default_arguments(**ARGS), shard_size=3,
                                       data_collator=pad_collator)
    assert served.to_pandas().equals(built.to_pandas()) and "served as it is, reading only" in caplog.text
    with pytest.raises(OSError, match="Read-only file system"):
        build_influence_table(model, train, test, out, default_arguments(**ARGS | {"influence_damping": 0.1}),
                              shard_size=3, data_collator=pad_collator)


def test_the_same_rows_in_another_format_are_another_build(setup, pad_collator, tmp_path):
    """The build's signature hashed the stored values only, where the engine's caches hash the format too: the same
    rows formatted as numpy (float64 labels reach the collator) or handing out fewer columns resumed a build of the
    plain rows, mixing shards computed from other batches."""
    model, train, test = setup
    args = default_arguments(**ARGS)
    plain = builder.build_signature(model, train, test, args, 2)
    for formatted in (train.with_format("numpy"), train.with_format(columns=["input_ids", "labels"])):
        assert builder.build_signature(model, formatted, test, args, 2)["train"] != plain["train"]
    build_influence_table(model, train, test.select(range(2)), tmp_path / "out", args, shard_size=1,
                          data_collator=pad_collator)
    with pytest.raises(ValueError, match=r"holds another build \(.*train"):
        build_influence_table(model, train.with_format("numpy"), test.select(range(2)), tmp_path / "out", args,
                              shard_size=1, data_collator=pad_collator)


@pytest.mark.parametrize("change", ["eps", "hook", "activation"])
def test_a_build_resumed_after_the_modules_state_changed_is_another_build(setup, pad_collator, tmp_path, change):
    """The manifest recorded the weights, config and code, not the modules' state the engine's caches key on: an
    ``eps`` set in place, a hook, an activation swapped between an interrupted run and its resume served the shards
    of the model before (2.32, 0.56 and 0.09 off a fresh build in a review). The same state resumes."""
    import torch

    model = copy.deepcopy(setup[0])
    train, test = setup[1], setup[2].select(range(4))
    args = default_arguments(**ARGS)
    first = build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2,
                                  data_collator=pad_collator).to_pandas()
    shutil.rmtree(tmp_path / "out" / "shards" / "shard-00001")
    shutil.rmtree(tmp_path / "out" / "table")
    again = build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2, data_collator=pad_collator)
    assert again.metadata["build"]["resumed_shards"] == 1  # (the same state, after the engine ran: resumed)
    np.testing.assert_array_equal(first.influence, again.to_pandas().influence)
    # a model trained with gradient checkpointing (the layers' flag, its input-gradient hook), resumed from one
    # loaded without: influence runs both alike (`influence_mode` turns them off), so it resumes
    shutil.rmtree(tmp_path / "out" / "shards" / "shard-00001")
    shutil.rmtree(tmp_path / "out" / "table")
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    again = build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2, data_collator=pad_collator)
    assert again.metadata["build"]["resumed_shards"] == 1
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()
    shutil.rmtree(tmp_path / "out" / "shards" / "shard-00001")
    shutil.rmtree(tmp_path / "out" / "table")
    layer = model.bert.encoder.layer[0]
    if change == "eps":
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 0.5
    elif change == "hook":
        layer.register_forward_hook(lambda module, inputs, out: (out[0] * 1.5, *out[1:]) if isinstance(out, tuple)
                                    else out * 1.5)
    else:
        layer.intermediate.intermediate_act_fn = torch.nn.Tanh()
    with pytest.raises(ValueError, match=r"holds another build \(model\.modules: .*restore them as they were"):
        build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2, data_collator=pad_collator)
