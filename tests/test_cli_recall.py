"""``hf-fastif recall``: the candidate-recall table for a model + data files (a tiny BERT, seconds) and for the
fine-tuned MiniLM default (tiny sizes), and bad input refused before any work."""

from __future__ import annotations

import argparse
import json

import pytest

import hf_fastif.cli as cli
from hf_fastif.cli import main
from hf_fastif.recall import parse_k, resolve_ks

TINY_PARAMS = ["--influence_params", r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]
CG = ["--influence_solver", "cg", "--influence_damping", "1", "--influence_scale", "1"]  # λ 1: an untrained model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny untrained BERT with the generated data's word-level tokenizer, 120 training rows and 30 HANS-style
    rows as files, as a user passes them."""
    from hf_fastif.data import build_tokenizer, generate_nli
    from hf_fastif.embedded import embedded_model

    folder = tmp_path_factory.mktemp("recall")
    tokenizer = build_tokenizer()
    model = embedded_model(tokenizer, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    raw = generate_nli(seed=0, n_train=120, n_hans_per_subcase=1, n_pool_per_subcase=0)
    raw["train"].to_json(folder / "train.jsonl")
    raw["hans"].to_json(folder / "hans.jsonl")
    return {"--model_name_or_path": str(folder / "model"), "--train_dataset": str(folder / "train.jsonl"),
            "--test_dataset": str(folder / "hans.jsonl")}


def flags(files: dict[str, str]) -> list[str]:
    return [part for pair in files.items() for part in pair]


def table_rows(out: str) -> list[list[str]]:
    """The markdown table's body rows, split into cells."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_recall_prints_a_row_per_method_and_k(files, capsys, tmp_path) -> None:
    """... and writes them to --output_dir (accepted, and nothing was written)."""
    argv = ["recall", *flags(files), "--num_test_points", "3", "--ks", "10", "25%", "100%", "--methods", "auto",
            "gradient", "random", "--influence_projection_dim", "512", *TINY_PARAMS, *CG,
            "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "recall.json").read_text())
    assert (tmp_path / "out" / "recall.md").read_text().strip() in out
    assert written["n_train"] == 120 and len(written["test_rows"]) == 3 and written["recall_ns"] == [10, 100]
    assert [(r["method"], r["k"]) for r in written["rows"]] == [(m, k) for m in ("auto", "gradient", "random")
                                                                 for k in (10, 30, 120)]
    assert written["influence"]["influence_projection_dim"] == 512
    assert "N 120 training rows · 3 test points" in out and "projection 512" in out
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert header == ("| method | k | k/N | recall@10 helpful | recall@10 harmful | recall@100 helpful | recall@100 "
                      "harmful | random expectation | build s | query s |")
    rows = table_rows(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, k, f) for m in ("auto", "gradient", "random")
                                                   for k, f in (("10", "8.3%"), ("30", "25.0%"), ("120", "100.0%"))]
    for row in rows:
        recalls = [float(v) for v in row[3:7]]
        assert all(0.0 <= v <= 1.0 for v in recalls)
        assert float(row[7]) == pytest.approx(int(row[1]) / 120, abs=1e-3)
        assert float(row[8]) >= 0 and float(row[9]) >= 0
        if row[1] == "120":  # every row is a candidate: the full scan's top rows are all found
            assert recalls == [1.0, 1.0, 1.0, 1.0]
    # k candidates hold at most k of the full scan's 100 most helpful rows
    assert all(float(r[5]) <= int(r[1]) / 100 + 1e-9 for r in rows)


