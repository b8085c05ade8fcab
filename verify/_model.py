"""The ``model`` check: the released weights are the ones the sealed chain ends in."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ledger._blocked import TENSOR_V1, safetensors_digests_as
from ledger._encoding import decode_body
from ledger._record import HEADER_SIZE, Kind, decode_header
from ledger._schema import SealBody
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._context import Context
from ledger.verify._continuity import file_problems
from ledger.verify._load import Records
from ledger.verify._result import CheckResult, Status


def _seal(records: Records | Sequence[bytes]) -> SealBody | None:
    """The seal when the ledger ends in one (FormatError when its body breaks the schema)."""
    if not records:
        return None
    try:
        if decode_header(records[-1]).kind is not Kind.SEAL:
            return None
    except FormatError:
        return None  # the chain check names a damaged header
    return SealBody.from_body(decode_body(records[-1][HEADER_SIZE:]))


def _file_digests(ctx: Context, model: Path) -> dict[str, bytes]:
    """The file's digests in the ledger's scheme: those hashing since the load began when that is
    ``tensor/v1`` (the background hashing is stopped otherwise)."""
    scheme = ctx.view.digest_scheme if ctx.view is not None else TENSOR_V1
    prefetched = ctx.model_digests
    if prefetched is not None and prefetched.path == model and scheme == TENSOR_V1:
        return prefetched.result()
    if prefetched is not None:
        prefetched.cancel()  # not this scheme (or not this file): it would only compete for the cores
    return safetensors_digests_as(model, scheme)


def check_model(ctx: Context) -> CheckResult:
    """Compare the tensor digests of a safetensors file (or sharded index) with the seal's; on an
    unsealed ledger, with the state at the last recorded step."""
    try:
        return _check_model(ctx)
    finally:  # the background hashing, when unread, stops here: no thread outlives the check
        if ctx.model_digests is not None:
            ctx.model_digests.cancel()


def _check_model(ctx: Context) -> CheckResult:
    model = ctx.model
    assert model is not None  # the registry skips this check without --model
    try:
        seal = _seal(ctx.loaded.records)
    except FormatError as exc:
        seq = len(ctx.loaded.records) - 1
        return CheckResult("model", Status.FAIL, f"the seal's body (seq {seq}) breaks the schema ({exc}): the released "
                           "weights cannot be compared", {"file": str(model), "first_bad_seq": seq})
    if seal is None and ctx.view is not None and ctx.view.recorded and ctx.view.steps:
        return _unsealed(ctx, model)
    final = seal.final if seal is not None else None
    if final is None:
        return CheckResult("model", Status.SKIP, "the ledger has no seal with final weights to compare --model against",
                           summary="no sealed final weights in the ledger")
    sealed = final.tensor_digests
    try:
        found = _file_digests(ctx, model)
    except (FormatError, ConfigurationError) as exc:  # a damaged file, index or shard: the weights cannot be read
        return CheckResult("model", Status.FAIL, f"{model}: {exc}", {"file": str(model)})
    missing = sorted(set(sealed) - set(found))
    extra = sorted(set(found) - set(sealed))
    differ = sorted(name for name in set(sealed) & set(found) if sealed[name] != found[name])
    data = {"file": str(model), "tensors": len(sealed), "differ": differ, "missing": missing, "extra": extra}
    if differ or missing or extra:
        parts = []
        if differ:
            parts.append(f"{len(differ)} tensor(s) differ: {', '.join(differ[:8])}{' …' if len(differ) > 8 else ''}")
        if missing:
            parts.append(f"missing from the file: {', '.join(missing[:8])}")
        if extra:
            parts.append(f"not in the sealed weights: {', '.join(extra[:8])}")
        return CheckResult("model", Status.FAIL, "; ".join(parts), data)
    return CheckResult("model", Status.PASS,
                       f"all {len(sealed)} tensors of {os.fspath(model)} match the sealed final weights", data)


def _unsealed(ctx: Context, model: Path) -> CheckResult:
    """An unsealed ledger (an interrupted run, or one cut short): compare the file with the state at
    the last recorded step — its checkpoint or logged digests, else its norms and sketch. A match
    warns (nothing seals it as the released state); a mismatch fails."""
    view = ctx.view
    assert view is not None
    last, digests, where = view.last_state()
    data: dict[str, Any] = {"file": str(model), "sealed": False, "compared_with": where or f"step {last}"}
    try:
        if digests is not None:
            found = _file_digests(ctx, model)
            differ = sorted(n for n in set(found) | set(digests) if found.get(n) != digests.get(n))
            problems = [f"{len(differ)} tensor(s) differ from {where}: {', '.join(differ[:8])}"] if differ else []
        else:
            problems = [f"{p} the file" for p in file_problems(view, model, last)]
            where = f"the norms{' and sketch' if view.steps[last].sketch is not None else ''} logged at step {last}"
    except (FormatError, ConfigurationError) as exc:
        return CheckResult("model", Status.FAIL, f"{model}: {exc}", data)
    if problems:
        return CheckResult("model", Status.FAIL, f"unsealed ledger: {'; '.join(problems)}", data)
    return CheckResult("model", Status.WARN, f"{model} matches {where}, but the ledger is unsealed: nothing commits "
                       "to these as the released weights", data, summary="unsealed: compared with the last step")
