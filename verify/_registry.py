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

from ledger.errors import ConfigurationError, FormatError
from ledger.verify._context import Context
from ledger.verify._result import CheckResult, Status


@dataclass(frozen=True, slots=True)
class Requirement:
    """Something a check needs; ``met(ctx)`` says whether it is there, ``reason`` and ``summary``
    say why the check was skipped when it is not."""

    met: Callable[[Context], bool]
    reason: str | Callable[[Context], str]
    summary: str = ""
    # True when the unmet need is itself evidence of damage (a genesis that breaks the schema):
    # the check then fails with the reason instead of being skipped
    fails: Callable[[Context], bool] | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """One named check of the verdict."""

    name: str
    run: Callable[[Context], CheckResult]
    needs: tuple[Requirement, ...] = ()


def readable_genesis() -> Requirement:
    """The genesis could be read and follows the schema. A genesis that decodes but breaks the
    schema fails the check (a crafted or damaged body is evidence); an unreadable one skips it
    (the chain check fails naming seq 0)."""
    return Requirement(lambda ctx: ctx.view is not None,
                       lambda ctx: f"seq 0: genesis does not follow the schema: {ctx.view_error}" if ctx.view_error
                       else "no readable genesis", "no readable genesis", fails=lambda ctx: bool(ctx.view_error))


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
    (:class:`~ledger.errors.FormatError`, or an unexpected error from decoding hostile content)
    fails with that reason; the others still run. A result whose ``data`` lists ``damaged_seqs``
    (checkpoints whose files it could not read) hides them from the checks after it. A
    :class:`~ledger.errors.ConfigurationError` (an input the caller named cannot be used)
    propagates: the verifier could not run."""
    results: dict[str, CheckResult] = dict(ctx.results)
    out = []
    for check in checks:
        unmet = next((need for need in check.needs if not need.met(ctx)), None)
        if unmet is not None:
            reason = unmet.reason(ctx) if callable(unmet.reason) else unmet.reason
            failed = unmet.fails is not None and unmet.fails(ctx)
            result = CheckResult(check.name, Status.FAIL if failed else Status.SKIP, reason,
                                 summary="" if failed else unmet.summary)
        else:
            try:
                result = check.run(replace(ctx, results=MappingProxyType(dict(results))))
            except FormatError as exc:  # a damaged file the check read (a checkpoint, the weights): evidence
                result = CheckResult(check.name, Status.FAIL, f"could not be completed: {exc}")
            except ConfigurationError:
                raise
            except Exception as exc:  # noqa: BLE001 - hostile content must not end the run
                # a decoder that let a crafted value through (a bug to fix where it was raised): the
                # evidence could not be judged, which fails the check, never the whole verification
                result = CheckResult(check.name, Status.FAIL, f"could not be completed: {type(exc).__name__} while "
                                     f"reading the evidence: {_one_line(exc)}", {"exception": type(exc).__name__})
        results[check.name] = result
        damaged = result.data.get("damaged_seqs")
        if damaged and ctx.view is not None:  # evidence found damaged is never read again by a later check
            ctx = replace(ctx, view=replace(ctx.view, damaged=ctx.view.damaged | frozenset(damaged)))
        out.append(result)
    return tuple(out)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "…"
