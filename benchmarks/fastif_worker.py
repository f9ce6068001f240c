"""The "FastIF parallel" row's worker, run in every process of an `accelerate launch` (benchmarks/rows.py):
FastIF one test point per call, as the one-process row does; rank 0 writes the timings and values.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m benchmarks.fastif_worker WORK_DIR

``WORK_DIR`` holds ``model/``, ``train/``, ``test/`` and ``job.json`` (the row's ``influence_*`` settings).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import load_from_disk
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_fastif import InfluenceArguments, compute_influences
from hf_fastif.distributed import barrier, finish, world
from hf_fastif.quality import influence_by_test
from hf_fastif.utils import to_json, write_atomic

from .timing import sync


def main(work: str) -> None:
    work_dir = Path(work)
    job = json.loads((work_dir / "job.json").read_text())
    torch.set_num_threads(job["num_threads"])
    rank, size = world()
    model = AutoModelForSequenceClassification.from_pretrained(work_dir / "model", attn_implementation="eager")
    model = model.to(PartialState().device).eval()  # this process's GPU, or the CPU
    collator = DataCollatorWithPadding(AutoTokenizer.from_pretrained(work_dir / "model"))
    train, test = load_from_disk(str(work_dir / "train")), load_from_disk(str(work_dir / "test"))
    args = InfluenceArguments(output_dir=str(work_dir), report_to="none", disable_tqdm=True, **job["settings"])
    compute_influences(model, train, test.select([0]), args, data_collator=collator)  # warm-up
    walls, diagnostics, values = [], [], []
    for t in range(len(test)):
        gc.collect()  # (untimed, as `benchmarks.timing.timed(collected=True)` starts the rows it is compared with)
        barrier()
        sync()
        start = time.perf_counter()
        table = compute_influences(model, train, test.select([t]), args, data_collator=collator)
        sync()
        barrier()  # the call ends when its slowest process does
        walls.append(time.perf_counter() - start)
        diagnostics.append(table.metadata["diagnostics"])
        ids, v = influence_by_test(table, 1)[0]
        values.append((ids.tolist(), v.tolist()))
    if rank == 0:
        write_atomic(work_dir / "result.json", to_json(
            {"walls": walls, "diagnostics": diagnostics, "values": values, "num_processes": size}))


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
