"""What ``Recorder.resume`` reads from a crashed run before it acts: the chain and every signature
checked with the writer's own key, every checkpoint path inside the checkpoint root, the last
intact checkpoint; the clean-up it may then do (``.tmp-*`` leftovers, pruned directories); and the
reopened writer, the restored training state and the ``resume`` entry."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger._chain import check_chain
from ledger._crypto import Signer, load_signer
from ledger._encoding import encode_body
from ledger._entry import Entry
from ledger._reader import Ledger
from ledger._record import Kind
from ledger._schema import (
    CheckpointBody,
    Genesis,
    PruneBody,
    ResumeBody,
    Superseded,
    checkpoint_directory,
    checkpoint_location,
    checkpoint_root,
)
from ledger._state import digests_of, read_meta
from ledger._writer import LedgerWriter
from ledger.errors import ConfigurationError, FormatError, LedgerError, StorageError
from ledger.torch import TEMPORARY, being_written, canonical_state, restore, snapshot, snapshot_digests

START_AGAIN = "nothing was acknowledged, so delete the directory and start the run again"


@dataclass(frozen=True, slots=True)
class Plan:
    """A verified ledger and the checkpoint to resume from."""

    entries: list[Entry]
    genesis: Genesis
    checkpoint: Entry
    body: CheckpointBody
    directory: Path
    skipped: list[tuple[int, str]]  # newer checkpoints passed over: (step, why)
    alive: list[tuple[int, int, CheckpointBody]]  # (seq, step, body) not pruned
    pruned: list[CheckpointBody]
    recorded: frozenset[bytes]  # the state digest of every checkpoint entry


@contextlib.contextmanager
def storage(what: str, advice: str) -> Iterator[None]:
    """An OS error while doing ``what`` becomes one :class:`StorageError` line with ``advice``."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"could not {what}: {exc.strerror or exc}; {advice}") from exc


def signer_of(key: Any, passphrase: bytes | None) -> Signer:
    """The writer's signer: a :class:`Signer`, or a PEM key file (passphrase or LEDGER_KEY_PASSPHRASE)."""
    if isinstance(key, Signer):
        return key
    if passphrase is None and os.environ.get("LEDGER_KEY_PASSPHRASE"):
        passphrase = os.environ["LEDGER_KEY_PASSPHRASE"].encode()
    return load_signer(key, passphrase)


