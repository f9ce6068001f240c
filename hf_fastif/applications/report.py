"""The end every application recipe shares: compare the settings with the paper's, render the result and the model's
report as markdown, write ``<name>.json`` / ``.md`` / ``.png`` (and any files of the result's own) to
``--output_dir``, and print."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from transformers.utils import logging

from .. import distributed as D
from ..embedded import embedded_defaults, embedded_kind
from ..utils import markdown_table
from .common import model_report_markdown, write_results
from .prepare import PAPER_INFLUENCE, Setup

logger = logging.get_logger(__name__)

PAPER_METHOD: dict = {"influence_solver": "lissa", "influence_knn_features": "auto"}
"""FastIF's s_test solver and candidates (the library's defaults, so not among `PAPER_INFLUENCE`'s overrides)."""
LISSA_ONLY = ("influence_recursion_depth", "influence_batch_size", "influence_repetitions",
              "influence_check_convergence")
"""Settings only LiSSA reads: not compared when another solver runs."""
PAPER_DESCRIPTION: dict = {
    "model": "bert-base-cased, fine-tuned on MNLI-2 (embeddings and layers 0-9 frozen)",
    "influence parameters": "layers 10-11, pooler, classifier (14.7M)",
    "training rows": "392,702 (MNLI-2 train)",
    "HANS rows (validation / test)": "official HANS evaluation set (30,000), split into validation / test",
}


class Result(Protocol):
    """What an application returns: `CorrectionResult`, `SimulatabilityResult`, `InfluenceGraphResult`."""

    def to_dict(self) -> dict: ...

    def to_markdown(self) -> str: ...

    def plot(self) -> Any: ...


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def compare_with_paper(setup: Setup, protocol: Any = None, use: str | None = None) -> list[tuple[str, str, str, str]]:
    """``(setting, paper, here, why)`` for the model, the data, the influence settings and λ, and the application's
    protocol (``protocol.PAPER`` vs ``protocol.used()``; ``protocol.PAPER_INFLUENCE``: the paper's influence
    settings of this application where they differ from its HANS ones). Only differences are listed; ``why`` is the
    embedded default's reason (`hf_fastif.embedded.EmbeddedKind.why`) for ``use`` (a recipe's name), "given on the
    command line" where a flag changed the embedded default's value, and empty for the paper's setup."""
    d = setup.description
    here = {
        "model": d["model"] if d["setup"] == "embedded"
        else f"{d['model']}" + (" (fine-tuned here)" if d["trained_here"] else " (as given)"),
        "influence parameters": f"{d['num_influence_parameters']:,} of {d['num_parameters']:,}",
        "training rows": f"{d['num_train']:,} ({d['train_data']})",
        "HANS rows (validation / test)": f"{d['hans']}: {d['num_hans_validation']:,} / {d['num_hans_test']:,}",
    }
    kind = d.get("embedded_model")
    settings = embedded_kind(kind) if kind else None
    defaults = embedded_defaults(use if use in settings.uses else None, kind) if settings else {}
    reasons = settings.why if settings else {}

    def why(setting: str, value) -> str:
        # the embedded default's reason, unless the value is not the embedded default's (then a flag set it); the
        # paper's setup gives none (a protocol's own default differs there too: it was said "given on the command
        # line" with no flag given)
        if settings is None:
            return ""
        flag = "--quick or the command line" if setup.data_args.quick else "given on the command line"
        if setting in defaults:
            return reasons.get(setting, "") if _show(defaults[setting]) == _show(value) else flag
        return reasons.get(setting) or flag

    rows = []
    if d["setup"] == "embedded" or d["train_data"] != PAPER_DESCRIPTION["training rows"]:
        model_why = reasons.get("model", "")
        if kind and d["model"] != settings.description:  # fine-tuned with other flags than the embedded default's
            model_why = "fine-tuning flags given on the command line"
        rows += [(k, PAPER_DESCRIPTION[k], here[k], model_why if k == "model" else reasons.get(k, ""))
                 for k in PAPER_DESCRIPTION]
    # FastIF's solver and candidates (they were not compared: a run with cg and gradient candidates listed neither)
    paper_influence = PAPER_METHOD | {k: v for k, v in PAPER_INFLUENCE.items() if k != "influence_params"}
    paper_influence |= getattr(protocol, "PAPER_INFLUENCE", {})
    used = setup.args.influence_settings()
    if used.get("influence_solver") != "lissa":  # LiSSA's own settings do not apply (they were listed)
        paper_influence = {k: v for k, v in paper_influence.items() if k not in LISSA_ONLY}
    if not used.get("influence_weight_decay"):  # where the L2 term goes means nothing without one
        paper_influence.pop("influence_weight_decay_in_gradients", None)
    rows += [(k, _show(v), _show(used.get(k)), why(k, used.get(k))) for k, v in paper_influence.items()
             if _show(v) != _show(used.get(k))]
    paper_lambda = paper_influence["influence_damping"] * paper_influence["influence_scale"]
    if _show(paper_lambda) != _show(setup.args.influence_lambda):
        rows.append(("λ = damping × scale", _show(paper_lambda), _show(setup.args.influence_lambda),
                     reasons.get("λ = damping × scale", "")))
    if protocol is not None:
        paper, now = protocol.PAPER, protocol.used()
        rows += [(k, _show(v), _show(now.get(k)), why(k, getattr(protocol, k, now.get(k))))
                 for k, v in paper.items() if _show(v) != _show(now.get(k))]
    return rows


