"""InfluenceTrainer: training is the Trainer's (but for a loss that ignores num_items_in_batch); influence comes from the same engine."""

import numpy as np
import pytest
import torch
from transformers import Trainer

from hf_fastif import InfluenceArguments, InfluenceEngine, InfluenceTrainer, compute_influences
from tests.tiny import HEAD_ONLY, make_token_dataset, sgd_step, tiny_model


def arguments(tmp_path, **kw):
    return InfluenceArguments(**(dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=6,
                                      per_device_train_batch_size=8, learning_rate=1e-3, save_strategy="no", seed=0,
                                      logging_strategy="no", disable_tqdm=True, influence_solver="cg",
                                      influence_damping=0.05, influence_scale=20.0, influence_knn_k=8,
                                      influence_params=HEAD_ONLY["bert"]) | kw))


def test_swapping_trainer_changes_nothing_about_training(tmp_path, pad_collator):
    train = make_token_dataset(40, seed=0)
    trained = []
    for cls in (Trainer, InfluenceTrainer):
        model = tiny_model("bert", dtype=torch.float32)
        trainer = cls(model=model, args=arguments(tmp_path), train_dataset=train,
                      processing_class=pad_collator.tokenizer)
        trainer.train()
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert trained[0].keys() == trained[1].keys()
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=0, atol=0)
    assert any(not torch.equal(trained[0][k], tiny_model("bert", dtype=torch.float32).state_dict()[k])
               for k in trained[0])


@pytest.mark.parametrize("kind", ["bert", "gpt2-lm"])
def test_gradient_accumulation_steps_as_one_batch_whether_or_not_the_loss_reads_num_items(tmp_path, kind):
    """BERT's classification loss is its batch's mean and ignores num_items_in_batch, which its forward takes in
    **kwargs: the Trainer then skipped the division by gradient_accumulation_steps (an SGD step 2x too far with 2
    steps, the logged loss 2x, as under a 2-process launch); a causal LM's loss reads it and keeps the Trainer's
    way. Both: one batch of 4 rows and 2 accumulated batches of 2 take the same step."""
    rows = make_token_dataset(4, seed=3, min_len=6, max_len=6, causal=kind == "gpt2-lm")
    whole, whole_loss, _ = sgd_step(tiny_model(kind, dtype=torch.float32), rows, tmp_path / "a", 4)
    split, split_loss, trainer = sgd_step(tiny_model(kind, dtype=torch.float32), rows, tmp_path / "b", 2, accumulation=2)
    assert max(float(d.abs().max()) for d in whole.values()) > 1e-3
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert trainer.loss_reads_num_items is (kind == "gpt2-lm")
    assert trainer.model_accepts_loss_kwargs is (kind == "gpt2-lm")


def test_trainer_compute_influences_matches_the_function(tmp_path, pad_collator):
    train, test = make_token_dataset(40, seed=0), make_token_dataset(3, seed=1)
    model = tiny_model("bert")
    trainer = InfluenceTrainer(model=model, args=arguments(tmp_path), train_dataset=train,
                               processing_class=pad_collator.tokenizer)
    table = trainer.compute_influences(test)
    assert table.test_ids == [0, 1, 2] and len(table) == 3 * 8
    direct = compute_influences(model, train, test, trainer.args, data_collator=trainer.data_collator)
    np.testing.assert_allclose(table.to_pandas().influence, direct.to_pandas().influence, rtol=1e-12)
    anchors = trainer.compute_influences(test, combine="mean")
    assert anchors.test_ids == [0] and len(anchors) == 8
    helpful, harmful = anchors.helpful(0, 3), anchors.harmful(0, 3)
    assert helpful.influence.is_monotonic_increasing and harmful.influence.is_monotonic_decreasing
    assert anchors.metadata["combine"] == "mean" and anchors.metadata["lambda"] == 0.05 * 20.0


def test_a_streamed_training_set_is_refused_with_where_to_pass_its_copy(tmp_path, pad_collator):
    """A trainer trained on a stream was told to materialize it, not where the copy goes (the trainer keeps its own
    train_dataset): the message names train_dataset=, and the copy gives the numbers of the stored rows."""
    from datasets import Dataset

    train, test = make_token_dataset(40, seed=0), make_token_dataset(2, seed=1)
    stream = train.to_iterable_dataset()
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=arguments(tmp_path), train_dataset=stream,
                               processing_class=pad_collator.tokenizer)
    with pytest.raises(TypeError, match=r"This trainer.s train_dataset \(IterableDataset\) is not a datasets.Dataset; "
                                        r".*Dataset.from_generator.* Pass that copy as compute_influences\(\.\.\., "
                                        r"train_dataset=copy\)"):
        trainer.compute_influences(test)
    copy = Dataset.from_generator(lambda: iter(stream), features=stream.features)
    got = trainer.compute_influences(test, train_dataset=copy).to_pandas()
    expected = trainer.compute_influences(test, train_dataset=train).to_pandas()
    assert got.equals(expected)


def test_plain_training_arguments_are_accepted(tmp_path, pad_collator):
    from transformers import TrainingArguments

    train, test = make_token_dataset(20, seed=0), make_token_dataset(1, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=args, train_dataset=train,
                               processing_class=pad_collator.tokenizer)
    assert trainer.influence_args.influence_solver == "lissa"  # the paper's defaults
    trainer.influence_args.influence_knn_k = 5
    trainer.influence_args.influence_recursion_depth = 5
    trainer.influence_args.influence_scale = 100.0
    assert len(trainer.compute_influences(test)) == 5
    # converting them built a second TrainingArguments, whose device set-up reset accelerate's shared state: the
    # trainer's Accelerator then failed on train() and evaluate() ("no attribute `distributed_type`"), as any live
    # Accelerator did after an InfluenceEngine(model) without args
    trainer.args.max_steps, trainer.args.per_device_train_batch_size = 2, 4
    trainer.train()
    assert "eval_loss" in trainer.evaluate(train)
    InfluenceEngine(trainer.model, data_collator=pad_collator)
    trainer.train()
    assert "eval_loss" in trainer.evaluate(train)


