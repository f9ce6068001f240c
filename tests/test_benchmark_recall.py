"""benchmarks/recall.py runs end to end in quick mode (MiniLM on 120 generated rows). Structure and sanity only."""

import json

from benchmarks import recall


def test_recall_quick(tmp_path, capsys):
    report = recall.main(["--quick", "--output_dir", str(tmp_path), "--disable_tqdm", "true"])
    rows = report["rows"]
    assert [(r["method"], r["k"]) for r in rows] == [
        ("auto", 6), ("auto", 30), ("gradient D=256", 6), ("gradient D=256", 30), ("random", 6), ("random", 30)]
    for row in rows:
        assert row["random_expectation"] == row["k"] / 120
        assert all(0 <= row[f"recall@{n} {d}"] <= 1 for n in (10, 100) for d in ("helpful", "harmful"))
        assert row["recall@100 helpful"] <= row["k"] / 100 + 1e-9  # k candidates hold at most k of the top 100
    assert report["influence"]["influence_recursion_depth"] == 5 and report["influence"]["influence_lambda"] == 10
    assert report["num_influence_parameters"] > 256 and report["calls"][0]["shared_s"] > 0
    assert len(report["finetuned"]["key"]) == 64  # the fine-tuning cache's (the build's settings)
    saved = json.loads((tmp_path / "recall.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["test_rows"] == report["test_rows"]
    out = capsys.readouterr().out
    assert "| gradient D=256 | 30 | 25.0% |" in out and (tmp_path / "recall.md").read_text() in out


def test_recall_with_fewer_than_100_training_rows(tmp_path):
    """recall@100 of 60 rows is recall@60 (every row), as ``hf-fastif recall`` caps it: the run used to fail on
    n = 100 after the fine-tuning and every full scan."""
    report = recall.main(["--quick", "--output_dir", str(tmp_path), "--n_train", "60", "--ks", "10", "100%",
                          "--disable_tqdm", "true"])
    assert report["recall_ns"] == [10, 60]
    every_row = [r for r in report["rows"] if r["k"] == 60]
    assert every_row and all(r["recall@60 helpful"] == r["recall@10 harmful"] == 1.0 for r in every_row)
    assert "recall@60 helpful" in (tmp_path / "recall.md").read_text()
