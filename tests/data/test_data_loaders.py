"""MNLI / HANS / ANLI loaders on small local files in the official and Hub formats; no network."""

import json

import datasets
import huggingface_hub.constants
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_fastif.data import (
    HANS_TSV_HEADER,
    NLI2_LABELS,
    NLI3_LABELS,
    load_anli,
    load_hans,
    load_mnli,
    split_hans,
)
from hf_fastif.data.loaders import local_columns

HANS_ROWS = [  # gold_label, sentence1, sentence2, pairID, heuristic, subcase, template
    (
        "non-entailment",
        "The president advised the doctor .",
        "The doctor advised the president .",
        "ex0",
        "lexical_overlap",
        "ln_subject/object_swap",
        "temp1",
    ),
    (
        "entailment",
        "The doctor near the actor danced .",
        "The doctor danced .",
        "ex1",
        "lexical_overlap",
        "le_around_prepositional_phrase",
        "temp7",
    ),
    (
        "non-entailment",
        'The "judge" who the lawyer saw slept .',
        "The lawyer slept .",
        "ex2",
        "subsequence",
        "sn_relative_clause_on_subject",
        "temp28",
    ),
    (
        "entailment",
        "Certainly the null artist waited .",
        "The null artist waited .",
        "ex3",
        "constituent",
        "ce_adverb",
        "temp60",
    ),
]


def _write_hans_tsv(path, rows=HANS_ROWS, header=HANS_TSV_HEADER):
    lines = ["\t".join(header)]
    for gold, s1, s2, pair_id, heuristic, subcase, template in rows:
        parse = "( " + s1 + " )"
        lines.append(
            "\t".join(
                [
                    gold,
                    parse,
                    "( " + s2 + " )",
                    "(ROOT " + s1 + ")",
                    "(ROOT " + s2 + ")",
                    s1,
                    s2,
                    pair_id,
                    heuristic,
                    subcase,
                    template,
                ][: len(header)]
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


MNLI_OFFICIAL = [  # official MNLI jsonl: sentence1 / sentence2 / gold_label strings, "-" = no gold label
    {
        "annotator_labels": ["entailment"],
        "genre": "fiction",
        "gold_label": "entailment",
        "pairID": "1e",
        "promptID": "1",
        "sentence1": "A man sleeps.",
        "sentence2": "Someone sleeps.",
        "sentence1_parse": "(ROOT)",
    },
    {
        "annotator_labels": ["neutral"],
        "genre": "travel",
        "gold_label": "neutral",
        "pairID": "2n",
        "promptID": "2",
        "sentence1": "A man sleeps.",
        "sentence2": "A tall man sleeps.",
        "sentence1_parse": "(ROOT)",
    },
    {
        "annotator_labels": ["neutral", "contradiction"],
        "genre": "slate",
        "gold_label": "-",
        "pairID": "3n",
        "promptID": "3",
        "sentence1": "Unclear.",
        "sentence2": "Very unclear.",
        "sentence1_parse": "(ROOT)",
    },
    {
        "annotator_labels": ["contradiction"],
        "genre": "government",
        "gold_label": "contradiction",
        "pairID": "4c",
        "promptID": "4",
        "sentence1": "A man sleeps.",
        "sentence2": "Nobody sleeps.",
        "sentence1_parse": "(ROOT)",
    },
]
MNLI_HUB = [  # the Hub's nyu-mll/multi_nli: premise / hypothesis / label, 0 entailment 1 neutral 2 contradiction
    {
        "promptID": 1,
        "pairID": "1e",
        "premise": "A man sleeps.",
        "hypothesis": "Someone sleeps.",
        "genre": "fiction",
        "label": 0,
    },
    {
        "promptID": 2,
        "pairID": "2n",
        "premise": "A man sleeps.",
        "hypothesis": "A tall man sleeps.",
        "genre": "travel",
        "label": 1,
    },
    {
        "promptID": 3,
        "pairID": "3n",
        "premise": "Unclear.",
        "hypothesis": "Very unclear.",
        "genre": "slate",
        "label": -1,
    },
    {
        "promptID": 4,
        "pairID": "4c",
        "premise": "A man sleeps.",
        "hypothesis": "Nobody sleeps.",
        "genre": "government",
        "label": 2,
    },
]
EXPECTED_PREMISES = ["A man sleeps.", "A man sleeps.", "A man sleeps."]
EXPECTED_HYPOTHESES = ["Someone sleeps.", "A tall man sleeps.", "Nobody sleeps."]


# ---------------------------------------------------------------------------------------------- HANS
def test_official_hans_tsv(tmp_path):
    hans = load_hans(_write_hans_tsv(tmp_path / "heuristics_evaluation_set.txt"))
    assert hans.column_names == [
        "premise",
        "hypothesis",
        "label",
        "heuristic",
        "subcase",
        "template",
        "pair_id",
    ]
    assert hans.features["label"] == ClassLabel(names=list(NLI2_LABELS))
    assert list(hans["label"]) == [1, 0, 1, 0]
    assert list(hans["pair_id"]) == ["ex0", "ex1", "ex2", "ex3"]
    assert list(hans["heuristic"]) == ["lexical_overlap", "lexical_overlap", "subsequence", "constituent"]
    assert hans[1]["subcase"] == "le_around_prepositional_phrase" and hans[1]["template"] == "temp7"
    # unquoted TSV: quotes and words like "null" stay as they are
    assert hans[2]["premise"] == 'The "judge" who the lawyer saw slept .'
    assert hans[3]["premise"] == "Certainly the null artist waited ."


def test_hub_style_parquet_with_opposite_label_order(tmp_path):
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["non-entailment", "entailment"]),
            "parse_premise": Value("string"),
            "heuristic": Value("string"),
            "subcase": Value("string"),
            "template": Value("string"),
        }
    )
    rows = {
        "premise": [r[1] for r in HANS_ROWS],
        "hypothesis": [r[2] for r in HANS_ROWS],
        "label": [0 if r[0] == "non-entailment" else 1 for r in HANS_ROWS],
        "parse_premise": ["()"] * 4,
        "heuristic": [r[4] for r in HANS_ROWS],
        "subcase": [r[5] for r in HANS_ROWS],
        "template": [r[6] for r in HANS_ROWS],
    }
    path = tmp_path / "hans.parquet"
    Dataset.from_dict(rows, features=features).to_parquet(path)
    hans = load_hans(path)
    assert list(hans["label"]) == [1, 0, 1, 0]  # by name, not by the file's integer ids [0, 1, 0, 1]
    assert list(hans["pair_id"]) == ["ex0", "ex1", "ex2", "ex3"]
    assert list(hans["premise"]) == [r[1] for r in HANS_ROWS]


