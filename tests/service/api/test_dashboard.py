"""What the dashboard needs from the API: its page and assets served by the service with
nothing from the internet, the first rows of a job (``limit``), and a YAML job file
submitted as it was pasted. The page in a real browser: ``tests/service/test_dashboard_e2e``.
"""

from __future__ import annotations

import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llm_batch.pipeline.manifest import Manifest
from llm_batch.service.api.routes.dashboard import STATIC_DIR

PARQUET = "application/vnd.apache.parquet"


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/static/nothing.js").status_code == 404


def test_nothing_is_loaded_from_elsewhere():
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} == {"index.html", "app.js", "style.css"}
    for f in files:
        text = f.read_text()
        # The SVG namespace is a name, not a fetch.
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)
        assert "@import" not in text and "cdn" not in text.lower(), f.name


@pytest.fixture
def job_with_rows(client, job_body, settings) -> str:
    job_id = client.post("/v1/jobs", json=job_body).json()["id"]
    out = settings.outputs_dir() / job_id
    out.mkdir(parents=True)
    ids = pa.array(range(300), pa.int64())
    table = pa.table({"id": ids, "generated_text": [f"text {i}" for i in range(300)]})
    pq.write_table(table.slice(0, 200), out / "part-a-000000.parquet")
    pq.write_table(table.slice(200), out / "part-a-000001.parquet")
    Manifest("test", files=["part-a-000000.parquet", "part-a-000001.parquet"]).write(str(out))
    store = client.app.state.service.store
    store.claim(job_id, submission_id=job_id)
    return job_id


@pytest.mark.parametrize("limit", [1, 10, 250, 1000])
def test_results_limit_gives_the_first_rows(client, job_with_rows, limit):
    r = client.get(f"/v1/jobs/{job_with_rows}/results", params={"limit": limit})
    assert r.status_code == 200
    ids = [json.loads(line)["id"] for line in r.text.splitlines() if line]
    assert ids == list(range(min(limit, 300)))
    r = client.get(
        f"/v1/jobs/{job_with_rows}/results", params={"limit": limit}, headers={"Accept": PARQUET}
    )
    assert pq.read_table(io.BytesIO(r.content)).column("id").to_pylist() == ids


def test_results_limit_must_be_positive(client, job_with_rows):
    r = client.get(f"/v1/jobs/{job_with_rows}/results", params={"limit": 0})
    assert r.status_code == 422 and "limit" in r.json()["detail"]


def test_a_yaml_job_file_is_accepted_as_pasted(client, job_body):
    text = "# pasted from a file\n" + yaml.safe_dump(job_body, sort_keys=False)
    r = client.post("/v1/jobs", content=text, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == job_body["name"]
    assert r.json()["spec"]["sampling"]["max_tokens"] == job_body["sampling"]["max_tokens"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: [unclosed\n", "not valid YAML or JSON"),
        ("- just\n- a list\n", "expected a JSON object"),
        ("a: &x [1, 2]\nb: *x\n", "aliases"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", "deeper than"),
        ("name: x\nsampling: {max_tokens: -1}\n", "sampling.max_tokens"),
    ],
)
def test_a_bad_yaml_job_file_is_a_422_that_says_why(client, body, message):
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422
    assert message in r.json()["detail"], r.json()["detail"]