def test_arguments_replaced_after_construction_are_the_ones_influence_reads(tmp_path, pad_collator):
    """The Trainer trains with whatever ``trainer.args`` is now; influence kept the arguments of ``__init__`` (a
    snapshot), so new damping, parameters and label smoothing were ignored (0.87 off their values). Arguments
    replaced by equal ones keep the held engine and its caches."""
    from transformers import TrainingArguments

    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert")
    trainer = InfluenceTrainer(model=model, args=arguments(tmp_path), train_dataset=train,
                               processing_class=pad_collator.tokenizer)
    trainer.compute_influences(test)
    engine = trainer.influence_engine()
    trainer.args = arguments(tmp_path)  # equal settings: the same engine, with its trunk states
    assert trainer.influence_engine() is engine and engine.args is trainer.args and engine._trunks
    trainer.args = arguments(tmp_path, influence_damping=1.0, influence_params=[r"classifier\."],
                             label_smoothing_factor=0.2)
    table = trainer.compute_influences(test)
    assert table.metadata["settings"]["influence_damping"] == 1.0 and table.metadata["lambda"] == 20.0
    assert table.metadata["settings"]["label_smoothing_factor"] == 0.2
    direct = compute_influences(model, train, test, trainer.args, data_collator=trainer.data_collator)
    np.testing.assert_allclose(table.to_pandas().influence, direct.to_pandas().influence, rtol=1e-12)
    # plain TrainingArguments: made into InfluenceArguments again when they change, keeping the influence_* settings
    # set on the trainer's influence_args
    plain = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer.args = TrainingArguments(**plain)
    trainer.influence_args.influence_solver, trainer.influence_args.influence_knn_k = "cg", None
    trainer.influence_args.influence_scale = 20.0
    assert trainer.compute_influences(test).metadata["settings"].get("label_smoothing_factor") is None
    trainer.args = TrainingArguments(**plain, label_smoothing_factor=0.2)
    table = trainer.compute_influences(test)
    assert table.metadata["settings"]["label_smoothing_factor"] == 0.2
    assert table.metadata["settings"]["influence_solver"] == "cg" and table.metadata["lambda"] == 5e-3 * 20.0
    direct = compute_influences(model, train, test, trainer.influence_args, data_collator=trainer.data_collator)
    np.testing.assert_allclose(table.to_pandas().influence, direct.to_pandas().influence, rtol=1e-12)


@pytest.mark.usefixtures("propagating")
def test_a_model_that_evaluate_converted_under_full_eval_is_named(tmp_path, pad_collator, caplog):
    """bf16_full_eval: the Trainer's evaluate() converts the model itself to bfloat16 in place, and influence ran on
    the rounded weights, warned of only as 'parameters are bfloat16'; the flag is named where it made that dtype, not
    where the model came in it."""
    import logging

    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)

    def trainer(model):
        return InfluenceTrainer(model=model, args=arguments(tmp_path, bf16_full_eval=True, max_steps=1),
                                train_dataset=train, eval_dataset=test, data_collator=pad_collator)

    named = "bf16_full_eval=True: the Trainer's evaluate() / predict() outside train() converted the model itself"
    with caplog.at_level(logging.WARNING):
        given = trainer(tiny_model("bert", dtype=torch.bfloat16))
        given.evaluate()
        given.compute_influences(test)
        assert named not in caplog.text
        model = tiny_model("bert", dtype=torch.float32)
        converted = trainer(model)
        converted.train()
        converted.compute_influences(test)
        assert named not in caplog.text  # (float32 until evaluate)
        converted.evaluate()
        assert next(model.parameters()).dtype == torch.bfloat16
        converted.compute_influences(test)
    assert caplog.text.count(named) == 1


def test_a_compiled_model_converted_under_full_eval_is_named(tmp_path, pad_collator, monkeypatch):
    """A torch.compile'd model's weights are named with `_orig_mod.` before the prefix that influence takes them
    without: the dtypes as given are recorded by influence's names, so its full-eval conversion is named too (a review
    of the weight-by-weight comparison: every weight looked given in bfloat16)."""
    from hf_fastif import trainer as trainer_module

    said = []
    monkeypatch.setattr(trainer_module.logger, "warning_once", lambda message, *a, **k: said.append(message))
    model = torch.compile(tiny_model("bert", dtype=torch.float32))
    trainer = InfluenceTrainer(model=model, args=arguments(tmp_path, bf16_full_eval=True),
                               train_dataset=make_token_dataset(8, seed=0), data_collator=pad_collator)
    trainer._influence_model()
    assert not [m for m in said if "bf16_full_eval" in m]
    trainer.model.to(torch.bfloat16)  # (what evaluate() does under bf16_full_eval, without compiling a forward)
    trainer._influence_model()
    assert [m for m in said if m.startswith("bf16_full_eval=True: the Trainer's evaluate()")]


