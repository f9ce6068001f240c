"""Assemble a Space folder that deploys as is: the app, its card, a wheel of hf_fastif built from this checkout and a
requirements.txt that installs it.

    python -m spaces_demo.assemble OUT                          # OUT/app.py, README.md, requirements.txt, the wheel
    python -m spaces_demo.assemble OUT --space-id user/name     # requirements.txt fetches the wheel from the Space
    python -m spaces_demo.assemble OUT --with-default ~/.cache/hf_fastif/space_default/minilm
                                                                # + the built default table, model and engine caches

The Hub's Space builder installs requirements.txt before it copies the repository in (only that file is mounted),
so on the Hub the wheel is named by its URL in the Space repo (``--space-id``; a public Space). Without it the line is
the relative path, for ``pip install -r requirements.txt`` run inside OUT (a local run, a Docker image).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport (pip install tomli)
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPACE_FILES = ("app.py", "README.md")
"""Files of spaces_demo/ that go to the Space as they are."""
DEMO_EXTRAS = "demo"
"""The optional dependencies the app needs beyond the package's own (gradio itself comes from the card)."""
BUNDLED_CACHE = "space_cache"
"""The folder of a bundled default build, which app.py uses as its cache (``HF_FASTIF_SPACE_CACHE``)."""
BUILD_FILES = ("ready.json", "train.parquet", "table", "model", "engine")


def build_wheel(out: Path) -> Path:
    """Build hf_fastif's wheel from this checkout into ``out`` (from a clean copy of the sources, so the checkout
    gets no build/ or egg-info) and return its path."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "hf_fastif", source / "hf_fastif", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)]
        if importlib.util.find_spec("setuptools") is not None:  # offline, with the setuptools at hand
            command[4:4] = ["--no-build-isolation"]
        subprocess.run(command, check=True)
    wheels = sorted(out.glob("hf_fastif-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"Expected one hf_fastif wheel in {out}, found {[w.name for w in wheels]}.")
    return wheels[0]


def requirements(wheel: str, space_id: str | None = None) -> str:
    """requirements.txt: hf_fastif's dependencies and its demo extras (pyproject.toml; gradio is left to the card's
    ``sdk_version``), then the wheel, by URL in the Space repo ``space_id`` or by relative path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for r in project["optional-dependencies"][DEMO_EXTRAS] if not r.lower().startswith("gradio")]
    where = (f"https://huggingface.co/spaces/{space_id}/resolve/main/{wheel}" if space_id else f"./{wheel}")
    lines = ["# Assembled by `python -m spaces_demo.assemble`: hf_fastif's dependencies (pyproject.toml) and what the",
             "# app needs beyond them; gradio comes from sdk_version in README.md.",
             *project["dependencies"], *extras,
             "# hf_fastif itself, from the wheel in this folder" + (" (its URL in the Space repo: the builder installs"
                                                                   " this file before the repository is copied in)"
                                                                   if space_id else ""),
             f"hf_fastif @ {where}" if space_id else where]
    return "\n".join(lines) + "\n"


def check_space_id(space_id: str | None) -> str | None:
    """``user/name``, or a ValueError saying what a Space id looks like."""
    if space_id is None:
        return None
    parts = space_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--space-id must be 'user/name' (the Space the folder is uploaded to), got {space_id!r}.")
    return space_id


def check_build(build: str | None) -> Path | None:
    """A finished default build (``ready.json`` and its files), or a ValueError naming what is missing."""
    if build is None:
        return None
    folder = Path(build).expanduser()
    missing = [name for name in BUILD_FILES if not (folder / name).exists()]
    if missing:
        raise ValueError(f"{folder} is not a finished default build of the Space (missing {', '.join(missing)}); "
                         "start the app once (it builds into $HF_FASTIF_SPACE_CACHE/<kind>) or run "
                         "hf_fastif.space.build_default, then pass that folder.")
    return folder


