"""Silence `datasets`' own progress bars for the library's small internal operations."""

from __future__ import annotations

import contextlib

from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled


@contextlib.contextmanager
def quiet_datasets():
    """Within the block, datasets shows no progress bars (restored afterwards)."""
    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()
