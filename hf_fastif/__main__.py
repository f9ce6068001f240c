"""``python -m hf_fastif``: the ``hf-fastif`` command line (`hf_fastif.cli`)."""

import sys

from .cli import main

sys.exit(main())
