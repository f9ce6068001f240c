"""Command-line parsing shared by the benchmarks: their own dataclass plus `InfluenceArguments` itself, with
defaults that depend on the benchmark's own flags (e.g. ``--quick``); a flag given by the user always wins. The
output folder is checked here too, before any work."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from transformers import HfArgumentParser

from hf_fastif import parsing
from hf_fastif.utils import check_output_dir


def parse_with_defaults(dataclass_types: tuple[type, ...], defaults: Callable[[Namespace], dict],
                        argv: list[str] | None = None) -> tuple:
    """Parse ``argv`` into ``dataclass_types`` (the benchmark's own first) the way the ``hf-fastif`` CLI does
    (`hf_fastif.parsing.parse_with_defaults`: ``--influence_knn_k None`` or ``0`` is None), after
    ``parser.set_defaults(**defaults(first))`` where ``first`` holds the flags as given. Unknown or abbreviated
    flags are an error."""
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    return parsing.parse_with_defaults(parser, argv, defaults)


def output_folder(path: str | Path, flag: str = "--output_dir") -> Path:
    """``path`` as a folder, created with its parents before any work: a path that cannot be one (an existing
    file) is refused at the start, not after the measuring."""
    folder = check_output_dir(path, flag)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
