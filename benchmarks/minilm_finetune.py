"""Sweep of the MiniLM default's fine-tuning: time per epoch, training accuracy and HANS-style accuracy per
heuristic and per subcase, for trainable layers x learning rates x epochs, on the generated NLI data.

    HF_HUB_OFFLINE=1 python benchmarks/minilm_finetune.py --n-train 2500 --layers 1 2 --lrs 5e-5 2e-4 \
        --epochs 1 2 3 --output-dir outputs/minilm_sweep

Writes ``results.json`` (every run, rewritten as each finishes) and ``results.md`` (the tables) to
--output-dir; ``--save LAYERS,LR,EPOCHS`` also saves that run's model with save_pretrained.
"""

from __future__ import annotations

import argparse
import math
import time
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from hf_fastif.applications.common import predict
from hf_fastif.data import HANS_HEURISTICS, generate_nli, tokenize_nli
from hf_fastif.minilm_default import finetune_minilm
from hf_fastif.pretrained import minilm_path
from hf_fastif.utils import markdown_table, to_json, write_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=2500)
    parser.add_argument("--n-hans-per-subcase", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 2e-4, 1e-3])
    parser.add_argument("--epochs", type=float, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs/minilm_sweep")
    parser.add_argument("--save", default=None, metavar="LAYERS,LR,EPOCHS",
                        help="Save the model of this run with save_pretrained under <output-dir>/model (compared as "
                             "numbers: 1,2e-4,1 is the run of --layers 1, --lrs 0.0002, --epochs 1).")
    args = parser.parse_args(argv)
    if args.save is not None:
        args.save = parse_save(parser, args)
    return args


def parse_save(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, float, float]:
    """``--save LAYERS,LR,EPOCHS`` as numbers, refused (argparse's error, before any training) unless it is one run
    of the sweep: compared as text, ``2e-4`` never matched the ``0.0002`` of the run and nothing was saved."""
    try:
        layers, lr, epochs = args.save.split(",")
        save = (int(layers), float(lr), float(epochs))
    except ValueError:
        parser.error(f"--save {args.save} is not LAYERS,LR,EPOCHS (e.g. --save 2,2e-4,1).")
    if not any(save_matches(save, *run) for run in product(args.layers, args.lrs, args.epochs)):
        parser.error(f"--save {args.save} matches no run of the sweep (--layers {' '.join(map(str, args.layers))}, "
                     f"--lrs {' '.join(f'{lr:g}' for lr in args.lrs)}, --epochs "
                     f"{' '.join(f'{e:g}' for e in args.epochs)}); nothing would be saved.")
    return save


def save_matches(save: tuple[int, float, float] | None, layers: int, lr: float, epochs: float) -> bool:
    """Whether the run (``layers``, ``lr``, ``epochs``) is the one ``--save`` names, compared as numbers."""
    return save is not None and save[0] == layers and math.isclose(save[1], lr) and math.isclose(save[2], epochs)


def evaluate(trainer, train_tokenized, hans_tokenized) -> dict:
    """Training accuracy, HANS-style accuracy overall / per heuristic (entailment, non_entailment) / per subcase."""
    collator = DataCollatorWithPadding(trainer.processing_class)
    model = trainer.model
    train_pred = predict(model, train_tokenized, collator).argmax(-1)
    hans_pred = predict(model, hans_tokenized, collator).argmax(-1)
    hans = hans_tokenized.select_columns(["labels", "heuristic", "subcase"]).to_pandas()
    hans["correct"] = hans_pred == hans["labels"].to_numpy()
    result = {"train_accuracy": float(np.mean(train_pred == np.asarray(train_tokenized["labels"]))),
              "hans_accuracy": float(hans["correct"].mean())}
    for heuristic in HANS_HEURISTICS:
        for label, name in ((0, "entailment"), (1, "non_entailment")):
            rows = hans[(hans["heuristic"] == heuristic) & (hans["labels"] == label)]
            result[f"{heuristic}_{name}"] = float(rows["correct"].mean())
    result["subcases"] = hans.groupby("subcase")["correct"].mean().round(3).to_dict()
    return result


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = minilm_path()
    raw = generate_nli(seed=args.seed, n_train=args.n_train, n_hans_per_subcase=args.n_hans_per_subcase,
                       n_pool_per_subcase=0)
    runs = []
    for layers in args.layers:
        for lr in args.lrs:
            for epochs in args.epochs:
                start = time.perf_counter()
                trainer = finetune_minilm(raw["train"], out / "run", seed=args.seed, trainable_layers=layers,
                                          epochs=epochs, lr=lr, batch_size=args.batch_size, save=False,
                                          minilm_folder=folder, use_cpu=True)
                train_s = time.perf_counter() - start
                hans = tokenize_nli(raw["hans"], trainer.processing_class)
                start = time.perf_counter()
                run = {"layers": layers, "lr": lr, "epochs": epochs, "train_s": round(train_s, 1),
                       "s_per_epoch": round(train_s / epochs, 1),
                       **evaluate(trainer, trainer.train_dataset, hans)}
                run["eval_s"] = round(time.perf_counter() - start, 1)
                runs.append(run)
                print(to_json({k: v for k, v in run.items() if k != "subcases"}), flush=True)
                write_atomic(out / "results.json", to_json(runs, indent=1))
                if save_matches(args.save, layers, lr, epochs):
                    trainer.save_model(str(out / "model"))
    table = pd.DataFrame(runs)
    write_atomic(out / "results.md", report(table, args))
    return table


def report(table: pd.DataFrame, args: argparse.Namespace) -> str:
    """The sweep as two markdown tables: one row per run, and accuracy per subcase (columns = runs)."""
    columns = ["layers", "lr", "epochs", "s_per_epoch", "train_accuracy", "hans_accuracy",
               *[f"{h}_{n}" for h in HANS_HEURISTICS for n in ("entailment", "non_entailment")]]
    pct = lambda v: f"{100 * v:.0f}" if isinstance(v, float) and v <= 1 else str(v)  # noqa: E731
    header = ["layers", "lr", "epochs", "s/epoch", "train %", "HANS %",
              *[f"{h[:3]} {n[:3] if n == 'entailment' else 'non'} %" for h in HANS_HEURISTICS
                for n in ("entailment", "non_entailment")]]
    rows = [[f"{r['lr']:g}" if c == "lr" else (r[c] if c in ("layers", "epochs", "s_per_epoch") else pct(r[c]))
             for c in columns] for _, r in table.iterrows()]
    subcases = sorted(table["subcases"].iloc[0])
    names = [f"L{r['layers']} {r['lr']:g} e{r['epochs']:g}" for _, r in table.iterrows()]
    sub_rows = [[s, *[f"{100 * r['subcases'][s]:.0f}" for _, r in table.iterrows()]] for s in subcases]
    return (f"n_train={args.n_train}, HANS-style rows per subcase={args.n_hans_per_subcase}, seed={args.seed}, "
            f"torch threads={args.threads}\n\n" + markdown_table(header, rows) + "\n\nAccuracy % per subcase:\n\n"
            + markdown_table(["subcase", *names], sub_rows) + "\n")


if __name__ == "__main__":
    main()
