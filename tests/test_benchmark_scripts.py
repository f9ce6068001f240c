"""The core and parallel benchmarks (benchmarks/core.py, benchmarks/parallel.py) run end to end in quick mode.
Structure and sanity only, never speed."""

import json

import pytest

from benchmarks import core, parallel


def test_core_quick(tmp_path, capsys):
    results = core.main(["--quick", "--output_dir", str(tmp_path), "--influence_scoring_batch_size", "16"])
    scoring = results["scoring"]
    assert [(r["hidden"], r["parameters"]) for r in scoring] == [
        (32, "paper (last layer, pooler, classifier)"), (32, "all")]
    assert scoring[0]["num_parameters"] < scoring[1]["num_parameters"]
    for row in scoring:
        for key in ("forward_cand_per_s", "loop_cand_per_s", "jvp_cand_per_s", "grad_cand_per_s"):
            assert row[key] > 0, key
    digits = {r["solver"]: r for r in results["digits"]}
    assert digits["exact"]["spearman_vs_exact"] == pytest.approx(1.0)
    assert digits["cg"]["spearman_vs_exact"] > 0.99 and digits["exact"]["spearman_vs_loo"] > 0.9
    assert json.loads((tmp_path / "benchmark_core.json").read_text())["digits"][0]["solver"] == "exact"
    assert "## Scoring" in capsys.readouterr().out


def test_parallel_quick_runs_two_processes(tmp_path, capsys):
    results = parallel.main(["--quick", "--output_dir", str(tmp_path)])
    one, two = results["one_process"], results["two_processes"]
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["many_in_one_call_s"] > 0 and one["one_at_a_time_s"] > 0 and two["many_in_one_call_s"] > 0
    assert "one_at_a_time_s" not in two  # only the one-process run times test points one by one
    assert "--quick" in results["command"]  # the launched run got the same flags
    assert (tmp_path / "benchmark_parallel.json").exists()
    assert "2 processes, many test points in one call" in capsys.readouterr().out
