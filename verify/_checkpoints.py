"""``checkpoints``: every stored training state hashes to its entry; pruned ones are reported as
pruned, missing ones as missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledger import _state
from ledger._blocked import TENSOR_V1
from ledger._dcp import compare as dcp_compare
from ledger._fingerprint import model_digest
from ledger._record import Kind
from ledger.errors import LedgerError
from ledger.verify._context import Context
from ledger.verify._result import CheckResult, Status
from ledger.verify._run import Checkpoint, RunView


def check_checkpoints(ctx: Context) -> CheckResult:
    """Every stored checkpoint matches its entry; pruned ones are reported as pruned, missing ones
    as missing (a warning: they may be kept elsewhere, see --checkpoints)."""
    view = ctx.view
    assert view is not None
    malformed = view.malformed_of(Kind.CHECKPOINT, Kind.PRUNE)
    if not view.checkpoints and not view.dcp and not malformed:
        return CheckResult("checkpoints", Status.SKIP, "the run recorded no checkpoints",
                           summary="no checkpoints recorded")
    matched: list[int] = []
    pruned: list[int] = []
    missing: list[int] = []
    bad: list[tuple[int | str, str]] = [("entry", why) for why in malformed]
    # seqs of stored checkpoints whose files could not be read: later checks never read them again (one that
    # reads but does not match its entry stays readable, so replay and continuity can say where it differs)
    damaged: list[int] = []
    for cp in view.checkpoints:
        why = _replicas(view, cp)
        if why:
            bad.append((cp.step, f"(seq {cp.seq}): {why}"))
        if cp.pruned:
            pruned.append(cp.step)
            continue
        if not cp.directory.is_dir():
            missing.append(cp.step)
            continue
        try:
            found = _state.digests_of(cp.directory)  # each file regular, not a symlink, checked first
            meta_step = _state.read_meta(cp.directory).get("step")
        except (LedgerError, OSError, ValueError, TypeError, RecursionError) as exc:  # damaged or crafted files
            bad.append((cp.step, f"(seq {cp.seq}) is unreadable: {exc}"))
            damaged.append(cp.seq)
            continue
        if found.state_digest != cp.body.state_digest:
            expected = cp.body.tensor_digests
            tensors = sorted(n for n in set(expected) | set(found.model) if expected.get(n) != found.model.get(n))
            parts = [f"tensors {', '.join(tensors[:5])}"] if tensors else []
            if found.optimizer_digest != cp.body.optimizer_digest:
                parts.append("optimizer state")
            if found.meta_digest != cp.body.meta_digest:
                parts.append("state.cbor (step, hyperparameters, scheduler, RNG)")
            bad.append((cp.step, f"(seq {cp.seq}) differs in {'; '.join(parts) or 'its state digest'}"))
        elif meta_step != cp.step:
            bad.append((cp.step, f"(seq {cp.seq}) holds step {meta_step}, its entry says {cp.step}"))
        else:
            matched.append(cp.step)
    outside: list[int] = []
    for cp in view.dcp:  # directories other tools wrote (DCP, a Trainer's checkpoint-N) against their manifests
        if cp.superseded:  # the abandoned branch of a resume: the directory may since hold the new branch's files
            continue
        if not _may_read(ctx, cp.directory):
            missing.append(cp.step)
            outside.append(cp.step)
            continue
        if not cp.directory.is_dir():
            missing.append(cp.step)
            continue
        problems = dcp_compare(cp.directory, cp.body.files or {}, nested=cp.body.layout == "files")
        if problems:
            what = "DCP" if cp.body.layout == "dcp" else "files of"
            bad.append((cp.step, f"(seq {cp.seq}, {what} {cp.directory.name}): {'; '.join(problems[:5])}"))
        else:
            matched.append(cp.step)
    init = next((cp for cp in view.checkpoints if cp.step == -1), None)
    if init is not None and _init_differs(view, init, matched):
        bad.append((-1, "the init checkpoint's weights are not the genesis init fingerprint"))
    data: dict[str, Any] = {"matched": matched, "pruned": pruned, "missing": missing,
                            "bad": [{"step": s, "reason": r} for s, r in bad], "damaged_seqs": damaged}
    summary = f"{len(matched)} matched, {len(pruned)} pruned, {len(missing)} missing"
    if bad:
        detail = "; ".join(f"checkpoint at step {s} {r}" if isinstance(s, int) else r for s, r in bad[:5])
        return CheckResult("checkpoints", Status.FAIL, f"{detail} ({summary})", data)
    if missing:
        far = f"; the directories of steps {outside[:8]} were recorded outside the ledger's folder and are read " \
              "only under --checkpoints DIR" if outside else ""
        return CheckResult("checkpoints", Status.WARN, f"{summary}: checkpoints at steps {missing[:8]} are not here "
                           f"(pass --checkpoints DIR if they are kept elsewhere){far}", data,
                           summary=f"{len(missing)} checkpoint(s) missing")
    return CheckResult("checkpoints", Status.PASS, f"{summary}; every stored state matches its entry", data)


def _may_read(ctx: Context, directory: Path) -> bool:
    """A directory a manifest entry names is read when the verifier named the root (--checkpoints) or
    it lies in the folder that holds the ledger: a crafted entry must not make verify list or hash
    files elsewhere on the verifier's machine."""
    if ctx.checkpoints is not None:
        return True
    try:
        directory.absolute().resolve().relative_to(ctx.ledger.path.absolute().resolve().parent)
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _replicas(view: RunView, cp: Checkpoint) -> str:
    """Why a distributed checkpoint's ``ranks`` (each rank's parameter digest, docs/FORMAT.md §12)
    show diverged replicas ("" when they do not): a rank whose parameters are not the checkpoint's,
    or a count of ranks that is not the recorded world size."""
    ranks = cp.body.ranks
    if ranks is None:
        return ""
    world = (view.genesis.distributed or {}).get("world_size")
    if world != len(ranks):
        return f"it holds {len(ranks)} rank digests, genesis records a world size of {world}"
    parameters = {t["name"] for t in view.genesis.architecture.get("tensors", []) if t.get("kind") == "parameter"}
    expected = model_digest({n: d for n, d in cp.body.tensor_digests.items() if n in parameters})
    diverged = [r for r, d in enumerate(ranks) if d != expected]
    if not diverged:
        return ""
    return (f"rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged[:8]))} of {len(ranks)} held "
            "parameters that differ from the checkpoint's: the replicas diverged")


def _init_differs(view: RunView, init: Checkpoint, matched: list[int]) -> bool:
    """The init checkpoint holds other weights than the genesis init fingerprint. A checkpoint entry's
    digests are ``tensor/v1`` of its files; under ``tensor-blocked/v1`` its model file, once matched
    with its entry, is rehashed in that scheme (missing or bad files are reported on their own)."""
    if view.digest_scheme == TENSOR_V1:
        return init.body.model_digest != view.init.model_digest
    if -1 not in matched:
        return False
    return model_digest(view.file_digests(init.directory / _state.FILES[0])) != view.init.model_digest


# ----------------------------------------------------------------------------- init
#: The draws ``init`` makes besides the genesis seed: its neighbour and the seed with bit 31 flipped
#: (far away, and still below 2**32 for a 32-bit seed, which numpy's legacy seeding needs).