@pytest.mark.usefixtures("propagating")
def test_a_loss_other_than_the_models_own_is_named(tmp_path, pad_collator, caplog):
    """A compute_loss_func that trains another loss than the one influence differentiates by default is named, once,
    with both losses and the fix; one that trains the model's own loss is not (a trial's token-counting override
    was warned about, and its tables carried the note); an influence_loss_fn silences it."""
    import logging

    model, train, test = tiny_model("bert"), make_token_dataset(16, seed=0), make_token_dataset(1, seed=1)

    def weighted(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, weight=torch.tensor(
            [1.0, 4.0], dtype=outputs.logits.dtype))

    def same(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    def documented(outputs, labels, num_items_in_batch=None):  # (transformers' documented form: it failed on None)
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    def trainer(func, **kwargs):
        return InfluenceTrainer(model=model, args=arguments(tmp_path), train_dataset=train, data_collator=pad_collator,
                                compute_loss_func=func, **kwargs)

    with caplog.at_level(logging.WARNING):
        held = trainer(weighted)
        assert "compute_loss_func" not in caplog.text  # (named once compared, at the first influence call)
        table = held.compute_influences(test)
        held.compute_influences(test)
    assert caplog.text.count("This trainer trains with a compute_loss_func, which gives ") == 1
    assert "where the model's own loss (a plain Trainer's) is" in caplog.text
    assert "InfluenceTrainer(..., influence_loss_fn=(outputs, batch) -> per-row loss)" in caplog.text
    assert "trained_with" in table.metadata["diagnostics"]

    def per_row(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    for quiet in (trainer(same), trainer(documented), trainer(weighted, influence_loss_fn=per_row)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            table = quiet.compute_influences(test)
        assert "compute_loss_func" not in caplog.text and "trained_with" not in table.metadata["diagnostics"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a loss_fn of this call's: nothing to name (a review's false warning)
        table = trainer(weighted).compute_influences(test, loss_fn=per_row)
        trainer(weighted).build_influence_table(test, str(tmp_path / "build"), loss_fn=per_row)
    assert "compute_loss_func" not in caplog.text and "trained_with" not in table.metadata["diagnostics"]
    # rows sorted by label: the first 16 hold one class, on which class weights cancel (a review's repro went
    # unwarned); the rows compared are spread over the data
    by_label = make_token_dataset(40, seed=0).sort("labels")
    assert len(set(by_label["labels"][:16])) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        table = InfluenceTrainer(model=model, args=arguments(tmp_path), train_dataset=by_label,
                                 data_collator=pad_collator, compute_loss_func=weighted).compute_influences(test)
    assert "This trainer trains with a compute_loss_func, which gives " in caplog.text
    assert "trained_with" in table.metadata["diagnostics"]
    # with label smoothing, which the Trainer leaves out under a compute_loss_func and influence keeps: said so (the
    # warning called the smoothed loss "the model's plain loss", which a plain cross-entropy function would match)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        InfluenceTrainer(model=model, args=arguments(tmp_path, label_smoothing_factor=0.2), train_dataset=train,
                         data_collator=pad_collator, compute_loss_func=weighted).compute_influences(test)
    assert "with label_smoothing_factor=0.2, which a compute_loss_func replaces in training" in caplog.text


@pytest.mark.usefixtures("propagating")
def test_a_half_precision_model_trained_with_its_own_loss_is_not_named(tmp_path, pad_collator, caplog):
    """A bfloat16 model's compute_loss_func that takes the same cross-entropy in float32 was named as another loss
    (0.693444 against the model's own 0.6875: bfloat16 rounding), in a review: compared within that dtype's
    precision, as the engine compares the model's own loss."""

    def float32_ce(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits.float(), labels)

    trainer = InfluenceTrainer(model=tiny_model("bert", dtype=torch.bfloat16), args=arguments(tmp_path),
                               train_dataset=make_token_dataset(16, seed=0), data_collator=pad_collator,
                               compute_loss_func=float32_ce)
    _, warned = _warnings(caplog, lambda: trainer._trained_loss(trainer.train_dataset))
    assert "compute_loss_func" not in warned and trainer._trained_loss_check[1] is None


@pytest.mark.usefixtures("propagating")
def test_label_smoothing_is_the_default_loss_of_its_trainer(tmp_path, pad_collator, caplog):
    """With label_smoothing_factor the Trainer trains on its LabelSmoother's loss, and the default loss is that one
    per row: its mean over a batch equals the LabelSmoother's (classifier), a row's equals it on that row alone
    (causal LM, shifted). InfluenceTrainer then explains the smoothed loss, without a warning, and the
    smoothing keys the caches and the table's settings."""
    from transformers.trainer_pt_utils import LabelSmoother

    from hf_fastif.loss import make_default_loss

    smoother = LabelSmoother(epsilon=0.3)
    model, rows = tiny_model("bert", num_labels=3), make_token_dataset(6, seed=0, num_labels=3)
    batch = pad_collator([rows[i] for i in range(len(rows))])
    labels = batch.pop("labels")
    with torch.no_grad():
        outputs = model(**batch)
    ours = make_default_loss(model, 0.3)(outputs, {"labels": labels})
    torch.testing.assert_close(ours.mean(), smoother(outputs, labels).to(ours.dtype))
    assert not torch.allclose(ours, make_default_loss(model)(outputs, {"labels": labels}))
    lm, text = tiny_model("gpt2-lm"), make_token_dataset(3, seed=1, causal=True)
    for i in range(len(text)):
        ids = torch.tensor([text[i]["input_ids"]])
        with torch.no_grad():
            out = lm(input_ids=ids)
        torch.testing.assert_close(make_default_loss(lm, 0.3)(out, {"labels": ids})[0],
                                   smoother(out, ids, shift_labels=True).to(torch.float64))

    train, test = make_token_dataset(20, seed=0), make_token_dataset(2, seed=1)
    args = arguments(tmp_path, label_smoothing_factor=0.3, influence_knn_k=None)
    trainer, warned = _warnings(caplog, lambda: InfluenceTrainer(model=tiny_model("bert"), args=args,
                                                                 train_dataset=train, data_collator=pad_collator))
    table, more = _warnings(caplog, lambda: trainer.compute_influences(test))
    assert "label_smoothing" not in warned + more and "own loss" not in more
    assert table.metadata["settings"]["label_smoothing_factor"] == 0.3

    def smoothed(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none",
                                                 label_smoothing=0.3)

    expected = compute_influences(trainer.model, train, test, arguments(tmp_path, influence_knn_k=None),
                                  data_collator=pad_collator, loss_fn=smoothed)
    plain = compute_influences(trainer.model, train, test, arguments(tmp_path, influence_knn_k=None),
                               data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().influence, expected.to_pandas().influence, rtol=1e-9)
    assert np.abs(table.to_pandas().influence - plain.to_pandas().influence).max() > 1e-3


def _warnings(caplog, run):
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run()
    return result, caplog.text


@pytest.mark.usefixtures("propagating")
def test_a_compute_loss_of_a_subclass_is_named_where_it_trains_another_loss(tmp_path, pad_collator, caplog):
    """An override that returns super()'s loss (counting tokens on the way, as a trial's did) trains the model's own
    loss: it was warned about and noted in every table. Only one that changes the loss is named."""
    class Counting(InfluenceTrainer):
        seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            Counting.seen += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    class Doubled(InfluenceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return 2 * super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)

    class PerItem(InfluenceTrainer):  # the model's own loss, divided by the count (it got None: "could not be
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # compared", a review)
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            return torch.nn.functional.cross_entropy(logits, inputs["labels"], reduction="sum") / num_items_in_batch

    test = make_token_dataset(1, seed=1)
    for kind, named in ((Counting, False), (Doubled, True), (PerItem, False), (InfluenceTrainer, False)):
        trainer, warned = _warnings(caplog, lambda k=kind: k(model=tiny_model("bert"), args=arguments(tmp_path),
                                                             train_dataset=make_token_dataset(8, seed=0),
                                                             data_collator=pad_collator))
        assert "compute_loss" not in warned
        table, warned = _warnings(caplog, lambda t=trainer: t.compute_influences(test))
        assert (f"{kind.__name__}.compute_loss, which " in warned) == named, kind
        assert ("trained_with" in table.metadata["diagnostics"]) == named
        assert trainer.loss_reads_num_items is None  # (the check leaves the first training step's probe alone)
    assert Counting.seen > 0


@pytest.mark.usefixtures("propagating")
def test_a_compute_loss_func_set_after_construction_is_named(tmp_path, pad_collator, caplog):
    """A compute_loss_func set after InfluenceTrainer.__init__ (a subclass's __init__ after super().__init__(), or
    ``trainer.compute_loss_func = f``) trains with it, but what the trainer trains with was read once at
    construction: a class-weighted loss went unnamed, its influence the plain loss's (a review: 0.86 off). One
    replaced after a check is checked again."""
    def weighted(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, weight=torch.tensor(
            [1.0, 4.0], dtype=outputs.logits.dtype))

    def same(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    class Weighted(InfluenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.compute_loss_func = weighted

    test = make_token_dataset(1, seed=1)
    trainer = Weighted(model=tiny_model("bert"), args=arguments(tmp_path), train_dataset=make_token_dataset(16, seed=0),
                       data_collator=pad_collator)
    table, warned = _warnings(caplog, lambda: trainer.compute_influences(test))
    assert "This trainer trains with a compute_loss_func, which gives " in warned
    assert table.metadata["diagnostics"]["trained_with"].startswith("trained with a compute_loss_func")
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=arguments(tmp_path),
                               train_dataset=make_token_dataset(16, seed=0), data_collator=pad_collator)
    for func, named in ((None, False), (same, False), (weighted, True), (same, False)):
        trainer.compute_loss_func = func
        table, warned = _warnings(caplog, lambda: trainer.compute_influences(test))
        assert ("trained_with" in table.metadata["diagnostics"]) == named, func
        assert ("which gives" in warned) == named


@pytest.mark.usefixtures("propagating")
def test_a_training_step_of_a_subclass_that_trains_its_own_loss_is_named(tmp_path, pad_collator, caplog):
    """A subclass's training_step that computes a class-weighted loss and steps backward itself never reaches
    compute_loss, so nothing compared its loss: influence used the model's plain loss without a word (Spearman
    0.979 with the loss trained, in a review). It is named, in a warning (once) and in every table, after it trained;
    one that calls super().training_step trains through compute_loss and is not, nor is an untrained trainer's, nor
    one given influence_loss_fn."""
    import torch.nn.functional as F

    class OwnStep(InfluenceTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs.pop("labels")
            loss = F.cross_entropy(model(**inputs).logits, labels, weight=torch.tensor([1.0, 5.0]))
            self.accelerator.backward(loss)
            return loss.detach()

    class Logging(InfluenceTrainer):
        steps = 0

        def training_step(self, *args, **kwargs):
            Logging.steps += 1
            return super().training_step(*args, **kwargs)

    class ThroughComputeLoss(InfluenceTrainer):  # (its own step, the plain loss: compute_loss's)
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss)
            return loss.detach()

    def per_row(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    test = make_token_dataset(1, seed=1)
    for kind, train, named, extra in ((OwnStep, True, True, {}), (OwnStep, False, False, {}),
                                      (OwnStep, True, False, {"influence_loss_fn": per_row}),
                                      (Logging, True, False, {}), (ThroughComputeLoss, True, False, {}),
                                      (Logging, "resumed at its last step", False, {})):
        args = arguments(tmp_path / kind.__name__, save_strategy="steps", save_steps=6)
        trainer = kind(model=tiny_model("bert", dtype=torch.float32), args=args,
                       train_dataset=make_token_dataset(16, seed=0), data_collator=pad_collator, **extra)
        if train:
            trainer.train(resume_from_checkpoint=train == "resumed at its last step" or None)
        (table, again), warned = _warnings(caplog, lambda t=trainer: (t.compute_influences(test),
                                                                      t.compute_influences(test)))
        assert warned.count("This trainer trained through OwnStep.training_step, which never called compute_loss"
                            ) == named
        for t in (table, again):
            assert (t.metadata["diagnostics"].get("trained_with") == "trained with OwnStep.training_step; influence "
                    "used the model's default loss") == named, (kind, train, extra)
    assert Logging.steps == 6  # (none in the resumed run: its checkpoint was at the last step)


def test_a_compute_loss_func_is_kept_in_the_tables_diagnostics(tmp_path, pad_collator):
    """The warning that a trainer trains with a compute_loss_func came once, at construction; its tables, built from
    the default loss, carried no trace of it. With influence_loss_fn given there is nothing to record."""
    train, test = make_token_dataset(12, seed=0), make_token_dataset(1, seed=1)

    def weighted(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, weight=torch.tensor(
            [1.0, 4.0], dtype=outputs.logits.dtype))

    common = dict(model=tiny_model("bert"), args=arguments(tmp_path), train_dataset=train, data_collator=pad_collator,
                  compute_loss_func=weighted)
    table = InfluenceTrainer(**common).compute_influences(test)
    assert table.metadata["diagnostics"]["trained_with"] == ("trained with a compute_loss_func; influence used the "
                                                             "model's default loss")
    def per_row(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    trainer = InfluenceTrainer(**common)
    built = trainer.build_influence_table(test, str(tmp_path / "build"))
    assert built.metadata["diagnostics"]["trained_with"] == table.metadata["diagnostics"]["trained_with"]
    # a build resumed with or without the note (its shards computed before): the whole table says what this run says
    from hf_fastif import build_influence_table

    model, args = trainer._influence_model(), trainer.influence_args
    plain_build = build_influence_table(model, train, test, tmp_path / "build", args, data_collator=pad_collator)
    assert "trained_with" not in plain_build.metadata["diagnostics"]
    again = build_influence_table(model, train, test, tmp_path / "build", args, data_collator=pad_collator,
                                  trained_loss="trained with a compute_loss_func")
    assert again.metadata["diagnostics"]["trained_with"] == table.metadata["diagnostics"]["trained_with"]
    given = InfluenceTrainer(**common, influence_loss_fn=per_row).compute_influences(test)
    assert "trained_with" not in given.metadata["diagnostics"]
    plain = InfluenceTrainer(**(common | {"compute_loss_func": None})).compute_influences(test)
    assert "trained_with" not in plain.metadata["diagnostics"]


class _ClassWeighted(torch.nn.Module):
    """A classifier whose own forward weights its classes (1 and 4) in the loss, as users write them."""

    def __init__(self, weight=(1.0, 4.0)):
        super().__init__()
        self.inner = tiny_model("bert")
        self.config = self.inner.config
        self.register_buffer("class_weight", torch.tensor(weight, dtype=torch.float64))

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        if labels is not None:
            out.loss = torch.nn.functional.cross_entropy(out.logits, labels, weight=self.class_weight)
        return out


@pytest.mark.usefixtures("propagating")
def test_a_model_whose_own_loss_differs_from_the_default_is_named(tmp_path, pad_collator, caplog):
    """Class weights in the model's forward cancel on one row, so the first 8 rows are compared together: the
    influence of the plain loss was 85% off the trained one, without a word."""
    train, test = make_token_dataset(20, seed=0), make_token_dataset(1, seed=1)
    args = arguments(tmp_path, influence_knn_k=None)
    table, warned = _warnings(caplog, lambda: compute_influences(_ClassWeighted(), train, test, args,
                                                                 data_collator=pad_collator))
    differs = table.metadata["diagnostics"]["own_loss_differs"]
    assert differs["rows"] == list(range(8)) and abs(differs["model_loss"] - differs["default_loss"]) > 1e-3
    assert "the model's own loss is" in warned and "loss_fn=" in warned
    plain, warned = _warnings(caplog, lambda: compute_influences(tiny_model("bert"), train, test, args,
                                                                 data_collator=pad_collator))
    assert "own_loss_differs" not in plain.metadata["diagnostics"] and "own loss" not in warned

    def weighted(outputs, batch):  # the model's loss per row: its mean over a batch weights each row by its class
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    given = compute_influences(_ClassWeighted(), train, test, args, data_collator=pad_collator, loss_fn=weighted)
    assert "own_loss_differs" not in given.metadata["diagnostics"]  # a loss_fn of one's own is not second-guessed

    from hf_fastif import InfluenceEngine

    model = _ClassWeighted(weight=(1.0, 1.0))  # uniform: the plain loss; then weighted in place, same config
    engine = InfluenceEngine(model, args, data_collator=pad_collator)
    assert "own_loss_differs" not in engine.compute_influences(train, test).metadata["diagnostics"]
    model.class_weight.copy_(torch.tensor([1.0, 4.0]))
    assert "own_loss_differs" in engine.compute_influences(train, test).metadata["diagnostics"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("propagating")
def test_a_half_precision_models_own_loss_is_compared_at_its_precision(tmp_path, pad_collator, caplog, dtype):
    """A confident model's own loss in half precision is its logits' rounding (bf16: exactly 0 against the plain
    loss's 3e-4): it was named as a loss of its own ("class weights, label smoothing or an extra term")."""
    train = make_token_dataset(20, seed=0).map(lambda row: {"labels": 0})
    model = tiny_model("bert", dtype=torch.float32)
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)
        model.classifier.bias.copy_(torch.tensor([8.0, 0.0]))  # every row: class 0 at about 1 - 3e-4
    args = arguments(tmp_path, influence_knn_k=None, influence_params=[r"classifier\."], influence_solver="exact")
    table, warned = _warnings(caplog, lambda: compute_influences(model.to(dtype), train, train.select([0]), args,
                                                                 data_collator=pad_collator))
    assert "own_loss_differs" not in table.metadata["diagnostics"] and "own loss" not in warned


def test_remove_unused_columns_false_keeps_the_columns_the_trainer_keeps(tmp_path, pad_collator):
    """With remove_unused_columns=False the Trainer hands every column to the collator (and the model): a
    collator reading one more column trained on batches influence did not see (and a bare KeyError)."""
    from datasets import Dataset

    train = make_token_dataset(16, seed=0)
    train = train.add_column("scale", [float(1 + i % 3) for i in range(len(train))])
    test = make_token_dataset(1, seed=1).add_column("scale", [1.0])

    def collator(rows):
        batch = pad_collator([{k: v for k, v in r.items() if k != "scale"} for r in rows])
        batch["input_ids"] = batch["input_ids"] * (torch.tensor([r["scale"] for r in rows]) > 1).long()[:, None]
        return batch

    with pytest.raises(ValueError, match="reads a column the rows do not have.*remove_unused_columns=False"):
        compute_influences(tiny_model("bert"), train, test, arguments(tmp_path), data_collator=collator)
    kept = compute_influences(tiny_model("bert"), train, test, arguments(tmp_path, remove_unused_columns=False),
                              data_collator=collator)
    zeroed = Dataset.from_dict({"input_ids": [ids if s > 1 else [0] * len(ids)
                                              for ids, s in zip(train["input_ids"], train["scale"])],
                                "attention_mask": train["attention_mask"], "labels": train["labels"]})
    test_zeroed = Dataset.from_dict({"input_ids": [[0] * len(test[0]["input_ids"])],
                                     "attention_mask": test["attention_mask"], "labels": test["labels"]})
    expected = compute_influences(tiny_model("bert"), zeroed, test_zeroed, arguments(tmp_path),
                                  data_collator=pad_collator)
    np.testing.assert_allclose(kept.to_pandas().sort_values("train_id").influence,
                               expected.to_pandas().sort_values("train_id").influence, rtol=1e-9)


def test_a_bf16_trainer_explains_in_the_weights_dtype(tmp_path, pad_collator):
    """After train() with bf16, accelerate leaves an autocast wrapper on model.forward: every product ran in bf16
    (Spearman 0.82 with float64). Influence runs the model's own forward, and the wrapper is put back."""
    train, test = make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert", dtype=torch.float32)
    args = arguments(tmp_path, bf16=True, influence_solver="exact", influence_knn_k=None)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    trainer.train()
    assert "_original_forward" in vars(model) and hasattr(model.forward, "__wrapped__")
    wrapper = model.forward
    table = trainer.compute_influences(test)
    assert model.forward is wrapper  # put back: later training keeps its mixed precision
    clean = tiny_model("bert", dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    expected = compute_influences(clean, train, test, args, data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().influence, expected.to_pandas().influence, rtol=1e-5, atol=1e-9)


@pytest.mark.usefixtures("propagating")
def test_a_bf16_trainers_model_with_a_float32_head_keeps_its_autocast(tmp_path, pad_collator, caplog):
    """A bf16 body with a float32 classifier runs only under the autocast accelerate wraps its forward in: removed,
    the first forward failed with a bare "mat1 and mat2 must have the same dtype" (a review's repro). The wrapper is
    kept, with a warning, and the values are those of that forward (close to the float64 copy's)."""
    import logging

    train, test = make_token_dataset(24, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert", dtype=torch.float32).to(torch.bfloat16)
    model.classifier.float()
    args = arguments(tmp_path, bf16=True, influence_solver="exact", influence_knn_k=None)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    trainer.train()
    wrapper = model.forward
    with caplog.at_level(logging.WARNING):
        table = trainer.compute_influences(test)
    assert model.forward is wrapper and "weights are of several dtypes" in caplog.text
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    recorded = table.metadata["model"]
    assert set(recorded["dtypes"]) == {"bfloat16", "float32"}, recorded  # (the table says what it was computed in)
    assert sum(recorded["dtypes"].values()) == recorded["num_parameters"] and recorded["work_dtype"] == "float32"
    reference = tiny_model("bert", dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    expected = compute_influences(reference, train, test, args, data_collator=pad_collator).to_pandas().influence
    got = table.to_pandas().influence
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.usefixtures("propagating")
def test_comparing_the_models_own_loss_leaves_the_model_as_it_was_and_spares_plain_models(tmp_path, pad_collator,
                                                                                        caplog):
    """transformers sets config.problem_type on the first forward with labels: that changed the model's
    fingerprint (and missed every cache on the next call). No warning on a plain model in bfloat16 (its loss is
    computed in bf16, the default loss in float32), nor where a row among the first 8 is labelled -100."""
    from hf_fastif.fingerprint import model_fingerprint

    train, test = make_token_dataset(20, seed=0), make_token_dataset(1, seed=1)
    model = tiny_model("bert")
    assert model.config.problem_type is None
    before = model_fingerprint(model)
    compute_influences(model, train, test, arguments(tmp_path, influence_knn_k=None), data_collator=pad_collator)
    assert model.config.problem_type is None and model_fingerprint(model) == before
    labels = train["labels"]
    unlabelled = train.remove_columns("labels").add_column("labels", [-100 if i == 2 else y
                                                                      for i, y in enumerate(labels)])
    for model, rows in ((tiny_model("bert", dtype=torch.bfloat16), train), (tiny_model("bert"), unlabelled)):
        table, warned = _warnings(caplog, lambda m=model, r=rows: compute_influences(
            m, r, test, arguments(tmp_path, influence_knn_k=None), data_collator=pad_collator))
        assert "own loss" not in warned and "own_loss_differs" not in table.metadata["diagnostics"]


def _weighted_rows(pad_collator):
    """Rows with a per-row weight column ``w`` (training: 1-3, test: 1), a collator that carries it, and the loss
    that reads it (cross-entropy × w)."""
    import torch.nn.functional as F

    train = make_token_dataset(16, seed=0).add_column("w", [float(1 + i % 3) for i in range(16)])
    test = make_token_dataset(2, seed=1).add_column("w", [1.0, 1.0])

    def collator(rows):
        batch = pad_collator([{k: v for k, v in r.items() if k != "w"} for r in rows])
        batch["w"] = torch.tensor([r["w"] for r in rows], dtype=torch.float64)
        return batch

    def weighted(outputs, batch):
        return F.cross_entropy(outputs.logits, batch["labels"], reduction="none") * batch["w"]

    return train, test, collator, weighted


def test_label_names_columns_are_kept_as_the_trainer_keeps_them(tmp_path, pad_collator):
    """The Trainer keeps the columns of ``label_names`` (a per-row weight a compute_loss reads); influence dropped
    them: a bare KeyError in the loss, or (a loss that falls back to weight 1) values 56% off."""

    train, test, collator, weighted = _weighted_rows(pad_collator)

    def run(**kw):
        trainer = InfluenceTrainer(model=tiny_model("bert"), args=arguments(tmp_path, **kw), train_dataset=train,
                                   data_collator=collator, influence_loss_fn=weighted)
        return trainer.compute_influences(test).to_pandas().sort_values(["test_id", "train_id"]).influence.to_numpy()

    kept = run(label_names=["labels", "w"])
    np.testing.assert_allclose(kept, run(remove_unused_columns=False), rtol=1e-12)  # every column kept: the same


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode,
                                     lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                                     lambda: torch.autocast("cpu", dtype=torch.float16)],
                         ids=["no_grad", "inference_mode", "autocast_bf16", "autocast_fp16"])
def test_a_call_under_no_grad_or_inference_mode_computes_the_same(tmp_path, pad_collator, context):
    """A common reflex around analysis code: autograd failed with an error that named nothing; inside an autocast,
    a float32 model's products ran in half precision without a word (Spearman 0.75 against float32's)."""
    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert", dtype=torch.float32)  # (autocast leaves float64 alone)
    expected = compute_influences(model, train, test, arguments(tmp_path), data_collator=pad_collator)
    with context():
        table = compute_influences(model, train, test, arguments(tmp_path), data_collator=pad_collator)
    np.testing.assert_allclose(table.to_pandas().influence, expected.to_pandas().influence, rtol=1e-12)


@pytest.mark.usefixtures("propagating")
def test_an_autocast_a_mixed_dtype_model_needs_is_kept(tmp_path, pad_collator, caplog):
    """A bf16 body with a float32 head runs only under an autocast: switching it off failed with torch's bare
    "mat1 and mat2 must have the same dtype" (it worked before the ambient autocast was switched off)."""
    import logging

    train, test = make_token_dataset(16, seed=0), make_token_dataset(2, seed=1)
    model = tiny_model("bert", dtype=torch.bfloat16)
    model.classifier.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.WARNING):
        table = compute_influences(model, train, test, arguments(tmp_path), data_collator=pad_collator)
    assert np.isfinite(table.to_pandas().influence).all()
    assert "weights are of several dtypes, which its forward needs the autocast to mix: it is kept" in caplog.text


def test_build_influence_table_takes_what_compute_influences_takes(tmp_path, pad_collator):
    """It passed the trainer's train_dataset and collator unconditionally: train_dataset= and data_collator= were
    'multiple values' TypeErrors, and a trainer without a train_dataset got a misleading type error."""
    train, test = make_token_dataset(16, seed=0), make_token_dataset(3, seed=1)
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=arguments(tmp_path), data_collator=pad_collator)
    with pytest.raises(ValueError, match="no train_dataset; pass train_dataset= to build_influence_table"):
        trainer.build_influence_table(test, str(tmp_path / "b0"))
    built = trainer.build_influence_table(test, str(tmp_path / "b1"), train_dataset=train, data_collator=pad_collator,
                                          shard_size=2)
    direct = trainer.compute_influences(test, train_dataset=train)
    np.testing.assert_allclose(built.to_pandas().sort_values(["test_id", "train_id"]).influence,
                               direct.to_pandas().sort_values(["test_id", "train_id"]).influence, rtol=1e-9)


@pytest.mark.usefixtures("propagating")
def test_the_trainers_weight_decay_is_said_not_to_be_influences(tmp_path, pad_collator, caplog):
    """TrainingArguments.weight_decay was silently not influence's L2 term; with SGD (a coupled L2 term) the
    warning names the influence_weight_decay that matches it."""
    train = make_token_dataset(8, seed=0)
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(model=tiny_model("bert"), args=arguments(
        tmp_path, weight_decay=0.2, optim="sgd"), train_dataset=train, data_collator=pad_collator))
    assert "optim='sgd'" in warned and "influence_weight_decay=0.1" in warned
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(model=tiny_model("bert"), args=arguments(
        tmp_path, weight_decay=0.2), train_dataset=train, data_collator=pad_collator))
    assert "weight_decay" not in warned  # AdamW's decay is decoupled: said at info level only
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(model=tiny_model("bert"), args=arguments(
        tmp_path, weight_decay=0.2, optim="sgd", influence_weight_decay=0.1), train_dataset=train,
        data_collator=pad_collator))
    assert "weight_decay" not in warned
    # schedule-free SGD adds wd·θ to the gradient (it was said to be decoupled, with 0 "right"); an optimizer passed
    # in was not looked at
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(model=tiny_model("bert"), args=arguments(
        tmp_path, weight_decay=0.01, optim="schedule_free_sgd"), train_dataset=train, data_collator=pad_collator))
    assert "optim='schedule_free_sgd'" in warned and "influence_weight_decay=0.005" in warned
    model = tiny_model("bert")
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(
        model=model, args=arguments(tmp_path), train_dataset=train, data_collator=pad_collator,
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01), None)))
    assert "SGD decays by adding" in warned and "influence_weight_decay=0.005" in warned
    assert "it decays biases and norms too" in warned  # (the advice cannot cover them: it said it did)
    frozen = tiny_model("bert")  # only the classifier's weight trains: SGD skips the frozen rest, decay and all
    for name, parameter in frozen.named_parameters():
        parameter.requires_grad_(name == "classifier.weight")
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(
        model=frozen, args=arguments(tmp_path), train_dataset=train, data_collator=pad_collator,
        optimizers=(torch.optim.SGD(frozen.parameters(), lr=0.1, weight_decay=0.01), None)))
    assert "influence_weight_decay=0.005" in warned and "biases and norms too" not in warned
    _, warned = _warnings(caplog, lambda: InfluenceTrainer(
        model=tiny_model("bert"), args=arguments(tmp_path), train_dataset=train, data_collator=pad_collator,
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.01})))
    assert "weight_decay" not in warned  # (AdamW: decoupled)
    # optimizer_cls_and_kwargs: the Trainer's parameter groups carry args.weight_decay, over the kwargs' (read from
    # the kwargs: 0.3 there was advised as 0.15 where nothing decayed, and args' 0.2 went unsaid)
    for kwargs, decay, expected in (({"lr": 0.1}, 0.2, "influence_weight_decay=0.1"),
                                    ({"lr": 0.1, "weight_decay": 0.3}, 0.0, None)):
        _, warned = _warnings(caplog, lambda kwargs=kwargs, decay=decay: InfluenceTrainer(
            model=tiny_model("bert"), args=arguments(tmp_path, weight_decay=decay), train_dataset=train,
            data_collator=pad_collator, optimizer_cls_and_kwargs=(torch.optim.SGD, kwargs)))
        assert (expected in warned) if expected else "weight_decay" not in warned, warned

    class OwnOptimizer(InfluenceTrainer):  # the optimizer that trains is made in train(): looked at after it
        def create_optimizer(self, model=None):
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, weight_decay=0.3)
            return self.optimizer

    own = OwnOptimizer(model=tiny_model("bert"), args=arguments(tmp_path, max_steps=1, weight_decay=0.3),
                       train_dataset=train, data_collator=pad_collator)
    own.train()
    _, warned = _warnings(caplog, lambda: own.compute_influences(make_token_dataset(2, seed=1)))
    assert "SGD decays by adding" in warned and "influence_weight_decay=0.15" in warned


