"""The hf-fastif command: build (embedded default, and a model + data files), show, push / pull through the
loopback Hub double, and errors as one-line messages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hf_fastif import InfluenceTable
from hf_fastif.cli import main
from hf_fastif.utils import BUILD_LOCK
from tests.helpers import sign_table
from tests.hub_server import HubServer, hub_server_fixture, run_client  # noqa: F401 (fixture)

SMALL = ["--max_train_samples", "300", "--num_train_epochs", "1", "--influence_knn_k", "20",
         "--influence_recursion_depth", "10"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "embedded"
    assert main(["build", "--output-dir", str(out), *SMALL]) == 0
    return out


def test_the_build_says_its_stages(tmp_path, capsys) -> None:
    assert main(["build", "--output-dir", str(tmp_path / "b"), "--embedded_model", "tiny", "--max_train_samples",
                 "60", "--max_test_samples", "2", "--num_train_epochs", "1", "--influence_knn_k", "8"]) == 0
    err = capsys.readouterr().err
    assert "[hf-fastif] generating the training data" in err
    assert "[hf-fastif] computing the influence table of 2 test rows over 60 training rows" in err


@pytest.mark.usefixtures("propagating")
def test_a_build_whose_model_learned_nothing_says_so(tmp_path, caplog) -> None:
    """60 rows, one epoch: the tiny model stays at chance, and its table ranks the rows by noise; the build says so
    and records the training accuracy (a new user's 200-row build came back without a word)."""
    from hf_fastif.applications.common import at_chance

    with caplog.at_level("WARNING"):
        assert main(["build", "--output-dir", str(tmp_path / "b"), "--embedded_model", "tiny",
                     "--max_train_samples", "60", "--max_test_samples", "2", "--num_train_epochs", "1",
                     "--influence_knn_k", "8"]) == 0
    accuracy = InfluenceTable.load(tmp_path / "b" / "table").metadata["embedded_build"]["fine_tuning"]["train_accuracy"]
    assert 0 <= accuracy <= 1
    labels = pd.read_parquet(tmp_path / "b" / "train.parquet")["label"].to_numpy()
    assert at_chance(accuracy, labels) is not None  # (seeded: this model is at chance)
    assert "no better than always predicting its commonest label" in caplog.text
    assert at_chance(0.5, [0, 1, 0, 1, -100]) and at_chance(0.52, [0, 1, 0, 1]) and not at_chance(0.55, [0, 1, 0, 1])
    assert at_chance(0.7, [0, 0, 0, 1]) and not at_chance(0.8, [0, 0, 0, 1])


def test_a_build_folder_it_cannot_write_is_refused_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    """A file where the build writes its ``model`` folder: ``save_pretrained`` only logged it and the build reported
    the model saved (exit 0); a ``table`` file failed once the table was computed ("Not a directory"); an existing
    file as --output_dir failed with a bare "[Errno 17] File exists"."""
    import hf_fastif.space.build

    monkeypatch.setattr(hf_fastif.space.build, "embedded_data", _no_work)  # the first step of the work, read there
    tiny = ["--embedded_model", "tiny", "--max_train_samples", "60", "--max_test_samples", "2"]
    (tmp_path / "afile").write_text("")
    assert main(["build", "--output-dir", str(tmp_path / "afile"), *tiny]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    for entry, kind in (("model", "folder"), ("table", "folder"), ("train.parquet", "file")):
        out = tmp_path / entry.replace(".", "_")
        (out / entry).parent.mkdir()
        (out / entry).mkdir() if kind == "file" else (out / entry).write_text("")
        assert main(["build", "--output-dir", str(out), *tiny]) == 2
        assert f"where the build writes its {entry} {kind}" in capsys.readouterr().err


def test_a_model_build_folder_it_cannot_write_is_refused_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    """A ``--model_name_or_path`` build with a file at ``<output_dir>/table`` computed every shard and then failed with
    a bare "[Errno 20] Not a directory" (nothing lost: a rerun resumed them); a file at ``build`` is refused too."""
    import hf_fastif.cli

    monkeypatch.setattr(hf_fastif.cli, "resolve_model", _no_work)  # the first step of the work
    for entry in ("table", "build"):
        out = tmp_path / entry
        out.mkdir()
        (out / entry).write_text("")
        assert main(["build", "--output-dir", str(out), "--model_name_or_path", "m", "--train_dataset", "t.jsonl",
                     "--test_dataset", "h.jsonl"]) == 2
        assert f"{out / entry} is a file, where the build writes its {entry} folder" in capsys.readouterr().err


def test_a_finished_build_missing_its_model_is_built_again(tmp_path, capsys, caplog) -> None:
    """A finished build whose ``model/`` a user removed was "reused" with nothing recreated, and the CLI printed the
    missing model's path."""
    import shutil

    out = tmp_path / "b"
    tiny = ["build", "--output-dir", str(out), "--embedded_model", "tiny", "--max_train_samples", "60",
            "--max_test_samples", "2", "--num_train_epochs", "1", "--influence_knn_k", "8"]
    reused = "[hf-fastif] reusing the finished build"
    assert main(tiny) == 0
    shutil.rmtree(out / "model")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="hf_fastif.space"):
        assert main(tiny) == 0
    assert reused not in capsys.readouterr().err and "(model/config.json, model/ weights missing)" in caplog.text
    assert (out / "model" / "config.json").is_file() and any((out / "model").glob("*.safetensors"))
    (out / "train.parquet").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fastif.space"):
        assert main(tiny) == 0
    assert reused not in capsys.readouterr().err and "(train.parquet missing)" in caplog.text
    assert (out / "train.parquet").is_file()
    assert main(tiny) == 0
    assert reused in capsys.readouterr().err


def _no_work(*args, **kwargs):
    raise AssertionError("the build started its work")


def test_a_build_with_other_training_settings_is_not_reused(tmp_path, capsys) -> None:
    """A finished build was reused when only a training setting outside epochs / learning rate / batch size changed
    (`--weight_decay`, `--warmup_steps`, `--max_steps`, `--optim`), with "the same settings and model": the old
    model and table. Every setting the model depends on now keys the build."""
    from hf_fastif.embedded import embedded_arguments, training_settings

    out = tmp_path / "b"
    tiny = ["build", "--output-dir", str(out), "--embedded_model", "tiny", "--max_train_samples", "60",
            "--max_test_samples", "2", "--num_train_epochs", "1", "--influence_knn_k", "8"]
    assert main(tiny) == 0
    first = InfluenceTable.load(out / "table").to_pandas().influence.to_numpy()
    capsys.readouterr()
    assert main([*tiny, "--max_steps", "1", "--optim", "sgd"]) == 0
    assert "reusing the finished build" not in capsys.readouterr().err
    assert (InfluenceTable.load(out / "table").to_pandas().influence.to_numpy() != first).any()
    month_ago = time.time() - 30 * 86400
    os.utime(out / "ready.json", (month_ago, month_ago))
    assert main([*tiny, "--max_steps", "1", "--optim", "sgd"]) == 0
    assert "reusing the finished build" in capsys.readouterr().err
    assert (out / "ready.json").stat().st_mtime > month_ago + 86400  # a reuse is recorded: --unused-days reads it
    # the label smoothing changes the influence loss (MiniLM's fine-tuning key does not hold it)
    from hf_fastif.space import build_config

    smoothed = embedded_arguments(str(tmp_path), use="table", label_smoothing_factor=0.3)
    plain = embedded_arguments(str(tmp_path), use="table")
    assert training_settings(smoothed, "minilm") == training_settings(plain, "minilm")
    assert build_config(smoothed, "minilm", {}, None, True) != build_config(plain, "minilm", {}, None, True)
    # MiniLM's build is keyed on what its fine-tuning cache is keyed on (warm-up, weight decay, data seed, ...)
    base = embedded_arguments(str(tmp_path), use="table")
    for field, value in (("warmup_steps", 0.3), ("weight_decay", 0.3), ("data_seed", 7)):
        other = embedded_arguments(str(tmp_path), use="table", **{field: value})
        assert training_settings(other, "minilm") != training_settings(base, "minilm")
    assert training_settings(embedded_arguments(str(tmp_path / "x"), use="table", logging_steps=3), "tiny") == \
        training_settings(embedded_arguments(str(tmp_path), use="table"), "tiny")
    # a build trained under 2 processes (twice the rows per step) is not reused by one process, nor the other way
    import hf_fastif.distributed

    alone = {kind: training_settings(base, kind) for kind in ("tiny", "minilm")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_fastif.distributed, "world", lambda: (0, 2))
        assert all(training_settings(base, kind) != alone[kind] for kind in alone)


def test_build_embedded_default_then_show(built: Path, capsys) -> None:
    # each stage is said as it starts (the build was silent for a minute), and a rerun says it reuses the build
    assert main(["build", "--output-dir", str(built), *SMALL]) == 0
    assert f"[hf-fastif] reusing the finished build in {built}" in capsys.readouterr().err
    table = InfluenceTable.load(built / "table")
    assert len(table.test_ids) == 30 and len(table) == 30 * 20
    assert table.metadata["settings"]["influence_recursion_depth"] == 10
    # the paper's 4 LiSSA repetitions (one reordered the default table's rows: docs/benchmarks.md)
    assert table.metadata["settings"]["influence_repetitions"] == 4
    assert table.metadata["label_names"] == ["entailment", "non_entailment"]
    # the embedded default is the fine-tuned MiniLM (22.7M parameters), influence over its pooler and classifier
    assert table.metadata["embedded_build"]["kind"] == "minilm"
    assert table.metadata["model"]["num_parameters"] == 22_713_986
    assert table.metadata["model"]["num_influence_parameters"] == 148_610
    assert {"train_premise", "test_hypothesis", "test_prediction", "test_heuristic"} <= set(table.column_names)

    assert main(["show", str(built / "table"), "--test-id", "7", "-n", "3"]) == 0
    out = capsys.readouterr().out
    test = table.tests().set_index("test_id").loc[7]
    assert f"premise: {test.test_premise}" in out and "most helpful" in out and "most harmful" in out
    lines = out.splitlines()
    helpful = lines[lines.index("most helpful (negative influence first)") + 3]  # header, rule, first row
    top = table.helpful(7, 1).iloc[0]
    assert helpful.split()[:3] == ["1", str(top.train_id), f"{top.influence:+.4e}"]
    assert ("non_entailment" in helpful) or ("entailment" in helpful)  # label names, not ids
    # the default table's candidates come from the gradient index (the paper's [CLS] kNN held ~1-4% of the truly
    # most helpful / harmful rows), and `show` says how they were chosen: half from each end
    assert table.metadata["diagnostics"]["candidates"] == "gradient"
    assert "Candidates: the 20 of the 300 training rows whose projected gradient points most along -s_test " \
           "(half)" in " ".join(out.split())

    assert main(["show", str(built / "table"), "--list"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]) == 30


def test_build_from_a_model_and_data_files(built: Path, tmp_path: Path, capsys) -> None:
    from hf_fastif.data import generate_nli

    raw = generate_nli(seed=0, n_train=300, n_hans_per_subcase=1, n_pool_per_subcase=0)  # the model's data
    raw["train"].to_json(tmp_path / "train.jsonl")
    raw["hans"].select(range(4)).to_json(tmp_path / "hans.jsonl")
    out = tmp_path / "model_build"
    args = ["build", "--output-dir", str(out), "--model_name_or_path", str(built / "model"), "--train_dataset",
            str(tmp_path / "train.jsonl"), "--test-dataset", str(tmp_path / "hans.jsonl"), "--shard_size", "3",
            "--influence_knn_k", "10", "--influence_solver", "cg", "--influence_params", r"pooler\.", r"classifier\."]
    assert main(args) == 0
    table = InfluenceTable.load(out / "table")
    assert table.test_ids == [0, 1, 2, 3] and len(table) == 40
    assert table.metadata["model"]["name_or_path"] == str(built / "model")
    assert table.metadata["settings"]["influence_solver"] == "cg"
    assert table.tests().test_premise.tolist() == raw["hans"]["premise"][:4]
    assert len(list((out / "build" / "shards").glob("shard-*/influence_metadata.json"))) == 2  # shards of 3 test rows
    from transformers import AutoModelForSequenceClassification

    table.check_model(AutoModelForSequenceClassification.from_pretrained(built / "model"))
    capsys.readouterr()
    assert main(["show", str(out / "table"), "-n", "2"]) == 0  # kNN candidates (auto): said, with the way out
    assert "Candidates: the 10 of the 300 training rows nearest in the model's feature space (auto)" in " ".join(
        capsys.readouterr().out.split())
    # a model folder that does not exist: one line, not from_pretrained's traceback
    args[args.index("--model_name_or_path") + 1] = str(tmp_path / "no-such-model")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-fastif build: error:") and "no-such-model" in err[-1] and "Traceback" not in err[0]


def test_errors_are_one_line_messages(built: Path, tmp_path: Path, capsys) -> None:
    assert main(["show", str(built / "table"), "--test-id", "99"]) == 2
    assert "error: test_id 99 is not in this table" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 2  # a path that does not exist: not called a Hub repo id
    assert f"There is no folder '{tmp_path / 'nothing'}'" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["show", str(tmp_path / "file")]) == 2
    assert "is not a table folder" in capsys.readouterr().err
    assert main(["show", "out/no-such-table"]) == 2  # a relative path or a Hub id: both tried, both named
    assert "Nor is there a local folder 'out/no-such-table'" in capsys.readouterr().err
    assert main(["show", str(built)]) == 2  # a folder, but not a table: a build, whose table is named
    err = capsys.readouterr().err
    assert "is not an influence table" in err and f"It holds a build; its table is {built / 'table'}" in err
    # an unknown test id or -n below 1: refused before anything is printed (the table's summary line came first)
    for flags in (["--test-id", "99"], ["-n", "0"]):
        assert main(["show", str(built / "table"), *flags]) == 2
        assert capsys.readouterr().out == ""
    # row counts below 1: refused before any work (0 meant every row, without a word; -2 failed after the model)
    for command in (["build", "--output-dir", str(tmp_path / "e1"), "--max_train_samples", "0"],
                    ["build", "--output-dir", str(tmp_path / "e2"), "--max_test_samples", "-2"],
                    ["recall", "--max_train_samples", "0"], ["recall", "--num_test_points", "0"]):
        assert main(command) == 2
        flag = command[-2]
        assert f"error: {flag} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    assert main(["build", "--output-dir", str(tmp_path / "x"), "--train_dataset", "t.jsonl"]) == 2
    assert "need --model_name_or_path" in capsys.readouterr().err
    # it was accepted and ignored by the embedded default
    for flag in (["--shard_size", "5"], ["--shard_size=5"], ["--shard-size", "5"], ["--shard_s", "5"]):
        assert main(["build", "--output-dir", str(tmp_path / "x"), "--embedded_model", "tiny", *flag]) == 2
        assert "--shard_size needs --model_name_or_path" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["build", "--train_dataset", "t.jsonl"]) == 2
    assert "build needs --output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--output-dir", str(tmp_path / "x"), "--influence_solver"])  # argparse: usage + exit 2


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-fastif"]
    assert script.load() is main and (Path(sys.executable).parent / "hf-fastif").is_file()


