"""hf_fastif: fast influence functions (FastIF) for Hugging Face transformers."""

__version__ = "0.1.0"

from .arguments import InfluenceArguments
from .builder import build_influence_table
from .engine import InfluenceEngine
from .influence import compute_influences
from .table import (
    DamagedShardError,
    InfluenceTable,
    InfluenceTableError,
    InfluenceTableWriter,
    ModelMismatchError,
    dataset_card,
    read_metadata,
)
from .trainer import InfluenceTrainer

__all__ = ["InfluenceArguments", "InfluenceTrainer", "InfluenceEngine", "InfluenceTable", "compute_influences", "build_influence_table",
           "InfluenceTableError", "DamagedShardError", "InfluenceTableWriter", "ModelMismatchError", "read_metadata", "dataset_card",
           "__version__"]
