"""benchmarks/reference.py without the 2021 reference code (as in CI): it says how to get the code and exits 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import reference

ROOT = Path(__file__).resolve().parents[1]


def test_without_reference_path_says_how_to_get_it_and_exits_2():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.reference"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--reference_path is not set" in done.stderr
    assert "git clone --depth 1 https://github.com/salesforce/fast-influence-functions" in done.stderr
    assert "--reference_path /tmp/fast-influence-functions" in done.stderr
    assert done.stdout == ""  # nothing was measured


def test_a_folder_without_the_reference_file_is_refused_the_same_way(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        reference.main(["--reference_path", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{str(tmp_path)!r} holds no influence_utils/nn_influence_utils.py" in err
    assert "git clone" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_profiled_phases_leave_out_the_profiling_hook():
    """--profile's "hf_fastif phases (s)" line printed the raw diagnostics, whose s_test_s holds the profiling hook
    (10 profiled steps, a FLOP count, HVP timings) that the profile's total_s leaves out: 20.31 s for a 6.45 s call."""
    diagnostics = {"candidates": "all", "trunk_s": 0.4, "test_gradients_s": 0.02, "s_test_s": 20.31,
                   "scoring_s": 0.3, "lissa_steps": 100}
    phases = reference.profiled_phases(diagnostics, hook_s=15.0)
    assert phases == pytest.approx({"trunk_s": 0.4, "test_gradients_s": 0.02, "s_test_s": 5.31, "scoring_s": 0.3})
    assert diagnostics["s_test_s"] == 20.31  # the call's own record is left as it was


def test_minilm_rows_stored_padded_are_padded_to_max_length_on_both_sides():
    """``--stored_padding max_length`` stores MiniLM's rows as the 2021 code's GLUE features are: every row at
    ``--max_length`` positions, the real tokens and labels as before; another value is refused."""
    own = reference.ReferenceArguments(num_train=6, max_length=48)
    plain = reference.minilm(own, seed=0)
    padded = reference.minilm(reference.ReferenceArguments(num_train=6, max_length=48, stored_padding="max_length"),
                              seed=0)
    assert {len(ids) for ids in padded.train["input_ids"]} == {48} and len(padded.test["input_ids"][0]) == 48
    for a, b in zip(plain.train, padded.train):
        n = len(a["input_ids"])
        assert b["input_ids"][:n] == a["input_ids"] and b["attention_mask"] == [1] * n + [0] * (48 - n)
        assert b["token_type_ids"][:n] == a["token_type_ids"] and b["labels"] == a["labels"]
    assert "stored padded to 48" in padded.description
    with pytest.raises(ValueError, match="--stored_padding is 'longest' or 'max_length'"):
        reference.minilm(reference.ReferenceArguments(num_train=6, stored_padding="max"), seed=0)
