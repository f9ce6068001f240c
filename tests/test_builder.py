"""Resumable builds: an interrupted build resumes and ends with exactly the uninterrupted table."""

import numpy as np
import pytest

import hf_fastif.builder as builder
from hf_fastif import build_influence_table
from hf_fastif.influence import default_arguments
from tests.tiny import make_token_dataset, tiny_model

ARGS = dict(influence_solver="lissa", influence_damping=0.05, influence_scale=20.0, influence_recursion_depth=10,
            influence_batch_size=2, influence_repetitions=2, influence_knn_k=6,
            influence_params=[r"pooler\.", r"classifier\."], disable_tqdm=True)


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
    real = builder.compute_influences

    def dies_after_two(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed half-way")
        return real(*a, **kw)

    monkeypatch.setattr(builder, "compute_influences", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_influence_table(model, train, test, tmp_path / "resumed", args, shard_size=2, data_collator=pad_collator)
    assert sorted(p.name for p in (tmp_path / "resumed" / "shards").glob("*.parquet")) == \
        ["shard-00000.parquet", "shard-00001.parquet"]
    assert not list((tmp_path / "resumed" / "shards").glob("*.tmp"))

    calls["n"] = -100
    resumed = build_influence_table(model, train, test, tmp_path / "resumed", args, shard_size=2,
                                    data_collator=pad_collator)
    assert calls["n"] == -100 + 2  # only the two missing shards were computed
    assert resumed.metadata["build"]["resumed_shards"] == 2
    a, b = full.to_pandas(), resumed.to_pandas()
    np.testing.assert_array_equal(a.test_id, b.test_id)
    np.testing.assert_array_equal(a.train_id, b.train_id)
    np.testing.assert_array_equal(a.influence, b.influence)
    from hf_fastif import InfluenceTable

    assert InfluenceTable.load(tmp_path / "resumed" / "table").to_pandas().equals(b)


def test_a_build_directory_of_other_settings_is_refused(setup, pad_collator, tmp_path):
    model, train, test = setup
    small = test.select(range(2))
    build_influence_table(model, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                          data_collator=pad_collator)
    with pytest.raises(ValueError, match="different settings"):
        build_influence_table(model, train, small, tmp_path, default_arguments(**(ARGS | {"influence_seed": 1})),
                              shard_size=2, data_collator=pad_collator)
    with pytest.raises(ValueError, match="different test"):
        build_influence_table(model, train, test.select(range(3)), tmp_path, default_arguments(**ARGS),
                              shard_size=2, data_collator=pad_collator)
    other = tiny_model("bert", seed=5)
    with pytest.raises(ValueError, match="different model"):
        build_influence_table(other, train, small, tmp_path, default_arguments(**ARGS), shard_size=2,
                              data_collator=pad_collator)
