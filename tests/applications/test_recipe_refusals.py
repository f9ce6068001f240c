"""Recipe input refused before any work: an --output_dir that is a file, a --simulator checkpoint the steps cannot use
(a base model, another tokenizer, fewer positions), a --max_length past the model's positions; and what
--trainable_layers freezes on architectures other than BERT."""

import importlib
import re

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    OPTConfig,
    OPTForSequenceClassification,
    XLNetConfig,
    XLNetForSequenceClassification,
)
from transformers.testing_utils import CaptureLogger

from hf_fastif.data import build_tokenizer, nli_vocabulary

from .conftest import TINY_FLAGS, load_recipe, tiny_config

prepare_module = importlib.import_module("hf_fastif.applications.prepare")  # the package exports a function so named
simulatability_module = importlib.import_module("hf_fastif.applications.simulatability")


def _no_work(*args, **kwargs):
    raise AssertionError("the recipe started its work")


# each recipe and the first step of its work: a refusal must come before it
FIRST_WORK = [("hans_correction", "prepare"), ("augmentation", "load_pool"), ("simulatability", "load_test_points"),
              ("visualize", "prepare"), ("quickstart", "embedded_data")]


@pytest.mark.parametrize("recipe, first_work", FIRST_WORK, ids=[name for name, _ in FIRST_WORK])
def test_an_output_dir_that_is_a_file_is_refused_before_any_work(recipe, first_work, tmp_path, monkeypatch):
    """The recipes ran the whole protocol, then failed in write_results with FileExistsError: every result lost."""
    module = load_recipe(recipe)
    quick = "--embedded_model=tiny" if recipe == "quickstart" else "--quick"
    monkeypatch.setattr(module, first_work, _no_work)
    afile = tmp_path / "results.txt"
    afile.write_text("i am a file")
    with pytest.raises(ValueError, match="--output_dir .*results.txt' is an existing file, not a folder"):
        module.main([quick, "--output_dir", str(afile)])
    with pytest.raises(ValueError, match="--output_dir .* lies under .*results.txt', which is an existing file"):
        module.main([quick, "--output_dir", str(afile / "run1")])


@pytest.mark.parametrize("recipe, flags, message", [
    ("simulatability", ["--simulator", "/nonexistent/simulator"], "'/nonexistent/simulator' is not a local directory"),
    ("augmentation", ["--pool", "/nonexistent/pool.txt"], "No such file"),
    ("visualize", ["--model_name_or_path", "/nonexistent/model"], "'/nonexistent/model' is not a local directory"),
])
def test_a_bad_input_on_the_command_line_is_one_line_and_exit_status_2(recipe, flags, message, tmp_path, monkeypatch,
                                                                       capsys):
    """A simulator, pool or model that is not there, named on the real command line: one line and exit status 2,
    as a bad flag's parse (a new user's --simulator typo printed a traceback and exited with 1), before any model
    is built or trained."""
    import sys

    module = load_recipe(recipe)
    monkeypatch.setattr(prepare_module, "embedded_model", _no_work)
    monkeypatch.setattr(prepare_module, "train_embedded_model", _no_work)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", "--quick", "--output_dir", str(tmp_path), *flags])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    err = capsys.readouterr().err  # (the data's tokenization progress bars before it)
    last = err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith(f"{recipe}.py: error: ") and message in last, err
    assert "Traceback" not in err


def test_prepare_refuses_an_output_dir_that_is_a_file_before_loading_data(tmp_path, monkeypatch):
    """The library path (prepare, then write_report) too: refused before the data are loaded."""
    monkeypatch.setattr(prepare_module, "load_data", _no_work)
    data_args, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path)])
    afile = tmp_path / "afile"
    afile.write_text("x")
    args.output_dir = str(afile)
    with pytest.raises(ValueError, match="--output_dir .* is an existing file"):
        prepare_module.prepare(data_args, args)


