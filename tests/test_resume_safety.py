"""Recorder.resume acts only on what the writer's own key signed and only inside the checkpoint root;
background failures surface at the next call; early crashes stay resumable."""

from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXED_SEED
from recipes import TinyRecipe

import ledger
from ledger import Kind, Signer, _parts
from ledger._encoding import encode_body
from ledger._entry import Entry
from ledger._record import decode_header, encode_record
from ledger.errors import ConfigurationError, FormatError, StorageError
from ledger.hooks import Recorder
from ledger.torch import build_scheduler, run_step
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)


def record(path: Path, steps: int, *, every: int = 2, close: bool = False, **kwargs) -> tuple[Recorder, object]:
    recipe = TinyRecipe()
    model = recipe.build_model(5)
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    rec = Recorder(path, model=model, optimizer=opt, scheduler=sched, key=SIGNER, seed=5, checkpoint_every=every,
                   **kwargs)
    for step in range(steps):
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
    if close:
        rec.close()
    return rec, recipe


def fresh(recipe: TinyRecipe) -> dict:
    model = recipe.build_model(0)
    opt = recipe.build_optimizer(model)
    return {"model": model, "optimizer": opt, "scheduler": build_scheduler(recipe, opt)}


def rewrite_body(path: Path, seq: int, change) -> None:
    """Change entry ``seq``'s body, re-link the chain after it (new hashes), keep the old signatures
    (now invalid): what a forger without the key can do."""
    entries = list(ledger.open(path).entries())
    out, prev = [], None
    for e in entries:
        header = decode_header(e.record)
        body = e.body_bytes
        if e.seq == seq:
            body = encode_body(change(e.body()))
        if prev is not None:
            header = dataclasses.replace(header, prev_hash=prev)
        entry = Entry(record=encode_record(header, body), signature=e.signature, key_id=e.key_id)
        prev = entry.hash
        out.append(entry)
    parts = path / "parts"
    shutil.rmtree(parts)
    parts.mkdir()
    (path / "manifest.json").unlink(missing_ok=True)
    table = _parts.entries_table(out, entries[0].body()["run_id"], [dict(e.body().get("metrics", {})) for e in out])
    _parts.write_part(parts / _parts.part_name(0), table, entries[0].body()["run_id"])


def test_resume_refuses_an_edited_checkpoint_path_and_deletes_nothing(tmp_path):
    rec, recipe = record(tmp_path / "L", 6)
    rec.abort()
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    entries = list(ledger.open(tmp_path / "L").entries())
    interior = [e for e in entries if e.kind is Kind.CHECKPOINT][1]
    rewrite_body(tmp_path / "L", interior.seq, lambda b: {**b, "path": str(victim)})
    with pytest.raises(FormatError, match=f"seq {interior.seq}"):
        Recorder.resume(tmp_path / "L", key=SIGNER, keep=("last", 2), **fresh(recipe))
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert len(list((tmp_path / "L" / "checkpoints").iterdir())) == 4  # nothing deleted


@pytest.mark.parametrize("path", ["../../home", "/etc", "checkpoints/../../x/{hex}", "elsewhere/{hex}"])
def test_checkpoint_paths_outside_the_root_are_refused_even_when_signed(tmp_path, path):
    """A signed entry (the writer's own key) whose path leaves the root is refused too."""
    rec, recipe = record(tmp_path / "L", 2)
    body = rec._checkpoints.alive[-1][2]
    forged = dataclasses.replace(body, path=path.format(hex=body.state_digest.hex()))
    rec._writer.append(Kind.CHECKPOINT, 1, forged.to_body())
    rec.abort()
    with pytest.raises(FormatError, match="refusing"):
        Recorder.resume(tmp_path / "L", key=SIGNER, **fresh(recipe))
    report = verify_ledger(tmp_path / "L", key=SIGNER.public)
    assert report.check("checkpoints").status == "fail"


