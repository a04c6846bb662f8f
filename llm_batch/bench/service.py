"""``llm-batch bench --service``: the job service on its warm, shared engine pools.

One run on one machine, in this order:

1. raw vLLM (``LLM.generate``) on the large-job workload's first ``--rows`` rows, as
   ``llm-batch bench`` runs it (its own process), for the steady-rate ratio;
2. ``llm-batch serve`` (a subprocess with its own local Ray head) offering the bench
   model as a warm catalog model; the time its pool takes to be ready;
3. a 10-row job on the warm pool, three times: ``POST /v1/jobs`` to ``succeeded`` as
   ``GET /v1/jobs/{id}`` sees it (polled every 50 ms);
4. eight 10-row jobs submitted together: until the last one has succeeded;
5. a large job alone (``--big-rows``), then the same job again with a 10-row job
   submitted every ``--small-every`` seconds while it runs: the large job's steady
   output tokens/s in each, and the small jobs' times;
6. a ``--rows`` job on the warm pool, three times: the median steady output tokens/s,
   against raw vLLM's;
7. raw vLLM again, the service stopped: the ratio is taken against the mean of 1. and 7.

Steady rates come from the jobs' own progress series (a point per batch answered, for a
job of this size), with ``timeline.steady_state`` as for ``llm-batch bench``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from llm_batch.bench.timeline import steady_state

__all__ = ["run_service_bench"]

logger = logging.getLogger(__name__)

SMALL_ROWS = 10
BURST = 8
STEADY_RUNS = 3


def _series_events(series: list[dict[str, Any]]) -> list[tuple[float, int]]:
    events, done = [], 0
    for point in series:
        new = int(point["output_tokens"]) - done
        if new > 0:
            events.append((float(point["t"]), new))
            done = int(point["output_tokens"])
    return events


def _steady(job: dict[str, Any]) -> float | None:
    steady = steady_state(_series_events(job["progress"].get("series") or []))
    return None if steady is None else round(steady.tokens_per_second, 1)


class _Client:
    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)

    def submit(self, body: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text}")
        return str(r.json()["id"])

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def wait(self, job_ids: list[str], *, every: float = 0.05, timeout: float = 3600) -> dict:
        """Poll until every job has ended; returns id → (job, seconds from the call)."""
        started = time.monotonic()
        ended: dict[str, tuple[dict[str, Any], float]] = {}
        while len(ended) < len(job_ids):
            for job_id in job_ids:
                if job_id in ended:
                    continue
                job = self.get(job_id)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    if job["status"] != "succeeded":
                        raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                    ended[job_id] = (job, time.monotonic() - started)
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"jobs not done after {timeout:.0f}s")
            time.sleep(every)
        return ended


def run_service_bench(
    config: Any, *, big_rows: int, small_every: float, small_job_rows: int | None = None
) -> dict[str, Any]:
    """Run the scenarios above; the report (also ``<out>/report.json``)."""
    from llm_batch.bench.harness import (
        _measure,
        _run_system,
        _sampling,
        check_shared_clock,
        job_dict,
        tiny_model_dir,
    )
    from llm_batch.bench.workload import PROMPT_COLUMN, generate_workload
    from llm_batch.pipeline.placement import default_batch_size
    from llm_batch.service.process import ServiceProcess

    check_shared_clock()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(config.model).resolve()) if config.model else str(tiny_model_dir())
    if config.batch_size is None:
        config = config.model_copy(update={"batch_size": default_batch_size(gpu=False)})
    big_spec = config.workload.model_copy(update={"rows": big_rows})
    logger.info("writing the workloads (%d rows)", big_rows)
    shutil.rmtree(out / "input", ignore_errors=True)
    big = generate_workload(big_spec, model, out / "input" / "big")
    rows = config.workload.rows
    table = pads.dataset(big.files, format=big_spec.format).to_table()
    (out / "input" / "steady").mkdir(parents=True)
    pq.write_table(table.slice(0, rows), out / "input" / "steady" / "part-0.parquet")
    pq.write_table(table.slice(0, SMALL_ROWS), out / "input" / "small.parquet")

    report: dict[str, Any] = {
        "model": model,
        "rows": rows,
        "big_rows": big_rows,
        "small_job_rows": small_job_rows,
    }

    # 1. raw vLLM on the steady workload, before the service holds an engine.
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.engine_args import build_engine_args

    job = job_dict(config, big, model, str(out / "raw" / "output"))
    model_spec = JobSpec.model_validate(job).model
    assert model_spec is not None
    engine_args = build_engine_args(model_spec.model_dump(), on_cpu=True)
    raw_cfg = {
        "model": model,
        "engine_args": engine_args,
        "sampling": _sampling(config.workload),
        "task": config.workload.task,
        "input": {"files": [str(out / "input" / "steady" / "part-0.parquet")], "format": "parquet"},
        "prompt_column": PROMPT_COLUMN,
        "carryover": big.carryover,
        "batch_size": config.batch_size,
        "replicas": 1,
        "on_cpu": True,
        "num_cpus": 4,
        "job": job,
    }

    class _W:  # _measure reads the workload's spec only for its own checks
        spec = config.workload

    def raw_steady(label: str) -> float:
        folder = out / label
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("raw vLLM on %d rows (%s)", rows, label)
        paths = {"output": str(folder / "output"), "result": str(folder / "result.json")}
        run = _run_system("raw", {**raw_cfg, **paths}, folder, config)
        if run.error:
            raise RuntimeError(f"raw vLLM failed: {run.error}")
        steady = _measure(run, _W())["steady_tokens_per_s"]  # type: ignore[arg-type]
        if steady is None:
            raise RuntimeError(f"raw vLLM ({label}): too few completions for a steady rate")
        return float(steady)

    raws = [raw_steady("raw")]

    # 2. the service, the bench model offered warm.
    block = dict(job["model"])
    (out / "models.yaml").write_text(yaml.safe_dump({"bench": {**block, "warm": True}}))
    service = ServiceProcess(
        out / "service-data",
        env={
            "LLM_BATCH_MODELS": str(out / "models.yaml"),
            "LLM_BATCH_STORAGE_ROOTS": str(out),
            "VLLM_LOGGING_LEVEL": "WARNING",
            **({} if small_job_rows is None else {"LLM_BATCH_SMALL_JOB_ROWS": str(small_job_rows)}),
        },
    )
    shutil.rmtree(out / "service-data", ignore_errors=True)

    def body(name: str, source: Path | str, output: str) -> dict[str, Any]:
        return {
            "name": name,
            "input": {"path": str(source), "format": "parquet"},
            "prompt": {"template": "{{ " + PROMPT_COLUMN + " }}"},
            "model": "bench",
            "sampling": _sampling(config.workload),
            "carryover": big.carryover,
            "output": {"path": str(out / "outputs" / output)},
            "cache": {"mode": "off"},  # the pool is measured: every job generates
        }

    shutil.rmtree(out / "outputs", ignore_errors=True)
    started = time.monotonic()
    service.start()
    try:
        client = _Client(service.url)
        while True:
            pools = client.http.get("/v1/engines").json()["data"]
            if pools and all(p["state"] == "running" for p in pools):
                break
            if any(p["state"] == "failed" for p in pools):
                raise RuntimeError(f"the pool failed to start: {pools}")
            time.sleep(0.2)
        report["service_and_pool_ready_s"] = round(time.monotonic() - started, 1)
        logger.info("service and warm pool ready in %.1fs", report["service_and_pool_ready_s"])

        # 3. a 10-row job on the warm pool.
        small_times = []
        for i in range(3):
            t0 = time.monotonic()
            job_id = client.submit(body(f"small-{i}", out / "input" / "small.parquet", f"s{i}"))
            client.wait([job_id])
            small_times.append(round(time.monotonic() - t0, 2))
        report["small_job_s"] = small_times
        logger.info("10-row job, warm pool: %s s", small_times)

        # 4. eight at once.
        t0 = time.monotonic()
        ids = [
            client.submit(body(f"burst-{i}", out / "input" / "small.parquet", f"b{i}"))
            for i in range(BURST)
        ]
        client.wait(ids)
        report["burst_all_done_s"] = round(time.monotonic() - t0, 2)
        logger.info("%d 10-row jobs together: %.2fs", BURST, report["burst_all_done_s"])

        # 5. the large job alone, then with small jobs coming and going.
        big_input = Path(big.input_path)
        alone_id = client.submit(body("big-alone", big_input, "big-alone"))
        alone = client.wait([alone_id], every=0.5)[alone_id][0]
        report["big_alone_steady_tokens_per_s"] = _steady(alone)
        shared_id = client.submit(body("big-shared", big_input, "big-shared"))
        while client.get(shared_id)["progress"]["rows_done"] == 0:
            time.sleep(0.2)
        latencies, n = [], 0
        while client.get(shared_id)["status"] in ("queued", "running"):
            t0 = time.monotonic()
            small = client.submit(body(f"beside-{n}", out / "input" / "small.parquet", f"x{n}"))
            client.wait([small])
            latencies.append(round(time.monotonic() - t0, 2))
            n += 1
            time.sleep(max(small_every - latencies[-1], 0))
        shared = client.wait([shared_id], every=0.5)[shared_id][0]
        report["big_shared_steady_tokens_per_s"] = _steady(shared)
        report["small_beside_big_s"] = latencies
        logger.info(
            "large job alone %s tok/s, beside %d small jobs %s tok/s; small jobs %s s",
            report["big_alone_steady_tokens_per_s"],
            len(latencies),
            report["big_shared_steady_tokens_per_s"],
            latencies,
        )

        # 6. the steady workload through the service, three times (its median).
        rates, walls = [], []
        for i in range(STEADY_RUNS):
            posted = time.monotonic()
            steady_id = client.submit(body(f"steady-{i}", out / "input" / "steady", f"st{i}"))
            steady = client.wait([steady_id], every=0.1)[steady_id][0]
            rates.append(_steady(steady))
            walls.append(round(time.monotonic() - posted, 2))
        report["service_steady_runs_tokens_per_s"] = rates
        report["service_steady_runs_s"] = walls
        report["service_steady_tokens_per_s"] = statistics.median(r or 0.0 for r in rates)
    finally:
        with contextlib.suppress(Exception):
            service.stop()
        service.stop_ray()

    # Raw vLLM again, the service down: this machine's speed drifts by a quarter within
    # minutes, so the ratio is taken against the raw runs on either side of the service's.
    raws.append(raw_steady("raw-after"))
    report["raw_runs_tokens_per_s"] = raws
    report["raw_steady_tokens_per_s"] = round(statistics.mean(raws), 1)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if not a or not b else round(a / b, 3)

    report["ratios"] = {
        "big_shared_over_alone": ratio(
            report["big_shared_steady_tokens_per_s"], report["big_alone_steady_tokens_per_s"]
        ),
        "service_over_raw": ratio(
            report["service_steady_tokens_per_s"], report["raw_steady_tokens_per_s"]
        ),
    }
    report["small_job_median_s"] = statistics.median(report["small_job_s"])
    if latencies:
        report["small_beside_big_max_s"] = max(latencies)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def render(report: dict[str, Any]) -> str:
    """The report as the README's table."""
    r = report["ratios"]
    beside = report.get("small_beside_big_s") or []
    lines = [
        "| scenario | measured | target |",
        "|---|---|---|",
        f"| 10-row job, warm pool, POST → succeeded | {report['small_job_median_s']:.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in report['small_job_s'])}) | ≤ 3 s |",
        f"| 8 jobs of 10 rows together, all succeeded | {report['burst_all_done_s']:.2f} s "
        "| ≤ 10 s |",
        f"| 10-row job beside a {report['big_rows']:,}-row job | "
        f"max {max(beside, default=float('nan')):.2f} s over {len(beside)} jobs | ≤ 10 s |",
        f"| the large job's steady tok/s beside them ÷ alone | "
        f"{r['big_shared_over_alone']} ({report['big_shared_steady_tokens_per_s']} ÷ "
        f"{report['big_alone_steady_tokens_per_s']}) | ≥ 0.9 |",
        f"| {report['rows']:,}-row job on a warm pool, steady tok/s ÷ raw vLLM | "
        f"{r['service_over_raw']} ({report['service_steady_tokens_per_s']:,.0f}, median of "
        f"{', '.join(f'{x or 0:,.0f}' for x in report['service_steady_runs_tokens_per_s'])}; "
        f"÷ {report['raw_steady_tokens_per_s']:,.0f}, mean of raw before and after: "
        f"{', '.join(f'{x:,.0f}' for x in report['raw_runs_tokens_per_s'])}) | ≥ 0.95 |",
    ]
    walls = report.get("service_steady_runs_s")
    if walls:
        from llm_batch.service.settings import Settings

        host_rows = report.get("small_job_rows")
        if host_rows is None:
            host_rows = Settings.model_fields["small_job_rows"].default
        where = "a driver of its own" if host_rows < report["rows"] else "the engine host"
        lines.append(
            f"| {report['rows']:,}-row job, POST → succeeded ({where}) | "
            f"{', '.join(f'{t:.2f}' for t in walls)} s | |"
        )
    return "\n".join(lines)
