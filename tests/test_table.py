"""InfluenceTable: ordering, queries, save/load round trip, and refusal of broken tables."""

import json

import numpy as np
import pytest
from datasets import Dataset

from hf_fastif import InfluenceTable


def make_table(n_test=3, n_train=50, seed=0):
    rng = np.random.default_rng(seed)
    test = np.repeat(np.arange(n_test), n_train)
    train = np.tile(np.arange(n_train), n_test)
    return InfluenceTable.from_arrays(test, train, rng.normal(size=n_test * n_train),
                                      {"settings": {"influence_solver": "cg"}})


def test_helpful_and_harmful_are_the_extremes():
    table = make_table()
    df = table.to_pandas()
    for t in range(3):
        rows = df[df.test_id == t]
        assert table.helpful(t, 5).influence.tolist() == sorted(rows.influence)[:5]
        assert table.harmful(t, 5).influence.tolist() == sorted(rows.influence, reverse=True)[:5]
    with pytest.raises(KeyError, match="test_id 9 is not in this table"):
        table.helpful(9)


def test_save_load_round_trip_with_shards_and_text(tmp_path):
    table = make_table()
    train = Dataset.from_dict({"premise": [f"p{i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    table = table.add_text(train_dataset=train)
    table.save(tmp_path / "t", shard_rows=40)
    assert len(list((tmp_path / "t" / "data").glob("*.parquet"))) == 4
    loaded = InfluenceTable.load(tmp_path / "t")
    assert loaded.metadata == table.metadata
    assert loaded.to_pandas().equals(table.to_pandas())
    top = loaded.helpful(1, 2)
    assert top.train_premise.tolist() == [f"p{i}" for i in top.train_id]
    card = (tmp_path / "t" / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0") and "path: data/*.parquet" in card


def test_broken_tables_are_refused(tmp_path):
    make_table().save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "influence_metadata.json").read_text())
    meta["schema_version"] = 99
    (tmp_path / "t" / "influence_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="schema version 99"):
        InfluenceTable.load(tmp_path / "t")
    with pytest.raises(ValueError, match="not an influence table"):
        InfluenceTable.load(tmp_path)
    with pytest.raises(ValueError, match="missing \\['influence'\\]"):
        InfluenceTable(Dataset.from_dict({"test_id": [0], "train_id": [1]}))
    make_table().save(tmp_path / "c")
    shard = next((tmp_path / "c" / "data").glob("*.parquet"))
    shard.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="corrupt"):
        InfluenceTable.load(tmp_path / "c")
