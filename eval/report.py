"""Reports of an eval directory, rebuilt from its run files: ``report.json``, ``report.md``, ``index.html``, plots.

Nothing here runs a model: :func:`build_report` reads every complete ``runs/*.json`` (see
:mod:`vidsparse.eval.results`), pairs each sparse run with its dense reference, derives speedups, aggregates per
method configuration and writes

- ``report.json``: schema-versioned; every run record in full (config, versions, device, command, per-frame
  metrics) plus the derived numbers and the per-configuration summary;
- ``report.md``: the summary and per-run tables in Markdown;
- ``plots/pareto.png``: quality vs end-to-end speedup and quality vs measured density (matplotlib), with the
  Pareto front of the configurations;
- ``index.html``: self-contained (the plot embedded as base64, no scripts, no network), the tables and the
  side-by-side clips (gifs referenced relatively, so the page loads from ``file://``).
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .out_dir import record as record_files
from .results import as_float, environment, load_runs, write_bytes_atomic, write_json_atomic, write_text_atomic

REPORT_SCHEMA = "vidsparse.eval.report"
REPORT_SCHEMA_VERSION = 1
#: How tables name the dense reference runs (stock attention), distinct from the ``dense`` method.
REFERENCE_LABEL = "dense reference (stock attention)"
#: PSNR of identical frames is infinite; plots draw such points at this height (and say so).
PSNR_PLOT_CAP = 60.0

#: How the numbers were measured (copied into every report).
METHODOLOGY = {
    "reference": "dense = the pipeline's stock diffusers attention, same prompt, seed, scheduler, steps and shapes",
    "metrics": "on decoded frames at uint8 levels, as `vidsparse render` saves them (no codec in between): PSNR per "
    "frame then mean; SSIM Gaussian 11x11, sigma 1.5, per RGB channel; LPIPS v0.1 on inputs mapped to [-1, 1] "
    "(AlexNet unless stated)",
    "e2e_time": "wall clock of one pipeline call (text encoding, all steps, VAE decode); one warm-up generation, then "
    "the median of `repeats` timed generations; torch.cuda.synchronize before start and stop on CUDA",
    "speedup": "dense end-to-end median / sparse end-to-end median, per (prompt, seed); summaries average it",
    "attention_share": "from instrumented generations (CUDA: one extra generation; CPU: the timed ones): time "
    "inside the video self-attention modules (projections, norms, RoPE, attention, output projection) / time "
    "inside the transformer forwards, with a device synchronisation at each module boundary; the dense share "
    "bounds what any attention method can save",
    "attention_speedup": "dense / sparse time inside the self-attention modules (instrumented generations)",
    "load_average": "each run records the machine's 1-minute load average around its timed generations: on a "
    "shared, busy machine end-to-end times and speedups are noisy",
    "density": "measured by vidsparse per sparse self-attention call: computed (q-block, kv-block) pairs / all "
    "video pairs; 'overall' counts dense warm-up calls as 1",
    "oracle": "MSE / oracle: frame MSE of a run over that of `oracle:density=<same target>` in the same setting "
    "(the block pairs of most exact attention mass; 10^(PSNR gap / 10)); empty without such a run",
    "plan_ms": "planning time of one generation (sum over sparse calls; median over the timed generations)",
}


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the non-None values (None when there are none); an infinite value makes the mean infinite."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def setting_label(job: dict[str, Any]) -> str:
    """``tiny-wan 17x128x128 8 steps cfg 5.0 float32 cpu``."""
    return (
        f"{job['model']} {job['frames']}x{job['height']}x{job['width']} {job['steps']} steps cfg "
        f"{job['guidance_scale']:g} {job['dtype']} {job['device_type']}"
    )


def derive(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-run rows: the flat numbers tables and plots show, each sparse run paired with its dense reference."""
    refs = {r["run_id"]: r for r in records if r["kind"] == "dense"}
    rows = []
    for r in records:
        job = r["job"]
        row: dict[str, Any] = {
            "run_id": r["run_id"],
            "ref_id": r["ref_id"],
            "kind": r["kind"],
            "status": r["status"],
            "method": job["method"] or REFERENCE_LABEL,
            "note": job.get("note"),
            "prompt": job["prompt"],
            "seed": job["seed"],
            "setting": setting_label(job),
            "error": r.get("error"),
        }
        if r["status"] == "ok":
            timing = r["timing"]
            row.update(
                e2e_s=timing["e2e_median_s"],
                attention_share=timing.get("attention_share"),
                attention_s=timing.get("attention_s"),
                load_average=timing.get("load_average"),
                artifacts=r.get("artifacts", {}),
            )
        if r["kind"] == "sparse" and r["status"] == "ok":
            metrics, sparsity = r["metrics"], r.get("sparsity") or {}
            ref = refs.get(r["ref_id"])
            ref_ok = ref is not None and ref["status"] == "ok"
            ref_timing = ref["timing"] if ref_ok else {}
            row.update(
                target_density=(r.get("config") or {}).get("density"),
                density=sparsity.get("sparse_density"),
                overall_density=sparsity.get("overall_density"),
                sparse_calls=sparsity.get("sparse_calls"),
                calls=sparsity.get("calls"),
                plan_ms=sparsity.get("plan_ms"),
                plan_ms_per_call=sparsity.get("plan_ms_per_call"),
                psnr=as_float(metrics.get("psnr")),
                ssim=as_float(metrics.get("ssim")),
                lpips=as_float(metrics.get("lpips")),
                lpips_net=metrics.get("lpips_net"),
                lpips_unavailable=metrics.get("lpips_unavailable"),
                dense_e2e_s=ref_timing.get("e2e_median_s"),
                speedup=_ratio(ref_timing.get("e2e_median_s"), timing["e2e_median_s"]),
                attention_speedup=_ratio(ref_timing.get("attention_s"), timing.get("attention_s")),
            )
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, method configuration): counts and means over prompts × seeds (ok runs only)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["setting"], row["kind"], row["method"])].append(row)
    summary = []
    for (setting, kind, method), members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        entry: dict[str, Any] = {
            "setting": setting,
            "method": method,
            "kind": kind,
            "runs": len(members),
            "ok": len(ok),
            "failed": len(members) - len(ok),
            "note": next((m["note"] for m in members if m.get("note")), None),
            "e2e_s": _mean([m.get("e2e_s") for m in ok]),
            "attention_share": _mean([m.get("attention_share") for m in ok]),
        }
        if entry["kind"] == "sparse":
            for key in (
                "target_density",
                "density",
                "overall_density",
                "psnr",
                "ssim",
                "lpips",
                "speedup",
                "attention_speedup",
                "plan_ms",
                "plan_ms_per_call",
            ):
                entry[key] = _mean([m.get(key) for m in ok])
            entry["lpips_net"] = next((m["lpips_net"] for m in ok if m.get("lpips") is not None), None)
        summary.append(entry)
    summary.sort(key=lambda e: (e["setting"], e["kind"] != "dense", e["method"]))
    add_oracle_ratios(summary)
    return summary


