"""The job service: a FastAPI front end, a durable job store, a scheduler running jobs on Ray.

llm-batch serve        the service (``create_app`` in ``app``)
llm-batch submit ...   its client (``client.JobsClient``)
"""

from __future__ import annotations

__all__: list[str] = []