def test_a_symlinked_checkpoint_directory_is_passed_over_and_kept(tmp_path):
    """A symlinked <hex> directory is damaged, not a reason to refuse the resume: the newest one
    symlinked, the run resumes from the one before; retention never deletes through it."""
    rec, recipe = record(tmp_path / "L", 4)  # checkpoints of steps -1, 1, 3
    rec.abort()
    body = rec._checkpoints.alive[2][2]
    directory = tmp_path / "L" / "checkpoints" / body.state_digest.hex()
    outside = tmp_path / "outside"
    directory.rename(outside)
    directory.symlink_to(outside, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match=r"step 3: its directory is refused \(.*symlink"):
        rec = Recorder.resume(tmp_path / "L", key=SIGNER, keep=("last", 1), drain_interval=30, **fresh(recipe))
    assert rec.current_step == 2
    for step in range(2, 6):  # checkpoints of steps 3 and 5; retention prunes the older ones
        metrics, batch = run_step(recipe, rec.model, rec.optimizer, rec.scheduler, 5, step)
        rec.step(batch=batch, **metrics)
    with pytest.raises(StorageError, match="step 3 .* exists but is not a directory"):  # never used as "there"
        rec.flush()
    rec.close()
    assert (outside / "state.cbor").is_file() and directory.is_symlink()


def test_resume_needs_the_writers_key(tmp_path):
    rec, recipe = record(tmp_path / "L", 3)
    rec.abort()
    with pytest.raises(ledger.ConfigurationError):
        Recorder.resume(tmp_path / "L", key=Signer.from_seed(b"\x07" * 32), **fresh(recipe))


def test_retention_after_resume_deletes_only_verified_checkpoints(tmp_path):
    rec, recipe = record(tmp_path / "L", 6)
    rec.abort()
    (tmp_path / "L" / "checkpoints" / ".tmp-0123456789abcdef-999999").mkdir()
    kwargs = fresh(recipe)
    rec = Recorder.resume(tmp_path / "L", key=SIGNER, keep=("last", 2), **kwargs)
    assert not list((tmp_path / "L" / "checkpoints").glob(".tmp-*"))
    for step in range(rec.current_step, rec.current_step + 4):
        metrics, batch = run_step(recipe, kwargs["model"], kwargs["optimizer"], kwargs["scheduler"], 5, step)
        rec.step(batch=batch, **metrics)
    rec.close()
    assert len(list((tmp_path / "L" / "checkpoints").iterdir())) == 2
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).verdict == "pass"


def test_resume_falls_back_to_the_last_intact_checkpoint(tmp_path):
    rec, recipe = record(tmp_path / "L", 6)
    rec.abort()
    newest = rec._checkpoints.alive[-1][2]
    (tmp_path / "L" / "checkpoints" / newest.state_digest.hex() / "state.cbor").write_bytes(b"\xa0")
    with pytest.warns(RuntimeWarning, match="passing over"):
        rec = Recorder.resume(tmp_path / "L", key=SIGNER, **fresh(recipe))
    assert rec.current_step == 4  # the checkpoint at step 3, not the damaged one at step 5
    rec.abort()


def test_a_genesis_only_ledger_says_what_to_do(tmp_path):
    from ledger import LedgerWriter

    rec, recipe = record(tmp_path / "L", 0, every=1)
    rec.abort()
    only = tmp_path / "G"
    writer = LedgerWriter.open(tmp_path / "L", SIGNER)
    writer.close()
    genesis = ledger.open(tmp_path / "L").genesis()
    LedgerWriter.create(only, SIGNER, genesis={k: v for k, v in genesis.items() if k not in (
        "format", "run_id", "created_ns", "public_key", "key_id", "payload_type")}).close()
    with pytest.raises(ConfigurationError, match="delete the directory and start the run again"):
        Recorder.resume(only, key=SIGNER, **fresh(recipe))


def test_init_checkpoint_is_written_before_the_constructor_returns(tmp_path):
    rec, _ = record(tmp_path / "L", 0)
    kinds = [e.kind for e in ledger.open(tmp_path / "L").entries()]
    assert kinds == [Kind.GENESIS, Kind.CHECKPOINT]
    rec.abort()


