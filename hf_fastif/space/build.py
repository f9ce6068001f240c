"""The embedded default's build folder: where it goes (`default_cache_dir`, `default_build_dir`), what it holds, and
`build_default`, which trains or loads the embedded model, computes its table with the live engine and saves both,
or reuses a finished build with the same settings (`build_config`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from safetensors import SafetensorError
from transformers import DataCollatorWithPadding
from transformers.utils import logging

from ..annotate import TextSource, save_with_text
from ..applications.common import at_chance, predict, training_accuracy
from ..arguments import InfluenceArguments
from ..cache import SPACE_BUILDING_FILE, SPACE_READY_FILE, SPACE_SUBDIR, cache_root, mark_used
from ..data import NLI_MAX_LENGTH
from ..distributed import is_main_process, on_main
from ..embedded import (
    data_description,
    embedded_arguments,
    embedded_data,
    embedded_kind,
    train_embedded_model,
    training_settings,
)
from ..engine import InfluenceEngine
from ..table import InfluenceTableError, read_metadata
from ..utils import check_build_folder, hold_build_lock, library_version, to_json, write_atomic
from .explainer import Explainer
from .settings import CACHE_ENV, LIVE_SETTINGS

logger = logging.get_logger(__name__)

READY_FILE = SPACE_READY_FILE
ENGINE_DIR = "engine"
BUILD_ENTRIES = {"table": "folder", "model": "folder", ENGINE_DIR: "folder", "train.parquet": "file"}
"""What an embedded build writes in its folder, and whether each is a folder or a file."""


def default_cache_dir() -> Path:
    """Where the Space keeps its builds: ``$HF_FASTIF_SPACE_CACHE``, else ``space_default`` in hf_fastif's cache
    (`hf_fastif.cache.cache_root`: ``$HF_FASTIF_CACHE`` or ``~/.cache/hf_fastif``), where ``hf-fastif cache`` lists
    them."""
    return Path(os.environ.get(CACHE_ENV) or cache_root() / SPACE_SUBDIR).expanduser()


def default_build_dir(kind: str | None = None) -> Path:
    """The folder of the default table of embedded model ``kind``: ``<default_cache_dir()>/<kind>``."""
    return default_cache_dir() / embedded_kind(kind).name


def build_default(directory: str | os.PathLike | None = None, args: InfluenceArguments | None = None, *,
                  max_train_samples: int | None = None, max_test_samples: int | None = None,
                  kind: str | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Train (or, for MiniLM, load from the fine-tuning cache) the embedded model, compute its influence table on
    HANS-style test rows, and save ``table/`` (with text, predictions and label names), ``model/`` (model +
    tokenizer), ``train.parquet`` and, for the Space's settings, ``engine/`` (the live engine's caches) under
    ``directory``. Reuses a finished build with the same settings and model.

    Args:
        directory: where the build goes (default: the Space's, `default_build_dir`).
        args: training and influence settings as given (``hf-fastif build``). Default: the Space's: the embedded
            default's for its table (``embedded_arguments(directory, use="table", kind=kind)``) with
            `LIVE_SETTINGS`, computed by the live engine, whose caches are saved with the table.
        max_train_samples: generated training rows (default: the kind's ``table_data``, 2,000).
        max_test_samples: use the first N of the 30 HANS-style test rows.
        kind: the embedded model, ``"minilm"`` (default) or ``"tiny"``.
        progress: called with a short description as each stage starts.
    """
    return build_default_with_explainer(directory, args, max_train_samples=max_train_samples,
                                        max_test_samples=max_test_samples, kind=kind, progress=progress)[0]


def build_config(args, kind: str, sizes: dict, max_test_samples: int | None, live: bool) -> dict:
    """What an embedded build depends on, as `READY_FILE` records it: a finished build is reused only for an equal
    one (model kind, data, seed, library version, the training settings the model depends on, the influence
    settings and the influence loss's label smoothing)."""
    settings = embedded_kind(kind)
    return json.loads(to_json({
        "model": settings.description, "kind": settings.name, "data": sizes, "max_test_samples": max_test_samples,
        "seed": args.seed, "library_version": library_version(), "live_engine": live,
        "training": training_settings(args, settings.name),
        "label_smoothing_factor": args.label_smoothing_factor,  # (the influence loss's: default_loss_smoothing)
        "influence": args.influence_settings()}))


