"""The few collective operations influence needs, through Accelerate. One process: all are no-ops.

Only two stages are distributed: solvers (repetitions / Hessian batches split, one all-reduce) and
scoring (candidates split, results gathered). Nothing else knows how many processes there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState


def world() -> tuple[int, int]:
    """``(rank, number of processes)``."""
    state = PartialState()
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    return world()[0] == 0


def shard(items: Sequence, rank: int | None = None, size: int | None = None) -> list:
    """This process's contiguous share of ``items`` (shares differ in length by at most one)."""
    if rank is None or size is None:
        rank, size = world()
    bounds = np.linspace(0, len(items), size + 1).round().astype(int)
    return list(items[bounds[rank] : bounds[rank + 1]])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (returned on every process)."""
    if world()[1] == 1:
        return tensor
    out = tensor.clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows in rank order (each process gets the whole array)."""
    if world()[1] == 1:
        return array
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, array)
    return np.concatenate(parts, 0)


def broadcast_object(obj):
    """The main process's ``obj`` on every process."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