def _save_classifier(folder, tokenizer):
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_simulator_the_steps_cannot_use_is_refused_before_any_work(tmp_path, files, monkeypatch):
    """A base model got a new random head, and a simulator with another vocabulary was fed the task model's token ids
    (other words, silently; or a bare IndexError after the influence): both ran to the end, unchecked."""
    monkeypatch.setattr(prepare_module, "_pretrained_model", _no_work)  # the task model is loaded after the checks
    monkeypatch.setattr(prepare_module, "embedded_model", _no_work)
    main = load_recipe("simulatability").main
    task = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", files["ckpt2"], "--train_dataset",
            files["mnli"], "--hans_file", files["hans"], "--influence_knn_k", "20"]
    with pytest.raises(ValueError, match=r"--simulator '.*base' is not a sequence-classification checkpoint "
                                         r"\(architectures \['BertForMaskedLM'\]\): it would get a new, random"):
        main([*task, "--simulator", files["base"]])
    # another vocabulary of about the same size: one more word shifts every word's id by one
    shifted = _save_classifier(tmp_path / "shifted", build_tokenizer(["aardvark", *nli_vocabulary()]))
    with pytest.raises(ValueError, match=r"tokenizes differently from the task model \(.* tokens have another id "
                                         r"or none in the simulator's .*--simulator trained or copy"):
        main([*task, "--simulator", shifted])
    # the same tokenizer but fewer positions than the task model's rows (the tiny embedded model: --max_length 128)
    with pytest.raises(ValueError, match=r"has 64 positions, fewer than --max_length 128"):
        main(["--quick", *TINY_FLAGS, "--output_dir", str(tmp_path / "out"), "--simulator", files["ckpt2"]])
    bare = tmp_path / "bare"  # saved without its tokenizer: named as such (it was "tokenizes differently")
    BertForSequenceClassification(tiny_config(build_tokenizer())).save_pretrained(bare)
    with pytest.raises(ValueError, match=r"has no tokenizer to check against the task model's; .*Save the tokenizer"):
        main([*task, "--simulator", str(bare)])
    ok = _save_classifier(tmp_path / "same", build_tokenizer())  # the task model's tokenizer, saved again: accepted
    with pytest.raises(AssertionError, match="started its work"):  # the checks pass; the task model is loaded
        main([*task, "--simulator", ok])


def test_different_token_ids_compares_the_vocabularies_then_encoded_pairs():
    """Two tokenizers with one vocabulary can still give other ids (here: one does not lower-case)."""
    from hf_fastif.applications.simulatability import different_token_ids

    task = build_tokenizer()
    assert different_token_ids(task, build_tokenizer(), [("The doctor danced.", "The doctor danced.")]) is None
    cased = build_tokenizer()
    cased.backend_tokenizer.normalizer = None
    found = different_token_ids(task, cased, [("the doctor danced.", "The doctor danced.")])
    assert "the pair 'the doctor danced.' / 'The doctor danced.'" in found
    found = different_token_ids(task, build_tokenizer(["aardvark", *nli_vocabulary()]), [])
    assert re.match(r"\d+ of the task tokenizer.s 143 tokens have another id or none in the simulator.s 144", found)


def test_max_length_is_refused_past_the_model_positions_and_defaults_to_them(tmp_path, files, monkeypatch):
    """The recipes neither capped nor refused it (hf-fastif build does): a bare tensor-size RuntimeError in the model
    report or the Trainer, after the data were loaded and the model trained."""
    seen = {}

    def load_data(data_args, seed):
        seen["max_length"] = data_args.max_length
        raise StopIteration

    monkeypatch.setattr(prepare_module, "load_data", load_data)
    visualize = load_recipe("visualize").main
    paper = ["--output_dir", str(tmp_path), "--model_name_or_path", files["ckpt2"], "--train_dataset", files["mnli"],
             "--hans_file", files["hans"]]  # ckpt2: 64 positions
    with pytest.raises(ValueError, match=r"--max_length 100 exceeds the 64 positions of '.*ckpt2'; use at most 64"):
        visualize([*paper, "--max_length", "100"])
    with pytest.raises(ValueError, match=r"--max_length 200 exceeds the 128 positions of the embedded model \(tiny\)"):
        visualize(["--quick", "--output_dir", str(tmp_path), "--max_length", "200"])
    assert seen == {}  # refused before any data were loaded
    for flags, expected in (([], 64), (["--max_length", "32"], 32)):  # unset: 128, or the model's positions if fewer
        with pytest.raises(StopIteration):
            visualize([*paper, *flags])
        assert seen.pop("max_length") == expected
    with pytest.raises(StopIteration):
        visualize(["--quick", "--output_dir", str(tmp_path)])
    assert seen.pop("max_length") == 128


