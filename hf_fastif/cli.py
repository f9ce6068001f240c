"""The ``hf-fastif`` command: build influence tables, share them on the Hub, and read them in a terminal.

    hf-fastif build --output_dir out                       # the embedded default (generated NLI, MiniLM), offline
    hf-fastif build --output_dir out --model_name_or_path bert-mnli --train_dataset train.jsonl --test_dataset hans.txt
    hf-fastif push out/table user/mnli-influence [--private]   # token: HF_TOKEN or `hf auth login`
    hf-fastif pull user/mnli-influence [--revision v1] [--output-dir copy]
    hf-fastif show user/mnli-influence --test-id 3 -n 10   # or a local table folder
    hf-fastif recall --ks 1% 5% --methods auto gradient random   # candidate recall (fine-tuned MiniLM, offline)
    hf-fastif cache [--prune | --unused-days 30 | --clear]     # what $HF_FASTIF_CACHE holds; remove entries

Each subcommand is a ``add_<name>(subparsers)`` function that registers its parser and its ``run``; new
subcommands add one function to `COMMANDS`. ``build`` parses `InfluenceArguments` itself, as the recipes do:
the same ``--influence_*`` flags and TrainingArguments' own (``--output_dir``, ``--seed``, ...). The other
subcommands' dashed options take the underscore spelling too (``--test-id`` / ``--test_id``), as ``build``'s do.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging as pylogging
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
)
from transformers.utils import logging

from .annotate import TextSource, save_with_text
from .applications.common import check_num_labels, generic_labels, predict
from .applications.prepare import resolve_model
from .arguments import InfluenceArguments
from .batches import usable_positions
from .builder import build_influence_table
from .data import (
    MODEL_MAX_LENGTH,
    NLI_MAX_LENGTH,
    label_names,
    load_hans,
    load_mnli,
    tokenize_nli,
)
from .data.loaders import local_columns
from .data.tokenization import check_min_max_length, resolve_max_length
from .distributed import finish, is_main_process, on_main
from .embedded import (
    DEFAULT_KIND,
    KINDS,
    embedded_defaults,
    embedded_kind,
)
from .engine import InfluenceEngine
from .gradient_index import check_projection_dim
from .params import num_parameters, select_parameters
from .parsing import HELP_FLAGS, check_positive_counts, flag_given, parse_with_defaults
from .recall import (
    MINILM_RECALL_N_TRAIN,
    MINILM_RECALL_SETTINGS,
    RECALL_METHODS,
    check_methods,
    finetuned_minilm,
    parse_k,
    recall_ns,
    recall_table,
    resolve_ks,
)
from .space import build_default, open_table
from .table import InfluenceTable, InfluenceTableError
from .table.format import label_text
from .table.hub import push_table_resolved
from .utils import check_build_folder, check_output_dir, library_version, to_json, write_atomic

EXIT_ERROR = 2
TRUST_REMOTE_CODE_HELP = ("Run the model's own code from its folder or Hub repo (auto_map in config.json: a custom "
                          "architecture or head; in tokenizer_config.json: a custom tokenizer). Only for code you "
                          "trust; without it such a model is refused (even where transformers has a built-in class of "
                          "its model_type or tokenizer_class, which it would load instead).")
FORCE_DOWNLOAD_HELP = ("For a Hub repo id: download the table again even if the Hub cache holds it (a cached copy "
                       "that was damaged).")
logger = pylogging.getLogger(__name__)


MAX_LENGTH_HELP = (
    "With --model_name_or_path: token limit of a premise/hypothesis pair; longer pairs are cut, longest side first, "
    f"and their count is logged (default {MODEL_MAX_LENGTH}, the paper's, or the model's positions if fewer; set it to "
    f"the length the model was fine-tuned with). The embedded default's data is cut at {NLI_MAX_LENGTH}, as it was "
    "fine-tuned.")


# ---- build ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildArguments:
    """Model and data of ``hf-fastif build``, named as in the recipes. Training and influence settings are
    `InfluenceArguments`' own flags."""

    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "Sequence-classification model: a local dir or Hub id. Unset: the embedded default (generated NLI "
                "data; --embedded_model) offline, with its training and influence settings as the defaults of the "
                "other flags (hf_fastif.embedded)."})
    embedded_model: str | None = dataclasses.field(default=None, metadata={
        "help": f"The embedded default's model: {' or '.join(KINDS)} (default {DEFAULT_KIND}: all-MiniLM-L6-v2 "
                "fine-tuned once and cached in $HF_FASTIF_CACHE; tiny: a 2-layer BERT from a config)."})
    revision: str | None = dataclasses.field(default=None, metadata={"help": "Hub revision of --model_name_or_path."})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    train_dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "Training data of --model_name_or_path: an MNLI-format file or Hub dataset id."})
    train_split: str = dataclasses.field(default="train", metadata={"help": "Hub split of --train_dataset."})
    test_dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "Test data: a HANS file (with heuristic/subcase) or MNLI-format file or Hub id."})
    test_split: str = dataclasses.field(default="validation", metadata={"help": "Hub split of --test_dataset."})
    max_train_samples: int | None = dataclasses.field(default=None, metadata={
        "help": "Use the first N training rows (train_id stays the dataset's row); embedded default: N generated "
                f"rows (default {embedded_kind().table_data['n_train']})."})
    max_test_samples: int | None = dataclasses.field(default=None, metadata={"help": "Use the first N test rows."})
    max_length: int | None = dataclasses.field(default=None, metadata={"help": MAX_LENGTH_HELP})
    shard_size: int = dataclasses.field(
        default=64, metadata={"help": "With --model_name_or_path: test rows computed and saved at a time (a rerun "
                                      "resumes after the last one). The embedded default's 30 test rows are one "
                                      "piece of work."})

    def __post_init__(self):
        check_positive_counts(self, "max_train_samples", "max_test_samples", "shard_size")
        _check_max_length(self)