PUSH_PULL_SHOW = """
import sys
from hf_fastif.cli import main
table, repo, copy = sys.argv[1:4]
assert main(["push", table, repo, "--private"]) == 0
assert main(["pull", repo, "--output-dir", copy]) == 0
assert main(["show", repo, "--test-id", "2", "-n", "2", "--side", "harmful"]) == 0
assert main(["pull", repo, "--revision", "no-such-tag"]) == 2
assert main(["push", table, "bare-table"]) == 0  # created under the token's namespace: the id printed is that one
"""


def test_push_pull_show_through_the_hub(built: Path, hub_server: HubServer, tmp_path: Path) -> None:
    done = run_client(PUSH_PULL_SHOW, hub_server, tmp_path / "client",
                      args=[str(built / "table"), "test-user/cli-table", str(tmp_path / "copy")])
    table = InfluenceTable.load(built / "table")
    assert "pushed 600 rows to dataset test-user/cli-table at commit " + hub_server.head("test-user/cli-table") \
        in done.stdout
    assert InfluenceTable.load(tmp_path / "copy").to_pandas().equals(table.to_pandas())
    assert "most harmful" in done.stdout and "most helpful" not in done.stdout
    assert str(table.harmful(2, 1).train_id.iloc[0]) in done.stdout
    assert "error: Revision 'no-such-tag' does not exist" in done.stderr
    assert hub_server.token not in done.stdout + done.stderr
    meta = json.loads(hub_server.files("test-user/cli-table")["influence_metadata.json"])
    assert meta["storage"]["num_rows"] == 600
    # a bare name: the printed id and load hint were 'bare-table', which from_hub / pull cannot find
    assert f"pushed 600 rows to dataset test-user/bare-table at commit {hub_server.head('test-user/bare-table')}" \
        in done.stdout and "InfluenceTable.from_hub('test-user/bare-table', revision=" in done.stdout


