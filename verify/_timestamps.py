"""Check ``timestamps``: RFC 3161 tokens over the ledger's signed tree heads (docs/FORMAT.md §13).

Each token — in an entry's ``timestamps`` field, or beside the ledger in ``heads/<size>.tsr`` — must
verify against the TSA roots the verifier trusts (``--tsa-roots PEM``) and cover SHA-256 of the
note text of the head of the first ``size`` entries *of this ledger* (its origin, size and RFC 9162
root recomputed from the entries). A token that does not fails the check naming the size. Each
verified token anchors a prefix: "entries up to seq size−1 existed before genTime" (plus the
accuracy the token states); the result lists
the earliest anchor for each part of the ledger and the heads (``heads/*.note``, checkpoint
``tree_head`` fields, the sealed ledger's final head) that have no token. Without ``--tsa-roots``
the registry skips the check (nothing is trusted by default).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import stat
from typing import Any

from ledger import _tsa
from ledger._encoding import decode_body
from ledger._heads import MAX_HEADS, heads_dir, list_heads
from ledger._io import file_kind, read_regular
from ledger._note import TreeHead, origin_of
from ledger._record import HEADER_SIZE, Kind, MerkleAccumulator, decode_header
from ledger._schema import timestamps_of, tsa_status_of
from ledger.errors import FormatError, LedgerError
from ledger.verify._context import Context
from ledger.verify._load import first_break
from ledger.verify._result import CheckResult, Status

_TIMESTAMPS_KEY = b"\x6atimestamps"  # the CBOR text "timestamps": entries without it are not decoded
_TREE_HEAD_KEY = b"\x69tree_head"
_TOKEN_NAME = re.compile(r"(0|[1-9][0-9]{0,19})\.tsr")
LISTED = 20  # sizes named in a sentence


def _iso(when: _dt.datetime) -> str:
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sizes(sizes: list[int]) -> str:
    shown = ", ".join(map(str, sizes[:LISTED]))
    return shown + (f" and {len(sizes) - LISTED} more" if len(sizes) > LISTED else "")


def _from_entries(ctx: Context, limit: int, problems: list[str]) -> tuple[list[tuple[int, bytes, str]], set[int],
                                                                          dict[str, Any] | None]:
    """The tokens the entries carry (size, token, where), the sizes of the heads checkpoint entries
    carry, and the seal's ``tsa`` field; malformed fields are added to ``problems``."""
    tokens: list[tuple[int, bytes, str]] = []
    heads: set[int] = set()
    status = None
    records = ctx.loaded.records
    for seq in range(limit):
        record = records[seq]
        if _TIMESTAMPS_KEY not in record and _TREE_HEAD_KEY not in record and seq != limit - 1:
            continue
        try:
            kind = decode_header(record).kind
            body = decode_body(record[HEADER_SIZE:])
            if not isinstance(body, dict):
                continue
            tokens.extend((t.size, t.token, f"seq {seq}") for t in timestamps_of(body, f"seq {seq}", seq))
            head = body.get("tree_head") if kind is Kind.CHECKPOINT else None
            if isinstance(head, dict) and isinstance(head.get("size"), int) and not isinstance(head["size"], bool):
                heads.add(head["size"])
            if kind is Kind.SEAL:
                status = tsa_status_of(body)
        except (FormatError, ValueError, TypeError, RecursionError) as exc:
            problems.append(f"seq {seq}: {exc}")
    return tokens, heads, status


def _from_files(ctx: Context, problems: list[str]) -> tuple[list[tuple[int, bytes, str]], set[int]]:
    """The tokens in ``heads/<size>.tsr`` and the sizes of ``heads/<size>.note``; a symlink, a file
    that is not regular or too large is a problem (never followed, never read whole)."""
    directory = heads_dir(ctx.ledger.path)
    try:
        notes = {size for size, _ in list_heads(ctx.ledger.path)}
    except (FormatError, OSError) as exc:
        problems.append(f"heads/: {exc}")
        return [], set()
    tokens: list[tuple[int, bytes, str]] = []
    if not notes and not os.path.isdir(directory):
        return tokens, notes
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if _TOKEN_NAME.fullmatch(e.name)]
    if len(names) > MAX_HEADS:
        problems.append(f"heads/ holds {len(names)} tokens, more than the {MAX_HEADS} read")
        names = []
    for name in sorted(names, key=lambda n: int(n[:-4])):
        path = directory / name
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise FormatError(f"is {file_kind(info.st_mode)}, not a regular file")
            tokens.append((int(name[:-4]), read_regular(path, what="timestamp token", limit=_tsa.MAX_TOKEN),
                           f"heads/{name}"))
        except FileNotFoundError:
            continue
        except (LedgerError, OSError) as exc:
            problems.append(f"heads/{name}: {exc}")
    return tokens, notes


