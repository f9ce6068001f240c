"""One vocabulary: the recipes and ``hf-fastif build`` parse `InfluenceArguments` itself, so they take the same
``--influence_*`` flags; a setup's defaults (the embedded default's, the paper's) apply only to flags the command
line does not give."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fastif import InfluenceArguments, cli
from hf_fastif.applications import ModelDataArguments
from hf_fastif.embedded import MINILM, TINY
from hf_fastif.parsing import parse_arguments
from tests.applications.conftest import load_recipe

RECIPES = ("hans_correction", "augmentation", "simulatability", "visualize")
INFLUENCE_FIELDS = [f for f in dataclasses.fields(InfluenceArguments) if f.name.startswith("influence_")]
INFLUENCE_FLAGS = {f"--{f.name}" for f in INFLUENCE_FIELDS} | {f"--no_{f.name}" for f in INFLUENCE_FIELDS if f.default is True}
"""Every ``--influence_*`` flag (and ``--no_*`` for a setting that is on by default)."""


class Parsed(Exception):
    """Raised in place of the first expensive step, carrying what the command line parsed to."""

    def __init__(self, *values):
        super().__init__("parsed")
        self.values = values


def _recipe_args(name: str, argv: list[str], monkeypatch) -> tuple[ModelDataArguments, InfluenceArguments]:
    module = load_recipe(name)

    def stop(data_args, args, **kwargs):
        raise Parsed(data_args, args)

    monkeypatch.setattr(module, "prepare", stop)
    monkeypatch.setattr(module, "load_pool", lambda *a: None, raising=False)
    monkeypatch.setattr(module, "load_test_points", lambda *a: None, raising=False)
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    return parsed.value.values


def _build_args(argv: list[str], monkeypatch) -> InfluenceArguments:
    def stop(out, args, **kwargs):
        raise Parsed(args)

    def stop_model(build, args, out):
        raise Parsed(args)

    monkeypatch.setattr(cli, "build_default", stop)
    monkeypatch.setattr(cli, "_build_from_model", stop_model)
    with pytest.raises(Parsed) as parsed:
        cli.main(["build", *argv])
    return parsed.value.values[0]


def _help_flags(main, argv: list[str], capsys) -> set[str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return set(re.findall(r"--(?:no_)?influence_[a-z_]+", capsys.readouterr().out))


def test_recipes_and_cli_take_the_same_influence_flags(capsys):
    assert "--no_influence_check_convergence" in INFLUENCE_FLAGS
    assert _help_flags(cli.main, ["build", "--help"], capsys) == INFLUENCE_FLAGS
    for name in (*RECIPES, "quickstart"):
        assert _help_flags(load_recipe(name).main, ["--help"], capsys) == INFLUENCE_FLAGS, name


GIVEN = ["--influence_scale", "10000", "--influence_damping", "0.3", "--influence_solver", "cg", "--seed", "7",
         "--influence_knn_k", "0"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_given_flag_wins_and_an_ungiven_one_takes_the_setups_default(name, monkeypatch, tmp_path):
    # --influence_scale 10000 is InfluenceArguments' own default: given, it must still beat the embedded default's 12
    data_args, args = _recipe_args(name, ["--output_dir", str(tmp_path), *GIVEN], monkeypatch)
    assert data_args.embedded and data_args.kind == "minilm" and data_args.num_threads == 1
    assert data_args.trainable_layers == MINILM.setup["trainable_layers"] == 2
    assert (args.influence_scale, args.influence_damping, args.influence_solver, args.seed) == (1e4, 0.3, "cg", 7)
    assert args.influence_knn_k is None  # 0 on the command line means None
    assert args.output_dir == str(tmp_path)
    for key in ("influence_recursion_depth", "influence_batch_size", "influence_repetitions", "influence_params"):
        assert getattr(args, key) == MINILM.influence[key], key
    assert args.learning_rate == 2e-4 and args.num_train_epochs == 1 and args.use_cpu  # MiniLM's fine-tuning

    _, default = _recipe_args(name, [], monkeypatch)
    assert default.output_dir == f"outputs/{name}" and default.seed == 0
    assert default.influence_knn_k == MINILM.uses.get(name, {}).get("influence_knn_k", 1000)
    assert default.influence_scale == MINILM.influence["influence_scale"]

    # --quick (or --embedded_model tiny) takes the tiny model's settings
    for argv in (["--quick"], ["--embedded_model", "tiny"]):
        data_args, tiny = _recipe_args(name, argv, monkeypatch)
        assert data_args.kind == "tiny" and data_args.trainable_layers is None
        assert tiny.influence_params == TINY.influence["influence_params"] and tiny.learning_rate == 1e-3

    data_args, paper = _recipe_args(name, ["--model_name_or_path", str(tmp_path), "--influence_recursion_depth", "7"],
                                    monkeypatch)
    assert not data_args.embedded and data_args.trainable_layers == 2
    assert (paper.influence_scale, paper.influence_weight_decay, paper.influence_params) == (1e6, 0.005, None)
    assert paper.influence_recursion_depth == 7 and paper.learning_rate == 2e-5
    assert paper.influence_knn_k == (10000 if name == "simulatability" else 1000)


def test_protocol_defaults_follow_the_setup_and_quick(monkeypatch):
    module = load_recipe("hans_correction")
    captured = {}

    def stop(data_args, args, **kwargs):
        raise Parsed()

    monkeypatch.setattr(module, "prepare", stop)
    real = module.parse_recipe

    def spy(*a, **kw):
        captured["parsed"] = real(*a, **kw)
        return captured["parsed"]

    monkeypatch.setattr(module, "parse_recipe", spy)
    for argv, lr, steps, k in ((["--output_dir", "x"], 1e-2, 10, 1000),
                               (["--model_name_or_path", "m"], 1e-4, 10, 1000),
                               (["--quick"], 1e-2, 2, 200),
                               (["--quick", "--num_steps", "5", "--correction_learning_rate", "1e-4"], 1e-4, 5, 200)):
        with pytest.raises(Parsed):
            module.main(argv)
        data_args, protocol, args = captured["parsed"]
        assert (protocol.correction_learning_rate, protocol.num_steps, args.influence_knn_k) == (lr, steps, k), argv
        assert data_args.max_train_samples == (600 if "--quick" in argv else None)
        if "--quick" in argv:  # (1 epoch left the tiny model predicting one class: every HANS cell 50.0)
            assert args.num_train_epochs == 3


def test_embedded_trainable_layers_takes_influence_over_what_trains(monkeypatch):
    _, args = _recipe_args("visualize", ["--embedded_model", "tiny", "--trainable_layers", "1"], monkeypatch)
    assert args.influence_params is None
    _, args = _recipe_args("visualize", ["--quick", "--trainable_layers", "1", "--influence_params", "classifier"],
                           monkeypatch)
    assert args.influence_params == ["classifier"]
    # MiniLM: --trainable_layers says what fine-tuning trains; influence stays on its influence parameters
    data_args, args = _recipe_args("visualize", ["--trainable_layers", "1"], monkeypatch)
    assert data_args.trainable_layers == 1 and args.influence_params == MINILM.influence["influence_params"]
    with pytest.raises(ValueError, match="Unknown embedded model 'large'"):
        _recipe_args("visualize", ["--embedded_model", "large"], monkeypatch)


def test_cli_build_defaults(monkeypatch, tmp_path):
    args = _build_args(["--output_dir", str(tmp_path), *GIVEN], monkeypatch)
    assert (args.influence_scale, args.influence_damping, args.influence_solver, args.seed) == (1e4, 0.3, "cg", 7)
    assert args.influence_knn_k is None
    args = _build_args(["--output-dir", str(tmp_path)], monkeypatch)
    assert args.influence_knn_k == MINILM.uses["table"]["influence_knn_k"]
    assert args.influence_scale == MINILM.influence["influence_scale"] and args.learning_rate == 2e-4
    args = _build_args(["--output-dir", str(tmp_path), "--embedded_model", "tiny"], monkeypatch)
    assert args.influence_scale == TINY.influence["influence_scale"] and args.learning_rate == 1e-3
    args = _build_args(["--output_dir", str(tmp_path), "--model_name_or_path", "m", "--train_dataset", "t",
                        "--test_dataset", "h"], monkeypatch)
    defaults = InfluenceArguments(output_dir=str(tmp_path))
    assert (args.influence_knn_k, args.influence_scale) == (defaults.influence_knn_k, defaults.influence_scale)


def test_parse_arguments_ignores_defaults_of_other_commands():
    (data_args,) = parse_arguments([ModelDataArguments], ["--num_labels", "3", "--model_name_or_path", "m"],
                                   {"num_threads": 2, "influence_knn_k": 5, "max_length": 64})
    assert (data_args.num_labels, data_args.num_threads, data_args.max_length) == (3, 2, 64)
    with pytest.raises(SystemExit):
        parse_arguments([ModelDataArguments], ["--no_such_flag", "1"])


def test_a_value_the_arguments_refuse_is_one_line_on_the_command_line(monkeypatch, capsys):
    """A recipe's `--seed -1` or `--num_threads 0` printed a 24-line traceback and exited with status 1, where
    argparse reports its own flags' errors in one line with status 2; called with argv, the ValueError is raised."""
    monkeypatch.setattr(sys, "argv", ["hans_correction.py", "--num_threads", "0", "--model_name_or_path", "m"])
    with pytest.raises(SystemExit) as exit_:
        parse_arguments([ModelDataArguments])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "hans_correction.py: error: --num_threads must be at least 1, got 0.\n"
    with pytest.raises(ValueError, match="--num_threads must be at least 1"):
        parse_arguments([ModelDataArguments], ["--num_threads", "0", "--model_name_or_path", "m"])