def build_default_with_explainer(directory, args, *, max_train_samples=None, max_test_samples=None, kind=None,
                                 progress=None) -> tuple[Path, Explainer | None]:
    """`build_default`, and the live `Explainer` whose engine computed the table when it was built just now (None
    where a finished build was reused, or where ``args`` were given: only the Space's own settings build one), which
    `hf_fastif.space.loading.load_default` keeps warm rather than loading the model and the engine's caches again."""
    progress = progress or (lambda stage: None)
    settings = embedded_kind(kind)
    directory = Path(directory) if directory is not None else default_build_dir(settings.name)
    live = args is None
    if live:  # both embedded models have more than 4,096 influence parameters: LIVE_SETTINGS apply unclamped
        args = embedded_arguments(str(directory), use="table", kind=settings.name, **LIVE_SETTINGS)
    sizes = settings.table_data | ({"n_train": max_train_samples} if max_train_samples else {})
    build = build_config(args, settings.name, sizes, max_test_samples, live)
    check_build_folder(directory, BUILD_ENTRIES, "The build folder")
    if _finished(directory, build):  # read only, without the lock: a prebuilt build on a read-only folder serves
        on_main(lambda: _forget_marker(directory), f"Reading {directory}")
        return _reused(directory, progress)
    with contextlib.ExitStack() as held:
        # the folder is this build's until it ends: a second build into it is refused at once (two at a time each
        # wrote over the other's files and both said they had finished)
        lock = on_main(lambda: _claim(directory), f"Claiming {directory}")
        if lock is not None:
            held.callback(lock.release)
        if _finished(directory, build, say=True):  # (finished by another build while this one waited to claim it)
            on_main(lambda: (directory / BUILDING_FILE).unlink(missing_ok=True), f"Releasing {directory}")
            return _reused(directory, progress)
        # (a finished build with other settings stays whole, and reusable, until this one writes over it)
        return directory, _build(directory, args, settings, sizes, build, live, max_test_samples, progress)


def _reused(directory: Path, progress: Callable[[str], None]) -> tuple[Path, None]:
    """`build_default_with_explainer`'s answer for the finished build in ``directory``, its use recorded."""
    progress(f"reusing the finished build in {directory} (the same settings and model)")
    mark_used(directory / READY_FILE)  # what `hf-fastif cache --unused-days` reads
    return directory, None


def _finished(directory: Path, build: dict, say: bool = False) -> bool:
    """Whether ``directory`` holds the finished build ``build`` (its `READY_FILE`, its table, the model's files);
    with ``say``, a warning where its `READY_FILE` records it but the rest is not there."""
    ready = directory / READY_FILE
    if _recorded_config(ready) != build:
        return False
    missing = _missing_build_files(directory)
    if _built_table(directory) == build and not missing:
        return True
    if say:
        logger.warning(f"{directory} does not hold the finished build {ready} records ("
                       + (f"{', '.join(missing)} missing" if missing else "its table is another build's, or gone")
                       + "): building again.")
    return False


def _build(directory: Path, args: InfluenceArguments, settings, sizes: dict, build: dict, live: bool,
           max_test_samples: int | None, progress: Callable[[str], None]) -> Explainer | None:
    """The work of `build_default_with_explainer` once the folder is claimed and no finished build serves."""
    ready = directory / READY_FILE
    progress("generating the training data")
    raw, tokenized, tokenizer = embedded_data(seed=args.seed, **sizes, kind=settings.name)
    progress("the fine-tuned MiniLM (read from the fine-tuning cache, or fine-tuned now: about a minute on a CPU, "
             "once per machine)" if settings.name == "minilm" else f"training the {settings.name} model")
    model, info = train_embedded_model(raw["train"], tokenized["train"], tokenizer, args, kind=settings.name,
                                       description=data_description(args.seed, len(raw["train"])))
    collator = DataCollatorWithPadding(tokenizer)
    if info.get("train_accuracy") is None:  # (MiniLM's fine-tuning records it; the tiny model is trained here)
        info = info | {"train_accuracy": training_accuracy(model, tokenized["train"], collator, seed=args.seed)[0]}
    warning = at_chance(info["train_accuracy"], tokenized["train"]["labels"])
    if warning and is_main_process():  # (once per launch, not once per process)
        logger.warning(warning)
    hans, raw_hans = tokenized["hans"], raw["hans"]
    if max_test_samples:
        hans, raw_hans = (d.select(range(min(max_test_samples, len(d)))) for d in (hans, raw_hans))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    explainer = None
    progress(f"computing the influence table of {len(hans)} test rows over {len(raw['train']):,} training rows")
    if live:  # (an earlier build's caches are not read: they are replaced below)
        explainer = Explainer(model, tokenizer, raw["train"], args.influence_settings(), names,
                              cache_dir=directory / ENGINE_DIR, max_length=NLI_MAX_LENGTH, load=False)
        table, predictions = explainer.table(hans)
    else:
        with InfluenceEngine(model, args, data_collator=collator) as engine:
            table = engine.compute_influences(tokenized["train"], hans)
            predictions = predict(model, hans, engine=engine).argmax(-1)
    progress("saving the table, the model and the engine's caches" if explainer is not None  # (only a Space's
             else "saving the table and the model")  # live engine has caches to save)
    table.metadata["embedded_build"] = build | {"fine_tuning": info}
    table.metadata["tokenization"] = {"max_length": NLI_MAX_LENGTH}
    def write() -> None:  # under `accelerate launch` every process holds the table and the model; one writes them
        ready.unlink(missing_ok=True)  # (the folder no longer holds the finished build it recorded)
        shutil.rmtree(directory / ENGINE_DIR, ignore_errors=True)  # caches of an earlier build
        save_with_text(table, directory / "table", model=model,
                       model_name=f"hf_fastif embedded default ({settings.description})",
                       train=TextSource(raw["train"], "hf_fastif generated NLI (embedded default)", "train"),
                       test=TextSource(raw_hans, "hf_fastif generated HANS-style NLI", "hans"), predictions=predictions)
        model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
        raw["train"].to_parquet(str(directory / "train.parquet"))
        if explainer is not None:
            explainer.save_caches()
        write_atomic(ready, to_json({"config": build}))
        (directory / BUILDING_FILE).unlink(missing_ok=True)

    try:
        on_main(write, f"Writing {directory}")  # the others return once the build is on disk (or fail with its error)
    except SafetensorError as err:  # (model.save_pretrained on a full disk; write_atomic names its own OSErrors)
        raise OSError(f"Writing the model to {directory / 'model'} failed ({err}): free space there, or build into "
                      "another folder (--output_dir).") from err
    return explainer


