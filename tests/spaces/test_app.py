"""The Space (spaces_demo/app.py, hf_fastif/space/): served at once while the default table and the live engine are
built in the background, called through `gradio_client`, restarted from its caches, fed bad input and a concurrent
user, assembled into a folder that runs with the repository out of reach, and driven in a real headless Chromium with
Playwright. The quick embedded default (the tiny BERT from a config, on 600 generated rows) keeps it fast; the
MiniLM default's timings are benchmarks/space_latency.py's job.

The browser test's screenshots are saved to test-artifacts/space.png (a test example of the table) and
test-artifacts/space-own-example.png (a typed pair explained live).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KIND, TRAIN_ROWS = "tiny", 600
QUICK = ["--embedded_model", KIND, "--max_train_samples", str(TRAIN_ROWS)]
ENV_KEYS = ("HF_FASTIF_SPACE_CACHE", "HF_FASTIF_TABLE", "HF_FASTIF_MODEL", "HF_FASTIF_EMBEDDED_MODEL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_app():
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "spaces_demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh Space cache (``HF_FASTIF_SPACE_CACHE``) for this module, the environment restored afterwards."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ["HF_FASTIF_SPACE_CACHE"] = str(tmp_path_factory.mktemp("space_cache"))
    yield Path(os.environ["HF_FASTIF_SPACE_CACHE"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def app(cache):
    """``(url, startup, early)``: the app served in this process on 127.0.0.1 with the quick default, built into the
    fresh cache (what a Space does on its first start); ``early``: what the page and /status answered at once."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    demo, startup = _load_app().main(["--host", "127.0.0.1", "--port", str(port), *QUICK], block=False)
    try:
        early = {"status": startup.status()}
        with urllib.request.urlopen(url, timeout=30) as page:  # the page is served before the table exists
            early["http"], early["html"] = page.status, page.read().decode()
        early["client_status"] = _client(url).predict(api_name="/status")
        startup.wait(timeout=900)
        yield url, startup, early
    finally:
        demo.close()


def test_the_space_build_does_not_depend_on_the_tables_lissa_repetitions(monkeypatch) -> None:
    """The embedded table's default T went from 1 to 4 (hf-fastif build's LiSSA); the Space's builds took it from
    the same "table" settings and recorded it, though arnoldi reads no T, so every build made before was refused for
    reuse (and by assemble.py) and a deployed Space built again at every start (a review's repro). LIVE_SETTINGS pins
    T; what the build records stays the same whatever the table's T."""
    from hf_fastif.embedded import EMBEDDED, embedded_arguments
    from hf_fastif.space import LIVE_SETTINGS, build_config

    def recorded(kind):
        args = embedded_arguments("unused", use="table", kind=kind, **LIVE_SETTINGS)
        return build_config(args, kind, EMBEDDED[kind].table_data, None, True)

    assert all(embedded_arguments("unused", use="table", kind=kind).influence_repetitions == 4  # hf-fastif build's
               for kind in EMBEDDED)
    before = {kind: recorded(kind) for kind in EMBEDDED}
    assert all(b["influence"]["influence_repetitions"] == 1 for b in before.values())
    for kind in EMBEDDED:
        for t in (1, 8):
            monkeypatch.setitem(EMBEDDED[kind].uses["table"], "influence_repetitions", t)
            assert recorded(kind) == before[kind]


def test_the_page_is_served_at_once_and_fills_in_when_ready(app) -> None:
    url, startup, early = app
    assert not early["status"]["ready"] and early["status"]["stage"]  # the port opened before anything was built
    assert early["http"] == 200 and "hf_fastif: influence explorer" in early["html"]
    assert not early["client_status"]["ready"] and not early["client_status"]["failed"]
    status = _client(url).predict(api_name="/status")
    assert status["ready"] and status["live"] and not status["failed"] and status["stage"] is None
    stages = [s["stage"] for s in status["stages"]]
    assert any("training the tiny model" in s for s in stages) and any("influence table" in s for s in stages)
    assert all(s["seconds"] is not None and s["seconds"] >= 0 for s in status["stages"])
    # the start's duration, fixed once it is over (it grew with every later visit: "started in 3,600 s" an hour on)
    time.sleep(1.1)
    assert _client(url).predict(api_name="/status")["elapsed_s"] == status["elapsed_s"]
    # a fresh build computed the table with the live engine and saved its caches next to the table
    build = Path(os.environ["HF_FASTIF_SPACE_CACHE"]) / KIND
    assert {"table", "model", "engine", "ready.json", "train.parquet"} <= {p.name for p in build.iterdir()}
    assert startup.state.table.metadata["settings"]["influence_solver"] == "arnoldi"
    assert startup.state.table.metadata["settings"]["influence_knn_features"] == "gradient"
    # the page states the live settings (the Hessian's rows: at most the training rows there are)
    assert f"Lanczos over {TRAIN_ROWS} seeded training rows" in startup.state.summary()


def test_show_filter_and_honest_lists_through_the_client(app) -> None:
    from gradio_client.exceptions import AppError

    url, startup, _ = app
    state, client = startup.state, _client(url)
    wrong = state.choices("all", "wrong")
    assert wrong and state.choices("all", "correct")  # the chooser has both kinds to offer
    test_id = wrong[0][1]
    description, helpful_note, helpful, harmful_note, harmful, distribution, graph = client.predict(
        test_id, 4, "all", "wrong", api_name="/show")
    counts = state.table.describe(test_id)
    assert f"Test example #{test_id}" in description and "(**wrong**)" in description
    assert f"{counts['num_candidates']:,} candidates:" in description and "distinct values" in description
    # the sign counts of gradient-index candidates are half and half by construction: said under them
    assert "*Candidates: the 100 of the " in description and "the helpful / harmful counts show that choice" in description
    expected = state.table.helpful(test_id, 4)
    assert [int(r[2]) for r in helpful["data"]] == expected.train_id.tolist()
    assert [r[4] for r in helpful["data"]] == expected.train_premise.tolist()
    assert all(float(r[1]) < 0 for r in helpful["data"]) and all(float(r[1]) > 0 for r in harmful["data"])
    assert [float(r[1]) for r in harmful["data"]] == pytest.approx(state.table.harmful(test_id, 4).influence, rel=1e-3)
    assert f"**{counts['num_helpful']:,}** candidates with negative influence" in helpful_note
    assert f"**{counts['num_harmful']:,}** candidates with positive influence" in harmful_note
    assert distribution is not None and graph is not None

    update = client.predict("lexical_overlap", "correct", api_name="/filter")
    expected_choices = state.choices("lexical_overlap", "correct")
    assert [c[1] for c in update["choices"]] == [t for _, t in expected_choices]
    assert update["value"] == expected_choices[0][1] and all("✓ [lexical_overlap]" in c[0] for c in update["choices"])
    with pytest.raises(AppError, match="Test example 9999 is not in this table"):
        client.predict(9999, 4, "all", "all", api_name="/show")
    with pytest.raises(AppError, match="Unknown heuristic 'no_such_heuristic'"):
        client.predict("no_such_heuristic", "all", api_name="/filter")
    # the app's own message, not Gradio's check of the Radio's choices (with a traceback in the log)
    with pytest.raises(AppError, match="Unknown filter 'maybe'; choose all, correct or wrong"):
        client.predict("all", "maybe", api_name="/filter")


