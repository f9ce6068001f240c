"""The parallel variant: 2 processes through `accelerate launch` (gloo on CPU) equal 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed_script import one_sgd_step, tables

SCRIPT = Path(__file__).with_name("distributed_script.py")


def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--cpu --num_processes 2` silently runs ONE process; --multi_gpu on a CPU machine gives 2 gloo processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(SCRIPT), str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "tables.json"
    result = launch(out)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text()) | {"stderr": result.stderr}


@pytest.fixture(scope="module")
def one_process():
    return tables(world_size_repetitions=2)[0]


def test_two_processes_really_ran(two_processes):
    assert two_processes["num_processes"] == 2
    # transformers' advice to launch with torch.distributed.launch, once per influence arguments made (no DDP here)
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in two_processes["stderr"]


@pytest.mark.parametrize("case", ["lissa_knn", "lissa_t4_full", "lissa_t3_full", "cg_full", "exact_mean",
                                  "cg_gradient", "cg_gradient_mean", "cg_knn_one_candidate"])
def test_two_processes_equal_one(two_processes, one_process, case):
    """The same table on 2 processes, its LiSSA diagnostics included (they described only the main process's
    share of the repetitions: 0 repetitions and no steps for T = 1); one candidate row for two processes (one
    process's share of the kNN features is empty) crashed the launch."""
    a, b = one_process[case], two_processes[case]
    assert a["test_id"] == b["test_id"] and a["train_id"] == b["train_id"]
    np.testing.assert_allclose(b["influence"], a["influence"], rtol=1e-5, atol=1e-9)
    assert a["diagnostics"].keys() == b["diagnostics"].keys()
    for key, value in a["diagnostics"].items():
        if key == "lissa_stacked":  # (how the work ran: a process holding one repetition has nothing to stack)
            continue
        assert b["diagnostics"][key] == pytest.approx(value, rel=1e-5), key


def test_an_influence_trainer_under_a_launch_takes_the_step_of_one_process(tmp_path):
    """BERT's classification loss ignores num_items_in_batch, which its forward takes in **kwargs: the Trainer
    multiplied its loss by the number of processes, so 2 processes stepped 2x as far with SGD and logged a loss 2x
    (1.28 for a 2-label model). 2 processes of 4 rows now take the step of one process's 8."""
    result = launch(tmp_path / "sgd.json", "sgd_step")
    assert result.returncode == 0, result.stderr[-4000:]
    launched = json.loads((tmp_path / "sgd.json").read_text())
    alone = one_sgd_step(str(tmp_path / "alone"), 8)
    assert launched["num_processes"] == 2
    assert max(np.abs(np.asarray(c)).max() for c in alone["change"].values()) > 1e-4
    for name, change in alone["change"].items():
        np.testing.assert_allclose(launched["change"][name], change, rtol=1e-4, atol=1e-7, err_msg=name)
    # (the Trainer's training_loss is the main process's own 4 rows' mean: near the 8 rows', not 2x)
    assert launched["loss"] == pytest.approx(alone["loss"], rel=0.05)


def test_lissa_diverging_in_one_process_stops_both(tmp_path):
    """A divergence raised in one process's repetitions left the others waiting in the all-reduce: under `accelerate
    launch` the launcher then killed them without a word of why (the main process's log said nothing), and a process
    group started otherwise waited. Every process now raises, the others naming where it happened."""
    result = launch(tmp_path / "d.json", "diverge")
    assert result.returncode != 0
    assert "process 1's repetitions diverged (a test)" in result.stderr
    # process 0 raises the same class, naming process 1 and its error (any error of that share stops both)
    assert ("LissaDivergenceError: LiSSA's repetitions failed in process 1 (LissaDivergenceError: process 1's "
            "repetitions diverged (a test))") in result.stderr


def test_an_error_in_one_process_share_stops_every_process_and_the_next_call_works(tmp_path):
    """Only process 1 held the row whose kNN features are NaN: it raised, naming the row by its position in its own
    share ([5] for row 15), while process 0 went on into the next collective, received process 1's settings in place
    of features, failed with a numpy error, and the next call hung both processes."""
    result = launch(tmp_path / "e.json", "one_rank_error")
    assert result.returncode == 0, result.stderr[-4000:]
    ours, theirs = (json.loads((tmp_path / f"e.json.{rank}").read_text()) for rank in (1, 0))
    assert "not finite (inf or NaN) for the rows at positions [15]" in ours["with_row_15"]
    assert theirs["with_row_15"].startswith("The candidates' kNN features failed in process 1 (ValueError: ")
    assert "positions [15]" in theirs["with_row_15"]
    assert ours["without_row_15"] == theirs["without_row_15"] == 3 * 5  # 3 test rows, k = 5
    # process 1's trunk states could not be written (a full disk): it raised, process 0 went on into the next
    # stage's gather, received process 1's next call's settings in place of a failure, and both waited for ever
    assert "No space left on device (a test)" in ours["trunk_full"]
    assert theirs["trunk_full"].startswith("The trunk states failed in process 1 (OSError: ")
    assert ours["after_trunk_full"] == theirs["after_trunk_full"] == 3 * 5
    # process 1's rows lost a column, caught there before the settings check: process 0's call went on and met process
    # 1's next call at the settings check (equal settings: it passed), then both waited for ever
    assert "train_dataset has no 'input_ids' column" in ours["lost_column"]
    assert theirs["lost_column"].startswith("The call's input checks failed in process 1 (ValueError: ")
    assert ours["after_lost_column"] == theirs["after_lost_column"] == 3 * 5
    # process 1 alone failed in a stage every process runs by itself (its test gradients: an out-of-memory on one
    # GPU): process 0 went on into the next stage's gather, and both waited for ever (or it failed with a bare gloo
    # error); that stage is a collective block now, and the next call works
    assert ours["test_gradients_oom"] == "CUDA out of memory (a test)"
    assert theirs["test_gradients_oom"].startswith("The test rows' gradients failed in process 1 (RuntimeError: CUDA "
                                                   "out of memory (a test)); every process stops.")
    assert ours["after_test_gradients_oom"] == theirs["after_test_gradients_oom"] == 3 * 5


def test_a_cache_that_cannot_take_the_fine_tuned_model_stops_every_process(tmp_path):
    """Under a launch, only the main process writes the fine-tuned MiniLM into the cache; when that failed (a full
    disk), it raised while the other process waited in a barrier for the model to appear, and was killed by the
    launcher without a word of why. Every process now stops with the cache error."""
    result = launch(tmp_path / "f.json", "finetune_cache_full")
    assert result.returncode != 0
    assert "not reached" not in result.stderr and "Timeout" not in result.stderr
    assert "No space left on device (a test)" in result.stderr and "HF_FASTIF_CACHE" in result.stderr
    assert "Caching the fine-tuned MiniLM in " in result.stderr
    assert "($HF_FASTIF_CACHE) failed in process 0" in result.stderr
    assert not list((tmp_path / "f.json.cache").glob("minilm-nli/.*.tmp"))  # no staging folder left behind


def test_a_failed_shard_write_stops_every_process_and_a_retry_resumes(tmp_path):
    """The main process wrote a build's shards and then waited in a barrier with the others: a write that failed (a
    full disk) left the other process waiting for ever where the script caught the error and tried again (or failing
    with a bare gloo error where it did not)."""
    result = launch(tmp_path / "w.json", "build_write_fails")
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"w.json.{rank}").read_text())["attempts"] for rank in (0, 1))
    assert first[0] == "OSError: [Errno 28] No space left on device (a test)"
    assert second[0].startswith("RuntimeError: Writing ") and "shard-00001 failed in process 0 (OSError: [Errno 28]" \
        in second[0]
    assert first[1] == second[1] == "built, resumed_shards 1"
    # run again over a folder that cannot be written, the finished build is served in every process (the others
    # failed: the main process's OSError reached them as a RuntimeError, which the read-only path did not take)
    assert first[2] == second[2] == "served 33 rows"