def test_recall_default_fine_tunes_minilm(capsys) -> None:
    argv = ["recall", "--max_train_samples", "40", "--num_test_points", "2", "--ks", "10%", "--methods", "random",
            "auto", "--influence_recursion_depth", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 fine-tuned on 40 generated NLI rows · N 40 training rows · 2 test points" in out
    assert "lissa J 2, B 8, T 1, λ 10" in out  # the MiniLM settings, with the flag given winning
    assert "| recall@10 helpful | recall@10 harmful | recall@40 helpful | recall@40 harmful |" in out  # n <= N
    assert [(r[0], r[1]) for r in table_rows(out)] == [("random", "4"), ("auto", "4")]


class _NoWork:
    """Stands in for the model loader and the engine: any use means the checks came too late."""

    def __getattr__(self, name):
        raise AssertionError(f"work started ({name}) before the input was checked")

    def __call__(self, *args, **kwargs):
        raise AssertionError("work started before the input was checked")


@pytest.mark.parametrize(("extra", "message"), [
    (["--ks", "0"], "k='0' is not a number of candidates"),
    (["--ks", "5%", "150%"], "k='150%' is not a number of candidates"),
    (["--ks", "0%"], "k='0%'"),
    (["--ks", "2.5"], "k='2.5'"),
    (["--methods", "auto", "nearest"], "Unknown candidate method(s) 'nearest'; use any of auto, pooler, cls, mean, "
                                       "last, gradient, random"),
    (["--ks", "121"], "k=121 exceeds the 120 candidate rows"),
    (["--num_test_points", "0"], "--num_test_points must be at least 1"),
    (["--output_dir", __file__], f"--output_dir {__file__!r} is an existing file, not a folder"),
    (["--methods", "gradient", "--influence_projection_dim", "100000"],
     "--influence_projection_dim 100000 must be between 1 and the number of influence parameters"),
])
def test_bad_input_is_refused_before_work(files, monkeypatch, capsys, extra, message) -> None:
    monkeypatch.setattr(cli, "InfluenceEngine", _NoWork())
    if "--influence_projection_dim" not in extra:  # that check needs the model (its parameter count)
        monkeypatch.setattr(cli, "AutoModelForSequenceClassification", _NoWork())
    assert main(["recall", *flags(files), *TINY_PARAMS, *extra]) == 2
    err = capsys.readouterr().err
    assert "hf-fastif recall: error: " + message in err


def test_default_setup_checks_k_before_fine_tuning(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "finetuned_minilm", _NoWork())
    assert main(["recall", "--max_train_samples", "100", "--ks", "101"]) == 2
    assert "k=101 exceeds the 100 candidate rows" in capsys.readouterr().err
    assert main(["recall", "--train_dataset", "t.jsonl"]) == 2
    assert "need --model_name_or_path" in capsys.readouterr().err


def test_k_specs() -> None:
    assert parse_k("20") == ("count", 20) and parse_k(" 5% ") == ("share", 5.0) and parse_k(7) == ("count", 7)
    assert resolve_ks(["1%", "5%", "10%", "33%"], 2000) == [20, 100, 200, 660]
    assert resolve_ks(["0.01%", "1", "100%"], 50) == [1, 50]  # rounded up to 1; duplicates kept once
    for bad in ("-3", "abc", "nan%", "100.5%", ""):
        with pytest.raises(ValueError, match="is not a number of candidates"):
            parse_k(bad)
    with pytest.raises(ValueError, match="at least one k"):
        resolve_ks([], 10)


def test_recall_is_listed_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{build,push,pull,show,recall,cache}" in out and "hf-fastif recall --ks 1% 5%" in out


def test_nli_data_refuses_a_model_whose_labels_the_data_would_misread(tmp_path):
    """MNLI-format data is 0 = entailment, 1 = neutral, 2 = contradiction (or 1 = non_entailment): a checkpoint
    with another order, or a 3-label one asked about HANS (whose 1 is non-entailment), would be trained against
    and measured on the wrong classes without a word."""
    from types import SimpleNamespace

    from transformers import BertConfig

    from hf_fastif.data import generate_nli

    raw = generate_nli(seed=0, n_train=30, n_hans_per_subcase=1, n_pool_per_subcase=0)
    raw["train"].to_json(tmp_path / "train.jsonl")
    raw["hans"].select(range(4)).to_json(tmp_path / "hans.jsonl")
    source = SimpleNamespace(train_dataset=str(tmp_path / "train.jsonl"), train_split="train",
                             test_dataset=str(tmp_path / "hans.jsonl"), test_split="validation")
    flipped = BertConfig(num_labels=3, id2label={0: "contradiction", 1: "neutral", 2: "entailment"})
    with pytest.raises(ValueError, match=r"\['contradiction', 'neutral', 'entailment'\].*0 = entailment, 1 = neutral"):
        cli._nli_data(flipped, source)
    with pytest.raises(ValueError, match="is HANS .* but the model has 3 labels"):
        cli._nli_data(BertConfig(num_labels=3, id2label={0: "entailment", 1: "neutral", 2: "contradiction"}), source)
    train, test = cli._nli_data(BertConfig(num_labels=2, id2label={0: "entailment", 1: "non-entailment"}), source)
    assert len(train) == 30 and len(test) == 4 and set(test["label"]) <= {0, 1}
    generic, _ = cli._nli_data(BertConfig(num_labels=2), source)  # LABEL_0, LABEL_1: nothing to check
    assert len(generic) == 30
    # HANS that load_hans refuses (the Hub's columns in a tab-separated file) was read as MNLI: for a 3-label model
    # every non-entailment row became neutral
    raw["hans"].select(range(4)).to_pandas().to_csv(tmp_path / "hans.tsv", sep="\t", index=False)
    source.test_dataset = str(tmp_path / "hans.tsv")
    with pytest.raises(ValueError, match="Not an official HANS file"):
        cli._nli_data(BertConfig(num_labels=3, id2label={0: "entailment", 1: "neutral", 2: "contradiction"}), source)


def test_the_recall_model_is_the_builds(tmp_path) -> None:
    """Without a model, ``hf-fastif recall`` and ``benchmarks.recall`` measure the MiniLM that ``hf-fastif build``'s
    embedded default and the Space fine-tune (same settings, rows and seed: one cached model). The command line's
    took `TrainingArguments`' zero warm-up and weight decay (another model than the build's, under its own key),
    the benchmark trained the build's settings outside the cache, and the docs described the first."""
    from benchmarks.arguments import parse_with_defaults
    from benchmarks.recall import RecallBenchmarkArguments, recall_defaults
    from hf_fastif import InfluenceArguments
    from hf_fastif.embedded import embedded_arguments, embedded_kind, finetune_settings
    from hf_fastif.recall import MINILM_RECALL_N_TRAIN, MINILM_RECALL_SETTINGS

    build = embedded_arguments(str(tmp_path), use="table", kind="minilm")
    _, bench = parse_with_defaults((RecallBenchmarkArguments, InfluenceArguments), recall_defaults,
                                   ["--output_dir", str(tmp_path)])
    no_model = argparse.Namespace(model_name_or_path=None)
    assert cli.recall_defaults(no_model) is MINILM_RECALL_SETTINGS
    command_line = InfluenceArguments(output_dir=str(tmp_path), **MINILM_RECALL_SETTINGS)
    for args in (bench, command_line):
        assert finetune_settings(args) == finetune_settings(build)
        assert finetune_settings(args).warmup_ratio == 0.1 and finetune_settings(args).weight_decay == 0.01
    assert MINILM_RECALL_N_TRAIN == embedded_kind("minilm").table_data["n_train"]