def test_a_typed_pair_is_explained_like_the_table_explains_its_own_rows(app) -> None:
    url, startup, _ = app
    state = startup.state
    row = state.tests.iloc[0]
    prediction, summary, helpful_note, helpful, harmful_note, harmful = _client(url).predict(
        row.premise, row.hypothesis, state.label_names[int(row.label)], 100, 5, api_name="/explain")
    assert {c["label"] for c in prediction["confidences"]} == set(state.label_names)
    assert prediction["label"] == state.label_names[int(row.prediction)]  # the table's prediction
    # the table was computed by the same engine with the same settings: the same rows, the same values
    for rows, expected in ((helpful, state.table.helpful(int(row.test_id), 5)),
                           (harmful, state.table.harmful(int(row.test_id), 5))):
        assert [float(r[1]) for r in rows["data"]] == pytest.approx(expected.influence.tolist(), rel=1e-3)  # shown with 4 digits
        assert {int(r[2]) for r in rows["data"]} <= set(state.table.for_test(int(row.test_id)).train_id)
    assert "Computed in" in summary and "[CLS]" in summary and "100 candidates:" in summary
    assert "along -s_test (half) and along +s_test (half)" in summary and "show that choice" in summary
    assert "Steps (s): tokenize " in summary and " · scoring " in summary and " · other " in summary
    assert "candidates with negative influence" in helpful_note and "positive influence" in harmful_note


def test_the_default_table_takes_the_live_k_whatever_an_explanation_before_it_asked(app) -> None:
    """`Explainer.table` ran with the engine's settings as the last `explain` call left them (its k)."""
    explainer = app[1].state.explainer
    test, *_ = explainer.encode("The judge admired the doctor.", "The doctor admired the judge.", 0)
    assert explainer.explain("The judge admired the doctor.", "The judge slept.", 0, k=5, n=3).k == 5
    table, _ = explainer.table(test)
    live = min(int(explainer.settings["influence_knn_k"]), explainer.max_candidates)
    assert live > 5 and len(table.for_test(0)) == live


def test_bad_input_is_a_message_and_the_server_keeps_serving(app) -> None:
    from gradio_client.exceptions import AppError

    url, startup, _ = app
    client, ok = _client(url), "The judge slept."
    cases = [
        (("", ok, "entailment", 50, 3), "Type a premise"),
        (("word " * 100, ok, "entailment", 50, 3), "at most 300 are allowed"),
        (("\u200b\u200b", ok, "entailment", 50, 3), "knows no word of the premise"),  # the tiny vocabulary's [UNK]
        ((ok, "Quantum chromodynamics.", "entailment", 50, 3), "knows no word of the hypothesis"),
        ((ok, ok, "maybe", 50, 3), "Choose the gold label of the pair"),
        ((ok, ok, "entailment", 5000, 3), "number of candidates must be between 1 and 500, got 5000"),
        # an API call's None failed in the slider's own preprocessing: Gradio's generic error and a traceback
        ((ok, ok, "entailment", None, 3), "Choose the number of candidates k, a whole number from 1 to 500"),
        ((ok, ok, "entailment", 50, None), "Choose a number of rows"),
        # a JSON client's true was k = 1 (float(True)), and a list premise was read as its repr
        ((ok, ok, "entailment", True, 3), "Choose a number of candidates .a whole number., got True"),
        ((["The judge", "slept."], ok, "entailment", 50, 3), "The premise must be text, got list"),
    ]
    for arguments, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*arguments, api_name="/explain")
    with pytest.raises(AppError, match="Choose a number of rows"):
        client.predict(int(startup.state.tests.test_id.iloc[0]), None, "all", "all", api_name="/show")
    # n "5.0" passed the rows' check and then met int()'s bare ValueError; an unknown filter hid the graph, with a
    # traceback in the log
    first = int(startup.state.tests.test_id.iloc[0])
    assert client.predict(first, "5.0", "all", "all", api_name="/show")[0].startswith(f"### Test example #{first}")
    with pytest.raises(AppError, match="Unknown heuristic 'bogus'"):
        client.predict(first, 5, "bogus", "all", api_name="/show")
    with pytest.raises(ValueError, match="number of candidates must be between 1 and 500, got 501"):
        startup.state.explainer.explain(ok, ok, 0, 501, 3)  # the library's bound, behind the slider's
    # unknown words are named, not read silently
    _, summary, *_ = client.predict("The judge admired the xylophonist.", ok, "entailment", 50, 3, api_name="/explain")
    assert "Unknown to the tokenizer" in summary and "` xylophonist `" in summary
    # a pair over the table's token limit (64, the embedded default's) is cut as the table's rows were, and said
    # (a pair over the model's 128 positions was refused; one of 65-128 pieces was read whole, unlike the table's)
    _, summary, *_ = client.predict("a. " * 100, "a. " * 100, "entailment", 50, 3, api_name="/explain")
    assert "**Cut** from 403 to 64 word pieces (longest sentence first), as the table's pairs were cut" in summary
    assert _client(url).predict(api_name="/status")["ready"]


def test_typed_text_through_minilm_wordpiece() -> None:
    """The MiniLM default reads any English through WordPiece; what it cannot read is refused or named."""
    from hf_fastif.pretrained import load_minilm_tokenizer
    from hf_fastif.space import encode_pair

    tokenizer = load_minilm_tokenizer()
    test, pieces, unknown, _ = encode_pair(tokenizer, "The xylophonist serenaded the flibbertigibbet 🙂.",
                                        "Someone played music.", 1)
    assert pieces[0] == "[CLS]" and "##yl" in pieces and unknown == ["🙂"]  # rare words split, the emoji named
    assert test["labels"] == [1] and len(test["input_ids"][0]) == len(pieces)
    assert test["token_type_ids"][0][-1] == 1 and test["attention_mask"][0] == [1] * len(pieces)
    # a word unknown in both sentences is named once (it was listed twice)
    assert encode_pair(tokenizer, "A 🙂 sleeps 🙃.", "A 🙂 sleeps.", 0)[2] == ["🙂", "🙃"]
    with pytest.raises(ValueError, match="The premise has nothing the model can read"):
        encode_pair(tokenizer, "\u200b\u200b", "Someone played music.", 0)
    with pytest.raises(ValueError, match="knows no word of the hypothesis '🙂 !'"):
        encode_pair(tokenizer, "Someone played music.", "🙂 !", 0)
    with pytest.raises(ValueError, match="word pieces; at most 256 are allowed"):
        encode_pair(tokenizer, "a, " * 100, "b, " * 100, 0)
    # a special token's text was read as that token: [SEP] started a third segment, [PAD] was attended to
    for text in ("The [SEP] judge slept.", "[PAD] The judge slept.", "The judge [CLS] slept"):
        with pytest.raises(ValueError, match="reads as a special \\(control\\) token, not as text; remove it"):
            encode_pair(tokenizer, text, "Someone slept.", 0)
    # cut to the table's token limit, as its rows were (longest side first), and its own length told
    premise, hypothesis = "The doctor near the tall artist saw the secretary in the old garden. " * 3, "A doctor slept."
    whole = tokenizer(premise, hypothesis)["input_ids"]
    test, pieces, _, length = encode_pair(tokenizer, premise, hypothesis, 0, max_length=32)
    assert length == len(whole) > 32 and len(pieces) == 32 and pieces[-1] == "[SEP]"
    assert test["input_ids"][0] == tokenizer(premise, hypothesis, truncation=True, max_length=32)["input_ids"]
    assert encode_pair(tokenizer, premise, hypothesis, 0)[1] == tokenizer.convert_ids_to_tokens(whole)
    from hf_fastif.space import Explanation, explanation_summary

    counts = dict(num_candidates=3, num_helpful=1, num_harmful=2, num_zero=0, num_distinct_values=3, min=-1.0,
                  median=0.5, max=2.0)
    summary = explanation_summary(Explanation({}, None, None, counts, pieces, [], 0.1, 3, 1, length=length))
    assert f"**Cut** from {length} to 32 word pieces (longest sentence first), as the table's pairs were" in summary
    assert "**Cut**" not in explanation_summary(Explanation({}, None, None, counts, pieces, [], 0.1, 3, 1, length=32))
    # a typed backtick ended the pieces' code span (a review's: "the `doctor` said" came out in three spans)
    ticked = ["[CLS]", "the", "`", "doctor", "``", "[SEP]"]
    shown = explanation_summary(Explanation({}, None, None, counts, ticked, ["`x", "*z*"], 0.1, 1, 1, length=6))
    assert "word pieces): ``` [CLS] the ` doctor `` [SEP] ```" in shown
    assert "carry no meaning): `` `x ``, ` *z* `" in shown and "over 1 candidate." in shown  # (typed words as code)


