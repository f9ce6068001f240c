"""The correction protocol's mechanics on a tiny model: selection, anchors, carry-over, fresh copies, outputs."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from hf_fastif import InfluenceEngine, InfluenceTable
from hf_fastif import engine as engine_module
from hf_fastif.applications import (
    STRATEGIES,
    CorrectionArguments,
    HansEvaluator,
    run_correction,
    select_points,
    sgd_step,
)
from hf_fastif.applications import correction as correction_module
from hf_fastif.applications.common import check_num_labels, predict
from hf_fastif.applications.correction import sample_anchors


def _table():
    return InfluenceTable.from_arrays([0] * 6, [10, 11, 12, 13, 14, 15], [0.5, -2.0, 0.1, -0.3, 3.0, -1.0])


def test_select_points_helpful_is_most_negative_harmful_most_positive():
    rng = np.random.default_rng(0)
    ids, influence = select_points(_table(), "helpful", 3, rng, 100)
    assert ids.tolist() == [11, 15, 13] and influence.tolist() == [-2.0, -1.0, -0.3]
    ids, influence = select_points(_table(), "harmful", 2, rng, 100)
    assert ids.tolist() == [14, 10] and influence.tolist() == [3.0, 0.5]
    ids, influence = select_points(None, "anchors", 3, rng, 100, anchor_ids=[4, 7, 9])
    assert ids.tolist() == [4, 7, 9] and influence is None


def test_select_points_random_is_seeded_and_distinct():
    a, _ = select_points(None, "random", 10, np.random.default_rng(1), 1000)
    b, _ = select_points(None, "random", 10, np.random.default_rng(1), 1000)
    c, _ = select_points(None, "random", 10, np.random.default_rng(2), 1000)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist() and len(set(a.tolist())) == 10
    with pytest.raises(ValueError, match="Unknown strategy"):
        select_points(None, "best", 3, np.random.default_rng(0), 10)


def test_sample_anchors_come_from_the_heuristic():
    heuristics = np.array(["a", "b", "a", "c", "a", "b"], dtype=object)
    rows = sample_anchors(heuristics, "a", 2, np.random.default_rng(0))
    assert set(heuristics[rows]) == {"a"} and len(set(rows.tolist())) == 2
    with pytest.raises(ValueError, match="fewer than num_anchors"):
        sample_anchors(heuristics, "c", 2, np.random.default_rng(0))


def test_sgd_step_is_plain_sgd_on_the_influence_parameters(trained, nli, args):
    model = copy.deepcopy(trained)
    rows = nli["train"].select(range(4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = nli["collator"]([{k: rows[i][k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
                             for i in range(4)])
    reference = copy.deepcopy(trained)
    loss = reference(**batch).loss
    loss.backward()
    sgd_step(model, rows, 0.5, args, data_collator=nli["collator"])
    for name, p in model.named_parameters():
        selected = any(s in name for s in ("encoder.layer.1.", "pooler.", "classifier."))
        expected = before[name] - 0.5 * dict(reference.named_parameters())[name].grad if selected else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6)


def test_sgd_step_descends_the_loss_influence_ranks_by(trained, nli, args):
    """With the Trainer's label smoothing, influence's loss is smoothed; the correction's SGD step descended the
    plain cross-entropy (0.04 off the smoothed gradient on the tiny model's head)."""
    import torch.nn.functional as F

    smoothed = dataclasses.replace(args, label_smoothing_factor=0.3)
    model, reference = copy.deepcopy(trained), copy.deepcopy(trained)
    rows = nli["train"].select(range(4))
    batch = nli["collator"]([{k: rows[i][k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
                             for i in range(4)])
    logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits
    F.cross_entropy(logits, batch["labels"], label_smoothing=0.3).backward()
    sgd_step(model, rows, 0.5, smoothed, data_collator=nli["collator"])
    expected = trained.classifier.weight.detach() - 0.5 * reference.classifier.weight.grad
    torch.testing.assert_close(model.classifier.weight.detach(), expected, rtol=1e-4, atol=1e-6)


def test_evaluator_matches_a_manual_accuracy(trained, nli, args):
    evaluator = HansEvaluator(nli["test"], nli["collator"])
    predictions = predict(trained, nli["test"], nli["collator"]).argmax(-1)
    labels, heuristics = np.array(nli["test"]["labels"]), np.array(nli["test"]["heuristic"])
    result = evaluator(trained)
    assert result["accuracy"] == pytest.approx(np.mean(predictions == labels))
    for h in ("lexical_overlap", "constituent"):
        rows = heuristics == h
        assert result[f"accuracy_{h}"] == pytest.approx(np.mean(predictions[rows] == labels[rows]))
        assert evaluator(trained, h)[f"accuracy_{h}"] == result[f"accuracy_{h}"]
    # through an engine's cached trunk: the same logits and results, also after the top has moved
    model = copy.deepcopy(trained)
    with InfluenceEngine(model, args, data_collator=nli["collator"]) as engine:
        torch.testing.assert_close(torch.from_numpy(predict(model, nli["test"], engine=engine)),
                                   torch.from_numpy(predict(model, nli["test"], nli["collator"])), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            model.classifier.bias.add_(torch.tensor([0.5, -0.5]))
        moved = evaluator(model, "constituent", engine=engine)
        assert moved["accuracy_constituent"] == pytest.approx(evaluator(model, "constituent")["accuracy_constituent"])
        assert moved["loss"] == pytest.approx(evaluator(model, "constituent")["loss"], rel=1e-4)
        with pytest.raises(ValueError, match="same model object"):
            predict(trained, nli["test"], engine=engine)


def test_check_num_labels_names_the_fix(trained):
    three = copy.deepcopy(trained)
    three.config.num_labels = 3
    with pytest.raises(ValueError, match="2-label"):
        check_num_labels(three, 2, "HANS correction")
    flipped = copy.deepcopy(trained)
    flipped.config.id2label = {0: "non_entailment", 1: "entailment"}
    with pytest.raises(ValueError, match="0 = entailment"):
        check_num_labels(flipped, 2, "HANS correction")


def test_run_correction_protocol_mechanics(trained, nli, data, args, monkeypatch):
    """Two steps per run: the model carries over between steps, every run starts from a fresh copy of the
    original, anchors come from the run's heuristic, helpful / harmful follow the influence's sign, and the
    original model is untouched."""
    original = {n: p.detach().clone() for n, p in trained.named_parameters()}
    calls = []
    real_step = correction_module.sgd_step

    def spy(model, rows, learning_rate, step_args, **kwargs):
        calls.append((id(model), model.classifier.weight.detach().clone()))
        out = real_step(model, rows, learning_rate, step_args, **kwargs)
        calls[-1] += (model.classifier.weight.detach().clone(),)
        return out

    monkeypatch.setattr(correction_module, "sgd_step", spy)
    heuristics = ["lexical_overlap", "constituent"]
    protocol = CorrectionArguments(heuristics=heuristics, num_steps=2, num_anchors=4, num_points=3,
                                   correction_learning_rate=0.5, replicas=1)
    result = run_correction(trained, data, args, protocol, progress=False)
    for name, p in trained.named_parameters():
        torch.testing.assert_close(p.detach(), original[name])
    assert len(result.runs) == len(heuristics) * len(STRATEGIES) and len(calls) == 2 * len(result.runs)
    for r in range(len(result.runs)):
        (model_1, start_1, end_1), (model_2, start_2, _) = calls[2 * r], calls[2 * r + 1]
        assert model_1 == model_2  # one model per run, carried from step to step
        torch.testing.assert_close(start_1, original["classifier.weight"])  # a fresh copy per run
        torch.testing.assert_close(start_2, end_1)  # step 2 starts where step 1 ended
        assert not torch.equal(end_1, start_1)
    validation_heuristics = np.array(nli["validation"]["heuristic"])
    by_strategy = {}
    for run in result.runs:
        assert len(run["accuracy_steps"]) == 2 and len(run["steps"]) == 2
        for step in run["steps"]:
            assert set(validation_heuristics[step["anchors"]]) == {run["heuristic"]}
            assert len(step["selected"]) == (4 if run["strategy"] == "anchors" else 3)
        by_strategy.setdefault(run["strategy"], []).append(run)
    for run in by_strategy["helpful"]:
        values = run["steps"][0]["influence"]
        assert values == sorted(values) and values[0] < 0
    for run in by_strategy["harmful"]:
        values = run["steps"][0]["influence"]
        assert values == sorted(values, reverse=True) and values[0] > 0
    # the same anchors for every strategy of a (heuristic, replica); random rows differ from the helpful ones
    for h in heuristics:
        runs = {r["strategy"]: r for r in result.runs if r["heuristic"] == h}
        assert len({tuple(r["steps"][0]["anchors"]) for r in runs.values()}) == 1
        assert runs["random"]["steps"][0]["selected"] != runs["helpful"]["steps"][0]["selected"]
        assert runs["anchors"]["steps"][0]["selected"] == runs["anchors"]["steps"][0]["anchors"]
        # (the anchors' ids are HANS validation rows, not candidates: a pool's `pool_rows` misread them)
        assert {s: r["steps"][0]["selected_from"] for s, r in runs.items()} == {
            s: "hans_validation" if s == "anchors" else "candidates" for s in runs}
    summary = result.summary()
    assert set(summary) == set(heuristics) and set(summary["constituent"]) == set(STRATEGIES)
    markdown = result.to_markdown()
    assert "| lexical_overlap |" in markdown and "helpful (Δ)" in markdown


def test_run_correction_candidate_pool_and_replicas(trained, nli, data, args):
    protocol = CorrectionArguments(strategies=["helpful", "random"], heuristics=["subsequence"], num_steps=1,
                                   num_anchors=3, num_points=2, correction_learning_rate=0.1, replicas=2)
    result = run_correction(trained, dataclasses.replace(data, candidates=nli["pool"]), args, protocol, progress=False)
    assert [r["replica"] for r in result.runs] == [0, 0, 1, 1]
    assert all(max(r["steps"][0]["selected"]) < len(nli["pool"]) for r in result.runs)
    first, second = result.runs[0]["steps"][0]["anchors"], result.runs[2]["steps"][0]["anchors"]
    assert first != second  # replicas draw other anchors
    assert result.settings["candidates"] == "pool"


def _pairs(rows) -> list[tuple]:
    return list(zip(rows["premise"], rows["hypothesis"], strict=True))


def test_each_step_reads_its_own_split_and_seed(trained, nli, data, args, monkeypatch):
    """What each step of a run reads, which no outcome in the other tests pins (a review changed each in a scratch
    copy and every application test still passed): the anchors come from hans_validation, the accuracy from
    hans_test, the stepped rows from the candidates (the pool here, not the training rows), and LiSSA's draws
    differ between replicas but are the same for helpful and harmful of one replica."""
    seen = {"anchors": [], "seeds": [], "stepped": []}
    real_influence, real_step = correction_module.step_influence, correction_module.sgd_step

    def step_influence(engine, train, anchors, candidates, where):
        seen["anchors"].append(_pairs(anchors))
        seen["seeds"].append((where, engine.args.influence_seed))
        return real_influence(engine, train, anchors, candidates, where)

    def sgd_step(model, rows, *a, **kw):
        seen["stepped"].append(_pairs(rows))
        return real_step(model, rows, *a, **kw)

    monkeypatch.setattr(correction_module, "step_influence", step_influence)
    monkeypatch.setattr(correction_module, "sgd_step", sgd_step)
    pool = nli["pool"]
    protocol = CorrectionArguments(strategies=["helpful", "harmful"], heuristics=["constituent"], num_steps=1,
                                   num_anchors=3, num_points=2, correction_learning_rate=0.1, replicas=2)
    result = run_correction(trained, dataclasses.replace(data, candidates=pool), args, protocol, progress=False)
    validation, test = set(_pairs(data.hans_validation)), set(_pairs(data.hans_test))
    assert all(set(a) <= validation and not set(a) & test for a in seen["anchors"])
    assert [set(s) for s in seen["stepped"]] == [set(_pairs(pool.select(r["steps"][0]["selected"])))
                                                 for r in result.runs]
    assert not set().union(*map(set, seen["stepped"])) & set(_pairs(data.train))
    seeds = [seed for _, seed in seen["seeds"]]  # helpful, harmful of replica 0, then of replica 1
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    expected = HansEvaluator(data.hans_test, data.collator)(trained)
    assert result.before["accuracy"] == pytest.approx(expected["accuracy"], abs=1.5 / len(data.hans_test))  # (a tie)
    assert result.before["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_a_second_strategy_after_the_weights_are_restored_runs(trained, data, args):
    """Each run restores the working copy in place (``load_state_dict``) and draws with the same seed, so with one
    step the second strategy's influence call had the first's key: the engine served LiSSA's graphs kept from it,
    whose saved weights the step and the restore had written in place, and autograd refused them ("modified by an
    inplace operation"). The graphs are keyed on the weights' in-place versions too."""
    protocol = CorrectionArguments(strategies=["helpful", "harmful"], heuristics=["lexical_overlap"], num_steps=1,
                                   num_anchors=4, num_points=3, correction_learning_rate=0.5, replicas=1)
    result = run_correction(trained, data, args, protocol, progress=False)
    assert [r["strategy"] for r in result.runs] == ["helpful", "harmful"]
    helpful, harmful = (r["steps"][0]["selected"] for r in result.runs)
    assert helpful != harmful  # each ranked its own end of the same influence table


def test_one_engine_for_the_protocol_computes_the_trunk_states_once(trained, data, args, monkeypatch):
    """Influence and evaluation go through one InfluenceEngine, bound to one working copy of the model (restored
    before every run; the caller's model is never stepped) and asked once per influence step; the frozen trunk's
    states of the training rows and of the test split are computed once for the whole protocol."""
    made, built = [], []
    real = correction_module.InfluenceEngine

    class Spy(real):
        def __init__(self, model, *a, **kw):
            super().__init__(model, *a, **kw)
            self.calls = self.logit_calls = 0
            made.append(self)

        def compute_influences(self, *a, **kw):
            self.calls += 1
            return super().compute_influences(*a, **kw)

        def logits(self, *a, **kw):
            self.logit_calls += 1
            return super().logits(*a, **kw)

    class CacheSpy(engine_module.trunk_states.TrunkCache):
        def __init__(self, split, batcher, *a, **kw):
            built.append(len(batcher))
            super().__init__(split, batcher, *a, **kw)

    monkeypatch.setattr(correction_module, "InfluenceEngine", Spy)
    monkeypatch.setattr(engine_module.trunk_states, "TrunkCache", CacheSpy)
    protocol = CorrectionArguments(strategies=["helpful", "harmful", "random"], heuristics=["constituent"],
                                   num_steps=3, num_anchors=3, num_points=2, correction_learning_rate=0.1, replicas=2)
    result = run_correction(trained, data, args, protocol, progress=False)
    assert len(made) == 1 and made[0].model is not trained
    assert made[0].calls == 2 * 3 * 2  # helpful and harmful, 3 steps, 2 replicas
    assert made[0].logit_calls == 1 + 6 * (3 + 1)  # before; after every step and at the end of each of the 6 runs
    assert built.count(len(data.train)) == 1 and built.count(len(data.hans_test)) == 1
    assert all(n == 3 for n in built if n not in (len(data.train), len(data.hans_test)))  # each step's anchors
    assert all(r["accuracy_steps"] and r["steps"] for r in result.runs)


def test_run_correction_rejects_bad_settings(trained, data, args):
    with pytest.raises(ValueError, match="Unknown strategies"):
        CorrectionArguments(strategies=["best"])
    for field, value, message in (("strategies", ["best"], "Unknown strategies"), ("num_steps", 0, "num_steps must"),
                                  ("replicas", -1, "replicas must"), ("correction_learning_rate", 0.0, "number > 0"),
                                  # inf stepped the weights to NaN, and the argmax of NaN logits read as 50% accuracy
                                  ("correction_learning_rate", float("inf"), "finite number > 0")):
        protocol = CorrectionArguments()
        setattr(protocol, field, value)  # changed after construction: run_correction checks again, before any work
        with pytest.raises(ValueError, match=message):
            run_correction(trained, data, args, protocol)
    with pytest.raises(ValueError, match="no rows in data.hans_validation"):
        run_correction(trained, data, args, CorrectionArguments(heuristics=["negation"]))
    with pytest.raises(ValueError, match="fewer than num_anchors"):
        run_correction(trained, data, args, CorrectionArguments(num_anchors=1000))
    with pytest.raises(ValueError, match="needs data.hans_test"):
        run_correction(trained, dataclasses.replace(data, hans_test=None), args, CorrectionArguments())
    # k below the rows a step takes: helpful and harmful stepped on the same k rows, without a word
    with pytest.raises(ValueError, match="fewer than 2 × num_points = 20: 'helpful' and 'harmful' would share 15 rows"):
        run_correction(trained, data, dataclasses.replace(args, influence_knn_k=5), CorrectionArguments(num_points=10))
    # k between num_points and twice it: the groups shared rows (k 15, 10 each: 5 in both)
    with pytest.raises(ValueError, match="would share 5 rows"):
        run_correction(trained, data, dataclasses.replace(args, influence_knn_k=15), CorrectionArguments(num_points=10))


def test_a_step_that_would_make_the_weights_non_finite_is_refused_and_leaves_them(trained, data, args):
    """A finite but huge learning rate (1e30) stepped the weights to inf / NaN; the run went on, and the accuracy of
    the NaN logits' argmax was reported (50.0, +0.0) with no warning."""
    model = copy.deepcopy(trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="would make .* non-finite .* too large; the weights are unchanged"):
        sgd_step(model, data.train.select(range(4)), 1e300, args, data_collator=data.collator)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits on .* HANS rows are not finite"):
        HansEvaluator(data.hans_test, data.collator)(model)


def test_select_points_steps_on_n_rows_whatever_their_sign():
    # 3 of the 6 candidates are helpful; the protocol still steps on n rows: the lowest influences
    ids, influence = select_points(_table(), "helpful", 5, np.random.default_rng(0), 100)
    assert ids.tolist() == [11, 15, 13, 12, 10] and influence.tolist() == [-2.0, -1.0, -0.3, 0.1, 0.5]


def test_a_heuristic_draws_the_same_rows_alone_or_among_others(trained, data, args):
    """Seeds come from the heuristic itself, not its place in ``heuristics``: one cell of a full run can be
    reproduced alone (before, constituent's anchors and random rows changed with the list)."""
    def constituent_runs(heuristics):
        protocol = CorrectionArguments(heuristics=heuristics, strategies=["random"], num_steps=1, num_anchors=4,
                                       num_points=3, correction_learning_rate=0.5, replicas=1)
        runs = run_correction(trained, data, args, protocol, progress=False).runs
        return [(r["steps"][0]["anchors"], r["steps"][0]["selected"]) for r in runs if r["heuristic"] == "constituent"]

    assert constituent_runs(["constituent"]) == constituent_runs(["lexical_overlap", "constituent"])


def test_a_misspelt_heuristic_is_refused_when_the_arguments_are_made():
    """At parse time, before a recipe fine-tunes anything (it failed after the training before)."""
    with pytest.raises(ValueError, match="Unknown heuristic 'lexical-overlap': did you mean 'lexical_overlap'"):
        CorrectionArguments(heuristics=["lexical-overlap"])
    assert CorrectionArguments(heuristics=["my_own_heuristic"]).heuristics == ["my_own_heuristic"]  # not a typo


def test_a_repeated_strategy_runs_once(caplog):
    """A repeat ran twice per replica and counted as extra replicas ("mean ± std over 2 replicas", std 0)."""
    from hf_fastif.applications import CorrectionArguments

    with caplog.at_level("WARNING", logger="hf_fastif.applications.correction"):
        protocol = CorrectionArguments(strategies=["random", "random", "anchors"], replicas=1)
    assert protocol.strategies == ["random", "anchors"] and "names ['random'] more than once" in caplog.text


def test_the_plot_shows_before_and_after_when_steps_were_not_evaluated():
    """Without eval_every_step both panels of each heuristic were empty, though before and after were known."""
    from hf_fastif.applications.correction import CorrectionResult

    runs = [dict(heuristic="constituent", strategy=strategy, replica=0, accuracy_before=0.5, accuracy_after=after,
                 accuracy_steps=[], loss_before=0.7, loss_after=0.6, loss_steps=[])
            for strategy, after in (("helpful", 0.6), ("random", 0.5))]
    figure = CorrectionResult({"num_steps": 4, "correction_learning_rate": 0.01}, {}, runs).plot()
    accuracy, loss = figure.axes[0], figure.axes[1]
    assert [line.get_label() for line in accuracy.get_lines()] == ["helpful", "random"]
    assert accuracy.get_lines()[0].get_xydata().tolist() == [[0.0, 50.0], [4.0, 60.0]]
    assert loss.get_lines()[1].get_xydata().tolist() == [[0.0, 0.7], [4.0, 0.6]]


def test_the_report_counts_the_rows_of_each_strategys_sign():
    """"Helpful" takes the most negative candidates whatever their sign: with few or one-signed candidates it stepped
    on harmful rows (k 15: all 10 of a step), and the correction report did not say so (simulatability's did)."""
    from hf_fastif.applications.correction import CorrectionResult

    def run(strategy, influence):
        return {"heuristic": "h", "strategy": strategy, "replica": 0, "accuracy_before": 0.5, "accuracy_after": 0.5,
                "loss_before": 1.0, "loss_after": 1.0, "accuracy_steps": [], "steps": [{"influence": influence}]}

    result = CorrectionResult(settings={"num_steps": 1, "correction_learning_rate": 0.01}, before={},
                              runs=[run("helpful", [-2.0, -1.0, 0.5]), run("harmful", [3.0, 1.0, 0.2]),
                                    run("random", None)])
    assert result.signed_rows() == {"helpful": (2, 3), "harmful": (3, 3)}
    assert ("Rows of the strategy's sign, over every step: helpful (influence < 0) 2/3, harmful (influence > 0) 3/3; "
            "the extremes include rows of the other sign") in result.to_markdown()


def test_a_step_whose_influence_lissa_refuses_runs_again_at_a_larger_scale(trained, data, args, monkeypatch):
    """The steps move the model, and its curvature can leave what the settings were chosen for (the MiniLM demo, four
    steps into a helpful run: LiSSA's estimate came back pointing away from the anchors' gradient). A refused step is
    run again with the scale, so λ, 4x larger (damping and J kept); the step records it, the report says so, and the
    next step starts from the settings given again."""
    from hf_fastif.solvers.lissa import LissaDivergenceError

    real, scales = InfluenceEngine.compute_influences, []

    def refusing_once(self, *a, **kw):
        scales.append((self.args.influence_scale, self.args.influence_damping, self.args.influence_recursion_depth))
        if len(scales) == 1:
            raise LissaDivergenceError("LiSSA's estimate points away from the test gradient. (a test's refusal)")
        return real(self, *a, **kw)

    monkeypatch.setattr(InfluenceEngine, "compute_influences", refusing_once)
    protocol = CorrectionArguments(strategies=["helpful"], heuristics=["lexical_overlap"], num_steps=2, num_anchors=4,
                                   num_points=3, correction_learning_rate=0.5, replicas=1)
    result = run_correction(trained, data, args, protocol, progress=False)
    scale, damping, depth = args.influence_scale, args.influence_damping, args.influence_recursion_depth
    assert scales == [(scale, damping, depth), (4 * scale, damping, depth), (scale, damping, depth)]
    first, second = result.runs[0]["steps"]
    assert first["influence_retries"] == 1 and first["influence_lambda"] == pytest.approx(4 * scale * damping)
    assert "influence_retries" not in second and len(first["selected"]) == 3
    assert result.retried_steps() == (1, 2)
    assert (f"Influence run again with a larger scale at 1 of 2 steps (LiSSA refused it at the stepped model's "
            f"curvature; λ {4 * scale * damping:.3g} there") in result.to_markdown()


def test_a_step_lissa_refuses_at_every_scale_stops_the_protocol_with_the_reason(trained, data, args, monkeypatch):
    from hf_fastif.solvers.lissa import LissaDivergenceError

    scales = []

    def refusing(self, *a, **kw):
        scales.append(self.args.influence_scale)
        raise LissaDivergenceError("H + λI is not positive definite: (a test's refusal)")

    monkeypatch.setattr(InfluenceEngine, "compute_influences", refusing)
    protocol = CorrectionArguments(strategies=["helpful"], heuristics=["lexical_overlap"], num_steps=1, num_anchors=4,
                                   num_points=3, correction_learning_rate=0.5, replicas=1)
    with pytest.raises(LissaDivergenceError, match=r"step 0 of helpful / lexical_overlap: LiSSA refused the influence "
                                                   r"3 times, .*not positive definite.*lower correction_learning_rate"):
        run_correction(trained, data, args, protocol, progress=False)
    assert scales == [args.influence_scale * 4**i for i in range(3)]
