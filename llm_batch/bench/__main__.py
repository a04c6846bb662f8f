"""``python -m llm_batch.bench [flags]``: the same as ``llm-batch bench [flags]``."""

from __future__ import annotations

import sys

from llm_batch.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
