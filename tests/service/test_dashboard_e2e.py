"""The dashboard in a real browser, on the real service, Ray and vLLM CPU engine.

Headless Chromium (Debian's ``chromium`` package, which ``make test`` installs when it
is missing) driven by Playwright: a labeling job is submitted through the page's form,
its progress bar is watched until it reaches 100%, then its page must show the live
metrics (confusion matrix, throughput chart, engines, first rows). A screenshot is
saved as ``artifacts/dashboard.png``. ``/metrics`` is then read for the same job.

Reuses the session's service (``tests/service/conftest.py``); the job is small, most of
its time is its engine starting.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
CHOICES = ["positive", "negative", "neutral"]
ROWS = 240
KEY = "dashboard-test-key"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package "
            "(apt-get install chromium) and that could not be done on this machine"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def job_file(root: Path, model: Path) -> str:
    """A labeling job as a person would paste it: YAML, a label column, choice-constrained."""
    words = ["great", "awful", "fine", "broken", "lovely", "meh"]
    table = pa.table(
        {
            "id": list(range(ROWS)),
            "text": [f"the {words[i % 6]} thing number {i}" for i in range(ROWS)],
            "label": [CHOICES[(i * 7) % 3] for i in range(ROWS)],
        }
    )
    pq.write_table(table, root / "reviews.parquet")
    return f"""\
# submitted through the dashboard's form
name: dashboard-labels
input:
  path: {root / "reviews.parquet"}
prompt:
  template: "Review: {{{{ text }}}}\\nSentiment:"
model:
  path: {model}
  engine: {{max_model_len: 512, dtype: bfloat16, enforce_eager: true}}
  batch_size: 32
sampling:
  max_tokens: 8
  structured: {{choice: [{", ".join(CHOICES)}]}}
metrics:
  label_column: label
