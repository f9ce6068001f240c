"""Quickstart: train a small model on generated NLI data, then ask which training rows drove its mistakes.

    python recipes/quickstart.py            # embedded default, offline, ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from hf_fastif.embedded import train_embedded


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where the influence table goes."})
    seed: int = field(default=0, metadata={"help": "Seed of data, model and influence."})
    num_test: int = field(default=3, metadata={"help": "HANS-style test points to explain."})
    top: int = field(default=5, metadata={"help": "Helpful / harmful rows to print per test point."})


def main():
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses()
    start = time.perf_counter()
    trainer, raw, tokenized = train_embedded(f"{args.output_dir}/model", seed=args.seed)
    print(f"trained a {sum(p.numel() for p in trainer.model.parameters()):,}-parameter BERT on "
          f"{len(raw['train'])} generated NLI pairs in {time.perf_counter() - start:.0f}s")

    hans = tokenized["hans"]
    predictions = trainer.predict(hans).predictions.argmax(-1)
    wrong = np.flatnonzero(predictions != np.asarray(hans["labels"]))
    print(f"HANS-style accuracy: {1 - len(wrong) / len(hans):.1%} ({len(wrong)} mistakes of {len(hans)})")
    rows = wrong[np.linspace(0, len(wrong) - 1, args.num_test).astype(int)] if len(wrong) else np.arange(args.num_test)
    test = hans.select(rows)

    start = time.perf_counter()
    table = trainer.compute_influences(test).add_text(raw["train"], raw["hans"].select(rows),
                                                      columns=("premise", "hypothesis", "label"))
    print(f"influence of {trainer.influence_args.influence_knn_k} kNN candidates on {len(rows)} test points "
          f"in {time.perf_counter() - start:.1f}s (λ = {table.metadata['lambda']:g})\n")
    names = trainer.model.config.id2label
    for t, row in enumerate(rows):
        r = raw["hans"][int(row)]
        print(f"### test {t} [{r['heuristic']} / {r['subcase']}] gold {names[r['label']]}, "
              f"predicted {names[int(predictions[row])]}")
        print(f"    premise: {r['premise']}\n    hypothesis: {r['hypothesis']}")
        for title, frame in (("most helpful", table.helpful(t, args.top)), ("most harmful", table.harmful(t, args.top))):
            print(f"  {title}:")
            for _, x in frame.iterrows():
                print(f"    {x.influence:+.3e}  [{names[x.train_label]}] {x.train_premise} / {x.train_hypothesis}")
        print()
    path = table.save(f"{args.output_dir}/influence_table")
    print(f"saved the table to {path} (load it with InfluenceTable.load)")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