def test_one_live_computation_at_a_time_others_see_their_queue_position(app) -> None:
    from gradio_client.utils import Status

    url, startup, _ = app
    client, lock = _client(url), startup.state.explainer._lock
    arguments = ("The doctor paid the judge.", "The judge paid the doctor.", "non_entailment", 50, 3)
    lock.acquire()  # the first request holds the one live slot until released
    try:
        first = client.submit(*arguments, api_name="/explain")
        deadline = time.monotonic() + 60
        while first.status().code != Status.PROCESSING and time.monotonic() < deadline:
            time.sleep(0.05)
        second = client.submit(*arguments, api_name="/explain")
        seen = None
        while time.monotonic() < deadline:
            seen = second.status()
            if seen.code == Status.IN_QUEUE and seen.rank is not None:
                break
            time.sleep(0.05)
        assert first.status().code == Status.PROCESSING
        assert seen.code == Status.IN_QUEUE and seen.rank == 0 and seen.queue_size >= 1  # a position, not an error
        assert _client(url).predict(api_name="/status")["ready"]  # table reads are not queued behind it
    finally:
        lock.release()
    results = [first.result(timeout=120), second.result(timeout=120)]
    assert results[0][0] == results[1][0] and results[0][3] == results[1][3]


def test_a_restart_reads_the_table_and_the_engine_caches_and_answers_the_same(app, monkeypatch) -> None:
    import hf_fastif.engine
    import hf_fastif.gradient_index
    from hf_fastif.space import CACHED, STAGES, Startup, status_markdown

    _, startup, _ = app
    built = []

    class CountingTrunkCache(hf_fastif.engine.trunk_states.TrunkCache):
        def __init__(self, split, batcher, *args, **kwargs):
            built.append(len(batcher))
            super().__init__(split, batcher, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a warm restart must not rebuild this cache")

    monkeypatch.setattr(hf_fastif.engine.trunk_states, "TrunkCache", CountingTrunkCache)
    monkeypatch.setattr(hf_fastif.engine.s_test, "low_rank_hessian", refuse)
    monkeypatch.setattr(hf_fastif.engine.candidates, "build_gradient_index", refuse)
    again = Startup(kind=KIND, max_train_samples=TRAIN_ROWS).start()
    state = again.wait(timeout=300)
    status = again.status()
    assert set(CACHED) <= set(status["caches_loaded"]) and "read from its cache" in status_markdown(status)
    stages = [s["stage"] for s in status["stages"]]
    assert stages[0].startswith("reusing the finished build in ") and stages[0].endswith("(the same settings and model)")
    assert stages[1:] == ["loading the model and the live engine's caches",
                          "warming up the live engine (caches read from disk)"]
    assert TRAIN_ROWS not in built  # the training rows' trunk states came from disk (only test rows were new)
    pair = ("The doctor near the actor danced.", "The actor danced.", 1, 60, 5)
    before, after = startup.state.explainer.explain(*pair), state.explainer.explain(*pair)
    assert tuple(after.stages) == STAGES and all(v >= 0 for v in after.stages.values())
    assert sum(v for k, v in after.stages.items() if k != "tokenize") == pytest.approx(after.seconds, abs=1e-6)
    assert after.helpful.train_id.tolist() == before.helpful.train_id.tolist()
    assert after.harmful.influence.to_numpy() == pytest.approx(before.harmful.influence.to_numpy(), rel=1e-5)


def test_stale_engine_caches_are_rebuilt_saved_again_and_serve_the_next_start(app, cache, monkeypatch) -> None:
    """Engine caches saved under other keys (another hf_fastif version hashed the weights another way) are read but
    serve nothing: the warm-up rebuilds them, says so, and saves them again, so the next start is warm."""
    import json

    import hf_fastif.engine
    import hf_fastif.gradient_index
    from hf_fastif.engine.saved_caches import CACHE_MANIFEST
    from hf_fastif.space import CACHED, ENGINE_DIR, Startup

    manifest_path = cache / KIND / ENGINE_DIR / CACHE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["trunks"]:
        entry["key"] = "stale|" + entry["key"]
    for kind in ("low_rank", "gradient_index"):
        manifest[kind]["key"][0] = "stale:" + manifest[kind]["key"][0]  # the model's fingerprint
    manifest_path.write_text(json.dumps(manifest))

    first = Startup(kind=KIND, max_train_samples=TRAIN_ROWS).start()
    first.wait(timeout=300)
    status = first.status()
    assert not set(CACHED) & set(status["caches_loaded"])  # read, served nothing: not counted as loaded
    saved = json.loads(manifest_path.read_text())
    assert "stale" not in json.dumps(saved) and saved["trunks"] and "low_rank" in saved and "gradient_index" in saved

    def refuse(*args, **kwargs):
        raise AssertionError("the caches saved again must serve the next start")

    built = []

    class CountingTrunkCache(hf_fastif.engine.trunk_states.TrunkCache):
        def __init__(self, split, batcher, *args, **kwargs):
            built.append(len(batcher))
            super().__init__(split, batcher, *args, **kwargs)

    monkeypatch.setattr(hf_fastif.engine.trunk_states, "TrunkCache", CountingTrunkCache)
    monkeypatch.setattr(hf_fastif.engine.s_test, "low_rank_hessian", refuse)
    monkeypatch.setattr(hf_fastif.engine.candidates, "build_gradient_index", refuse)
    second = Startup(kind=KIND, max_train_samples=TRAIN_ROWS).start()
    second.wait(timeout=300)
    assert set(CACHED) <= set(second.status()["caches_loaded"]) and TRAIN_ROWS not in built


def test_tables_that_cannot_be_loaded_or_explained_are_notices(app, tmp_path) -> None:
    import torch

    from hf_fastif import InfluenceTable
    from hf_fastif.space import load_state
    from tests.tiny import tiny_model

    build = Path(os.environ["HF_FASTIF_SPACE_CACHE"]) / KIND
    quick = dict(kind=KIND, max_train_samples=TRAIN_ROWS)
    (tmp_path / "not_a_table").mkdir()
    for source in ("test-user/missing", str(tmp_path / "not_a_table")):  # the suite runs offline: no Hub either
        state = load_state(source, **quick)
        assert state.source.startswith("embedded default") and state.explainer is not None  # the fallback
        assert len(state.notices) == 1 and f"Could not load the influence table {source!r}" in state.notices[0]
        assert "Showing the embedded default instead" in state.notices[0]
    assert "HF_HUB_OFFLINE" in load_state("test-user/missing", **quick).notices[0]
    # a path that does not exist is said to be one (it was called an invalid Hub repo id)
    missing = str(tmp_path / "no_such" / "table")
    assert f"There is no folder {missing!r}" in load_state(missing, **quick).notices[0]

    # a local table with its model: live explanations over the training rows the table carries
    state = load_state(str(build / "table"), model=str(build / "model"))
    assert state.explainer is not None and "local folder" in state.source
    train_ids = set(state.table.to_pandas().train_id)
    assert set(state.explainer.train_ids) == train_ids
    # those are the table's candidates, fewer than the rows it was computed over: the page says so (it did not, and
    # a typed copy of a table row got other values than the table's)
    assert len(train_ids) < TRAIN_ROWS and state.notices == [
        f"Live explanations use {len(train_ids)} of the {TRAIN_ROWS} training rows this table was computed over (the "
        "rows whose text it carries: its candidates, at most 5,000): their Hessian and candidates are those rows', so "
        "a typed copy of a table row gets other values, and can get other rows, than the table shows."]
    assert state.explainer.max_length == 64  # the limit the table records (the embedded default's)
    found = state.explainer.explain("The judge slept.", "The judge slept.", 0, 20, 3)
    assert set(found.helpful.train_id) | set(found.harmful.train_id) <= train_ids
    # the same table with its labels stored as names: live explanations work, with the same values (they were off,
    # advising a dataset.map the Space's operator cannot run)
    named = InfluenceTable.load(build / "table")
    names = named.metadata["label_names"]
    frame = named.to_pandas()
    frame["train_label"] = [names[i] for i in frame.train_label]
    InfluenceTable.from_arrays(frame.test_id, frame.train_id, frame.influence, named.metadata, pairs_unique=True,
                               **{c: frame[c].tolist() for c in frame.columns if c.startswith(("train_", "test_"))
                                  and c not in ("test_id", "train_id")}).save(tmp_path / "named")
    by_name = load_state(str(tmp_path / "named"), model=str(build / "model"))
    assert by_name.explainer is not None
    again = by_name.explainer.explain("The judge slept.", "The judge slept.", 0, 20, 3)
    assert again.helpful.influence.tolist() == found.helpful.influence.tolist()

    # a table computed with other settings than the live engine's (a CLI build with LiSSA and [CLS] kNN): live
    # explanations work, and the page says a typed copy of a row can get other rows than the table shows
    lissa = InfluenceTable.load(build / "table")
    lissa.metadata["settings"] |= {"influence_solver": "lissa", "influence_knn_features": "auto"}
    lissa.save(tmp_path / "lissa_table")
    state = load_state(str(tmp_path / "lissa_table"), model=str(build / "model"))
    assert state.explainer is not None and len(state.notices) == 2 and "Live explanations use" in state.notices[0]
    assert "other settings than this table (solver lissa here vs arnoldi live, knn_features auto here vs gradient " \
           "live)" in state.notices[1]

    # a table built with the Trainer's label smoothing: the live loss kept none (values 51-87% off, no notice); and
    # one computed with a loss of its own, which the live engine cannot rebuild, is said to measure another quantity
    smoothed = InfluenceTable.load(build / "table")
    smoothed.metadata["settings"] |= {"label_smoothing_factor": 0.2}
    smoothed.metadata["functions"] = {"loss_fn": {"name": "focal_loss", "module": "mine", "fingerprint": "f"},
                                      "measurement_fn": None}
    smoothed.save(tmp_path / "smoothed_table")
    plain = load_state(str(build / "table"), model=str(build / "model"))
    state = load_state(str(tmp_path / "smoothed_table"), model=str(build / "model"))
    assert state.explainer.settings["label_smoothing_factor"] == 0.2
    assert state.explainer._arguments(20).label_smoothing_factor == 0.2
    assert "computed with a loss_fn of its own (focal_loss)" in state.notices[-1]
    assert not any("of its own" in notice for notice in plain.notices)
    pair = ("The judge slept.", "The judge slept.", 0, 20, 3)
    smoothed_rows, plain_rows = (s.explainer.explain(*pair).helpful for s in (state, plain))
    assert smoothed_rows.influence.tolist() != plain_rows.influence.tolist()

    # another model: the table is shown, live explanations are off, and the page says why
    tiny_model("bert", dtype=torch.float32).save_pretrained(tmp_path / "other")
    state = load_state(str(build / "table"), model=str(tmp_path / "other"))
    assert state.explainer is None and "not with the given model: num_parameters" in state.notices[0]
    assert len(state.rows(int(state.tests.test_id.iloc[0]), 3)[0]) > 0

    # a table without text: rows by id, no live explanations, a notice naming the fix
    bare = InfluenceTable.from_arrays([0, 0, 0], [4, 5, 6], [-2.0, 1.0, 3.0], {"label_names": ["a", "b"]})
    bare.save(tmp_path / "bare")
    state = load_state(str(tmp_path / "bare"), model=str(build / "model"))
    assert state.explainer is None and "carries the training text" in state.notices[0]
    helpful, harmful = state.rows(0, 5)
    assert helpful.train_id.tolist() == [4] and harmful.train_id.tolist() == [6, 5]
    assert list(helpful.columns) == ["rank", "influence", "train_id"]
    assert "Live explanations need the table's model" in load_state(str(tmp_path / "bare")).notices[0]
    assert not state.has_predictions and state.choices() == [("#0", 0)]
    with pytest.raises(ValueError, match="records no predictions"):  # not every example silently
        state.choices(correctness="wrong")

    # influence over other parameters than the model as loaded selects (lower layers frozen at build time and
    # trainable again once loaded): the table is shown, live explanations are off with the reason
    other = InfluenceTable.load(build / "table")
    other.metadata["model"]["num_influence_parameters"] += 1
    other.save(tmp_path / "other_parameters")
    state = load_state(str(tmp_path / "other_parameters"), model=str(build / "model"))
    assert state.explainer is None and "Build the table with explicit influence_params" in state.notices[0]


def test_small_tables_long_rows_unreadable_models_and_stray_settings(app, tmp_path) -> None:
    """A table over fewer rows than the live k (100), a first training row longer than a visitor may type, and a
    model folder whose weights cannot be read each used to stop the start (the warm-up asked for 100 candidates of
    40 rows; it explained row 0 as a typed pair; only ValueError / OSError were caught); a --model without --table
    was ignored silently; and a table that would not load vanished from the page when the default failed too."""
    from hf_fastif import InfluenceTable
    from hf_fastif.space import MAX_TEXT_CHARS, load_state

    build = Path(os.environ["HF_FASTIF_SPACE_CACHE"]) / KIND
    full = InfluenceTable.load(build / "table")
    few = sorted(set(full.to_pandas().train_id))[:40]
    small = InfluenceTable(full.dataset.filter(lambda r: r["train_id"] in set(few)), dict(full.metadata))
    small.save(tmp_path / "small")
    state = load_state(str(tmp_path / "small"), model=str(build / "model"))
    assert state.explainer is not None and state.explainer.max_candidates == 40
    found = state.explainer.explain("The judge slept.", "The judge slept.", 0)
    assert found.k == 40  # the default k, capped
    # with the table's genre, as its own lists show it (the live lists dropped it)
    assert "train_genre" in full.column_names and "genre" in state.display(found.helpful).columns

    first = min(full.to_pandas().train_id)
    long = "the judge slept . " * 30
    assert len(long) > MAX_TEXT_CHARS
    frame = full.to_pandas()
    frame.loc[frame.train_id == first, "train_premise"] = long
    InfluenceTable(type(full.dataset).from_pandas(frame, preserve_index=False), dict(full.metadata)).save(
        tmp_path / "long")
    state = load_state(str(tmp_path / "long"), model=str(build / "model"))
    assert state.explainer is not None and not any("Live explanations are off" in n for n in state.notices)

    broken = tmp_path / "broken_model"
    shutil.copytree(build / "model", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    state = load_state(str(build / "table"), model=str(broken))
    assert state.explainer is None and len(state.rows(int(state.tests.test_id.iloc[0]), 3)[0]) > 0
    assert any(f"the model {str(broken)!r} could not be loaded" in n for n in state.notices)

    quick = dict(kind=KIND, max_train_samples=TRAIN_ROWS)
    state = load_state(None, model=str(build / "model"), **quick)
    assert state.source.startswith("embedded default") and "is for a --table" in state.notices[0]
    missing = str(tmp_path / "tabel")
    with pytest.raises(RuntimeError, match="(?s)There is no folder.*tabel.*could not start either: ValueError: "
                                           "Unknown embedded model"):
        load_state(missing, kind="no_such_model")
    with pytest.raises(ValueError, match="Unknown embedded model"):  # no table failed: the default's own error
        load_state(None, model=str(build / "model"), kind="no_such_model")


def test_typed_pairs_are_capped_at_the_positions_a_roberta_row_can_take() -> None:
    """RoBERTa's position table numbers from its pad id + 1: 66 entries give a row 64 positions. The Space capped typed
    pairs at the 66 entries (``max_position_embeddings``), so a 65-piece pair passed and failed inside the model."""
    from types import SimpleNamespace

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from hf_fastif.pretrained import load_minilm_tokenizer
    from hf_fastif.space import Explainer

    tokenizer = load_minilm_tokenizer()
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=66, pad_token_id=1))
    explainer = SimpleNamespace(model=model, tokenizer=tokenizer, max_length=None)
    words = "the judge slept " * 20
    for premise_words, fits in ((30, True), (31, False)):  # [CLS] premise [SEP] 31 words [SEP]: 64 / 65 pieces
        premise, hypothesis = " ".join(words.split()[:premise_words]), " ".join(words.split()[:31])
        if fits:
            assert len(Explainer.encode(explainer, premise, hypothesis, 0)[1]) == 64
        else:
            with pytest.raises(ValueError, match="65 word pieces; at most 64 are allowed"):
                Explainer.encode(explainer, premise, hypothesis, 0)


