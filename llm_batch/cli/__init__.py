"""The ``llm-batch`` command line: thin faces over the pipeline and the service.

llm-batch run JOB.yaml            run a job on a local Ray (``run.py``), or as a Ray
                                  job on the cluster of --address (``cluster.py``)
llm-batch tiny-model DIR          write a small deterministic model for tests and demos
                                  (--task generate|embed|classify, --labels for classify)
llm-batch serve | submit | status | cancel | demo
                                  the job service and its HTTP client (``service.py``)
llm-batch bench                   raw vLLM vs ray.data.llm vs this pipeline, one run
                                  (--task embed: embeddings)
"""

from __future__ import annotations

from llm_batch.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