def test_two_process_build_equals_the_single_table(two_processes, one_process):
    build, single = two_processes["build"], one_process["cg_full"]
    order = np.lexsort((build["train_id"], build["test_id"]))
    np.testing.assert_array_equal(np.asarray(build["train_id"])[order], single["train_id"])
    np.testing.assert_allclose(np.asarray(build["influence"])[order], single["influence"], rtol=1e-5, atol=1e-9)


def test_every_process_saving_the_table_into_one_folder_gives_the_table(two_processes):
    """Every process of a launch holds the whole table; saving it from each (the README's pattern) made the writers
    delete each other's shards mid-save, and the launch failed with the table lost. They now finish one at a time."""
    assert two_processes["saved"] == two_processes["build"]


def test_a_protocol_stopped_in_every_process_writes_its_finished_runs_before_any_process_exits(tmp_path):
    """A recipe that fails part-way writes its finished runs' report from the main process; the others raised at
    once, exited, and the launcher ended the main process before its write (a review's repro: nothing written)."""
    result = launch(tmp_path / "f", "finished_runs")
    assert result.returncode != 0 and "a late failure in process" in result.stderr
    assert (tmp_path / "f.partial").read_text().startswith("stopped at run 2 by ValueError: a late failure in process 0")


def test_mismatched_settings_across_processes_are_refused(tmp_path):
    result = launch(tmp_path / "x.json", "mismatch")
    assert result.returncode != 0
    assert "disagree on ['settings']" in result.stderr and "same script, arguments and data" in result.stderr


def test_processes_with_other_rows_are_refused_naming_what_differs(tmp_path):
    """Processes holding other rows were refused with a hash only (and "candidates" named first, though none were
    given); a resumed build refused one process as "another build" while the other failed in a bare gloo error."""
    result = launch(tmp_path / "r.json", "rows")
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"r.json.{rank}").read_text())
        assert "disagree on ['train rows', 'train values (sha256)'] (e.g. train rows: " in out["engine"]
        assert "disagree on ['candidates', 'train'] (e.g. candidates.num_rows: 3" in out["build"]
        assert "same script, arguments and data" in out["build"] and "holds another build" not in out["build"]


