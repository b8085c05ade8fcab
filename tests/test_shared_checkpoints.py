"""A checkpoint_dir shared by several runs and the user's own files: resume removes only this run's
temporary directories, retention deletes only directories this run created; a failed checkpoint
write or a failed Recorder() leaves nothing behind; a symlinked <hex> is never taken for a checkpoint."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import FIXED_SEED
from recipes import TinyRecipe

import ledger
from ledger import Kind, Signer
from ledger import torch as lt
from ledger.errors import FormatError, StorageError
from ledger.hooks import Recorder
from ledger.hooks._resume import run_tag
from ledger.torch import build_scheduler, run_step
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)
DEAD_PID = 99_999_999  # above any pid_max: no such process


def build(seed: int = 5) -> dict:
    lt.seed_everything(seed)  # two runs of one seeded recipe: the same states, RNG included
    recipe = TinyRecipe()
    model = recipe.build_model(seed)
    opt = recipe.build_optimizer(model)
    return {"model": model, "optimizer": opt, "scheduler": build_scheduler(recipe, opt)}


def train(rec: Recorder, start: int, stop: int) -> None:
    recipe = TinyRecipe()
    for step in range(start, stop):
        metrics, batch = run_step(recipe, rec.model, rec.optimizer, rec.scheduler, 5, step)
        rec.step(batch=batch, **metrics)


def checkpoints(path: Path) -> list[dict]:
    return [e.body() for e in ledger.open(path).entries() if e.kind is Kind.CHECKPOINT]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_resume_removes_only_this_runs_temporary_directories_in_a_shared_root(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    rec = Recorder(tmp_path / "L", key=SIGNER, seed=5, checkpoint_every=2, checkpoint_dir=shared, **build())
    train(rec, 0, 3)
    rec.abort()
    digest = bytes.fromhex(checkpoints(tmp_path / "L")[-1]["state_digest"].hex())[:8].hex()
    tag = run_tag(rec._writer.run_id)
    user = tmp_path / "user-data"
    user.mkdir()
    theirs = {".tmp-notes.txt": "file", ".tmp-build-1": "dir", ".tmp-cache-99999999": "dir",
              f".tmp-{'ab' * 8}-{DEAD_PID}": "dir",  # another run's state (untagged): not ours
              f".tmp-deadbeef-{digest}-{DEAD_PID}": "dir",  # another run's tag
              f".tmp-{digest}-{os.getpid()}": "dir",  # untagged, a writer of this process may be live
              f".tmp-{tag}-{digest}-1": "dir",  # ours, but its writer (pid 1) is running
              f".tmp-{tag}-{'cd' * 8}-{DEAD_PID}": "link"}  # our name, but a symlink: never followed
    for name, kind in theirs.items():
        if kind == "file":
            (shared / name).write_text("the user's")
        elif kind == "dir":
            (shared / name).mkdir()
            (shared / name / "keep").write_text("the user's")
        else:
            (shared / name).symlink_to(user, target_is_directory=True)
    (user / "keep").write_text("the user's")
    ours = [f".tmp-{tag}-{'ef' * 8}-{DEAD_PID}", f".tmp-{digest}-{DEAD_PID}"]  # a killed writer's leftovers
    for name in ours:
        (shared / name).mkdir()
        (shared / name / "model.safetensors").write_bytes(b"partial")
    resumed = Recorder.resume(tmp_path / "L", key=SIGNER, **build(0))
    resumed.abort()
    left = {p.name for p in shared.iterdir() if p.name.startswith(".tmp")}
    assert left == set(theirs)
    assert (user / "keep").read_text() == "the user's"


def test_two_runs_of_one_seed_sharing_a_checkpoint_dir_keep_each_others_checkpoints(tmp_path):
    """Content-addressed: run B finds run A's directories already there and uses them; B's retention
    (keep last 1) must not delete them, and A still verifies with every checkpoint."""
    shared = tmp_path / "shared"
    for name, keep in (("A", None), ("B", ("last", 1))):
        rec = Recorder(tmp_path / name, key=SIGNER, seed=5, checkpoint_every=2, checkpoint_dir=shared, keep=keep,
                       **build())
        train(rec, 0, 6)
        rec.close()
    a, b = checkpoints(tmp_path / "A"), checkpoints(tmp_path / "B")
    assert [c["state_digest"] for c in a] == [c["state_digest"] for c in b]  # the same states
    assert all(c["created"] is True for c in a) and all(c["created"] is False for c in b)
    assert all((shared / c["state_digest"].hex()).is_dir() for c in a)
    report = verify_ledger(tmp_path / "A", key=SIGNER.public)
    assert report.verdict == "pass", [(c.name, c.status, c.message) for c in report.checks]
    assert verify_ledger(tmp_path / "B", key=SIGNER.public).verdict == "pass"


def test_retention_deletes_what_this_run_created(tmp_path):
    shared = tmp_path / "shared"
    rec = Recorder(tmp_path / "L", key=SIGNER, seed=5, checkpoint_every=2, checkpoint_dir=shared, keep=("last", 1),
                   **build())
    train(rec, 0, 6)
    rec.close()
    kept = [p.name for p in shared.iterdir()]
    assert kept == [checkpoints(tmp_path / "L")[-1]["state_digest"].hex()]
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).verdict == "pass"


@pytest.mark.parametrize("where", ["absent", "empty", "shared"])
def test_a_failed_recorder_construction_leaves_nothing_behind(tmp_path, monkeypatch, where):
    """The init checkpoint cannot be written (disk full at its first fsync): the ledger directory
    Recorder() created is removed (an empty one given is left empty), no temporary directory stays."""
    path, shared = tmp_path / "L", tmp_path / "shared"
    if where == "empty":
        path.mkdir()
    extra = {"checkpoint_dir": shared} if where == "shared" else {}
    if where == "shared":
        shared.mkdir()
        (shared / "theirs").mkdir()
    monkeypatch.setattr(lt, "fsync_path", no_space)
    with pytest.raises(StorageError, match="init checkpoint .*No space left.*nothing was left"):
        Recorder(path, key=SIGNER, seed=5, checkpoint_every=2, **extra, **build())
    monkeypatch.undo()
    assert (list(path.iterdir()) == []) if where == "empty" else not path.exists()
    if where == "shared":
        assert [p.name for p in shared.iterdir()] == ["theirs"]
    rec = Recorder(path, key=SIGNER, seed=5, checkpoint_every=2, **extra, **build())  # the path is usable again
    rec.close()


def test_a_symlinked_state_directory_is_never_taken_for_a_written_checkpoint(tmp_path):
    parts = build()
    snap = lt.snapshot(-1, parts["model"], parts["optimizer"], parts["scheduler"])
    root = tmp_path / "checkpoints"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / lt.snapshot_digests(snap).state_digest.hex()).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FormatError, match="not a directory"):
        lt.write_checkpoint(snap, root)
    assert list(elsewhere.iterdir()) == [] and [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []
    directory, _, created = lt.place_checkpoint(snap, tmp_path / "fresh", tag="0123abcd")
    assert created and lt.place_checkpoint(snap, tmp_path / "fresh")[2] is False