def test_hub_style_jsonl_uses_hub_label_order(tmp_path):
    records = [
        {
            "premise": r[1],
            "hypothesis": r[2],
            "label": 1 if r[0] == "non-entailment" else 0,
            "parse_premise": "()",
            "heuristic": r[4],
            "subcase": r[5],
            "template": r[6],
        }
        for r in HANS_ROWS
    ]
    hans = load_hans(_write_jsonl(tmp_path / "hans.jsonl", records))
    assert list(hans["label"]) == [1, 0, 1, 0]


def test_hans_with_wrong_columns_lists_expected_header(tmp_path):
    path = _write_hans_tsv(tmp_path / "heuristics_evaluation_set.txt", header=HANS_TSV_HEADER[:-1])
    with pytest.raises(ValueError) as error:
        load_hans(path)
    message = str(error.value)
    assert "\t".join(HANS_TSV_HEADER) in message  # the expected header
    assert "'subcase'" in message and "template" not in message.split("found")[-1]  # what was found
    with pytest.raises(ValueError, match="Hub hans columns"):
        load_hans(_write_jsonl(tmp_path / "x.jsonl", [{"sentence": "a", "label": 0}]))


def test_hans_with_bad_labels_names_them(tmp_path):
    rows = [("contradiction", *HANS_ROWS[0][1:]), HANS_ROWS[1]]
    with pytest.raises(ValueError, match="'contradiction'.*expected 'entailment' / 'non-entailment'"):
        load_hans(_write_hans_tsv(tmp_path / "hans.tsv", rows=rows))
    records = [
        {"premise": "a", "hypothesis": "b", "label": 2, "heuristic": "h", "subcase": "s", "template": "t"}
    ]
    with pytest.raises(ValueError, match="Unexpected label values 2"):
        load_hans(_write_jsonl(tmp_path / "hans.jsonl", records))


