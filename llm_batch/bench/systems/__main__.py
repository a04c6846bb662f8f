"""``python -m llm_batch.bench.systems SYSTEM RUN.json``: run one system, write its result."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from pathlib import Path

from llm_batch.bench.systems import SYSTEMS
from llm_batch.bench.systems.common import write_result

_MODULES = {
    "raw": "llm_batch.bench.systems.raw_vllm",
    "ray-data-llm": "llm_batch.bench.systems.ray_data_llm",
    "llm-batch": "llm_batch.bench.systems.llm_batch_job",
}


def main(argv: list[str]) -> int:
    # The harness reads the clock from here on; interpreter start-up is in its wall time.
    started = time.monotonic()
    if len(argv) != 2 or argv[0] not in SYSTEMS:
        print(f"usage: python -m llm_batch.bench.systems {{{','.join(SYSTEMS)}}} RUN.json")
        return 2
    system, run_file = argv
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = json.loads(Path(run_file).read_text(encoding="utf-8"))
    result = importlib.import_module(_MODULES[system]).run(cfg)
    result.update(system=system, started_at=started, finished_at=time.monotonic())
    write_result(cfg["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