def _check_max_length(flags) -> None:
    """Refuse ``--max_length`` below 8 pieces, or without ``--model_name_or_path`` (the embedded default's data is
    cut as its model was fine-tuned)."""
    if flags.max_length is None:
        return
    if flags.model_name_or_path is None:
        raise ValueError(f"--max_length needs --model_name_or_path: the embedded default's pairs are cut at "
                         f"{NLI_MAX_LENGTH} word pieces, as its model was fine-tuned. Drop it.")
    check_min_max_length(flags.max_length)


SECRET_FLAG = re.compile(r"^--?[\w-]*token(?:=|$)", re.IGNORECASE)
"""Flags whose value is a secret (``--hub_token``, TrainingArguments' ``--push_to_hub_token``): never recorded."""


def recorded_command(argv: Sequence[str]) -> str | None:
    """The build's command line for the table's metadata (``hf-fastif ...``, also when run as ``python -m hf_fastif``),
    with the values of secret flags (`SECRET_FLAG`) left out: a ``--hub_token`` was written into the metadata, and
    ``push`` published it. None when not run from the command line."""
    if not argv or not (argv[0].endswith("hf-fastif") or argv[0].endswith(("hf_fastif/__main__.py", "-m"))):
        return None
    # argparse also takes a unique prefix of a flag (`--hub_tok` for `--hub_token`): a flag that begins a secret one's
    # name is left out too (an ambiguous one never ran)
    secrets = [f.name for kind in (BuildArguments, InfluenceArguments) for f in dataclasses.fields(kind)
               if f.name.lower().endswith("token")]
    out, value_next = [], False  # value_next: this argument is the value of a secret flag before it
    for arg in argv[1:]:
        flag, eq, _ = arg.partition("=")
        prefix = flag[2:].lower().replace("-", "_") if flag.startswith("--") and len(flag) > 2 else None
        secret = not value_next and (SECRET_FLAG.match(arg) is not None
                                     or (prefix is not None and any(s.startswith(prefix) for s in secrets)))
        out.append("***" if value_next else f"{flag}=***" if secret and eq else arg)
        value_next = secret and not eq
    return " ".join(["hf-fastif", *out])


def max_length_for(flags, model) -> int:
    """The token limit of pairs for a user's model: ``--max_length``, or `MODEL_MAX_LENGTH` capped at the positions
    the model can give a row (RoBERTa's table numbers from its pad id + 1: 514 entries, 512 usable); a limit beyond
    them is refused."""
    return resolve_max_length(flags.max_length, usable_positions(model))


def build_defaults(first: argparse.Namespace) -> dict:
    """Defaults of ``build``'s flags: the embedded default's (of ``--embedded_model``) for its table when no model is
    given, else the library's (`InfluenceArguments`' own)."""
    if first.model_name_or_path is not None:
        return {}
    return embedded_defaults("table", first.embedded_model)


def add_build(sub) -> None:
    parser = sub.add_parser("build", help="Build an influence table (a model + data, or the embedded default).",
                            dataclass_types=[BuildArguments, InfluenceArguments],
                            description="Build an influence table. The defaults shown are the embedded default's "
                                        "(hf_fastif.embedded) without --model_name_or_path, the library's with it.")
    parser.set_defaults(run=run_build, parser=parser)