@pytest.mark.parametrize("command", ["build", "recall"])
def test_a_model_folder_that_does_not_exist_is_named(tmp_path, capsys, command) -> None:
    """transformers' own message was "We couldn't connect to 'https://huggingface.co' ... Check your internet
    connection" for a mistyped local folder."""
    missing = str(tmp_path / "nomodel")
    assert main([command, "--output_dir", str(tmp_path / "out"), "--model_name_or_path", missing, "--train_dataset",
                 "train.jsonl", "--test_dataset", "test.jsonl"]) == 2
    err = capsys.readouterr().err
    assert f"{missing!r} is not a local directory, so it would come from the Hugging Face Hub, but the Hub is " \
           "offline (HF_HUB_OFFLINE) and it is not in the local cache" in err
    assert "couldn't connect" not in err


def test_pull_refuses_an_output_dir_that_is_a_file_before_the_download(tmp_path, monkeypatch, capsys) -> None:
    """It failed after the download with "[Errno 20] Not a directory: 'afile/data'"."""
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before the output folder was checked")

    monkeypatch.setattr(InfluenceTable, "from_hub", no_download)
    (tmp_path / "afile").write_text("")
    assert main(["pull", "test-user/t", "--output-dir", str(tmp_path / "afile")]) == 2
    assert f"error: --output-dir {str(tmp_path / 'afile')!r} is an existing file, not a folder" in \
        capsys.readouterr().err


def test_the_recorded_command_leaves_secrets_out() -> None:
    """build recorded its raw command line in the table's metadata, a --hub_token with it, and push published it;
    run as `python -m hf_fastif` (the same command, the README says) it recorded nothing."""
    from hf_fastif.cli import parser, recorded_command

    argv = ["/venv/bin/hf-fastif", "build", "--hub_token", "hf_SECRET", "--output_dir", "o", "--hub-token=hf_X",
            "--tokenizer_name", "t", "--push_to_hub_token", "hf_Y"]
    recorded = recorded_command(argv)
    assert recorded == ("hf-fastif build --hub_token *** --output_dir o --hub-token=*** --tokenizer_name t "
                        "--push_to_hub_token ***")
    # argparse takes a unique prefix of a flag: `--hub_tok SECRET` set --hub_token and was recorded as typed
    assert parser().parse_args(["build", "--output_dir", "o", "--hub_tok", "hf_Z"]).hub_token == "hf_Z"
    assert recorded_command(["/venv/bin/hf-fastif", "build", "--hub_tok", "hf_Z", "--hub-to=hf_W", "--seed", "3"]) == \
        "hf-fastif build --hub_tok *** --hub-to=*** --seed 3"
    assert recorded_command([str(Path("hf_fastif") / "__main__.py"), "build", "--output_dir", "o"]) == \
        "hf-fastif build --output_dir o"
    assert recorded_command(["pytest", "build"]) is None