def test_other_shapes_are_one_configuration_error(tmp_path):
    rec, recipe = record(tmp_path / "L", 3)
    rec.abort()
    model = torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.LayerNorm(17), torch.nn.GELU(), torch.nn.Dropout(),
                                torch.nn.Linear(17, 1))
    names = list(recipe.build_model(0).state_dict())
    if list(model.state_dict()) != names:
        pytest.skip("TinyRecipe's model changed shape")
    with pytest.raises(ConfigurationError, match="shapes differ"):
        Recorder.resume(tmp_path / "L", key=SIGNER, model=model, optimizer=torch.optim.Adam(model.parameters()))


def test_a_failed_checkpoint_write_is_raised_at_the_next_step_and_steps_go_on(tmp_path, monkeypatch):
    from ledger import torch as lt

    rec, recipe = record(tmp_path / "L", 2, every=4)
    real = lt.place_checkpoint

    def full(snap, root, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lt, "place_checkpoint", full)
    model, opt, sched = rec.model, rec.optimizer, rec.scheduler
    for step in range(2, 4):  # step 3 is due for a checkpoint
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
    with pytest.raises(StorageError, match="No space left on device.*still recorded"):
        rec.flush()
    monkeypatch.setattr(lt, "place_checkpoint", real)
    for step in range(4, 10):
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
    rec.close()
    steps = [e.step for e in ledger.open(tmp_path / "L").entries() if e.kind is Kind.STEP]
    assert steps == list(range(10))  # nothing queued after the failure was dropped


def test_a_broken_writer_says_how_many_acknowledged_steps_were_lost(tmp_path, monkeypatch):
    rec, recipe = record(tmp_path / "L", 2, every=100, drain_interval=30)  # the thread runs only at flush
    rec.flush()

    def refuse(*args, **kwargs):
        raise StorageError("could not append: No space left on device")

    monkeypatch.setattr(rec._writer, "append", refuse)
    for step in range(2, 5):
        metrics, batch = run_step(recipe, rec.model, rec.optimizer, rec.scheduler, 5, step)
        rec.step(batch=batch, **metrics)
    with pytest.raises(StorageError, match=r"3 step entries \(steps 2–4\) acknowledged by step\(\) were not written"):
        rec.flush()
    with pytest.raises(StorageError):  # sticky: later steps are refused, not silently dropped
        rec.step(loss=1.0)
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="aborted after a failure"):
        rec.abort()
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).verdict == "pass"


def test_os_errors_in_construction_and_resume_are_one_storage_error(tmp_path, monkeypatch):
    from ledger.hooks import _recorder, _resume

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(_recorder.LedgerWriter, "create", read_only)
        with pytest.raises(StorageError, match="could not create the ledger at .*Read-only file system"):
            record(tmp_path / "A", 0)
    with monkeypatch.context() as m:  # the init checkpoint cannot be written: nothing is left
        m.setattr(_recorder.lt, "place_checkpoint", read_only)
        with pytest.raises(StorageError, match="nothing was left at .*: free space"):
            record(tmp_path / "B", 0)
    assert not (tmp_path / "B").exists()
    rec, recipe = record(tmp_path / "C", 3)
    rec.abort()
    with monkeypatch.context() as m:
        m.setattr(_resume.Ledger, "entries", read_only)
        with pytest.raises(StorageError, match="could not read the ledger"):
            Recorder.resume(tmp_path / "C", key=SIGNER, **fresh(recipe))
    with monkeypatch.context() as m:
        m.setattr(_recorder.LedgerWriter, "open", read_only)
        with pytest.raises(StorageError, match="could not open the ledger .* for writing"):
            Recorder.resume(tmp_path / "C", key=SIGNER, **fresh(recipe))


def test_flush_is_durable_and_the_queue_is_bounded_in_time(tmp_path):
    rec, recipe = record(tmp_path / "L", 3, max_lag=0.2)
    assert rec._queue._max_lag == 0.2
    rec.flush()
    assert [e.step for e in ledger.open(tmp_path / "L").entries() if e.kind is Kind.STEP] == [0, 1, 2]
    rec.abort()