def run_build(ns: argparse.Namespace) -> int:
    if ns.output_dir is None:
        raise ValueError("build needs --output_dir (the folder for the build; the table goes to <output_dir>/table).")
    build, args = parse_with_defaults(ns.parser, ns.argv, build_defaults)
    out = check_output_dir(args.output_dir)  # an existing file: refused now ("[Errno 17] File exists" after the work)
    main_process = is_main_process()  # (asked now: a launch's process group is closed once the build is written)
    if build.model_name_or_path is None:
        if build.train_dataset or build.test_dataset:
            raise ValueError("--train_dataset / --test_dataset need --model_name_or_path (the model trained on that "
                             "data).")
        if flag_given(ns.argv, "--shard_size"):
            raise ValueError("--shard_size needs --model_name_or_path: the embedded default computes its 30 test rows "
                             "in one piece (a rerun reuses the fine-tuned model, and a finished build whole). Drop it.")
        kind = embedded_kind(build.embedded_model).name
        build_default(out, args, max_train_samples=build.max_train_samples, max_test_samples=build.max_test_samples,
                      kind=kind, progress=_stage)
        finish()  # under `accelerate launch`: every process waits for the writer, then the process group closes
        if main_process:
            print(f"the embedded default model ({kind}) -> {out / 'model'}")
    elif build.embedded_model is not None:
        raise ValueError("--embedded_model chooses the embedded default, which runs without --model_name_or_path; "
                         "drop one of them.")
    else:
        _build_from_model(build, args, out)
    if not main_process:  # under `accelerate launch` the main process reports the table, once
        return 0
    table = InfluenceTable.load(out / "table")
    print(f"influence table ({len(table):,} rows, {len(table.test_ids)} test ids) -> {out / 'table'}")
    print(f"next: hf-fastif show {out / 'table'} --test-id {table.test_ids[0] if len(table) else 0}")
    return 0


MODEL_BUILD_ENTRIES = {"table": "folder", "build": "folder"}
"""What a ``--model_name_or_path`` build writes in its --output_dir: the table, and the resumable build's folder."""