def test_build_options_survive_an_earlier_parse_of_influence_arguments() -> None:
    from transformers import HfArgumentParser

    from hf_fastif import InfluenceArguments
    from hf_fastif.cli import parser

    HfArgumentParser(InfluenceArguments)  # resolves and narrows InfluenceArguments' Field.type in place
    ns = parser().parse_args(["build", "--output_dir", "out", "--influence_params", "a", "b",
                              "--influence_knn_k", "5"])
    assert ns.influence_params == ["a", "b"]
    # (the int-or-None fields are read as text on the command line, so 'None' can pass; the arguments convert them)
    assert InfluenceArguments(output_dir="out", influence_knn_k=ns.influence_knn_k).influence_knn_k == 5


def test_dashed_options_take_the_underscore_spelling_as_build_does() -> None:
    """build (HfArgumentParser) takes --output_dir and --output-dir; pull refused `--output_dir` as unrecognised,
    show `--test_id`."""
    from hf_fastif.cli import parser

    for spelling in ("-", "_"):
        assert parser().parse_args(["show", "t", f"--test{spelling}id", "3"]).test_id == 3
        assert parser().parse_args(["pull", "u/t", f"--output{spelling}dir", "c"]).output_dir == "c"
        assert parser().parse_args(["push", "t", "u/t", f"--commit{spelling}message", "m"]).commit_message == "m"


