// llm_batch dashboard: plain JavaScript over the service's own REST API, no dependencies.
//
// Routes (in the URL's hash): #/ the job list, #/submit the submit form, #/jobs/<id> a job.
// Views poll the API while they are shown (and the tab is visible); every call carries the
// API key kept in localStorage, when one is set.
"use strict";

const KEY_STORAGE = "llm_batch.api_key";
const LIST_EVERY_MS = 2000;
const JOB_EVERY_MS = 1500;
const ROWS_EVERY_MS = 5000;
const PREVIEW_ROWS = 10;
const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);

// -- small helpers -------------------------------------------------------------------

/** An element: h("td", {class: "num"}, "12"); strings become text nodes (never HTML). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "style") el.style.cssText = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, value);
  append(el, children);
  return el;
}

const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
function num(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (digits === 0) return intFormat.format(value);
  return Number(value).toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function rate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? num(value) : num(value, 1);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const h_ = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const sec = seconds % 60;
  if (h_) return `${h_}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds >= 1) return `${num(seconds, 2)} s`;
  return seconds >= 0.01 ? `${num(seconds * 1000)} ms` : `${num(seconds * 1000, 1)} ms`;
}

function percent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${num(value * 100, digits)}%`;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const ago = (Date.now() - date.getTime()) / 1000;
  if (ago < 60) return "just now";
  if (ago < 3600) return `${Math.floor(ago / 60)} min ago`;
  if (ago < 86400) return `${Math.floor(ago / 3600)} h ago`;
  return date.toLocaleString();
}

/** Share of the job's rows done, 0..1; a succeeded job is whole whatever its counts say. */
function fraction(job) {
  if (job.status === "succeeded") return 1;
  const p = job.progress || {};
  if (!p.rows_total) return 0;
  return Math.min(1, (p.rows_done || 0) / p.rows_total);
}

function progressBar(job, big = false) {
  const pct = Math.floor(fraction(job) * 100);
  return h(
    "div",
    {
      class: `bar ${job.status}${big ? " big" : ""}`,
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": String(pct),
      "aria-label": `${job.name}: ${pct}%`,
    },
    h("span", { style: `width: ${pct}%` }),
  );
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

// -- the API -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (response.status === 401) showBanner("This service needs an API key: enter it at the top right.");
    throw new ApiError(response.status, detail);
  }
  hideBanner();
  return response;
}

async function apiJSON(path, options) {
  return (await api(path, options)).json();
}

// -- page chrome ---------------------------------------------------------------------

const view = document.getElementById("view");
const live = document.getElementById("live");

function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.hidden = false;
}

function hideBanner() {
  document.getElementById("banner").hidden = true;
}

function markLive(error) {
  live.classList.toggle("error", Boolean(error));
  live.textContent = error ? `Not updated: ${error}` : `Updated ${new Date().toLocaleTimeString()}`;
}

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  input.value = apiKey();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    hideBanner();
    route();
  });
}

/** Calls ``tick`` now and every ``every`` ms while the view lives and the tab is visible. */
class Poller {
  constructor(tick, every) {
    this.tick = tick;
    this.every = every;
    this.timer = null;
    this.stopped = false;
    this.run();
  }

  async run() {
    if (this.stopped) return;
    if (!document.hidden) {
      try {
        await this.tick();
        markLive(null);
      } catch (error) {
        markLive(error.message);
      }
    }
    if (!this.stopped) this.timer = setTimeout(() => this.run(), this.every);
  }

  now() {
    clearTimeout(this.timer);
    this.run();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }
}

/** Re-renders a section only when its data changed, so open details and selections stay. */
function update(el, data, render) {
  const key = JSON.stringify(data);
  if (el.dataset.key === key) return;
  el.dataset.key = key;
  el.replaceChildren(...[render(data)].flat().filter(Boolean));
}

// -- the job list --------------------------------------------------------------------

const listState = { status: "", notice: null };

