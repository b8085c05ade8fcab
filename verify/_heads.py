"""Check ``heads``: the signed tree heads in and beside the ledger (docs/FORMAT.md §13.2).

Every checkpoint entry's ``tree_head`` must state the entries before it (size = its seq, root =
the RFC 9162 root of that prefix) and carry a valid signature by the trainer's key; every
``heads/<size>.note`` must be a well-formed note signed by that key and the ledger must extend it
(its root equals the root of the ledger's first ``size`` entries). A head signed by the key that
the ledger does not extend is a fork, named by its size. A ledger without any head (written before
§13) skips the check; a checkpoint head that was never copied to ``heads/`` is fine.
"""

from __future__ import annotations

from typing import Any

from ledger._crypto import verify_bytes
from ledger._encoding import decode_body
from ledger._heads import head_name, list_heads
from ledger._merkle import PrefixTree
from ledger._note import TreeHead, open_note, origin_of
from ledger._record import HEADER_SIZE, Kind
from ledger._schema import RecordedHead
from ledger.errors import FormatError
from ledger.verify._context import Context
from ledger.verify._load import header_field
from ledger.verify._result import CheckResult, Status

_SHOWN = 5  # problems named in the detail; the data lists up to 1000


def prefix_roots(tree: PrefixTree, sizes: set[int]) -> dict[int, bytes]:
    """The RFC 9162 root of the first ``s`` entries for each ``s`` in ``sizes`` (those ≤ the
    entries), read from the tree the checks share: O(log n) hashes each."""
    return {size: tree.root(size) for size in sorted(sizes) if 0 <= size <= tree.size}


def _key(ctx: Context) -> tuple[bytes | None, str]:
    """The trainer's key (given, else the one genesis embeds) and where it came from."""
    if ctx.key is not None:
        return ctx.key.raw, "given"
    embedded = ctx.loaded.genesis.get("public_key") if ctx.loaded.genesis else None
    return (embedded, "embedded") if isinstance(embedded, bytes) and len(embedded) == 32 else (None, "none")


def _recorded_heads(ctx: Context) -> tuple[list[tuple[int, RecordedHead]], list[tuple[int, str]]]:
    """(seq, tree_head) of every checkpoint entry that carries one, and unreadable ones (seq, why)."""
    loaded = ctx.loaded
    if not len(loaded.records):
        return [], []
    headers, lengths = loaded.headers()
    kinds = header_field(headers, "kind")
    heads, bad = [], []
    for seq in [int(i) for i in (kinds == Kind.CHECKPOINT).nonzero()[0]]:
        if lengths[seq] < HEADER_SIZE:
            continue
        try:
            body = decode_body(loaded.records[seq][HEADER_SIZE:])
            head = RecordedHead.from_body(body.get("tree_head") if isinstance(body, dict) else None)
        except FormatError as exc:
            bad.append((seq, str(exc)))
            continue
        if head is not None:
            heads.append((seq, head))
    return heads, bad


def check_heads(ctx: Context) -> CheckResult:
    """Checkpoint heads state their prefixes and verify; every ``heads/`` note verifies and the
    ledger extends it; a fork or a forged head fails naming the size."""
    loaded, n = ctx.loaded, len(ctx.loaded.hashes)
    recorded, unreadable = _recorded_heads(ctx)
    published = list_heads(ctx.ledger.layout.root)  # FormatError (a symlink, a FIFO…) fails the check
    if not recorded and not published and not unreadable:
        return CheckResult("heads", Status.SKIP, "the ledger carries no signed tree heads (written before heads "
                           "were recorded, docs/FORMAT.md §13)", summary="no signed tree heads")
    public, source = _key(ctx)
    run_id = loaded.genesis.get("run_id") if loaded.genesis else None
    if public is None or not isinstance(run_id, str):
        return CheckResult("heads", Status.FAIL, "no key to check the heads with (no --key and no public key in a "
                           "readable genesis) or no run id to name their origin")
    origin = origin_of(run_id)
    problems: list[tuple[int, str]] = [(seq, f"checkpoint seq {seq}: tree_head {why}") for seq, why in unreadable]
    forks: list[int] = []
    signed_recorded = []
    for seq, head in recorded:
        if head.size != seq:
            problems.append((seq, f"checkpoint seq {seq}: tree_head size {head.size} is not its seq"))
        elif not verify_bytes(public, TreeHead(origin, head.size, head.root).text(), head.signature):
            problems.append((seq, f"checkpoint seq {seq}: tree_head signature does not verify (forged)"))
        else:
            signed_recorded.append((seq, head))
    signed_published = []
    for size, note in published:  # the cheap checks first (name, size, origin); one signature check last
        where = f"heads/{head_name(size)}"
        try:
            stated = open_note(note, None)[0]
            if stated.size != size or stated.origin != origin:
                problems.append((size, f"{where}: states size {stated.size} of {stated.origin[:80]!r}, not size "
                                       f"{size} of {origin!r}"))
            elif not open_note(note, public)[1]:
                problems.append((size, f"{where}: not signed by the trainer's key (forged, or another key)"))
            else:
                signed_published.append((size, stated, where))
        except FormatError as exc:
            problems.append((size, f"{where}: not a signed tree head ({exc})"))
    roots = prefix_roots(ctx.tree(), {h.size for _, h in signed_recorded} | {s for s, _, _ in signed_published})
    for seq, head in signed_recorded:
        if roots.get(head.size) != head.root:
            forks.append(head.size)
            problems.append((seq, f"fork at size {head.size}: the head signed in checkpoint seq {seq} is not the "
                                  f"root of the entries before it"))
    for size, stated, where in signed_published:
        if size > n:
            forks.append(size)
            problems.append((size, f"{where}: a signed head of {size} entries, but the ledger holds {n}: it was cut "
                                   "short or forked"))
        elif roots[size] != stated.root:
            forks.append(size)
            problems.append((size, f"fork at size {size}: the ledger does not extend the head signed in {where}"))
    data: dict[str, Any] = {"checkpoint_heads": len(recorded), "published_heads": len(published), "key_source": source}
    if problems:
        problems.sort()
        data.update({"problems": [why for _, why in problems[:1000]], "forks": sorted(set(forks))[:1000]})
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        return CheckResult("heads", Status.FAIL, "; ".join(why for _, why in problems[:_SHOWN]) + more, data)
    largest = max([h.size for _, h in recorded] + [s for s, _ in published])
    detail = (f"{len(recorded)} checkpoint heads and {len(published)} published heads (heads/) verify; the ledger "
              f"extends every one (largest {largest} entries)")
    if source != "given":
        return CheckResult("heads", Status.WARN, detail + " with the key embedded in genesis; pass --key to "
                           "authenticate the signer", data, summary="heads checked with the embedded key: no --key")
    return CheckResult("heads", Status.PASS, detail, data)
