"""The core, parallel, per-test-point and device-cost benchmarks (benchmarks/core.py, parallel.py, per_test_point.py,
device_costs.py) run end to end in quick mode. Structure and sanity only, never speed."""

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


def test_per_test_point_quick(tmp_path, capsys):
    from benchmarks import per_test_point

    results = per_test_point.main(["--quick", "--output_dir", str(tmp_path), "--num_test_points", "3"])
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == ["FastIF", "fast", "live"]
    assert rows["FastIF"]["settings"]["influence_batch_size"] == 1
    assert rows["FastIF"]["settings"]["influence_repetitions"] == 4
    assert rows["live"]["settings"]["influence_solver"] == "arnoldi"
    for row in rows.values():
        assert row["first_call_s"] > 0 and row["next_calls_s"] > 0 and row["all_in_one_call_s_per_point"] > 0
        assert row["all_in_one_call_phases"]["s_test_s"] > 0
    assert json.loads((tmp_path / "per_test_point.json").read_text())["num_test_points"] == 3
    assert "Seconds per test point" in capsys.readouterr().out


def test_device_costs_quick(tmp_path, capsys):
    from benchmarks import device_costs

    results = device_costs.main(["--quick", "--output_dir", str(tmp_path)])
    unit, rows = results["unit_costs_s"], {r["row"]: r for r in results["paper_scale"]}
    assert results["environment"]["device"] == "cpu" and results["num_train"] == 64
    assert results["paper_scale_settings"]["paper_b"] == 64  # the original's B: every row of a smaller set
    assert set(unit["hvp"]) >= {"1x1", "1x8", "8x1", "64x1"} and all(v > 0 for v in unit["hvp"].values())
    assert unit["score"]["1"] > 0 and unit["score_loop"] > 0 and unit["power_iteration"] > 0
    assert rows["original"]["speed-up vs original (hf_fastif kernels)"] == pytest.approx(1.0)
    assert rows["FastIF"]["seconds"] < rows["original"]["seconds"]  # kNN and B = 1 cut the cost at N = 392,702
    assert all(v > 0 for v in results["throughput"].values())
    assert "At the paper's scale" in (tmp_path / "device_costs.md").read_text()
    assert "Unit costs on cpu" in capsys.readouterr().out
