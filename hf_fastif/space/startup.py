"""Starting in the background: `Startup` builds the state (`load_state`) in a thread while the page is served, and
reports each stage (`status`, `status_markdown`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from transformers.utils import logging

from ..utils import library_version
from .loading import load_state
from .settings import CACHED
from .state import SpaceState

logger = logging.get_logger(__name__)

TRANSIENT_START_ERROR = "AST constructor recursion depth mismatch"
"""A `SystemError` of CPython 3.11's ast.parse when two threads parse at once (not a defect of the Space's inputs):
the start is tried once more."""


class Startup:
    """Builds the Space's `SpaceState` (`load_state`) in a background thread, so the page is served at once and
    says how far the start got (`status`).

    Args:
        source / revision / model / kind / max_train_samples: as `load_state` (environment variables apply the
            same way).
    """

    def __init__(self, source: str | None = None, *, revision: str | None = None, model: str | None = None,
                 kind: str | None = None, max_train_samples: int | None = None):
        self.source, self.revision, self.model, self.kind = source, revision, model, kind
        self.max_train_samples = max_train_samples
        self.state: SpaceState | None = None
        self.error: str | None = None
        self.stages: list[dict] = []
        self._begun = time.perf_counter()
        self._stage_started = self._begun
        self._finished: float | None = None  # (the start's duration stays what it was once it is over)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Startup:
        """Start building in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.run, name="hf_fastif-space-startup", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Build the state now, in this thread (`start` runs it in the background); failures are kept, not raised."""
        try:
            try:
                state = self._load()
            except SystemError as err:
                if TRANSIENT_START_ERROR not in str(err):
                    raise
                # CPython 3.11's ast.parse is not thread-safe: gradio's thread parsing a component's source while
                # this one (an import) parses too fails one of them (seen once in a test run): the start is retried
                logger.warning(f"The Space's start met a transient interpreter error ({err}); starting again.")
                state = self._load()
            self._progress(None)
            self.state = state
        except Exception as err:  # the page must keep serving and say what happened
            logger.error(f"The Space could not start: {type(err).__name__}: {err}")
            self._progress(None)
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self._finished = time.perf_counter()
            self._done.set()

    def _load(self) -> SpaceState:
        return load_state(self.source, revision=self.revision, model=self.model, kind=self.kind,
                          max_train_samples=self.max_train_samples, progress=self._progress)

    def _progress(self, stage: str | None) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.stages and self.stages[-1]["seconds"] is None:
                self.stages[-1]["seconds"] = round(now - self._stage_started, 3)
            if stage is not None:
                self.stages.append({"stage": stage, "seconds": None})
            self._stage_started = now

    def wait(self, timeout: float | None = None) -> SpaceState:
        """Block until the state is built; a `RuntimeError` if it failed or ``timeout`` passed."""
        if not self._done.wait(timeout):
            raise RuntimeError(f"The Space did not start within {timeout} s (stage: {self.status()['stage']}).")
        if self.state is None:
            raise RuntimeError(f"The Space could not start: {self.error}")
        return self.state

    def status(self) -> dict:
        """Where the start is: ``ready``, ``failed``, ``stage`` (now), ``stages`` (each with its seconds, None while
        running), ``elapsed_s``, ``notices``, ``error``, ``source``, ``live`` (live explanations available),
        ``caches_loaded`` (engine caches read from disk) and ``library`` (hf_fastif's version and where it was
        imported from)."""
        with self._lock:
            stages = [dict(s) for s in self.stages]
        state = self.state
        return {
            "ready": state is not None, "failed": self.error is not None,
            "stage": (stages[-1]["stage"] if stages and stages[-1]["seconds"] is None else
                      None if state is not None or self.error is not None else "starting"),
            "stages": stages, "elapsed_s": round((self._finished or time.perf_counter()) - self._begun, 3),
            "notices": list(state.notices) if state is not None else [], "error": self.error,
            "source": state.source if state is not None else None,
            "live": state is not None and state.explainer is not None,
            "caches_loaded": sorted(set(state.explainer.loaded)) if state is not None and state.explainer else [],
            # (hf_fastif/, this file being hf_fastif/space/startup.py)
            "library": {"version": library_version(), "imported_from": str(Path(__file__).resolve().parents[1])},
        }


def status_markdown(status: dict) -> str:
    """Markdown of a `Startup.status`: the stages so far while starting; the notices once ready; the error if the
    start failed."""
    if status["failed"]:
        return f"**The Space could not start:** {status['error']}"
    if status["ready"]:
        lines = [f"⚠️ {notice}" for notice in status["notices"]]
        lines.append(f"Ready (started in {status['elapsed_s']:.1f} s"
                     + (", live engine read from its cache)" if set(CACHED) <= set(status["caches_loaded"]) else ")"))
        return "\n\n".join(lines)
    lines = [f"**Starting… ({status['elapsed_s']:.0f} s)** The table and the live engine are being prepared; the "
             "page fills in when they are ready."]
    for stage in status["stages"]:
        done = f"done in {stage['seconds']:.1f} s" if stage["seconds"] is not None else "**now**"
        lines.append(f"- {stage['stage']}: {done}")
    return "\n".join(lines)