def comparison_markdown(rows: list[tuple[str, ...]], setup: Setup) -> str:
    title = ("Settings the embedded default changes from the paper" if setup.name == "embedded"
             else "Settings that differ from the paper")
    if not rows:
        return f"### {title}\n\nNone."
    if any(len(row) > 3 and row[3] for row in rows):
        return f"### {title}\n\n" + markdown_table(["setting", "paper", "here", "why"], rows)
    return f"### {title}\n\n" + markdown_table(["setting", "paper", "here"], [row[:3] for row in rows])


def write_report(name: str, result: Result, setup: Setup, protocol: Any = None, *,
                 argv: Sequence[str] | None = None, extra: dict | None = None, stopped: str = "") -> dict:
    """Compare with the paper, write ``<name>.json`` (the result, the setup, the model's report, ``extra``, the
    settings that differ from the paper, the command line and the seconds since `prepare` began), ``<name>.md``
    and ``<name>.png`` to ``setup.args.output_dir``, plus the result's own files (``result.save_files(directory)``,
    if it has one); print the markdown. Only the main process writes and prints. Returns what the JSON holds.
    ``stopped``: why the protocol stopped before its end (`finished_runs_kept`), said first in both files."""
    changes = compare_with_paper(setup, protocol, use=name)
    sections = [f"**Incomplete: {stopped}.**" if stopped else "", result.to_markdown(),
                model_report_markdown(setup.report), comparison_markdown(changes, setup)]
    markdown = "\n\n".join(section for section in sections if section)
    results = ({"stopped": stopped} if stopped else {}) | result.to_dict() | {
        "setup": setup.description, "model_report": setup.report} | (extra or {}) | {
        "changes_from_paper": changes, "argv": list(sys.argv[1:] if argv is None else argv),
        "seconds": setup.seconds()}
    if D.is_main_process():
        directory = setup.args.output_dir
        paths = list(write_results(directory, name, results, markdown, result.plot()).values())
        if hasattr(result, "save_files"):
            paths += result.save_files(directory)
        print(markdown)
        print(f"\nwrote {', '.join(str(p) for p in paths)} in {setup.seconds():.0f}s")
    return results


@contextlib.contextmanager
def finished_runs_kept(name: str, setup: Setup, protocol: Any = None, *, argv: Sequence[str] | None = None,
                       extra: dict | None = None) -> Iterator[None]:
    """Around a protocol's run: where it fails after some of its runs finished (the error carries them,
    `keep_finished`), write their report (`write_report`, marked incomplete with where and why it stopped), then
    raise the error as it was. A LiSSA refusal at run 46 of 120 lost the 45 finished runs: nothing was written.

    Under a launch every process waits for the main one's write (the others left at once, and the launcher ended
    the main process before it wrote); an interrupt (Ctrl-C) writes only in a single process, whose partners cannot
    have gone. A write that fails is logged, and the protocol's own error raised."""
    try:
        yield
    except BaseException as err:
        result = getattr(err, "finished_result", None)
        if result is not None and (isinstance(err, Exception) or D.world()[1] == 1):
            stopped = err.stopped_at
            try:
                D.on_main(lambda: write_report(name, result, setup, protocol, argv=argv, extra=extra, stopped=stopped),
                          "The finished runs' report")
            except Exception as failed:
                logger.error(f"The report of the finished runs could not be written ({type(failed).__name__}: "
                             f"{failed}); the error that stopped the protocol follows.")
        raise
