"""What the framework callbacks build on, on real training: framework optimizer wrappers, a
checkpoint taken on demand with the cursor that travels in a framework checkpoint, resume from a
state the framework restored (``Recorder.resume(..., at=cursor)``), AMP steps the grad scaler skipped,
and the ``framework`` facts in genesis."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXED_SEED

import ledger
from ledger import Kind, LedgerWriter, Signer
from ledger._cli import ledger_info
from ledger._schema import CheckpointBody, ResumeBody
from ledger.errors import ConfigurationError
from ledger.hooks import Recorder
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, x


def test_accelerate_wrapper_is_unwrapped(tmp_path):
    """accelerate's AcceleratedOptimizer has no step-hook registry of its own; the torch optimizer it
    wraps is recorded, and its steps are seen (learning rates, optimizer_steps; no gradient norms:
    AdamW's update bound does not use them)."""
    accelerate = pytest.importorskip("accelerate")
    model, opt = tiny()
    model, wrapped = accelerate.Accelerator(cpu=True).prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    with Recorder(tmp_path / "L", model=model, optimizer=wrapped, key=SIGNER, seed=1) as rec:
        for step in range(3):
            loss, x = train_step(model, wrapped, step)
            rec.step(loss=loss, batch=x)
        rec.close(final_weights=tmp_path / "m.safetensors")
    steps = [e.body() for e in ledger.open(tmp_path / "L").entries() if e.kind.label == "step"]
    assert [b["optimizer_steps"] for b in steps] == [1, 1, 1]
    assert all("lrs" in b and "grad_norms" not in b for b in steps)
    assert ledger.open(tmp_path / "L").genesis()["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "m.safetensors").verdict == "pass"


def test_an_optimizer_that_cannot_be_hooked_writes_nothing(tmp_path):
    model, opt = tiny()

    class Broken(torch.optim.Optimizer):  # passes isinstance, never initialised, wraps nothing
        def __init__(self) -> None:
            self.param_groups = opt.param_groups

    with pytest.raises(ConfigurationError, match="not an initialised torch.optim.Optimizer"):
        Recorder(tmp_path / "L", model=model, optimizer=Broken(), key=SIGNER, seed=1, checkpoint_every=2)
    assert not (tmp_path / "L").exists()


def test_framework_facts_in_genesis(tmp_path):
    model, opt = tiny()
    facts = {"name": "lightning", "version": "2.6.6", "step_mapping": "ledger step s is global_step s+1"}
    Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=1, framework=facts).close()
    assert ledger.open(tmp_path / "L").genesis()["framework"] == facts
    assert ledger_info(str(tmp_path / "L"))["framework"] == facts  # `ledger info` shows the claim
    with pytest.raises(ConfigurationError, match="framework must map"):
        Recorder(tmp_path / "M", model=model, optimizer=opt, key=SIGNER, seed=1, framework={"name": [1]})
    assert not (tmp_path / "M").exists()


def run_to_checkpoint(path: Path) -> tuple[dict, dict, torch.nn.Module, torch.optim.Optimizer]:
    """Train 4 steps, take a checkpoint on demand as a framework save would (keeping copies of the
    model and optimizer state as the framework's checkpoint), train on to step 7, crash."""
    model, opt = tiny()
    rec = Recorder(path, model=model, optimizer=opt, key=SIGNER, seed=1, checkpoint_every=100)
    for step in range(4):
        rec.step(*train_step(model, opt, step))
    cursor = rec.checkpoint()
    framework_ckpt = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                      "ledger": cursor}
    for step in range(4, 8):
        rec.step(*train_step(model, opt, step))
    rec.abort()
    return cursor, framework_ckpt, model, opt


def test_checkpoint_on_demand_and_cursor(tmp_path):
    cursor, _, _, _ = run_to_checkpoint(tmp_path / "L")
    entries = list(ledger.open(tmp_path / "L").entries())
    assert cursor["step"] == 3 and cursor["checkpoint"]["step"] == 3
    assert entries[cursor["seq"]].hash.hex() == cursor["head"] and entries[cursor["seq"]].kind.label == "checkpoint"
    assert entries[cursor["seq"]].body()["state_digest"].hex() == cursor["checkpoint"]["state_digest"]
    assert cursor["run_id"] == ledger.open(tmp_path / "L").genesis()["run_id"]