def test_show_prints_the_counts_and_says_when_fewer_rows_exist(tmp_path, capsys) -> None:
    sign_table().save(tmp_path / "t")
    assert main(["show", str(tmp_path / "t"), "--test-id", "0", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert "candidates 10 · helpful 2 · harmful 8 · zero 0 · distinct values 10" in out
    assert "min -2.0000e+00 · median +3.5000e-01 · max +3.0000e+00" in out
    assert "only 2 helpful rows among the 10 candidates" in out and "harmful rows among" not in out
    lines = out.splitlines()
    start = lines.index("most helpful (negative influence first)")
    assert [line.split()[2] for line in lines[start + 3:start + 5]] == ["-2.0000e+00", "-5.0000e-01"]
    assert lines[start + 5] == "only 2 helpful rows among the 10 candidates"
    assert main(["show", str(tmp_path / "t"), "--test-id", "1", "-n", "3", "--side", "harmful"]) == 0
    out = capsys.readouterr().out
    assert "zero 2 · NaN 1 · distinct values 4" in out and "only" not in out
    assert "measurement" not in out and "combine" not in out
    # a measurement_fn table: 'helpful' lowers the measurement, the most harmful rows for a score; it said nothing
    table = sign_table()
    table.metadata |= {"functions": {"measurement_fn": {"name": "label_logit"}}, "combine": "mean"}
    table.save(tmp_path / "m")
    assert main(["show", str(tmp_path / "m"), "--test-id", "0", "-n", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("Influence here is on the measurement 'label_logit' (a measurement_fn), not on the test loss: negative "
            "influence lowers it") in out
    assert "is the mean of the" in out and "test rows' measurements (combine='mean'), not one test row" in out


@pytest.mark.parametrize("argv, shown", [
    (["build", "--help"], {"influence_knn_k": "100", "influence_knn_features": "gradient", "seed": "0"}),
    (["build", "--model_name_or_path", "m", "--help"], {"influence_knn_k": "1000", "influence_knn_features": "auto",
                                                         "seed": "42"}),
])
def test_help_shows_the_defaults_that_apply(argv, shown, capsys) -> None:
    """--help was answered by the first parse, which showed the library's defaults (k 1000, seed 42) where the
    embedded default's apply (k 100, seed 0)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in shown.items():
        start = text.index(f"--{flag} {flag.upper()}", text.index("options:"))  # its entry, not the usage line
        assert text[text.index("(default:", start):].startswith(f"(default: {default})"), flag



def test_long_texts_are_cut_in_the_middle_so_that_rows_stay_apart() -> None:
    """Cut at their end, two training rows that differ in their last words read the same in `show`."""
    import pandas as pd

    from hf_fastif.cli import _format

    rows = pd.DataFrame({"train_id": [1500, 1966],
                         "premise": ["The doctor supported the actor next to the banker in the hotel.",
                                     "The doctor supported the actor next to the tourist in the park."]})
    lines = _format(rows, 50).splitlines()[2:]
    assert all(len(line) <= 50 and "…" in line for line in lines)
    assert lines[0].endswith("in the hotel.") and lines[1].endswith("in the park.")


def test_a_help_flag_before_the_command_is_the_main_help(capsys) -> None:
    """Only a --help after build / recall waits for the setup's defaults; one before it is the main parser's (it
    ran the command)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help", "build", "--output_dir", "x"])
    assert exit_.value.code == 0 and "usage: hf-fastif [-h]" in capsys.readouterr().out



# ---- user input that used to pass silently ----------------------------------------------------------------
TINY = ["--embedded_model", "tiny", "--max_train_samples", "60", "--max_test_samples", "2", "--num_train_epochs",
        "1", "--influence_knn_k", "8"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """The tiny embedded default (128 positions) built once, with its generated training rows as a jsonl file."""
    from hf_fastif.data import generate_nli

    out = tmp_path_factory.mktemp("cli_tiny")
    assert main(["build", "--output-dir", str(out / "embedded"), *TINY]) == 0
    generate_nli(seed=0, n_train=60, n_hans_per_subcase=1, n_pool_per_subcase=0)["train"].to_json(out / "train.jsonl")
    return out


def _model_build(tiny_build: Path, out: Path, test_file: Path, *extra: str) -> list[str]:
    return ["build", "--output-dir", str(out), "--model_name_or_path", str(tiny_build / "embedded" / "model"),
            "--train_dataset", str(tiny_build / "train.jsonl"), "--test_dataset", str(test_file),
            "--influence_solver", "cg", "--influence_params", r"pooler\.", r"classifier\.", *extra]


def test_a_model_build_cuts_pairs_where_asked_records_it_and_says_how_many(tiny_build, tmp_path, capsys) -> None:
    """`hf-fastif build` cut every pair to 64 word pieces, whatever the model reads, without a word: two test rows
    that differ after the 64th piece got the same influence. Now the limit is the paper's 128 (or the model's
    positions), `--max_length` sets it, the table records it and the number of pairs cut is logged."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    words = ("the doctor near the artist saw the secretary and the author in the garden " * 6).split()
    ending = "the lawyer trusted the student behind the actor and danced".split()
    long_pairs = [" ".join(words) + " .", " ".join(words[:-10] + ending) + " ."]
    test_file = tmp_path / "long.jsonl"
    test_file.write_text("".join(json.dumps({"premise": p, "hypothesis": "The doctor saw the artist.",
                                             "label": "entailment"}) + "\n" for p in long_pairs))
    logger = logging.get_logger("hf_fastif.data.tokenization")

    def influences(out: Path, *extra: str) -> tuple[list, dict, str]:
        with CaptureLogger(logger) as captured:
            assert main(_model_build(tiny_build, out, test_file, *extra)) == 0
        table = InfluenceTable.load(out / "table")
        values = [table.for_test(t).sort_values("train_id").influence.tolist() for t in (0, 1)]
        return values, table.metadata["tokenization"], captured.out

    values, tokenization, logged = influences(tmp_path / "whole")
    assert tokenization == {"max_length": 128} and values[0] != values[1] and "were cut" not in logged
    values, tokenization, logged = influences(tmp_path / "cut", "--max_length", "64")
    assert tokenization == {"max_length": 64} and values[0] == values[1]
    assert "2 of the 2 pairs are longer than max_length=64 word pieces and were cut" in logged
    for flags, message in ((["--max_length", "4000"], "--max_length 4000 exceeds the 128 positions of the model"),
                           (["--max_length", "3"], "--max_length must be at least 8")):
        assert main(_model_build(tiny_build, tmp_path / "bad", test_file, *flags)) == 2
        assert message in capsys.readouterr().err
    assert main(["build", "--output-dir", str(tmp_path / "e"), *TINY, "--max_length", "100"]) == 2
    assert main(["recall", "--max_length", "100"]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "e").exists()


def test_an_embedded_build_is_not_reused_once_another_build_replaced_its_table(tiny_build, tmp_path, capsys) -> None:
    """A model build into the folder of an embedded one replaced its table; the embedded build then "reused the
    finished build" on the strength of its ready.json and reported the model build's table as its own."""
    import shutil

    out = tmp_path / "mixed"
    shutil.copytree(tiny_build / "embedded", out)
    assert main(["build", "--output-dir", str(out), *TINY]) == 0
    assert "reusing the finished build" in capsys.readouterr().err
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"premise": "The judge slept.", "hypothesis": "The judge slept.", "label": 0}))
    assert main(_model_build(tiny_build, out, test_file)) == 0
    assert len(InfluenceTable.load(out / "table").test_ids) == 1
    capsys.readouterr()
    assert main(["build", "--output-dir", str(out), *TINY]) == 0
    assert "reusing the finished build" not in capsys.readouterr().err
    table = InfluenceTable.load(out / "table")
    assert len(table.test_ids) == 2 and table.metadata["embedded_build"]["kind"] == "tiny"


def test_an_embedded_build_leaves_folders_it_did_not_write_and_refuses_before_any_work(tiny_build, tmp_path, capsys,
                                                                                        monkeypatch) -> None:
    """A build deleted the user's own ``engine/`` folder without a word (and wrote into their ``model/``); a damaged
    ready.json stopped it with a bare JSON error; a second build into a folder another one is writing went on, and
    both said they had finished over a mix of their files; a folder it cannot write to failed with a bare errno once
    the model was trained and the table computed. Each is now refused, naming the folder and what to do, before any
    work."""
    from filelock import FileLock

    import hf_fastif.space.build as B

    def no_work(*args, **kwargs):
        raise AssertionError("the build started working")

    monkeypatch.setattr(B, "embedded_data", no_work)
    own = tmp_path / "own"
    (own / "engine").mkdir(parents=True)
    (own / "engine" / "important.py").write_text("keep me")
    assert main(["build", "--output-dir", str(own), *TINY]) == 2
    assert f"{own} holds engine that no embedded build wrote" in capsys.readouterr().err
    assert (own / "engine" / "important.py").read_text() == "keep me"

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_build / "embedded", damaged)
    (damaged / "ready.json").write_text("")
    assert main(["build", "--output-dir", str(damaged), *TINY]) == 2
    assert f"{damaged / 'ready.json'} cannot be read as a finished build's record" in capsys.readouterr().err
    (own / "ready.json").write_text('{"mine": 1}')  # (a file of the user's by that name: their engine/ stays too)
    assert main(["build", "--output-dir", str(own), *TINY]) == 2
    assert f"{own / 'ready.json'} is not a finished build's record" in capsys.readouterr().err
    assert (own / "engine" / "important.py").read_text() == "keep me"
    assert not (own / B.BUILDING_FILE).exists()  # (a marker left there made the next build take the folder for its own)
    (own / "ready.json").unlink()
    assert main(["build", "--output-dir", str(own), *TINY]) == 2
    assert (own / "engine" / "important.py").read_text() == "keep me"
    capsys.readouterr()

    busy = tmp_path / "busy"
    shutil.copytree(tiny_build / "embedded", busy)
    with FileLock(str(busy / BUILD_LOCK)):
        assert main(["build", "--output-dir", str(busy), *TINY[:-1], "9"]) == 2  # (another k: a build, not a reuse)
        assert f"Another build is writing {busy} now" in capsys.readouterr().err
        assert main(["build", "--output-dir", str(busy), *TINY]) == 0  # a finished build serves without the lock
    assert "reusing the finished build" in capsys.readouterr().err
    assert not (busy / B.BUILDING_FILE).exists()

    def read_only_lock(directory):
        raise OSError(30, f"Could not write {directory / BUILD_LOCK} (Read-only file system)")

    with monkeypatch.context() as patched:  # (a prebuilt build on a read-only folder: a Space's image)
        patched.setattr(B, "hold_build_lock", read_only_lock)
        assert main(["build", "--output-dir", str(busy), *TINY]) == 0
    assert "reusing the finished build" in capsys.readouterr().err

    def read_only(path, *args, **kwargs):
        raise OSError(f"Could not write {path} ([Errno 30] Read-only file system): write to another folder.")

    monkeypatch.setattr(B, "write_atomic", read_only)
    assert main(["build", "--output-dir", str(tmp_path / "read-only"), *TINY]) == 2
    assert "Read-only file system" in capsys.readouterr().err


def test_an_interrupted_build_with_other_settings_leaves_the_finished_build_reusable(tiny_build, tmp_path, capsys,
                                                                                     monkeypatch) -> None:
    """A build with other settings deleted the finished build's ready.json and engine caches before it started: cut
    short, the finished build was gone, and its own command computed it all again."""
    import hf_fastif.space.build as B

    out = tmp_path / "finished"
    shutil.copytree(tiny_build / "embedded", out)
    def entries():
        return sorted(p.relative_to(out) for p in out.rglob("*") if p.name != BUILD_LOCK)

    before = entries()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(B, "train_embedded_model", interrupted)
        with pytest.raises(KeyboardInterrupt):
            main(["build", "--output-dir", str(out), *TINY[:-1], "9"])  # (another k)
    assert (out / B.BUILDING_FILE).is_file()  # (the folder's entries are a build's: the next build may replace them)
    capsys.readouterr()
    assert main(["build", "--output-dir", str(out), *TINY]) == 0
    assert "reusing the finished build" in capsys.readouterr().err
    assert entries() == before and not (out / B.BUILDING_FILE).exists()
    # a build an earlier version left half-way (it deleted ready.json and engine/ first): still taken as a build's
    (out / "ready.json").unlink()
    shutil.rmtree(out / "engine", ignore_errors=True)
    assert main(["build", "--output-dir", str(out), *TINY]) == 0
    assert (out / "ready.json").is_file() and not (out / B.BUILDING_FILE).exists()


def test_a_checkpoint_with_unnamed_labels_says_the_order_it_is_read_in(tiny_build, tmp_path, capsys) -> None:
    """A checkpoint fine-tuned without label names (LABEL_0, LABEL_1) was read in the NLI order without a word, and
    `show` printed LABEL_1 for a row the data file labelled non_entailment. The build says the order it assumes,
    and the table names the labels as the data does; a checkpoint with names keeps its own."""
    import shutil

    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    folder = tmp_path / "unnamed"
    shutil.copytree(tiny_build / "embedded" / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "LABEL_0", "1": "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    (folder / "config.json").write_text(json.dumps(config))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"premise": "The doctor saw the artist.", "hypothesis": "The artist saw the doctor.",
                                     "label": "non_entailment"}) + "\n")
    for model, named in ((folder, False), (tiny_build / "embedded" / "model", True)):
        args = _model_build(tiny_build, tmp_path / f"out-{named}", test_file, "--influence_knn_k", "5")
        args[args.index("--model_name_or_path") + 1] = str(model)
        with CaptureLogger(logging.get_logger("hf_fastif.cli")) as captured:
            assert main(args) == 0
        table = InfluenceTable.load(tmp_path / f"out-{named}" / "table")
        assert table.metadata["label_names"] == ["entailment", "non_entailment"]
        assert ("are not named (config.id2label ['LABEL_0', 'LABEL_1']): they are read in the NLI data's order, "
                "0 = entailment, 1 = non_entailment" in captured.out) == (not named)
    capsys.readouterr()
    assert main(["show", str(tmp_path / "out-False" / "table"), "--test-id", "0", "-n", "1"]) == 0
    assert "LABEL_" not in capsys.readouterr().out