BUILDING_FILE = SPACE_BUILDING_FILE
"""Written in a build folder before any work (so a folder that cannot be written is refused at once, not after the
table is computed), naming the build in progress; with `READY_FILE` it marks the folder's entries as a build's."""


def _claim(directory: Path) -> FileLock:
    """Take ``directory`` for a build: refuse one whose build entries (`BUILD_ENTRIES`) are no embedded build's (no
    `READY_FILE`, no `BUILDING_FILE`, no table of an embedded build: a folder of the user's, or a
    `--model_name_or_path` build's table, which a build used to delete or write over without a word), create it,
    hold its lock (a second build into it at the same time is refused) and write `BUILDING_FILE` (a folder that
    cannot be written is refused before any work). Returns the held lock."""
    # (a READY_FILE is read first: one that is no build's refuses the folder before anything is written in it)
    ours = (_recorded_config(directory / READY_FILE) is not None or (directory / BUILDING_FILE).is_file()
            or _built_table(directory) is not None)  # (the last: a build an earlier version left half-way)
    foreign = [name for name in BUILD_ENTRIES if (directory / name).exists()] if not ours else []
    if foreign:
        raise ValueError(f"{directory} holds {', '.join(foreign)} that no embedded build wrote (it has no "
                         f"{READY_FILE}, nor an embedded build's table): a build would replace them. Move them away, "
                         "or build into another folder.")
    lock = hold_build_lock(directory)
    try:
        write_atomic(directory / BUILDING_FILE, to_json({"pid": os.getpid(), "library_version": library_version()}))
    except BaseException:
        lock.release()
        raise
    return lock


def _forget_marker(directory: Path) -> None:
    """Remove the `BUILDING_FILE` a build cut short left beside a finished build it did not replace, where no build
    holds the folder now (and where it can be written: a read-only one keeps it)."""
    if not (directory / BUILDING_FILE).is_file():
        return
    try:
        lock = hold_build_lock(directory)
    except (OSError, ValueError):  # (read-only, or a build under way: its marker)
        return
    try:
        (directory / BUILDING_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        lock.release()


def _recorded_config(ready: Path) -> dict | None:
    """The build config a finished build's `READY_FILE` records (None: no such file); a file that cannot be read as
    one is refused, naming it (a bare JSON error, without the file or a fix, stopped the build and the Space)."""
    if not ready.is_file():
        return None
    try:
        recorded = json.loads(ready.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{ready} cannot be read as a finished build's record ({err}): delete it (the build is then "
                         "made again) or build into another folder.") from err
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise ValueError(f"{ready} is not a finished build's record (no build config in it): it is not this "
                         "library's, and the folder's entries may not be either. Move it away (with what the folder "
                         "holds that is yours), or build into another folder.")
    return recorded["config"]


def _missing_build_files(directory: Path) -> list[str]:
    """What the Space and `hf-fastif build`'s report read from a finished build and ``directory`` lacks (a user
    freed the model's space, say): the model's config and weights, the training rows."""
    model = directory / "model"
    missing = [] if (model / "config.json").is_file() else ["model/config.json"]
    if not any(model.glob("*.safetensors")) and not (model / "pytorch_model.bin").is_file():
        missing.append("model/ weights")
    return missing + ([] if (directory / "train.parquet").is_file() else ["train.parquet"])


def _built_table(directory: Path) -> dict | None:
    """The embedded build config (`build_config`) the table in ``directory`` was written with; None when there is
    none (no table, a table of another build, e.g. ``hf-fastif build --model_name_or_path`` into the same folder)."""
    try:
        built = read_metadata(directory / "table").get("embedded_build")
    except InfluenceTableError:
        return None
    return {k: v for k, v in built.items() if k != "fine_tuning"} if isinstance(built, dict) else None