def plan(root: Path, signer: Signer, tensor_shapes: dict[str, tuple[int, ...]],
         at: Mapping[str, Any] | None = None) -> Plan:
    """Read and check a crashed run before anything is restored or deleted (raises
    :class:`FormatError` naming the seq of what is refused, :class:`ConfigurationError` when the
    run cannot be resumed and what to do). ``at``: a cursor (``Recorder.cursor``) naming the
    checkpoint to continue from instead of the last intact one (:func:`_named`)."""
    with storage(f"read the ledger at {root}", "check that it is readable"):
        entries = list(Ledger(root).entries())
    if not entries:
        raise ConfigurationError(f"{root} holds no complete entry: the run was stopped while its ledger was "
                                 f"created; {START_AGAIN}")
    if entries[0].body().get("public_key") != signer.public.raw:
        raise ConfigurationError(f"this key did not sign {root}'s genesis; resume with the trainer's key")
    try:
        check_chain(entries, signer.public.raw)
    except FormatError as exc:
        raise FormatError(f"{root}: {exc}; refusing to resume (nothing was restored or deleted)") from None
    genesis = Genesis.from_body(entries[0].body())
    if not genesis.recorded or genesis.fingerprints is None:
        raise ConfigurationError(f"{root} was not written by the recorder; it cannot be resumed")
    if genesis.fingerprints.tensor_digest != "tensor/v1":
        raise ConfigurationError(f"{root} records a sharded (FSDP2) model, which Recorder.resume cannot continue yet: "
                                 "start a new ledger for the resumed run")
    _check_model(genesis, tensor_shapes)
    if len(entries) == 1:
        raise ConfigurationError(f"{root} holds only its genesis: the run was stopped before Recorder() "
                                 f"returned; {START_AGAIN}")
    checkpoints: list[tuple[Entry, CheckpointBody, Path]] = []
    pruned_digests: set[bytes] = set()
    for entry in entries:
        try:
            if entry.kind is Kind.CHECKPOINT:
                body = CheckpointBody.from_body(entry.body())
                if body.stored_here:  # a DCP checkpoint is restored by torch.distributed.checkpoint.load
                    checkpoints.append((entry, body, checkpoint_location(root, body, genesis)))
            elif entry.kind is Kind.PRUNE:
                pruned_digests.add(PruneBody.from_body(entry.body()).state_digest)
        except FormatError as exc:
            raise FormatError(f"{root}: entry seq {entry.seq}: {exc}; refusing to resume "
                              "(nothing was restored or deleted)") from None
    if not checkpoints:
        if genesis.checkpoint_every:
            raise ConfigurationError(f"{root} holds no checkpoint (the run was stopped before its first one "
                                     "landed); it cannot be resumed: delete the directory and start again")
        raise ConfigurationError(f"{root} holds no checkpoint to resume from (record with checkpoint_every=)")
    alive = [(e, b, d) for e, b, d in checkpoints if b.state_digest not in pruned_digests]
    skipped: list[tuple[int, str]] = []
    named = _named(root, at, entries, genesis, checkpoints) if at is not None else None
    for entry, body, directory in [named] if named else reversed(alive):
        why = None if named else _damage(root, body, genesis)
        if why is None:
            return Plan(entries, genesis, entry, body, directory, skipped,
                        [(e.seq, e.step, b) for e, b, _ in alive],
                        [b for _, b, _ in checkpoints if b.state_digest in pruned_digests],
                        frozenset(b.state_digest for _, b, _ in checkpoints))
        skipped.append((entry.step, why))
    reasons = "; ".join(f"step {step}: {why}" for step, why in skipped[:3])
    raise ConfigurationError(f"{root}: no checkpoint it records is intact ({reasons}); it cannot be resumed")


