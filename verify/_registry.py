"""The checks, in order, and what each needs: one contract for all of them.

A check is a name, the requirements it needs, and ``run(ctx) -> CheckResult``. The registry skips
a check whose requirement is unmet, with that requirement's reason, so no check tests for its own
inputs. A new check is one module with a ``run`` function plus one line in :data:`CHECKS`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType

from ledger.errors import FormatError
from ledger.verify._context import Context
from ledger.verify._result import CheckResult, Status


@dataclass(frozen=True, slots=True)
class Requirement:
    """Something a check needs; ``met(ctx)`` says whether it is there, ``reason`` and ``summary``
    say why the check was skipped when it is not."""

    met: Callable[[Context], bool]
    reason: str | Callable[[Context], str]
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Check:
    """One named check of the verdict."""

    name: str
    run: Callable[[Context], CheckResult]
    needs: tuple[Requirement, ...] = ()


def readable_genesis() -> Requirement:
    """The genesis could be read and follows the schema (else the chain check says why)."""
    return Requirement(lambda ctx: ctx.view is not None,
                       lambda ctx: f"genesis does not follow the schema: {ctx.view_error}" if ctx.view_error
                       else "no readable genesis", "no readable genesis")


def recorded() -> Requirement:
    """The ledger was written by the recorder (its genesis carries training fingerprints)."""
    return Requirement(lambda ctx: ctx.view is not None and ctx.view.recorded,
                       "the ledger carries no training fingerprints (not written by the recorder)",
                       "no training fingerprints")


def given(what: str, reason: str) -> Requirement:
    """The verifier named input ``what`` (an attribute of the context)."""
    return Requirement(lambda ctx: bool(getattr(ctx, what)), reason, reason.split(":")[0])


def extra(module: str, extra_name: str, purpose: str) -> Requirement:
    """An optional dependency is installed (else: the exact pip line that installs it)."""
    line = f"pip install 'training-ledger[{extra_name}]'"
    return Requirement(lambda _ctx: importlib.util.find_spec(module) is not None,
                       f"{purpose} needs {module}, which is not installed: {line}", f"{module} not installed ({line})")


def run_checks(ctx: Context, checks: tuple[Check, ...]) -> tuple[CheckResult, ...]:
    """Run ``checks`` in order and return their results; each sees, in ``ctx.results``, those of
    ``ctx.results`` and of the checks before it. A check that hits damaged bytes it had to read
    (:class:`~ledger.errors.FormatError`) fails with that reason; the others still run."""
    results: dict[str, CheckResult] = dict(ctx.results)
    out = []
    for check in checks:
        unmet = next((need for need in check.needs if not need.met(ctx)), None)
        if unmet is not None:
            reason = unmet.reason(ctx) if callable(unmet.reason) else unmet.reason
            result = CheckResult(check.name, Status.SKIP, reason, summary=unmet.summary)
        else:
            try:
                result = check.run(replace(ctx, results=MappingProxyType(dict(results))))
            except FormatError as exc:  # a damaged file the check read (a checkpoint, the weights): evidence
                result = CheckResult(check.name, Status.FAIL, f"could not be completed: {exc}")
        results[check.name] = result
        out.append(result)
    return tuple(out)