ARCHITECTURES = {  # 4 layers each; what stays trainable outside the last 2 layers: final norm, pooler, head
    "bert": (lambda: BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)),
        {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}),
    "distilbert": (lambda: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=16, n_layers=4, n_heads=2, hidden_dim=32)),
        {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}),
    "gpt2": (lambda: GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=16, n_layer=4, n_head=2)),
             {"transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"}),
    "opt": (lambda: OPTForSequenceClassification(OPTConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=8)),
        {"model.decoder.project_out.weight", "model.decoder.final_layer_norm.weight",
         "model.decoder.final_layer_norm.bias", "score.weight"}),
    "xlnet": (lambda: XLNetForSequenceClassification(XLNetConfig(vocab_size=100, d_model=16, n_layer=4, n_head=2,
                                                                 d_inner=32)),
              {"sequence_summary.summary.weight", "sequence_summary.summary.bias", "logits_proj.weight",
               "logits_proj.bias"}),
    # the relative-position table every layer's attention reads stays trainable, as before
    "mpnet": (lambda: MPNetForSequenceClassification(MPNetConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)),
        {"mpnet.encoder.relative_attention_bias.weight", "classifier.dense.weight", "classifier.dense.bias",
         "classifier.out_proj.weight", "classifier.out_proj.bias"}),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_trainable_layers_freezes_the_embeddings_of_every_architecture(architecture):
    """Only modules named 'embeddings' were frozen: GPT-2's wte / wpe, OPT's embed_tokens / embed_positions and XLNet's
    word_embedding / mask_emb stayed trainable (and took part in influence)."""
    build, above = ARCHITECTURES[architecture]
    model = build()
    trainable = prepare_module.freeze_lower_layers(model, 2)
    layer = prepare_module._LAYER
    kept_layers = {int(m.group(1)) for name in trainable if (m := layer.search(name))}
    assert kept_layers == {2, 3}
    assert {name for name in trainable if not layer.search(name)} == above
    assert [name for name, p in model.named_parameters() if p.requires_grad] == trainable
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    embedding = model.get_input_embeddings().weight
    assert not embedding.requires_grad and any(p is embedding for name, p in model.named_parameters()
                                               if name in frozen)


def test_trainable_layers_outside_the_models_layers_is_refused():
    """--trainable_layers -1 ran as 0, and 100 trained every layer with the embeddings still frozen, without a word
    (MiniLM's path refused anything outside 0..6; the tiny and paper setups did not)."""
    from hf_fastif.applications.prepare import ModelDataArguments

    with pytest.raises(ValueError, match="--trainable_layers must be at least 0"):
        ModelDataArguments(trainable_layers=-1)
    model = ARCHITECTURES["mpnet"][0]()
    with pytest.raises(ValueError, match="--trainable_layers 100: MPNetForSequenceClassification has 4 layers; pass 0 "
                                         "to 4"):
        prepare_module.freeze_lower_layers(model, 100)
    assert all(p.requires_grad for p in model.parameters())  # (refused before anything was frozen)