def _roots(hashes: list[bytes], sizes: set[int]) -> dict[int, bytes]:
    """The RFC 9162 root of the first ``size`` entries, for each size (one pass over the hashes)."""
    out: dict[int, bytes] = {}
    wanted = sorted(s for s in sizes if 0 < s <= len(hashes))
    tree = MerkleAccumulator()
    for size in wanted:
        while tree.size < size:
            tree.add(hashes[tree.size])
        out[size] = tree.root()
    return out


def _anchors(times: dict[int, _dt.datetime]) -> list[tuple[int, _dt.datetime]]:
    """The earliest anchor of each part: (size, time) pairs no larger head beats with an earlier time."""
    kept: list[tuple[int, _dt.datetime]] = []
    for size in sorted(times, reverse=True):
        if not kept or times[size] < kept[-1][1]:
            kept.append((size, times[size]))
    return kept[::-1]


def check_timestamps(ctx: Context) -> CheckResult:
    """Verify every timestamp token against the trusted TSA roots and this ledger's heads."""
    genesis = ctx.loaded.genesis or {}
    try:
        origin = origin_of(genesis["run_id"]) if isinstance(genesis.get("run_id"), str) else None
    except FormatError:
        origin = None
    problems: list[str] = []
    limit = first_break(ctx.loaded)
    in_ledger, checkpoint_heads, status = _from_entries(ctx, limit, problems)
    beside, notes = _from_files(ctx, problems)
    if origin is None:
        if not (in_ledger or beside or checkpoint_heads or notes or problems or status):
            return CheckResult("timestamps", Status.SKIP, "the ledger holds no timestamps and no tree heads (its run "
                               "id cannot name heads)", summary="no timestamps")
        return CheckResult("timestamps", Status.FAIL, "genesis has no usable run id: no head can be named")
    hashes = ctx.loaded.hashes[:limit]
    sealed = bool(limit) and decode_header(ctx.loaded.records[limit - 1]).kind is Kind.SEAL
    heads = checkpoint_heads | notes | ({limit} if sealed else set())
    tokens = in_ledger + beside
    roots = _roots(hashes, heads | {size for size, _, _ in tokens})
    times: dict[int, _dt.datetime] = {}
    checked: set[tuple[int, bytes]] = set()
    for size, token, where in tokens:
        if (size, token) in checked:
            continue  # the same token for the same head, in the ledger and in heads/
        if size not in roots:
            problems.append(f"head {size} ({where}): a token for {size} entries, but the ledger holds {len(hashes)}")
            continue
        digest = hashlib.sha256(TreeHead(origin, size, roots[size]).text()).digest()
        try:
            stamp = _tsa.verify_token(token, digest, ctx.tsa_roots)
        except (FormatError, LedgerError) as exc:
            problems.append(f"head {size} ({where}): {exc}")
            continue
        checked.add((size, token))
        times[size] = min(times.get(size, stamp.latest), stamp.latest)  # genTime + the accuracy it states
    anchors = _anchors(times)
    lacking = sorted(heads - set(times))
    data: dict[str, Any] = {
        "anchors": [{"seq": size - 1, "size": size, "before": _iso(when)} for size, when in anchors],
        "tokens": len(tokens), "verified_heads": sorted(times), "heads_without_token": lacking,
    }
    if status is not None:
        data["tsa"] = status
    said = "; ".join(f"entries up to seq {size - 1} existed before {_iso(when)}" for size, when in anchors)
    missing = f"heads without a token: {_sizes(lacking)}" if lacking else ""
    if problems:
        detail = f"{len(problems)} timestamp(s) do not verify: " + "; ".join(problems[:10])
        detail += f"; {said}" if said else ""
        return CheckResult("timestamps", Status.FAIL, detail, {**data, "problems": problems[:100]})
    if not tokens:
        if status is None:
            return CheckResult("timestamps", Status.SKIP, "the ledger holds no timestamps (recorded without tsa=)",
                               data, summary="no timestamps")
        return CheckResult("timestamps", Status.WARN, f"the recorder asked {status['url']} but no head was stamped; "
                           + (missing or "no head was written"), data)
    if lacking:
        return CheckResult("timestamps", Status.WARN, f"{said}; {missing}", data)
    return CheckResult("timestamps", Status.PASS, f"{said} (every head has a token)", data)
