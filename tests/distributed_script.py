"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Writes the main process's tables to argv[1] as JSON. With argv[2] == "mismatch", process 1 uses another
seed, which must be refused; with "weights", process 1's model differs in one weight, which must be refused too;
with "diverge", LiSSA diverges in process 1's repetitions only, and both processes must stop (not wait); with
"caches", engine caches saved by the main process are loaded by every process, then by the main process only; with
"finetune_cache_full", the main process cannot write the fine-tuned MiniLM into the cache, and both must stop; with
"build_write_fails", the main process cannot write a build's shard, both stop, and a retry resumes; with
"sgd_step", an `InfluenceTrainer` takes one SGD step.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_fastif import InfluenceTable, build_influence_table, compute_influences  # noqa: E402
from hf_fastif.distributed import barrier, finish, world  # noqa: E402
from hf_fastif.influence import default_arguments  # noqa: E402
from tests.tiny import make_token_dataset, pad_collator_for_tests, sgd_step, tiny_model  # noqa: E402

CASES = {
    "lissa_knn": dict(influence_solver="lissa", influence_repetitions=None, influence_knn_k=8),
    "lissa_t4_full": dict(influence_solver="lissa", influence_repetitions=4, influence_knn_k=None),
    "lissa_t3_full": dict(influence_solver="lissa", influence_repetitions=3, influence_knn_k=None),
    # fewer candidate rows than processes: one process's share of the kNN features is empty
    "cg_knn_one_candidate": dict(influence_solver="cg", influence_knn_k=1, candidates=1),
    "cg_full": dict(influence_solver="cg", influence_knn_k=None),
    "exact_mean": dict(influence_solver="exact", influence_knn_k=10, combine="mean"),
    "cg_gradient": dict(influence_solver="cg", influence_knn_k=8, influence_knn_features="gradient",
                        influence_projection_dim=256),
    "cg_gradient_mean": dict(influence_solver="cg", influence_knn_k=8, influence_knn_features="gradient",
                             influence_projection_dim=256, combine="mean"),
}
COMMON = dict(influence_damping=0.05, influence_scale=20.0, influence_recursion_depth=15, influence_batch_size=2,
              influence_params=[r"encoder\.layer\.1\.output", r"pooler\.", r"classifier\."], disable_tqdm=True,
              influence_scoring_batch_size=5, influence_hvp_batch_size=6)


class Options:
    """Plain settings with the default repr (an address, other in every process)."""

    def __init__(self, pad_to_multiple_of=None):
        self.pad_to_multiple_of = pad_to_multiple_of


class OptionsCollator:
    def __init__(self):
        self.inner, self.options = pad_collator_for_tests(), Options()

    def __call__(self, rows):
        return self.inner(rows)


def tables(world_size_repetitions=None, seed_offset=0, perturb=False, cache_dir=None):
    """Every case's table as lists; shared by the launched script and the 1-process reference (the launched
    processes each with its own ``influence_cache_dir``, a node-local scratch folder: it was refused as a
    disagreement on the settings)."""
    model = tiny_model("bert")
    if perturb:
        with torch.no_grad():
            model.bert.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    train, test = make_token_dataset(31, seed=0), make_token_dataset(3, seed=1)
    collator = pad_collator_for_tests()
    out = {}
    for name, case in CASES.items():
        case = dict(case)
        combine = case.pop("combine", "none")
        if case.get("influence_repetitions", 1) is None and world_size_repetitions is not None:
            case["influence_repetitions"] = world_size_repetitions
        candidates = case.pop("candidates", None)
        candidates = None if candidates is None else make_token_dataset(candidates, seed=2)
        args = default_arguments(**(COMMON | case | {"influence_seed": 42 + seed_offset,
                                                     "influence_cache_dir": cache_dir}))
        table = compute_influences(model, train, test, args, combine=combine, data_collator=collator,
                                   candidate_dataset=candidates)
        out[name] = table.to_pandas().sort_values(["test_id", "train_id"]).to_dict(orient="list")
        out[name]["diagnostics"] = {k: v for k, v in table.metadata["diagnostics"].items() if k.startswith("lissa_")
                                    and isinstance(v, (int, float))}
    return out, model, train, test, collator