def test_the_quick_flag_says_what_it_sets(tmp_path):
    """--quick's help said "1 epoch" after the smoke run became 3 epochs; it is written from the values now."""
    import dataclasses
    import re

    help_text = next(f for f in dataclasses.fields(prepare_module.ModelDataArguments) if f.name == "quick").metadata["help"]
    data_args, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path)])
    pattern = r"(\d+) training rows, ([\d.]+) epochs, k (\d+) \(simulatability: every row\), J (\d+)"
    rows, epochs, k, depth = (float(x) for x in re.search(pattern, help_text).groups())
    assert (rows, epochs, k, depth) == (data_args.max_train_samples, args.num_train_epochs, args.influence_knn_k,
                                        args.influence_recursion_depth)
    # simulatability's --quick scores every row: its 200 candidates were all helpful to every test point, and the
    # "harmful" group held the least helpful rows (a review's finding)
    *_, simulatability_args = prepare_module.parse_recipe(
        "simulatability", [simulatability_module.SimulatabilityArguments],
        ["--quick", "--output_dir", str(tmp_path)])
    assert simulatability_args.influence_knn_k is None


def test_a_base_models_new_head_is_seeded(files):
    """The head a base model gets when it is fine-tuned here was drawn from torch's unseeded state: one --seed gave
    other numbers each run (accuracy before correction 49.8 vs 50.3), and each process of a launch its own head."""
    import types

    heads = []
    for _ in range(2):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=torch.Generator().manual_seed(len(heads)))))
        model, trained = prepare_module._pretrained_model(types.SimpleNamespace(num_labels=2),
                                                          (files["base"], None, True), 2, seed=7)
        heads.append(model.classifier.weight.detach().clone())
    assert trained and torch.equal(heads[0], heads[1])


def test_training_under_a_cpu_launch_needs_use_cpu_and_splits_the_batch(tmp_path, monkeypatch):
    """Under `accelerate launch` on a machine without GPUs, TrainingArguments trains the processes together only with
    use_cpu: without it each process trained its own model, and the influence step refused them ("disagree on
    ['model']") after the whole fine-tuning. And the setup's batch was each process's: 2 processes took half the
    steps, and --quick's tiny model predicted one class (every HANS cell 50.0)."""
    from hf_fastif import distributed as D
    from hf_fastif.influence import default_arguments

    monkeypatch.setattr(D, "world", lambda: (0, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs --use_cpu"):
        prepare_module.check_launch_training(default_arguments(use_cpu=False))
    prepare_module.check_launch_training(default_arguments(use_cpu=True))
    _, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path)])
    assert args.per_device_train_batch_size == 16 and args.use_cpu  # the embedded setups' 32, shared
    _, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path),
                                                            "--per_device_train_batch_size", "32"])
    assert args.per_device_train_batch_size == 32  # a flag given wins
    # a process count that does not divide the batch: named (3 processes stepped on 30 rows, 64 on 64, unsaid)
    for processes, share, rows in ((3, 10, 30), (64, 1, 64)):
        monkeypatch.setattr(D, "world", lambda processes=processes: (0, processes))
        with CaptureLogger(prepare_module.logger) as captured:
            _, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path)])
        assert args.per_device_train_batch_size == share
        assert f"each takes {share}, so the optimizer steps on {rows} rows, not 32" in captured.out
    for given in ("8", "1"):  # (1: the share itself, given: it was warned of as if chosen for the user)
        with CaptureLogger(prepare_module.logger) as captured:
            prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path),
                                                          "--per_device_train_batch_size", given])
        assert "does not split evenly" not in captured.out
    monkeypatch.setattr(D, "world", lambda: (0, 1))
    _, args = prepare_module.parse_recipe("visualize", [], ["--quick", "--output_dir", str(tmp_path)])
    assert args.per_device_train_batch_size == 32


def test_recipes_pin_memory_only_with_an_accelerator(tmp_path, monkeypatch):
    """The paper's path trains with TrainingArguments' own device choice (no use_cpu): its DataLoader's memory is
    pinned only where an accelerator would use it (True had torch warn at every fine-tuning on a CPU); a flag
    given wins."""
    paper = ["--model_name_or_path", "some/model", "--output_dir", str(tmp_path)]
    for available in (False, True):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda available=available: available)
        _, args = prepare_module.parse_recipe("visualize", [], paper)
        assert args.dataloader_pin_memory is available and not args.use_cpu
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    _, args = prepare_module.parse_recipe("visualize", [], [*paper, "--dataloader_pin_memory", "True"])
    assert args.dataloader_pin_memory is True