function jobListView() {
  const filters = h("div", { class: "filters", role: "group", "aria-label": "Filter by status" });
  const body = h("div", { class: "table-wrap" });
  const notice = listState.notice ? h("div", { class: "notice" }, listState.notice) : null;
  listState.notice = null;

  const renderFilters = () =>
    filters.replaceChildren(
      ...["", ...STATUSES].map((status) =>
        h(
          "button",
          {
            class: status === listState.status ? "active" : null,
            "data-status": status || "all",
            onclick: () => {
              listState.status = status;
              renderFilters();
              poller.now();
            },
          },
          status || "all",
        ),
      ),
    );
  renderFilters();

  view.replaceChildren(
    h(
      "div",
      { class: "stack" },
      notice,
      h(
        "div",
        { class: "card" },
        h("div", { class: "row" }, h("h1", {}, "Jobs"), h("span", { class: "spacer" }), filters,
          h("a", { href: "#/submit" }, h("button", { class: "primary" }, "Submit a job"))),
        h("div", { style: "margin-top: 12px" }, body),
      ),
    ),
  );

  const poller = new Poller(async () => {
    const query = new URLSearchParams({ limit: "50" });
    if (listState.status) query.set("status", listState.status);
    const page = await apiJSON(`/v1/jobs?${query}`);
    const rows = page.data.map(jobSummary);
    update(body, rows, () => jobTable(page.data));
  }, LIST_EVERY_MS);
  return () => poller.stop();
}

/** What the list shows of a job (the list re-renders only when this changes). */
function jobSummary(job) {
  const p = job.progress || {};
  return [job.id, job.status, job.name, p.rows_done, p.rows_total, p.rows_failed,
    p.rows_per_second, p.output_tokens_per_second, p.eta_seconds, when(job.created_at)];
}

function jobTable(jobs) {
  if (!jobs.length) {
    return h("div", { class: "empty" },
      listState.status ? `No ${listState.status} jobs.` : "No jobs yet. Submit one to see it here.");
  }
  return h(
    "table",
    { class: "jobs" },
    h("thead", {}, h("tr", {},
      h("th", {}, "Job"), h("th", {}, "Status"), h("th", { style: "width: 30%" }, "Progress"),
      h("th", { class: "num" }, "Rows"), h("th", { class: "num" }, "Rows/s"),
      h("th", { class: "num" }, "Tokens/s"), h("th", { class: "num" }, "ETA"),
      h("th", {}, "Created"))),
    h("tbody", {}, jobs.map((job) => {
      const p = job.progress || {};
      const running = job.status === "running";
      return h(
        "tr",
        { "data-job-id": job.id },
        h("td", { class: "name" },
          h("a", { href: `#/jobs/${job.id}` }, job.name),
          h("span", { class: "mono" }, job.id)),
        h("td", {}, badge(job.status)),
        h("td", {}, h("div", { class: "progress-cell" }, progressBar(job),
          h("span", { class: "pct small" }, `${Math.floor(fraction(job) * 100)}%`))),
        h("td", { class: "num" }, `${num(p.rows_done)} / ${num(p.rows_total)}`,
          p.rows_failed ? h("div", { class: "small", style: "color: var(--bad)" },
            `${num(p.rows_failed)} failed`) : null),
        h("td", { class: "num" }, running ? rate(p.rows_per_second) : "–"),
        h("td", { class: "num" }, running ? rate(p.output_tokens_per_second) : "–"),
        h("td", { class: "num" }, running ? duration(p.eta_seconds) : "–"),
        h("td", { title: job.created_at }, when(job.created_at)),
      );
    })),
  );
}

// -- the engine pools ---------------------------------------------------------------

function enginesView() {
  const body = h("div", { class: "table-wrap" });
  const released = h("div", { style: "margin-top: 12px" });
  view.replaceChildren(
    h("div", { class: "stack" },
      h("div", { class: "card" },
        h("div", { class: "row" }, h("h1", {}, "Engine pools")),
        h("p", { class: "small" },
          "One pool per model, kept warm between jobs and shared by them; released when idle."),
        h("div", { style: "margin-top: 12px" }, body),
        released)),
  );
  const poller = new Poller(async () => {
    const page = await apiJSON("/v1/engines");
    update(body, page.data, () => engineTable(page.data, () => poller.now()));
    update(released, page.released, () => releasedList(page.released));
  }, LIST_EVERY_MS);
  return () => poller.stop();
}

