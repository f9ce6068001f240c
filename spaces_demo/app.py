"""hf_fastif Space: which training examples drove a model's prediction? (FastIF influence functions)

    python app.py                                  # the embedded default (MiniLM), built on the first start
    python app.py --table user/mnli-influence      # a table on the Hub (or HF_FASTIF_TABLE=...)
    python app.py --table outputs/table --model outputs/model   # a local table + its model (live explanations)
    python app.py --embedded_model tiny --max_train_samples 500  # a quick run: the tiny model from a config

The page is served at once: the table and the live engine are prepared in a background thread
(`hf_fastif.space.Startup`) while the page shows each stage; the rest of the page appears when they are ready.
The logic lives in `hf_fastif.space`; this file lays out the page and turns errors into messages.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

try:
    import hf_fastif  # noqa: F401
except ImportError:  # a checkout of the repository, not installed: use the package next to this folder
    _checkout = Path(__file__).resolve().parent.parent
    if not (_checkout / "hf_fastif" / "__init__.py").is_file():
        raise ImportError("hf_fastif is not installed: pip install -r requirements.txt (it installs the hf_fastif "
                          "wheel assembled next to this app.py).") from None
    sys.path.insert(0, str(_checkout))

import gradio as gr
from transformers.utils import logging

from hf_fastif.space import (
    ALL,
    CACHE_ENV,
    MAX_CANDIDATES,
    MAX_ROWS,
    MAX_TEXT_CHARS,
    SpaceState,
    Startup,
    candidate_slider,
    check_int,
    counts_note,
    explanation_summary,
    list_notes,
    status_markdown,
)

logger = logging.get_logger("hf_fastif.space")

INTRO = """# Which training examples drove this prediction?
Influence functions, made fast with [FastIF](https://arxiv.org/abs/2012.15781), score every training example by how
much it **helped** (negative influence: upweighting it lowers the test loss) or **hurt** (positive) the model on a test
example. Choose a test example, or type your own premise and hypothesis."""
TITLE = "hf_fastif: influence explorer"
BUNDLED_CACHE = Path(__file__).resolve().parent / "space_cache"
"""A default build bundled by `python -m spaces_demo.assemble --with-default`: the Space's cache unless
HF_FASTIF_SPACE_CACHE says otherwise."""
POLL_SECONDS = 1.0


def ui(fn):
    """Errors as messages in the page, never tracebacks: bad input -> its message; anything else -> a short note
    (the details go to the server log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, KeyError) as err:  # (a visitor's input: no traceback in the log either)
            raise gr.Error(str(err.args[0] if err.args else err), print_exception=False) from None
        except Exception as err:
            logger.error(f"{fn.__name__} failed: {type(err).__name__}: {err}")
            raise gr.Error(f"Something went wrong ({type(err).__name__}); try another input.") from None

    return wrapper


def create_demo(startup: Startup) -> gr.Blocks:
    """The page of a Space whose state ``startup`` builds: a status line at once, the rest when it is ready."""

    def ready() -> SpaceState:
        if startup.state is None:
            status = startup.status()
            raise gr.Error(f"The Space could not start: {status['error']}" if status["failed"] else
                           f"The Space is still starting ({status['stage'] or 'starting'}); try again in a moment.",
                           print_exception=False)  # (a message, not a fault: a traceback in the log per call)
        return startup.state

    def status() -> dict:
        """Where the start is (see hf_fastif.space.Startup.status): `ready`, `stage`, `stages`, `notices`..."""
        return startup.status()

    @ui
    def poll():
        now = startup.status()
        text = status_markdown(now)
        if not now["ready"]:
            return (text, *[gr.update()] * 8, gr.Timer(active=not now["failed"]))
        state = startup.state
        wrong = state.choices(ALL, "wrong") if state.has_predictions else []
        choices = wrong or state.choices()
        live = state.explainer
        k_max = live.max_candidates if live else MAX_CANDIDATES
        return (text, gr.Column(visible=True), state.summary(),
                gr.Dropdown(choices=[ALL, *state.heuristics()], value=ALL),
                # (without predictions and gold labels only "all" applies: "wrong" was offered, and failed)
                gr.Radio(choices=[ALL, "correct", "wrong"] if state.has_predictions else [ALL],
                         value="wrong" if wrong else ALL),
                gr.Dropdown(choices=choices, value=choices[0][1] if choices else None),
                gr.Dropdown(choices=state.label_names, value=state.label_names[-1]),
                gr.Slider(**candidate_slider(k_max)),
                gr.Button(interactive=live is not None), gr.Timer(active=False))

    @ui
    def filter_tests(heuristic, correctness):
        found = ready().choices(heuristic, correctness)
        if not found:
            gr.Warning("No test example matches these filters.")
        return gr.Dropdown(choices=found, value=found[0][1] if found else None)

    @ui
    def show(test_id, n, heuristic, correctness):
        state = ready()
        if test_id is None:
            return "Choose a test example.", "", None, "", None, None, None
        helpful, harmful = state.rows(test_id, n)
        counts = state.counts(test_id)
        # (n "5.0": int() raised a bare ValueError after rows() had taken it)
        helpful_note, harmful_note = list_notes(counts, check_int(n, "number of rows", 1, MAX_ROWS))
        # a plot that fails (one inf influence did) leaves the rows shown, with a note: rendered here, inside the check
        histogram, links, notes = state.plots(test_id, n, heuristic, correctness, render=distribution.postprocess)
        text = "\n\n".join([state.describe(test_id), counts_note(counts, state.table.candidates_note()),
                             *(f"⚠️ {note}" for note in notes)])
        return text, helpful_note, helpful, harmful_note, harmful, histogram, links

    @ui
    def explain(premise, hypothesis, label, k, n):
        state = ready()
        if state.explainer is None:
            raise gr.Error("Live explanations are off for this table: " + (" ".join(state.notices) or
                                                                           "it was loaded without its model."),
                           print_exception=False)
        if k is None:  # (an API call: the slider always sends a number; None would mean the default to `explain`)
            raise ValueError(f"Choose the number of candidates k, a whole number from 1 to "
                             f"{state.explainer.max_candidates}.")
        found = state.explainer.explain(premise, hypothesis, label, k, n)
        helpful_note, harmful_note = list_notes(found.counts, found.n)
        return (found.prediction, explanation_summary(found), helpful_note, state.display(found.helpful),
                harmful_note, state.display(found.harmful))

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(INTRO)
        status_text = gr.Markdown(status_markdown(startup.status()), elem_id="status")
        timer = gr.Timer(POLL_SECONDS)
        with gr.Column(visible=False, elem_id="main") as main:
            summary = gr.Markdown(elem_id="summary")
            with gr.Tab("Explore the table"):
                with gr.Row():
                    heuristic = gr.Dropdown([ALL], value=ALL, label="Heuristic", allow_custom_value=True, scale=1)
                    correctness = gr.Radio([ALL, "correct", "wrong"], value="wrong", label="Model's prediction was",
                                           scale=1)
                    n = gr.Slider(1, MAX_ROWS, value=5, step=1, label="Rows per side", scale=1)
                test = gr.Dropdown(choices=[], value=None, label="Test example", elem_id="test-example",
                                   allow_custom_value=True)
                description = gr.Markdown(elem_id="test-description")
                helpful_note = gr.Markdown(elem_id="helpful-note")
                helpful = gr.Dataframe(label="Most helpful training examples (negative influence, most negative first)",
                                       elem_id="helpful", interactive=False, wrap=True)
                harmful_note = gr.Markdown(elem_id="harmful-note")
                harmful = gr.Dataframe(label="Most harmful training examples (positive influence, most positive first)",
                                       elem_id="harmful", interactive=False, wrap=True)
                with gr.Row():
                    distribution = gr.Plot(label="Influence distribution", show_label=False, elem_id="distribution")
                    graph = gr.Plot(label="Influence graph", show_label=False, elem_id="graph")
            with gr.Tab("Explain your own example", elem_id="own-tab"):
                with gr.Row():
                    premise = gr.Textbox(label="Premise", max_length=MAX_TEXT_CHARS, value="The doctor helped the judge.",
                                         elem_id="premise")
                    hypothesis = gr.Textbox(label="Hypothesis", max_length=MAX_TEXT_CHARS,
                                            value="The judge helped the doctor.", elem_id="hypothesis")
                with gr.Row():
                    gold = gr.Dropdown(choices=[], value=None, label="Gold label", allow_custom_value=True)
                    k = gr.Slider(**candidate_slider(MAX_CANDIDATES), label="Candidates (gradient index)")
                    n_own = gr.Slider(1, MAX_ROWS, value=5, step=1, label="Rows per side")
                run = gr.Button("Explain", variant="primary", interactive=False, elem_id="explain")
                prediction = gr.Label(label="Model's prediction", elem_id="own-prediction")
                own_summary = gr.Markdown(elem_id="own-summary")
                own_helpful_note = gr.Markdown(elem_id="own-helpful-note")
                own_helpful = gr.Dataframe(label="Most helpful training examples (negative influence)",
                                           elem_id="own-helpful", interactive=False, wrap=True)
                own_harmful_note = gr.Markdown(elem_id="own-harmful-note")
                own_harmful = gr.Dataframe(label="Most harmful training examples (positive influence)",
                                           elem_id="own-harmful", interactive=False, wrap=True)

        polled = [status_text, main, summary, heuristic, correctness, test, gold, k, run, timer]
        shown = [description, helpful_note, helpful, harmful_note, harmful, distribution, graph]
        filters = [heuristic, correctness]
        light = dict(concurrency_limit=None)  # table reads: never queued behind a live computation
        # the functions check their inputs themselves: Gradio's own checks (a slider's) raised outside `ui` on an API
        # call's None, a generic error with a traceback in the log instead of a message
        raw = dict(preprocess=False)
        timer.tick(poll, None, polled, api_visibility="private", **light)
        demo.load(poll, None, polled, api_visibility="private", **light)
        gr.api(status, api_name="status", **light)
        heuristic.change(filter_tests, filters, test, api_visibility="private", **light, **raw)
        correctness.change(filter_tests, filters, test, api_name="filter", **light, **raw)
        test.change(show, [test, n, heuristic, correctness], shown, api_name="show", **light, **raw)
        n.release(show, [test, n, heuristic, correctness], shown, api_visibility="private", **light, **raw)
        # one live computation at a time (the queue's default_concurrency_limit=1): others see their position
        run.click(explain, [premise, hypothesis, gold, k, n_own],
                  [prediction, own_summary, own_helpful_note, own_helpful, own_harmful_note, own_harmful],
                  api_name="explain", **raw)
    return demo


def _env_int(name: str) -> int | None:
    """A whole number from the environment variable ``name`` (None when unset), refused by name when not one."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r} is not a whole number.") from None


def main(argv: list[str] | None = None, *, block: bool = True) -> tuple[gr.Blocks, Startup]:
    """Serve the page at once and prepare the table and the live engine in the background; returns
    ``(demo, startup)`` (``block=False``: without waiting for the server to stop)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=None, help="Local table folder or Hub dataset repo (default: $HF_FASTIF_TABLE, "
                                                      "else the embedded default; the fallback if it cannot be loaded).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of the Hub table.")
    parser.add_argument("--model", default=None, help="The table's model (local dir or Hub id) for live explanations.")
    parser.add_argument("--embedded_model", default=None, choices=["minilm", "tiny"],
                        help="The embedded default's model (default: $HF_FASTIF_EMBEDDED_MODEL, else minilm).")
    parser.add_argument("--max_train_samples", type=int, default=_env_int("HF_FASTIF_MAX_TRAIN_SAMPLES"),
                        help="Generated training rows of the embedded default (default: $HF_FASTIF_MAX_TRAIN_SAMPLES, "
                             "else 2,000; a Space sets the variable to reuse a bundled quick build).")
    parser.add_argument("--host", default=None, help="Default: $GRADIO_SERVER_NAME or 127.0.0.1.")
    parser.add_argument("--port", type=int, default=None, help="Default: $GRADIO_SERVER_PORT or 7860.")
    args = parser.parse_args(argv)
    if BUNDLED_CACHE.is_dir():
        os.environ.setdefault(CACHE_ENV, str(BUNDLED_CACHE))
    startup = Startup(args.table, revision=args.revision, model=args.model, kind=args.embedded_model,
                      max_train_samples=args.max_train_samples)
    demo = create_demo(startup)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, ssr_mode=False,
                theme=gr.themes.Soft())
    startup.start()  # after the port is open: the page says how far it got
    if block:
        demo.block_thread()
    return demo, startup


if __name__ == "__main__":
    main()
