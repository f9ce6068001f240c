"""The dataset card (``README.md``) of an influence table: YAML the Hub indexes, and a text that says what the
table is, how it was made and how to load it (with or without hf_fastif)."""

from __future__ import annotations

from collections.abc import Sequence

from huggingface_hub import DatasetCard, DatasetCardData

from ..utils import markdown_table
from .format import DATA_DIR, DEFAULT_LICENSE, REQUIRED_COLUMNS, candidate_pool


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket of a row count."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if rows < bound:
            return name
    return "n>1B"


def dataset_card(metadata: dict, rows: int, *, repo_id: str | None = None, license: str = DEFAULT_LICENSE,
                 columns: Sequence[str] = REQUIRED_COLUMNS) -> DatasetCard:
    """A `huggingface_hub.DatasetCard`: YAML (license, tags, the parquet config, the influence settings) and a
    text saying what the table is, how it was made and how to load it."""
    settings = metadata.get("settings") or {}
    model = metadata.get("model") or {}
    name = model.get("name_or_path") or "unknown"
    train, test = metadata.get("train_data") or {}, metadata.get("test_data") or {}
    pool = (metadata.get("candidate_data") or {}) if candidate_pool(metadata) else None
    influence = {
        "model": name, "model_revision": model.get("revision"),
        "train_data": train.get("name"), "train_split": train.get("split"), "train_fingerprint": train.get("fingerprint"),
        "test_data": test.get("name"), "test_split": test.get("split"), "test_fingerprint": test.get("fingerprint"),
        **({"candidate_data": pool.get("name"), "candidate_split": pool.get("split"),
            "candidate_fingerprint": pool.get("fingerprint")} if pool is not None else {}),
        "combine": metadata.get("combine"), "lambda": metadata.get("lambda"),
        "settings": settings, "library_version": metadata.get("library_version"),
        "schema_version": metadata.get("schema_version"), "created_at": metadata.get("created_at"),
    }
    data = DatasetCardData(
        license=license, size_categories=size_category(rows), pretty_name=f"Influence table of {name}",
        tags=["influence-functions", "fastif", "hf_fastif", "interpretability"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        influence={k: v for k, v in influence.items() if v is not None},
    )
    repo = repo_id or "<user>/<repo>"
    extra = [c for c in columns if c not in REQUIRED_COLUMNS]
    functions = metadata.get("functions") if isinstance(metadata.get("functions"), dict) else {}
    measurement, loss = functions.get("measurement_fn"), functions.get("loss_fn")
    if isinstance(measurement, dict):  # another test quantity than the loss: its sign reads the other way for a score
        sign = (f"- `influence = -∇L(z_train) · s_test`, `s_test = (H + λI)⁻¹ ∇m(z_test)`, m the measurement "
                f"`{measurement.get('name')}`: negative means upweighting the training row lowers m (helpful when a "
                "lower m is better).")
    else:
        sign = ("- `influence = -∇L(z_train) · s_test`, `s_test = (H + λI)⁻¹ ∇L(z_test)`: **negative is helpful** "
                "(upweighting the training row lowers the test loss), positive is harmful.")
    if isinstance(loss, dict):
        sign += f" L is the loss `{loss.get('name')}`."
    # a pool table's train_id is a row of the pool, not of the training data (it was called that, and the training
    # data's row count did not match it); a combine="mean" table's one test_id is the mean over the test rows with a target
    train_id = ("row of the candidate pool: the rows scored, not the training data whose Hessian they were scored "
                "with" if pool is not None else "row of the training data")
    diagnostics = metadata.get("diagnostics") if isinstance(metadata.get("diagnostics"), dict) else {}
    counted = diagnostics.get("mean_over_rows")  # the rows with a target (unlabelled ones are not in the mean)
    total = test.get("num_rows")
    test_rows = (f"{counted:,} rows with a target of the {total:,} rows of the " if isinstance(counted, int)
                 and isinstance(total, int) and counted != total
                 else f"{total:,} rows of the " if isinstance(total, int) else "rows of the ")
    test_id = (f"0: the mean over the {test_rows}test data, combine='mean'"
               if metadata.get("combine") == "mean" else "row of the test data")
    body = [
        f"# Influence table of `{name}`",
        "",
        "For each test example, the training examples that most helped or hurt the model's prediction on it: "
        "influence functions (Koh & Liang, 2017) made fast with FastIF (Guo et al., 2021: kNN candidates, "
        f"fast inverse-Hessian-vector products), computed with `hf_fastif` {metadata.get('library_version', '')}.",
        "",
        f"- Rows: {rows}. Columns: `test_id` ({test_id}), `train_id` ({train_id}), `influence`"
        + (f", and {', '.join(f'`{c}`' for c in extra)}" if extra else "") + ".",
        sign,
        "",
        "## How it was made",
        "",
        f"- Model: `{name}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else "")
        + (f", {model['num_parameters']:,} parameters" if isinstance(model.get("num_parameters"), int) else ""),
        f"- Training data: {train.get('name') or 'unnamed'} (split {train.get('split')}, fingerprint "
        f"`{train.get('fingerprint')}`, {train.get('num_rows')} rows)"
        + (": the rows of the Hessian, not the rows scored" if pool is not None else ""),
        *([f"- Candidate pool: {pool.get('name') or 'unnamed'} (split {pool.get('split')}, fingerprint "
           f"`{pool.get('fingerprint')}`, {pool.get('num_rows')} rows): the rows scored, which `train_id` indexes"]
          if pool is not None else []),
        f"- Test data: {test.get('name') or 'unnamed'} (split {test.get('split')}, fingerprint "
        f"`{test.get('fingerprint')}`, {test.get('num_rows')} rows)",
        f"- λ = damping × scale = {metadata.get('lambda')}; created {metadata.get('created_at')}",
        "",
        markdown_table(["setting", "value"], list(settings.items())),
        "",
        "## Load",
        "",
        "```python",
        "from hf_fastif import InfluenceTable",
        f'table = InfluenceTable.from_hub("{repo}")',
        "table.describe(test_id=0)        # how many candidates are helpful / harmful / zero",
        "table.helpful(test_id=0, n=10)   # negative influence only, most helpful first",
        "table.harmful(test_id=0, n=10)   # positive influence only, most harmful first",
        "",
        "# or without hf_fastif:",
        "from datasets import load_dataset",
        f'rows = load_dataset("{repo}", split="train")',
        "```",
        "",
        f"or in a terminal: `hf-fastif show {repo} --test-id 0`.",
        "",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