function engineTable(pools, refresh) {
  if (!pools.length) {
    return h("div", { class: "empty" }, "No engine pool is up. The first job of a model starts one.");
  }
  return h(
    "table",
    { class: "engines" },
    h("thead", {}, h("tr", {},
      h("th", {}, "Pool"), h("th", {}, "State"), h("th", { class: "num" }, "Replicas"),
      h("th", {}, "Jobs"), h("th", { class: "num" }, "Requests"),
      h("th", { class: "num" }, "Running / waiting"), h("th", {}, "Idle since"), h("th", {}, ""))),
    h("tbody", {}, pools.map((pool) => h(
      "tr",
      { "data-pool-id": pool.id },
      h("td", { class: "name" }, h("strong", {}, pool.model || "?"),
        pool.warm ? h("span", { class: "small" }, " warm") : null,
        h("span", { class: "mono" }, pool.id)),
      h("td", {}, badge(pool.state), pool.error ? h("div", { class: "small", style: "color: var(--bad)" }, pool.error) : null),
      h("td", { class: "num" }, num(pool.replicas)),
      h("td", {}, pool.jobs.length
        ? pool.jobs.map((id) => h("div", {}, h("a", { href: `#/jobs/${id}`, class: "mono" }, id)))
        : "–"),
      h("td", { class: "num" }, num(pool.requests)),
      h("td", { class: "num" }, pool.running === null ? "–" : `${num(pool.running)} / ${num(pool.waiting)}`),
      h("td", {}, pool.idle_since ? when(new Date(pool.idle_since * 1000).toISOString()) : "–"),
      h("td", {}, pool.jobs.length ? null : h("button", {
        onclick: async () => {
          try {
            await apiJSON(`/v1/engines/${encodeURIComponent(pool.id)}`, { method: "DELETE" });
            refresh();
          } catch (error) {
            showBanner(error.message);
          }
        },
      }, "Release")),
    ))),
  );
}

function releasedList(entries) {
  if (!entries || !entries.length) return null;
  return [h("h2", {}, "Released lately"), h("ul", { class: "released" },
    [...entries].reverse().map((r) => h("li", {},
      h("span", { class: "mono" }, r.pool), ` ${r.why} (${when(new Date(r.at * 1000).toISOString())})`)))];
}

// -- the submit form -----------------------------------------------------------------

const EXAMPLE = `# A job file, YAML or JSON (the same format as llm-batch run / submit).
# Paths are read by the service: absolute, or relative to its working folder.
name: reviews-sentiment
input:
  path: prompts/examples/reviews.parquet
prompt:
  template: "Review: {{ text }}\\nSentiment:"
model:
  path: models/reviews-tiny
sampling:
  max_tokens: 4
  structured: {choice: [positive, negative, neutral]}
metrics:
  label_column: label
carryover: [id, text, label]
`;

function submitView() {
  const text = h("textarea", {
    id: "job-text", name: "job", spellcheck: "false", placeholder: EXAMPLE,
    "aria-label": "Job file (YAML or JSON)",
  });
  const file = h("input", { type: "file", id: "job-file", accept: ".yaml,.yml,.json,application/json" });
  const errorBox = h("div", { id: "submit-error", class: "error", hidden: true, role: "alert" });
  const submit = h("button", { class: "primary", type: "submit", id: "submit-job" }, "Submit");

  file.addEventListener("change", async () => {
    if (file.files.length) text.value = await file.files[0].text();
  });

  const form = h(
    "form",
    { class: "card submit", id: "submit-form" },
    h("h1", {}, "Submit a job"),
    h("p", { class: "muted" },
      "Paste a job file or load one from disk. It is checked before it is queued: every field, ",
      "the input's columns against the template, the model folder."),
    text,
    h("div", { class: "row" },
      h("label", { class: "muted small", for: "job-file" }, "Load a file:"), file,
      h("span", { class: "spacer" }), submit),
    h("div", { style: "margin-top: 12px" }, errorBox),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorBox.hidden = true;
    const body = text.value.trim();
    if (!body) {
      errorBox.textContent = "Paste a job file first.";
      errorBox.hidden = false;
      return;
    }
    // JSON goes as JSON; anything else as YAML, which the service parses itself.
    const isJSON = body.startsWith("{");
    submit.disabled = true;
    try {
      const job = await apiJSON("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": isJSON ? "application/json" : "application/yaml" },
        body,
      });
      listState.status = "";
      listState.notice = h("span", {}, "Submitted ",
        h("a", { href: `#/jobs/${job.id}` }, job.name), ` (${job.id}).`);
      location.hash = "#/";
    } catch (error) {
      errorBox.textContent = error.status ? `${error.status}: ${error.message}` : error.message;
      errorBox.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });

  view.replaceChildren(form);
  live.textContent = "";
  text.focus();
  return () => {};
}

// -- a job ---------------------------------------------------------------------------