def test_a_label_names_column_reaches_the_loss_not_a_forward_without_kwargs(tmp_path, pad_collator):
    """A kept label_names column went into every forward: a model whose forward takes no **kwargs failed with
    'unexpected keyword argument'. It reaches the loss only; a forward that names it still gets it."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(60, 8, dtype=torch.float64)
            self.head = torch.nn.Linear(8, 2, dtype=torch.float64)

        def forward(self, input_ids, attention_mask=None, labels=None):
            mask = attention_mask[..., None].to(torch.float64)
            return SequenceClassifierOutput(logits=self.head((self.emb(input_ids) * mask).sum(1) / mask.sum(1)))

    train, test, collator, weighted = _weighted_rows(pad_collator)

    args = arguments(tmp_path, label_names=["labels", "w"], influence_solver="exact", influence_damping=1.0,
                     influence_scale=1.0, influence_knn_k=None, influence_params=None)
    table = compute_influences(Plain(), train, test, args, data_collator=collator, loss_fn=weighted,
                               measurement_fn=weighted)
    values = table.to_pandas().sort_values(["test_id", "train_id"]).influence.to_numpy()
    assert len(values) == 32 and np.isfinite(values).all()
    # the weight is read: without it (every row weighted 1) the values differ
    unweighted = compute_influences(Plain(), train.map(lambda r: {"w": 1.0}), test, args, data_collator=collator,
                                    loss_fn=weighted, measurement_fn=weighted)
    assert not np.allclose(values, unweighted.to_pandas().sort_values(["test_id", "train_id"]).influence)


def test_a_loss_of_ones_own_may_mask_missing_targets(tmp_path, pad_collator):
    """NaN targets are refused with the default loss, not with a loss_fn that masks them itself."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                     problem_type="regression",
                                                     attn_implementation="eager")).double().eval()
    train = make_token_dataset(12, seed=0).map(lambda r, i: {"labels": [float(r["labels"]), float("nan") if i % 3 == 0
                                                                         else 0.5]}, with_indices=True)
    test = make_token_dataset(2, seed=1).map(lambda r: {"labels": [float(r["labels"]), 0.5]})

    def masked(outputs, batch):
        y = batch["labels"]
        seen = ~torch.isnan(y)
        return ((outputs.logits - torch.nan_to_num(y)) ** 2 * seen).sum(1) / seen.sum(1)

    args = arguments(tmp_path, influence_solver="exact", influence_damping=10.0, influence_scale=1.0,
                     influence_knn_k=None)
    with pytest.raises(ValueError, match="row 0 has label nan"):
        compute_influences(model, train, test, args, data_collator=pad_collator)
    table = compute_influences(model, train, test, args, data_collator=pad_collator, loss_fn=masked)
    assert np.isfinite(table.to_pandas().influence).all()