def test_a_start_that_fails_is_a_message_and_the_server_keeps_serving(app, monkeypatch, capfd) -> None:
    from gradio_client.exceptions import AppError

    monkeypatch.setenv("HF_FASTIF_EMBEDDED_MODEL", "no_such_model")
    port = _free_port()
    demo, startup = _load_app().main(["--host", "127.0.0.1", "--port", str(port)], block=False)
    try:
        with pytest.raises(RuntimeError, match="Unknown embedded model 'no_such_model'"):
            startup.wait(timeout=120)
        client = _client(f"http://127.0.0.1:{port}/")
        status = client.predict(api_name="/status")
        assert status["failed"] and not status["ready"] and "no_such_model" in status["error"]
        capfd.readouterr()
        with pytest.raises(AppError, match="The Space could not start: ValueError: Unknown embedded model"):
            client.predict("The judge slept.", "The judge slept.", "entailment", 50, 3, api_name="/explain")
        assert "Traceback" not in "".join(capfd.readouterr())  # (a message, not a fault: one traceback per call)
    finally:
        demo.close()


def test_text_that_is_not_valid_unicode_is_a_message() -> None:
    """A lone UTF-16 surrogate (JSON and JavaScript strings may hold one) passed the text check and the tokenizer
    raised a TypeError: the page said "Something went wrong", with a traceback in the log (a review)."""
    from hf_fastif.space.inputs import check_text

    assert check_text("  The judge slept. ", "premise") == "The judge slept."
    with pytest.raises(ValueError, match=r"The premise holds a character that is not valid text \('\\ud800' at "
                                         r"position 10, half of a UTF-16 pair\)"):
        check_text("The judge \ud800 slept.", "premise")
    with pytest.raises(ValueError, match="at position 2, "):  # (in the text as typed, before its spaces are stripped)
        check_text("  \udc00x", "hypothesis")