carryover: [id, text, label]
"""


def test_submit_watch_and_inspect_a_job_in_the_browser(service, tiny_model, browser):
    # Inside the service's data folder, which is always one of its storage roots.
    root = service.data_dir / "dashboard-test"
    root.mkdir(exist_ok=True)
    model = shutil.copytree(tiny_model, root / "model", dirs_exist_ok=True)
    text = job_file(root, model)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    api_calls: list[tuple[str, str | None]] = []
    page.on(
        "request",
        lambda r: (
            api_calls.append((r.url, r.headers.get("authorization"))) if "/v1/" in r.url else None
        ),
    )

    page.goto(service.url + "/")
    # A key typed once is kept and sent on every call (this service has no keys: it
    # ignores the header, but the page cannot know that).
    page.wait_for_selector("table.jobs, .empty")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_timeout(100)
    api_calls.clear()  # the calls from here on
    page.click("a[data-nav=submit]")
    page.fill("#job-text", text)
    page.click("#submit-job")

    link = page.wait_for_selector(".notice a[href^='#/jobs/']", timeout=60_000)
    job_id = link.get_attribute("href").removeprefix("#/jobs/")
    bar = f"tr[data-job-id='{job_id}'] [role=progressbar]"
    seen = {page.get_attribute(bar, "aria-valuenow")}
    deadline = time.monotonic() + 600  # an engine starts in tens of seconds, or minutes
    while page.get_attribute(bar, "aria-valuenow") != "100":
        assert time.monotonic() < deadline, f"progress stuck at {sorted(seen)}"
        status = page.text_content(f"tr[data-job-id='{job_id}'] .badge")
        assert status not in ("failed", "cancelled"), page.text_content("main")
        page.wait_for_timeout(250)
        seen.add(page.get_attribute(bar, "aria-valuenow"))
    page.wait_for_selector(f"tr[data-job-id='{job_id}'] .badge.succeeded", timeout=30_000)
    assert "0" in seen, "the bar should start empty"

    page.click(f"tr[data-job-id='{job_id}'] td.name a")
    page.wait_for_selector("table.confusion", timeout=30_000)
    page.wait_for_selector("table.rows tbody tr", timeout=30_000)
    assert page.text_content("#job-name") == "dashboard-labels"
    assert page.get_attribute("#job-progress [role=progressbar]", "aria-valuenow") == "100"
    header = page.locator("table.confusion thead th").all_text_contents()
    assert set(CHOICES) <= set(header)
    truth = page.locator("table.confusion tbody th").all_text_contents()
    assert sorted(truth) == sorted(CHOICES)
    cells = [
        int(c.replace(",", "")) for c in page.locator("table.confusion td").all_text_contents()
    ]
    assert sum(cells) == ROWS
    assert page.text_content("#accuracy-default").endswith("%")
    # A short job reports within a second or two: a curve needs two points of the series.
    series = httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json()["progress"]["series"]
    curve = page.locator("#throughput svg path.line").count()
    assert curve == (1 if len(series) >= 2 else 0), page.text_content("#throughput")
    assert len(page.locator("table.rows tbody tr").all()) == 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The engine pool that served the job, warm after it, on the engines page.
    page.click("a[data-nav=engines]")
    pool_row = page.wait_for_selector("table.engines tr[data-pool-id]", timeout=30_000)
    pools = httpx.get(f"{service.url}/v1/engines", timeout=30).json()["data"]
    mine = [p for p in pools if p["path"] == str(model)]
    assert len(mine) == 1 and mine[0]["state"] == "running", pools
    assert page.locator(f"tr[data-pool-id='{mine[0]['id']}'] .badge.running").count() == 1
    assert pool_row is not None
    page.screenshot(path=str(ARTIFACTS / "engines.png"), full_page=True)

    assert not problems, problems
    assert api_calls and all(auth == f"Bearer {KEY}" for _, auth in api_calls), api_calls

    # The job resource the page drew from, and the engines' vLLM stats in it.
    job = httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json()
    progress = job["progress"]
    assert progress["rows_done"] == ROWS and len(progress["series"]) >= 1
    assert progress["metrics"]["default"]["labels"]["rows"] == ROWS
    engine = progress["engines"][0]
    assert engine["ttft_count"] == ROWS and engine["ttft_sum"] > 0
    assert 0 <= engine["kv_cache_usage"] <= 1

    # And /metrics for it.
    samples: dict[str, list[tuple[dict, float]]] = {}
    metrics = httpx.get(f"{service.url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))

    def one(name: str, **labels: str) -> float:
        found = [v for got, v in samples.get(name, []) if labels.items() <= got.items()]
        assert len(found) == 1, (name, labels)
        return found[0]

    ours = {"job_id": job_id, "model": "default"}
    assert one("llm_batch_job_info", job_id=job_id, status="succeeded") == 1
    assert one("llm_batch_rows_done_total", **ours) == ROWS
    assert one("llm_batch_generation_latency_seconds_count", **ours) == ROWS
    assert 0 <= one("llm_batch_label_accuracy", **ours) <= 1
    assert one("llm_batch_job_duration_seconds_count", status="succeeded") >= 1
    assert one("llm_batch_jobs", status="succeeded") >= 1
    assert one("llm_batch_engine_pool_up", pool=mine[0]["id"], state="running") == 1
    assert one("llm_batch_engine_pool_replicas", pool=mine[0]["id"]) == 1
    routes = {
        labels["route"] for labels, _ in samples["llm_batch_http_request_duration_seconds_count"]
    }
    assert {"/", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results"} <= routes


# -- the page's own drawing, on a long series (no engine needed) ------------------------


@pytest.fixture(scope="module")
def static_service(tmp_path_factory):
    """The app without its scheduler, served over HTTP: jobs are put in its store by hand."""
    import threading

    import uvicorn

    from llm_batch.service.app import create_app
    from llm_batch.service.process import free_port
    from llm_batch.service.settings import Settings

    root = tmp_path_factory.mktemp("static-service")
    app = create_app(
        Settings(data_dir=root / "data", ray_dashboard_port=free_port()), run_scheduler=False
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}", app.state.service.store
    server.should_exit = True
    thread.join(30)


def test_throughput_chart_filters_and_cancel(static_service, browser):
    url, store = static_service
    spec = {"name": "long", "model": {"path": "m"}}
    # Two minutes at 50 rows/s and 200 output tokens/s, a point a second.
    series = [{"t": t, "rows_done": 50 * t, "output_tokens": 200 * t} for t in range(1, 121)]
    progress = {
        "rows_total": 10_000, "rows_done": 6000, "rows_failed": 0, "output_tokens": 24_000,
        "rows_per_second": 50.0, "output_tokens_per_second": 200.0, "eta_seconds": 80.0,
        "elapsed_seconds": 120.0, "series": series,
    }  # fmt: skip
    store.create(job_id="job_running", name="long", spec=spec, output_path="/nowhere/a")
    store.claim("job_running", submission_id="job_running")
    store.set_progress("job_running", progress)
    store.create(job_id="job_queued", name="waits", spec=spec, output_path="/nowhere/b")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/")
    page.wait_for_selector("tr[data-job-id=job_queued]")
    assert (
        page.get_attribute("tr[data-job-id=job_running] [role=progressbar]", "aria-valuenow")
        == "60"
    )
    page.click(".filters button[data-status=running]")
    page.wait_for_selector("tr[data-job-id=job_queued]", state="detached")
    assert page.locator("table.jobs tbody tr").count() == 1

    page.click("tr[data-job-id=job_running] td.name a")
    page.wait_for_selector("#throughput svg path.line", state="attached")  # flat: no height
    assert "latest 50.0" in page.text_content("#throughput")
    axis = page.locator("#throughput svg text").all_text_contents()
    assert {"0", "20", "40", "60", "30s", "1m 00s", "2m 00s"} <= set(axis)

    # Cancel asks twice, then the job is cancelling (the scheduler would stop its run).
    page.click("#cancel-job")
    assert page.text_content("#cancel-job") == "Click again to cancel"
    page.click("#cancel-job")
    page.wait_for_selector(".job-head .badge.cancelling")
    assert store.get("job_running").status == "cancelling"
    page.close()
