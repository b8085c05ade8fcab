"""The one-file HTML report of a verification (``ledger verify --report FILE.html``).

One self-contained page: the verdict and its sentence, the table of checks with their figures,
facts about the ledger, and plots embedded as base64 PNG (matplotlib, Agg canvas, imported only
when a report is rendered): loss, learning rate, per-step update against the optimizer bound (the
series ``continuity`` computed), distance from init, and the lineage results when the report holds
an ``independence`` check. A plot whose data is absent is replaced by a short note. Everything comes
from the :class:`Report`: this module never opens a ledger.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ledger.verify._lineage import LN_SENTENCE
from ledger.verify._result import CheckResult, Report

MAX_POINTS = 4000  # longer series are binned (mean for metrics, max for update ratios) before plotting

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.name { white-space: nowrap; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.9em; word-break: break-all; }
.status { font-weight: bold; text-transform: uppercase; padding: 0.1em 0.4em; border-radius: 3px; color: #fff; }
.pass { background: #2e7d32; } .fail { background: #c62828; } .warn { background: #b8860b; } .skip { background: #777; }
.sentence { font-size: 1.05em; background: #f7f7f7; border-left: 4px solid #999; padding: 0.6em 0.8em; }
.note { color: #666; font-style: italic; font-size: 0.92em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (no external resources)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(width: float = 8.0, height: float = 3.2, ncols: int = 1) -> tuple[Any, Any]:
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        return fig, axes

    training = report.series
    notes = training.get("notes", {})
    update = _data(report, "continuity", series=True)
    verdict = report.verdict
    out: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Ledger verification: {_e(verdict.upper())}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Ledger verification: <span class="status {_e(verdict)}">{_e(verdict.upper())}</span></h1>',
        f'<p class="sentence" id="sentence">{_e(report.sentence())}</p>',
        "<h2>Checks</h2>", _checks_table(report.checks),
        "<h2>Ledger</h2>", _facts_table(report.ledger),
    ]
    out += _detail_tables(report)

    out.append("<h2>Training</h2>")
    # loss and learning rate
    if training.get("loss"):
        fig, (ax,) = figure()
        loss: tuple[Any, Any] = training["loss"]  # (steps, values)
        loss_x, loss_y = _thin(*loss, "mean")
        ax.plot(loss_x, loss_y, lw=1.2, color="C0")
        ax.set(xlabel="step", ylabel="loss", title="Loss (as logged)")
        if len(loss_y) and np.all(loss_y > 0) and np.nanmax(loss_y) / max(float(np.nanmin(loss_y)), 1e-300) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        out.append(_img(fig, "loss curve"))
    else:
        out.append(_note(f"No loss plot: {notes.get('loss', 'the report holds no loss series')}."))
    lrs = training.get("lrs") or {}
    if lrs:
        fig, (ax,) = figure()
        for label, (lr_x, lr_y) in lrs.items():
            ax.plot(*_thin(lr_x, lr_y, "mean"), lw=1.2, label=label)
        ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        if len(lrs) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out.append(_img(fig, "learning rate"))
    else:
        out.append(_note(f"No learning-rate plot: {notes.get('lrs', 'the report holds no learning rates')}."))

    # update magnitude against the optimizer bound
    out.append("<h2>Updates against the optimizer bound</h2>")
    if update.get("steps"):
        steps, moved, bound, ratio = (update[k] for k in ("steps", "moved", "bound", "ratio"))
        fig, (left, right) = figure(11.0, 3.4, ncols=2)
        left.plot(*_thin(steps, bound, "max"), lw=1.2, color="C3", label=r"$\Sigma_i$ bound$_i$ (L2, per tensor)")
        left.plot(*_thin(steps, moved, "max"), lw=1.2, color="C0", label=r"$\Sigma_i\,|\Delta\|\theta_i\||$")
        if np.all(np.asarray(moved) > 0):
            left.set_yscale("log")
        left.set(xlabel="step", title=f"Update magnitude vs {update.get('family', '')} bound")
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
        right.plot(*_thin(steps, ratio, "max"), lw=1.2, color="C2")
        right.axhline(1.0, color="C3", ls="--", lw=1, label="bound")
        right.set(xlabel="step", ylabel="ratio", title=r"Largest per-tensor $|\Delta\|\theta_i\||$ / bound$_i$")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
        out.append(_img(fig, "update magnitude against the optimizer bound"))
        out.append(_note("Per step, from the logged per-tensor norms: a norm can change by no more than the "
                         "tensor's L2 step bound, so every ratio must stay at or below 1 (docs/VERIFYING.md)."))
    else:
        continuity = next((c for c in report.checks if c.name == "continuity"), None)
        why = f"continuity {continuity.status}: {continuity.detail}" if continuity else "no continuity check ran"
        out.append(_note(f"No update plot: {why}."))

    # distance from init
    distance = _pairs(update.get("distance_from_init") or _data(report, "continuity").get("distance_from_init"))
    if len(distance) >= 2:
        fig, (ax,) = figure()
        xs, ys = zip(*distance, strict=True)
        ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 30 else None, ms=3, color="C4")
        ax.set(xlabel="step", ylabel="sketch distance", title="Distance from init (count-sketch)")
        ax.grid(alpha=0.3)
        out.append(_img(fig, "distance from init"))
    elif distance:
        out.append(_note(f"No distance-from-init plot: only one sketched step (step {distance[0][0]:.0f}, sketch "
                         f"distance {distance[0][1]:.4g}); the recorder's sketch cadence was sparse for this run."))
    else:
        out.append(_note("No distance-from-init plot: the continuity check recorded no sketched steps."))

    out += _lineage(report, figure)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out.append(f"<footer>Generated {_e(now)} by <code>ledger verify --report</code> for "
               f"<code>{_e(report.ledger.get('path', '?'))}</code>.</footer>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _thin(xs: Any, ys: Any, how: str) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: consecutive bins reduced by their mean or max."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) <= MAX_POINTS:
        return x, y
    starts = np.linspace(0, len(x), MAX_POINTS, endpoint=False).astype(np.int64)
    if how == "max":
        return x[starts], np.maximum.reduceat(y, starts)
    counts = np.diff(np.append(starts, len(y)))
    return x[starts], np.add.reduceat(y, starts) / counts


def _data(report: Report, name: str, series: bool = False) -> Mapping[str, Any]:
    for check in report.checks:
        if check.name == name:
            found: Mapping[str, Any] = check.series if series else check.data
            return found
    return {}


def _pairs(value: Any) -> list[tuple[float, float]]:
    out = []
    for item in value or []:
        try:
            step, v = item
            out.append((float(step), float(v)))
        except (TypeError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- HTML pieces


def _e(value: Any) -> str:
    """HTML-escaped text, its undecodable path bytes (surrogate escapes) shown as ``\\xff``."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        text = f"{value:.4g}"
        return f"{value:.6g}" if float(text) != value and abs(float(text)) == 1 else text  # 0.99999 is not 1
    return str(value)


