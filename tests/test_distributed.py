"""torch.distributed runs (gloo, CPU, 2 real processes): one ledger per run written by rank 0, every
rank's weights compared at each checkpoint, a diverged rank named by verify, crash resume on every rank.
Each rank is tests/distributed_worker.py; a run that does not finish in time is killed, never hangs CI."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ledger
from ledger.verify import verify_ledger

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(scenario: str, out: Path, keys: tuple[Path, Path], world: int = 2) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(world), str(port), str(out),
                               str(keys[0])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)


def test_ddp_writes_one_ledger_that_verifies(tmp_path, keys):
    run("ddp", tmp_path, keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "ledger", "model.safetensors"]
    led = ledger.open(tmp_path / "ledger")
    genesis = led.genesis()
    assert genesis["distributed"]["world_size"] == 2 and genesis["distributed"]["backend"] == "gloo"
    assert [t["name"] for t in genesis["architecture"]["tensors"]][0] == "0.weight"  # not module.0.weight
    checkpoints = [e.body() for e in led.entries() if e.kind.label == "checkpoint"]
    assert [len(c["ranks"]) for c in checkpoints] == [2, 2, 2, 2]  # init, steps 2, 5, 7
    assert all(c["ranks"][0] == c["ranks"][1] for c in checkpoints)  # parameters equal, BatchNorm statistics not
    report = verify_ledger(tmp_path / "ledger", key=keys[1], model=tmp_path / "model.safetensors")
    assert report.verdict == "pass", {c.name: c.detail for c in report.checks}


def test_a_diverged_rank_is_named(tmp_path, keys):
    run("diverge", tmp_path, keys)
    report = verify_ledger(tmp_path / "ledger", key=keys[1], model=tmp_path / "model.safetensors")
    checkpoints = report.check("checkpoints")
    assert report.verdict == "fail" and checkpoints.status == "fail"
    assert "checkpoint at step 5 (seq" in checkpoints.detail and "rank 1 of 2 held parameters that differ" \
        in checkpoints.detail


def test_crash_resume_on_every_rank(tmp_path, keys):
    run("resume", tmp_path, keys)
    labels = [(e.kind.label, e.step) for e in ledger.open(tmp_path / "ledger").entries()]
    assert ("resume", 5) in labels and labels[-1] == ("seal", 7)
    report = verify_ledger(tmp_path / "ledger", key=keys[1], model=tmp_path / "model.safetensors")
    assert report.verdict == "pass", {c.name: c.detail for c in report.checks}


def test_dcp_checkpoint_manifest(tmp_path, keys):
    """A DCP directory is recorded by a signed manifest of every rank's files; verify checks it where
    it was written and under --checkpoints, and names a changed file and the rank that wrote it."""
    run("dcp", tmp_path, keys)
    dcp_dir = tmp_path / "dcp-3"
    entry = next(e for e in ledger.open(tmp_path / "ledger").entries() if e.kind.label == "checkpoint")
    files = entry.body()["files"]
    assert entry.step == 3 and entry.body()["layout"] == "dcp"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(files) and files["__1_0.distcp"]["rank"] == 1
    report = verify_ledger(tmp_path / "ledger", key=keys[1], model=tmp_path / "model.safetensors")
    assert report.verdict == "pass" and report.check("checkpoints").data["matched"] == [3]
    moved = tmp_path / "elsewhere" / "dcp-3"
    moved.parent.mkdir()
    dcp_dir.rename(moved)
    assert verify_ledger(tmp_path / "ledger", key=keys[1]).check("checkpoints").status == "warn"  # missing
    for where in (moved, moved.parent):  # the DCP directory itself, or a folder holding it by its name
        assert verify_ledger(tmp_path / "ledger", key=keys[1], checkpoints=where).check("checkpoints").status == "pass"
    with open(moved / "__1_0.distcp", "r+b") as handle:
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 1]))
    report = verify_ledger(tmp_path / "ledger", key=keys[1], checkpoints=moved)
    checkpoints = report.check("checkpoints")
    assert report.verdict == "fail" and "__1_0.distcp differs (written by rank 1)" in checkpoints.detail


def test_fsdp2_run_with_sharded_fingerprints(tmp_path, keys):
    """FSDP2 on 2 ranks: genesis states the blocked digest scheme and the sharded layout; every step
    has norms and gradient norms of the global tensors; the sealed digests (combined from the ranks'
    shards) are those of the gathered final weights, and the DCP checkpoint is pinned by its manifest."""
    run("fsdp", tmp_path, keys)
    led = ledger.open(tmp_path / "ledger")
    genesis = led.genesis()
    assert genesis["fingerprints"]["tensor_digest"] == "tensor-blocked/v1"
    assert genesis["distributed"]["layout"] == "sharded"
    steps = [e.body() for e in led.entries() if e.kind.label == "step"]
    assert len(steps) == 8 and all(len(b["grad_norms"]) == 1 for b in steps) and steps[0]["optimizer_steps"] == 1
    report = verify_ledger(tmp_path / "ledger", key=keys[1], model=tmp_path / "model.safetensors")
    assert report.verdict == "pass", {c.name: c.detail for c in report.checks}
    assert report.check("model").status == "pass" and report.check("checkpoints").data["matched"] == [3]
    assert report.check("continuity").status in ("pass", "warn")


def test_rank_zero_settings_rule_and_a_recorder_on_one_rank(tmp_path, keys):
    """Rank 1 passing another checkpoint_every follows rank 0's (no collective mismatch); a recorder
    built on rank 0 only with distributed=False records alone."""
    run("asymmetric", tmp_path / "a", keys)
    steps = [e.step for e in ledger.open(tmp_path / "a" / "ledger").entries() if e.kind.label == "checkpoint"]
    assert steps == [-1, 2, 5, 7]
    run("alone", tmp_path / "b", keys)
    genesis = ledger.open(tmp_path / "b" / "ledger").genesis()
    assert "distributed" not in genesis
    assert verify_ledger(tmp_path / "b" / "ledger", key=keys[1], model=tmp_path / "b" / "model.safetensors").verdict \
        == "pass"


def test_a_dcp_manifest_one_rank_cannot_make_is_refused_on_every_rank(tmp_path, keys):
    run("dcp-fails", tmp_path, keys)
    for rank in (0, 1):
        assert "rank 0:" in (tmp_path / f"refused-{rank}").read_text()
    assert not [e for e in ledger.open(tmp_path / "ledger").entries() if e.kind.label == "checkpoint"]