def add_oracle_ratios(summary: list[dict[str, Any]]) -> None:
    """Set ``mse_vs_oracle`` on sparse entries that have an ``oracle`` run at the same setting and target density.

    The ratio of frame MSEs, from the PSNR gap: ``10 ** ((PSNR_oracle - PSNR) / 10)`` (1 = as good as the best
    block selection at that density; see :mod:`vidsparse.methods.oracle`).
    """
    oracles = {
        (e["setting"], e.get("target_density")): e
        for e in summary
        if e["kind"] == "sparse" and str(e["method"]).split(":")[0] == "oracle" and e.get("psnr") is not None
    }
    for entry in summary:
        ref = oracles.get((entry["setting"], entry.get("target_density")))
        psnr, ref_psnr = entry.get("psnr"), None if ref is None else ref["psnr"]
        ok = psnr is not None and ref_psnr is not None and math.isfinite(psnr) and math.isfinite(ref_psnr)
        entry["mse_vs_oracle"] = 10 ** ((ref_psnr - psnr) / 10) if ok and entry["kind"] == "sparse" else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are better larger, sorted by the first one."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _plot_psnr(value: float | None) -> float | None:
    if value is None:
        return None
    return min(value, PSNR_PLOT_CAP)


def make_plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> bool:
    """Write the quality-vs-speedup and quality-vs-density plot to ``path`` (PNG); False when nothing to plot."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [e for e in summary if e["kind"] == "sparse" and e["ok"] and e.get("psnr") is not None]
    if not configs:
        return False
    settings = sorted({e["setting"] for e in configs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, xkey, xlabel in (
        (axes[0], "speedup", "end-to-end speedup vs dense (×)"),
        (axes[1], "density", "measured density (fraction of video block pairs)"),
    ):
        points = []
        for index, entry in enumerate(configs):
            color = colors[index % len(colors)]
            runs = [
                r
                for r in rows
                if r["kind"] == "sparse"
                and r["status"] == "ok"
                and r["method"] == entry["method"]
                and r["setting"] == entry["setting"]
            ]
            xs = [r.get(xkey) for r in runs]
            ys = [_plot_psnr(r.get("psnr")) for r in runs]
            pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if pairs:
                ax.scatter(*zip(*pairs), s=14, alpha=0.35, color=color)
            x, y = entry.get(xkey), _plot_psnr(entry.get("psnr"))
            if x is None or y is None:
                continue
            label = entry["method"] + (f" [{settings.index(entry['setting']) + 1}]" if len(settings) > 1 else "")
            ax.scatter([x], [y], s=60, color=color, edgecolor="black", zorder=3, label=label)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
            points.append((x if xkey == "speedup" else -x, y))
        if points:
            front = pareto_front(points)
            fx = [abs(points[i][0]) for i in front]
            fy = [points[i][1] for i in front]
            ax.plot(fx, fy, linestyle="--", color="gray", linewidth=1, label="Pareto front", zorder=2)
        if xkey == "speedup":
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs dense (dB, higher is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs speed")
    axes[1].set_title("quality vs density")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=7, loc="best")
    fig.text(
        0.01,
        0.01,
        f"small points: single runs; large: means per configuration; identical frames drawn at {PSNR_PLOT_CAP:g} dB",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return True


# ----------------------------------------------------------------------------------------------------- formatting
def fmt(value: Any, spec: str = ".3f") -> str:
    """A table cell: ``–`` for missing, ``inf`` for infinite, else ``format(value, spec)``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


