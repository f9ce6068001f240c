"""Long influence builds: many test rows, written shard by shard, resumable after an interruption.

A build directory holds ``build_manifest.json`` (what decides the numbers: the model, the content of the
training, test and candidate rows, the settings, the collator, loss_fn, measurement_fn and features
callables, the shard size) and ``shards/shard-XXXXX/``, one influence-table folder per ``shard_size`` test
rows, written by the main process through `InfluenceTableWriter` (its metadata JSON is written last, so a
shard folder that has one is complete) and tagged with the sha256 of the manifest's signature. Started
again, a build checks the manifest, skips the finished shards of its own signature (a shard of another, e.g.
left after the manifest was deleted, is computed again) and ends with the table an uninterrupted run gives,
in ``table/``: exactly, or up to float rounding where only the `RUNTIME_SETTINGS` changed. A directory
whose manifest disagrees in any other entry is refused, naming the entries and both values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from . import distributed as D
from .arguments import PER_PROCESS_SETTINGS, InfluenceArguments
from .batches import check_values, column_rule, validate_dataset
from .engine import InfluenceEngine, non_finite_scores
from .fingerprint import (
    content_fingerprint,
    model_code_fingerprint,
    model_fingerprint,
    portable_fingerprint,
    portable_module_state,
)
from .influence import default_arguments
from .loss import default_loss_smoothing
from .mode import influence_mode, uncompiled
from .params import select_parameters
from .table import InfluenceTable, InfluenceTableError, InfluenceTableWriter
from .table.format import METADATA_FILE
from .utils import check_build_folder, hold_build_lock, to_json, write_atomic

logger = logging.get_logger(__name__)

MANIFEST = "build_manifest.json"
# 1: first/last rows of the data only, callables not recorded; 2: weights hashed with sha256; 3: run-time settings
# in the signature, shards not tagged with its sha256; 4: functions fingerprinted without the globals they read,
# an inferred config.problem_type hashed as set; 5: the L2 term of influence_weight_decay in every row's gradient;
# 7: the influence parameters' names; 8: the model's code (the transformers version, module classes from elsewhere);
# 9: the modules' state (plain attributes, hooks, a forward replaced), the datasets' format
MANIFEST_VERSION = 9
# settings that decide how, not what, is computed: batch sizes of the test gradients, full-data Hessians, kNN
# features and scoring (rows are independent; sums only regroup) and where large trunk states are kept. They
# change the numbers at most by float rounding, so a build resumed with other values goes on.
RUNTIME_SETTINGS = ("influence_hvp_batch_size", "influence_scoring_batch_size", *PER_PROCESS_SETTINGS,
                    "influence_skip_unread_positions", "influence_skip_trailing_padding", "influence_trunk_cache",
                    "influence_stack_repetitions")
# the keyword arguments of compute_influences that decide the numbers, beside the data
CALLABLES = ("data_collator", "loss_fn", "measurement_fn", "features")
KEYWORDS = ("combine", "candidate_dataset", *CALLABLES)


def data_identity(dataset: Dataset, name: str, model: nn.Module, rule: dict | None = None) -> dict:
    """Rows, the columns the model reads (inputs + labels; as `column_rule` of the arguments says) and the sha256
    of all their values (`content_fingerprint`: with the format and decoding features, as the engine's caches): any
    edit of a row the influence depends on changes it, wherever the row is."""
    columns = validate_dataset(dataset, name, model, **(rule or {}))
    return {"num_rows": len(dataset), "columns": columns, "sha256": content_fingerprint(dataset, columns)}


def build_signature(model: nn.Module, train_dataset: Dataset, test_dataset: Dataset, args: InfluenceArguments,
                    shard_size: int, candidate_dataset: Dataset | None = None,
                    callables: dict[str, Callable | None] | None = None) -> dict:
    """What a build's numbers depend on, as JSON values: two builds with equal signatures compute the same
    table up to float rounding (``callables``: the `CALLABLES` passed to `compute_influences`, None for the
    default; the `RUNTIME_SETTINGS` are left out)."""
    rule = column_rule(args)
    train = data_identity(train_dataset, "train_dataset", model, rule)
    candidates = (train if candidate_dataset is None
                  else data_identity(candidate_dataset, "candidate_dataset", model, rule))
    # influence_params=None selects by requires_grad, which the weights' fingerprint does not see (a model frozen
    # for one run and loaded again with from_pretrained, every parameter trainable): the names selected decide too
    names = list(select_parameters(model, args.influence_params))
    with influence_mode(model, names):  # (the modules as influence runs them: checkpointing off, as a loaded model's)
        modules = portable_module_state(model)
    signature = {
        "manifest_version": MANIFEST_VERSION,
        "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model),
                  "code": model_code_fingerprint(model), "modules": modules},
        "influence_parameters": {"tensors": len(names),
                                 "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()},
        "settings": {k: v for k, v in args.influence_settings().items() if k not in RUNTIME_SETTINGS}
        | ({"label_smoothing_factor": smoothing} if (smoothing := default_loss_smoothing(args, (callables or {}).get("loss_fn"))) else {}),
        "train": train, "test": data_identity(test_dataset, "test_dataset", model, rule), "candidates": candidates,
        **{name: _identity((callables or {}).get(name)) for name in CALLABLES},
        "shard_size": shard_size,
        # influence_repetitions=None means one LiSSA repetition per process: T is then the number of processes
        "repetitions_used": args.influence_repetitions or D.world()[1],
    }
    return json.loads(to_json(signature))


def signature_digest(signature: dict) -> str:
    """The sha256 of a signature's canonical JSON (sorted keys), recorded in every shard it computed."""
    return hashlib.sha256(to_json(signature, sort_keys=True).encode("utf-8")).hexdigest()


def _identity(value) -> str:
    """A callable's fingerprint as every process and the next run compute it (`portable_fingerprint`: a plain object
    the collator holds counts by its content, not its address, which made every build with one impossible to
    resume); a plain value (e.g. ``features="cls"``, a method name) by its repr."""
    return portable_fingerprint(value) if value is None or callable(value) else f"value:{value!r}"


def build_influence_table(model: nn.Module, train_dataset: Dataset, test_dataset: Dataset,
                          output_dir: str | os.PathLike, args: InfluenceArguments | None = None, *,
                          shard_size: int = 64, trained_loss: str | None = None, **kwargs) -> InfluenceTable:
    """`compute_influences` for every row of ``test_dataset``, ``shard_size`` test rows at a time.

    Args:
        output_dir: the build directory; reusing it resumes the build.
        shard_size: test rows per shard (a shard is the unit of work that is saved).
        trained_loss: what the model was trained on instead of the loss influence uses, recorded in the table's
            diagnostics (`InfluenceEngine.trained_loss`; `InfluenceTrainer` passes its compute_loss_func).
        kwargs: passed to `compute_influences`: data_collator, candidate_dataset, loss_fn, measurement_fn,
            features (each recorded in the manifest).
    Returns:
        The whole table (``test_id`` indexes ``test_dataset``), saved under ``output_dir/table`` and loaded
        from there.
    Raises:
        ValueError: if ``output_dir`` holds a build of a different model, data, settings or callables.
    """
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"build_influence_table got unknown keyword arguments {unknown}; it takes "
                        f"{', '.join(KEYWORDS)} (passed on to compute_influences).")
    if kwargs.get("combine", "none") != "none":
        raise ValueError("build_influence_table builds one s_test per test row; for combine='mean' call "
                         "compute_influences directly.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    args = args if args is not None else default_arguments()
    model = uncompiled(model)
    out = check_build_folder(output_dir, {"table": "folder", "shards": "folder"}, "output_dir")  # (refused now: they
    # failed once every shard was computed)
    callables = {name: kwargs.get(name) for name in CALLABLES}
    signature = build_signature(model, train_dataset, test_dataset, args, shard_size, kwargs.get("candidate_dataset"),
                                callables)
    finished = []  # (the main process's finished table, where its folder cannot be written)

    def claim():
        try:
            return hold_build_lock(out)
        except OSError as err:  # (a read-only folder still serves a finished build of this signature)
            finished.append(_finished_table(out, signature))
            if finished[0] is None:
                raise
            return str(err)  # (why it cannot be written)

    lock = D.on_main(claim, f"Claiming {out}")  # (held by the main process to the end)
    unwritable = D.gather_objects(lock if isinstance(lock, str) else None)[0]  # (the main process's answer)
    if unwritable is not None:
        table = finished[0] if finished else _finished_table(out, signature)
        if table is None:  # (another process sees another folder's contents)
            raise OSError(f"{unwritable}; process {D.world()[0]} does not find the finished build there that the "
                          "main process serves. Build into a folder every process sees alike.")
        logger.warning(f"{unwritable}. It holds this build finished (the same model, rows, settings and callables): "
                       "its table is served as it is, reading only (with the notes of the run that assembled it).")
        return table
    try:
        return _build_held(model, train_dataset, test_dataset, args, out, signature, shard_size, callables,
                           trained_loss, kwargs)
    finally:
        if lock is not None:
            lock.release()


def _build_held(model, train_dataset, test_dataset, args, out: Path, signature: dict, shard_size: int,
                callables: dict, trained_loss, kwargs: dict) -> InfluenceTable:
    """`build_influence_table` once its folder's build lock is held."""
    shards = out / "shards"
    fresh = _check_or_write_manifest(out, signature)
    digest = signature_digest(signature)
    test_identity = {"num_rows": len(test_dataset), "fingerprint": getattr(test_dataset, "_fingerprint", None),
                     "sha256": signature["test"]["sha256"]}

    starts = list(range(0, len(test_dataset), shard_size))
    done = 0
    # one engine for every shard: what does not depend on the test rows (trunk states of the training rows, the
    # convergence check, a low-rank Hessian, the gradient or feature index) is computed once per build, not per shard
    written = 0
    try:
        # the stored test rows' checks over the whole dataset, before any shard (after the processes were found to
        # hold the same rows): a bad row in a later shard was named by its place in that shard (row 1 for row 3), and
        # found only once the shards before it were computed
        with InfluenceEngine(model, args, **callables) as engine:
            own = engine.measures_default_loss
            check_values(test_dataset, signature["test"]["columns"], "test_dataset", model, default_loss=own,
                         needs_target=own)
            engine.trained_loss = trained_loss
            trained_with = engine.trained_with()  # (set on the whole table: shards of a resumed build may predate it)
            for i, start in enumerate(tqdm(starts, desc="influence shards",
                                           disable=bool(args.disable_tqdm) or not D.is_main_process())):
                folder = shards / f"shard-{i:05d}"
                if _complete(folder, digest):
                    done += 1
                    continue
                rows = range(start, min(start + shard_size, len(test_dataset)))
                with engine.test_rows_named_from(start):  # (an error names a bad row by its place in test_dataset)
                    table = engine.compute_influences(train_dataset, test_dataset.select(rows),
                                                      combine=kwargs.get("combine", "none"),
                                                      candidate_dataset=kwargs.get("candidate_dataset"))
                _write_shard(table, folder, start, test_identity, digest)
                written += 1
    except BaseException:
        if fresh and not done and not written:
            _forget_manifest(out)
        raise
    if done:
        logger.info(f"Resumed {out}: {done} of {len(starts)} shards were already computed.")

    D.on_main(lambda: _assemble(out, len(starts), shard_size, done, digest, trained_with),
              f"Assembling {out / 'table'}")
    return InfluenceTable.load(out / "table")


def _assemble(out: Path, count: int, shard_size: int, done: int, digest: str, trained_with: str | None) -> None:
    """Write ``out/table`` from the build's ``count`` shards (on the main process), with this run's ``trained_with``
    note (`InfluenceEngine.trained_with`)."""
    shards = out / "shards"
    metadata = InfluenceTable.load(shards / "shard-00000").metadata
    diagnostics = metadata.setdefault("diagnostics", {})
    diagnostics.pop("trained_with", None)
    if trained_with is not None:
        diagnostics["trained_with"] = trained_with
    metadata["build"] = {"shards": count, "shard_size": shard_size, "resumed_shards": done, "signature_sha256": digest,
                         "note": "diagnostics and num_processes are shard 0's, but for non_finite_scores, which covers "
                                 "every shard"}
    parts = [InfluenceTable.load(shards / f"shard-{i:05d}") for i in range(count)]
    other = [i for i, part in enumerate(parts) if (part.metadata.get("build") or {}).get("signature_sha256") != digest]
    if other:  # written meanwhile by another build run into this folder at the same time
        raise InfluenceTableError(f"Shards {other} of {out} were computed for another build while this one ran "
                                  "(two builds into one output_dir at once); nothing was assembled. Run one "
                                  "build per output_dir.")
    _merge_non_finite(metadata, parts)  # reads every part: their files stay open, as checked
    with InfluenceTableWriter(out / "table", metadata) as writer:
        for part in parts:
            writer.write(part)


def _write_shard(table: InfluenceTable, folder: Path, start: int, test_identity: dict, digest: str) -> None:
    """Save one shard's table (on the main process; a failure there stops every process), its ``test_id`` made the
    row of the whole test dataset."""
    def write() -> None:
        part = table.to_arrow()
        part = part.set_column(part.schema.get_field_index("test_id"), "test_id",
                               pa.array(part.column("test_id").to_numpy() + start))
        metadata = table.metadata | {"test_data": (table.metadata.get("test_data") or {}) | test_identity,
                                      "build": {"signature_sha256": digest}}
        with InfluenceTableWriter(folder, metadata) as writer:  # test_id indexes test_dataset, as in table/
            writer.write(part)

    D.on_main(write, f"Writing {folder}")


def _merge_non_finite(metadata: dict, parts: list[InfluenceTable]) -> None:
    """``diagnostics.non_finite_scores`` of the whole table from its shards' rows (each shard names only its own)."""
    arrows = [part.to_arrow() for part in parts]
    summary = non_finite_scores(*(np.concatenate([a.column(c).to_numpy(zero_copy_only=False) for a in arrows])
                                  for c in ("train_id", "influence")))
    diagnostics = metadata.setdefault("diagnostics", {})
    diagnostics.pop("non_finite_scores", None)
    if summary is not None:
        diagnostics["non_finite_scores"] = summary


def _finished_table(out: Path, signature: dict) -> InfluenceTable | None:
    """The table of ``out``'s finished build if its manifest records ``signature`` and its table was assembled for
    it (read only, nothing written), else None."""
    try:
        if _recorded_signature(out / MANIFEST) != signature:
            return None
        table = InfluenceTable.load(out / "table")
    except (OSError, ValueError):
        return None
    if (table.metadata.get("build") or {}).get("signature_sha256") != signature_digest(signature):
        return None
    try:
        table.verify()  # (a rerun that can write re-assembles from the checked shards; this one cannot)
    except (OSError, ValueError):
        return None
    return table


def _check_or_write_manifest(out: Path, signature: dict) -> bool:
    """Refuse a directory whose manifest records another build; start one (main process) if there is none.
    Returns whether this run started it."""
    # processes holding other data or settings are named as such first: one refused by the manifest alone (another
    # build, it said) while the others waited in a barrier, which then failed with a bare gloo error
    manifest = out / MANIFEST
    existed = manifest.is_file()  # seen before the collective, so by every process alike (not after one wrote it)
    D.check_same_everywhere(signature)

    def start() -> None:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write_atomic(manifest, to_json({"signature": signature}, indent=2))

    no_shard = not any((out / "shards").glob(f"shard-*/{METADATA_FILE}"))
    try:
        previous = _recorded_signature(manifest) if existed else None
    except ValueError:
        if not no_shard:
            raise
        previous = None  # (damaged, and nothing to keep apart: replaced as below)
    if existed and previous != signature and no_shard:
        # a run stopped before its first shard (killed: no exception removed its manifest): nothing to keep apart
        logger.warning(f"{out} holds the manifest of another build that computed no shard; this build replaces it.")
        D.barrier()  # every process has read it before it is replaced
        existed = False
    if existed:
        if previous.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"{out} holds a build made by an older hf_fastif (manifest version "
                             f"{previous.get('manifest_version')}, now {MANIFEST_VERSION}); its shards cannot be "
                             "trusted to match. Use a new output_dir, or delete this one to start over.")
        if previous != signature:
            found = D.differences(previous, signature)
            def show(value) -> str:
                return "missing" if value is D.MISSING else to_json(value)

            values = "; ".join(f"{key}: {show(old)} in the manifest, {show(new)} now" for key, old, new in found)
            how = "run it with the manifest's values"
            if "model.modules" in [key for key, _, _ in found]:  # (a hash: say what it covers)
                how += (" (model.modules: the modules' state beside the weights, as influence runs them: plain "
                        "attributes such as a LayerNorm's eps, hooks, a forward replaced on a module, an activation "
                        "module swapped; restore them as they were)")
            if [key for key, _, _ in found] == ["repetitions_used"]:  # influence_repetitions=None: T = processes
                how = (f"launch it with {previous['repetitions_used']} processes (influence_repetitions=None runs one "
                       "LiSSA repetition per process)")
            raise ValueError(f"{out} holds another build ({values}); results would be mixed. To resume that build, "
                             f"{how}. Use a new output_dir otherwise, or delete this one to start over.")
        D.barrier()
        return False
    D.on_main(start, f"Writing {manifest}")
    return True


