"""Influence tables: the query API (`table.py`), the rows on disk (`storage.py`), the Hub (`hub.py`), the
dataset card (`card.py`), and what the format is (`format.py`). See docs/tables.md."""

from .card import dataset_card
from .format import (
    CARD_FILE,
    DATA_DIR,
    METADATA_FILE,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    DamagedShardError,
    InfluenceTableError,
    ModelMismatchError,
)
from .storage import InfluenceTableWriter, read_metadata
from .table import InfluenceTable

__all__ = ["InfluenceTable", "InfluenceTableError", "DamagedShardError", "ModelMismatchError", "InfluenceTableWriter",
           "read_metadata", "dataset_card", "SCHEMA_VERSION", "REQUIRED_COLUMNS", "METADATA_FILE", "CARD_FILE", "DATA_DIR"]