def test_hans_from_hub_id_calls_load_dataset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = Dataset.from_dict(
        {
            "premise": ["P ."],
            "hypothesis": ["H ."],
            "label": [1],
            "heuristic": ["constituent"],
            "subcase": ["cn_adverb"],
            "template": ["temp1"],
        },
        features=Features(
            {
                "premise": Value("string"),
                "hypothesis": Value("string"),
                "label": ClassLabel(names=["entailment", "non-entailment"]),
                "heuristic": Value("string"),
                "subcase": Value("string"),
                "template": Value("string"),
            }
        ),
    )
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hans = load_hans("jhu-cogsci/hans", split="validation")
    assert calls == [("jhu-cogsci/hans", "validation")]
    assert list(hans["label"]) == [1] and list(hans["pair_id"]) == ["ex0"]


# ---------------------------------------------------------------------------------------------- MNLI
@pytest.mark.usefixtures("propagating")
@pytest.mark.parametrize("records", [MNLI_OFFICIAL, MNLI_HUB], ids=["official", "hub"])
def test_mnli_jsonl_both_column_styles(tmp_path, records, caplog):
    path = _write_jsonl(tmp_path / "mnli.jsonl", records)
    with caplog.at_level("WARNING"):
        two, three = load_mnli(path, num_labels=2), load_mnli(path, num_labels=3)
    # the dropped row named, and what that does to the ids (a table's train_id 10 held the file's row 11, unsaid)
    assert "Dropped 1 of 4 rows without a gold label (rows 2;" in caplog.text and "count the kept rows" in caplog.text
    for ds in (two, three):
        assert ds.column_names == ["premise", "hypothesis", "label", "genre"]
        assert list(ds["premise"]) == EXPECTED_PREMISES and list(ds["hypothesis"]) == EXPECTED_HYPOTHESES
        assert list(ds["genre"]) == ["fiction", "travel", "government"]  # the no-gold-label row is dropped
    assert list(two["label"]) == [0, 1, 1] and two.features["label"].names == list(NLI2_LABELS)
    assert list(three["label"]) == [0, 1, 2] and three.features["label"].names == list(NLI3_LABELS)


def test_mnli_csv_and_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame(MNLI_HUB).to_csv(tmp_path / "mnli.csv", index=False)
    assert list(load_mnli(tmp_path / "mnli.csv", num_labels=3)["label"]) == [0, 1, 2]
    # parquet written by datasets carries its ClassLabel names, which decide the mapping
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["contradiction", "entailment", "neutral"]),
        }
    )
    Dataset.from_dict(
        {"premise": ["p", "p", "p"], "hypothesis": ["a", "b", "c"], "label": [0, 1, 2]}, features=features
    ).to_parquet(tmp_path / "mnli.parquet")
    mnli = load_mnli(tmp_path / "mnli.parquet", num_labels=3)
    assert list(mnli["label"]) == [2, 0, 1] and list(mnli["genre"]) == ["mnli"] * 3


def test_mnli_bad_labels_are_named(tmp_path):
    path = _write_jsonl(
        tmp_path / "mnli.jsonl",
        [
            {"premise": "p", "hypothesis": "h", "label": 7},
            {"premise": "p", "hypothesis": "h", "label": "maybe"},
        ],
    )
    # the file and the rows named (a build reads two files: which held the bad label was not said)
    with pytest.raises(ValueError, match=r"mnli.jsonl': Unexpected label values 7 \(row 0\), 'maybe' \(row 1\)"):
        load_mnli(path)


