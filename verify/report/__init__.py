"""Three renderers of one :class:`~ledger.verify.Report`: text (the terminal), JSON (``--json``)
and one self-contained HTML page (``--report``). None of them opens a ledger: everything they show
is in the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ledger._text import printable
from ledger.verify._result import Report

Style = Callable[[str, str], str]  # (text, status) → styled text


def render_text(report: Report, style: Style | None = None) -> str:
    """The terminal form: the ledger line, one line per check, the final sentence. ``style``
    colours a status word (the CLI passes click's)."""
    facts = report.ledger
    p = printable
    lines = [f"ledger {p(facts.get('path'))}  run {p(facts.get('run_id'))}  entries {p(facts.get('entries'))}"]
    for check in report.checks:
        status = f"{check.status:<4}"
        lines.append(f"  {p(check.name):<12} {style(status, check.status.value) if style else status}  "
                     f"{p(check.detail)}")
    lines.append(p(report.sentence()))
    return "\n".join(lines)


def render_json(report: Report, series: bool = False) -> str:
    """The JSON object documented in docs/VERIFYING.md (per-step series only when asked)."""
    return json.dumps(report.to_dict(series), indent=2, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def render_html(report: Report, ledger_path: Any = None) -> str:
    """The report as one self-contained HTML page (needs matplotlib: the ``report`` extra).
    ``ledger_path`` is ignored (the page comes from the report alone) and deprecated."""
    if ledger_path is not None:
        import warnings

        warnings.warn("render_html(report, ledger_path): the ledger path is no longer used; pass the report only",
                      DeprecationWarning, stacklevel=2)
    from ledger.verify.report._html import render_html as render

    page: str = render(report)
    return page


__all__ = ["printable", "render_html", "render_json", "render_text"]
