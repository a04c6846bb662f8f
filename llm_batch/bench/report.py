"""A benchmark report as a table (rich) and a chart (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_batch.bench.systems import SYSTEMS
from llm_batch.bench.timeline import cpu_key, rate_key

__all__ = ["LABELS", "render_table", "write_chart"]

LABELS = {"raw": "raw vLLM", "ray-data-llm": "ray.data.llm", "llm-batch": "llm-batch"}
_COLORS = {"raw": "#4c72b0", "ray-data-llm": "#dd8452", "llm-batch": "#55a868"}
_GIB = 1 << 30


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _embed(report: dict[str, Any]) -> bool:
    return bool(report.get("task") == "embed")


def _unit(report: dict[str, Any]) -> str:
    return str(report.get("unit") or "tokens")  # reports from before task embed: tokens


def render_table(report: dict[str, Any]) -> Any:
    """A ``rich.table.Table``: one column per system, then the ratios of ours to the others."""
    from rich.table import Table

    systems = [s for s in SYSTEMS if s in report["systems"]]
    ratio_keys = list(report["ratios"])
    w = report["workload"]
    embed, unit = _embed(report), _unit(report)
    rate, cpu = rate_key(unit), cpu_key(unit)
    work = ", embedded" if embed else f" × {w['output_tokens']} output tokens"
    title = (
        f"{w['rows']} rows × ~{w['prompt_tokens_measured']['mean']:.0f} prompt tokens"
        f"{work}, {w['format']}, "
        + (
            f"carry {w['carry_strings']}×{w['carry_string_bytes']} B strings"
            if w["carry_strings"]
            else "no carried strings"
        )
        + (f" + {w['embedding_dim']}-float embedding" if w["embedding_dim"] else "")
        + f", batch {report['config']['batch_size']}, replicas {report['config']['replicas']}"
        + (f"; median of {len(report['rounds'])} rounds" if report.get("rounds") else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for s in systems:
        table.add_column(LABELS[s], justify="right")
    for key in ratio_keys:
        ours, other = key.split("/")
        table.add_column(f"{LABELS[ours]}\n÷ {LABELS[other]}", justify="right")

    def row(label: str, cell: Any, ratio_field: str | None = None) -> None:
        cells = [cell(report["systems"][s]) for s in systems]
        ratios = [
            _num(report["ratios"][k].get(ratio_field), "{:.2f}×") if ratio_field else ""
            for k in ratio_keys
        ]
        table.add_row(label, *cells, *ratios)

    failed = any(report["systems"][s]["status"] != "ok" for s in systems)
    if failed:
        row("status", lambda m: m["status"] if m["status"] == "ok" else "[red]FAILED[/red]")
    row("wall time, s", lambda m: _num(m.get("wall_s")), "wall_s")
    row("engine start, s", lambda m: _num(m.get("engine_start_s")))
    row("first output row, s", lambda m: _num(m.get("first_row_s")))
    row(
        "steady rows/s" if embed else "steady output tok/s",
        lambda m: _num(m.get(rate), "{:,.1f}" if embed else "{:,.0f}"),
        rate,
    )
    row(f"CPU s per 1k steady {unit}", lambda m: _num(m.get(cpu), "{:.3f}"), cpu)
    row(
        "peak memory, GiB",
        lambda m: _num(
            None if not m["memory"]["peak_bytes"] else m["memory"]["peak_bytes"] / _GIB, "{:.2f}"
        ),
    )
    row("rows out", lambda m: _num(m.get("rows_out"), "{:,}"))
    if embed:
        row("input tokens", lambda m: _num(m.get("input_tokens"), "{:,}"))
        row("embedding size", lambda m: _num(m.get("embedding_size"), "{:,}"))
        reference, differs = report["checks"].get("embeddings_compared_with"), "embedding ≉"
    else:
        row("output tokens", lambda m: _num(m.get("output_tokens"), "{:,}"))
        reference, differs = report["checks"].get("texts_compared_with"), "text ≠"
    if reference:
        row(
            f"rows whose {differs} {LABELS[reference]}",
            lambda m: _num((m.get("rows_differing") or {}).get("rows"), "{:,}"),
        )
        if embed:
            row(
                "largest difference",
                lambda m: _num((m.get("rows_differing") or {}).get("max_abs_diff"), "{:.2g}"),
            )
    if any(report["systems"][s].get("left_behind") for s in systems):
        row("processes left behind", lambda m: str(len(m.get("left_behind") or [])))
    return table


def write_chart(report: dict[str, Any], path: str | Path) -> Path:
    """Four panels: completions over time, steady throughput, wall time, memory over time."""
    try:
        import matplotlib
    except ImportError:
        from llm_batch.errors import LLMBatchError

        raise LLMBatchError(
            "llm-batch bench draws its chart with matplotlib: pip install 'llm_batch[bench]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in SYSTEMS if s in report["systems"]]
    embed, unit = _embed(report), _unit(report)
    done_what = "rows embedded" if embed else "output tokens completed"
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_tl, ax_tp), (ax_wall, ax_mem) = axes

    for s in systems:
        m = report["systems"][s]
        color = _COLORS[s]
        done, xs, ys = 0, [0.0], [0]
        for t, n in m.get("timeline") or []:
            xs += [t, t]
            ys += [done, done + n]
            done += n
        if done:
            ax_tl.plot(xs, ys, color=color, label=LABELS[s])
            window = m.get("steady_window_s")
            if window:
                ax_tl.axvspan(window[0], window[1], color=color, alpha=0.08)
        series = m["memory"]["series"]
        if series:
            ax_mem.plot(
                [t for t, _ in series], [b / _GIB for _, b in series], color=color, label=LABELS[s]
            )
    ax_tl.set(
        title=f"{done_what} (shaded: steady-state window)",
        xlabel="seconds since the system's process started",
        ylabel=unit,
    )
    ax_tl.legend(loc="upper left")
    ax_mem.set(
        title=f"memory of all its processes ({_metric(report, systems)})",
        xlabel="seconds since the system's process started",
        ylabel="GiB",
    )
    ax_mem.legend(loc="upper left")

    labels = [LABELS[s] for s in systems]
    colors = [_COLORS[s] for s in systems]
    tps = [report["systems"][s].get(rate_key(unit)) or 0 for s in systems]
    bars = ax_tp.bar(labels, tps, color=colors)
    ax_tp.bar_label(bars, labels=[f"{v:,.0f}" for v in tps])
    what = "rows/s" if embed else "output tokens/s"
    ax_tp.set(title=f"steady-state {what} (10%–90% of {unit})", ylabel=f"{unit}/s")

    first = [report["systems"][s].get("first_row_s") or 0 for s in systems]
    wall = [report["systems"][s].get("wall_s") or 0 for s in systems]
    ax_wall.barh(labels, first, color=colors, alpha=0.45, label="to first output row")
    ax_wall.barh(
        labels,
        [w - f for w, f in zip(wall, first, strict=True)],
        left=first,
        color=colors,
        label="first row to output written",
    )
    for i, w in enumerate(wall):
        ax_wall.text(w, i, f" {w:.1f}s", va="center")
    for i, s in enumerate(systems):
        ready = report["systems"][s].get("engine_ready_s")
        if ready is not None:
            ax_wall.plot([ready, ready], [i - 0.4, i + 0.4], color="black", lw=2)
    ax_wall.set(
        title="wall time (pale: until the first output row; black tick: engine ready)",
        xlabel="seconds since the system's process started",
    )
    ax_wall.invert_yaxis()
    ax_wall.set_xlim(0, max(wall + [1]) * 1.15)

    w = report["workload"]
    if embed:
        work = f"{w['prompt_tokens']} tokens embedded, {w['carry_strings']} carried strings"
    else:
        work = (
            f"{w['prompt_tokens']}→{w['output_tokens']} tokens, {w['carry_strings']} carried "
            f"strings, embedding {w['embedding_dim']}"
        )
    fig.suptitle(f"llm-batch bench: {w['rows']} rows, {work}, {w['format']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _metric(report: dict[str, Any], systems: list[str]) -> str:
    metrics = {report["systems"][s]["memory"]["metric"] for s in systems} - {None}
    return "/".join(sorted(metrics)) or "pss"