@pytest.mark.parametrize("name, flags, message", [
    ("simulatability", ["--seed", "-1"], "seed must be a whole number >= 0, got -1."),
    ("simulatability", ["--output_dir", "{file}"], "--output_dir '{file}' is an existing file, not a folder"),
    ("quickstart", ["--output_dir", "{file}"], "--output_dir '{file}' is an existing file, not a folder"),
    ("hans_correction", ["--resume_from_checkpoint", "{file}"], "--resume_from_checkpoint resumes the fine-tuning of "
                                                                "--model_name_or_path; the embedded default's model"),
], ids=["dataclass check", "output_dir check", "quickstart output_dir", "embedded flags"])
def test_a_recipe_reports_a_refused_flag_in_one_line(name, flags, message, tmp_path):
    """The same from a recipe's command line, before any work (also its check of --output_dir, after the parse)."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    (tmp_path / "afile").write_text("")
    flags = [f.format(file=tmp_path / "afile") for f in flags]
    done = subprocess.run([sys.executable, str(recipe), "--output_dir", str(tmp_path / "o"), *flags],
                          capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"{name}.py: error: " + message.format(file=tmp_path / "afile"))
    assert not (tmp_path / "o").exists()


def test_none_is_typed_as_the_help_says(tmp_path):
    """The help and the errors say None for k, T and the Arnoldi rows; argparse refused it ("invalid int value:
    'None'"), and the only spelling was 0, written in one page of the docs."""
    base = ["--output_dir", str(tmp_path)]
    for spelled in (["--influence_knn_k", "None", "--influence_repetitions", "none", "--influence_arnoldi_rows=None"],
                    ["--influence-knn-k", "None", "--influence-repetitions=none", "--influence-arnoldi-rows", "None"],
                    ["--influence_knn_k", "0", "--influence_repetitions=0", "--influence_arnoldi_rows", "0"]):
        (args,) = parse_arguments([InfluenceArguments], base + spelled)
        assert (args.influence_knn_k, args.influence_repetitions, args.influence_arnoldi_rows) == (None, None, None)
    (args,) = parse_arguments([InfluenceArguments], base + ["--influence_knn_k", "7"])
    assert args.influence_knn_k == 7
    # the parameters' help says "None: every parameter with requires_grad"; it was the regex 'None', which matched
    # nothing, refused after the embedded model was trained
    for spelled in (["--influence_params", "None"], ["--influence-params", "none"]):
        (args,) = parse_arguments([InfluenceArguments], base + spelled, {"influence_params": ["classifier"]})
        assert args.influence_params is None
    (args,) = parse_arguments([InfluenceArguments], base + ["--influence_params", "None", "pooler"])
    assert args.influence_params == ["None", "pooler"]  # a list of patterns stays as given
    with pytest.raises(SystemExit):
        parse_arguments([InfluenceArguments], base + ["--influence_scale", "None"])  # not a None setting


def test_transformers_own_parser_takes_none_as_the_help_says(tmp_path):
    """docs/usage.md says HfArgumentParser turns the settings into flags, and their help says "None (on the command
    line: None or 0)"; through transformers' own parser (not hf_fastif.parsing) ``--influence_knn_k None`` exited
    with "invalid int value", ``0`` was refused as not >= 1, and ``--influence_params None`` became the regex 'None',
    refused only after training."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(InfluenceArguments)
    helps = {action.dest: action.help for action in parser._actions}
    base = ["--output_dir", str(tmp_path), "--report_to", "none"]
    assert "on the command line: None)" in helps["influence_params"]
    for name in ("influence_knn_k", "influence_repetitions", "influence_arnoldi_rows"):
        assert "on the command line: None or 0" in helps[name]
        for spelled in (["None"], ["none"], ["0"]):
            (args,) = parser.parse_args_into_dataclasses(base + [f"--{name}", *spelled])
            assert getattr(args, name) is None
        (args,) = parser.parse_args_into_dataclasses(base + [f"--{name.replace('_', '-')}=7"])
        assert getattr(args, name) == 7
        with pytest.raises(ValueError, match=f"{name} must be a whole number >= 1"):
            parser.parse_args_into_dataclasses(base + [f"--{name}", "1.5"])
    (args,) = parser.parse_args_into_dataclasses(base + ["--influence_params", "None"])
    assert args.influence_params is None
    (args,) = parser.parse_args_into_dataclasses(base + ["--influence_params", "None", "pooler"])
    assert args.influence_params == ["None", "pooler"]
    # in Python, None is written None: a 0 (a k computed as a share of few rows) is refused, not taken for "all"
    with pytest.raises(ValueError, match="influence_knn_k must be a whole number >= 1"):
        InfluenceArguments(output_dir=str(tmp_path), report_to="none", influence_knn_k=0)
    assert InfluenceArguments(output_dir=str(tmp_path), report_to="none", influence_knn_k=None).influence_knn_k is None


def test_the_command_line_takes_none_for_k_and_t(capsys):
    """`hf-fastif build/recall --influence_knn_k None` still failed ("invalid int value: 'None'"): the command line's
    first parse reads the subcommand's flags too, before the setup's parse that read None."""
    from hf_fastif.cli import main

    assert main(["recall", "--methods", "bogus", "--influence_knn_k", "None"]) == 2
    assert main(["build", "--influence-knn-k", "none", "--influence_repetitions=None", "--influence_arnoldi_rows",
                 "None", "--output_dir", "unused", "--model_name_or_path", "unused"]) == 2
    errors = capsys.readouterr().err  # past the parse: the setups' own errors
    assert "Unknown candidate method(s) 'bogus'" in errors and "--model_name_or_path needs --train_dataset" in errors
    assert "invalid int value" not in errors


def test_the_package_runs_as_a_module():
    """``python -m hf_fastif`` is the console script ``hf-fastif`` (it was 'No module named hf_fastif.__main__')."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "hf_fastif", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "build" in done.stdout and "recall" in done.stdout


HELP_COMMANDS = [("hf-fastif", sub) for sub in ("", "build", "push", "pull", "show", "recall")]
HELP_COMMANDS += [("benchmarks", name) for name in (
    "paper_table", "core", "parallel", "recall", "reference", "space_latency", "minilm_finetune", "per_test_point",
    "device_costs")]
HELP_COMMANDS += [("recipes", name) for name in (*RECIPES, "quickstart")]


@pytest.mark.parametrize("kind, name", HELP_COMMANDS)
def test_every_command_prints_its_help(kind, name, capsys):
    """argparse %-formats help strings: a bare '%' in a field's help breaks --help (it did for `hf-fastif recall`)."""
    if kind == "hf-fastif":
        main, argv = cli.main, [name, "--help"] if name else ["--help"]
    else:
        main = (load_recipe(name) if kind == "recipes" else importlib.import_module(f"benchmarks.{name}")).main
        argv = ["--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
