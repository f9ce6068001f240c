"""The Space's cold start and the latency of its live explanations, measured from outside, as a user meets them.

    python -m benchmarks.space_latency                        # the MiniLM default, 24 pairs per start
    python -m benchmarks.space_latency --fresh-model          # also without the fine-tuned MiniLM cache (fine-tunes)
    python -m benchmarks.space_latency --kind tiny --max-train-samples 600     # a quick smoke run
    python -m benchmarks.space_latency --quality ~/.cache/hf_fastif/space_default/minilm   # what the settings cost

Starts ``spaces_demo/app.py`` on a local port twice on one Space cache (``HF_FASTIF_SPACE_CACHE``, a fresh temporary
folder unless --cache-dir is given): first with no cached table (it is built), then with the table and the engine's
caches from the first start. For each start it reports the seconds from launching the process to the port being open
and to ``/status`` saying ready, then sends every pair of `PAIRS` (short and long sentences, rare and made-up words,
an emoji, numbers; at least 20) through ``/explain`` with `gradio_client`, one at a time, and reports the median and
the 95th percentile of the wall time a client waits (queue and HTTP included) and of the server's own computation.
Prints a markdown table (and writes it with the raw numbers as JSON to --json).

``--quality BUILD`` instead measures, in this process, what the live settings cost in agreement on a built default
(the app's cache folder; built now if missing): the live engine's influence on the table's test rows (arnoldi
s_test, k gradient-index candidates) against a full scan of every training row with s_test by CG, and each of the two
approximations alone (`hf_fastif.quality.agreement`: Spearman on the scored rows, recall@10 of the reference's most
helpful / harmful rows).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gradio_client import Client
from gradio_client.exceptions import AppError

from hf_fastif.utils import markdown_table, to_json

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "spaces_demo" / "app.py"
LABELS = ("entailment", "non_entailment")
PAIRS: list[tuple[str, str, str]] = [
    ("The doctor helped the judge.", "The judge helped the doctor.", "non_entailment"),
    ("The judge slept.", "The judge slept.", "entailment"),
    ("Cats sleep.", "Dogs bark.", "non_entailment"),
    ("The lawyer near the senator resigned.", "The senator resigned.", "non_entailment"),
    ("The artist and the banker laughed.", "The banker laughed.", "entailment"),
    ("If the tourist arrived, the manager smiled.", "The manager smiled.", "non_entailment"),
    ("The xylophonist serenaded the flibbertigibbet at dawn.", "Someone played music.", "entailment"),
    ("Quantum chromodynamics describes how gluons bind quarks.", "Gluons bind quarks.", "entailment"),
    ("The zorblax quibbled with the snarfwhistle.", "The snarfwhistle quibbled.", "non_entailment"),
    ("The chef 🙂 cooked dinner for 12 guests.", "The chef cooked dinner.", "entailment"),
    ("Unquestionably, the secretary's photosynthesis-inspired proposal was rejected.",
     "The proposal was rejected.", "entailment"),
    ("The student who the professor praised left early.", "The professor left early.", "non_entailment"),
    ("The scientist believed the athlete lied.", "The athlete lied.", "non_entailment"),
    ("Since the actor danced, the audience cheered.", "The actor danced.", "entailment"),
    ("The president was advised by the doctor.", "The doctor advised the president.", "entailment"),
    ("Without a doubt the manager paid the tourist.", "The manager paid the tourist.", "entailment"),
    ("A man is playing a guitar on a crowded stage while the audience, soaked by the evening rain that had started "
     "an hour earlier, keeps cheering and singing along to every song of the band's long and loud encore set.",
     "A musician performs in the rain.", "entailment"),
    ("Although the committee had reviewed the applications for several weeks and interviewed every candidate twice, "
     "the final decision about who would lead the new research group was postponed until after the holidays.",
     "The committee made its final decision before the holidays.", "non_entailment"),
    ("Hi.", "Hello.", "non_entailment"),
    ("The 3 pilots flew 400 km on 2 March 2021.", "The pilots flew.", "entailment"),
    ("Perhaps the banker called the author.", "The banker called the author.", "non_entailment"),
    ("The dancer, who the senator met, smiled.", "The senator smiled.", "non_entailment"),
    ("Grüße aus München: der Richter schlief.", "The judge slept.", "non_entailment"),
    ("The tourist by the actors waited.", "The actors waited.", "non_entailment"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def start(env: dict, app_args: list[str], log: Path, timeout: float) -> tuple[subprocess.Popen, str, dict]:
    """Launch the app; returns ``(process, url, times)`` with ``port_s`` / ``ready_s`` since launch and the app's
    own ``/status``."""
    port = _free_port()
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(port), *app_args],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url, times = f"http://127.0.0.1:{port}/", {}
    while not _port_open(port):
        if process.poll() is not None or time.perf_counter() - began > timeout:
            raise RuntimeError(f"The app did not open its port (log: {log}).")
        time.sleep(0.05)
    times["port_s"] = time.perf_counter() - began
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    while True:
        status = client.predict(api_name="/status")
        if status["ready"] or status["failed"]:
            break
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"The app was not ready within {timeout} s (stage: {status['stage']}; log: {log}).")
        time.sleep(0.1)
    if status["failed"]:
        raise RuntimeError(f"The app could not start: {status['error']} (log: {log}).")
    times["ready_s"] = time.perf_counter() - began
    return process, url, times | {"status": status}


def explain_all(url: str, pairs, k: int, n: int) -> list[dict]:
    """Each pair through ``/explain``: the client's wall seconds and the server's ("Computed in ... s"), or the
    message of a refused pair (the tiny model's word-level vocabulary does not know most English words)."""
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    out = []
    for premise, hypothesis, label in pairs:
        began = time.perf_counter()
        try:
            _, summary, *_ = client.predict(premise, hypothesis, label, k, n, api_name="/explain")
        except AppError as err:
            out.append({"premise": premise, "client_s": time.perf_counter() - began, "refused": str(err)})
            continue
        wall = time.perf_counter() - began
        server = float(re.search(r"Computed in ([0-9.]+) s", summary).group(1))
        steps = re.search(r"Steps \(s\): (.*)", summary)
        stages = {name: float(value) for name, value in re.findall(r"([a-z_]+) ([0-9.]+)", steps.group(1))} if steps \
            else {}
        out.append({"premise": premise, "client_s": wall, "server_s": server, "stages": stages,
                    "pieces": int(re.search(r"\((\d+) word pieces\)", summary).group(1))})
    return out


def summarize(values: list[float]) -> tuple[float, float, float]:
    """Median, 95th percentile and maximum."""
    return float(np.median(values)), float(np.percentile(values, 95)), float(np.max(values))


def quality(build: Path, kind: str, max_train_samples: int | None, k: int) -> str:
    """Markdown: agreement and seconds per test row of the live settings, arnoldi on every row, and CG on the k
    candidates, against CG on every row, over the test rows of the default build in ``build``."""
    # torch and the model are needed only here: the latency runs drive the app in subprocesses
    from datasets import Dataset

    from hf_fastif.data import tokenize_nli
    from hf_fastif.influence import default_arguments
    from hf_fastif.quality import agreement, dense_reference, influence_by_test
    from hf_fastif.space import load_default

    state = load_default(build, kind=kind, max_train_samples=max_train_samples)
    explainer = state.explainer
    tests = state.tests.sort_values("test_id")
    if tests.test_id.tolist() != list(range(len(tests))):
        raise ValueError(f"{build}: expected test ids 0..{len(tests) - 1}.")
    test = tokenize_nli(Dataset.from_pandas(tests[["premise", "hypothesis", "label"]].astype({"label": int}),
                                            preserve_index=False), explainer.tokenizer)
    engine, train, live = explainer.engine, explainer.train_tokenized, explainer.settings
    variants = {"live: arnoldi, gradient candidates": {"influence_knn_k": k},
                "arnoldi, every row": {"influence_knn_k": None},
                "CG, gradient candidates": {"influence_solver": "cg", "influence_knn_k": k},
                "reference: CG, every row": {"influence_solver": "cg", "influence_knn_k": None}}
    tables, seconds = {}, {}
    for name, change in variants.items():
        engine.args = default_arguments(**live | change, disable_tqdm=True)
        engine.compute_influences(train, test.select([0]))  # warm: the solver's once-per-model work
        began = time.perf_counter()
        tables[name] = engine.compute_influences(train, test)
        seconds[name] = (time.perf_counter() - began) / len(test)
    engine.args = explainer._arguments(live["influence_knn_k"])
    reference = dense_reference(influence_by_test(tables["reference: CG, every row"], len(test)), len(train))
    rows = []
    for name, table in tables.items():
        found = agreement(reference, influence_by_test(table, len(test)), ns=(10,))
        rows.append([name, f"{seconds[name]:.3f}", f"{found['spearman']:.3f}", f"{found['spearman_min']:.3f}",
                     f"{found['recall@10 helpful']:.2f}", f"{found['recall@10 harmful']:.2f}"])
    return (f"{len(test)} test rows, {len(train):,} training rows, k = {k}, λ = {engine.args.influence_lambda:g}, "
            f"{explainer.num_influence_parameters:,} influence parameters\n\n"
            + markdown_table(["s_test / candidates", "s per test row", "Spearman", "Spearman min",
                              "recall@10 helpful", "recall@10 harmful"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="minilm", choices=["minilm", "tiny"], help="The embedded default's model.")
    parser.add_argument("--max-train-samples", type=int, default=None, help="Its training rows (default 2,000).")
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help=f"Pairs per start (at most {len(PAIRS)}).")
    parser.add_argument("--k", type=int, default=100, help="Candidates per pair.")
    parser.add_argument("--n", type=int, default=5, help="Rows per side.")
    parser.add_argument("--cache-dir", default=None, help="The Space cache (default: a fresh temporary folder).")
    parser.add_argument("--fresh-model", action="store_true",
                        help="Also a fresh HF_FASTIF_CACHE: the first start extracts and fine-tunes MiniLM.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds to wait for a start.")
    parser.add_argument("--json", default=None, help="Write the numbers here.")
    parser.add_argument("--quality", default=None, metavar="BUILD",
                        help="Instead of the latency runs: the agreement of the live settings on this default build.")
    args = parser.parse_args(argv)
    if args.quality:
        load = os.getloadavg()
        print(quality(Path(args.quality).expanduser(), args.kind, args.max_train_samples, args.k))
        print(f"\nload average at the start {load[0]:.2f}, at the end {os.getloadavg()[0]:.2f}")
        return 0
    if not 20 <= args.pairs <= len(PAIRS):
        parser.error(f"--pairs must be between 20 and {len(PAIRS)}.")
    scratch = Path(tempfile.mkdtemp(prefix="space_latency_"))
    cache = Path(args.cache_dir) if args.cache_dir else scratch / "space_cache"
    if cache.exists() and any(cache.iterdir()):
        parser.error(f"--cache-dir {cache} is not empty: the first start must find no cached table.")
    env = dict(os.environ, HF_FASTIF_SPACE_CACHE=str(cache), GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for key in ("HF_FASTIF_TABLE", "HF_FASTIF_MODEL", "HF_FASTIF_EMBEDDED_MODEL"):
        env.pop(key, None)
    if args.fresh_model:
        env["HF_FASTIF_CACHE"] = str(scratch / "hf_fastif_cache")
    load = os.getloadavg()
    print(f"load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    app_args = ["--embedded_model", args.kind] + (["--max_train_samples", str(args.max_train_samples)]
                                                  if args.max_train_samples else [])
    runs = []
    try:
        for label in ("no cached table", "cached table and engine caches"):
            process, url, times = start(env, app_args, scratch / f"app-{len(runs)}.log", args.timeout)
            try:
                calls = explain_all(url, PAIRS[: args.pairs], args.k, args.n)
            finally:
                process.terminate()
                process.wait(timeout=60)
            runs.append({"start": label, **times, "calls": calls})
            print(f"{label}: port {times['port_s']:.1f} s, ready {times['ready_s']:.1f} s, "
                  f"stages {[(s['stage'][:40], s['seconds']) for s in times['status']['stages']]}", flush=True)
    finally:
        if not args.cache_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for run in runs:
        answered = [c for c in run["calls"] if "refused" not in c]
        client = summarize([c["client_s"] for c in answered])
        server = summarize([c["server_s"] for c in answered])
        rows.append([run["start"], f"{run['port_s']:.1f}", f"{run['ready_s']:.1f}", len(answered),
                     len(run["calls"]) - len(answered), *(f"{x:.2f}" for x in client), *(f"{x:.2f}" for x in server)])
    table = markdown_table(["start", "port open s", "ready s", "pairs", "refused", "client median s", "client p95 s",
                            "client max s", "server median s", "server p95 s", "server max s"], rows)
    stage_rows = []
    for run in runs:
        answered = [c for c in run["calls"] if c.get("stages")]
        if answered:
            names = list(answered[0]["stages"])
            stage_rows.append([run["start"], *(f"{np.median([c['stages'][s] for c in answered]):.3f}" for s in names)])
    stages = markdown_table(["start (median s per step)", *names], stage_rows) if stage_rows else ""
    load = os.getloadavg()
    print(f"\n{args.kind}, k={args.k}, n={args.n}, {os.cpu_count()} CPUs, load average {load[0]:.1f} / "
          f"{load[1]:.1f} / {load[2]:.1f}\n")
    print(table)
    print("\n" + stages)
    if args.json:
        Path(args.json).write_text(to_json({"kind": args.kind, "k": args.k, "n": args.n, "runs": runs,
                                            "table": table, "stages": stages, "load_average_end": load},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