def test_a_start_that_meets_python_s_ast_race_is_tried_again(monkeypatch) -> None:
    """CPython 3.11's ast.parse is not thread-safe: gradio parsing a component's source while the start's thread
    parsed too failed the start once in a full test run ("SystemError: AST constructor recursion depth mismatch"),
    and the Space stayed down. It is tried once more; any other SystemError still fails the start."""
    import hf_fastif.space.startup
    from hf_fastif.space import Startup

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=132, after=125)")
        return "state"

    monkeypatch.setattr(hf_fastif.space.startup, "load_state", flaky)  # where Startup reads it
    startup = Startup(kind="tiny")
    startup.run()
    assert startup.state == "state" and startup.error is None and len(calls) == 2
    monkeypatch.setattr(hf_fastif.space.startup, "load_state",
                        lambda *a, **k: (_ for _ in ()).throw(SystemError("another")))
    startup = Startup(kind="tiny")
    startup.run()
    assert startup.state is None and startup.error == "SystemError: another"


def test_honest_lists_ties_and_degenerate_distributions() -> None:
    from hf_fastif import InfluenceTable
    from hf_fastif.space import SpaceState, counts_note, influence_histogram, list_notes

    # test 0: only positive values (nothing helps), with ties; test 1: every value the same; test 2: 1 helpful
    table = InfluenceTable.from_arrays([0] * 4 + [1] * 3 + [2] * 3, [0, 1, 2, 3, 0, 1, 2, 0, 1, 2],
                                       [0.5, 0.5, 0.2, 0.0, 1.0, 1.0, 1.0, -3.0, 2.0, 4.0], {"label_names": ["a", "b"]})
    state = SpaceState.from_table(table, "synthetic")
    helpful, harmful = state.rows(0, 5)
    assert helpful.empty and harmful.train_id.tolist()[:2] in ([0, 1], [1, 0]) and len(harmful) == 3
    counts = state.counts(0)
    assert counts_note(counts).startswith("**4 candidates:** 0 helpful (< 0), 3 harmful (> 0), 1 exactly 0")
    assert "3 distinct values (ties: 1 row shares a value with another)" in counts_note(counts)
    assert counts_note(counts | {"num_candidates": 1}).startswith("**1 candidate:**")  # (it said "1 candidates")
    single = counts | {"num_candidates": 1, "num_helpful": 1, "num_harmful": 0}
    assert list_notes(single, 5) == ("Only **1** of the 1 candidate has negative influence (helpful); it is shown.",
                                     "**No harmful training row** among the 1 candidate: none has positive influence.")
    helpful_note, harmful_note = list_notes(counts, 5)
    assert helpful_note == "**No helpful training row** among the 4 candidates: none has negative influence."
    assert harmful_note.startswith("Only **3** of the 4 candidates have positive influence (harmful)")
    assert "every candidate has the same influence (+1.000e+00): the lists rank nothing" in counts_note(state.counts(1))
    assert list_notes(state.counts(2), 1) == ("The 1 most helpful of the **1** candidates with negative influence "
                                              "(of 3).", "The 1 most harmful of the **2** candidates with positive "
                                              "influence (of 3).")
    # the histogram marks only values of the side's sign, and says when a side is empty
    legend = [t.get_text() for t in influence_histogram(np.array([0.5, 0.5, 0.2, 0.0]), 5, "t").axes[0]
              .get_legend().get_texts()]
    assert legend == ["no helpful candidate (none < 0)", "3 most harmful (of 3 > 0)"]
    figure = state.distribution(2, 1)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [
        "1 most helpful (of 1 < 0)", "1 most harmful (of 2 > 0)"]
    assert "(3 distinct values)" in figure.axes[0].get_title()


