"""A client of the job service's REST API (httpx), used by ``llm-batch submit/status/cancel``.

Every refusal of the service comes back as ``ServiceError`` carrying the
service's one-line ``detail`` and the HTTP status; an unreachable service is
``ServiceUnavailable`` with a hint on how to start or find it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from llm_batch.errors import LLMBatchError
from llm_batch.service.errors import ServiceUnavailable

__all__ = ["DEFAULT_SERVER", "FINAL_STATUSES", "JobsClient", "ServiceError"]

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"


class ServiceError(LLMBatchError):
    """The service refused a request; ``str()`` is its ``detail``."""

    def __init__(self, message: str, *, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class JobsClient:
    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ):
        self.server = server.rstrip("/")
        # The key comes from the argument or LLM_BATCH_API_KEY, as the openai client does.
        api_key = api_key or os.environ.get("LLM_BATCH_API_KEY")
        self._http = httpx.Client(
            base_url=self.server,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            # Retries only connection failures; submissions carry an Idempotency-Key.
            transport=transport or httpx.HTTPTransport(retries=2),
        )

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise ServiceUnavailable(
                f"cannot reach the llm-batch service at {self.server} ({e}); start it with "
                "`llm-batch serve`, or point --server / LLM_BATCH_SERVER at it"
            ) from None
        _raise_for_status(response)
        return response

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()  # type: ignore[no-any-return]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def list(
        self, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if after:
            params["after"] = after
        return self._request("GET", "/v1/jobs", params=params).json()  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()  # type: ignore[no-any-return]

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/retry").json()  # type: ignore[no-any-return]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def rows(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's output rows, streamed as JSON lines."""
        for line in self._stream(job_id, accept="application/x-ndjson", lines=True):
            yield json.loads(line)

    def parquet(self, job_id: str) -> Iterator[bytes]:
        """The job's output rows as one Parquet file, in chunks."""
        yield from self._stream(job_id, accept=PARQUET_MEDIA_TYPE, lines=False)

    def _stream(self, job_id: str, *, accept: str, lines: bool) -> Iterator[Any]:
        try:
            with self._http.stream(
                "GET", f"/v1/jobs/{job_id}/results", headers={"Accept": accept}
            ) as response:
                if response.is_error:
                    response.read()
                    _raise_for_status(response)
                yield from (response.iter_lines() if lines else response.iter_bytes())
        except httpx.TransportError as e:
            raise ServiceUnavailable(f"lost the llm-batch service at {self.server}: {e}") from None

    def wait(
        self,
        job_id: str,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 1.0,
    ) -> dict[str, Any]:
        """Poll the job until it ends; returns its final resource."""
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINAL_STATUSES:
                return job
            time.sleep(interval)


def _raise_for_status(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        detail = f"{response.status_code} {response.reason_phrase}: {response.text[:500]}"
    raise ServiceError(detail, status_code=response.status_code)
