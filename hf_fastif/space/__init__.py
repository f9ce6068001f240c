"""What the Gradio Space (spaces_demo/app.py) shows, without Gradio: starting up in the background, loading a
table, choosing test examples, the rows and how many of each sign there are, the plots, and live influence for a
pair the user types. The app only lays out components and turns the `ValueError`s raised here into messages.

The Space serves its page at once and builds its state in a background thread (`Startup`), reporting each stage.
The default table comes from the embedded default (generated NLI data and all-MiniLM-L6-v2 fine-tuned on them,
`hf_fastif.embedded`; the fine-tuned model itself is cached by content), computed with the same settings as the live
explanations (`LIVE_SETTINGS`) by the one `InfluenceEngine` that then serves them, and saved with that engine's caches
(``engine/``) so that the next start reads everything from disk and answers within seconds.

One module per job, each importing only those above it:

| module | what |
|---|---|
| `settings` | the environment variables read, the limits of a visitor's requests, the live engine's settings |
| `inputs` | a visitor's input checked (`check_text`, `check_int`, `check_test_id`) and the k slider |
| `explainer` | `Explainer`: live influence for a typed pair through one engine, its caches on disk; `Explanation` |
| `build` | the embedded default's build folder: where it goes, what it holds, `build_default` |
| `state` | `SpaceState`: what the page shows of a table (choices, rows, counts, plots); the Markdown notes |
| `loading` | `load_state`: a table from a folder or the Hub, or the default, with its live engine and notices |
| `startup` | `Startup`: `load_state` in a background thread, its stages; `status_markdown` |

A module-level name is read where it is imported: a test patches it on the module that reads it
(``monkeypatch.setattr(hf_fastif.space.startup, "load_state", ...)``, which `Startup` calls). This package only
re-exports the names that code outside it imports, so a patch of another name on the package fails instead of
changing nothing; a patch of one of these (`load_state`, `influence_histogram`) on the package still changes nothing.
"""

from .build import ENGINE_DIR, build_config, build_default, default_build_dir, default_cache_dir
from .explainer import STAGES, Explainer, Explanation, encode_pair
from .inputs import candidate_slider, check_int, check_test_id
from .loading import live_rows_notice, load_default, load_state, open_table
from .settings import CACHE_ENV, CACHED, LIVE_SETTINGS, MAX_CANDIDATES, MAX_ROWS, MAX_TEXT_CHARS
from .startup import Startup, status_markdown
from .state import ALL, SpaceState, counts_note, explanation_summary, influence_histogram, list_notes

__all__ = [
    "ALL", "CACHE_ENV", "CACHED", "ENGINE_DIR", "LIVE_SETTINGS", "MAX_CANDIDATES", "MAX_ROWS", "MAX_TEXT_CHARS",
    "STAGES", "Explainer", "Explanation", "SpaceState", "Startup", "build_config", "build_default",
    "candidate_slider", "check_int", "check_test_id", "counts_note", "default_build_dir", "default_cache_dir",
    "encode_pair", "explanation_summary", "influence_histogram", "list_notes", "live_rows_notice",
    "load_default", "load_state", "open_table", "status_markdown",
]
