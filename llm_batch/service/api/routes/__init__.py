"""One ``APIRouter`` per resource."""

from __future__ import annotations

from llm_batch.service.api.routes import batches, files, health, jobs

__all__ = ["batches", "files", "health", "jobs"]
