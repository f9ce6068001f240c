"""Command-line parsing shared by the benchmarks: their own dataclass plus `InfluenceArguments` itself, with
defaults that depend on the benchmark's own flags (e.g. ``--quick``); a flag given by the user always wins."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable

from transformers import HfArgumentParser


def parse_with_defaults(dataclass_types: tuple[type, ...], defaults: Callable[[Namespace], dict],
                        argv: list[str] | None = None) -> tuple:
    """Parse ``argv`` into ``dataclass_types`` (the benchmark's own first), after ``parser.set_defaults(
    **defaults(own))`` where ``own`` holds the first dataclass's flags as given. Unknown flags are an error."""
    first = HfArgumentParser(dataclass_types[0], add_help=False, allow_abbrev=False)
    own, _ = first.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    parser.set_defaults(**defaults(own))
    return parser.parse_args_into_dataclasses(args=argv)