#: (header, key, formatter) of the summary table.
SUMMARY_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("method", "method", str),
    ("runs ok/all", None, None),
    ("target density", "target_density", lambda v: fmt(v, ".3f")),
    ("measured density", "density", lambda v: fmt(v, ".3f")),
    ("PSNR dB", "psnr", lambda v: fmt(v, ".2f")),
    ("MSE / oracle", "mse_vs_oracle", lambda v: fmt(v, ".2f")),
    ("SSIM", "ssim", lambda v: fmt(v, ".4f")),
    ("LPIPS", "lpips", lambda v: fmt(v, ".4f")),
    ("e2e s", "e2e_s", lambda v: fmt(v, ".2f")),
    ("speedup", "speedup", lambda v: fmt(v, ".2f")),
    ("attn speedup", "attention_speedup", lambda v: fmt(v, ".2f")),
    ("attn share", "attention_share", _pct),
    ("plan ms", "plan_ms", lambda v: fmt(v, ".1f")),
)
RUN_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("run", "run_id", str),
    ("method", "method", str),
    ("prompt", "prompt", str),
    ("seed", "seed", str),
    ("status", "status", str),
    ("density", "density", lambda v: fmt(v, ".3f")),
    ("PSNR dB", "psnr", lambda v: fmt(v, ".2f")),
    ("SSIM", "ssim", lambda v: fmt(v, ".4f")),
    ("LPIPS", "lpips", lambda v: fmt(v, ".4f")),
    ("e2e s", "e2e_s", lambda v: fmt(v, ".2f")),
    ("speedup", "speedup", lambda v: fmt(v, ".2f")),
    ("attn share", "attention_share", _pct),
    ("plan ms", "plan_ms", lambda v: fmt(v, ".1f")),
)


def _cells(entry: dict[str, Any], columns: Sequence[tuple[str, str | None, Any]]) -> list[str]:
    cells = []
    for _, key, formatter in columns:
        if key is None:
            cells.append(f"{entry['ok']}/{entry['runs']}")
        else:
            value = entry.get(key)
            cells.append("–" if value is None else formatter(value))
    return cells


#: Characters with a meaning in Markdown (CommonMark backslash-escapes any ASCII punctuation).
_MD_SPECIAL = set("\\`*_{}[]()#+!|~")


