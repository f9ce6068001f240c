"""InfluenceTable: ordering, queries, save/load round trip, incremental writing, lazy loading, and refusal of
broken tables or another model."""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from hf_fastif import InfluenceTable
from hf_fastif.fingerprint import model_fingerprint
from hf_fastif.table import InfluenceTableError, InfluenceTableWriter, ModelMismatchError
from tests.helpers import sign_table


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
    assert loaded.metadata == table.metadata | {"license": "apache-2.0"}  # (the card's, recorded by the save)
    assert loaded.to_pandas().equals(table.to_pandas())
    top = loaded.helpful(1, 2)
    assert top.train_premise.tolist() == [f"p{i}" for i in top.train_id]
    card = (tmp_path / "t" / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0") and "path: data/*.parquet" in card


def save_killed_after_one_shard(monkeypatch, table: InfluenceTable, folder: Path) -> None:
    """``table.save(folder)`` as if the process were killed once its first shard (of 40 rows) was moved into place:
    the second move raises, and nothing cleans up."""
    import hf_fastif.table.storage as storage

    moves, replace = [], os.replace

    def killed(src, dst):
        if str(dst).endswith(".parquet"):
            if moves:
                raise KeyboardInterrupt("killed")
            moves.append(dst)
        return replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", killed)
    monkeypatch.setattr(storage.InfluenceTableWriter, "abort", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        table.save(folder, shard_rows=40)
    monkeypatch.undo()


def test_save_refuses_a_folder_of_other_files_and_keeps_them(tmp_path, monkeypatch):
    """Saving replaces ``data/*.parquet`` and ``README.md``: a saved dataset's folder (its parquet files, its card)
    lost them without a word. Such a folder is refused and left as it was; a table's folder, one whose save was
    interrupted (the card is there, the metadata is not) and a folder of unrelated files are fine."""
    table = make_table()
    plain = tmp_path / "plain"
    Dataset.from_dict({"a": [1, 2]}).to_parquet(str(plain / "data" / "validation-00000-of-00001.parquet"))
    (plain / "README.md").write_text("# my dataset\n")
    before = {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()}
    with pytest.raises(InfluenceTableError, match="not an influence table's .*validation-00000-of-00001.parquet"):
        table.save(plain)
    assert {p: p.read_bytes() for p in plain.rglob("*") if p.is_file()} == before
    table.save(tmp_path / "t", shard_rows=40)
    make_table(seed=1).save(tmp_path / "t", shard_rows=40)  # a table over a table: its shards replaced
    (tmp_path / "t" / "influence_metadata.json").unlink()  # as if that save had been interrupted
    table.save(tmp_path / "t")
    assert InfluenceTable.load(tmp_path / "t").to_pandas().equals(table.to_pandas())
    # a first save into a new folder, killed while its shards move into place: a new save there goes through
    save_killed_after_one_shard(monkeypatch, table, tmp_path / "killed")
    assert len(list((tmp_path / "killed" / "data").glob("train-*.parquet"))) == 1
    table.save(tmp_path / "killed", shard_rows=40)
    assert InfluenceTable.load(tmp_path / "killed").to_pandas().equals(table.to_pandas())
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    table.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "kept"
    # a project's own README that mentions the library is not a table's card (it was replaced by one)
    (tmp_path / "project" / "README.md").parent.mkdir()
    (tmp_path / "project" / "README.md").write_text("# Notes\n\nRunning hf_fastif on MNLI.\n")
    with pytest.raises(InfluenceTableError, match="not an influence table's .*README.md"):
        table.save(tmp_path / "project")
    assert (tmp_path / "project" / "README.md").read_text() == "# Notes\n\nRunning hf_fastif on MNLI.\n"


@pytest.mark.parametrize("stop", ["full disk at the metadata", "killed while shards move"])
def test_a_save_that_fails_over_a_table_leaves_that_table_whole(tmp_path, monkeypatch, stop):
    """A save over a table deleted that table's metadata first and then replaced its shards one by one: a full disk
    while the new metadata was written, or a process killed while the shards moved, left no loadable table (the old
    one gone, the new one never finished). The old table now loads, unchanged, until the new metadata replaces its
    own; the next save clears what the failed one left."""
    import hf_fastif.table.storage as storage

    old, new = make_table(), make_table(seed=1)
    old.save(tmp_path / "t", shard_rows=40)
    if stop == "full disk at the metadata":
        write_atomic = storage.write_atomic

        def full(path, *args, **kwargs):
            if Path(path).name == "influence_metadata.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return write_atomic(path, *args, **kwargs)

        monkeypatch.setattr(storage, "write_atomic", full)
        with pytest.raises(OSError, match="No space"):
            new.save(tmp_path / "t", shard_rows=40)
    else:
        save_killed_after_one_shard(monkeypatch, new, tmp_path / "t")
    monkeypatch.undo()
    loaded = InfluenceTable.load(tmp_path / "t", verify=True)  # (raised "influence_metadata.json is missing")
    assert loaded.to_pandas().equals(old.to_pandas())
    new.save(tmp_path / "t", shard_rows=40)
    assert InfluenceTable.load(tmp_path / "t", verify=True).to_pandas().equals(new.to_pandas())
    listed = {Path(s["path"]).name for s in json.loads((tmp_path / "t" / "influence_metadata.json").read_text())
              ["storage"]["shards"]}
    assert {p.name for p in (tmp_path / "t" / "data").glob("train-*.parquet")} == listed  # no other shard left


def test_add_text_refuses_data_the_table_was_not_computed_on(tmp_path, pad_collator):
    """train_id indexes the candidate rows and test_id the test rows: a dataset of another row count than the
    metadata records, or one it knows (by fingerprint) as another of the table's datasets, is refused."""
    from hf_fastif import compute_influences
    from hf_fastif.influence import default_arguments
    from tests.tiny import make_token_dataset, tiny_model

    train, pool, test = make_token_dataset(8, seed=0), make_token_dataset(8, seed=2), make_token_dataset(2, seed=1)
    args = default_arguments(influence_solver="cg", influence_damping=0.05, influence_knn_k=None,
                             influence_params=[r"classifier\."], disable_tqdm=True)
    computed = compute_influences(tiny_model("bert"), train, test, args, data_collator=pad_collator,
                                  candidate_dataset=pool)
    pool_text = Dataset.from_dict({"premise": [f"pool {i}" for i in range(8)]})
    test_text = Dataset.from_dict({"premise": ["test 0", "test 1"]})
    for table in (computed, InfluenceTable.load(computed.save(tmp_path / "t"))):
        with pytest.raises(ValueError, match="The train_dataset given is the table's train_data .* but its train_id "
                                             "indexes its candidate_data.*pass the candidate rows"):
            table.add_text(train_dataset=train)  # as long as the pool, but the training rows
        with pytest.raises(ValueError, match="train_id indexes the 8 rows of its candidate_data, but the "
                                             "train_dataset given has 9 rows; pass the candidate rows"):
            table.add_text(train_dataset=Dataset.from_dict({"premise": [f"x{i}" for i in range(9)]}))
        with pytest.raises(ValueError, match="test_id indexes the 2 rows of its test_data, but the test_dataset "
                                             "given has 8 rows; pass the test rows"):
            table.add_text(test_dataset=pool_text)
        texts = table.add_text(train_dataset=pool_text, test_dataset=test_text).to_pandas()
        assert texts.train_premise.tolist() == [f"pool {i}" for i in texts.train_id]
        assert texts.test_premise.tolist() == [f"test {i}" for i in texts.test_id]
        assert len(table.add_text(train_dataset=pool, test_dataset=test)) == 16  # the tokenized rows themselves


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


def test_unsorted_input_is_sorted_and_metadata_is_complete():
    table = InfluenceTable(Dataset.from_dict({"test_id": [1, 0, 1, 0], "train_id": [0, 1, 2, 3],
                                              "influence": [3.0, 2.0, 1.0, 0.0]}).select([3, 2, 1, 0]))
    assert table.lowest(1, 5).train_id.tolist() == [2, 0] and table.highest(0, 5).train_id.tolist() == [1, 3]
    assert table.test_ids == [0, 1]
    meta = table.metadata
    assert meta["schema_version"] == 1 and meta["library"] == "hf_fastif" and meta["library_version"]
    assert meta["created_at"].endswith("+00:00")


def test_writer_appends_shards_and_queries_read_only_what_they_need(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    with InfluenceTableWriter(tmp_path / "t", {"settings": {"influence_solver": "cg"}}, shard_rows=35,
                              row_group_rows=10) as writer:
        for chunk in (range(0, 4), range(8, 12), range(4, 8)):  # written out of order, as chunks finish
            test = np.repeat(np.asarray(chunk), 5)
            part = {"test_id": test, "train_id": rng.integers(0, 100, test.size),
                    "influence": rng.normal(size=test.size), "train_text": [f"t{i}" for i in range(test.size)]}
            writer.write(part)
            expected.append(pd.DataFrame(part))
            assert writer.num_rows == sum(len(e) for e in expected)
    shards = sorted((tmp_path / "t" / "data").glob("*.parquet"))
    assert [s.name[:-21] for s in shards] == [f"train-0000{i}-of-00002" for i in range(2)]  # (-<digest>.parquet)
    expected = pd.concat(expected).sort_values(["test_id", "influence"], kind="stable").reset_index(drop=True)

    table = InfluenceTable.load(tmp_path / "t")
    assert len(table) == 60 and table._dataset is None
    for t in range(12):
        rows = expected[expected.test_id == t]
        assert table.lowest(t, 2).influence.tolist() == rows.influence.tolist()[:2]
        assert table.highest(t, 2).train_text.tolist() == rows.train_text.tolist()[::-1][:2]
    reads = table._reader.row_groups_read
    table._reader.row_groups_read = 0
    table.helpful(5, 3)
    assert table._reader.row_groups_read <= 2 < len(table._reader.ranges)  # 6 row groups, one or two read
    assert table._dataset is None and reads > 0  # nothing was loaded as a whole
    assert table.test_ids == list(range(12))
    pd.testing.assert_frame_equal(table.to_pandas()[expected.columns], expected)
    # the datasets.Dataset view is memory-mapped Arrow, sorted like the table
    assert table.dataset.cache_files and table.dataset["test_id"] == expected.test_id.tolist()

    table.save(tmp_path / "t")  # re-saving a loaded table over its own folder
    again = InfluenceTable.load(tmp_path / "t", verify=True)
    pd.testing.assert_frame_equal(again.to_pandas()[expected.columns], expected)


def test_writer_orders_nan_influence_last_across_writes(tmp_path):
    """NaN influence sorts after every number of its test id, in the writer's sortedness check as in the table:
    rows that sort before an earlier write's NaN mark the shards unsorted, so queries still read lowest first."""
    nan = float("nan")
    with InfluenceTableWriter(tmp_path / "t") as writer:
        writer.write({"test_id": [0, 0], "train_id": [0, 1], "influence": [-1.0, nan]})
        writer.write({"test_id": [0, 0], "train_id": [2, 3], "influence": [-5.0, 2.0]})
    table = InfluenceTable.load(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "influence_metadata.json").read_text())["storage"]["sorted"] is False
    assert table.lowest(0, 1).influence.tolist() == [-5.0]
    assert table.helpful(0).train_id.tolist() == [2, 0] and table.harmful(0).train_id.tolist() == [3]
    assert table.highest(0, 4).train_id.tolist() == [3, 0, 2, 1]  # NaN last
    in_memory = InfluenceTable.from_arrays([0, 0, 0, 0], [0, 1, 2, 3], [-1.0, nan, -5.0, 2.0])
    pd.testing.assert_frame_equal(table.to_pandas(), in_memory.to_pandas())
    assert table.dataset["train_id"] == [2, 0, 3, 1]

    # writes already in that order (a NaN row followed by another NaN, or by the next test id) stay sorted
    with InfluenceTableWriter(tmp_path / "s") as writer:
        writer.write({"test_id": [0, 0], "train_id": [0, 1], "influence": [-1.0, nan]})
        writer.write({"test_id": [0, 1], "train_id": [2, 0], "influence": [nan, -5.0]})
        writer.write({"test_id": [1], "train_id": [1], "influence": [nan]})
    assert json.loads((tmp_path / "s" / "influence_metadata.json").read_text())["storage"]["sorted"] is True
    assert InfluenceTable.load(tmp_path / "s").lowest(1, 2).train_id.tolist() == [0, 1]


def test_writer_aborts_on_error_and_refuses_other_columns(tmp_path):
    make_table().save(tmp_path / "t")
    with pytest.raises(RuntimeError):
        with InfluenceTableWriter(tmp_path / "t", row_group_rows=2) as writer:
            writer.write({"test_id": [0, 0, 0], "train_id": [1, 2, 3], "influence": [0.1, 0.2, 0.3]})
            raise RuntimeError("the computation died")
    assert len(InfluenceTable.load(tmp_path / "t")) == 150  # the old table is untouched
    assert not list((tmp_path / "t" / "data").glob(".partial*"))
    writer = InfluenceTableWriter(tmp_path / "w")
    writer.write({"test_id": [0], "train_id": [1], "influence": [0.1]})
    with pytest.raises(ValueError, match="same columns"):
        writer.write({"test_id": [0], "train_id": [1], "influence": [0.1], "extra": ["x"]})
    with pytest.raises(ValueError, match="missing \\['influence'\\]"):
        writer.write({"test_id": [0], "train_id": [1]})


def test_a_writer_whose_last_rows_do_not_fit_discards_its_partial_shards(tmp_path, monkeypatch):
    """A full disk while close() flushed the buffered rows (the end of a `with` block, or close() called directly)
    left the .partial-*.parquet files behind, filling the disk further: close() raised and abort() never ran. Now
    any error in close() discards them, the writer is closed, and a previous table in the folder is kept."""
    make_table().save(tmp_path / "t")
    written = pq.ParquetWriter.write_table

    def full_disk(self, table, *args, **kwargs):
        written(self, table.slice(0, 1), *args, **kwargs)  # part of it reached the file
        raise OSError(errno.ENOSPC, "No space left on device")

    for folder, closed_by_with in ((tmp_path / "t", True), (tmp_path / "new", False)):
        writer = InfluenceTableWriter(folder, row_group_rows=100)
        writer.write({"test_id": [0, 0, 1], "train_id": [1, 2, 3], "influence": [0.1, 0.2, 0.3]})  # buffered
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
        # the folder named (pyarrow's own error names no file), the errno kept
        with pytest.raises(OSError, match=f"Could not write {folder} \\(No space left on device\\)") as raised:
            if closed_by_with:
                with writer:
                    pass
            else:
                writer.close()
        monkeypatch.undo()
        assert raised.value.errno == errno.ENOSPC
        assert not [p.name for p in (folder / "data").iterdir() if p.name.startswith(".partial")]
        with pytest.raises(ValueError, match="closed"):
            writer.write({"test_id": [2], "train_id": [1], "influence": [0.5]})
    assert len(InfluenceTable.load(tmp_path / "t")) == 150  # the previous table is untouched
    writer = InfluenceTableWriter(tmp_path / "new")  # the folder takes a table once there is room
    writer.write({"test_id": [0], "train_id": [1], "influence": [0.1]})
    assert len(writer.close()) == 1


def test_shards_with_missing_columns_or_bytes_are_refused(tmp_path):
    make_table().save(tmp_path / "t", shard_rows=100)
    shards = sorted((tmp_path / "t" / "data").glob("*.parquet"))
    pq.write_table(pa.table({"test_id": [0], "train_id": [1]}), tmp_path / "cols.parquet")
    meta = json.loads((tmp_path / "t" / "influence_metadata.json").read_text())
    meta.pop("storage")  # a table folder without the shard list: the footers alone must catch it
    (tmp_path / "t" / "influence_metadata.json").write_text(json.dumps(meta))
    shards[1].write_bytes((tmp_path / "cols.parquet").read_bytes())
    with pytest.raises(InfluenceTableError, match="missing \\['influence'\\]"):
        InfluenceTable.load(tmp_path / "t")
    pq.write_table(pa.table({"test_id": [0.5], "train_id": [1], "influence": [0.1]}), shards[1])
    with pytest.raises(InfluenceTableError, match="'test_id' .* must hold integers"):
        InfluenceTable.load(tmp_path / "t")

    make_table().save(tmp_path / "s", shard_rows=100)
    shard = sorted((tmp_path / "s" / "data").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a data page: same size, valid footer
    shard.write_bytes(bytes(data))
    with pytest.raises(InfluenceTableError, match="corrupt: its sha256 differs"):
        InfluenceTable.load(tmp_path / "s", verify=True)
    # without verify (`hf-fastif show` on a folder), each page's CRC, written with it, refuses it as it is read: a
    # review's 62 one-byte flips across a shard loaded 40 tables with other values (a train_id 16 read as 102), unsaid
    loaded = InfluenceTable.load(tmp_path / "s")
    for read in (loaded.to_pandas, lambda: loaded.helpful(0, 3), lambda: loaded.dataset):
        with pytest.raises(InfluenceTableError, match="is corrupt"):
            read()
    # the footer, which no page checksum covers, by its sha256 in the metadata, at every load (flips there loaded
    # 18 of 448 times with other rows: statistics that hid a row group)
    make_table().save(tmp_path / "f", shard_rows=100)
    footed = sorted((tmp_path / "f" / "data").glob("*.parquet"))[0]
    whole = footed.read_bytes()
    footer = int.from_bytes(whole[-8:-4], "little")
    for offset in (len(whole) - 8 - footer // 2, len(whole) - 7):  # inside the footer; its length
        damaged = bytearray(whole)
        damaged[offset] ^= 0x10
        footed.write_bytes(bytes(damaged))
        with pytest.raises(InfluenceTableError, match="is corrupt: its footer .* differs"):
            InfluenceTable.load(tmp_path / "f")
    shard.unlink()
    with pytest.raises(InfluenceTableError, match="incomplete: the shards .* are missing"):
        InfluenceTable.load(tmp_path / "s")


def test_check_model_says_which_model_the_table_needs(tmp_path):
    from tests.tiny import tiny_model

    model = tiny_model("bert")
    table = InfluenceTable.from_arrays([0], [0], [0.5], {"model": {
        "name_or_path": "tiny", "class": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": model_fingerprint(model)}})
    table.save(tmp_path / "t")
    InfluenceTable.load(tmp_path / "t").check_model(model)  # the same weights: no error
    with pytest.raises(ModelMismatchError, match="computed with 'tiny'.*fingerprint mismatch"):
        table.check_model(tiny_model("bert", seed=5))
    with pytest.raises(ModelMismatchError, match="class 'BertForSequenceClassification' in the table"):
        table.check_model(tiny_model("roberta"))


def test_check_model_reads_a_fingerprint_recorded_before_xxh3(tmp_path):
    """Tables made when tensors were hashed with sha256 (no scheme prefix) are checked with that scheme."""
    from hf_fastif.fingerprint import LEGACY_SCHEME, SCHEME, fingerprint_scheme
    from tests.tiny import tiny_model

    model = tiny_model("bert")
    legacy = model_fingerprint(model, scheme=LEGACY_SCHEME)
    assert ":" not in legacy and fingerprint_scheme(legacy) == LEGACY_SCHEME
    assert model_fingerprint(model).startswith(SCHEME + ":") and model_fingerprint(model) != legacy
    table = InfluenceTable.from_arrays([0], [0], [0.5], {"model": {"name_or_path": "old", "fingerprint": legacy}})
    InfluenceTable.load(table.save(tmp_path / "t")).check_model(model)  # the same weights, hashed the old way
    with pytest.raises(ModelMismatchError, match="fingerprint mismatch"):
        table.check_model(tiny_model("bert", seed=5))
    newer = InfluenceTable.from_arrays([0], [0], [0.5], {"model": {"fingerprint": "xxh9-512:" + "0" * 64}})
    with pytest.raises(ValueError, match="scheme 'xxh9-512', which this hf_fastif does not know.*upgrade"):
        newer.check_model(model)


def test_the_legacy_fingerprint_is_the_one_older_tables_hold():
    """Pinned: the sha256 fingerprint hf_fastif recorded before xxh3 (computed with that code, commit 3d9114d), and
    the xxh3 one recorded since, of a module whose values, names and config are fixed, so a change of either path
    cannot go unnoticed."""
    import torch

    from hf_fastif.fingerprint import LEGACY_SCHEME

    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4)
        module.bias.copy_(torch.tensor([0.5, -1.0]))
    module.register_buffer("steps", torch.tensor([7]))
    assert model_fingerprint(module, scheme=LEGACY_SCHEME) == (
        "b706b105e664655073ad500ffc906569532cd96c283ffc19fd64a05ecee9eca8")
    # and the xxh3 one every table since holds (computed at ccdb7fb): what PEFT models add must not change it
    assert model_fingerprint(module) == "xxh3-128:0750a88c44c155f2b51c7b4a4ff9ed7ee59b71c3eb5d70ebc1aca51e754f360c"


@pytest.mark.parametrize("on_disk", [False, True])
def test_helpful_and_harmful_lists_hold_only_their_sign(tmp_path, on_disk):
    table = sign_table()
    if on_disk:  # the shard reader answers the same
        table = InfluenceTable.load(table.save(tmp_path / "t", row_group_rows=4))
    helpful, harmful = table.helpful(0, 5), table.harmful(0, 5)
    assert helpful.influence.tolist() == [-2.0, -0.5] and helpful.train_id.tolist() == [1, 0]
    assert harmful.influence.tolist() == [3.0, 0.7, 0.6, 0.5, 0.4]
    assert len(table.harmful(0, 100)) == 8 and (table.harmful(0, 100).influence > 0).all()
    # the n extremes whatever their sign, for fixed-size selections
    assert table.lowest(0, 5).influence.tolist() == [-2.0, -0.5, 0.1, 0.2, 0.3]
    assert table.highest(0, 3).influence.tolist() == [3.0, 0.7, 0.6]
    assert table.describe(0) == {"test_id": 0, "num_candidates": 10, "num_helpful": 2, "num_harmful": 8,
                                 "num_zero": 0, "num_nan": 0, "num_distinct_values": 10, "min": -2.0,
                                 "median": pytest.approx(0.35), "max": 3.0}

    # zeros are neither helpful nor harmful, NaN is neither and sorts last, ties count as one distinct value
    assert table.helpful(1, 10).influence.tolist() == [-1.0, -1.0]
    assert table.harmful(1, 10).influence.tolist() == [2.0, 0.25, 0.25, 0.25]
    assert table.highest(1, 9).influence.tolist()[:-1] == [2.0, 0.25, 0.25, 0.25, 0.0, 0.0, -1.0, -1.0]
    assert np.isnan(table.highest(1, 9).influence.iloc[-1])
    assert np.isnan(table.lowest(1, 9).influence.iloc[-1])
    assert table.describe(1) == {"test_id": 1, "num_candidates": 9, "num_helpful": 2, "num_harmful": 4,
                                 "num_zero": 2, "num_nan": 1, "num_distinct_values": 4, "min": -1.0,
                                 "median": 0.125, "max": 2.0}
    none = table.helpful(0, 0)
    assert none.empty and list(none.columns) == ["test_id", "train_id", "influence"]
    with pytest.raises(ValueError, match="n must be >= 0"):
        table.helpful(0, -1)
    with pytest.raises(TypeError, match="n must be an integer"):
        table.harmful(0, 2.5)
    with pytest.raises(KeyError, match="test_id 7 is not in this table"):
        table.describe(7)
    for bad in (0.5, True):  # not silently the test point int() makes of it
        with pytest.raises(TypeError, match="test_id must be an integer id"):
            table.helpful(bad)


def test_a_loaded_table_serves_queries_from_many_threads(tmp_path):
    """A Space answers several requests at once from one loaded table: reads of its shared parquet handles are
    serialised (without that, 2 threads segfaulted the process or read 'corrupt' shards)."""
    from concurrent.futures import ThreadPoolExecutor

    expected = make_table(n_test=12, n_train=400)
    expected.save(tmp_path / "t", shard_rows=1200, row_group_rows=100)
    table = InfluenceTable.load(tmp_path / "t")
    table.for_test(0)  # the handles open: the shared state the threads race on

    def query(k):
        return table.helpful(k % 12, 10).train_id.tolist()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(query, range(2000)))
    assert got[:12] == [expected.helpful(t, 10).train_id.tolist() for t in range(12)]
    assert all(g == got[k % 12] for k, g in enumerate(got))


def test_a_writer_that_fails_at_its_card_keeps_the_previous_table(tmp_path, monkeypatch):
    """close() deleted the folder's metadata before it made the card: metadata the card could not render (a
    hand-written {"model": "<name>"}) or any card error left the previous table unloadable."""
    folder = tmp_path / "t"
    InfluenceTable.from_arrays([0, 0, 1], [0, 1, 0], [0.1, -0.2, 0.3], {"model": {"name_or_path": "bert"}}).save(folder)
    with pytest.raises(ValueError, match=r"metadata\['model'\] must be a dict"):
        with InfluenceTableWriter(folder, {"model": "bert-base-uncased"}) as writer:
            writer.write({"test_id": [0], "train_id": [0], "influence": [1.0]})
    assert len(InfluenceTable.load(folder)) == 3

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_fastif.table.storage.dataset_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        with InfluenceTableWriter(folder, {"model": {"name_or_path": "other"}}) as writer:
            writer.write({"test_id": [0], "train_id": [0], "influence": [1.0]})
    table = InfluenceTable.load(folder)
    assert len(table) == 3 and table.metadata["model"]["name_or_path"] == "bert"


def test_a_writer_refuses_bad_metadata_before_any_row_is_written(tmp_path):
    """Metadata that close() refuses ({"model": "<name>"}) was accepted by the writer: every row was written (hours of
    compute_influences output), then close() raised, discarded them all, and a second close() said the writer was
    closed. It is refused when the writer is made, and a close(metadata) it refuses keeps the rows."""
    with pytest.raises(ValueError, match=r"metadata\['model'\] must be a dict"):
        InfluenceTableWriter(tmp_path / "t", {"model": "bert-base-uncased"})
    with pytest.raises(ValueError, match=r"metadata\['settings'\] must be a dict"):
        InfluenceTableWriter(tmp_path / "t", {"settings": ["cg"]})
    writer = InfluenceTableWriter(tmp_path / "t", {"model": {"name_or_path": "bert-base-uncased"}})
    writer.write({"test_id": [0, 0, 1], "train_id": [0, 1, 0], "influence": [0.5, -0.5, 1.0]})
    with pytest.raises(ValueError, match=r"metadata\['train_data'\] must be a dict.*The rows written are kept: call "
                                         r"close\(\) again with the metadata fixed"):
        writer.close({"train_data": "mnli"})
    table = writer.close({"train_data": {"name": "mnli"}})
    assert len(table) == 3 and table.metadata["train_data"] == {"name": "mnli"}


def test_the_card_of_a_pool_or_mean_table_says_what_its_ids_index():
    """A table that scored a candidate pool said its train_id was a "row of the training data" (the rows whose
    Hessian it used, not the rows scored); a combine='mean' table's one test_id was a "row of the test data"."""
    from hf_fastif.table import dataset_card

    train, test = {"name": "mnli", "fingerprint": "95f1", "num_rows": 100}, {"name": "hans", "num_rows": 6}
    pool = {"train_data": train, "test_data": test, "candidate_data": {"name": "pool", "fingerprint": "411c",
                                                                         "num_rows": 200}}
    card = str(dataset_card(pool, 12))
    assert "`train_id` (row of the candidate pool: the rows scored, not the training data " \
        "whose Hessian they were scored with)" in card and "row of the training data" not in card
    assert "- Candidate pool: pool (split None, fingerprint `411c`, 200 rows): the rows scored, which `train_id` " \
        "indexes" in card and "100 rows): the rows of the Hessian, not the rows scored" in card
    assert "candidate_fingerprint: 411c" in card  # (the YAML the Hub indexes)
    plain = {"train_data": train, "test_data": test, "candidate_data": dict(train)}
    card = str(dataset_card(plain, 12))
    assert "`test_id` (row of the test data), `train_id` (row of the training data)" \
        in card and "Candidate pool" not in card and "candidate_fingerprint" not in card
    assert "`test_id` (0: the mean over the 6 rows of the test data, combine='mean')" in str(dataset_card(
        plain | {"combine": "mean"}, 2))
    from hf_fastif.table.format import candidate_pool

    assert candidate_pool(pool) and not candidate_pool(plain) and not candidate_pool({"train_data": train})
    # the rows' sha256 decides where both record it: two draws of a random map share a datasets fingerprint, and
    # the same rows selected again get another
    same_fp = {"train_data": train | {"sha256": "aa"}, "candidate_data": train | {"sha256": "bb"}}
    other_fp = {"train_data": train | {"sha256": "aa"}, "candidate_data": train | {"fingerprint": "ff", "sha256": "aa"}}
    assert candidate_pool(same_fp) and not candidate_pool(other_fp)


def test_writers_of_one_folder_keep_each_others_shards(tmp_path):
    """Two writers of one folder (every process of a launch saving its copy of the table): the first to close
    deleted the other's partial shards, whose save then failed; a crashed writer's partial shard (its process gone)
    is still removed by the next save."""
    import time

    from hf_fastif.table import InfluenceTableWriter

    table = sign_table()
    first = InfluenceTableWriter(tmp_path / "t", table.metadata, shard_rows=3, row_group_rows=3)
    second = InfluenceTableWriter(tmp_path / "t", table.metadata, shard_rows=3, row_group_rows=3)
    first.write(table.to_pandas())
    second.write(table.to_pandas())
    first.close()
    saved = second.close()
    pd.testing.assert_frame_equal(saved.to_pandas(), table.to_pandas())
    from hf_fastif.table.storage import HOST_TAG

    data = tmp_path / "t" / "data"
    stale = data / ".partial-999999999-dead-00000.parquet"  # no such process (a name from before the host tag)
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    killed = data / f".partial-999999999-{HOST_TAG}-beef-00000.parquet"  # this machine's, killed just now
    killed.write_bytes(b"left by a kill")
    elsewhere = data / ".partial-4242-0000aaaa-beef-00000.parquet"  # another machine's writer, writing now
    elsewhere.write_bytes(b"being written")
    table.save(tmp_path / "t")
    assert not stale.exists() and not killed.exists() and elsewhere.exists()
    elsewhere.unlink()
    assert [p.name[:-21] for p in data.iterdir()] == ["train-00000-of-00001"]


def test_a_table_saved_over_a_loaded_one_is_not_read_under_the_old_metadata(tmp_path):
    """A loaded table read its row groups by path, lazily: after another table was saved into its folder (a build
    re-run while a Space or a notebook holds the table), it returned the new rows (-500 ... -100) under its own
    metadata, and an empty harmful list. A file opened before keeps its rows; one opened after is refused."""
    from hf_fastif.table import InfluenceTableError

    first = InfluenceTable.from_arrays([0] * 5 + [1] * 5, list(range(5)) * 2, [1.0, 2, 3, 4, 5] * 2, {"note": "A"})
    first.save(tmp_path / "t", shard_rows=5)
    opened, unread = InfluenceTable.load(tmp_path / "t"), InfluenceTable.load(tmp_path / "t")
    before, whole = opened.for_test(0).influence.tolist(), opened.to_pandas()  # every shard read: held open
    replacement = InfluenceTable.from_arrays(first.to_pandas().test_id, first.to_pandas().train_id,
                                             -100 * first.to_pandas().influence, {"note": "B"})
    time.sleep(0.01)
    replacement.save(tmp_path / "t", shard_rows=5)
    assert opened.for_test(0).influence.tolist() == before == [1.0, 2, 3, 4, 5]
    assert opened.to_pandas().equals(whole)
    gone = "was deleted since this table was loaded .another table saved into .*load the table again"
    with pytest.raises(InfluenceTableError, match=gone):  # a dataset reads the files by path: refused
        _ = opened.dataset
    with pytest.raises(InfluenceTableError, match=gone):
        unread.for_test(0)
    with pytest.raises(InfluenceTableError, match=gone):
        unread.to_pandas()
    for table in (opened, unread):  # verify called them corrupt ("Download or rebuild the table")
        with pytest.raises(InfluenceTableError, match=gone):
            table.verify()
    assert InfluenceTable.load(tmp_path / "t").for_test(0).influence.tolist()[0] == -500


def test_the_package_exports_every_class_and_function_of_the_table_module():
    """docs/tables.md says so; DamagedShardError (which `from_hub` raises) was missing."""
    import inspect

    import hf_fastif
    from hf_fastif import table

    for name in table.__all__:
        if inspect.isclass(getattr(table, name)) or inspect.isfunction(getattr(table, name)):
            assert getattr(hf_fastif, name) is getattr(table, name) and name in hf_fastif.__all__, name


def test_from_arrays_takes_columns_by_position_and_refuses_what_it_would_misread():
    """Extra columns were read by label (a sorted DataFrame's text went to other rows, a filtered one raised a bare
    KeyError), unequal lengths were cut or raised IndexError, float ids were truncated (0.7 -> 0) and a pair given
    twice was kept (describe counted the row twice)."""
    from hf_fastif.table import InfluenceTableError

    frame = pd.DataFrame({"test_id": [0, 0, 0, 0], "train_id": [10, 11, 12, 13], "influence": [0.3, -0.5, 0.1, 0.9],
                          "train_premise": ["row10", "row11", "row12", "row13"]})
    for given in (frame.sort_values("influence"), frame[frame.train_id != 11]):
        table = InfluenceTable.from_arrays(given.test_id, given.train_id, given.influence,
                                           train_premise=given.train_premise)
        rows = table.to_pandas()
        assert (rows.train_premise == "row" + rows.train_id.astype(str)).all()
    for arrays, message in ((([0, 0], [1, 2, 3], [0.1, 0.2]), "arrays of one length"),
                            (([0.7, 1.5], [1, 2], [0.1, 0.2]), "test_id must hold whole numbers"),
                            (([0, 0], [1, 1], [0.1, -0.2]), "the pair test_id 0, train_id 1 2 times"),
                            # ids int64 cannot hold wrapped round to other, negative ids (two floats to one)
                            ((np.array([2**63 + 5], dtype=np.uint64), [0], [0.5]), "test_id holds ids out of range"),
                            (([0, 0], [1e19, 2e19], [0.1, 0.2]), "train_id holds ids out of range")):
        with pytest.raises(InfluenceTableError, match=message):
            InfluenceTable.from_arrays(*arrays)
    with pytest.raises(InfluenceTableError, match="arrays of one length"):
        InfluenceTable.from_arrays([0, 0], [1, 2], [0.1, 0.2], train_premise=["a", "b", "c"])
    assert InfluenceTable.from_arrays(np.array([0.0, 1.0]), [1, 2], [0.1, 0.2]).test_ids == [0, 1]  # whole floats


def test_an_empty_table_a_reserved_metadata_key_and_deleted_shards_are_said(tmp_path):
    """An empty table's `.dataset` said "corrupt" once saved (datasets cannot read a parquet file without rows) and
    could be pushed, with a card whose load_dataset failed; a metadata entry named 'storage' was dropped without a
    word; shards deleted under a loaded table (a cleaned cache) gave bare FileNotFoundErrors."""
    from hf_fastif.table.hub import push_table

    empty = InfluenceTable.from_arrays([], [], [])
    loaded = InfluenceTable.load(empty.save(tmp_path / "empty"), verify=True)
    assert len(loaded.dataset) == 0 and loaded.dataset.column_names == empty.dataset.column_names
    with pytest.raises(InfluenceTableError, match="The table has no rows; nothing was pushed"):
        push_table(loaded, "test-user/empty")  # (refused before any request: this process runs offline)
    with pytest.raises(InfluenceTableError, match="The metadata key 'storage' is reserved"):
        InfluenceTable.from_arrays([0], [1], [0.5], {"storage": {"bucket": "b"}})
    with pytest.raises(InfluenceTableError, match="The metadata key 'storage' is reserved"):  # before any row
        InfluenceTableWriter(tmp_path / "w", {"storage": "s3://bucket"})
    writer = InfluenceTableWriter(tmp_path / "w")
    writer.write({"test_id": [0, 0], "train_id": [1, 2], "influence": [0.5, -0.5]})
    with pytest.raises(InfluenceTableError, match="The rows written are kept: call close"):
        writer.close({"storage": "s3://bucket"})
    assert len(writer.close({"bucket": "s3://bucket"})) == 2

    table = InfluenceTable.from_arrays(np.repeat([0, 1, 2], 4), np.tile(np.arange(4), 3), np.arange(12.0))
    folder = table.save(tmp_path / "t", shard_rows=4)
    loaded = InfluenceTable.load(folder)
    assert len(loaded.lowest(0, 2)) == 2
    for shard in (folder / "data").iterdir():
        shard.unlink()
    for query in (lambda: loaded.lowest(2, 2), loaded.verify, lambda: loaded.dataset):
        with pytest.raises(InfluenceTableError, match="was deleted since this table was loaded"):
            query()


def test_the_candidates_note_is_dropped_when_k_covers_every_row():
    """At k >= the candidate rows every row is scored and the counts are the training set's, but the note still
    said they showed the choice of candidates."""
    for rows, expected in ((10, True), (4, False)):
        table = InfluenceTable.from_arrays([0] * 4, [0, 1, 2, 3], [-1.0, -0.5, 0.5, 1.0], {
            "settings": {"influence_knn_k": 4}, "diagnostics": {"candidates": "gradient"},
            "candidate_data": {"num_rows": rows}})
        assert (table.candidates_note() is not None) == expected
    # k = 1 takes its one row from the helpful end (it was "the 1 ... along -s_test (half) and along +s_test (half)")
    for k, ends in ((1, "points most along -s_test, then"), (3, "along -s_test (half) and along +s_test (half)")):
        table = InfluenceTable.from_arrays([0] * k, list(range(k)), [-1.0] * k, {
            "settings": {"influence_knn_k": k}, "diagnostics": {"candidates": "gradient"},
            "candidate_data": {"num_rows": 10}})
        assert f"Candidates: the {k} of the 10 training rows whose projected gradient" in table.candidates_note()
        assert ends in table.candidates_note()


@pytest.mark.usefixtures("propagating")
@pytest.mark.parametrize("damage", ["truncated", "a byte changed"])
def test_saving_the_same_rows_again_repairs_a_damaged_shard(tmp_path, caplog, damage):
    """A shard's name is a digest of its rows, so saving the same rows again meets a file of that name, which the
    save kept as "saved before" even when damaged: the folder stayed unreadable through every save (and every rerun
    of a build) after its error said to rebuild. Only a file holding the recorded bytes is kept now."""
    import logging

    table = InfluenceTable.from_arrays(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.5, -0.2, 0.1]),
                                       metadata={})
    table.save(tmp_path / "t")
    shard = next((tmp_path / "t" / "data").glob("*.parquet"))
    if damage == "truncated":
        os.truncate(shard, 100)
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(InfluenceTableError, match="corrupt"):
        InfluenceTable.load(tmp_path / "t").to_pandas()
    with caplog.at_level(logging.WARNING, logger="hf_fastif"):
        table.save(tmp_path / "t")
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert [p.name for p in (tmp_path / "t" / "data").glob("*.parquet")] == [shard.name]
    pd.testing.assert_frame_equal(InfluenceTable.load(tmp_path / "t").to_pandas(), table.to_pandas())


@pytest.mark.parametrize("edit", [
    lambda m: m.update(storage="x"), lambda m: m["storage"]["shards"][0].pop("path"),
    lambda m: m["storage"].update(shards={"a": 1}), lambda m: m["storage"].update(num_rows="3"),
    lambda m: m["storage"].update(sorted="false"), lambda m: m.update(model="bert"), lambda m: m.clear(),
    lambda m: m["storage"]["shards"][0].update(bytes="12"),
], ids=["storage a string", "shard without path", "shards an object", "num_rows a string", "sorted a string",
        "model a string", "empty", "bytes a string"])
def test_metadata_of_the_wrong_shape_is_refused_as_corrupt(tmp_path, capsys, edit):
    """Only the schema version of a table's metadata was checked: a string for `storage` raised AttributeError (a
    traceback from the CLI), a shard without its path a bare KeyError ("error: path"), "false" for `sorted` was read
    as true (an unsorted table queried as sorted), a string for `model` loaded and then broke `repr`, and an empty
    object was told to upgrade hf_fastif. Each is an InfluenceTableError naming the file, and `show` exits 2."""
    from hf_fastif.cli import main

    make_table().save(tmp_path / "t")
    path = tmp_path / "t" / "influence_metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(InfluenceTableError, match="influence_metadata.json (is corrupt|has no schema_version)"):
        InfluenceTable.load(tmp_path / "t")
    capsys.readouterr()
    assert main(["show", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "influence_metadata.json" in err and "Traceback" not in err


def test_a_schema_version_written_as_text_is_named_as_such(tmp_path):
    """A schema_version "1" (text) was reported as missing ("has no schema_version")."""
    make_table().save(tmp_path / "t")
    path = tmp_path / "t" / "influence_metadata.json"
    metadata = json.loads(path.read_text())
    metadata["schema_version"] = str(metadata["schema_version"])
    path.write_text(json.dumps(metadata))
    with pytest.raises(InfluenceTableError, match=r"has schema_version '[0-9]+', not a whole number: it is not an "
                                                  r"influence table's metadata, or it is corrupt"):
        InfluenceTable.load(tmp_path / "t")


def test_repeated_pairs_and_missing_ids_are_refused_wherever_rows_come_in(tmp_path):
    """`from_arrays` refused a repeated (test_id, train_id) pair, but the writer and `InfluenceTable(dataset)` took
    them (a retried chunk: helpful(0) gave train id 4 twice, `describe` counted 3 candidates for 2 rows); the writer
    also took null ids (test_ids read back [0.0, 1.0, nan]) and raised Arrow's bare ArrowInvalid for uint64 ids past
    2**63. Each is an InfluenceTableError, and a refused close leaves the folder's previous table."""
    chunk = {"test_id": [0, 0], "train_id": [3, 4], "influence": [-1.0, 2.0]}
    make_table().save(tmp_path / "t")
    before = InfluenceTable.load(tmp_path / "t").to_pandas()
    writer = InfluenceTableWriter(tmp_path / "t")
    writer.write(chunk)
    writer.write({"test_id": [1], "train_id": [4], "influence": [0.5]})
    writer.write(chunk)  # retried
    with pytest.raises(InfluenceTableError, match="pair test_id 0, train_id 3 2 times .2 pairs repeated.*nothing was"):
        writer.close()
    assert InfluenceTable.load(tmp_path / "t").to_pandas().equals(before)
    assert not list((tmp_path / "t" / "data").glob(".partial-*"))
    wide = {"test_id": [0, 0], "train_id": [2 ** 40, 2 ** 40], "influence": [1.0, 2.0]}  # (past pair_keys' range)
    with pytest.raises(InfluenceTableError, match=f"train_id {2 ** 40} 2 times"):
        with InfluenceTableWriter(tmp_path / "w") as writer:
            writer.write(chunk)
            writer.write(wide)
    with pytest.raises(InfluenceTableError, match="pair test_id 0, train_id 3 2 times"):
        InfluenceTable(Dataset.from_dict({k: v * 2 for k, v in chunk.items()}))
    with pytest.raises(InfluenceTableError, match="pair test_id 0, train_id 4 2 times"):  # (an indices mapping's rows)
        InfluenceTable(Dataset.from_dict(chunk).select([0, 1, 1]))
    for bad, match in (({"test_id": pa.array([0, None], pa.int64())}, "'test_id' of the rows written has 1 missing"),
                       ({"train_id": pa.array([1, 2 ** 63], pa.uint64())}, "'train_id' of the rows written holds ids "
                                                                           "int64 cannot hold")):
        with pytest.raises(InfluenceTableError, match=match):
            with InfluenceTableWriter(tmp_path / "n") as writer:
                writer.write(pa.table({**{k: pa.array(v) for k, v in chunk.items()}, **bad}))
    with InfluenceTableWriter(tmp_path / "ok") as writer:  # the same pair for other test ids is fine
        writer.write(chunk)
        writer.write({"test_id": [1, 1], "train_id": [3, 4], "influence": [0.0, 1.0]})
    assert len(InfluenceTable.load(tmp_path / "ok")) == 4


def test_add_text_keeps_the_names_of_class_labels(tmp_path):
    """A ClassLabel column's names were dropped by add_text (the table holds the ids) and a saved table showed 0 / 1
    in `show`, unless the build had recorded label_names: they are recorded now from the datasets' features."""
    from datasets import ClassLabel, Features, Value

    train = Dataset.from_dict({"premise": ["a", "b", "c"], "label": [0, 1, 0]},
                              features=Features({"premise": Value("string"),
                                                 "label": ClassLabel(names=["entailment", "non-entailment"])}))
    table = InfluenceTable.from_arrays([0, 0, 0], [0, 1, 2], [-1.0, 0.5, 2.0]).add_text(train_dataset=train)
    table.save(tmp_path / "t")
    loaded = InfluenceTable.load(tmp_path / "t")
    assert loaded.metadata["label_names"] == ["entailment", "non-entailment"]
    assert loaded.to_pandas().train_label.tolist() == [0, 1, 0]
    named = InfluenceTable.from_arrays([0], [0], [1.0], {"label_names": ["yes", "no"]}).add_text(train_dataset=train)
    assert named.metadata["label_names"] == ["yes", "no"]  # (recorded ones are kept)
