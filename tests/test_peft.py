"""PEFT (LoRA) models: influence over the adapter weights, the way users fine-tune with ``peft``.

By default the influence parameters are the ones with ``requires_grad`` (the adapters and ``modules_to_save``);
the values must equal an explicit float64 Hessian's, and every stage that looks into the model (kNN features, the
frozen-trunk split, the read-position cut, the Trainer) must see through the PEFT wrapper.
"""

from types import SimpleNamespace

import numpy as np
import peft  # a dev requirement (pyproject.toml)
import pytest
import torch

from hf_fastif import InfluenceArguments, InfluenceEngine, InfluenceTrainer
from hf_fastif.knn import model_features
from hf_fastif.trunk import transformers_model
from tests.tiny import make_token_dataset, pad_collator_for_tests, tiny_model


def _lora(kind: str = "bert", layers=None, seed: int = 0, modules=("query", "value"), alpha: int = 4):
    model = tiny_model(kind, num_labels=3, seed=seed)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=alpha, target_modules=list(modules),
                             layers_to_transform=layers, lora_dropout=0.1)
    model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero, which would make the adapters' influence degenerate
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model.eval()


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), influence_solver="exact", influence_damping=0.05, influence_scale=1.0,
                    influence_knn_k=None, report_to=[], use_cpu=True, disable_tqdm=True)
    return InfluenceArguments(**(settings | overrides))


def _matrix(table, num_train: int, num_test: int) -> np.ndarray:
    out = np.full((num_train, num_test), np.nan)
    for row in table.to_pandas().itertuples():
        out[row.train_id, row.test_id] = row.influence
    return out