def _img(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, table_id: str | None = None,
           numeric: Sequence[int] = ()) -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = _num(cell) if i in numeric else _e(cell if cell is not None else "—")
            cells.append(f'<td class="num">{_e(text)}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _checks_table(checks: Sequence[CheckResult]) -> str:
    rows = []
    for check in checks:
        figures = "; ".join(f"{k} {v}" for k, v in _figures(check))
        rows.append(f'<tr><td class="name"><code>{_e(check.name)}</code></td>'
                    f'<td><span class="status {_e(check.status)}">{_e(check.status)}</span></td>'
                    f"<td>{_e(check.detail)}</td><td>{_e(figures or '—')}</td></tr>")
    return ('<table id="checks"><thead><tr><th>check</th><th>status</th><th>detail</th><th>figures</th></tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _count(value: Any) -> int | None:
    return len(value) if isinstance(value, (list, tuple)) else None


def _figures(check: CheckResult) -> list[tuple[str, str]]:
    """Margins, ratios and counts worth a glance, per check (label, formatted value)."""
    d = check.data
    pick: list[tuple[str, Any]] = []
    if check.name == "chain":
        pick = [("entries", d.get("entries")), ("bodies decoded", d.get("bodies_decoded"))]
    elif check.name == "signatures":
        pick = [("checked", d.get("checked")), ("key", d.get("key_source"))]
    elif check.name == "seal":
        pick = [("entry count", d.get("entry_count"))]
    elif check.name == "model":
        pick = [("tensors", d.get("tensors")), ("differ", _count(d.get("differ")))]
    elif check.name == "checkpoints":
        pick = [("matched", _count(d.get("matched"))), ("pruned", _count(d.get("pruned"))),
                ("missing", _count(d.get("missing")))]
    elif check.name == "init":
        pick = [("tensors", d.get("tensors")), ("differ", _count(d.get("differ"))), ("seed", d.get("seed"))]
    elif check.name == "continuity":
        pick = [("margin", d.get("margin")), ("anomalies", _count(d.get("anomalies"))),
                ("steps", d.get("steps_checked")), ("checkpoint intervals", d.get("checkpoint_intervals_checked"))]
    elif check.name == "replay":
        intervals = [i for i in d.get("intervals") or [] if isinstance(i, Mapping)]
        ratios = [float(i["ratio"]) for i in intervals if isinstance(i.get("ratio"), (int, float))]
        pick = [("mode", d.get("mode")), ("ρ", d.get("rho")),
                ("intervals", f"{len(intervals)}/{d['available_intervals']}" if "available_intervals" in d else None),
                ("per-interval ratio max", max(ratios) if ratios else None),
                ("cost", f"{100 * d['cost_fraction']:.0f}%" if isinstance(d.get("cost_fraction"), (int, float))
                 else None),
                ("seed", d.get("seed"))]
    elif check.name == "independence":
        against = [a for a in d.get("against") or [] if isinstance(a, Mapping)]
        p_values = [float(a["p_value"]) for a in against if isinstance(a.get("p_value"), (int, float))]
        pick = [("models compared", len(against) if against else None),
                ("smallest p-value", min(p_values) if p_values else None)]
    else:
        pick = [(k, v) for k, v in d.items() if isinstance(v, (int, float, str)) and len(str(v)) <= 40][:4]
    return [(label, _num(value)) for label, value in pick if value is not None and value != ""]


_FACTS = (("path", "path"), ("run id", "run_id"), ("entries", "entries"), ("steps", "steps"), ("sealed", "sealed"),
          ("head", "head"), ("key id", "key_id"), ("torn tail bytes", "torn_tail_bytes"))


def _facts_table(facts: Mapping[str, Any]) -> str:
    rows = []
    for label, key in _FACTS:
        if key in facts:
            value = facts[key]
            text = _num(value) if isinstance(value, (bool, int, float)) or value is None else str(value)
            cell = f"<code>{_e(text)}</code>" if key in ("head", "key_id", "run_id", "path") else _e(text)
            rows.append(f"<tr><th>{_e(label)}</th><td>{cell}</td></tr>")
    sample = facts.get("sample")
    if isinstance(sample, Mapping):
        rows.append(f"<tr><th>sample</th><td>{_e(sample.get('size'))} entries, seed {_e(sample.get('seed'))}</td></tr>")
    return f'<table id="ledger">{"".join(rows)}</table>'


def _detail_tables(report: Report) -> list[str]:
    """Continuity anomalies and replayed intervals, when the report has them."""
    out: list[str] = []
    anomalies = [a for a in _data(report, "continuity").get("anomalies") or [] if isinstance(a, Mapping)]
    if anomalies:
        out.append("<h2>Continuity anomalies</h2>")
        rows = [(a.get("step"), a.get("evidence"), a.get("ratio"), a.get("tensor") or a.get("detail") or "")
                for a in anomalies[:100]]
        out.append(_table(("step", "evidence", "ratio to bound", "tensor / detail"), rows, numeric=(0, 2)))
        if len(anomalies) > 100:
            out.append(_note(f"… and {len(anomalies) - 100} more (see --json)."))
    intervals = [i for i in _data(report, "replay").get("intervals") or [] if isinstance(i, Mapping)]
    if intervals:
        out.append("<h2>Replayed intervals</h2>")
        replayed: list[Sequence[Any]] = [
            (_span(i.get("from_step"), i.get("to_step")), ", ".join(i.get("why") or []), i.get("distance"),
             i.get("ratio"), i.get("bit_exact"), f"{i.get('batches_matched', '—')}/{i.get('steps', '—')}",
             f"{i.get('metrics_matched', '—')}/{i.get('steps', '—')}", "; ".join(i.get("problems") or []) or "—")
            for i in intervals]
        out.append(_table(("steps", "why", "distance", "ratio to movement", "bit-exact", "batches", "metrics",
                           "problems"), replayed, numeric=(2, 3, 4)))
    return out


def _span(from_step: Any, to_step: Any) -> str:
    start = from_step + 1 if isinstance(from_step, int) else "?"
    return f"{start}…{to_step if to_step is not None else '?'}"


def _lineage(report: Report, figure: Any) -> list[str]:
    out = ["<h2>Lineage</h2>"]
    check = next((c for c in report.checks if c.name == "independence"), None)
    against = [a for a in (check.data.get("against") or [] if check else []) if isinstance(a, Mapping)]
    if check is None:
        return out + [_note("This report has no independence check: no lineage was examined.")]
    if not against:
        return out + [_note(f"independence {check.status}: {check.detail}")]
    headers = ["file", "verdict", "p-value", "LayerNorm cosine", "null-baseline cosine", "LayerNorm Pearson"]
    rows = [[Path(str(a.get("file", "?"))).name, a.get("verdict"), a.get("p_value"), a.get("layernorm_cosine"),
             a.get("layernorm_cosine_null"), a.get("layernorm_pearson")] for a in against]
    if any(a.get("reason") for a in against):
        headers.append("reason")
        for row, a in zip(rows, against, strict=True):
            row.append(a.get("reason") or "")
    out.append(_table(headers, rows, table_id="lineage", numeric=(2, 3, 4, 5)))
    trajectories = []
    for a in against:
        t = a.get("trajectory")
        if isinstance(t, Mapping) and t.get("steps") and t.get("distance"):
            trajectories.append((Path(str(a.get("file", "?"))).name, t))
    if trajectories:
        fig, (ax,) = figure()
        for i, (name, t) in enumerate(trajectories):
            n = min(len(t["steps"]), len(t["distance"]))
            ax.plot(list(t["steps"])[:n], list(t["distance"])[:n], lw=1.2, color=f"C{i % 10}", label=name)
            if isinstance(t.get("baseline"), (int, float)):
                ax.axhline(float(t["baseline"]), color=f"C{i % 10}", ls="--", lw=1,
                           label=f"{name}: baseline")
        ax.set(xlabel="step", ylabel="distance", title="Distance to each foreign model over training")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out.append(_img(fig, "distance to each foreign model over steps"))
    else:
        out.append(_note("No trajectory plot: the independence check recorded no distance trajectories."))
    out.append("<h3>LayerNorm cosine vs its null baseline</h3>")
    keys = (("layernorm_cosine", "raw cosine"), ("layernorm_cosine_null", "null-baseline cosine"),
            ("layernorm_pearson", "Pearson"))
    if any(isinstance(a.get(k), (int, float)) for a in against for k, _ in keys):
        fig, (ax,) = figure(8.0, 3.0 + 0.15 * len(against))
        width = 0.8 / len(keys)
        positions = np.arange(len(against))
        lowest = 0.0
        for j, (key, label) in enumerate(keys):
            values = [float(a[key]) if isinstance(a.get(key), (int, float)) else np.nan for a in against]
            ax.bar(positions + (j - 1) * width, values, width, label=label, color=f"C{j}")
            lowest = min([lowest, *(v for v in values if not math.isnan(v))])
        ax.set_ylim(lowest - 0.05, 1.3)  # room above the bars for the legend
        ax.set_xticks(positions, [Path(str(a.get("file", "?"))).name for a in against], fontsize=8)
        ax.axhline(0, color="#444", lw=0.8)
        ax.set(ylabel="similarity", title="LayerNorm gains: raw cosine, null-baseline cosine, Pearson")
        ax.legend(fontsize=8, loc="upper center", ncol=3)
        ax.grid(alpha=0.3, axis="y")
        out.append(_img(fig, "LayerNorm cosine vs its null baseline"))
    else:
        out.append(_note("No LayerNorm panel: the independence check recorded no LayerNorm similarities."))
    out.append(f'<p id="layernorm-note">{_e(LN_SENTENCE)}</p>')
    return out
