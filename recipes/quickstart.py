"""Quickstart: fine-tune a model on generated NLI data, then ask which training rows drove its mistakes.

    python recipes/quickstart.py            # embedded default (MiniLM, fine-tuned once and cached), offline, CPU
    python recipes/quickstart.py --embedded_model tiny --influence_knn_k 300 --num_test 5

Flags: QuickstartArguments and InfluenceArguments (--influence_*, --output_dir, --seed, --num_train_epochs, ...),
with the embedded default's settings (hf_fastif.embedded) as defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hf_fastif import InfluenceArguments
from hf_fastif.annotate import TextSource, save_with_text
from hf_fastif.applications import predict
from hf_fastif.distributed import finish, is_main_process
from hf_fastif.embedded import KINDS, embedded_data, embedded_defaults, embedded_kind, train_embedded
from hf_fastif.parsing import check_output_flag, parse_arguments


@dataclass
class QuickstartArguments:
    num_test: int = field(default=3, metadata={"help": "HANS-style test points to explain (spread over the mistakes)."})
    top: int = field(default=5, metadata={"help": "Helpful / harmful rows to print per test point."})
    embedded_model: str | None = field(default=None, metadata={
        "help": f"{' or '.join(KINDS)} (default minilm: fine-tuned once, then loaded from $HF_FASTIF_CACHE)."})

    def __post_init__(self):  # before any training: 0 failed after it, deep in the engine
        for name in ("num_test", "top"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")


def test_points(wrong: np.ndarray, n: int, total: int) -> np.ndarray:
    """``n`` distinct rows spread evenly over the mistakes ``wrong`` (over all ``total`` rows when there is none);
    every one of them, once, when there are fewer than ``n``."""
    pool = wrong if len(wrong) else np.arange(total)
    return np.unique(pool[np.linspace(0, len(pool) - 1, min(n, len(pool))).astype(int)])


def main(argv: list[str] | None = None) -> None:
    quick, args = parse_arguments(
        (QuickstartArguments, InfluenceArguments), argv,
        lambda first: embedded_defaults("table", first.embedded_model) | {"output_dir": "outputs/quickstart"})
    check_output_flag(args.output_dir, argv)  # an existing file: refused now, not when the table is saved
    # under `accelerate launch` every process computes (the influence call is collective) and saves (safe: one
    # writer of the folder at a time); the main process alone prints
    say = print if is_main_process() else (lambda *_, **__: None)
    settings = embedded_kind(quick.embedded_model)
    start = time.perf_counter()
    data = embedded_data(seed=args.seed, **settings.table_data, kind=settings.name)
    trainer, raw, tokenized = train_embedded(args=args, data=data, kind=settings.name)
    say(f"{settings.description}: a {sum(p.numel() for p in trainer.model.parameters()):,}-parameter BERT, ready on "
          f"{len(raw['train'])} generated NLI pairs in {time.perf_counter() - start:.0f}s")

    hans = tokenized["hans"]
    predictions = predict(trainer.model, hans, trainer.data_collator).argmax(-1)
    wrong = np.flatnonzero(predictions != np.asarray(hans["labels"]))
    say(f"HANS-style accuracy: {1 - len(wrong) / len(hans):.1%} ({len(wrong)} mistakes of {len(hans)})")
    rows = test_points(wrong, quick.num_test, len(hans))
    if len(rows) < quick.num_test:
        say(f"--num_test {quick.num_test}: there are {len(rows)} {'mistakes' if len(wrong) else 'test points'}; "
              "each is explained once")

    start = time.perf_counter()
    table = save_with_text(trainer.compute_influences(hans.select(rows)), f"{args.output_dir}/influence_table",
                           train=TextSource(raw["train"]), test=TextSource(raw["hans"].select(rows)),
                           model=trainer.model, model_name=settings.description, predictions=predictions[rows])
    n = len(raw["train"])
    scored = f"{args.influence_knn_k} candidates" if args.influence_knn_k and args.influence_knn_k < n else \
        f"all {n} training rows"
    say(f"influence of {scored} on {len(rows)} test points in {time.perf_counter() - start:.1f}s "
          f"(λ = {table.metadata['lambda']:g})\n")
    names = trainer.model.config.id2label
    for t, row in enumerate(rows):
        r = raw["hans"][int(row)]
        say(f"### test {t} [{r['heuristic']} / {r['subcase']}] gold {names[r['label']]}, "
              f"predicted {names[int(predictions[row])]}")
        say(f"    premise: {r['premise']}\n    hypothesis: {r['hypothesis']}")
        for title, frame in (("most helpful", table.helpful(t, quick.top)), ("most harmful", table.harmful(t, quick.top))):
            say(f"  {title}:")
            for _, x in frame.iterrows():
                say(f"    {x.influence:+.3e}  [{names[x.train_label]}] {x.train_premise} / {x.train_hypothesis}")
        say()
    say(f"saved the table to {args.output_dir}/influence_table (load it with InfluenceTable.load)")


if __name__ == "__main__":
    main()
    finish()  # under `accelerate launch`: close the process group before the interpreter exits
