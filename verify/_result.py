"""Check results and the report that combines them into a verdict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

STATUSES = ("pass", "fail", "warn", "skip")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one named check: ``status`` is pass, fail, warn or skip; ``detail`` is one
    plain sentence; ``data`` holds figures for JSON (first bad seq, counts, margins …)."""

    name: str
    status: str
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""  # a short reason for ``not_shown`` and the final sentence (defaults to detail)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form: status, detail and the data fields."""
        return {"status": self.status, "detail": self.detail, **self.data}


@dataclass(frozen=True, slots=True)
class Report:
    """All check results for one ledger, plus facts about the ledger itself."""

    checks: tuple[CheckResult, ...]
    ledger: Mapping[str, Any]

    def require(self, names: Iterable[str]) -> Report:
        """A copy in which each named check that did not pass becomes a failure."""
        wanted = set(names)
        checks = tuple(
            replace(c, status="fail", detail=f"required, but {c.status}: {c.detail}", summary="")
            if c.name in wanted and c.status in ("warn", "skip") else c
            for c in self.checks
        )
        return replace(self, checks=checks)

    @property
    def verdict(self) -> str:
        """``fail`` if any check failed, else ``pass``."""
        return "fail" if any(c.status == "fail" for c in self.checks) else "pass"

    @property
    def rests_on(self) -> list[str]:
        """Names of the checks that passed."""
        return [c.name for c in self.checks if c.status == "pass"]

    @property
    def not_shown(self) -> list[dict[str, str]]:
        """Checks that were skipped or only warned, with their reasons."""
        return [{"check": c.name, "status": c.status, "reason": c.summary or c.detail}
                for c in self.checks if c.status in ("warn", "skip")]

    def check(self, name: str) -> CheckResult:
        """The result of the named check."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object documented in docs/VERIFYING.md and design.md."""
        return {
            "verdict": self.verdict,
            "rests_on": self.rests_on,
            "not_shown": self.not_shown,
            "ledger": dict(self.ledger),
            "checks": {c.name: c.to_dict() for c in self.checks},
        }

    def sentence(self) -> str:
        """One plain sentence: the verdict, what it rests on and what it does not show."""
        entries = self.ledger.get("entries", 0)
        failed = [c.name for c in self.checks if c.status == "fail"]
        if failed:
            head = f"FAIL: {_join(failed)} failed on this ledger of {entries} entries"
        else:
            head = f"PASS: {_join(self.rests_on) or 'nothing'} hold{'s' if len(self.rests_on) == 1 else ''} " \
                   f"for {entries} entries"
        shown = [f"{n['check']} ({n['reason'].rstrip('.')})" for n in self.not_shown]
        tail = f"; not shown: {'; '.join(shown)}" if shown else "; nothing was skipped"
        return head + tail + "."


def _join(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]