def test_a_kept_text_column_is_named_when_rows_cannot_be_collated(tmp_path, pad_collator):
    """remove_unused_columns=False keeps a text column, which the Trainer's own DataCollatorWithPadding cannot batch:
    the error told the user to pass DataCollatorWithPadding, the collator already in use."""
    add = lambda ds: ds.add_column("text", [f"row {i}" for i in range(len(ds))])  # noqa: E731
    args = InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True,
                              remove_unused_columns=False, influence_knn_k=5)
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=args, train_dataset=add(make_token_dataset(20, seed=0)),
                               processing_class=pad_collator.tokenizer)
    with pytest.raises(ValueError, match=r"the rows keep column\(s\) \['text'\] that this collator cannot batch"):
        trainer.compute_influences(add(make_token_dataset(2, seed=1)))
    # lists of strings and ragged floats were blamed on the collator too (and hid the text column's hint)
    tags = lambda ds: add(ds).add_column("tags", [["a"] * (1 + i % 3) for i in range(len(ds))]).add_column(  # noqa: E731
        "scores", [[0.5] * (1 + i % 2) for i in range(len(ds))]).add_column("weight", [1.0] * len(ds)).add_column(
        "entity_ids", [list(range(1 + i % 4)) for i in range(len(ds))])
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=args, train_dataset=tags(make_token_dataset(20, seed=0)),
                               processing_class=pad_collator.tokenizer)
    with pytest.raises(ValueError, match=r"keep column\(s\) \['text', 'tags', 'scores', 'entity_ids'\] that this"):
        trainer.compute_influences(tags(make_token_dataset(2, seed=1)))
    # without a padding collator the rows fail on their lengths, not on the text (which default_data_collator skips)
    trainer = InfluenceTrainer(model=tiny_model("bert"), args=args, train_dataset=add(make_token_dataset(20, seed=0)))
    with pytest.raises(ValueError, match="Rows of different lengths need a padding collator"):
        trainer.compute_influences(add(make_token_dataset(2, seed=1)))