def _named(root: Path, at: Mapping[str, Any], entries: list[Entry], genesis: Genesis,
           checkpoints: list[tuple[Entry, CheckpointBody, Path]]) -> tuple[Entry, CheckpointBody, Path]:
    """The checkpoint a framework checkpoint's cursor names: the cursor belongs to this run, its head
    is an entry of this chain, and the checkpoint entry it names is in the chain before that head."""
    what = "the framework checkpoint's ledger cursor"
    try:
        run_id, seq, head = str(at["run_id"]), int(at["seq"]), bytes.fromhex(str(at["head"]))
        step, digest = int(at["checkpoint"]["step"]), bytes.fromhex(str(at["checkpoint"]["state_digest"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigurationError(f"{what} is malformed (it names no ledger checkpoint); it cannot be resumed "
                                 "from: resume from a checkpoint saved with the callback") from None
    if run_id != genesis.run_id:
        raise ConfigurationError(f"{what} belongs to run {run_id}, not to {root}'s run {genesis.run_id}")
    if not 0 <= seq < len(entries) or entries[seq].hash != head:
        raise ConfigurationError(f"{what} names entry {seq} with a head that is not in {root}'s chain: the "
                                 "checkpoint was written with another ledger or the ledger was replaced")
    for entry, body, directory in reversed(checkpoints):  # the last one: an earlier branch may hold the same state
        if entry.seq <= seq and entry.step == step and body.state_digest == digest:
            return entry, body, directory
    raise ConfigurationError(f"{what} names a checkpoint at step {step} that {root} does not record")


def matches(body: CheckpointBody, directory: Path, model: Any, optimizer: Any, scheduler: Any) -> None:
    """Refuse (one :class:`ConfigurationError` line) a live training state that is not a ledger
    checkpoint's (the state a framework restored is not the state the ledger recorded): model and
    optimizer-state digests, the optimizer's hyperparameters and, when the checkpoint's files are
    there, the scheduler's state."""
    snap = snapshot(0, model, optimizer, scheduler)
    digests = snapshot_digests(snap)
    if digests.model_digest != body.model_digest:
        differ = sorted(n for n in set(digests.model) | set(body.tensor_digests)
                        if digests.model.get(n) != body.tensor_digests.get(n))
        raise ConfigurationError(f"the restored model is not the ledger's checkpoint (differs in "
                                 f"{', '.join(differ[:5])}); resume from the checkpoint saved with it")
    if digests.optimizer_digest != body.optimizer_digest:
        raise ConfigurationError("the restored optimizer state is not the ledger's checkpoint; resume from "
                                 "the checkpoint saved with it")
    live = [{k: v for k, v in g.items() if k != "params"} for g in snap.meta["param_groups"]]
    if body.optimizer_hyper and live != body.optimizer_hyper:
        differ = sorted({k for a, b in zip(live, body.optimizer_hyper, strict=False) for k in set(a) | set(b)
                         if a.get(k) != b.get(k)} or {"the number of param groups"})
        raise ConfigurationError(f"the restored optimizer's hyperparameters are not the ledger's checkpoint's "
                                 f"(differ in {', '.join(differ[:5])}); restore the optimizer's param groups too")
    if scheduler is not None and directory.is_dir():
        try:
            recorded = read_meta(directory).get("scheduler")
        except (LedgerError, OSError):
            return  # damaged files: the digests above are the evidence
        if recorded is not None and encode_body({"s": snap.meta.get("scheduler")}) != encode_body({"s": recorded}):
            raise ConfigurationError("the restored scheduler's state is not the ledger's checkpoint's; restore the "
                                     "scheduler from the same checkpoint")


def reopen(root: Path, key: Any, passphrase: bytes | None, model: Any, optimizer: Any, scheduler: Any,
           fsync: str, at: Mapping[str, Any] | None = None) -> tuple[LedgerWriter, Plan]:
    """Plan the resume of the ledger at ``root`` (see :func:`plan`), open its writer, clean up, restore
    the training state from the planned checkpoint and append the ``resume`` entry; the writer is
    closed again if any of that fails. ``at``: the framework restored the state itself from the
    checkpoint this cursor names: it must equal that checkpoint's (:func:`matches`); nothing is restored."""
    signer = signer_of(key, passphrase)
    tensors, _ = canonical_state(model)
    planned = plan(root, signer, {name: tuple(t.shape) for name, t in tensors.items()}, at)
    if at is not None:
        matches(planned.body, planned.directory, model, optimizer, scheduler)
    advice = "check that the ledger directory is writable and has free space"
    with storage(f"open the ledger at {root} for writing", advice):
        writer = LedgerWriter.open(root, signer, fsync=fsync)
    last, body = planned.checkpoint, planned.body
    try:
        if writer.next_seq != len(planned.entries) or writer.head != planned.entries[-1].hash:
            raise FormatError(f"{root} changed while it was being checked; resume again")
        clean(root, planned.genesis, planned.pruned, run_id=writer.run_id, recorded=planned.recorded,
              alive=[b for _, _, b in planned.alive])
        if at is None:
            restore(planned.directory, model, optimizer, scheduler)
        superseded = [e for e in planned.entries if e.seq > last.seq and e.kind is Kind.STEP]
        span = Superseded(superseded[0].seq, superseded[-1].seq, (superseded[0].step, superseded[-1].step),
                          len(superseded)) if superseded else None
        with storage(f"append the resume entry to {root}", advice):
            writer.append(Kind.RESUME, last.step, ResumeBody(last.seq, last.step, body.state_digest,
                                                             writer.recovery.torn_bytes, span).to_body())
            writer.sync()
    except BaseException:
        _give_up(writer)
        raise
    return writer, planned


def _give_up(writer: LedgerWriter) -> None:
    """Close a writer on an error path: roll if the disk allows, else release the lock (its entries
    stay in the log, where resume or open recovers them)."""
    try:
        writer.close()
    except (LedgerError, OSError):
        writer.release()


def _check_model(genesis: Genesis, shapes: dict[str, tuple[int, ...]]) -> None:
    recorded = {name: tuple(info.get("shape", ())) for name, info in genesis.tensors().items()}
    if list(shapes) != genesis.tensor_order:
        names = sorted(set(shapes) ^ set(recorded))[:3] or ["their order"]
        raise ConfigurationError(f"this model's tensors differ from the run's (in {', '.join(names)}); "
                                 "build the model the run recorded")
    differ = [f"{n} {recorded[n]} vs {shapes[n]}" for n in shapes if n in recorded and recorded[n] != shapes[n]]
    if differ:
        raise ConfigurationError(f"this model's tensor shapes differ from the run's ({', '.join(differ[:3])}, "
                                 "recorded vs given); build the model the run recorded")


def _damage(root: Path, body: CheckpointBody, genesis: Genesis) -> str | None:
    """Why a checkpoint's files do not match its entry, or None when they do. A directory refused
    on disk (a symlink, one resolving outside the root) is damaged: passed over, never deleted."""
    try:
        directory = checkpoint_directory(root, body, genesis)
    except FormatError as exc:
        return f"its directory is refused ({exc})"
    if not directory.is_dir():
        return "its directory is missing"
    try:
        found = digests_of(directory).state_digest
    except (LedgerError, OSError) as exc:
        return f"its files are damaged ({exc})"
    return None if found == body.state_digest else "its files do not match its entry"


def run_tag(run_id: str) -> str:
    """The 8 hex digits naming a run's temporary checkpoint directories (:func:`ledger.torch.temporary_name`)."""
    return hashlib.sha256(b"training-ledger/tmp\0" + run_id.encode()).hexdigest()[:8]


def clean(root: Path, genesis: Genesis, pruned: list[CheckpointBody], *, run_id: str,
          recorded: Iterable[bytes] = (), alive: Iterable[CheckpointBody] = ()) -> None:
    """Remove what a killed writer of this run left under the checkpoint root, and nothing else
    (call with the ledger's lock held):

    - temporary directories, only real directories named exactly as
      :func:`ledger.torch.temporary_name` names them, never one a thread of this process is writing.
      In the ledger's own ``checkpoints/`` every such leftover is this run's. In a ``checkpoint_dir``
      (shared with other runs and the user's files) only this run's: tagged with its
      :func:`run_tag`, or, untagged (recorders before the tag), for a state digest this run recorded
      — and never one whose writer process is still running.
    - directories of pruned checkpoints a kill kept from being deleted (:func:`remove_checkpoint`)."""
    where = checkpoint_root(root, genesis)
    shared = bool(genesis.checkpoint_dir)
    tag, prefixes = run_tag(run_id), {d.hex()[:16] for d in recorded}
    with storage(f"remove leftovers under {where}", "check its permissions"):
        names = os.listdir(where) if where.is_dir() and not where.is_symlink() else []
        for name in names:
            match = TEMPORARY.match(name)
            path = where / name
            if match is None or not stat.S_ISDIR(os.lstat(path).st_mode) or being_written(path):
                continue
            theirs, prefix, pid = match.group(1), match.group(2), int(match.group(3))
            if shared and not (theirs == tag if theirs else prefix in prefixes and pid != os.getpid()):
                continue
            if shared and pid != os.getpid() and _process_alive(pid):
                continue
            shutil.rmtree(path)
    still = [b.state_digest for b in alive]
    for body in pruned:
        remove_checkpoint(root, body, genesis, still)


def remove_checkpoint(root: Path, body: CheckpointBody, genesis: Genesis, still_used: Iterable[bytes] = ()) -> None:
    """Delete a checkpoint's directory for retention, only when this run may: the directory is
    ``<checkpoint root>/<state digest hex>``, a real directory inside the root (checked by
    :func:`checkpoint_directory`; nothing refused is deleted), this run created it (the entry's
    ``created``; in a ``checkpoint_dir`` an entry that does not say is not deleted: another run's
    ledger may name the same content-addressed directory), and no checkpoint of this run that is
    kept (``still_used``: their state digests) names it."""
    if body.created is False or (body.created is None and genesis.checkpoint_dir):
        return
    if body.state_digest in set(still_used):
        return
    try:
        directory = checkpoint_directory(root, body, genesis)
    except FormatError:
        return
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """True when ``pid`` is a running process (or one this process may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
