"""InfluenceTrainer: training is exactly the Trainer's; influence comes from the same engine."""

import numpy as np
import torch
from transformers import Trainer

from hf_fastif import InfluenceArguments, InfluenceTrainer, compute_influences
from tests.tiny import make_token_dataset, tiny_model


def arguments(tmp_path, **kw):
    return InfluenceArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=6,
                              per_device_train_batch_size=8, learning_rate=1e-3, save_strategy="no", seed=0,
                              logging_strategy="no", disable_tqdm=True, influence_solver="cg",
                              influence_damping=0.05, influence_scale=20.0, influence_knn_k=8,
                              influence_params=[r"pooler\.", r"classifier\."], **kw)


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


def test_a_loss_other_than_the_models_own_is_named(tmp_path, pad_collator, caplog):
    """Label smoothing (or a compute_loss_func) trains another loss than the one influence differentiates by
    default: said once, with the fix; an influence_loss_fn silences it."""
    import logging

    from transformers.utils import logging as hf_logging

    model, train = tiny_model("bert"), make_token_dataset(8, seed=0)
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        InfluenceTrainer(model=model, args=arguments(tmp_path, label_smoothing_factor=0.3), train_dataset=train,
                         data_collator=pad_collator)
        warned = caplog.text
        caplog.clear()
        InfluenceTrainer(model=model, args=arguments(tmp_path, label_smoothing_factor=0.3), train_dataset=train,
                         data_collator=pad_collator, influence_loss_fn=lambda outputs, batch: outputs.logits[:, 0])
    hf_logging.disable_propagation()
    assert "label_smoothing_factor=0.3" in warned and "influence_loss_fn" in warned
    assert "label_smoothing" not in caplog.text