def test_a_collator_holding_a_plain_object_runs_under_a_launch_and_keeps_its_caches(tmp_path):
    """A collator holding a plain settings object had another fingerprint in every process (its address): every launch
    with it was refused as "processes disagree on ['functions']"; once accepted, its caches counted as held by one
    process only, and every call rebuilt them with a warning."""
    from hf_fastif import compute_influences
    from hf_fastif.influence import default_arguments
    from tests.distributed_script import COMMON, OptionsCollator
    from tests.tiny import make_token_dataset, tiny_model

    result = launch(tmp_path / "p.json", "plain_collator")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Another process does not hold" not in result.stderr
    calls = json.loads((tmp_path / "p.json").read_text())["calls"]
    args = default_arguments(**(COMMON | {"influence_solver": "exact", "influence_knn_k": None}))
    alone = compute_influences(tiny_model("bert"), make_token_dataset(20, seed=0), make_token_dataset(2, seed=1), args,
                               data_collator=OptionsCollator()).to_pandas().influence.tolist()
    for call in calls:
        np.testing.assert_allclose(call, alone, rtol=1e-5, atol=1e-9)


def test_processes_out_of_step_are_told_so():
    """A script that caught an error raised in one process only and went on reached the next stage's gather while
    the other process was at another: it received that stage's objects (an unpacking error), then waited for ever."""
    import hf_fastif.distributed as D

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(D, "world", lambda: (0, 2))
        patch.setattr(D, "gather_objects", lambda value: [value, ("the settings check", None)])
        with pytest.raises(RuntimeError, match="out of step: process 0 is at 'The kNN features', process 1 at 'the "
                                               "settings check'"):
            D.together(lambda: 1, "The kNN features")
        assert D.together(lambda: 1, "the settings check") == 1


def test_a_disagreement_names_the_first_differing_setting_not_whole_dicts():
    """One process with another influence_weight_decay was told "disagree on ['settings'] (e.g. settings: {...27
    keys...} vs {...})", 1,919 characters to compare by eye."""
    import hf_fastif.distributed as D
    from hf_fastif.influence import default_arguments

    mine = {"settings": default_arguments().influence_settings(), "combine": "none"}
    theirs = {"settings": default_arguments(influence_weight_decay=0.01).influence_settings(), "combine": "none"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(D, "world", lambda: (0, 2))
        patch.setattr(D, "gather_objects", lambda value: [value, ("the settings check", theirs)])
        with pytest.raises(ValueError) as refused:
            D.check_same_everywhere(mine)
    message = str(refused.value)
    assert "disagree on ['settings'] (e.g. settings.influence_weight_decay: 0.0 vs 0.01)" in message
    assert len(message) < 300


def test_a_setting_one_process_lacks_is_named_even_where_the_other_holds_none():
    """A nested key present in one process only, with the value None there (another hf_fastif version in one
    process), was no difference to `differences` (both .get() None): check_same_everywhere failed with a bare
    IndexError instead of its refusal."""
    import hf_fastif.distributed as D

    mine = {"settings": {"influence_knn_k": None, "influence_damping": 0.01}}
    theirs = {"settings": {"influence_damping": 0.01}}
    assert D.differences(mine, theirs) == [("settings.influence_knn_k", None, D.MISSING)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(D, "world", lambda: (0, 2))
        patch.setattr(D, "gather_objects", lambda value: [value, ("the settings check", theirs)])
        with pytest.raises(ValueError, match=r"disagree on \['settings'\] \(e\.g\. settings\.influence_knn_k: None vs \(missing\)\)"):
            D.check_same_everywhere(mine)


def test_processes_with_different_weights_are_refused(tmp_path):
    """One weight of one process differs (e.g. a checkpoint loaded from another step): mixing its results would
    give wrong numbers silently, so the cross-process check compares the weights' fingerprints."""
    result = launch(tmp_path / "w.json", "weights")
    assert result.returncode != 0
    assert "disagree on ['model']" in result.stderr


def test_caches_saved_by_one_process_serve_every_process_or_none(tmp_path):
    """Engine caches saved under a launch were keyed on the saving process's rank: the next launch's main process
    used the saved low-rank Hessian or curvature estimate while the other rebuilt it in collectives, and they
    waited for each other for ever (arnoldi) or gloo aborted (LiSSA's check). Caches now match on the number of
    processes, and one that not every process holds is rebuilt by all."""
    result = launch(tmp_path / "c.json", "caches")
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "c.json").read_text())
    for name, cached in (("arnoldi", "low_rank"), ("lissa", "curvature")):
        assert cached in out[f"{name}_every_loaded"] and cached in out[f"{name}_main_loaded"]
        first, *again = out[name]
        for values in again:
            np.testing.assert_allclose(values, first, rtol=1e-6, atol=1e-12)
    assert "Another process does not hold this process's" in result.stderr
