"""Long influence builds: many test rows, written shard by shard, resumable after an interruption.

A build directory holds ``build_manifest.json`` (what the build is: model, data, settings, shard size) and
``shards/shard-XXXXX.parquet`` (+ ``.json`` metadata), each written atomically by the main process once
computed. Started again, a build skips the finished shards and ends with exactly the table an
uninterrupted run gives; a directory from a different model, data or settings is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from . import distributed as D
from .arguments import InfluenceArguments
from .fingerprint import model_fingerprint
from .influence import compute_influences, data_signature, default_arguments
from .quiet import quiet_datasets
from .table import InfluenceTable
from .utils import write_atomic

logger = logging.get_logger(__name__)

MANIFEST = "build_manifest.json"


def build_influence_table(model: nn.Module, train_dataset: Dataset, test_dataset: Dataset,
                          output_dir: str | os.PathLike, args: InfluenceArguments | None = None, *,
                          shard_size: int = 64, **kwargs) -> InfluenceTable:
    """`compute_influences` for every row of ``test_dataset``, ``shard_size`` test rows at a time.

    Args:
        output_dir: the build directory; reusing it resumes the build.
        shard_size: test rows per shard (a shard is the unit of work that is saved).
        kwargs: passed to `compute_influences` (data_collator, candidate_dataset, loss_fn, ...).
    Returns:
        The whole table (``test_id`` indexes ``test_dataset``); also saved under ``output_dir/table``.
    Raises:
        ValueError: if ``output_dir`` holds a build of a different model, data or settings.
    """
    if kwargs.get("combine", "none") != "none":
        raise ValueError("build_influence_table builds one s_test per test row; for combine='mean' call "
                         "compute_influences directly.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    args = args if args is not None else default_arguments()
    out = Path(output_dir)
    shards = out / "shards"
    candidates = kwargs.get("candidate_dataset") or train_dataset
    signature = {
        "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model)},
        "settings": args.influence_settings(),
        "train": data_signature(train_dataset), "test": data_signature(test_dataset),
        "candidates": data_signature(candidates), "shard_size": shard_size,
    }
    signature = json.loads(json.dumps(signature, default=str))
    manifest = out / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())["signature"]
        if previous != signature:
            diff = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
            raise ValueError(
                f"{out} holds a build of a different {', '.join(diff)} (its manifest disagrees with this run); "
                "results would be mixed. Use a new output_dir, or delete this one to start over."
            )
    elif D.is_main_process():
        shards.mkdir(parents=True, exist_ok=True)
        write_atomic(manifest, json.dumps({"signature": signature}, indent=2))
    D.barrier()

    starts = list(range(0, len(test_dataset), shard_size))
    done = 0
    for i, start in enumerate(tqdm(starts, desc="influence shards", disable=not D.is_main_process())):
        path = shards / f"shard-{i:05d}.parquet"
        if path.is_file():
            done += 1
            continue
        rows = range(start, min(start + shard_size, len(test_dataset)))
        table = compute_influences(model, train_dataset, test_dataset.select(rows), args, **kwargs)
        part = table.to_pandas()
        part["test_id"] += start
        if D.is_main_process():
            write_atomic(path.with_suffix(".json"), json.dumps(table.metadata, indent=2, default=str))
            write_atomic(path, part.to_parquet(index=False))
        D.barrier()
    if done:
        logger.info(f"Resumed {out}: {done} of {len(starts)} shards were already computed.")
    with quiet_datasets():
        parts = [Dataset.from_parquet(str(shards / f"shard-{i:05d}.parquet")) for i in range(len(starts))]
    metadata = json.loads((shards / "shard-00000.json").read_text())
    metadata["test_data"] = signature["test"] | {"fingerprint": getattr(test_dataset, "_fingerprint", None)}
    metadata["build"] = {"shards": len(starts), "shard_size": shard_size, "resumed_shards": done}
    table = InfluenceTable(concatenate_datasets(parts), metadata, _sorted=True)
    if D.is_main_process():
        with quiet_datasets():
            table.save(out / "table")
    return table