def test_a_launch_whose_processes_would_train_alone_is_refused_before_any_step(tmp_path, pad_collator, monkeypatch):
    """Under the CPU launch without use_cpu=True every process trained the whole model alone on every row (a trial
    took it for data-parallel training, with only transformers' line about torch.distributed.launch to go by), and
    influence then refused processes whose weights differed, after the training. Refused in every process, before a
    step, with the fix; one process trains (a real launch with use_cpu=True trains the processes together:
    tests/test_distributed.py, test_an_influence_trainer_under_a_launch_takes_the_step_of_one_process)."""
    from hf_fastif import distributed as D

    model = tiny_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = InfluenceTrainer(model=model, args=arguments(tmp_path, max_steps=1),
                               train_dataset=make_token_dataset(8, seed=0), data_collator=pad_collator)
    for rank in (0, 1):
        monkeypatch.setattr(D, "world", lambda rank=rank: (rank, 2))
        with pytest.raises(ValueError, match=r"This launch runs 2 processes, but the Trainer would train in each of "
                                             r"them alone \(parallel_mode 'not_parallel'.*Set use_cpu=True"):
            trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    monkeypatch.setattr(D, "world", lambda: (0, 1))
    trainer.train()
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.usefixtures("propagating")
def test_influence_arguments_replaced_by_plain_ones_name_the_settings_that_change(tmp_path, pad_collator, caplog):
    """``trainer.args = TrainingArguments(...)`` after InfluenceArguments took the paper's settings (LiSSA, J 1000:
    hours on a real model) without a word (a trial's). Said once, with each setting that changes."""
    from transformers import TrainingArguments

    trainer = InfluenceTrainer(model=tiny_model("bert"), args=arguments(tmp_path, influence_damping=1.0),
                               train_dataset=make_token_dataset(8, seed=0), data_collator=pad_collator)
    trainer.args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    settings, warned = _warnings(caplog, lambda: trainer.influence_args)
    assert settings.influence_damping == 5e-3 and settings.influence_solver == "lissa"
    assert "trainer.args are plain TrainingArguments now, which replaced InfluenceArguments" in warned
    assert "influence_damping 1.0 -> 0.005" in warned and "influence_solver 'cg' -> 'lissa'" in warned
    _, warned = _warnings(caplog, lambda: trainer.influence_args)
    assert "plain TrainingArguments" not in warned