def test_labels_stored_as_names_or_missing_are_shown_as_they_are(tmp_path, capsys) -> None:
    """`add_text` takes untokenized rows, whose labels can be names: `show` and the Space failed on them with
    "invalid literal for int()", and on a null label with "cannot convert float NaN to integer"."""
    from datasets import Dataset

    from hf_fastif.space import SpaceState

    train = Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"],
                               "label": ["entailment", "non_entailment", "entailment"]})
    test = Dataset.from_dict({"premise": ["q"], "hypothesis": ["r"], "label": ["non_entailment"],
                              "prediction": [1]})
    table = InfluenceTable.from_arrays([0, 0, 0], [0, 1, 2], [-1.0, 0.5, 2.0],
                                       {"label_names": ["entailment", "non_entailment"]}).add_text(
        train, test, columns=("premise", "hypothesis", "label", "prediction"))
    table.save(tmp_path / "names")
    assert main(["show", str(tmp_path / "names"), "--test-id", "0"]) == 0
    out = capsys.readouterr().out
    assert "non_entailment" in out and out.count("entailment") >= 3
    state = SpaceState.from_table(table, "names")
    assert "**Gold:** non_entailment" in state.describe(0) and "(correct)" in state.describe(0)
    helpful, harmful = state.rows(0, 3)
    assert helpful.label.tolist() == ["entailment"] and harmful.label.tolist() == ["entailment", "non_entailment"]
    unlabelled = Dataset.from_dict({"premise": ["q"], "hypothesis": ["r"], "label": [None]})
    bare = InfluenceTable.from_arrays([0], [0], [1.0], {"label_names": ["e", "n"]}).add_text(train, unlabelled)
    bare.save(tmp_path / "null")
    assert main(["show", str(tmp_path / "null"), "--list"]) == 0
    assert main(["show", str(tmp_path / "null"), "--test-id", "0"]) == 0


def test_more_input_that_failed_with_a_traceback_or_was_ignored(tmp_path, capsys) -> None:
    assert main(["recall", "--ks", "inf"]) == 2  # an OverflowError's traceback
    assert "k='inf' is not a number of candidates" in capsys.readouterr().err
    sign_table().save(tmp_path / "t")
    assert main(["show", str(tmp_path / "t"), "--revision", "v1"]) == 2  # a local folder: the revision was ignored
    assert "picks a version of a Hub repo, but" in capsys.readouterr().err


def test_max_length_is_bounded_by_the_positions_a_row_can_have() -> None:
    """RoBERTa numbers positions from its pad id + 1: 40 entries give 39 usable. `--max_length 40` was accepted, and
    the build failed later on its first row."""
    from types import SimpleNamespace

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from hf_fastif.cli import max_length_for

    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=0))
    assert max_length_for(SimpleNamespace(max_length=None), model) == 39
    assert max_length_for(SimpleNamespace(max_length=39), model) == 39
    with pytest.raises(ValueError, match="--max_length 40 exceeds the 39 positions of the model; use at most 39"):
        max_length_for(SimpleNamespace(max_length=40), model)


def test_a_model_without_a_position_limit_takes_any_max_length() -> None:
    """XLNet's config says max_position_embeddings = -1 (relative positions, no limit): every --max_length was refused
    ("exceeds the -1 positions"), the default was -1, and the Space cut typed pairs at -1 tokens."""
    from types import SimpleNamespace

    from transformers import XLNetConfig, XLNetForSequenceClassification

    from hf_fastif.batches import usable_positions
    from hf_fastif.cli import max_length_for

    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_inner=32))
    assert model.config.max_position_embeddings == -1 and usable_positions(model) is None
    assert max_length_for(SimpleNamespace(max_length=None), model) == 128
    assert max_length_for(SimpleNamespace(max_length=1024), model) == 1024