def build_kind(folder: Path) -> str:
    """The embedded model a finished default build is of, as its ``ready.json`` records it: app.py looks for the build
    in ``space_cache/<kind>`` whatever the folder was called (a build in a folder of another name was bundled where
    the app never looks, and the Space built it again, fine-tuning MiniLM, on its first start). A build the Space
    would not reuse (one made with other settings, e.g. by ``hf-fastif build``) is refused with what to do."""
    try:
        config = json.loads((folder / "ready.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{folder / 'ready.json'} cannot be read ({err}); build the default again.") from None
    kind = config.get("kind")
    if not isinstance(kind, str) or not kind or not config.get("live_engine"):
        what = ("records no embedded model (kind)" if not isinstance(kind, str) or not kind else
                "records a build with other settings than the Space's (e.g. by hf-fastif build), which it would not "
                "reuse")
        raise ValueError(f"{folder} is not a default build the Space can use: its ready.json {what}. {REBUILD}")
    # the build a start without arguments (as on the Hub) would reuse: the same data sizes, test rows, settings and
    # library version (one made with --max_train_samples 600 was bundled, said to be used, and built again on every
    # start of the deployed Space, whose disk does not persist)
    from hf_fastif.embedded import embedded_arguments, embedded_kind
    from hf_fastif.space import LIVE_SETTINGS, build_config

    if kind in ("tiny", "minilm"):
        rows = _quick_rows(config)
        sizes = embedded_kind(kind).table_data | ({"n_train": rows} if rows is not None else {})
        args = embedded_arguments(str(folder), use="table", kind=kind, **LIVE_SETTINGS)
        expected = build_config(args, kind, sizes, None, True)
        differing = sorted(k for k in set(config) | set(expected) if config.get(k) != expected.get(k))
        if differing:
            shown = "; ".join(f"{k}: {config.get(k)!r} here, {expected.get(k)!r} for the Space" for k in differing[:3])
            raise ValueError(f"{folder} is not a default build the Space can use: a start of the Space would build "
                             f"again ({shown}). {REBUILD}")
    return kind


def _quick_rows(config: dict) -> int | None:
    """The training rows a default build's ``ready.json`` config records where they are not its kind's default (a
    quick build's ``--max_train_samples``), else None."""
    from hf_fastif.embedded import embedded_kind

    data = config.get("data")
    rows = data.get("n_train") if isinstance(data, dict) else None
    return rows if isinstance(rows, int) and rows != embedded_kind(config["kind"]).table_data.get("n_train") else None


def start_variables(folder: Path) -> dict[str, str]:
    """The Space variables a start needs to reuse the default build in ``folder`` (checked by `build_kind`): its
    number of training rows where it is not the default's (a quick build: a start without the variable built the
    default again, on every start of a Space whose disk does not persist)."""
    rows = _quick_rows(json.loads((folder / "ready.json").read_text()).get("config") or {})
    return {"HF_FASTIF_MAX_TRAIN_SAMPLES": str(rows)} if rows is not None else {}


REBUILD = ("Start the app once without arguments (it builds into $HF_FASTIF_SPACE_CACHE/<kind>) or run "
           "hf_fastif.space.build_default with args=None (the Space's settings), then pass that folder.")


def assemble(out: str | Path, *, space_id: str | None = None, with_default: str | Path | None = None,
             overwrite: bool = False) -> Path:
    """Write the Space folder ``out``: app.py, README.md (the card), the hf_fastif wheel, requirements.txt and,
    with ``with_default``, that built default (table, model, engine caches) under ``space_cache/<kind>``, the kind
    its ``ready.json`` records (`build_kind`), where app.py looks for it."""
    space_id, build = check_space_id(space_id), check_build(None if with_default is None else str(with_default))
    kind = build_kind(build) if build is not None else None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; choose a new folder or pass --overwrite.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copy2(HERE / name, out / name)
    wheel = build_wheel(out)
    (out / "requirements.txt").write_text(requirements(wheel.name, space_id))
    if build is not None:
        # (not a build's lock, marker or the engine caches' lock: they belong to the machine that built it)
        shutil.copytree(build, out / BUNDLED_CACHE / kind,
                        ignore=shutil.ignore_patterns(".hf_fastif_build.lock", ".hf_fastif_building", ".hf_fastif_caches.lock"))
    return out


def upload_snippet(out: str | Path, space_id: str) -> str:
    """The Python that creates the Space ``space_id`` (if new) and uploads the assembled folder ``out`` to it."""
    return ("from huggingface_hub import create_repo, upload_folder\n"
            f"create_repo({space_id!r}, repo_type='space', space_sdk='gradio', exist_ok=True)\n"
            f"upload_folder(repo_id={space_id!r}, repo_type='space', folder_path={str(out)!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # (the first sentence whole)
    parser.add_argument("out", help="The folder to write (new or empty).")
    parser.add_argument("--space-id", default=None, help="user/name of the Space the folder is uploaded to: "
                                                         "requirements.txt then fetches the wheel from it.")
    parser.add_argument("--with-default", default=None, metavar="BUILD",
                        help="A built default (e.g. ~/.cache/hf_fastif/space_default/minilm) to bundle, so the Space "
                             "starts without fine-tuning.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT.")
    args = parser.parse_args(argv)
    try:
        out = assemble(args.out, space_id=args.space_id, with_default=args.with_default, overwrite=args.overwrite)
    except ValueError as err:
        parser.error(str(err))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"Space folder {out}: {len(files)} files ({', '.join(files[:6])}{', ...' if len(files) > 6 else ''})")
    for kind in (sorted(p.name for p in (out / BUNDLED_CACHE).iterdir()) if (out / BUNDLED_CACHE).is_dir() else []):
        variables = start_variables(out / BUNDLED_CACHE / kind)
        print(f"The default build is bundled as {BUNDLED_CACHE}/{kind}: app.py uses it for --embedded_model {kind} "
              "(HF_FASTIF_EMBEDDED_MODEL; the default is minilm)"
              + (f" when started with {', '.join(f'{k}={v}' for k, v in variables.items())} (set it as a variable "
                 "of the Space; without it the default is built again on every start)." if variables else "."))
    if args.space_id is None:
        print("requirements.txt names the wheel by its path in the folder (pip install -r requirements.txt run inside "
              "it); for a Space on the Hub assemble with --space-id user/name (its builder installs requirements.txt "
              "before the folder is copied in).")
    print("Upload it (logged in: hf auth login) with\n" + upload_snippet(out, args.space_id or "USER/NAME"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
