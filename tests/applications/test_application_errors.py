"""Bad input to the recipes: clear errors that name the fix, raised before any model is trained."""

import pytest

from hf_fastif.trainer import InfluenceTrainer

from .conftest import TINY_FLAGS, load_recipe, write_hans_tsv


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if anything starts training: bad input must be caught first."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(InfluenceTrainer, "train", refuse)


def _main(name):
    return load_recipe(name).main


def test_hans_file_with_wrong_columns(tmp_path, nli, no_training):
    header = [h for h in __import__("hf_fastif.data", fromlist=["x"]).HANS_TSV_HEADER if h != "heuristic"]
    bad = write_hans_tsv(tmp_path / "hans.txt", nli["raw"]["hans"].select(range(5)), header=header)
    with pytest.raises(ValueError, match="Not an official HANS file"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--hans_file", bad, *TINY_FLAGS])


def test_hans_file_with_unknown_labels(tmp_path, nli, no_training):
    bad = write_hans_tsv(tmp_path / "hans.txt", nli["raw"]["hans"].select(range(3)),
                         labels=["entailment", "maybe", "contradiction"])
    with pytest.raises(ValueError,
                       match=r"hans.txt': Unexpected label values 'maybe' \(row 1\), 'contradiction' \(row 2\)"):
        _main("visualize")(["--output_dir", str(tmp_path), "--hans_file", bad, *TINY_FLAGS])


def test_three_label_checkpoint_for_hans_correction(tmp_path, files, no_training):
    with pytest.raises(ValueError, match=r"has 3 labels.*2-label \(entailment / non_entailment, MNLI-2\)"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt3"],
                                  "--hans_file", files["hans"]])
    with pytest.raises(ValueError, match="--num_labels 3: the embedded models .* have 2 labels"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--num_labels", "3"])
    with pytest.raises(ValueError, match="The generated training data have 2 labels"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt3"],
                                  "--num_labels", "3", "--hans_file", files["hans"]])


def test_hans_correction_takes_a_three_label_checkpoint_as_run_correction_does(tmp_path, files, monkeypatch):
    """The recipe refused the 3-label models run_correction corrects through two_label_loss (docs: "Correction
    takes 2- or 3-label models")."""
    recipe, seen = load_recipe("hans_correction"), {}

    def run(model, data, args, protocol):
        seen["num_labels"] = model.config.num_labels
        raise StopIteration

    monkeypatch.setattr(recipe, "run_correction", run)
    with pytest.raises(StopIteration):
        recipe.main(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt3"], "--num_labels", "3",
                     "--train_dataset", files["mnli"], "--hans_file", files["hans"], *TINY_FLAGS[4:]])
    assert seen == {"num_labels": 3}


def test_checkpoint_label_count_must_match_num_labels(tmp_path, files, no_training):
    with pytest.raises(ValueError, match="matching --num_labels 3"):
        _main("augmentation")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"],
                               "--num_labels", "3", "--train_dataset", files["mnli"], "--pool", files["mnli"]])


def test_hub_model_id_while_offline(tmp_path, monkeypatch, no_training):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hub is offline.*local checkpoint directory"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--model_name_or_path", "no-such-org/no-such-model"])


def test_hub_dataset_id_while_offline(tmp_path, files, monkeypatch, no_training):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline.*local file"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"],
                                  "--train_dataset", "nyu-mll/multi_nli"])


def test_not_a_checkpoint_directory(tmp_path, files, no_training):
    with pytest.raises(ValueError, match="not a model checkpoint"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--model_name_or_path", files["mnli"]])


def test_hans_pool_for_a_three_label_model(tmp_path, files, no_training):
    with pytest.raises(ValueError, match="HANS pool has 2 labels"):
        _main("augmentation")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt3"], "--num_labels",
                               "3", "--train_dataset", files["mnli"], "--pool", files["hans_train"]])


def test_simulator_needs_a_base_for_a_given_checkpoint(tmp_path, files):
    with pytest.raises(ValueError, match="--simulator CHECKPOINT"):
        _main("simulatability")(["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"],
                                 "--train_dataset", files["mnli"], "--hans_file", files["hans"], "--influence_knn_k", "20"])


def test_bad_flag_values(tmp_path):
    with pytest.raises(ValueError, match="--fine_tune must be"):
        _main("hans_correction")(["--output_dir", str(tmp_path), "--fine_tune", "maybe"])
    with pytest.raises(ValueError, match="--pool_format must be"):
        _main("augmentation")(["--output_dir", str(tmp_path), "--pool_format", "csv"])
    # the tiny model with 3-label data crashed in its first training step (an IndexError in cross_entropy)
    with pytest.raises(ValueError, match="--num_labels 3: the embedded models .* have 2 labels.*--model_name_or_path"):
        _main("hans_correction")(["--output_dir", str(tmp_path), *TINY_FLAGS, "--num_labels", "3"])
    with pytest.raises(ValueError, match="--num_threads must be at least 1, got -4"):  # (was taken as 1)
        _main("simulatability")(["--output_dir", str(tmp_path), *TINY_FLAGS, "--num_threads", "-4"])
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got -1"):  # (a bare numpy error)
        _main("visualize")(["--output_dir", str(tmp_path), *TINY_FLAGS, "--seed", "-1"])