def _explicit_influence(model, collator, train, test, lam: float, own_loss: bool = False) -> np.ndarray:
    """-∇L(z)·(H + λI)⁻¹∇L(z_test) over the trainable parameters, from an explicit float64 Hessian. A row's loss:
    cross-entropy of the logits, or (``own_loss``) the PEFT model's own ``loss`` on that row alone."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def losses(vector, rows):
        values = dict(zip(names, (t.reshape(params[n].shape) for n, t in zip(names, vector.split(sizes)))))
        if own_loss:
            return torch.stack([torch.func.functional_call(model, values, (), collator([rows[i]])).loss
                                for i in range(len(rows))])
        batch = collator([rows[i] for i in range(len(rows))])
        labels = batch.pop("labels")
        logits = torch.func.functional_call(model, values, (), batch).logits
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    hessian = torch.autograd.functional.hessian(lambda v: losses(v, train).mean(), flat)
    hessian = (hessian + hessian.T) / 2
    test_grads = torch.autograd.functional.jacobian(lambda v: losses(v, test), flat)
    train_grads = torch.autograd.functional.jacobian(lambda v: losses(v, train), flat)
    s_test = torch.linalg.solve(hessian + lam * torch.eye(len(flat), dtype=flat.dtype), test_grads.T)
    return -(train_grads @ s_test).numpy()


def test_lora_influence_equals_explicit_hessian(tmp_path):
    model, collator = _lora(), pad_collator_for_tests()
    train, test = make_token_dataset(24, seed=1, num_labels=3), make_token_dataset(2, seed=2, num_labels=3)
    args = _args(tmp_path)
    table = InfluenceEngine(model, args=args, data_collator=collator).compute_influences(train, test)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert table.metadata["model"]["num_influence_parameters"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    got = _matrix(table, len(train), len(test))
    expected = _explicit_influence(model, collator, train, test, args.influence_damping * args.influence_scale)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_lora_knn_features_see_through_the_wrapper(tmp_path):
    """The paper's pooled [CLS] features of a PEFT model are its transformers model's, adapters applied (the
    PEFT wrapper's own ``base_model`` is the whole classifier: it once crashed on ``last_hidden_state``)."""
    model, collator = _lora(), pad_collator_for_tests()
    rows = make_token_dataset(6, seed=3, num_labels=3)
    batch = collator([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        expected = model.get_base_model().bert(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).pooler_output
        with model.disable_adapter():
            without = model.get_base_model().bert(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).pooler_output
    feats = model_features(model, batch)
    torch.testing.assert_close(feats, expected)
    assert (feats - without).abs().max() > 1e-4  # the adapters take part

    train, test = make_token_dataset(30, seed=4, num_labels=3), make_token_dataset(2, seed=5, num_labels=3)
    full = _matrix(InfluenceEngine(model, args=_args(tmp_path), data_collator=collator)
                   .compute_influences(train, test), len(train), len(test))
    for features in ("auto", "mean"):
        knn = _matrix(InfluenceEngine(model, args=_args(tmp_path, influence_knn_k=8, influence_knn_features=features),
                                      data_collator=collator).compute_influences(train, test), len(train), len(test))
        scored = ~np.isnan(knn)
        assert scored.sum(0).tolist() == [8, 8]
        np.testing.assert_allclose(knn[scored], full[scored], rtol=1e-6, atol=1e-10)


def test_lora_on_the_last_layer_caches_the_trunk_below(tmp_path):
    model, collator = _lora(layers=[1]), pad_collator_for_tests()
    train, test = make_token_dataset(20, seed=6, num_labels=3), make_token_dataset(2, seed=7, num_labels=3)
    table = InfluenceEngine(model, args=_args(tmp_path), data_collator=collator).compute_influences(train, test)
    diagnostics = table.metadata["diagnostics"]
    assert diagnostics["trunk"]["split"] == "base_model.model.bert.encoder.layer.1"
    assert diagnostics["trunk"]["verified_relative_error"] < 1e-12
    assert diagnostics["readout"]["cut_after"] == "base_model.model.bert.encoder.layer.1.attention.output (inputs)"
    off = InfluenceEngine(model, args=_args(tmp_path, influence_trunk_cache=False), data_collator=collator)
    np.testing.assert_allclose(_matrix(table, 20, 2), _matrix(off.compute_influences(train, test), 20, 2),
                               rtol=1e-9, atol=1e-12)


def test_influence_trainer_fine_tunes_and_explains_a_lora_model(tmp_path):
    model = _lora(seed=1).float()
    train, test = make_token_dataset(32, seed=8, num_labels=3), make_token_dataset(2, seed=9, num_labels=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, influence_solver="lissa", influence_scale=50.0, influence_damping=0.01,
                 influence_recursion_depth=20, influence_knn_k=6, num_train_epochs=1, per_device_train_batch_size=8,
                 learning_rate=1e-2, save_strategy="no", gradient_checkpointing=True)
    trainer = InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator_for_tests())
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    assert checkpointed  # PEFT + gradient checkpointing, as LoRA fine-tuning often runs
    table = trainer.compute_influences(test)  # switched off for influence (torch.func refuses its hook), then back
    assert all(m.gradient_checkpointing is True for m in checkpointed)
    assert len(table.to_pandas()) == 12 and np.isfinite(table.to_pandas()["influence"]).all()
    assert len(table.helpful(test_id=0, n=3)) + len(table.harmful(test_id=0, n=3)) > 0


def _lm_collator():
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(pad_collator_for_tests().tokenizer, label_pad_token_id=-100, padding=True)


def test_prompt_tuning_on_a_causal_lm_labels_the_virtual_tokens_as_peft_does(tmp_path):
    """Prompt tuning puts its virtual tokens' logits before the row's own: the default loss crashed on the
    length mismatch. They are labelled -100, as PEFT labels them for the model's own loss, so the first real
    token is predicted from the last virtual one."""
    model = peft.get_peft_model(tiny_model("gpt2-lm"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=3))
    model = model.double().eval()  # (PEFT makes the prompt encoder in float32)
    collator = _lm_collator()
    train = make_token_dataset(10, seed=1, causal=True)
    test = make_token_dataset(2, seed=2, causal=True)
    args = _args(tmp_path, influence_damping=0.5)
    got = _matrix(InfluenceEngine(model, args=args, data_collator=collator).compute_influences(train, test), 10, 2)
    expected = _explicit_influence(model, collator, train, test, 0.5, own_loss=True)
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_a_logits_labels_length_mismatch_is_a_clear_error():
    from hf_fastif.loss import make_default_loss

    loss = make_default_loss(tiny_model("gpt2-lm"))
    with pytest.raises(ValueError, match="logits for 7 positions and the batch has labels for 5"):
        loss(SimpleNamespace(logits=torch.zeros(2, 7, 4)), {"labels": torch.zeros(2, 5, dtype=torch.long)})


def test_adapter_settings_outside_tensors_key_the_caches(tmp_path):
    """Disabling an adapter or rescaling LoRA changes no tensor: one engine's second call was served the first
    call's trunk states and Hessian (37% off, influence over the pooler above adapted layers)."""
    from peft.helpers import rescale_adapter_scale

    model, collator = _lora(modules=("query", "value", "intermediate.dense"), alpha=32), pad_collator_for_tests()
    train, test = make_token_dataset(16, seed=1, num_labels=3), make_token_dataset(2, seed=2, num_labels=3)
    args = _args(tmp_path, influence_params=[r"pooler\."], influence_damping=1.0)
    engine = InfluenceEngine(model, args=args, data_collator=collator)
    first = _matrix(engine.compute_influences(train, test), 16, 2)
    for change in (model.disable_adapter, lambda: rescale_adapter_scale(model, 0.25)):
        with change():
            again = _matrix(engine.compute_influences(train, test), 16, 2)
            fresh = _matrix(InfluenceEngine(model, args=args, data_collator=collator).compute_influences(train, test),
                            16, 2)
        np.testing.assert_allclose(again, fresh, rtol=1e-9, atol=1e-14)
        assert np.abs(fresh - first).max() > 0.05 * np.abs(first).max()
    np.testing.assert_allclose(_matrix(engine.compute_influences(train, test), 16, 2), first, rtol=1e-9, atol=1e-14)


def test_lora_on_target_parameters_is_scored_by_per_example_gradients(tmp_path):
    """PEFT's ``target_parameters`` LoRA swaps a captured tensor in place (torch parametrize), which forward-mode
    AD refuses: scoring falls back to per-example gradients, as for other models without forward AD."""
    model = peft.get_peft_model(tiny_model("gpt2-lm"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=[], target_parameters=["h.1.attn.c_attn.weight"]))
    model = model.double().eval()
    collator = _lm_collator()
    train, test = make_token_dataset(10, seed=3, causal=True), make_token_dataset(2, seed=4, causal=True)
    args = _args(tmp_path, influence_damping=0.5)
    table = InfluenceEngine(model, args=args, data_collator=collator).compute_influences(train, test)
    assert table.metadata["diagnostics"]["scored_by"]["method"] == "per-example gradients"
    by_grad = InfluenceEngine(model, args=_args(tmp_path, influence_damping=0.5, influence_scoring="grad"),
                              data_collator=collator)
    np.testing.assert_allclose(_matrix(table, 10, 2), _matrix(by_grad.compute_influences(train, test), 10, 2),
                               rtol=1e-9, atol=1e-15)


def test_tables_recorded_before_adapter_settings_were_fingerprinted_still_check(tmp_path, caplog):
    """A PEFT table recorded before `adapter_state` joined the fingerprint (the fingerprint without it) is accepted
    with a warning when the weights match; other weights are refused. Attributes that change no number (accelerate's
    mark on a prepared model) leave the fingerprint alone, so a table from InfluenceTrainer checks against the
    model reloaded from its saved adapter."""
    from hf_fastif import InfluenceTable
    from hf_fastif.fingerprint import model_fingerprint
    from hf_fastif.table.format import ModelMismatchError

    model = _lora()
    before = model_fingerprint(model)
    model._is_accelerate_prepared = True  # what Trainer.train() leaves on a PEFT model
    assert model_fingerprint(model) == before
    old = model_fingerprint(model, adapter_settings=False)
    assert old != before
    # a classifier saved by a Trainer records the problem_type it inferred; tables of that time hashed it as set
    transformers_model(model).config.problem_type = "single_label_classification"
    older = model_fingerprint(model, adapter_settings=False, inferred_problem_type=False)
    assert model_fingerprint(model) == before and older != old
    for recorded, warned in ((before, False), (old, True), (older, True)):
        table = InfluenceTable.from_arrays([0], [0], [0.5], {"model": {"name_or_path": "lora", "fingerprint": recorded}})
        caplog.clear()
        table.check_model(model)
        assert ("before hf_fastif fingerprinted a PEFT model's adapter settings" in caplog.text) is warned
    with pytest.raises(ModelMismatchError, match="fingerprint mismatch"):
        InfluenceTable.from_arrays([0], [0], [0.5], {"model": {"fingerprint": old}}).check_model(_lora(seed=1))


@pytest.mark.parametrize("config", [peft.PromptTuningConfig, peft.PrefixTuningConfig])
def test_virtual_tokens_count_against_the_position_table(tmp_path, config):
    """Prompt tuning's virtual tokens come before the row's; prefix tuning's are past keys and values, after which
    GPT-2 numbers the row's positions: it failed with a bare IndexError in the padding probe."""
    model = peft.get_peft_model(tiny_model("gpt2-lm"), config(task_type="CAUSAL_LM", num_virtual_tokens=3))
    rows = make_token_dataset(1, seed=3, min_len=31, max_len=31, causal=True)  # 31 + 3 > 32 positions
    with pytest.raises(ValueError, match="a sequence of 31 tokens, more than the model's 29 positions"):
        InfluenceEngine(model.double().eval(), args=_args(tmp_path), data_collator=_lm_collator()).compute_influences(
            rows, make_token_dataset(1, seed=4, causal=True))


def test_merged_or_disabled_adapters_are_named_in_the_refusal(tmp_path):
    """A merged adapter takes no part in the forward, and inside ``disable_adapter()`` nothing requires grad: both
    are refused before any work (right), with messages that now say so (they named a pooler, or nothing)."""
    model = _lora()
    collator = pad_collator_for_tests()
    train, test = make_token_dataset(8, seed=0, num_labels=3), make_token_dataset(2, seed=1, num_labels=3)
    model.merge_adapter()
    with pytest.raises(ValueError, match="take no part.*PEFT adapters that are merged into the base weights"):
        InfluenceEngine(model, _args(tmp_path), data_collator=collator).compute_influences(train, test)
    model.unmerge_adapter()
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        InfluenceEngine(model, _args(tmp_path), data_collator=collator).compute_influences(train, test)
    # adapters disabled in place, the modules_to_save copy selected: the loss reads none of the parameters (autograd's
    # bare "element 0 of tensors does not require grad")
    model.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match=r"2 influence parameter\(s\) take no part.*disabled"):
        InfluenceEngine(model, _args(tmp_path, influence_params=[r"classifier\.modules_to_save"]),
                        data_collator=collator).compute_influences(train, test)
    model.base_model.enable_adapter_layers()
    # the paper's `classifier\.` also selects PEFT's frozen original_module, which the forward skips: named as such
    with pytest.raises(ValueError, match=r"PEFT's `original_module` is the frozen copy that `modules_to_save` "
                                         r"replaces: select the `modules_to_save` copy instead"):
        InfluenceEngine(model, _args(tmp_path, influence_params=[r"classifier\."]), data_collator=collator
                        ).compute_influences(train, test)


def test_a_norm_that_peft_renames_gets_no_l2_term(tmp_path):
    """The L2 term is not on norm weights (docs/usage.md), but the name rule missed PEFT's copy of a norm
    (``model.norm.modules_to_save.default.weight``): it was decayed, 0.28 off the documented objective at λ 0.3."""
    import re

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hf_fastif.params import decayed_names

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, num_labels=3, pad_token_id=0,
                         attn_implementation="eager")
    model = peft.get_peft_model(LlamaForSequenceClassification(config).double(), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"]))
    model = model.double().eval()
    patterns = [r"model\.norm\.modules_to_save", r"score\.modules_to_save"]
    names = [n for n, _ in model.named_parameters() if any(re.search(p, n) for p in patterns)]
    assert [n for n in names if "norm" not in n] == decayed_names(names, model) == [
        n for n in names if n.startswith("base_model.model.score.")]
    # the rule is the Trainer's (which the InfluenceTrainer's weight-decay hint relies on), here and on a model with
    # BatchNorm weights named otherwise, which the Trainer decays (a class rule left them out)
    from transformers import Trainer

    batch_norm = torch.nn.Sequential()
    batch_norm.add_module("conv", torch.nn.Conv1d(2, 2, 1))
    batch_norm.add_module("normalization", torch.nn.BatchNorm1d(2))
    for module in (model, batch_norm, tiny_model("gpt2"), tiny_model("bert")):
        every = [n for n, _ in module.named_parameters()]
        assert decayed_names(every, module) == Trainer.get_decay_parameter_names(None, module)

    collator = pad_collator_for_tests()
    train, test = make_token_dataset(16, seed=1, num_labels=3), make_token_dataset(2, seed=2, num_labels=3)
    wd, lam = 0.05, 0.3
    args = _args(tmp_path, influence_params=patterns, influence_damping=lam, influence_weight_decay=wd)
    got = _matrix(InfluenceEngine(model, args=args, data_collator=collator).compute_influences(train, test),
                  len(train), len(test))
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    decayed = torch.cat([torch.full((params[n].numel(),), float("norm" not in n), dtype=flat.dtype) for n in names])

    def losses(vector, rows):
        values = dict(zip(names, (t.reshape(params[n].shape) for n, t in zip(names, vector.split(sizes)))))
        batch = collator([rows[i] for i in range(len(rows))])
        labels = batch.pop("labels")
        logits = torch.func.functional_call(model, values, (), batch).logits
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    hessian = torch.autograd.functional.hessian(lambda v: losses(v, train).mean() + wd * (decayed * v * v).sum(), flat)
    test_grads = torch.autograd.functional.jacobian(lambda v: losses(v, test), flat)
    train_grads = torch.autograd.functional.jacobian(lambda v: losses(v, train), flat)
    s_test = torch.linalg.solve((hessian + hessian.T) / 2 + lam * torch.eye(len(flat), dtype=flat.dtype),
                                test_grads.T)
    expected = -(train_grads @ s_test).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_adalora_penalty_is_named_as_beyond_loss_fn(tmp_path):
    """AdaLoRA adds its orthogonal regularisation to the loss its forward returns: the own-loss check warned and
    advised a loss_fn that matches it, which silently changed nothing (a loss_fn runs outside the parameters'
    derivatives, so a penalty on them is a constant there)."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model = peft.get_peft_model(tiny_model("bert", num_labels=3), peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=3, target_r=2, target_modules=["query", "value"], total_step=100)).eval()
    with torch.no_grad():  # AdaLoRA's singular values start at 0, and so would its penalty's effect on the loss
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0),
                                              dtype=param.dtype))
    train, test = make_token_dataset(8, seed=1, num_labels=3), make_token_dataset(1, seed=2, num_labels=3)
    with CaptureLogger(logging.get_logger("hf_fastif.engine")) as captured:
        InfluenceEngine(model, _args(tmp_path), data_collator=pad_collator_for_tests()).compute_influences(train, test)
    assert "the model's own loss is" in captured.out and "cannot go through loss_fn" in captured.out


@pytest.mark.usefixtures("propagating")
def test_lora_on_a_bf16_base_runs_without_accelerates_autocast(tmp_path, caplog):
    """PEFT keeps LoRA's adapters in float32 on a bf16 base and casts their inputs itself: they do not make the
    weights "of several dtypes" that need an autocast to mix, so a bf16 Trainer's wrapper is still taken off (a
    review found it kept, every product then in bf16, with a warning that was not so)."""
    import logging

    from accelerate.utils import convert_outputs_to_fp32

    base = tiny_model("bert", num_labels=3, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    train, test = make_token_dataset(12, seed=0, num_labels=3), make_token_dataset(2, seed=1, num_labels=3)
    args = _args(tmp_path, influence_damping=1.0)

    def table():
        engine = InfluenceEngine(model, args, data_collator=pad_collator_for_tests())
        return engine.compute_influences(train, test).to_pandas()

    plain = table()
    original = model.forward
    model._original_forward = original  # (as accelerate leaves a model after Trainer.train() with bf16)
    model.forward = wrapper = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(original))
    with caplog.at_level(logging.INFO, logger="hf_fastif.mode"):  # (its own level: the suite's may be WARNING)
        wrapped = table()
    assert "accelerate's mixed-precision autocast" in caplog.text and "several dtypes" not in caplog.text
    assert model.forward is wrapper
    np.testing.assert_array_equal(wrapped.influence.to_numpy(), plain.influence.to_numpy())


def test_a_build_resumes_with_the_adapter_loaded_again(tmp_path):
    """The build's manifest records the modules' state, which held PEFT's adapter configs: loaded again
    (`PeftModel.from_pretrained`), the same adapter has `inference_mode` set and a `modules_to_save` list that
    loading extended in place, so its build was refused as another. It resumes, to the same values."""
    import shutil

    from hf_fastif import build_influence_table

    model, collator = _lora(), pad_collator_for_tests()
    base = tiny_model("bert", num_labels=3)  # (the same seed: _lora's base weights)
    train, test = make_token_dataset(12, seed=0, num_labels=3), make_token_dataset(4, seed=1, num_labels=3)
    args = _args(tmp_path, influence_solver="cg", influence_params=[r"lora_"])
    model.save_pretrained(tmp_path / "adapter")
    first = build_influence_table(model, train, test, tmp_path / "out", args, shard_size=2,
                                  data_collator=collator).to_pandas()
    shutil.rmtree(tmp_path / "out" / "shards" / "shard-00001")
    shutil.rmtree(tmp_path / "out" / "table")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).eval()
    again = build_influence_table(loaded, train, test, tmp_path / "out", args, shard_size=2, data_collator=collator)
    assert again.metadata["build"]["resumed_shards"] == 1
    np.testing.assert_allclose(again.to_pandas().influence, first.influence, rtol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2-lm", "llama"])
def test_the_trainers_own_loss_check_counts_a_prompt_tuned_lms_items_as_the_trainer_does(tmp_path, kind):
    """A prompt-tuned causal LM's first label is a target (predicted from the last virtual token). The own-loss check
    gave a compute_loss_func of transformers' documented form (its token losses summed / num_items_in_batch), and
    an override returning ``super()``'s loss, the labels counted after the first position, where the Trainer
    counts them all for GPT-2 (its loss type unset) and after the first for Llama: each was named as another loss
    than the model's (a review: 4.81 against 4.11, 17% off). The trained loss now gets the Trainer's own count, and
    the model's own loss is taken both with it and as the batch's mean."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    counts = []

    def documented(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, -labels.size(1) - 1:-1]  # (the last virtual token predicts the first label)
        counts.append(int(num_items_in_batch))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               reduction="sum") / num_items_in_batch

    class Counting(InfluenceTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts.append(None if num_items_in_batch is None else int(num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def base():
        if kind == "gpt2-lm":
            return tiny_model("gpt2-lm")
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2))

    train = make_token_dataset(16, seed=0, causal=True)
    for make, func in ((InfluenceTrainer, documented), (Counting, None)):
        model = peft.get_peft_model(base(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        trainer = make(model=model.double().eval(), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=16,
                                                                save_strategy="no", logging_strategy="no"),
                       train_dataset=train, data_collator=_lm_collator(), compute_loss_func=func)
        counts.clear()
        compared = trainer._trainer_and_plain_loss(train)
        assert compared is not None and abs(compared[0] - compared[1]) <= 1e-9 * abs(compared[1]), (make, compared)
        assert trainer._trained_loss(train) is None
        checked = counts[0]
        trainer.train()
        assert counts[-1] == checked  # (the count a training step on the same 16 rows gets)


def test_full_eval_rounding_float32_adapters_on_a_bfloat16_base_is_named(tmp_path, monkeypatch):
    """bf16_full_eval's evaluate() rounds float32 LoRA adapters on a bfloat16 base to bfloat16 in place: the base
    being bfloat16 already hid it when the dtypes were compared model-wide (a review); weight by weight it is named,
    on every path that takes the model for influence (build_influence_table's too)."""
    from hf_fastif import trainer as trainer_module

    said = []
    monkeypatch.setattr(trainer_module.logger, "warning_once", lambda message, *a, **k: said.append(message))
    base = tiny_model("bert", num_labels=3, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    test = make_token_dataset(2, seed=9, num_labels=3)
    trainer = InfluenceTrainer(model=model, args=_args(tmp_path, bf16_full_eval=True), eval_dataset=test,
                               train_dataset=make_token_dataset(8, seed=8, num_labels=3),
                               data_collator=pad_collator_for_tests())
    trainer._influence_model()
    assert not [m for m in said if "bf16_full_eval" in m]  # (the base came in bfloat16)
    trainer.evaluate()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    table = trainer.build_influence_table(test, str(tmp_path / "build"))
    assert len(table) == 2 * 8
    assert [m for m in said if m.startswith("bf16_full_eval=True: the Trainer's evaluate()")]
