"""The benchmarks' one way to start several processes: ``accelerate launch`` of a benchmarks module."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

# `python -m benchmarks.<name>` finds the package from here, whatever the caller's working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for the launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module: str, args: list[str], num_processes: int) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes P -m module args``. On a CPU machine ``--multi_gpu``
    gives P gloo processes; ``--cpu --num_processes P`` would silently run one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", module, *args]


def accelerate_launch(module: str, args: list[str], num_processes: int, num_threads: int = 1,
                      timeout: float = 1800) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``module`` (e.g. ``"benchmarks.fastif_worker"``) in ``num_processes`` processes from the repository
    root, each with ``num_threads`` OpenMP threads; returns the finished process (output captured) and the
    command as one shell-quoted string. Paths in ``args`` should be absolute."""
    if num_processes < 2:
        raise ValueError(f"num_processes must be >= 2 for a launch, got {num_processes}; run one process in place.")
    cmd = launch_command(module, args, num_processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    return done, shlex.join(cmd)