function jobView(id) {
  const head = h("div", { class: "card" });
  const progress = h("div", { class: "card", id: "job-progress" });
  const charts = h("div", { class: "grid" });
  const models = h("div", { class: "stack", id: "job-metrics" });
  const engines = h("div");
  const rows = h("div", { class: "card", id: "job-rows" });
  const spec = h("div", { class: "card" });
  view.replaceChildren(h("div", { class: "stack" }, head, progress, charts, models, engines, rows, spec));

  let armed = null;
  let rowsFetched = { at: 0, done: -1 };
  const cancel = async (button) => {
    if (!armed) {
      button.classList.add("armed");
      button.textContent = "Click again to cancel";
      armed = setTimeout(() => {
        armed = null;
        button.classList.remove("armed");
        button.textContent = "Cancel job";
      }, 4000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.disabled = true;
    try {
      await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
    } catch (error) {
      showBanner(`Cancel failed: ${error.message}`);
    }
    poller.now();
  };

  const poller = new Poller(async () => {
    let job;
    try {
      job = await apiJSON(`/v1/jobs/${encodeURIComponent(id)}`);
    } catch (error) {
      if (error.status === 404) {
        head.replaceChildren(h("h1", {}, "No such job"), h("p", { class: "muted" }, error.message));
        return;
      }
      throw error;
    }
    const p = job.progress || {};
    update(head, [job.status, job.error, when(job.created_at), when(job.started_at), when(job.finished_at)],
      () => {
        if (armed) clearTimeout(armed);  // a new button, not armed
        armed = null;
        return jobHead(job, cancel);
      });
    update(progress, [job.status, p], () => progressCard(job));
    update(charts, [job.status, p.series || []], () => throughputCharts(p.series || []));
    update(models, [p.metrics || {}, p.models || {}], () => modelCards(p));
    update(engines, [job.status, p.engines || []], () => engineCard(job, p.engines || []));
    if (!spec.dataset.key) update(spec, job.spec, () => specCard(job.spec));

    // The first rows: again when more were written, at most every few seconds.
    const due = Date.now() - rowsFetched.at > ROWS_EVERY_MS || !ACTIVE.has(job.status);
    if (job.status !== "queued" && p.rows_done !== rowsFetched.done && due) {
      rowsFetched = { at: Date.now(), done: p.rows_done };
      await loadRows(id, rows);
    } else if (job.status === "queued" && !rows.dataset.key) {
      update(rows, "queued", () => [h("h2", {}, "First rows"), h("div", { class: "empty" }, "The job has not started yet.")]);
    }
  }, JOB_EVERY_MS);
  return () => poller.stop();
}

function jobHead(job, cancel) {
  const cancellable = job.status === "queued" || job.status === "running";
  return [
    h("div", { class: "job-head" },
      h("div", { class: "title" },
        h("div", { class: "row" }, h("h1", { id: "job-name" }, job.name), badge(job.status)),
        h("div", { class: "mono small" }, job.id),
        h("div", { class: "times" },
          h("span", {}, `Created ${when(job.created_at)}`),
          job.started_at ? h("span", {}, `Started ${when(job.started_at)}`) : null,
          job.finished_at ? h("span", {}, `Ended ${when(job.finished_at)}`) : null,
          h("span", {}, "Output ", h("span", { class: "mono" }, job.output.path)))),
      cancellable
        ? h("button", { class: "danger", id: "cancel-job", onclick: (e) => cancel(e.currentTarget) }, "Cancel job")
        : null),
    job.error ? h("div", { class: "error", style: "margin-top: 12px" }, job.error) : null,
  ];
}

function tile(label, value, id) {
  return h("div", { class: "tile", id }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

function progressCard(job) {
  const p = job.progress || {};
  const running = job.status === "running";
  const out = [
    h("div", { class: "row" }, h("h2", { style: "margin: 0" }, "Progress"), h("span", { class: "spacer" }),
      h("span", { class: "muted" }, `${num(p.rows_done)} of ${num(p.rows_total)} rows`,
        ` · ${Math.floor(fraction(job) * 100)}%`)),
    h("div", { style: "margin-top: 10px" }, progressBar(job, true)),
    h("div", { class: "tiles" },
      tile("Rows done", num(p.rows_done)),
      tile("Rows failed", num(p.rows_failed)),
      tile("Rows / s", running ? rate(p.rows_per_second) : "–"),
      tile("Tokens / s", running ? rate(p.output_tokens_per_second) : "–"),
      tile("Time left", running ? duration(p.eta_seconds) : "–"),
      tile("Elapsed", duration(p.elapsed_seconds)),
      tile("Input tokens", num(p.input_tokens)),
      tile("Output tokens", num(p.output_tokens))),
  ];
  const perModel = Object.entries(p.models || {});
  if (perModel.length > 1) {
    out.push(h("h3", {}, "Per model"), h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Model"), h("th", { style: "width: 35%" }, "Rows done"),
        h("th", { class: "num" }, "Failed"), h("th", { class: "num" }, "Output tokens"))),
      h("tbody", {}, perModel.map(([name, c]) => h("tr", {},
        h("td", {}, name),
        h("td", {}, progressBar({ name, status: job.status, progress: { rows_done: c.rows_done, rows_total: p.rows_total } })),
        h("td", { class: "num" }, num(c.rows_failed)),
        h("td", { class: "num" }, num(c.output_tokens))))))));
  }
  if (p.resumed_rows) out.push(h("p", { class: "muted small" }, `${num(p.resumed_rows)} rows were written by an earlier, interrupted run.`));
  return out;
}

