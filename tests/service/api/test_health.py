"""``/healthz`` answers while the process lives; ``/readyz`` says what is not reachable."""

from __future__ import annotations


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_is_503_when_ray_is_not_reachable(client, settings):
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok"
    assert f"127.0.0.1:{settings.ray_dashboard_port}" in body["ray"]
    assert "not reachable" in body["ray"]