def _recorded_signature(manifest: Path) -> dict:
    """The build signature ``manifest`` records; one that cannot be read as a manifest (cut short by a crash, edited)
    is refused naming it and what to do (a bare JSON error named neither)."""
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest} cannot be read as a build's manifest ({err}). {_WITHOUT_MANIFEST}") from err
    signature = recorded.get("signature") if isinstance(recorded, dict) else None
    if not isinstance(signature, dict):
        raise ValueError(f"{manifest} is not a build's manifest (no build signature in it). {_WITHOUT_MANIFEST}")
    return signature


_WITHOUT_MANIFEST = ("Delete that file and run the build again: each shard records the build it belongs to, so the "
                     "shards of this build are kept and any other is computed again (or use a new output_dir).")


def _forget_manifest(out: Path) -> None:
    """Remove the manifest a failed run started before any shard was computed (main process): it protected
    nothing, and a rerun with the settings the error asks for (another damping, say) would be refused by it."""
    if not D.is_main_process():
        return
    (out / MANIFEST).unlink(missing_ok=True)
    try:
        (out / "shards").rmdir()  # only if empty
    except OSError:
        pass
    logger.info(f"No shard of {out} was computed; its manifest was removed, so a rerun may use other settings.")


def _complete(folder: Path, digest: str) -> bool:
    """Whether a shard folder holds a whole, intact table computed for signature ``digest`` (else it is
    computed again)."""
    if not (folder / METADATA_FILE).is_file():
        return False
    try:
        table = InfluenceTable.load(folder, verify=True)
    except InfluenceTableError as err:
        logger.warning(f"Computing {folder} again: {err}")
        return False
    recorded = (table.metadata.get("build") or {}).get("signature_sha256")
    if recorded != digest:
        logger.warning(f"Computing {folder} again: it was computed for another build (signature sha256 "
                       f"{recorded or 'not recorded'}, this run's is {digest}), e.g. left by a build whose "
                       f"{MANIFEST} was deleted; its numbers would not match this run's.")
        return False
    return True