// -- charts --------------------------------------------------------------------------

/** Rates from the cumulative series, each over about the last three seconds (smoother than
 * one batch's report). The first point is the first report, after the engines started. */
function rates(series, key, window = 3) {
  const out = [];
  for (let i = 1; i < series.length; i++) {
    let j = i - 1;
    while (j > 0 && series[i].t - series[j].t < window) j--;
    const dt = series[i].t - series[j].t;
    if (dt > 0) out.push([series[i].t, Math.max(0, (series[i][key] - series[j][key]) / dt)]);
  }
  // One interval: its average rate, over the whole of it.
  if (out.length === 1) out.unshift([series[0].t, out[0][1]]);
  return out;
}

/** Round numbers for an axis: 0..max in about ``count`` steps of 1, 2 or 5 × 10^n. */
function ticks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((m) => m >= raw);
  const out = [];
  for (let v = 0; v <= max + step * 0.999; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** Round times for the x axis between ``min`` and ``max`` seconds, about six of them: every
 * 1, 2, 5, 10, 15 or 30 s, 1, 2, 5, 10, 15 or 30 min, 1, 2, 3, 6 or 12 h, or days. */
function timeTicks(min, max, count = 6) {
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];
  const raw = (max - min) / count;
  const step = steps.find((st) => st >= raw) || Math.ceil(raw / 86400) * 86400;
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max; v += step) out.push(v);
  return out;
}