def md_escape(text: Any) -> str:
    """``text`` as literal Markdown: HTML neutralised (``<script>`` shows as text) and Markdown syntax escaped.

    User strings (prompts, method specs, error messages, labels) go through it in ``report.md``, so a prompt holding
    ``<script>`` or ``](javascript:...)`` can neither inject HTML nor make a link.
    """
    escaped = html.escape(str(text), quote=False)
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in escaped).replace("\n", " ")


def _md_table(entries: list[dict[str, Any]], columns) -> str:
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for entry in entries:
        cells = [md_escape(c) for c in _cells(entry, columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Text columns (formatter ``str``) are left-aligned, numbers right-aligned.
TEXT_CELL = '<td class="l">'


def _html_table(entries: list[dict[str, Any]], columns, table_id: str) -> str:
    head = "".join(f"<th{' class=l' if c[2] is str else ''}>{html.escape(c[0])}</th>" for c in columns)
    body = []
    for entry in entries:
        cls = ' class="failed"' if entry.get("status") == "failed" or entry.get("failed") else ""
        cells = "".join(
            (TEXT_CELL if column[2] is str else "<td>") + html.escape(cell) + "</td>"
            for column, cell in zip(columns, _cells(entry, columns))
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _notes(summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    notes = sorted({e["note"] for e in summary if e.get("note")})
    loads = [
        value
        for r in rows
        for value in ((r.get("load_average") or []) if isinstance(r.get("load_average"), list) else [])
        if value is not None
    ]
    cores = os.cpu_count() or 1
    if loads and max(loads) > cores:
        notes.append(
            f"timings were measured on a busy machine: 1-minute load average up to {max(loads):.1f} on {cores} "
            "cores; end-to-end times and speedups are noisy"
        )
    unavailable = next((r["lpips_unavailable"] for r in rows if r.get("lpips_unavailable")), None)
    if unavailable:
        notes.append(f"LPIPS unavailable ({unavailable.get('reason')}); fix: {unavailable.get('fix')}")
    return notes


def summary_markdown(report: dict[str, Any]) -> str:
    """The summary table of each setting, in Markdown (what ``vidsparse eval`` prints at the end)."""
    lines = []
    for setting in report["settings"]:
        entries = [e for e in report["summary"] if e["setting"] == setting]
        lines.append(f"## {md_escape(setting)}\n\n{_md_table(entries, SUMMARY_COLUMNS)}\n")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: settings, summary table, per-run table, failures, notes, methodology, command."""
    lines = [f"# vidsparse eval report\n\ncreated {report['created_at']}\n", summary_markdown(report)]
    if report["plot"]:
        lines.append(f"\n![quality vs speed and density]({report['plot']})")
    lines.append("\n## Runs\n")
    lines.append(_md_table(report["rows"], RUN_COLUMNS))
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    if failed:
        lines.append("\n## Failed runs\n")
        lines.extend(
            f"- `{r['run_id']}` {md_escape(r['method'])}: {md_escape(r['error']['type'])}: "
            f"{md_escape(r['error']['message'])}"
            for r in failed
        )
    clips = [r for r in report["rows"] if (r.get("artifacts") or {}).get("side_by_side_mp4")]
    if clips:
        lines.append("\n## Side-by-side clips (dense | sparse | difference)\n")
        lines.extend(
            f"- [{md_escape(r['method'])} — {md_escape(r['prompt'])} (seed {r['seed']})]"
            f"(<{r['artifacts']['side_by_side_mp4']}>)"
            for r in clips
        )
    if report["notes"]:
        lines.append("\n## Notes\n")
        lines.extend(f"- {md_escape(n)}" for n in report["notes"])
    lines.append("\n## How it was measured\n")
    lines.extend(f"- **{key}**: {text}" for key, text in report["methodology"].items())
    lines.append(f"\nReport built by {md_escape(report['command'])} on {md_escape(report['env']['device_name'])}.")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}
td.l,th.l{text-align:left}
tr.failed td{background:#fde8e8}
.clips{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;font-size:12px}
figure img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}
code,pre{background:#f6f6f6;font-size:12px}
pre{padding:8px;white-space:pre-wrap}
"""


def render_html(report: dict[str, Any], plot_png: bytes | None) -> str:
    """``index.html``: self-contained (inline CSS, base64 plot, no scripts); clips referenced relatively."""
    esc = html.escape
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        "<title>vidsparse eval report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>vidsparse eval report</h1>",
        f"<p>created {esc(report['created_at'])} · {len(report['rows'])} runs · "
        f"device {esc(report['env']['device_name'])} · torch {esc(report['env']['torch'])} · "
        f"diffusers {esc(report['env']['diffusers'])} · vidsparse {esc(report['env']['vidsparse'])}</p>",
    ]
    if plot_png is not None:
        data = base64.b64encode(plot_png).decode()
        parts.append(
            f'<img id="pareto-plot" alt="quality vs speedup and quality vs density" src="data:image/png;base64,{data}">'
        )
    for index, setting in enumerate(report["settings"]):
        entries = [e for e in report["summary"] if e["setting"] == setting]
        parts.append(f"<h2>{esc(setting)}</h2>")
        parts.append(_html_table(entries, SUMMARY_COLUMNS, "summary" if index == 0 else f"summary-{index}"))
    parts.append("<h2>Runs</h2>")
    parts.append(_html_table(report["rows"], RUN_COLUMNS, "runs"))
    clips = [r for r in report["rows"] if (r.get("artifacts") or {}).get("side_by_side_gif")]
    if clips:
        parts.append("<h2>Side by side: dense | sparse | |difference|</h2><div class='clips'>")
        for r in clips:
            art = r["artifacts"]
            link = f' · <a href="{esc(art["side_by_side_mp4"])}">mp4</a>' if art.get("side_by_side_mp4") else ""
            parts.append(
                f'<figure><img src="{esc(art["side_by_side_gif"])}" alt="{esc(r["method"])}">'
                f"<figcaption><b>{esc(r['method'])}</b> — {esc(r['prompt'])} (seed {r['seed']}) · "
                f"PSNR {fmt(r.get('psnr'), '.2f')} dB · density {fmt(r.get('density'), '.3f')}{link}"
                "</figcaption></figure>"
            )
        parts.append("</div>")
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    if failed:
        parts.append("<h2>Failed runs</h2><ul>")
        parts.extend(
            f"<li><code>{esc(r['run_id'])}</code> {esc(r['method'])}: "
            f"{esc(r['error']['type'])}: {esc(r['error']['message'])}</li>"
            for r in failed
        )
        parts.append("</ul>")
    if report["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<h2>How it was measured</h2><ul>")
    parts.extend(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in report["methodology"].items())
    parts.append("</ul>")
    parts.append(f"<p>Report built by <code>{esc(report['command'])}</code>; every run's command, config and ")
    parts.append('versions are in <a href="report.json">report.json</a>.</p></body></html>')
    return "\n".join(parts) + "\n"


def build_report(out_dir: str | Path, *, command: str = "", device: torch.device | None = None) -> dict[str, Any]:
    """Rebuild every report file of ``out_dir`` from its run files; returns the report dict.

    Args:
        out_dir: The eval directory.
        command: The command that asked for the report (recorded).
        device: Device recorded as the report builder's (default: CPU); runs record their own.
    """
    out_dir = Path(out_dir)
    records, skipped = load_runs(out_dir)
    rows = derive(records)
    summary = summarize(rows)
    settings = sorted({r["setting"] for r in rows})
    plot_rel = "plots/pareto.png"
    has_plot = make_plot(rows, summary, out_dir / plot_rel)
    if not has_plot:
        (out_dir / plot_rel).unlink(missing_ok=True)  # never leave a plot of runs that are gone
    report = {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "env": environment(device or torch.device("cpu")),
        "settings": settings,
        "summary": summary,
        "rows": rows,
        "notes": _notes(summary, rows),
        "methodology": METHODOLOGY,
        "plot": plot_rel if has_plot else None,
        "skipped_files": [{"file": f, "reason": why} for f, why in skipped],
        "runs": records,
    }
    written = [
        write_json_atomic(out_dir / "report.json", report),
        write_text_atomic(out_dir / "report.md", render_markdown(report)),
    ]
    png = (out_dir / plot_rel).read_bytes() if has_plot else None
    written.append(write_text_atomic(out_dir / "index.html", render_html(report, png)))
    record_files(out_dir, written + ([out_dir / plot_rel] if has_plot else []))
    return report