def one_sgd_step(output_dir: str, batch_size: int) -> dict:
    """`sgd_step` of the tiny BERT on 8 rows, ``batch_size`` rows a process, as JSON: each parameter's change and the
    logged loss."""
    rows = make_token_dataset(8, seed=3, min_len=6, max_len=6)
    change, loss, _ = sgd_step(tiny_model("bert", dtype=torch.float32), rows, output_dir, batch_size)
    return {"loss": loss, "change": {k: v.tolist() for k, v in change.items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, size = world()
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode == "sgd_step":  # 2 processes of 4 rows each take the step of one process's 8
        out = one_sgd_step(sys.argv[1] + ".trainer", 4) | {"num_processes": size}
        if rank == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(out, f)
        finish()
        sys.exit(0)
    if mode == "finished_runs":  # a protocol fails in every process after some runs finished; each process raises
        import time

        from hf_fastif.applications import report
        from hf_fastif.applications.common import keep_finished

        def slow_write(name, result, setup, protocol=None, **kwargs):  # the main process's report takes a while
            if rank == 0:
                time.sleep(2)
                with open(f"{sys.argv[1]}.{name}", "w") as f:
                    f.write(kwargs["stopped"])

        report.write_report = slow_write
        error = ValueError(f"a late failure in process {rank} (a test)")
        keep_finished(error, {"runs": [1]}, "run 2", 1, 2)
        with report.finished_runs_kept("partial", setup=None):
            raise error  # (uncaught: the process exits with it, as a recipe does)
    if mode == "diverge":
        from hf_fastif.solvers import LissaDivergenceError

        def diverging(*args, **kwargs):
            if rank == 1:
                raise LissaDivergenceError("process 1's repetitions diverged (a test)")
            return solve_lissa(*args, **kwargs)

        import hf_fastif.engine
        from hf_fastif.solvers.lissa import solve_lissa
        hf_fastif.engine.s_test.solve_lissa = diverging
        args = default_arguments(**(COMMON | CASES["lissa_t4_full"]))
        compute_influences(tiny_model("bert"), make_token_dataset(31, seed=0), make_token_dataset(3, seed=1), args,
                           data_collator=pad_collator_for_tests())
        raise AssertionError("not reached: the divergence stops every process")
    if mode == "one_rank_error":  # training row 15's kNN features are NaN; process 1 holds it (rows 10-19)
        import faulthandler

        from hf_fastif import InfluenceEngine

        faulthandler.dump_traceback_later(120, exit=True)  # a collective waiting for ever: stacks, then out
        model, train, test = tiny_model("bert"), make_token_dataset(20, seed=0), make_token_dataset(3, seed=1)
        ids = list(train["input_ids"])
        ids[15] = ids[15][:-1] + [3]  # the only row holding token 3, whose embedding is NaN
        train = train.remove_columns("input_ids").add_column("input_ids", ids)
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight[3] = float("nan")
        args = default_arguments(**(COMMON | CASES["cg_full"] | {"influence_knn_k": 5}))
        out = {}
        own_trunk_cache = InfluenceEngine._trunk_cache
        own_test_gradients = InfluenceEngine._each_test_gradient

        def full_disk(self, *args, **kwargs):  # process 1 has no room for its trunk states (each has its own file)
            raise OSError(28, "No space left on device (a test)")

        def out_of_memory(self, *args, **kwargs):  # process 1 alone, in a stage every process runs by itself
            raise RuntimeError("CUDA out of memory (a test)")

        good = train.select(range(15))
        # process 1's copy of the rows lost a column: refused there before the settings check, which process 0 then
        # met in process 1's next call (both waited for ever)
        lost = good.remove_columns("input_ids") if rank == 1 else good
        for name, rows in (("with_row_15", train), ("without_row_15", good), ("trunk_full", good),
                           ("after_trunk_full", good), ("lost_column", lost), ("after_lost_column", good),
                           ("test_gradients_oom", good), ("after_test_gradients_oom", good)):
            InfluenceEngine._trunk_cache = full_disk if name == "trunk_full" and rank == 1 else own_trunk_cache
            InfluenceEngine._each_test_gradient = (out_of_memory if name == "test_gradients_oom" and rank == 1
                                                   else own_test_gradients)
            with InfluenceEngine(model, args, data_collator=pad_collator_for_tests()) as engine:
                try:  # a script that reports a failed call and goes on: the next call must work
                    out[name] = len(engine.compute_influences(rows, test))
                except (ValueError, OSError, RuntimeError) as err:
                    out[name] = str(err)
        with open(f"{sys.argv[1]}.{rank}", "w") as f:
            json.dump(out, f)
        finish()
        sys.exit(0)
    if mode == "finetune_cache_full":  # the main process cannot write the fine-tuned MiniLM into the cache
        import faulthandler

        import hf_fastif.minilm_default as minilm_default
        from hf_fastif.data import generate_nli

        faulthandler.dump_traceback_later(120, exit=True)  # a process waiting for ever: stacks, then out

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device (a test)")

        if rank == 0:
            minilm_default.write_atomic = full
        raw = generate_nli(seed=0, n_train=16, n_hans_per_subcase=0, n_pool_per_subcase=0)["train"]
        settings = minilm_default.FinetuneSettings(seed=0, epochs=1.0, lr=1e-3, batch_size=8)
        minilm_default.cached_finetune_minilm(raw, settings, cache_dir=sys.argv[1] + ".cache")
        raise AssertionError("not reached: the failed write stops every process")
    if mode == "caches":
        import faulthandler

        from hf_fastif import InfluenceEngine
        from hf_fastif.distributed import is_main_process

        faulthandler.dump_traceback_later(120, exit=True)  # a collective waiting for ever: stacks, then out
        _, model, train, test, collator = tables()
        folder, out = sys.argv[1] + ".caches", {}
        for name, case in (("arnoldi", dict(influence_solver="arnoldi", influence_arnoldi_rank=4, influence_knn_k=9)),
                           ("lissa", dict(influence_solver="lissa", influence_repetitions=2, influence_knn_k=9,
                                          influence_knn_features="gradient", influence_projection_dim=64,
                                          influence_check_convergence=True))):
            args = default_arguments(**(COMMON | case))
            with InfluenceEngine(model, args, data_collator=collator) as engine:
                out[name] = [engine.compute_influences(train, test).to_pandas().influence.tolist()]
                if is_main_process():
                    engine.save_caches(f"{folder}.{name}")
            barrier()
            for loaders in ("every", "main"):
                with InfluenceEngine(model, args, data_collator=collator) as engine:
                    if loaders == "every" or is_main_process():
                        out[f"{name}_{loaders}_loaded"] = engine.load_caches(f"{folder}.{name}")
                    out[name].append(engine.compute_influences(train, test).to_pandas().influence.tolist())
        if rank == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(out, f)
        finish()
        sys.exit(0)
    if mode == "plain_collator":  # a collator holding a plain settings object (its address differs per process)
        import faulthandler

        from hf_fastif import InfluenceEngine

        faulthandler.dump_traceback_later(120, exit=True)
        model, train, test = tiny_model("bert"), make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
        args = default_arguments(**(COMMON | {"influence_solver": "exact", "influence_knn_k": None}))
        with InfluenceEngine(model, args, data_collator=OptionsCollator()) as engine:
            out = {"calls": [engine.compute_influences(train, test).to_pandas().influence.tolist() for _ in range(2)]}
        if rank == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(out, f)
        finish()
        sys.exit(0)
    if mode == "build_write_fails":  # the main process's second shard write fails (a full disk); the script retries
        import faulthandler

        from hf_fastif.table import InfluenceTableWriter

        faulthandler.dump_traceback_later(120, exit=True)  # a process waiting for ever: stacks, then out
        close, closes = InfluenceTableWriter.close, []

        def full_once(self, *args, **kwargs):
            closes.append(1)
            if rank == 0 and len(closes) == 2:
                raise OSError(28, "No space left on device (a test)")
            return close(self, *args, **kwargs)

        InfluenceTableWriter.close = full_once
        model, train, test = tiny_model("bert"), make_token_dataset(11, seed=0), make_token_dataset(3, seed=1)
        args = default_arguments(**(COMMON | CASES["cg_full"]))
        import hf_fastif.builder as builder_module
        from hf_fastif.utils import write_error

        def read_only(directory):
            raise write_error(directory / "lock", OSError(30, "Read-only file system (a test)"))

        out = {"attempts": []}
        # a script that reports the failure and tries again: the retry resumes; then the folder cannot be written, and
        # the finished build is served
        for attempt in range(3):
            if attempt == 2:
                builder_module.hold_build_lock = read_only
            try:
                table = build_influence_table(model, train, test, sys.argv[1] + ".build", args, shard_size=1,
                                              data_collator=pad_collator_for_tests())
                out["attempts"].append(f"served {len(table)} rows" if attempt == 2 else
                                       f"built, resumed_shards {table.metadata['build']['resumed_shards']}")
            except (OSError, RuntimeError) as err:
                out["attempts"].append(f"{type(err).__name__}: {err}")
        with open(f"{sys.argv[1]}.{rank}", "w") as f:
            json.dump(out, f)
        finish()
        sys.exit(0)
    if mode == "rows":  # process 1 has one training row fewer: refused in the engine, then in a resumed build
        import faulthandler

        faulthandler.dump_traceback_later(120, exit=True)
        model, test = tiny_model("bert"), make_token_dataset(3, seed=1)
        train = make_token_dataset(31 - rank, seed=0)
        args = default_arguments(**(COMMON | CASES["cg_full"]))
        out = {}
        for name, run in (("engine", lambda: compute_influences(model, train, test, args,
                                                                  data_collator=pad_collator_for_tests())),
                          ("build", lambda: build_influence_table(
                              model, train, test, sys.argv[1] + ".build", args, shard_size=2,
                              data_collator=pad_collator_for_tests()))):
            try:
                run()
                out[name] = "ran"
            except ValueError as err:
                out[name] = str(err)
        with open(f"{sys.argv[1]}.{rank}", "w") as f:
            json.dump(out, f)
        finish()
        sys.exit(0)
    offset = 1 if mode == "mismatch" and rank == 1 else 0
    out, model, train, test, collator = tables(seed_offset=offset, perturb=mode == "weights" and rank == 1,
                                               cache_dir=f"{sys.argv[1]}.scratch{rank}")
    build = build_influence_table(model, train, test, sys.argv[1] + ".build",
                                  default_arguments(**(COMMON | CASES["cg_full"])), shard_size=2,
                                  data_collator=collator)
    out["build"] = build.to_pandas().to_dict(orient="list")
    out["num_processes"] = size
    # every process holds the whole table and saves it, as the README's `table.save("dir")` does without a
    # main-process guard: the writers deleted each other's shards mid-save and the launch failed, the table lost
    build.save(sys.argv[1] + ".saved", shard_rows=3)
    barrier()
    if rank == 0:
        out["saved"] = InfluenceTable.load(sys.argv[1] + ".saved", verify=True).to_pandas().to_dict(orient="list")
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    finish()