def test_rows_without_their_text_are_refused_by_row(tmp_path):
    """A jsonl record without "hypothesis", or a null premise (jsonl or parquet), was read as the words "nan" /
    "None", then tokenized, used in every influence stage and shown in the table."""
    rows = [{"premise": "The judge slept.", "hypothesis": "The judge slept.", "label": "entailment"},
            {"premise": "The doctor saw the artist.", "label": "entailment"},
            {"premise": None, "hypothesis": "The artist danced.", "label": "non_entailment"}]
    path = _write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(ValueError, match=r"1 row\(s\) have no 'premise' text .* rows 2 \(0-based"):
        load_mnli(path, num_labels=2)
    path = _write_jsonl(tmp_path / "no_hypothesis.jsonl", rows[:2])
    with pytest.raises(ValueError, match=r"no 'hypothesis' text .* rows 1 "):
        load_mnli(path, num_labels=2)
    Dataset.from_list([rows[0], rows[2]]).to_parquet(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"no 'premise' text .* rows 1 "):
        load_mnli(tmp_path / "missing.parquet", num_labels=2)
    # rows dropped for having no gold label are not counted; an empty string is text
    kept = [{"premise": None, "hypothesis": "h", "label": "-"}, {"premise": "", "hypothesis": "h", "label": 0}]
    assert load_mnli(_write_jsonl(tmp_path / "kept.jsonl", kept), num_labels=2)["premise"][:] == [""]
    hans = [{"premise": "p", "hypothesis": None, "label": 0, "heuristic": "lexical_overlap", "subcase": "s",
             "template": "t"}]
    with pytest.raises(ValueError, match="no 'hypothesis' text"):
        load_hans(_write_jsonl(tmp_path / "hans.jsonl", hans))


def test_two_label_file_needs_num_labels_2(tmp_path):
    path = _write_jsonl(
        tmp_path / "mnli2.jsonl", [{"premise": "p", "hypothesis": "h", "label": "non_entailment"}]
    )
    assert list(load_mnli(path, num_labels=2)["label"]) == [1]
    with pytest.raises(ValueError, match=r"\(row 0\) is 2-label .*use a 2-label \(MNLI-2\) model.*num_labels=2"):
        load_mnli(path, num_labels=3)
    with pytest.raises(ValueError, match="num_labels must be 2"):
        load_mnli(path, num_labels=4)


def test_mnli_missing_columns(tmp_path):
    path = _write_jsonl(tmp_path / "mnli.jsonl", [{"text": "p", "label": 0}])
    with pytest.raises(ValueError, match="^'.*mnli.jsonl': Expected .*sentence1/sentence2/gold_label.*found "
                                         "\\['text', 'label'\\]"):
        load_mnli(path)


def test_empty_files_are_named_as_empty(tmp_path):
    """An empty jsonl / json list was refused as "Expected NLI columns ... found []" (as if its columns were
    wrong), an empty csv with pandas' "No columns to parse from file"."""
    for name, text in (("a.jsonl", ""), ("b.json", "[]"), ("c.csv", ""), ("d.csv", "\n"), ("e.tsv", ""),
                       ("f.txt", "")):
        (tmp_path / name).write_text(text)
        for load in (load_mnli, load_anli, load_hans):
            with pytest.raises(ValueError, match=f"{name}' gives no data: it is empty"):
                load(tmp_path / name)


def test_files_that_are_not_utf8_are_named_with_the_fix(tmp_path):
    """A cp1252 or UTF-16 file failed with a bare "'utf-8' codec can't decode byte 0xe9", naming neither the file
    nor what to do (the CLI reads each file's columns first: same)."""
    text = "sentence1,sentence2,gold_label\nCaf\u00e9 open.,It is closed.,contradiction\n"
    for name, encoding in (("cp1252.csv", "cp1252"), ("utf16.csv", "utf-16"), ("cp1252.jsonl", "cp1252")):
        body = text if name.endswith(".csv") else json.dumps(
            {"sentence1": "Caf\u00e9", "sentence2": "x", "gold_label": "neutral"}, ensure_ascii=False) + "\n"
        (tmp_path / name).write_bytes(body.encode(encoding))
        for read in (load_mnli, local_columns):
            with pytest.raises(ValueError, match=f"{name} is not UTF-8 text .*Save it again as UTF-8"):
                read(tmp_path / name)
    (tmp_path / "bom.csv").write_bytes(text.encode("utf-8-sig"))  # a byte-order mark is UTF-8: read
    assert local_columns(tmp_path / "bom.csv") == ["sentence1", "sentence2", "gold_label"]
    assert load_mnli(tmp_path / "bom.csv")[0]["premise"] == "Caf\u00e9 open."


