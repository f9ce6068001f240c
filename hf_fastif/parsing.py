"""Command-line parsing shared by the ``hf-fastif`` CLI and the recipes: `HfArgumentParser` over argument
dataclasses (always `InfluenceArguments` itself, so every ``--influence_*`` flag and TrainingArguments' own
``--output_dir``, ``--seed``, ``--num_train_epochs`` ... keep their names), with defaults that depend on the
setup the command line chooses.

The embedded default and the paper's setup want different defaults (a CPU-sized LiSSA vs the paper's), and
which one applies is only known once ``--model_name_or_path`` is read. So the command line is read twice:
first to learn that choice, then again with the chosen setup's values as the parser's defaults
(``parser.set_defaults``). A flag given on the command line always wins; an ungiven one takes the setup's
default, and the dataclass default where the setup has none.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from transformers import HfArgumentParser

from .utils import check_output_dir

T = TypeVar("T")

HELP_FLAGS = ("-h", "--help")

Defaults = Mapping[str, Any] | Callable[[argparse.Namespace], Mapping[str, Any]]


def parse_arguments(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
                    defaults: Defaults | None = None) -> tuple:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into one instance of each of ``dataclass_types``, in order.

    Args:
        dataclass_types: argument dataclasses, e.g. ``(ModelDataArguments, CorrectionArguments,
            InfluenceArguments)``; their field names must be distinct (they become the flags).
        argv: the command line, without the program name.
        defaults: values for flags the command line does not give: a mapping, or a function of a first,
            provisional parse (an `argparse.Namespace` holding every flag) that returns one. Keys that are no
            field of ``dataclass_types`` are ignored, so one mapping can serve several commands.
    """
    return parse_with_defaults(HfArgumentParser(list(dataclass_types)), argv, defaults)


def parse_with_defaults(parser: HfArgumentParser, argv: Sequence[str] | None = None,
                        defaults: Defaults | None = None) -> tuple:
    """`parse_arguments` on a given parser (e.g. a subcommand's); see there. A value the argument dataclasses
    refuse (``--seed -1``, ``--num_threads 0``: a ``ValueError`` naming the fix) is, on the real command line
    (``argv`` None), one line on stderr and exit status 2, as argparse reports its own flags' errors (a recipe printed
    a traceback and exited with 1); with ``argv`` given, the ``ValueError`` is raised."""
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    if callable(defaults):
        # --help is answered by the second parse, which knows the chosen setup's defaults
        first, _ = parser.parse_known_args([a for a in argv if a not in HELP_FLAGS])
        defaults = defaults(first)
    parser.set_defaults(**{k: v for k, v in (defaults or {}).items() if k in fields})
    namespace = parser.parse_args(argv)
    # (``--influence_knn_k None`` or ``0``, ``--influence_params None``: read as None by InfluenceArguments itself,
    # as for a plain HfArgumentParser)
    try:
        return tuple(dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init})
                     for dtype in parser.dataclass_types)
    except ValueError as err:
        if not command_line:
            raise
        exit_with_error(parser.prog, err)


def flag_given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``argv`` sets ``flag`` (``--shard_size``), as argparse reads it: also ``--shard-size``, ``=value``, and
    an abbreviation it accepted (a prefix argparse resolved uniquely, so to this flag)."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and flag.startswith("--" + name[2:].replace("-", "_")):
            return True
    return False


def check_output_flag(output_dir: str, argv: Sequence[str] | None) -> None:
    """`check_output_dir` of a command's ``--output_dir`` right after the parse: on the real command line (``argv``
    None) its refusal (an existing file) is one line and exit status 2, as the parse's own (`parse_with_defaults`)."""
    check_flags(lambda: check_output_dir(output_dir), argv)


@contextlib.contextmanager
def flag_refusals(argv: Sequence[str] | None) -> Iterator[None]:
    """Around a check of parsed flags, or what reads the files and models they name before any work: a `ValueError`
    or `FileNotFoundError` it raises is, on the real command line (``argv`` None), one line and exit status 2, as the
    parse's own; with ``argv`` given it is raised."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        if argv is not None:
            raise
        exit_with_error(Path(sys.argv[0]).name, err)


def check_flags(check: Callable[[], T], argv: Sequence[str] | None) -> T:
    """``check()`` under `flag_refusals`: what it returns, or its refusal as one line on the real command line."""
    with flag_refusals(argv):
        return check()


def exit_with_error(prog: str, err: Exception) -> NoReturn:
    """``prog: error: <message>`` on stderr and exit status 2: a command line's bad value, as argparse reports one."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def check_positive_counts(flags, *names: str) -> None:
    """Refuse a count flag below 1 (0 used to mean "all rows", a negative one dropped rows, without a word), before
    any work or folder; a ``max_*`` one is told that leaving it out takes every row."""
    for name in names:
        value = getattr(flags, name)
        if value is not None and value < 1:
            hint = " (omit it for every row)" if name.startswith("max_") else ""
            raise ValueError(f"--{name} must be at least 1{hint}, got {value}.")