def test_heuristic_names_fail_before_any_training(tmp_path, no_training):
    """A near miss is refused when the flags are parsed; a name the HANS data lack, as soon as the data are split
    (both failed only after the model was trained; visualize checked nothing)."""
    for recipe, name, meant in (("hans_correction", "lexical", "lexical_overlap"), ("visualize", "overlap",
                                                                                   "lexical_overlap"),
                                ("augmentation", "subseq", "subsequence")):
        with pytest.raises(ValueError, match=f"Unknown heuristic '{name}': did you mean '{meant}'"):
            _main(recipe)(["--output_dir", str(tmp_path), *TINY_FLAGS, "--heuristics", name])
    for recipe, split in (("hans_correction", "validation"), ("augmentation", "validation"), ("visualize", "test")):
        with pytest.raises(ValueError, match=rf"heuristics \['my_own_heuristic'\] have no rows in the HANS {split} "
                                             "split"):
            _main(recipe)(["--output_dir", str(tmp_path), *TINY_FLAGS, "--heuristics", "constituent",
                           "my_own_heuristic"])


def test_empty_data_and_impossible_counts_are_refused_before_training(tmp_path, nli, no_training):
    """An empty pool, --max_pool_samples 0 / -5 (a negative one dropped rows), a header-only HANS or test file and
    more anchors than a heuristic's validation rows failed only after the model was trained, with a message naming
    neither flag (a header-only HANS file: numpy's "zero-size array to reduction operation")."""
    empty = write_hans_tsv(tmp_path / "empty.txt", nli["raw"]["hans"].select([]))
    for recipe, flags, message in (
            ("augmentation", ["--pool", empty], "gives no data: it holds no rows"),
            ("augmentation", ["--max_pool_samples", "0"], "--max_pool_samples must be at least 1"),
            ("augmentation", ["--max_pool_samples", "-5"], "--max_pool_samples must be at least 1"),
            ("hans_correction", ["--hans_file", empty], "gives no data: it holds no rows"),
            ("simulatability", ["--test_dataset", empty], "gives no data: it holds no rows"),
            ("hans_correction", ["--num_anchors", "100000"], "fewer than num_anchors=100000"),
            ("augmentation", ["--num_anchors", "100000"], "fewer than num_anchors=100000")):
        with pytest.raises(ValueError, match=message):
            _main(recipe)(["--output_dir", str(tmp_path), *TINY_FLAGS, *flags])


def test_settings_that_need_no_model_are_refused_before_training(tmp_path, files, no_training):
    """Each was refused only after the model was fine-tuned and its HANS report computed: too few candidates for
    distinct helpful / harmful rows (correction, augmentation, simulatability: there both groups were the same rows,
    reported as two results), a pool holding the HANS evaluation rows, a mistyped simulator checkpoint, a given
    checkpoint with --simulator trained; a --max_length under 8 (0-2 cut nothing, 3 left [CLS][SEP][SEP]) went on."""
    paper = ["--model_name_or_path", files["base"], "--train_dataset", files["mnli"], "--hans_file", files["hans"],
             *TINY_FLAGS[4:]]
    given = ["--model_name_or_path", files["ckpt2"], "--train_dataset", files["mnli"], "--hans_file", files["hans"],
             *TINY_FLAGS[4:]]
    for recipe, flags, message in (
            ("hans_correction", [*paper, "--influence_knn_k", "5"], "Each step scores 5 candidate rows"),
            ("augmentation", [*TINY_FLAGS, "--max_pool_samples", "5"], "Each step scores 5 candidate rows"),
            ("augmentation", [*paper, "--pool", files["hans"]], r"The pool \(data.candidates\)"),
            ("simulatability", [*paper, "--influence_knn_k", "4"], "Each test point scores 4 candidate rows"),
            ("simulatability", [*paper, "--simulator", str(tmp_path / "no_such_checkpoint")],
             "is not a local directory"),
            ("simulatability", given, "--simulator CHECKPOINT"),
            ("visualize", [*TINY_FLAGS, "--max_length", "3"], "--max_length must be at least 8 word pieces")):
        with pytest.raises(ValueError, match=message):
            _main(recipe)(["--output_dir", str(tmp_path), *flags])


def test_resume_from_checkpoint_reaches_the_trainer_or_is_refused(tmp_path, files, monkeypatch):
    """The flag was dropped: the Trainer was called without it, and trained from scratch (a missing folder too)."""
    seen = {}

    def train(self, resume_from_checkpoint=None, **kwargs):
        seen["resume"] = resume_from_checkpoint
        raise StopIteration

    monkeypatch.setattr(InfluenceTrainer, "train", train)
    paper = ["--output_dir", str(tmp_path), "--model_name_or_path", files["base"], "--train_dataset", files["mnli"],
             "--hans_file", files["hans"], *TINY_FLAGS[4:]]
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    with pytest.raises(StopIteration):
        _main("hans_correction")([*paper, "--resume_from_checkpoint", str(checkpoint)])
    assert seen == {"resume": str(checkpoint)}
    for flags, message in (([*paper, "--resume_from_checkpoint", str(tmp_path / "checkpoint-99")], "is not a folder"),
                           (["--output_dir", str(tmp_path), *TINY_FLAGS, "--resume_from_checkpoint", str(checkpoint)],
                            "embedded default's model is trained in one go"),
                           (["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"], "--train_dataset",
                             files["mnli"], "--hans_file", files["hans"], "--resume_from_checkpoint", str(checkpoint)],
                            "used as it is")):
        with pytest.raises(ValueError, match=message):
            _main("hans_correction")(flags)