# ---------------------------------------------------------------------------------------------- ANLI
def test_anli_official_jsonl(tmp_path):
    records = [
        {"uid": "a", "context": "C1", "hypothesis": "H1", "label": "e", "reason": ""},
        {"uid": "b", "context": "C2", "hypothesis": "H2", "label": "n", "reason": ""},
        {"uid": "c", "context": "C3", "hypothesis": "H3", "label": "c", "reason": ""},
    ]
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    anli = load_anli(path, split="train_r2")
    assert list(anli["premise"]) == ["C1", "C2", "C3"] and list(anli["label"]) == [0, 1, 2]
    assert list(anli["genre"]) == ["anli_r2"] * 3
    assert list(load_anli(path, num_labels=2)["label"]) == [0, 1, 1]


# ------------------------------------------------------------------------------------- bad sources
def test_unknown_extension(tmp_path):
    path = tmp_path / "mnli.xlsx"
    path.write_bytes(b"not a table")
    with pytest.raises(ValueError, match=r"Unknown file extension '\.xlsx'.*Supported: \.jsonl"):
        load_mnli(path)


def test_hub_id_while_offline_asks_for_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset must not be called while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    for load, name in ((load_mnli, "nyu-mll/multi_nli"), (load_anli, "facebook/anli"), (load_hans, "hans")):
        with pytest.raises(ValueError, match="offline.*Pass a local file path.*go online"):
            load(name)


def test_missing_local_path(tmp_path):
    for missing in (tmp_path / "mnli.jsonl", "./data/mnli.jsonl", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="No such file") as error:
            load_mnli(missing)
        assert str(missing).lstrip("./") in str(error.value)
    with pytest.raises(ValueError, match="is a directory"):
        load_hans(tmp_path)


