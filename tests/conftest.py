"""Shared fixtures: tiny models built from configs and synthetic tokenized data. Fully offline."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# hf_fastif's cache (the extracted MiniLM, fine-tuned embedded models) is private to the test session: tests never
# read a model fine-tuned elsewhere, nor leave one behind
_CACHE = tempfile.mkdtemp(prefix="hf_fastif_test_cache_")
os.environ["HF_FASTIF_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and oversubscribed threads on a shared 2-core machine
# make them many times slower.
torch.set_num_threads(1)


@pytest.fixture
def pad_collator():
    from tests.tiny import pad_collator_for_tests

    return pad_collator_for_tests()