def _build_from_model(build: BuildArguments, args: InfluenceArguments, out: Path) -> None:
    if not build.train_dataset or not build.test_dataset:
        raise ValueError("--model_name_or_path needs --train_dataset (its training data) and --test_dataset (the rows "
                         "to explain).")
    check_build_folder(out, MODEL_BUILD_ENTRIES)  # (a ``table`` file failed once every shard was computed)
    resolve_model(build.model_name_or_path, build.revision, build.trust_remote_code)  # a clear error first
    model = AutoModelForSequenceClassification.from_pretrained(build.model_name_or_path, revision=build.revision,
                                                               trust_remote_code=build.trust_remote_code,
                                                               attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(build.model_name_or_path, revision=build.revision,
                                              trust_remote_code=build.trust_remote_code)
    match_padding(model, tokenizer, build.model_name_or_path)
    train, test = _nli_data(model.config, build)
    if build.max_train_samples:
        train = train.select(range(min(build.max_train_samples, len(train))))
    if build.max_test_samples:
        test = test.select(range(min(build.max_test_samples, len(test))))
    collator = DataCollatorWithPadding(tokenizer)
    max_length = max_length_for(build, model)
    train_tok, test_tok = (tokenize_nli(rows, tokenizer, max_length=max_length) for rows in (train, test))
    table = build_influence_table(model, train_tok, test_tok, out / "build", args, shard_size=build.shard_size,
                                  data_collator=collator)
    predictions = predict(model, test_tok, collator).argmax(-1)
    table.metadata["command"] = recorded_command(sys.argv)
    table.metadata["tokenization"] = {"max_length": max_length}  # the Space cuts typed pairs and the rows as these
    # under `accelerate launch` every process holds the table; one writes it (its failure stops every process)
    on_main(lambda: save_with_text(table, out / "table", model=model, model_name=build.model_name_or_path,
                                   train=TextSource(train, build.train_dataset, build.train_split),
                                   test=TextSource(test, build.test_dataset, build.test_split), predictions=predictions,
                                   label_names=label_names(model.config.num_labels) if generic_labels(model.config)
                                   else None),
            f"Writing {out / 'table'}")
    finish()  # under `accelerate launch`: every process waits for the writer, then the process group closes


def match_padding(model, tokenizer, name: str) -> None:
    """A padding token for the batches of a checkpoint saved without one on one side (GPT-2's tokenizers have none):
    the tokenizer takes the model config's ``pad_token_id``, or the config the tokenizer's (GPT-2-style classifiers
    read each row's last token that is not padding, and refused batches of several rows), each said in a log line;
    with neither, refused with the fix (the collation failed advising a collator the command line already uses)."""
    config = model.config
    if tokenizer.pad_token_id is None and getattr(config, "pad_token_id", None) is None:
        raise ValueError(
            f"Neither the tokenizer nor the model config of {name} has a padding token (GPT-2's have none), so rows "
            "of different lengths cannot be batched. Save the checkpoint with one (when fine-tuning: "
            "tokenizer.pad_token = tokenizer.eos_token; model.config.pad_token_id = tokenizer.pad_token_id), or add "
            '"pad_token" to its tokenizer_config.json and "pad_token_id" to its config.json.')
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        logger.warning(f"The tokenizer of {name} has no padding token: padding with the model config's pad_token_id "
                       f"{config.pad_token_id} ({tokenizer.pad_token!r}).")
    elif getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
        logger.warning(f"The model config of {name} has no pad_token_id: using the tokenizer's padding token "
                       f"{tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), so that the model can tell padding "
                       "from the rows' tokens in a batch.")


def _nli_data(config, source) -> tuple[Dataset, Dataset]:
    """The raw training rows (MNLI format) and test rows (HANS when the file has its columns, heuristic and
    subcase; MNLI format otherwise) named by ``source`` (build or recall arguments), after checking that the
    model's labels are in the data's order (0 = entailment, ...)."""
    num_labels = check_num_labels(config, (2, 3), "NLI data")
    if generic_labels(config):  # (a trial's `show` then printed LABEL_1 for a row the file labelled neutral)
        names, model = label_names(num_labels), getattr(source, "model_name_or_path", None) or "the model"
        logger.warning(f"The labels of {model} are not named (config.id2label {list(config.id2label.values())}): "
                       "they are read in the NLI data's order, "
                       f"{', '.join(f'{i} = {n}' for i, n in enumerate(names))}, and the table names them so. If the "
                       "checkpoint was fine-tuned with another order, set config.id2label to it.")
    train = load_mnli(source.train_dataset, split=source.train_split, num_labels=num_labels)
    columns = local_columns(source.test_dataset) or []
    try:
        test = load_hans(source.test_dataset, split=source.test_split)
    except ValueError:
        if {"heuristic", "subcase"} & set(columns):  # HANS that load_hans refuses: its reason, not MNLI's reading
            raise  # (read as MNLI, a 3-label model took every non-entailment row as neutral)
        return train, load_mnli(source.test_dataset, split=source.test_split, num_labels=num_labels)
    if num_labels != 2:
        raise ValueError(f"{source.test_dataset} is HANS (entailment / non-entailment), but the model has "
                         f"{num_labels} labels: its class 1 is neutral, not non-entailment, so every non-entailment "
                         "row would be measured against the wrong class. Use a 2-label (MNLI-2) checkpoint, or test "
                         "rows in MNLI format.")
    return train, test


# ---- push / pull ---------------------------------------------------------------------------------------------
def add_push(sub) -> None:
    parser = sub.add_parser("push", help="Upload a table folder to a Hub dataset repo (parquet shards + card).")
    parser.add_argument("table", help="A table folder (written by `build` or InfluenceTable.save).")
    parser.add_argument("repo_id", help="Dataset repo, e.g. user/mnli-influence (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--revision", default=None, help="Branch to commit to; the repo's main branch when omitted.")
    parser.add_argument("--commit-message", "--commit_message", default="Upload influence table with hf_fastif",
                        help="The commit's message.")
    parser.add_argument("--license", default=None, help="The card's license (a Hub license id, e.g. cc-by-sa-4.0); "
                                                        "default: the table's own (its metadata's), else apache-2.0. "
                                                        "A table that carries text takes its data's license.")
    parser.add_argument("--token", default=None, help="Hub token (better: the HF_TOKEN variable or `hf auth login`, "
                                                      "which keep it out of the process list and shell history).")
    parser.set_defaults(run=run_push)


def run_push(ns: argparse.Namespace) -> int:
    table = InfluenceTable.load(ns.table, verify=True)
    # the repo id as the Hub resolved it: a bare name is created under the token's namespace
    repo_id, commit = push_table_resolved(table, ns.repo_id, private=True if ns.private else None, token=ns.token,
                                          revision=ns.revision, commit_message=ns.commit_message,
                                          license=ns.license)
    print(f"pushed {len(table):,} rows to dataset {repo_id} at commit {commit}")
    print(f"load it with: InfluenceTable.from_hub({repo_id!r}, revision={commit!r})")
    return 0


def add_pull(sub) -> None:
    parser = sub.add_parser("pull", help="Download a table from the Hub (into the cache, or a folder).")
    parser.add_argument("repo_id", help="Dataset repo of the table.")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit id.")
    parser.add_argument("--output-dir", "--output_dir", default=None, help="Also save the table to this folder.")
    parser.add_argument("--force-download", "--force_download", action="store_true", help=FORCE_DOWNLOAD_HELP)
    parser.set_defaults(run=run_pull)


def run_pull(ns: argparse.Namespace) -> int:
    if ns.output_dir:  # an existing file: refused now ("[Errno 20] Not a directory" after the download)
        check_output_dir(ns.output_dir, "--output-dir")
    table = InfluenceTable.from_hub(ns.repo_id, revision=ns.revision, verify=True, force_download=ns.force_download)
    print(_summary(table))
    if ns.output_dir:
        table.save(ns.output_dir, repo_id=ns.repo_id)
        print(f"saved to {ns.output_dir}")
    return 0


# ---- show ----------------------------------------------------------------------------------------------------
def add_show(sub) -> None:
    parser = sub.add_parser("show", help="Print the most helpful / harmful training rows of a test id.")
    parser.add_argument("source", help="A table folder or a Hub dataset repo id.")
    parser.add_argument("--test-id", "--test_id", type=int, default=None, help="Test row to explain (default: the first).")
    parser.add_argument("-n", type=int, default=10, help="Rows per side.")
    parser.add_argument("--side", choices=("both", "helpful", "harmful"), default="both",
                        help="Which list to show: the most helpful rows, the most harmful, or both.")
    parser.add_argument("--revision", default=None, help="Hub revision, for a repo id.")
    parser.add_argument("--list", action="store_true", help="List the table's test examples instead.")
    parser.add_argument("--force-download", "--force_download", action="store_true", help=FORCE_DOWNLOAD_HELP)
    parser.set_defaults(run=run_show)


def run_show(ns: argparse.Namespace) -> int:
    if not ns.list and ns.n < 1:
        raise ValueError(f"-n must be at least 1, got {ns.n}.")
    table = open_table(ns.source, ns.revision, force_download=ns.force_download)[0]
    names = table.metadata.get("label_names") or []
    tests = table.tests()
    for col in ("test_label", "test_prediction"):
        if col in tests:
            tests[col] = _label_names(tests[col], names)
    if ns.list:
        print(_summary(table))
        shown = tests.drop(columns=[c for c in ("test_subcase",) if c in tests])
        print(_format(shown.rename(columns=lambda c: c.removeprefix("test_") if c != "test_id" else c), _width()))
        return 0
    test_id = ns.test_id if ns.test_id is not None else int(tests.test_id.iloc[0]) if len(tests) else 0
    row = tests[tests.test_id == test_id]
    counts = table.describe(test_id)  # an unknown test id: the error before anything is printed of it
    print(_summary(table))
    print(f"\ntest {test_id}")
    if len(row):
        for col in [c for c in row.columns if c != "test_id"]:
            print(f"  {col.removeprefix('test_')}: {row.iloc[0][col]}")
    print(_describe_line(counts))
    for caveat in table.caveats(test_id):
        print(textwrap.fill(caveat, _width()))
    note = table.candidates_note()
    if note:
        print(textwrap.fill(note, _width()))
    for side in ("helpful", "harmful"):
        if ns.side in (side, "both"):
            frame = getattr(table, side)(test_id, ns.n)
            shown = frame.drop(columns=[c for c in frame.columns if c.startswith("test_")])
            if "train_label" in shown:
                shown["train_label"] = _label_names(shown["train_label"], names)
            shown.insert(0, "rank", range(1, len(shown) + 1))
            shown["influence"] = shown["influence"].map("{:+.4e}".format)
            shown.columns = [c.removeprefix("train_") if c != "train_id" else c for c in shown.columns]
            print(f"\nmost {side} ({'negative' if side == 'helpful' else 'positive'} influence first)")
            print(_format(shown, _width()))
            if len(frame) < ns.n:
                print(f"only {len(frame)} {side} row{'' if len(frame) == 1 else 's'} among the "
                      f"{counts['num_candidates']} candidates")
    return 0


def _stage(stage: str) -> None:
    """A stage of a long command as it starts, on stderr (its stdout stays the result); under `accelerate launch`
    from the main process only (every process printed each stage)."""
    if is_main_process():
        print(f"[hf-fastif] {stage}", file=sys.stderr, flush=True)


def _describe_line(counts: dict) -> str:
    """The candidates of one test id: how many are helpful / harmful / zero, and the spread of their values."""
    spread = " · ".join(f"{k} {counts[k]:+.4e}" for k in ("min", "median", "max") if counts[k] is not None)
    nan = f" · NaN {counts['num_nan']}" if counts["num_nan"] else ""
    return (f"candidates {counts['num_candidates']} · helpful {counts['num_helpful']} · harmful "
            f"{counts['num_harmful']} · zero {counts['num_zero']}{nan} · distinct values "
            f"{counts['num_distinct_values']}" + (f" · {spread}" if spread else ""))


def _label_names(values, names: list[str]) -> list[str]:
    return [label_text(v, names) for v in values]


def _summary(table: InfluenceTable) -> str:
    md = table.metadata
    settings = md.get("settings") or {}
    return (f"influence table: {len(table):,} rows · model {(md.get('model') or {}).get('name_or_path')} · solver "
            f"{settings.get('influence_solver')} · λ {md.get('lambda')} · hf_fastif {md.get('library_version')} · "
            f"created {md.get('created_at')}")


def _width() -> int:
    return max(60, shutil.get_terminal_size((120, 24)).columns)


def _format(frame, width: int) -> str:
    """A plain-text table that fits ``width`` columns: text columns share what numbers leave."""
    frame = frame.astype(str)
    widths = {c: max([len(c), *map(len, frame[c])]) for c in frame.columns}
    texts = [c for c in frame.columns if widths[c] > 24]
    fixed = sum(widths[c] for c in frame.columns if c not in texts) + 2 * (len(frame.columns) - 1)
    if texts:
        room = max(12, (width - fixed) // len(texts) - 2)
        widths |= {c: min(widths[c], room) for c in texts}

    def cell(text: str, c: str) -> str:
        if len(text) > widths[c]:  # cut in the middle: NLI pairs that differ at their end stay told apart
            head = (widths[c] - 1) // 2
            text = text[:head].rstrip() + "…" + text[len(text) - (widths[c] - 1 - head):].lstrip()
        return text.ljust(widths[c])

    lines = ["  ".join(cell(c, c) for c in frame.columns).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in frame.columns))
    lines += ["  ".join(cell(v, c) for c, v in zip(frame.columns, row)).rstrip() for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ---- recall ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RecallArguments:
    """Model, data and what to compare in ``hf-fastif recall``. Training and influence settings are
    `InfluenceArguments`' own flags."""

    model_name_or_path: str | None = dataclasses.field(default=None, metadata={
        "help": "Sequence-classification model: a local dir or Hub id. Unset: fine-tune the pretrained MiniLM on "
                "generated NLI data offline (hf_fastif.minilm_default), with hf_fastif.recall.MINILM_RECALL_SETTINGS "
                "as the defaults of the training and influence flags."})
    revision: str | None = dataclasses.field(default=None, metadata={"help": "Hub revision of --model_name_or_path."})
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    train_dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "Training data of --model_name_or_path (the candidate rows): an MNLI-format file or Hub dataset id."})
    train_split: str = dataclasses.field(default="train", metadata={"help": "Hub split of --train_dataset."})
    test_dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "Test data: a HANS file (with heuristic/subcase) or MNLI-format file or Hub id."})
    test_split: str = dataclasses.field(default="validation", metadata={"help": "Hub split of --test_dataset."})
    max_train_samples: int | None = dataclasses.field(default=None, metadata={
        "help": "Use the first N training rows (N of k/N); without a model: N generated rows (default "
                f"{MINILM_RECALL_N_TRAIN})."})
    num_test_points: int = dataclasses.field(default=8, metadata={
        "help": "Test rows, drawn with --seed from the test data (without a model: the generated HANS-style rows)."})
    ks: list[str] = dataclasses.field(default_factory=lambda: ["1%", "5%", "10%", "33%"], metadata={
        "help": "Candidates per query: counts (20) or shares of the training rows (5%%)."})
    methods: list[str] = dataclasses.field(default_factory=lambda: ["auto", "mean", "gradient", "random"], metadata={
        "help": f"Candidate methods to compare: any of {', '.join(RECALL_METHODS)}."})
    max_length: int | None = dataclasses.field(default=None, metadata={"help": MAX_LENGTH_HELP})

    def __post_init__(self):
        check_positive_counts(self, "max_train_samples", "num_test_points")
        _check_max_length(self)