def test_a_saved_dataset_folder_is_read(tmp_path):
    """A folder written by save_to_disk was refused with advice to pass a data file inside it, whose only data files
    (.arrow) are refused too. It is read with datasets.load_from_disk, a DatasetDict's split by name."""
    rows = Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [1, 0]},
                             features=Features({"premise": Value("string"), "hypothesis": Value("string"),
                                                "label": ClassLabel(names=["neutral", "entailment"])}))
    rows.save_to_disk(str(tmp_path / "saved"))
    loaded = load_mnli(tmp_path / "saved")
    # labels by the saved ClassLabel's names, in MNLI's order (entailment 0, neutral 1)
    assert list(loaded["premise"]) == ["p1", "p2"] and list(loaded["label"]) == [0, 1]
    datasets.DatasetDict({"train": rows, "dev": rows.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert list(load_mnli(tmp_path / "dict", split="dev")["premise"]) == ["p2"]
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'dev'\], not 'test'"):
        load_mnli(tmp_path / "dict", split="test")


# ---------------------------------------------------------------------------------------- split_hans
def _hans_like(n_per_subcase=10):
    subcases = ["ln_a", "le_b", "sn_c"]
    return Dataset.from_dict(
        {
            "premise": [f"p{i}" for i in range(3 * n_per_subcase)],
            "hypothesis": ["h"] * (3 * n_per_subcase),
            "subcase": [s for s in subcases for _ in range(n_per_subcase)],
            "pair_id": [f"ex{i}" for i in range(3 * n_per_subcase)],
        }
    )


def test_split_hans_is_stratified_disjoint_and_seeded():
    hans = _hans_like()
    splits = split_hans(hans, validation_fraction=0.3, seed=0)
    validation, test = set(splits["validation"]["pair_id"]), set(splits["test"]["pair_id"])
    assert not validation & test and validation | test == set(hans["pair_id"])
    for subcase in ("ln_a", "le_b", "sn_c"):
        assert list(splits["validation"]["subcase"]).count(subcase) == 3
        assert list(splits["test"]["subcase"]).count(subcase) == 7
    assert split_hans(hans, 0.3, seed=0)["validation"]["pair_id"] == splits["validation"]["pair_id"]
    assert split_hans(hans, 0.3, seed=1)["validation"]["pair_id"] != splits["validation"]["pair_id"]


def test_split_hans_bad_input():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_hans(_hans_like(), validation_fraction=1.0)
    with pytest.raises(ValueError, match="needs a 'subcase' column.*load_hans"):
        split_hans(_hans_like().remove_columns("subcase"))
    # 0.99 of 10 rows rounds to all 10: an empty test split, named with the flag (it failed later, naming none)
    with pytest.raises(ValueError, match=r"validation_fraction=0\.99 leaves the test split empty .*10-10 rows"):
        split_hans(_hans_like(), validation_fraction=0.99)


def test_delimited_files_are_read_row_for_row(tmp_path):
    """A tab inside the first row's text (a csv writer's quotes do not protect it in the unquoted format) made pandas
    take the first column as an index: every row shifted one column left, 19 of 20 lost their labels and were dropped
    with an info line, and the build went on with one row. An empty csv / tsv field was read as the text ''."""
    import pandas as pd

    frame = pd.DataFrame({"premise": ["The judge\tslept.", "The doctor ran."], "hypothesis": ["A judge slept.", "x"],
                          "label": [0, 1]})
    frame.to_csv(tmp_path / "tab.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"tab\.tsv: line 2 has 4 tab-separated fields, the header 3"):
        load_mnli(tmp_path / "tab.tsv", num_labels=2)
    frame.assign(premise=["The judge slept.", ""]).to_csv(tmp_path / "empty.tsv", sep="\t", index=False)
    frame.assign(premise=["The judge slept.", ""]).to_csv(tmp_path / "empty.csv", index=False)
    for name in ("empty.tsv", "empty.csv"):
        with pytest.raises(ValueError, match=r"1 row\(s\) have no 'premise' text .* rows 1 "):
            load_mnli(tmp_path / name, num_labels=2)
    frame.assign(premise=["The judge slept.", "The doctor ran."]).to_csv(tmp_path / "good.tsv", sep="\t", index=False)
    assert load_mnli(tmp_path / "good.tsv", num_labels=2)["premise"] == ["The judge slept.", "The doctor ran."]


def test_json_files_as_pandas_and_notepad_write_them(tmp_path):
    """pandas' default DataFrame.to_json() (one object of columns) crashed with "unhashable type: 'dict'"; a jsonl
    with a byte-order mark failed ("Unexpected UTF-8 BOM"); a broken line was reported as "line 1" of no file."""
    import pandas as pd

    frame = pd.DataFrame({"premise": ["The judge slept.", "The doctor ran."], "hypothesis": ["A judge slept.", "x"],
                          "label": [0, 1]})
    frame.to_json(tmp_path / "columns.json")
    assert load_mnli(tmp_path / "columns.json", num_labels=2)["premise"] == list(frame.premise)
    lines = frame.to_json(orient="records", lines=True)
    (tmp_path / "bom.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    assert load_mnli(tmp_path / "bom.jsonl", num_labels=2)["hypothesis"] == list(frame.hypothesis)
    (tmp_path / "one.json").write_text(json.dumps(frame.iloc[0].to_dict(), indent=2), encoding="utf-8")
    assert load_mnli(tmp_path / "one.json", num_labels=2)["premise"] == ["The judge slept."]  # one record, pretty
    (tmp_path / "uneven.json").write_text(json.dumps({"premise": ["a", "b"], "hypothesis": ["c"], "label": [0, 1]}))
    with pytest.raises(ValueError, match=r"uneven\.json: its columns are of different lengths"):
        load_mnli(tmp_path / "uneven.json", num_labels=2)
    (tmp_path / "cut.jsonl").write_text(lines + '{"premise": "cut', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut\.jsonl: line 3 is not a JSON record"):
        load_mnli(tmp_path / "cut.jsonl", num_labels=2)
