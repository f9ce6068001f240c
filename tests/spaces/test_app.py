"""The Space (spaces_demo/app.py): launched on loopback with the default table (built offline from the embedded
default, MiniLM fine-tuned on generated NLI), called through `gradio_client`, and driven in a real headless
Chromium with Playwright.

The screenshot of the browser test is saved to test-artifacts/space.png.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_app():
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "spaces_demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """``(url, state)`` of the app running in this process on 127.0.0.1, the default table built into a fresh
    cache (exactly what a Space does on its first start)."""
    saved = {k: os.environ.get(k) for k in ("HF_FASTIF_SPACE_CACHE", "HF_FASTIF_TABLE", "HF_FASTIF_MODEL")}
    os.environ["HF_FASTIF_SPACE_CACHE"] = str(tmp_path_factory.mktemp("space_cache"))
    os.environ.pop("HF_FASTIF_TABLE", None)
    os.environ.pop("HF_FASTIF_MODEL", None)
    module = _load_app()
    captured = {}
    real = module.create_demo

    def create_demo(state):
        captured["state"] = state
        return real(state)

    module.create_demo = create_demo
    port = _free_port()
    demo = module.main(["--host", "127.0.0.1", "--port", str(port)], block=False)
    try:
        yield f"http://127.0.0.1:{port}/", captured["state"]
    finally:
        demo.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_gradio_client_show_explain_and_bad_input(app) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, state = app
    assert state.table.metadata["embedded_build"]["kind"] == "minilm"  # the default table: the fine-tuned MiniLM
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    wrong = state.choices("all", "wrong")
    assert wrong and state.choices("all", "correct")  # the chooser has both kinds to offer
    test_id = wrong[0][1]
    description, helpful, harmful, distribution, graph = client.predict(test_id, 4, "all", "wrong", api_name="/show")
    assert f"Test example #{test_id}" in description and "(**wrong**)" in description
    expected = state.table.helpful(test_id, 4)
    assert [int(r[2]) for r in helpful["data"]] == expected.train_id.tolist()
    assert [r[4] for r in helpful["data"]] == expected.train_premise.tolist()
    assert [float(r[1]) for r in harmful["data"]] == pytest.approx(state.table.harmful(test_id, 4).influence, rel=1e-3)
    assert distribution is not None and graph is not None

    update = client.predict("lexical_overlap", "correct", api_name="/filter")
    expected_choices = state.choices("lexical_overlap", "correct")
    assert [c[1] for c in update["choices"]] == [t for _, t in expected_choices]
    assert update["value"] == expected_choices[0][1] and all("✓ [lexical_overlap]" in c[0] for c in update["choices"])

    prediction, own_helpful, own_harmful = client.predict("The judge was paid by the doctor.", "The judge paid the doctor.",
                                                          "non_entailment", 50, 3, api_name="/explain")
    assert {c["label"] for c in prediction["confidences"]} == {"entailment", "non_entailment"}
    # honest lists: up to 3 rows of each sign, only that sign (a pair may have no helpful candidate)
    assert all(float(r[1]) < 0 for r in own_helpful["data"]) and all(float(r[1]) > 0 for r in own_harmful["data"])
    assert len(own_helpful["data"]) <= 3 and len(own_harmful["data"]) <= 3
    assert len(own_helpful["data"]) + len(own_harmful["data"]) >= 3

    with pytest.raises(AppError, match="Type a premise"):
        client.predict("", "The judge paid the doctor.", "entailment", 50, 3, api_name="/explain")
    with pytest.raises(AppError, match="at most 300 are allowed"):
        client.predict("word " * 100, "The judge paid the doctor.", "entailment", 50, 3, api_name="/explain")
    with pytest.raises(AppError, match="greater than maximum value 500"):  # the slider's own bound
        client.predict("The judge slept.", "The judge slept.", "entailment", 5000, 3, api_name="/explain")
    with pytest.raises(ValueError, match="candidates must be between 1 and 500"):  # and the library's, behind it
        state.explainer.explain("The judge slept.", "The judge slept.", 0, 5000, 3)
    with pytest.raises(AppError, match="9999 is not in the list of choices"):
        client.predict(9999, 4, "all", "all", api_name="/show")
    with pytest.raises(ValueError, match="Test example 9999 is not in this table"):
        state.rows(9999, 4)


def test_browser_picks_a_test_example_and_sees_its_training_examples(app) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is missing: apt-get install -y chromium (see .ci/run)"
    url, state = app
    first, chosen = state.choices("all", "wrong")[0][1], state.choices("all", "wrong")[1]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            helpful, harmful = page.locator("#helpful"), page.locator("#harmful")
            # on load the first wrongly predicted example is shown
            expect(page.locator("#test-description")).to_contain_text(f"Test example #{first}", timeout=60_000)
            # pick another test example from the chooser
            page.locator("#test-example input").click()
            page.get_by_role("option", name=chosen[0]).click()
            expect(page.locator("#test-description")).to_contain_text(f"Test example #{chosen[1]}", timeout=30_000)
            top_helpful = state.table.helpful(chosen[1], 5)
            top_harmful = state.table.harmful(chosen[1], 5)
            for premise in top_helpful.train_premise.head(2):
                expect(helpful).to_contain_text(premise, timeout=30_000)
            for premise in top_harmful.train_premise.head(2):
                expect(harmful).to_contain_text(premise, timeout=30_000)
            expect(helpful).to_contain_text(f"{top_helpful.influence.iloc[0]:+.3e}")
            for plot in ("#distribution", "#graph"):  # matplotlib figures arrive as images
                expect(page.locator(f"{plot} [data-testid=matplotlib] img")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "space.png").stat().st_size > 10_000


def test_space_card_and_requirements_match_the_project() -> None:
    import re

    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "spaces_demo" / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and (ROOT / "spaces_demo" / card.data.app_file).is_file()
    assert card.data.license and card.data.datasets is not None and card.data.models is not None
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    required = re.findall(r'"([^"]+)"', block)
    lines = (ROOT / "spaces_demo" / "requirements.txt").read_text().splitlines()
    listed = {line.split(">")[0].split("=")[0].strip().lower() for line in lines if line and not line.startswith("#")}
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in required}
    assert "torch" in names and names | {"networkx"} <= listed, names - listed


def test_a_table_that_cannot_be_loaded_is_a_message_not_a_crash(tmp_path) -> None:
    (tmp_path / "not_a_table").mkdir()
    for source in (str(tmp_path / "not_a_table"), "test-user/missing"):  # the suite runs offline: no Hub either
        demo = _load_app().build_demo(source)
        texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
        assert any(isinstance(t, str) and t.startswith("**Could not load the influence table:**") for t in texts)
    message = next(t for t in texts if isinstance(t, str) and "Could not load" in t)
    assert "test-user/missing" in message and "HF_HUB_OFFLINE" in message


def test_a_local_table_with_its_model_explains_and_another_model_is_refused(app, tmp_path) -> None:
    import torch

    from hf_fastif.space import load_state
    from hf_fastif.table import ModelMismatchError
    from tests.tiny import tiny_model

    cache = Path(os.environ["HF_FASTIF_SPACE_CACHE"])
    state = load_state(str(cache / "table"), model=str(cache / "model"))
    assert state.explainer is not None and "local folder" in state.source
    train_ids = set(state.table.to_pandas().train_id)  # the candidates are the training rows the table carries
    assert set(state.explainer.train_ids) == train_ids
    _, helpful, harmful = state.explainer.explain("The judge slept.", "The judge slept.", 0, 20, 3)
    assert set(helpful.train_id) | set(harmful.train_id) <= train_ids
    tiny_model("bert", dtype=torch.float32).save_pretrained(tmp_path / "other")
    with pytest.raises(ModelMismatchError, match="not with the given model: num_parameters"):
        load_state(str(cache / "table"), model=str(tmp_path / "other"))