function lineChart(points, { cls = "", unit = "" } = {}) {
  const W = 560, H = 190, L = 52, R = 12, T = 10, B = 26;
  if (points.length < 2) {
    return h("div", { class: "empty" }, "Not enough points for a curve yet (a point per batch answered).");
  }
  const xmax = Math.max(...points.map((p) => p[0]), 1);
  const xmin = Math.min(...points.map((p) => p[0]));
  const yt = ticks(Math.max(...points.map((p) => p[1])));
  const ymax = yt[yt.length - 1];
  const x = (v) => L + ((v - xmin) / Math.max(xmax - xmin, 1e-9)) * (W - L - R);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${unit} over time` });
  for (const v of yt) {
    svg.append(s("line", { class: "gridline", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v >= 1000 ? `${num(v / 1000, v % 1000 ? 1 : 0)}k` : String(v)));
  }
  for (const v of timeTicks(xmin, xmax)) {
    svg.append(s("text", { x: x(v), y: H - 8, "text-anchor": "middle" }, duration(v)));
  }
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }));
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
  svg.append(s("path", { class: `area ${cls}`, d: `${path}L${x(points.at(-1)[0]).toFixed(1)},${y(0)}L${x(points[0][0]).toFixed(1)},${y(0)}Z` }));
  svg.append(s("path", { class: `line ${cls}`, d: path }));
  return h("div", { class: "chart" }, svg);
}

function throughputCharts(series) {
  const rows = rates(series, "rows_done");
  const tokens = rates(series, "output_tokens");
  const last = (points) => (points.length ? rate(points.at(-1)[1]) : "–");
  return [
    h("div", { class: "card", id: "throughput" },
      h("div", { class: "chart-title" }, h("h2", {}, "Throughput: rows / s"), h("span", { class: "muted small" }, `latest ${last(rows)}`)),
      lineChart(rows, { unit: "rows per second" })),
    h("div", { class: "card" },
      h("div", { class: "chart-title" }, h("h2", {}, "Output tokens / s"), h("span", { class: "muted small" }, `latest ${last(tokens)}`)),
      lineChart(tokens, { cls: "tokens", unit: "output tokens per second" })),
  ];
}

// -- metrics -------------------------------------------------------------------------

function modelCards(p) {
  const entries = Object.entries(p.metrics || {});
  if (!entries.length) return [];
  return entries.map(([model, m]) => h("div", { class: "card", "data-model": model },
    h("div", { class: "model-title" },
      h("h2", {}, entries.length > 1 || model !== "default" ? `Metrics: ${model}` : "Metrics"),
      m.labels && m.labels.accuracy !== null && m.labels.accuracy !== undefined
        ? h("span", { class: "accuracy" }, "accuracy ", h("b", { id: `accuracy-${model}` }, percent(m.labels.accuracy)),
          m.labels.macro_f1 !== null ? ` · macro F1 ${num(m.labels.macro_f1, 3)}` : "")
        : null),
    h("div", { class: "grid narrow" },
      tokenUsage(m.token_usage), finishReasons(m.finish_reasons), latency(m.latency), errors(m.errors)),
    m.labels ? labels(m.labels) : null,
    customResults(m)));
}

function kvTable(pairs) {
  return h("table", { class: "kv" }, h("tbody", {}, pairs.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, v)))));
}

function tokenUsage(t) {
  if (!t) return null;
  return h("div", {}, h("h3", {}, "Token usage"), kvTable([
    ["Rows", num(t.rows)], ["Input tokens", num(t.input_tokens)],
    ["Output tokens", num(t.output_tokens)], ["Total tokens", num(t.total_tokens)],
    ["Output / row", t.rows ? num(t.output_tokens / t.rows, 1) : "–"],
  ]));
}

function finishReasons(reasons) {
  if (!reasons) return null;
  const entries = Object.entries(reasons);
  const total = entries.reduce((a, [, n]) => a + n, 0);
  return h("div", {}, h("h3", {}, "Finish reasons"),
    entries.length ? entries.map(([reason, n]) => h("div", { class: "hbar" },
      h("span", {}, reason),
      h("div", { class: "bar" }, h("span", { style: `width: ${total ? (100 * n) / total : 0}%` })),
      h("span", { class: "num" }, num(n)))) : h("div", { class: "muted" }, "None yet."));
}

function latency(l) {
  if (!l) return null;
  return h("div", {}, h("h3", {}, "Generation latency"), kvTable([
    ["Mean", ms(l.mean_s)], ["p50", ms(l.p50_s)], ["p90", ms(l.p90_s)],
    ["p99", ms(l.p99_s)], ["Max", ms(l.max_s)],
  ]));
}

function errors(e) {
  if (!e) return null;
  return h("div", {}, h("h3", {}, "Errors"),
    h("div", { class: e.count ? "" : "muted" }, e.count ? `${num(e.count)} rows failed` : "No errors."),
    (e.samples || []).map((sample) => h("div", { class: "error small", style: "margin-top: 6px" }, sample)));
}

function labels(l) {
  const cm = l.confusion_matrix || { labels: [], predicted: [], matrix: [] };
  const max = Math.max(1, ...cm.matrix.flat());
  const perClass = Object.entries(l.per_class || {});
  return h("div", { class: "grid", style: "margin-top: 4px" },
    h("div", {}, h("h3", {}, "Confusion matrix"),
      h("div", { class: "table-wrap" }, h("table", { class: "confusion" },
        h("thead", {}, h("tr", {}, h("th", { class: "corner" }, "true ↓ · predicted →"),
          cm.predicted.map((p) => h("th", {}, p)))),
        h("tbody", {}, cm.labels.map((truth, i) => h("tr", {},
          h("th", { class: "true" }, truth),
          cm.matrix[i].map((n, j) => {
            const alpha = n / max;
            return h("td", {
              class: cm.predicted[j] === truth ? "diag" : null,
              style: `background: rgba(37, 99, 235, ${(0.06 + 0.84 * alpha).toFixed(3)}); color: ${alpha > 0.55 ? "#fff" : "inherit"}`,
              title: `true ${truth}, predicted ${cm.predicted[j]}: ${n}`,
            }, num(n));
          })))))),
      h("div", { class: "muted small", style: "margin-top: 6px" }, `${num(l.rows)} labelled rows`)),
    h("div", {}, h("h3", {}, "Per class"),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Class"), h("th", { class: "num" }, "Precision"),
          h("th", { class: "num" }, "Recall"), h("th", { class: "num" }, "F1"), h("th", { class: "num" }, "Support"))),
        h("tbody", {}, perClass.map(([name, c]) => h("tr", {},
          h("td", {}, name), h("td", { class: "num" }, num(c.precision, 3)),
          h("td", { class: "num" }, num(c.recall, 3)), h("td", { class: "num" }, num(c.f1, 3)),
          h("td", { class: "num" }, num(c.support)))))))));
}

const BUILTIN = new Set(["token_usage", "finish_reasons", "errors", "latency", "labels"]);
function customResults(m) {
  const custom = Object.entries(m).filter(([name]) => !BUILTIN.has(name));
  if (!custom.length) return null;
  return h("div", {}, custom.map(([name, value]) => [h("h3", {}, name),
    h("pre", { class: "mono" }, JSON.stringify(value, null, 2))]));
}

function engineCard(job, engines) {
  if (!engines.length) return [];
  const showLoad = ACTIVE.has(job.status);
  return h("div", { class: "card" },
    h("h2", {}, `Engines (${engines.length})`),
    showLoad ? null : h("p", { class: "muted small" }, "Load as of each engine's last batch; the job has ended."),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Actor"), h("th", {}, "Node"), h("th", {}, "Model"),
        h("th", { class: "num" }, "Rows"), h("th", { class: "num" }, "Running"), h("th", { class: "num" }, "Waiting"),
        h("th", { class: "num" }, "KV cache"), h("th", { class: "num" }, "Mean TTFT"))),
      h("tbody", {}, engines.map((e) => h("tr", {},
        h("td", { class: "mono", title: e.actor_id }, (e.actor_id || "–").slice(0, 12)),
        h("td", { class: "mono", title: e.node_id }, (e.node_id || "–").slice(0, 12)),
        h("td", {}, e.model),
        h("td", { class: "num" }, num(e.rows)),
        h("td", { class: "num" }, num(e.running)),
        h("td", { class: "num" }, num(e.waiting)),
        h("td", { class: "num" }, percent(e.kv_cache_usage)),
        h("td", { class: "num" }, e.ttft_count ? ms(e.ttft_sum / e.ttft_count) : "–")))))));
}

// -- rows and spec -------------------------------------------------------------------

async function loadRows(id, card) {
  let rows;
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(id)}/results?limit=${PREVIEW_ROWS}`);
    rows = (await response.text()).split("\n").filter(Boolean).map((line) => JSON.parse(line));
  } catch (error) {
    if (error.status !== 409) throw error;
    rows = [];
  }
  update(card, rows, () => rowsTable(rows));
}

