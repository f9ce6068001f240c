"""hf_fastif Space: which training examples drove a model's prediction? (FastIF influence functions)

    python app.py                                  # the embedded default, built offline on first start
    python app.py --table user/mnli-influence      # a table on the Hub (or HF_FASTIF_TABLE=...)
    python app.py --table outputs/table --model outputs/model   # a local table + its model (live explanations)

The logic lives in `hf_fastif.space`; this file lays out the page and turns errors into messages.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

try:
    import hf_fastif  # noqa: F401
except ImportError:  # a checkout of the repository, not installed: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr
from transformers.utils import logging

from hf_fastif.space import ALL, MAX_CANDIDATES, MAX_ROWS, MAX_TEXT_CHARS, SpaceState, load_state

logger = logging.get_logger("hf_fastif.space")

INTRO = """# Which training examples drove this prediction?
Influence functions, made fast with [FastIF](https://arxiv.org/abs/2012.15781), score every training example by how
much it **helped** (negative influence: upweighting it lowers the test loss) or **hurt** (positive) the model on a test
example. Choose a test example, or type your own premise and hypothesis."""


def ui(fn):
    """Errors as messages in the page, never tracebacks: bad input -> its message; anything else -> a short note
    (the details go to the server log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, KeyError) as err:
            raise gr.Error(str(err.args[0] if err.args else err)) from None
        except Exception as err:
            logger.error(f"{fn.__name__} failed: {type(err).__name__}: {err}")
            raise gr.Error(f"Something went wrong ({type(err).__name__}); try another input.") from None

    return wrapper


def create_demo(state: SpaceState) -> gr.Blocks:
    wrong = state.choices(ALL, "wrong")
    start_filter = "wrong" if wrong else ALL
    choices = wrong or state.choices()
    first = choices[0][1] if choices else None

    @ui
    def filter_tests(heuristic, correctness):
        found = state.choices(heuristic, correctness)
        if not found:
            gr.Warning("No test example matches these filters.")
        return gr.Dropdown(choices=found, value=found[0][1] if found else None)

    @ui
    def show(test_id, n, heuristic, correctness):
        if test_id is None:
            return "Choose a test example.", None, None, None, None
        helpful, harmful = state.rows(test_id, n)
        return (state.describe(test_id), helpful, harmful, state.distribution(test_id, n),
                state.graph(test_id, heuristic, correctness))

    @ui
    def explain(premise, hypothesis, label, k, n, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if state.explainer is None:
            raise gr.Error("Live explanations need the table's model; start the app with --model (or HF_FASTIF_MODEL).")
        progress(0, desc="Computing influence")
        prediction, helpful, harmful = state.explainer.explain(premise, hypothesis, state.label_names.index(label)
                                                               if label in state.label_names else -1, k, n)
        return prediction, state.display(helpful), state.display(harmful)

    with gr.Blocks(title="hf_fastif: influence explorer") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(state.summary(), elem_id="summary")
        with gr.Tab("Explore the table"):
            with gr.Row():
                heuristic = gr.Dropdown([ALL, *state.heuristics()], value=ALL, label="Heuristic", scale=1)
                correctness = gr.Radio([ALL, "correct", "wrong"], value=start_filter, label="Model's prediction was",
                                       scale=1)
                n = gr.Slider(1, MAX_ROWS, value=5, step=1, label="Rows per side", scale=1)
            test = gr.Dropdown(choices=choices, value=first, label="Test example", elem_id="test-example")
            description = gr.Markdown(elem_id="test-description")
            helpful = gr.Dataframe(label="Most helpful training examples (most negative influence first)",
                                   elem_id="helpful", interactive=False, wrap=True)
            harmful = gr.Dataframe(label="Most harmful training examples (most positive influence first)",
                                   elem_id="harmful", interactive=False, wrap=True)
            with gr.Row():
                distribution = gr.Plot(label="Influence distribution", show_label=False, elem_id="distribution")
                graph = gr.Plot(label="Influence graph", show_label=False, elem_id="graph")
        with gr.Tab("Explain your own example"):
            with gr.Row():
                premise = gr.Textbox(label="Premise", max_length=MAX_TEXT_CHARS, value="The doctor helped the judge.")
                hypothesis = gr.Textbox(label="Hypothesis", max_length=MAX_TEXT_CHARS, value="The judge helped the doctor.")
            with gr.Row():
                gold = gr.Radio(state.label_names, value=state.label_names[-1], label="Gold label")
                k = gr.Slider(10, MAX_CANDIDATES, value=100, step=10, label="kNN candidates")
                n_own = gr.Slider(1, MAX_ROWS, value=5, step=1, label="Rows per side")
            run = gr.Button("Explain", variant="primary", interactive=state.explainer is not None)
            prediction = gr.Label(label="Model's prediction", elem_id="own-prediction")
            own_helpful = gr.Dataframe(label="Most helpful training examples", elem_id="own-helpful",
                                       interactive=False, wrap=True)
            own_harmful = gr.Dataframe(label="Most harmful training examples", elem_id="own-harmful",
                                       interactive=False, wrap=True)

        shown = [description, helpful, harmful, distribution, graph]
        filters = [heuristic, correctness]
        heuristic.change(filter_tests, filters, test, api_visibility="private")
        correctness.change(filter_tests, filters, test, api_name="filter")
        test.change(show, [test, n, heuristic, correctness], shown, api_name="show")
        n.release(show, [test, n, heuristic, correctness], shown, api_visibility="private")
        demo.load(show, [test, n, heuristic, correctness], shown, api_visibility="private")
        run.click(explain, [premise, hypothesis, gold, k, n_own], [prediction, own_helpful, own_harmful],
                  api_name="explain")
    return demo


def build_demo(table: str | None = None, revision: str | None = None, model: str | None = None) -> gr.Blocks:
    """The app for a table; a page saying what is wrong when the table or model cannot be loaded."""
    try:
        return create_demo(load_state(table, revision=revision, model=model))
    except (ValueError, OSError) as err:  # InfluenceTableError, ModelMismatchError, a missing model...
        logger.error(f"Could not load the table: {type(err).__name__}: {err}")
        with gr.Blocks(title="hf_fastif: influence explorer") as demo:
            gr.Markdown(INTRO)
            gr.Markdown(f"**Could not load the influence table:** {err}", elem_id="load-error")
        return demo


def main(argv: list[str] | None = None, *, block: bool = True) -> gr.Blocks:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=None, help="Local table folder or Hub dataset repo (default: $HF_FASTIF_TABLE, "
                                                      "else the embedded default).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of the Hub table.")
    parser.add_argument("--model", default=None, help="The table's model (local dir or Hub id) for live explanations.")
    parser.add_argument("--host", default=None, help="Default: $GRADIO_SERVER_NAME or 127.0.0.1.")
    parser.add_argument("--port", type=int, default=None, help="Default: $GRADIO_SERVER_PORT or 7860.")
    args = parser.parse_args(argv)
    demo = build_demo(args.table, args.revision, args.model)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=not block, ssr_mode=False,
                theme=gr.themes.Soft())
    return demo


if __name__ == "__main__":
    main()