# ----------------------------------------------------------------------------- closing, and after it
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_step_and_flush_after_close_or_abort_raise_at_once(tmp_path):
    """A closed recorder refuses step() and flush() (before: accepted silently, then hung forever once
    a bound was reached, the writer thread being gone)."""
    import time

    for finish in ("close", "abort"):
        rec, _ = record(tmp_path / finish, 2, queue_size=2)
        getattr(rec, finish)()
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(ConfigurationError, match="the recorder is closed"):
                rec.step(loss=1.0)
        with pytest.raises(ConfigurationError, match="the recorder is closed"):
            rec.flush()
        assert time.monotonic() - started < 2
        assert [e.step for e in ledger.open(tmp_path / finish).entries() if e.kind is Kind.STEP] == [0, 1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_writer_queue_raises_instead_of_waiting_on_a_dead_thread():
    from ledger.hooks._queue import WriterQueue

    stopped = WriterQueue(lambda job: None, 2, 0.01)
    stopped.stop()
    stopped.stop()  # idempotent
    with pytest.raises(ConfigurationError, match="writer thread has stopped"):
        stopped.put(1)
    with pytest.raises(ConfigurationError, match="writer thread has stopped"):
        stopped.join()

    def dies(job):
        raise SystemExit  # ends the thread, as an escaped BaseException would

    dead = WriterQueue(dies, 1, 0.01)
    with pytest.raises(ConfigurationError, match="writer thread has stopped"):
        for job in range(3):  # the bound of one entry: put waits, and sees the thread die
            dead.put(job)


def test_abort_after_a_failed_final_roll_frees_the_lock(tmp_path, monkeypatch):
    """Disk full at the final roll: abort() warns and releases the lock, so the same process resumes."""
    rec, recipe = record(tmp_path / "L", 4)
    rec.flush()
    monkeypatch.setattr(_parts, "write_part", _no_space)
    with pytest.warns(RuntimeWarning, match="could not close the ledger writer"):
        rec.abort()
    monkeypatch.undo()  # space is back
    assert rec._writer.closed and not rec._writer._lock.held
    resumed = Recorder.resume(tmp_path / "L", key=SIGNER, **fresh(recipe))  # not LedgerLockedError
    resumed.close()
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).verdict == "pass"


def test_close_retried_after_a_disk_full_final_roll_seals(tmp_path, monkeypatch):
    rec, _ = record(tmp_path / "L", 3)
    monkeypatch.setattr(_parts, "write_part", _no_space)
    with pytest.raises(StorageError, match="close again when there is space"):
        rec.close()
    monkeypatch.undo()  # space is back
    rec.close()
    assert rec._writer.closed and not rec._writer._lock.held
    rec.close()  # idempotent
    report = verify_ledger(tmp_path / "L", key=SIGNER.public)
    assert report.verdict == "pass" and ledger.open(tmp_path / "L").last_entry().kind is Kind.SEAL


def test_every_failed_checkpoint_is_reported_once(tmp_path, monkeypatch):
    from ledger import torch as lt

    rec, recipe = record(tmp_path / "L", 0, drain_interval=30)  # the thread runs only at flush
    monkeypatch.setattr(lt, "fsync_path", _no_space)  # the real write fails at its first fsync
    for step in range(6):  # checkpoints of steps 1, 3, 5
        metrics, batch = run_step(recipe, rec.model, rec.optimizer, rec.scheduler, 5, step)
        rec.step(batch=batch, **metrics)
    with pytest.raises(StorageError, match=r"checkpoints of steps 1, 3, 5 under .*: No space left on device"):
        rec.flush()
    assert not list(rec.checkpoint_root.glob(".tmp-*"))  # a failed write removes its temporary directory
    rec.flush()  # reported once
    monkeypatch.undo()
    rec.close()
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).verdict == "pass"