def test_non_finite_influence_is_left_out_of_the_plot_and_a_failing_plot_keeps_the_rows(monkeypatch) -> None:
    """One inf influence (kept in tables by design: it flags an overflow), or values of ±1e308 whose range overflows,
    made matplotlib refuse the histogram ("supplied range of [-2.0, inf] is not finite"), and /show failed with it,
    hiding every row of that test example."""
    import io

    import hf_fastif.space.state
    from hf_fastif import InfluenceTable
    from hf_fastif.space import SpaceState

    cases = {0: [-2.0, -1.0, 0.5, np.inf], 1: [-2.0, -1.0, 0.5, 0.7], 2: [-1e308, -1.0, 0.5, 1e308],
             3: [np.nan, -np.inf, 0.5, 1.0], 4: [-1e308, -1.0, 0.5, 7e307],  # (4: a finite range, 1.7e308)
             5: [1.0, 1.0, np.nextafter(1.0, 2.0), 1.0]}  # (a few ulps apart: "Too many bins for data range")
    table = InfluenceTable.from_arrays(np.repeat(list(cases), 4), np.tile(np.arange(4), len(cases)),
                                       np.concatenate(list(cases.values())))
    state = SpaceState.from_table(table, "hand-made")
    for test_id, values in cases.items():
        figure = state.distribution(test_id, 5)
        figure.savefig(io.BytesIO(), format="png")  # what the page does with it
        title, left_out = figure.axes[0].get_title(), int((~np.isfinite(values)).sum())
        assert ("of the 4 candidates" in title and f"{left_out} not finite (NaN or ±inf), left out" in title
                if left_out else "Influence of 4 candidates" in title)
    assert all("in units of 1.000e+308" in state.distribution(i, 5).axes[0].get_xlabel() for i in (2, 4))
    for test_id in (0, 2, 3):  # the graph's layout weighs edges by |influence|: inf made every node's position NaN
        nodes = state.graph(test_id).axes[0].collections[0].get_offsets()
        assert len(nodes) and np.isfinite(np.asarray(nodes, dtype=float)).all()
    histogram, graph, notes = state.plots(0, 5)
    assert histogram is not None and graph is not None and notes == []

    def broken(*args, **kwargs):
        raise ValueError("supplied range of [-2.0, inf] is not finite")

    # any plot that fails: the rows are still shown (patched where SpaceState.distribution reads it)
    monkeypatch.setattr(hf_fastif.space.state, "influence_histogram", broken)
    histogram, graph, notes = state.plots(0, 5)
    assert histogram is None and graph is not None and len(state.rows(0, 5)[0]) == 2
    assert notes == ["The influence histogram could not be drawn (ValueError: supplied range of [-2.0, inf] is not "
                     "finite); the rows are complete."]
    monkeypatch.undo()

    def unrenderable(figure):  # the page's conversion to an image fails too: caught the same way
        raise OverflowError("cannot convert float infinity to integer")

    histogram, graph, notes = state.plots(1, 5, render=unrenderable)
    assert histogram is None and graph is None and len(notes) == 2 and "influence graph could not" in notes[1]


def test_any_test_id_the_table_holds_is_shown_exactly() -> None:
    """Test ids went through float (``check_int``) with a lower bound of 0: a table's negative ids were refused, and
    2**53 + 1 was read as 2**53, "not in this table"."""
    from hf_fastif import InfluenceTable
    from hf_fastif.space import SpaceState

    ids = [-1, 7, 2**53 + 1]
    table = InfluenceTable.from_arrays(np.repeat(ids, 3), np.tile([0, 1, 2], 3), [-1.0, 0.5, 2.0] * 3,
                                       test_premise=["p"] * 9, test_hypothesis=["h"] * 9)
    state = SpaceState.from_table(table, "hand-made")
    assert [t for _, t in state.choices()] == ids
    for test_id in ids:
        helpful, harmful = state.rows(test_id, 3)
        assert helpful.train_id.tolist() == [0] and harmful.train_id.tolist() == [2, 1]
        assert state.describe(test_id).startswith(f"### Test example #{test_id}\n")
        assert state.counts(test_id)["test_id"] == test_id and state.distribution(test_id, 3) is not None
    from hf_fastif.space import check_test_id

    assert check_test_id("-1") == -1 and check_test_id(7.0) == 7 and check_test_id(np.int64(2**53 + 1)) == 2**53 + 1
    with pytest.raises(ValueError, match="Test example 9007199254740992 is not in this table"):
        state.rows(2**53, 3)
    for bad in (None, 1.5, "seven", True):
        with pytest.raises(ValueError, match="Choose a test example"):
            state.rows(bad, 3)


def test_a_table_with_predictions_but_no_gold_labels_shows_its_examples() -> None:
    """A table with the model's predictions but no gold labels (save_with_text given tokenized rows, whose label
    column is `labels`): describing any example raised AttributeError, so the page showed none of them, and the
    correct / wrong filter said the table had no predictions. A single-sentence table's text was not shown."""
    from hf_fastif import InfluenceTable
    from hf_fastif.space import SpaceState

    table = InfluenceTable.from_arrays([0, 0], [0, 1], [-1.0, 2.0], {"label_names": ["entailment", "non_entailment"]},
                                       test_premise=["p"] * 2, test_hypothesis=["h"] * 2, test_prediction=[0, 0])
    state = SpaceState.from_table(table, "hand-made")
    assert "**Model's prediction:** entailment" in state.describe(0) and "wrong" not in state.describe(0)
    assert not state.has_predictions
    with pytest.raises(ValueError, match="records no gold labels of its test rows"):
        state.choices(correctness="wrong")
    sentences = InfluenceTable.from_arrays([0], [0], [1.0], test_sentence=["a sentence"])
    state = SpaceState.from_table(sentences, "hand-made")
    assert "**Sentence:** a sentence" in state.describe(0) and state.choices() == [("#0 a sentence", 0)]