def test_a_checkpoint_without_a_padding_token_on_one_side_is_matched_or_refused():
    """GPT-2's tokenizers have no padding token: a build stopped with "pass data_collator=DataCollatorWithPadding"
    (the collator the command line already uses; it has no such flag), and a config without pad_token_id with
    transformers' bare "Cannot handle batch sizes > 1". The side without one takes the other's (said in a log line);
    with neither, the build is refused with the fix; a collator whose tokenizer cannot pad says that."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    from hf_fastif.batches import Batcher
    from hf_fastif.cli import match_padding
    from tests.tiny import tiny_model

    def tokenizer(pad: bool):
        words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, "[UNK]"))
        return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", **({"pad_token": "[PAD]"} if pad
                                                                                       else {}))

    model = tiny_model("gpt2")  # config.pad_token_id 0
    bare = tokenizer(False)
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("hf_fastif.cli").addHandler(handler)  # (not caplog: the CLI's logging stops propagation)
    try:
        match_padding(model, bare, "m")
    finally:
        logging.getLogger("hf_fastif.cli").removeHandler(handler)
    assert bare.pad_token == "[PAD]" and "padding with the model config's pad_token_id 0" in " ".join(said)
    model.config.pad_token_id = None
    padded = tokenizer(True)
    match_padding(model, padded, "m")
    assert model.config.pad_token_id == 0
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match='Neither the tokenizer nor the model config of m has a padding token.*'
                                         '"pad_token" to its tokenizer_config.json'):
        match_padding(model, tokenizer(False), "m")
    rows = Dataset.from_dict({"input_ids": [[2], [2, 2]], "attention_mask": [[1], [1, 1]]})
    batcher = Batcher(rows, rows.column_names, DataCollatorWithPadding(tokenizer(False)), torch.device("cpu"))
    with pytest.raises(ValueError, match="the collator's tokenizer has no padding token"):
        batcher.collate(rows.to_list())


@pytest.mark.parametrize("auto_map, refused", [
    ({"AutoConfig": "configuration_x.XConfig", "AutoModelForSequenceClassification": "modeling_x.XModel"}, True),
    ({"AutoModelForSequenceClassification": "other/repo--modeling_x.XModel"}, True),
    # its code not in the folder: --trust_remote_code could not run it, and a model saved from such a class has its
    # code copied beside it (one fine-tuned with transformers' own class from a base naming its code keeps auto_map)
    ({"AutoModelForSequenceClassification": "missing_x.XModel"}, False),
    # other classes only (Phi-3's config and causal LM, kept by save_pretrained in a model fine-tuned from it with
    # transformers' own class; a tokenizer's): the class loaded is the built-in one either way (a review)
    ({"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}, False),
    ({"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, False),
    ({}, False),
])
def test_a_checkpoint_naming_its_own_sequence_classifier_is_refused_without_trust(built: Path, tmp_path: Path,
                                                                                  auto_map, refused) -> None:
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(built / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (folder / "modeling_x.py").write_text("from transformers import BertForSequenceClassification as XModel\n")
    _resolved_unless_refused(folder, refused, "names its own code for AutoModelForSequenceClassification")


def _resolved_unless_refused(folder: Path, refused: bool, match: str) -> None:
    """`resolve_model` on ``folder`` with either flag wording: refused (matching ``match``) or resolved; resolved
    with trust_remote_code either way."""
    from hf_fastif.applications.prepare import resolve_model

    for flag in ("--trust_remote_code", None):
        if refused:
            with pytest.raises(ValueError, match=match):
                resolve_model(str(folder), remote_code_flag=flag)
        else:
            assert resolve_model(str(folder), remote_code_flag=flag) == str(folder)
    assert resolve_model(str(folder), trust_remote_code=True) == str(folder)


@pytest.mark.parametrize("auto_map, code, refused", [
    ({"AutoTokenizer": ["tokenization_x.XTokenizer", "tokenization_x.XTokenizerFast"]}, True, True),
    ({"AutoTokenizer": [None, "tokenization_x.XTokenizerFast"]}, True, True),
    (["tokenization_x.XTokenizer", None], True, True),  # (the legacy list, which transformers still reads)
    ({"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, False, False),  # (its code not in the folder)
    ({"AutoConfig": "configuration_x.XConfig"}, True, False),
])
def test_a_checkpoint_naming_its_own_tokenizer_is_refused_without_trust(built: Path, tmp_path: Path, auto_map, code,
                                                                        refused) -> None:
    """Without trust_remote_code, AutoTokenizer loads transformers' built-in class where tokenizer_config.json names
    the checkpoint's own tokenizer code beside it (a review: a plain BertTokenizer, not the code the model was trained
    with), and every influence is of other tokens: refused, as a classifier's own code is; the Space's live model
    too."""
    import shutil

    from transformers import AutoTokenizer

    from hf_fastif.space.loading import _explainer

    folder = tmp_path / "checkpoint"
    shutil.copytree(built / "model", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    if code:
        (folder / "tokenization_x.py").write_text(
            "from transformers import BertTokenizer, BertTokenizerFast\n\n\nclass XTokenizer(BertTokenizer):\n"
            "    pass\n\n\nclass XTokenizerFast(BertTokenizerFast):\n    pass\n")
        # (what the refusal is for: the built-in class, not the folder's, without trust_remote_code)
        assert not type(AutoTokenizer.from_pretrained(folder)).__name__.startswith("XTokenizer")
    _resolved_unless_refused(folder, refused, "names its own code for AutoTokenizer in tokenizer_config.json")
    if refused:
        with pytest.raises(ValueError, match="hf_fastif's recipes and Space do not run a checkpoint's own code"):
            _explainer(None, str(folder), None)


def test_a_hub_checkpoint_naming_its_own_code_is_refused_only_where_that_code_is_there(tmp_path, monkeypatch):
    """A Hub repo (here from the Hub cache, offline) whose auto_map names code it holds is refused without
    trust_remote_code, for its classifier and for its tokenizer; one whose auto_map names code the Hub said it does
    not hold (the cache's record of a missing file; a tokenizer loaded without trust_remote_code and saved again
    keeps its auto_map, a review) is not: the built-in class is what trust_remote_code would fail to replace. Code
    the cache does not know of, offline, counts as there (a cache of a repo's config and weights only). The older
    list form of a tokenizer's auto_map is named in the advice, and a tokenizer_config.json that is not a JSON object
    is no crash."""
    import huggingface_hub.constants

    from hf_fastif.applications.prepare import refuse_own_code

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # (whatever the machine can reach)
    snapshot = tmp_path / "hub" / "models--user--custom" / "snapshots" / ("a" * 40)
    missing = tmp_path / "hub" / "models--user--custom" / ".no_exist" / ("a" * 40)  # (the Hub said: no such file)
    snapshot.mkdir(parents=True)
    missing.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)

    def refused(config: dict, tokenizer, files=(), absent=()) -> str | None:
        for folder in (snapshot, missing):
            for name in ("config.json", "tokenizer_config.json", "modeling_x.py", "tokenization_x.py"):
                (folder / name).unlink(missing_ok=True)
        (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", **config}))
        (snapshot / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        for name in files:
            (snapshot / name).write_text("x = 1\n")
        for name in absent:
            (missing / name).touch()
        try:
            refuse_own_code("user/custom", None, False, "--trust_remote_code")
        except ValueError as err:
            return str(err)
        return None

    model_map = {"auto_map": {"AutoModelForSequenceClassification": "modeling_x.XModel"}}
    assert refused(model_map, {}, absent=["modeling_x.py"]) is None
    assert "for AutoModelForSequenceClassification in config.json" in refused(model_map, {}, ["modeling_x.py"])
    assert "for AutoModelForSequenceClassification in config.json" in refused(model_map, {})  # (not in the cache)
    tokenizer_map = {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
    assert refused({}, tokenizer_map, absent=["tokenization_x.py"]) is None
    found = refused({}, tokenizer_map, ["tokenization_x.py"])
    assert "for AutoTokenizer in tokenizer_config.json" in found and "(its auto_map is the older" not in found
    found = refused({}, {"auto_map": ["tokenization_x.XTokenizer", None]}, ["tokenization_x.py"])
    assert "(its auto_map is the older list form: remove auto_map)" in found
    assert refused({}, ["not", "an", "object"], ["tokenization_x.py"]) is None


@pytest.mark.parametrize("model_type", ["scaled-bert", "bert"])
def test_build_runs_a_models_own_code_only_with_trust_remote_code(model_type, built: Path, tmp_path: Path,
                                                                  capsys) -> None:
    """A model with its own code (auto_map in config.json) could not be built from the command line: it had no
    --trust_remote_code, and transformers' question fails without a terminal (CI, nohup). Where its model_type is
    built in ("bert"), it was built without the flag from transformers' own class, not the checkpoint's (a review)."""
    import shutil

    from hf_fastif.applications.prepare import resolve_model
    from hf_fastif.data import generate_nli

    folder = tmp_path / "custom"
    shutil.copytree(built / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=["ScaledModel"], auto_map={
        "AutoConfig": "configuration_scaled.ScaledConfig",
        "AutoModelForSequenceClassification": "modeling_scaled.ScaledModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_scaled.py").write_text(
        "from transformers import BertConfig\n\n\nclass ScaledConfig(BertConfig):\n    model_type = 'scaled-bert'\n")
    (folder / "modeling_scaled.py").write_text(
        "from transformers import BertForSequenceClassification\n\nfrom .configuration_scaled import ScaledConfig\n\n\n"
        "class ScaledModel(BertForSequenceClassification):\n    config_class = ScaledConfig\n")
    raw = generate_nli(seed=0, n_train=40, n_hans_per_subcase=1, n_pool_per_subcase=0)
    raw["train"].to_json(tmp_path / "train.jsonl")
    raw["hans"].select(range(2)).to_json(tmp_path / "hans.jsonl")
    args = ["build", "--model_name_or_path", str(folder), "--train_dataset", str(tmp_path / "train.jsonl"),
            "--test-dataset", str(tmp_path / "hans.jsonl"), "--influence_knn_k", "5", "--influence_solver", "cg",
            "--influence_params", r"classifier\."]
    capsys.readouterr()
    assert main([*args, "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "names its own code for AutoModelForSequenceClassification in config.json" in err
    assert "Pass --trust_remote_code" in err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="hf_fastif's recipes and Space do not run a checkpoint's own code"):
        resolve_model(str(folder), remote_code_flag=None)  # (the recipes have no such flag)
    assert main([*args, "--output-dir", str(tmp_path / "out"), "--trust_remote_code"]) == 0
    table = InfluenceTable.load(tmp_path / "out" / "table")
    assert len(table) == 10 and "ScaledModel" in table.metadata["model"]["class"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_accepted_after_the_subcommand_too(where, tmp_path, capsys):
    """`hf-fastif build -v ...` was argparse's "unrecognized arguments: -v" (the flag was the main parser's only)."""
    library = logging.getLogger("hf_fastif")
    level = library.level
    argv = ["cache", "--cache-dir", str(tmp_path)]
    try:
        assert main(["-v", *argv] if where == "before" else [*argv, "-v"]) == 0
        assert library.level == logging.INFO
        assert main(argv) == 0 and library.level == logging.WARNING
    finally:
        library.setLevel(level)
    assert "0 entries" in capsys.readouterr().out


def test_a_build_under_a_launch_is_reported_by_the_main_process_only(tiny_build, tmp_path, monkeypatch, capsys):
    """`hf-fastif build` under `accelerate launch` printed its "influence table ... / next: ..." lines and its stages
    once per process. A process other than the main one builds (its share) and says nothing."""
    import hf_fastif.cli as cli

    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"premise": "The doctor saw the artist.", "hypothesis": "The artist saw the doctor.",
                                     "label": "non-entailment"}) + "\n")
    assert main(_model_build(tiny_build, tmp_path / "main", test_file)) == 0
    assert "influence table (" in capsys.readouterr().out
    monkeypatch.setattr(cli, "is_main_process", lambda: False)  # (the distributed module's own is not patched)
    assert main(_model_build(tiny_build, tmp_path / "other", test_file)) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "other" / "table").is_dir()
    cli._stage("computing")  # a long command's stages too (each process printed every one)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "is_main_process", lambda: True)
    cli._stage("computing")
    assert "[hf-fastif] computing" in capsys.readouterr().err


def test_every_build_closes_a_launchs_process_group(tiny_build, monkeypatch):
    """`hf-fastif build` of the embedded default under `accelerate launch` left the gloo process group open at exit
    in every process (only the --model_name_or_path build called `finish`), where gloo can abort a process whose
    work is done."""
    import hf_fastif.cli as cli

    closed = []
    monkeypatch.setattr(cli, "finish", lambda: closed.append(1))
    assert main(["build", "--output-dir", str(tiny_build / "embedded"), *TINY]) == 0  # (the finished build, reused)
    assert closed == [1]
