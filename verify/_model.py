"""The ``model`` check: the released weights are the ones the sealed chain ends in."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ledger._encoding import decode_body
from ledger._fingerprint import safetensors_digests
from ledger._record import HEADER_SIZE, Kind, decode_header
from ledger._schema import FinalWeights, SealBody
from ledger.errors import FormatError
from ledger.verify._context import Context
from ledger.verify._load import Records
from ledger.verify._result import CheckResult, Status


def _seal_final(records: Records | Sequence[bytes]) -> FinalWeights | None:
    if not records:
        return None
    try:
        if decode_header(records[-1]).kind is not Kind.SEAL:
            return None
        return SealBody.from_body(decode_body(records[-1][HEADER_SIZE:])).final
    except FormatError:
        return None  # the seal check reports it


def check_model(ctx: Context) -> CheckResult:
    """Compare the tensor digests of a safetensors file (or sharded index) with the seal's."""
    model = ctx.model
    assert model is not None  # the registry skips this check without --model
    final = _seal_final(ctx.loaded.records)
    if final is None:
        return CheckResult("model", Status.SKIP, "the ledger has no seal with final weights to compare --model against",
                           summary="no sealed final weights in the ledger")
    sealed = final.tensor_digests
    try:
        found = safetensors_digests(model)
    except FormatError as exc:
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