def test_measurement_and_mean_tables_say_what_their_lists_mean(tmp_path) -> None:
    """`hf-fastif show` says that a measurement_fn table's signs are the measurement's and that a combine='mean'
    table's test is the mean of its test rows; the Space showed the usual headings without a word (its notice about
    a measurement_fn came only with live explanations, and spoke of those)."""
    from hf_fastif import InfluenceTable
    from hf_fastif.space import load_state

    measured = {"functions": {"loss_fn": None, "measurement_fn": {"name": "logit_of_label", "module": "mine",
                                                                  "fingerprint": "x"}}}
    InfluenceTable.from_arrays([0, 0, 0], [0, 1, 2], [-0.9, 0.2, 0.5], measured, test_premise=["The judge slept."] * 3,
                               test_hypothesis=["The judge was asleep."] * 3).save(tmp_path / "measured")
    mean = {"combine": "mean", "test_data": {"num_rows": 6}}
    InfluenceTable.from_arrays([0, 0], [0, 1], [-0.3, 0.2], mean).save(tmp_path / "mean")
    InfluenceTable.from_arrays([0, 0], [0, 1], [-0.3, 0.2], {"combine": "none"}).save(tmp_path / "plain")
    measurement = ("⚠️ Influence here is on the measurement 'logit_of_label' (a measurement_fn), not on the test loss: "
                   "negative influence lowers it, so 'helpful' rows are helpful only if a lower value is better (for a "
                   "score such as a logit, read 'harmful' as helpful).")
    described = load_state(str(tmp_path / "measured")).describe(0)  # no model: the table's caveat all the same
    assert measurement in described and "**Premise:** The judge slept." in described
    described = load_state(str(tmp_path / "mean")).describe(0)
    assert "⚠️ Test 0 is the mean of the 6 test rows' measurements (combine='mean'), not one test row." \
        in described and measurement not in described
    assert "⚠️" not in load_state(str(tmp_path / "plain")).describe(0)


def test_a_pool_table_says_its_live_explanations_use_other_hessian_rows() -> None:
    """A table that scored a candidate pool carries the pool's text, which the live engine takes as its training
    (Hessian) rows: a typed copy of a table row got values about 9% off the table's, and another third row, with no
    notice when the pool was at least as large as the training rows (the notice compared counts only)."""
    from hf_fastif import InfluenceTable
    from hf_fastif.space import live_rows_notice

    def table(train, candidates):
        return InfluenceTable.from_arrays([0, 0], [0, 1], [-0.3, 0.2], {"train_data": train,
                                                                       "candidate_data": candidates})

    train = {"fingerprint": "95f11fe9d733a9ed", "num_rows": 100}
    pool = table(train, {"fingerprint": "411cd329d47f2cd8", "num_rows": 200})
    for live_rows, carried in ((200, "its 200 pool rows"), (146, "146 of its 200 pool rows")):
        assert live_rows_notice(pool, live_rows) == (
            "This table scored a candidate pool with the Hessian of the 100 training rows it was computed over, which "
            f"it does not carry: live explanations use {carried} as their Hessian data as well as their candidates, "
            "so their values differ from the table's, and they can rank other rows, even for a typed copy of a table "
            "row.")
    # a pool of as many rows as the training data, told by its fingerprint
    assert "scored a candidate pool" in live_rows_notice(table(train, train | {"fingerprint": "other"}), 100)
    # the training rows themselves as candidates: the notice only when fewer rows are carried than were computed over
    same = table(train, dict(train))
    assert live_rows_notice(same, 100) is None and live_rows_notice(same, 60).startswith("Live explanations use 60 of")
    assert live_rows_notice(InfluenceTable.from_arrays([0], [0], [0.1]), 1) is None  # a table written by hand


def test_a_bundled_default_goes_where_the_app_looks(tmp_path, monkeypatch) -> None:
    """`assemble --with-default` bundled a build under space_cache/<its folder's name>, while app.py reads
    space_cache/<kind>: a build copied to a folder of another name was bundled where the app never looks, and the
    deployed Space built (fine-tuned) it again on its first start."""
    import json

    import spaces_demo.assemble as assemble_module
    from hf_fastif.space import default_build_dir

    def fake_wheel(out):
        (out / "hf_fastif-0.1.0-py3-none-any.whl").write_bytes(b"")
        return out / "hf_fastif-0.1.0-py3-none-any.whl"

    monkeypatch.setattr(assemble_module, "build_wheel", fake_wheel)  # (building the real wheel is the browser test's)

    def build(name, config):
        folder = tmp_path / name
        for sub in ("table", "model", "engine"):
            (folder / sub).mkdir(parents=True)
        (folder / "train.parquet").write_bytes(b"")
        (folder / "ready.json").write_text(json.dumps({"config": config}))
        return folder

    from hf_fastif.embedded import embedded_arguments, embedded_kind
    from hf_fastif.space import LIVE_SETTINGS, build_config

    def config(rows=None, **changes):  # what a start of the Space records (with --max_train_samples rows)
        data = embedded_kind("tiny").table_data | ({"n_train": rows} if rows else {})
        args = embedded_arguments("unused", use="table", kind="tiny", **LIVE_SETTINGS)
        return build_config(args, "tiny", data, None, True) | changes

    out = assemble_module.assemble(tmp_path / "out", with_default=build("my_tiny_copy", config()))
    assert [p.name for p in (out / "space_cache").iterdir()] == ["tiny"]
    monkeypatch.setenv("HF_FASTIF_SPACE_CACHE", str(out / "space_cache"))  # what app.py sets from its folder
    assert default_build_dir("tiny") == out / "space_cache" / "tiny" and (default_build_dir("tiny") / "table").is_dir()
    # what the Space would not reuse is refused, before anything is written
    for name, recorded, message in (
            ("cli", {"kind": "minilm", "live_engine": False}, "its ready.json records a build with other"),
            ("old", {"model": "MiniLM"}, "its ready.json records no embedded model"),
            # settings a start of the Space would not reuse (it was bundled, said to be used, and built again)
            ("seed", config(seed=1), r"a start of the Space would build again \(seed: 1 here, 0 for the Space\)")):
        with pytest.raises(ValueError, match=f"is not a default build the Space can use: {message}"):
            assemble_module.assemble(tmp_path / f"out_{name}", with_default=build(name, recorded))
        assert not (tmp_path / f"out_{name}").exists()
    # a quick build (fewer training rows) is bundled, with the variable a start needs to reuse it
    quick = build("quick", config(rows=600))
    assemble_module.assemble(tmp_path / "out_quick", with_default=quick)
    assert assemble_module.start_variables(quick) == {"HF_FASTIF_MAX_TRAIN_SAMPLES": "600"}
    assert assemble_module.start_variables(tmp_path / "my_tiny_copy") == {}
    from spaces_demo.app import _env_int

    monkeypatch.setenv("HF_FASTIF_MAX_TRAIN_SAMPLES", "600")  # (app.py's --max_train_samples default)
    assert _env_int("HF_FASTIF_MAX_TRAIN_SAMPLES") == 600