function cell(value) {
  if (value === null || value === undefined) return h("td", { class: "null" }, "null");
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return h("td", { title: text.length > 60 ? text.slice(0, 2000) : null }, text.length > 160 ? `${text.slice(0, 160)}…` : text);
}

function rowsTable(rows) {
  const title = h("h2", {}, `First rows${rows.length ? ` (${rows.length})` : ""}`);
  if (!rows.length) return [title, h("div", { class: "empty" }, "No rows written yet.")];
  const columns = Object.keys(rows[0]);
  return [title, h("div", { class: "table-wrap" }, h("table", { class: "rows" },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => cell(row[c])))))))];
}

function specCard(spec) {
  return h("details", { class: "spec" }, h("summary", {}, "Job spec"),
    h("pre", {}, JSON.stringify(spec, null, 2)));
}

// -- routing -------------------------------------------------------------------------

let leave = () => {};

function route() {
  leave();
  hideBanner();
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/jobs\/([^/]+)$/);
  for (const link of document.querySelectorAll("[data-nav]")) {
    const nav = link.dataset.nav;
    link.classList.toggle("active", (nav === "jobs" && (hash === "/" || match)) || (nav === "submit" && hash === "/submit") || (nav === "engines" && hash === "/engines"));
  }
  if (match) leave = jobView(decodeURIComponent(match[1]));
  else if (hash === "/submit") leave = submitView();
  else if (hash === "/engines") leave = enginesView();
  else leave = jobListView();
  window.scrollTo(0, 0);
}

setupKeyForm();
window.addEventListener("hashchange", route);
route();