def recall_defaults(first: argparse.Namespace) -> dict:
    """Defaults of ``recall``'s flags: the fine-tuned MiniLM's settings when no model is given, else the
    library's (`InfluenceArguments`' own)."""
    return MINILM_RECALL_SETTINGS if first.model_name_or_path is None else {}


def add_recall(sub) -> None:
    parser = sub.add_parser("recall", help="How many of the most influential training rows each candidate method "
                                           "finds (recall@10/100 vs the full scan).",
                            dataclass_types=[RecallArguments, InfluenceArguments],
                            description="Candidate recall: s_test once, the full scan once, then for each method and "
                                        "k the share of the full scan's 10 / 100 most helpful and harmful rows among "
                                        "the k candidates. Without --model_name_or_path, MiniLM is fine-tuned on "
                                        "generated NLI data first. Prints the table; with --output_dir, also "
                                        "writes recall.json and recall.md there.")
    parser.set_defaults(run=run_recall, parser=parser)


def run_recall(ns: argparse.Namespace) -> int:
    recall, args = parse_with_defaults(ns.parser, ns.argv, recall_defaults)
    # --output_dir given: recall.json and recall.md go there (it was accepted and nothing was written)
    out = check_output_dir(args.output_dir) if flag_given(ns.argv, "--output_dir") else None
    methods = check_methods(recall.methods)
    for spec in recall.ks:
        parse_k(spec)
    if recall.model_name_or_path is None:
        if recall.train_dataset or recall.test_dataset:
            raise ValueError("--train_dataset / --test_dataset need --model_name_or_path (the model trained on that "
                             "data).")
        n_train = recall.max_train_samples or MINILM_RECALL_N_TRAIN
        ks = resolve_ks(recall.ks, n_train)
        model, tokenizer, train, test, name, _ = finetuned_minilm(n_train, args)
    else:
        train, test = _recall_data(recall)
        ks = resolve_ks(recall.ks, len(train))
        model = AutoModelForSequenceClassification.from_pretrained(recall.model_name_or_path,
                                                                   revision=recall.revision, attn_implementation="eager",
                                                                   trust_remote_code=recall.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(recall.model_name_or_path, revision=recall.revision,
                                                  trust_remote_code=recall.trust_remote_code)
        max_length = max_length_for(recall, model)
        model = model.eval()
        train, test = (tokenize_nli(rows, tokenizer, max_length=max_length) for rows in (train, test))
        name = recall.model_name_or_path
    rows = np.random.default_rng(args.seed).choice(len(test), min(recall.num_test_points, len(test)), replace=False)
    test = test.select(np.sort(rows))
    params = num_parameters(select_parameters(model, args.influence_params))
    if "gradient" in methods:
        check_projection_dim(args.influence_projection_dim, params, "--influence_projection_dim {}")
    top_ns = recall_ns(len(train))
    engine = InfluenceEngine(model, args, data_collator=DataCollatorWithPadding(tokenizer))
    results = engine.candidate_recall(train, test, ks, methods=methods, ns=top_ns)
    solver = args.influence_solver + (f" J {args.influence_recursion_depth}, B {args.influence_batch_size}, T "
                                      f"{args.influence_repetitions}" if args.influence_solver == "lissa" else "")
    text = (f"candidate recall · model {name} · N {len(train)} training rows · {len(test)} test points · "
            f"{params:,} influence parameters · {solver}, λ {args.influence_lambda:g} · projection "
            f"{args.influence_projection_dim}\n\n{recall_table(results, top_ns)}")
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        report = {"command": "hf-fastif recall " + " ".join(ns.argv), "library_version": library_version(),
                  "model": name, "n_train": len(train), "test_rows": np.sort(rows).tolist(),
                  "num_influence_parameters": params, "recall_ns": top_ns,
                  "influence": args.influence_settings(), "rows": results}
        write_atomic(out / "recall.json", to_json(report, indent=1))
        write_atomic(out / "recall.md", text + "\n")
        print(f"\nwritten to {out / 'recall.json'} and {out / 'recall.md'}")
    return 0


def _recall_data(recall: RecallArguments) -> tuple[Dataset, Dataset]:
    """Raw training and test rows of ``--model_name_or_path`` (labels mapped to its number of labels)."""
    if not recall.train_dataset or not recall.test_dataset:
        raise ValueError("--model_name_or_path needs --train_dataset (its training data) and --test_dataset (the rows "
                         "to explain).")
    resolve_model(recall.model_name_or_path, recall.revision, recall.trust_remote_code)  # a clear error first
    train, test = _nli_data(AutoConfig.from_pretrained(recall.model_name_or_path, revision=recall.revision,
                                                       trust_remote_code=recall.trust_remote_code), recall)
    if recall.max_train_samples:
        train = train.select(range(min(recall.max_train_samples, len(train))))
    return train, test


# ---- entry point ---------------------------------------------------------------------------------------------
# ---- cache ---------------------------------------------------------------------------------------------------
def add_cache(sub) -> None:
    parser = sub.add_parser("cache", help="List hf_fastif's disk cache ($HF_FASTIF_CACHE) and remove entries.")
    parser.add_argument("--cache-dir", "--cache_dir", default=None,
                        help="The cache root (default: $HF_FASTIF_CACHE, else ~/.cache/hf_fastif).")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prune", action="store_true",
                      help="Remove the entries this install cannot use and writes killed before they finished.")
    what.add_argument("--unused-days", "--unused_days", type=float, default=None, metavar="DAYS",
                      help="As --prune, and also remove the entries not used for DAYS days.")
    what.add_argument("--clear", action="store_true",
                      help="Remove every entry but writes under way (anything hf_fastif did not write is kept).")
    parser.set_defaults(run=run_cache)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def run_cache(ns: argparse.Namespace) -> int:
    import time

    import pandas as pd

    from .cache import cache_entries, cache_root, removable, remove_entries

    if ns.unused_days is not None and not ns.unused_days >= 0:
        raise ValueError(f"--unused-days must be 0 or more, got {ns.unused_days}.")
    root = check_output_dir(cache_root(ns.cache_dir),  # a file (it listed "0 entries" as for an empty cache)
                            "--cache-dir" if ns.cache_dir is not None else "the cache root ($HF_FASTIF_CACHE)")
    entries = cache_entries(ns.cache_dir)
    print(f"hf_fastif cache {root}: {len(entries)} entries, {_megabytes(sum(e.size for e in entries))}")
    now = time.time()
    frame = pd.DataFrame([{"kind": e.kind, "size": _megabytes(e.size),
                           "last used": f"{(now - e.last_used) / 86400:.1f} days ago",
                           "usable": "yes" if e.unusable is None else f"no: {e.unusable}",
                           "path": str(e.path.relative_to(root))} for e in entries])
    if len(frame):
        print(_format(frame, _width()))
    if not (ns.prune or ns.clear or ns.unused_days is not None):
        return 0
    chosen = removable(entries, clear=ns.clear, unused_days=ns.unused_days, now=now)
    freed = remove_entries(chosen)
    print(f"removed {len(chosen)} entries, {_megabytes(freed)} freed")
    return 0