def test_the_assembled_space_runs_alone_and_a_browser_drives_it(app, tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from hf_fastif import InfluenceTable
    from hf_fastif.space import SpaceState
    from spaces_demo.assemble import assemble

    assert CHROMIUM.is_file(), "Debian's chromium is missing: make test installs it (apt-get install -y chromium)"
    build = Path(os.environ["HF_FASTIF_SPACE_CACHE"]) / KIND
    folder = assemble(tmp_path / "space", with_default=build)
    wheel = next(folder.glob("hf_fastif-*.whl"))
    assert (folder / "requirements.txt").read_text().splitlines()[-1] == f"./{wheel.name}"
    vendor = tmp_path / "vendor"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(vendor), str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in (*ENV_KEYS, "PYTHONPATH")} | {"PYTHONPATH": str(vendor)}
    check = ("import hf_fastif, sys; from pathlib import Path; "
             "assert Path(hf_fastif.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), hf_fastif.__file__")
    subprocess.run([sys.executable, "-c", check, str(vendor)], cwd=folder, env=env, check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *QUICK],
                              cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status = _client(url).predict(api_name="/status")
                if status["ready"] or status["failed"]:
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        assert status is not None and status["ready"], (tmp_path / "app.log").read_text()[-3000:]
        # the running app imports the vendored wheel, and reads the bundled default build (no training)
        assert Path(status["library"]["imported_from"]).resolve().is_relative_to(vendor.resolve())
        assert set(status["caches_loaded"]) >= {"trunk", "low_rank", "gradient_index"}
        expected = SpaceState.from_table(InfluenceTable.load(folder / "space_cache" / KIND / "table"), "bundled")
        first, chosen = expected.choices("all", "wrong")[0][1], expected.choices("all", "wrong")[1]
        _drive_the_page(url, expected, first, chosen, expect, sync_playwright)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert (ARTIFACTS / "space.png").stat().st_size > 10_000
    assert (ARTIFACTS / "space-own-example.png").stat().st_size > 10_000


def _drive_the_page(url, expected, first, chosen, expect, sync_playwright) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.locator("#summary")).to_contain_text("Live explanations:", timeout=60_000)
            # on load the first wrongly predicted example is shown
            expect(page.locator("#test-description")).to_contain_text(f"Test example #{first}", timeout=60_000)
            page.locator("#test-example input").click()
            page.get_by_role("option", name=chosen[0]).click()
            expect(page.locator("#test-description")).to_contain_text(f"Test example #{chosen[1]}", timeout=30_000)
            top_helpful, top_harmful = expected.table.helpful(chosen[1], 5), expected.table.harmful(chosen[1], 5)
            for premise in top_helpful.train_premise.head(2):
                expect(page.locator("#helpful")).to_contain_text(premise, timeout=30_000)
            for premise in top_harmful.train_premise.head(2):
                expect(page.locator("#harmful")).to_contain_text(premise, timeout=30_000)
            expect(page.locator("#helpful")).to_contain_text(f"{top_helpful.influence.iloc[0]:+.3e}")
            expect(page.locator("#helpful-note")).to_contain_text("candidates with negative influence")
            for plot in ("#distribution", "#graph"):  # matplotlib figures arrive as images
                expect(page.locator(f"{plot} [data-testid=matplotlib] img")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)
            page.get_by_role("tab", name="Explain your own example").click()
            page.locator("#premise textarea").fill("The judge near the doctor slept.")
            page.locator("#explain").click()
            expect(page.locator("#own-summary")).to_contain_text("Computed in", timeout=60_000)
            expect(page.locator("#own-summary")).to_contain_text("[CLS] the judge near the doctor slept")
            expect(page.locator("#own-helpful-note")).to_contain_text("negative influence")
            expect(page.locator("#own-prediction")).to_contain_text("entailment")
            page.screenshot(path=str(ARTIFACTS / "space-own-example.png"), full_page=True)
        finally:
            browser.close()


def test_space_card_and_requirements_match_the_project(tmp_path) -> None:
    import re

    import gradio
    from huggingface_hub import SpaceCard

    from spaces_demo.assemble import assemble, requirements, upload_snippet

    card = SpaceCard.load(ROOT / "spaces_demo" / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and (ROOT / "spaces_demo" / card.data.app_file).is_file()
    assert card.data.license and card.data.datasets is not None and card.data.models is not None
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in re.findall(r'"([^"]+)"', block)}
    lines = [line for line in requirements("hf_fastif-0.1.0-py3-none-any.whl", "me/space").splitlines()
             if line and not line.startswith("#")]
    listed = {line.split(">")[0].split("=")[0].strip().lower() for line in lines}
    assert "torch" in names and names | {"networkx"} <= listed and not any("gradio" in x for x in listed)
    assert lines[-1] == ("hf_fastif @ https://huggingface.co/spaces/me/space/resolve/main/"
                         "hf_fastif-0.1.0-py3-none-any.whl")
    snippet = upload_snippet(tmp_path / "out", "me/space")
    compile(snippet, "snippet", "exec")  # the printed upload command is valid Python
    assert "create_repo('me/space', repo_type='space', space_sdk='gradio', exist_ok=True)" in snippet
    assert f"upload_folder(repo_id='me/space', repo_type='space', folder_path='{tmp_path / 'out'}')" in snippet
    with pytest.raises(ValueError, match="--space-id must be 'user/name'"):
        assemble(tmp_path / "a", space_id="no-slash")
    with pytest.raises(ValueError, match="is not a finished default build of the Space"):
        assemble(tmp_path / "b", with_default=tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(ValueError, match="is not empty"):
        assemble(tmp_path / "c")



@pytest.mark.parametrize("max_candidates", [1, 7, 40, 95, 500])
def test_the_candidate_slider_reaches_its_maximum_from_a_valid_minimum(max_candidates) -> None:
    """The page's k slider ran from 10 in steps of 10 whatever the training rows: with 7 its minimum was above its
    maximum (every position refused by `explain`), with 95 the maximum could not be reached."""
    from hf_fastif.space import LIVE_SETTINGS, candidate_slider

    got = candidate_slider(max_candidates)
    if max_candidates == 1:  # (gradio refuses a slider whose minimum is its maximum: fixed at 1)
        assert got["value"] == got["maximum"] == 1 and got["interactive"] is False
        got["minimum"] = 1
    positions = range(got["minimum"], got["maximum"] + 1, got["step"])
    assert 1 <= got["minimum"] <= got["maximum"] == max_candidates and positions[-1] == max_candidates
    assert got["value"] in positions and got["value"] == min(LIVE_SETTINGS["influence_knn_k"], max_candidates)
    import gradio as gr

    slider = gr.Slider(**candidate_slider(max_candidates))  # (gradio takes it as it is)
    assert (slider.maximum, slider.step, slider.value) == (got["maximum"], got["step"], got["value"])
