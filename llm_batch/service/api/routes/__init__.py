"""One ``APIRouter`` per resource."""

from __future__ import annotations

from llm_batch.service.api.routes import health, jobs

__all__ = ["health", "jobs"]