COMMANDS: list[Callable] = [add_build, add_push, add_pull, add_show, add_recall, add_cache]


VERBOSE_FLAGS = ("-v", "--verbose")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="hf-fastif", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.RawDescriptionHelpFormatter,
                                          epilog="\n".join(__doc__.splitlines()[2:9]))
    main_parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                             help="Log progress (transformers logging, info); before or after the subcommand.")
    sub = main_parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(
        f.__name__.removeprefix("add_") for f in COMMANDS) + "}", parser_class=HfArgumentParser)
    for add in COMMANDS:
        add(sub)
    return main_parser


def _library_logging(verbose: bool) -> None:
    """hf_fastif's own loggers (``hf_fastif.*``) are not under transformers' logger: give them a handler and the
    level that ``--verbose`` asks for."""
    library = pylogging.getLogger("hf_fastif")
    library.setLevel(pylogging.INFO if verbose else pylogging.WARNING)
    if not library.handlers:
        handler = pylogging.StreamHandler()
        handler.setFormatter(pylogging.Formatter("[hf_fastif] %(message)s"))
        library.addHandler(handler)
        library.propagate = False


SETUP_DEFAULTS = {"build": build_defaults, "recall": recall_defaults}
"""Subcommands whose flags' defaults depend on the setup (the embedded default's or the library's): their --help is
answered by the parse that knows them (`hf_fastif.parsing.parse_with_defaults`), not by the first one."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    at = argv.index(command) if command is not None else len(argv)
    if any(a in VERBOSE_FLAGS for a in argv[at:]):  # `hf-fastif build -v ...`: the main parser's flag, where it was
        argv = ["--verbose", *argv[:at], *[a for a in argv[at:] if a not in VERBOSE_FLAGS]]  # refused after the command
        at = argv.index(command)
    # only a --help after the command waits for the setup's defaults; one before it is the main parser's
    deferred = (command in SETUP_DEFAULTS and any(a in HELP_FLAGS for a in argv[at + 1:])
                and not any(a in HELP_FLAGS for a in argv[:at]))
    ns = parser().parse_args([a for a in argv if a not in HELP_FLAGS] if deferred else argv)
    ns.argv = argv[argv.index(ns.command) + 1:]  # the subcommand's own flags, for a parse with setup defaults
    if deferred:  # prints the help with the defaults that apply, and exits
        parse_with_defaults(ns.parser, ns.argv, SETUP_DEFAULTS[command])
    logging.set_verbosity_info() if ns.verbose else logging.set_verbosity_warning()
    _library_logging(ns.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return ns.run(ns)
    except BrokenPipeError:  # e.g. `hf-fastif show ... | head`
        sys.stdout = open(os.devnull, "w")  # python would complain when flushing at exit otherwise
        return 0
    except (InfluenceTableError, ValueError, KeyError, OSError) as err:  # OSError: also a path from_pretrained cannot read
        message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else err  # (KeyError quotes)
        print(f"hf-fastif {ns.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