def test_a_causal_lms_own_loss_is_its_own_with_or_without_the_trainers_count(tmp_path):
    """GPT-2's Trainer count takes every label, the first too (never a target: its loss type is unset), so the
    model's own loss with that count (what super().compute_loss trains) is not its mean (what model(**inputs).loss
    gives): the check gave both sides the count, and named an override returning the mean, and a compute_loss_func
    of the shifted token mean, as another loss (a review: 4.09 against 3.49). Either is the model's own; twice it
    is not."""
    import torch.nn.functional as F

    class MeanOverride(InfluenceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    class SuperNoCount(InfluenceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def shifted(outputs, labels, reduction):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction=reduction)

    def mean(outputs, labels, num_items_in_batch=None):
        return shifted(outputs, labels, "mean")

    def twice(outputs, labels, num_items_in_batch=None):
        return 2 * shifted(outputs, labels, "mean")

    rows = make_token_dataset(16, seed=0, min_len=6, max_len=6, causal=True)
    for kind, func, named in ((MeanOverride, None, False), (SuperNoCount, None, False), (InfluenceTrainer, mean, False),
                              (InfluenceTrainer, twice, True)):
        trainer = kind(model=tiny_model("gpt2-lm", dtype=torch.float32), args=arguments(tmp_path), train_dataset=rows,
                       compute_loss_func=func)
        trained, plain, _ = trainer._trainer_and_plain_loss(rows)
        assert (abs(trained - plain) > 1e-4 * plain) == named, (kind, func, trained, plain)
        assert (trainer._trained_loss(rows) is not None) == named