def test_resume_from_a_framework_restored_state(tmp_path):
    """The framework restores its own checkpoint; the ledger checks it is the state it recorded,
    supersedes steps 4–7 and continues the chain at step 4; the run verifies."""
    cursor, saved, _, _ = run_to_checkpoint(tmp_path / "L")
    model, opt = tiny()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, at=saved["ledger"])
    assert rec.current_step == 4
    for step in range(4, 6):
        rec.step(*train_step(model, opt, step))
    rec.close(final_weights=tmp_path / "m.safetensors")
    labels = [(e.kind.label, e.step) for e in ledger.open(tmp_path / "L").entries()]
    resume = labels.index(("resume", 3))
    assert labels[resume + 1:] == [("step", 4), ("step", 5), ("checkpoint", 5), ("seal", 5)]
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "m.safetensors")
    assert report.verdict == "pass", report.checks
    assert cursor == saved["ledger"]


def test_resume_refuses_a_state_that_is_not_the_checkpoint(tmp_path):
    _, saved, _, _ = run_to_checkpoint(tmp_path / "L")
    before = sorted(os.listdir(tmp_path / "L"))
    model, opt = tiny()  # the init, not the checkpointed state
    with pytest.raises(ConfigurationError, match=r"restored model is not the ledger's checkpoint \(differs in 0.bias"):
        Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, at=saved["ledger"])
    model.load_state_dict(saved["model"])
    with pytest.raises(ConfigurationError, match="restored optimizer state is not"):
        Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, at=saved["ledger"])
    assert sorted(os.listdir(tmp_path / "L")) == before


@pytest.mark.parametrize("change, message", [
    ({"run_id": "0" * 32}, "belongs to run"),
    ({"head": "00" * 32}, "not in .*'s chain"),
    ({"checkpoint": {"step": 2, "state_digest": "00" * 32}}, "does not record"),
    ({"checkpoint": None}, "malformed"),
])
def test_resume_refuses_a_foreign_cursor(tmp_path, change, message):
    _, saved, _, _ = run_to_checkpoint(tmp_path / "L")
    model, opt = tiny()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    with pytest.raises(ConfigurationError, match=message):
        Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, at={**saved["ledger"], **change})


def test_amp_step_skipped_by_the_grad_scaler(tmp_path):
    """A step whose gradients overflow: the scaler skips optimizer.step(), the loop still counts the
    step; its entry says optimizer_steps 0 and continuity checks that nothing moved."""
    model, opt = tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=1, checkpoint_every=5) as rec:
        for step in range(5):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            if step == 2:
                x[0, 0] = float("inf")
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            rec.step(loss=loss if step != 2 else None, batch=x)
        rec.close(final_weights=tmp_path / "m.safetensors")
    steps = [e.body()["optimizer_steps"] for e in ledger.open(tmp_path / "L").entries() if e.kind.label == "step"]
    assert steps == [1, 1, 0, 1, 1]
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "m.safetensors")
    continuity = report.check("continuity")
    assert report.verdict == "pass" and continuity.status == "pass", continuity.detail
    assert "1 skipped (no optimizer step" in continuity.detail and continuity.data["skipped_steps"] == [2]


def test_resume_refuses_hyperparameters_or_a_scheduler_the_checkpoint_does_not_hold(tmp_path):
    """A framework that restores model and optimizer state but rebuilds the param groups or the
    scheduler from scratch does not continue the recorded run: refused, naming what differs."""
    model, opt = tiny()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, scheduler=sched, key=SIGNER, seed=1,
                   checkpoint_every=100)
    for step in range(4):
        rec.step(*train_step(model, opt, step))
        sched.step()
    cursor = rec.checkpoint()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    rec.abort()
    model, opt = tiny()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    opt.param_groups[0]["lr"] = 1e-2  # the optimizer rebuilt with its initial learning rate
    fresh = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with pytest.raises(ConfigurationError, match=r"hyperparameters are not the ledger's checkpoint's \(differ in lr"):
        Recorder.resume(tmp_path / "L", model=model, optimizer=opt, scheduler=fresh, key=SIGNER, at=cursor)
    opt.load_state_dict(saved[1])
    with pytest.raises(ConfigurationError, match="scheduler's state is not the ledger's checkpoint's"):
        Recorder.resume(tmp_path / "L", model=model, optimizer=opt, scheduler=fresh, key=SIGNER, at=cursor)
    fresh.load_state_dict(saved[2])
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, scheduler=fresh, key=SIGNER, at=cursor)
    assert rec.current_step == 4
    rec.close()


