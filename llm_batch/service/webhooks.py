"""Webhooks: the end of a job or batch POSTed to its receivers, at least once.

The store writes an ``Event`` row (``store.new_event``) in the very transaction that
ends the job or batch, so a crash between the two cannot lose the notice; this
sender delivers what is due, oldest first, and marks an event delivered once the
receiver answered 2xx. A failed call is tried again after 1, 2, 4 ... seconds (at
most an hour apart), ``MAX_ATTEMPTS`` times in all. A restarted service finds the
undelivered events in the database and goes on. Receivers see the same ``webhook-id``
on every try of one event, and deduplicate on it.

Calls are signed as Standard Webhooks (and OpenAI's webhooks) are: headers
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``), keyed with the
service's secret (``whsec_<base64>`` is decoded; any other text is used as it is).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from llm_batch.service.store import Event, JobStore, utcnow

__all__ = ["MAX_ATTEMPTS", "WebhookSender", "secret_bytes", "sign"]

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 12
_BACKOFF_CAP = 3600.0


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    def __init__(self, store: JobStore, *, secret: str, timeout: float = 10.0):
        self._sessions = sessionmaker(store.engine, expire_on_commit=False)
        self.secret = secret
        self.timeout = timeout
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-batch-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            while not self._stopping.is_set():
                try:
                    self.send_due(client)
                except Exception:
                    logger.exception("webhook pass failed; retrying")
                self._wake.wait(1.0)
                self._wake.clear()

    def send_due(self, client: httpx.Client) -> int:
        """Try every event that is due; returns how many were delivered."""
        now = utcnow()
        with self._sessions() as s:
            due = list(
                s.scalars(
                    select(Event)
                    .where(Event.next_at.is_not(None), Event.next_at <= now)
                    .order_by(Event.created_at, Event.id)
                    .limit(50)
                )
            )
        delivered = 0
        for event in due:
            if self._stopping.is_set():
                break
            delivered += self._send(client, event)
        return delivered

    def _send(self, client: httpx.Client, event: Event) -> bool:
        body = json.dumps(event.payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "llm-batch-webhooks",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, event.id, timestamp, body),
        }
        error: str | None = None
        try:
            response = client.post(event.url, content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"the receiver answered {response.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        attempts = event.attempts + 1
        values: dict[str, object]
        if error is None:
            values = {"delivered_at": utcnow(), "next_at": None, "attempts": attempts}
        elif attempts >= MAX_ATTEMPTS:
            logger.warning(
                "webhook %s to %s: giving up after %d tries: %s",
                event.id,
                event.url,
                attempts,
                error,
            )
            values = {"next_at": None, "attempts": attempts, "last_error": error}
        else:
            delay = min(2.0 ** (attempts - 1), _BACKOFF_CAP)
            values = {
                "next_at": utcnow() + dt.timedelta(seconds=delay),
                "attempts": attempts,
                "last_error": error,
            }
        with self._sessions() as s, s.begin():
            s.execute(update(Event).where(Event.id == event.id).values(**values))
        return error is None
