"""Check results and the report that combines them into a verdict."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ledger.errors import ConfigurationError, VerificationError


class Status(str, enum.Enum):
    """A check's outcome; the values are the strings of the JSON output."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Lists(Mapping[str, Any]):
    """A check's series: numpy arrays kept as they were computed, each turned into a list the first
    time it is read (rendering and ``to_dict(series=True)`` read them; most verifications never do)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        value = self._items[key]
        if isinstance(value, np.ndarray):
            value = self._items[key] = value.tolist()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(dict(self))


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one named check: ``status``; ``detail``, one plain sentence; ``data``, figures
    for JSON (first bad seq, counts, margins …); ``series``, per-step series it computed for the
    renderers (plots), left out of JSON unless asked for; ``summary``, a short reason for
    ``not_shown`` and the final sentence (defaults to detail)."""

    name: str
    status: Status
    detail: str
    data: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    series: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "status", Status(self.status))
        except ValueError:
            raise ConfigurationError(f"unknown check status {self.status!r} (one of pass, fail, warn, skip)") from None

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        """JSON form: status, detail and the data fields (and the series when asked)."""
        out = {"status": self.status.value, "detail": self.detail, **self.data}
        if series and self.series:
            out["series"] = dict(self.series)
        return out


@dataclass(frozen=True, slots=True)
class Report:
    """All check results for one ledger, facts about the ledger itself, and the training series
    (loss, learning rates) read while verifying: everything a renderer shows."""

    checks: tuple[CheckResult, ...]
    ledger: Mapping[str, Any]
    series: Mapping[str, Any] = field(default_factory=dict)

    def require(self, names: Iterable[str]) -> Report:
        """A copy in which each named check that did not pass becomes a failure."""
        wanted = set(names)
        checks = tuple(
            replace(c, status=Status.FAIL, detail=f"required, but {c.status}: {c.detail}", summary="")
            if c.name in wanted and c.status in (Status.WARN, Status.SKIP) else c
            for c in self.checks
        )
        return replace(self, checks=checks)

    @property
    def verdict(self) -> str:
        """``fail`` if any check failed, else ``pass``."""
        return "fail" if any(c.status is Status.FAIL for c in self.checks) else "pass"

    @property
    def rests_on(self) -> list[str]:
        """Names of the checks that passed."""
        return [c.name for c in self.checks if c.status is Status.PASS]

    @property
    def not_shown(self) -> list[dict[str, str]]:
        """Checks that were skipped or only warned, with their reasons."""
        return [{"check": c.name, "status": c.status.value, "reason": c.summary or c.detail}
                for c in self.checks if c.status in (Status.WARN, Status.SKIP)]

    def check(self, name: str) -> CheckResult:
        """The result of the named check."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def raise_if_failed(self) -> Report:
        """Raise :class:`~ledger.VerificationError` (carrying this report) when the verdict is
        ``fail``; return the report otherwise."""
        if self.verdict == "fail":
            raise VerificationError(self.sentence(), self)
        return self

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        """The JSON object documented in docs/VERIFYING.md (per-step series only when asked)."""
        out = {
            "verdict": self.verdict,
            "rests_on": self.rests_on,
            "not_shown": self.not_shown,
            "ledger": dict(self.ledger),
            "checks": {c.name: c.to_dict(series) for c in self.checks},
        }
        if series:
            out["series"] = dict(self.series)
        return out

    def sentence(self) -> str:
        """One plain sentence: the verdict, what it rests on and what it does not show."""
        entries = self.ledger.get("entries", 0)
        failed = [c.name for c in self.checks if c.status is Status.FAIL]
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