def test_tied_weights_are_recorded_under_their_kept_name(tmp_path):
    """A tied parameter whose last name sorts first: genesis names its optimizer tensor by the name
    the fingerprints keep, so continuity does not call it a parameter outside every group."""
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.z_embed = torch.nn.Embedding(10, 6)
            self.a_head = torch.nn.Linear(6, 10, bias=False)
            self.a_head.weight = self.z_embed.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a_head(self.z_embed(x))

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=1, checkpoint_every=3) as rec:
        for step in range(3):
            x = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(step))
            loss = model(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss, batch=x)
        rec.close(final_weights=tmp_path / "m.safetensors")
    assert ledger.open(tmp_path / "L").genesis()["optimizer"]["param_groups"][0]["tensors"] == ["a_head.weight"]
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "m.safetensors")
    assert report.verdict == "pass" and report.check("continuity").status == "pass", report.check("continuity").detail


def test_checkpoints_of_an_abandoned_branch_are_not_evidence(tmp_path):
    """Resume from the checkpoint of step 3 after the run went on to checkpoints 5 and 7: those two
    belong to the abandoned branch; the new branch's steps 4-5 are checked against its own checkpoint
    of step 5, not the old one (which holds other weights), and the released weights verify."""
    model, opt = tiny()
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=1, checkpoint_every=2)
    for step in range(4):
        rec.step(*train_step(model, opt, step))
    cursor = rec.checkpoint()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for step in range(4, 8):
        rec.step(*train_step(model, opt, step + 100))  # other data: the abandoned branch's weights differ
    rec.abort()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, at=cursor)
    for step in range(4, 6):
        rec.step(*train_step(model, opt, step))
    rec.close(final_weights=tmp_path / "m.safetensors")
    report = verify_ledger(tmp_path / "L", key=SIGNER.public, model=tmp_path / "m.safetensors")
    assert report.verdict == "pass", {c.name: c.detail for c in report.checks}
    assert report.check("continuity").status == "pass" and report.check("model").status == "pass"


def _recorded(path: Path, steps: int = 6) -> None:
    model, opt = tiny()
    rec = Recorder(path, model=model, optimizer=opt, key=SIGNER, seed=1, checkpoint_every=2)
    for step in range(steps):
        rec.step(*train_step(model, opt, step))
    rec.abort()  # valid, unsealed: the trainer may append


@pytest.mark.parametrize("forged, why", [
    (lambda first: ResumeBody(0, -1, first.body()["state_digest"]), "which is not a checkpoint entry"),
    (lambda first: ResumeBody(first.seq, -1, first.body()["state_digest"]), "leaves step entry seq"),
])
def test_a_resume_entry_cannot_take_checkpoints_out_of_the_evidence(tmp_path, forged, why):
    """A signed resume entry the trainer appends to drop the checkpoints that disprove its steps: it
    must name a checkpoint entry of its step and digest and supersede every step after it; one that
    does not is malformed (continuity fails) and every checkpoint stays evidence."""
    _recorded(tmp_path / "L")
    entries = list(ledger.open(tmp_path / "L").entries())
    first = next(e for e in entries if e.kind is Kind.CHECKPOINT)
    writer = LedgerWriter.open(tmp_path / "L", SIGNER)
    writer.append(Kind.RESUME, 5, forged(first).to_body())
    writer.close()
    report = verify_ledger(tmp_path / "L", key=SIGNER.public)
    continuity = report.check("continuity")
    assert report.verdict == "fail" and continuity.status == "fail" and why in continuity.detail, continuity.detail
    assert report.check("checkpoints").data["matched"] == [-1, 1, 3, 5]


def test_a_manifest_outside_the_ledgers_folder_is_not_read(tmp_path):
    """A crafted 'files' entry naming a directory elsewhere on the verifier's machine: verify reads it
    only under --checkpoints, and never prints the names of files nobody recorded."""
    _recorded(tmp_path / "run" / "L")
    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    (elsewhere / "id_ed25519").write_text("secret")
    writer = LedgerWriter.open(tmp_path / "run" / "L", SIGNER)
    files = {"notes.txt": {"size": 3, "sha256": bytes(32), "rank": 0}}
    writer.append(Kind.CHECKPOINT, 5, CheckpointBody.dcp(files, str(elsewhere), "files").to_body())
    writer.close()
    report = verify_ledger(tmp_path / "run" / "L", key=SIGNER.public)
    checkpoints = report.check("checkpoints")
    assert checkpoints.status == "warn" and "recorded outside the ledger's folder" in checkpoints.detail
    named = verify_ledger(tmp_path / "run" / "L", key=SIGNER.public, checkpoints=tmp_path).check("checkpoints")
    assert named.status == "fail" and "1 file the manifest does not list" in named.detail
    assert "id_ed25519" not in named.detail and "id_ed25519" not in str(named.data)
