"""The PyTorch recorder on real training: genesis, steps, fingerprints, checkpoints, seal, resume."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXED_SEED
from recipes import TinyRecipe
from safetensors.torch import load_file, save_file, save_model

import ledger
from ledger import Kind, Signer, _state
from ledger import torch as lt
from ledger._fingerprint import model_digest, safetensors_digests
from ledger.hooks import FingerprintOptions, Recorder, train
from ledger.torch import CountSketch, build_scheduler, canonical_state, run_step, torch_digests
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)


def kinds_steps(path: Path) -> list[tuple[str, int]]:
    return [(e.kind.label, e.step) for e in ledger.open(path).entries()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One recorded recipe run shared by several tests (10 steps, checkpoints every 4)."""
    out = tmp_path_factory.mktemp("run")
    train(TinyRecipe(), steps=10, path=out / "L", key=SIGNER, seed=3, checkpoint_every=4,
          final_weights=out / "model.safetensors", config={"purpose": "test"},
          fingerprints=FingerprintOptions(batch="every", grad_norms="every"))
    return out


def test_entries_follow_the_step_convention(run):
    assert kinds_steps(run / "L") == [
        ("genesis", -1), ("checkpoint", -1), *[("step", s) for s in range(4)], ("checkpoint", 3),
        *[("step", s) for s in range(4, 8)], ("checkpoint", 7), ("step", 8), ("step", 9), ("checkpoint", 9),
        ("seal", 9)]


def test_genesis_contents(run):
    genesis = ledger.open(run / "L").genesis()
    assert genesis["seed"] == 3 and genesis["config"] == {"purpose": "test"}
    assert {"python", "torch", "threads", "cpu_capability", "device", "blas"} <= set(genesis["environment"])
    assert genesis["environment"]["deterministic_algorithms"] is True
    assert genesis["optimizer"]["class"].endswith("AdamW")
    group = genesis["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-2 and group["betas"] == [0.9, 0.999] and group["weight_decay"] == 0.01
    assert group["tensors"] == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    arch = genesis["architecture"]
    assert [t["name"] for t in arch["tensors"]] == group["tensors"]
    assert arch["parameters"] == (8 * 16 + 16) + 2 * 16 + (16 + 1)
    assert genesis["recipe"]["class"].endswith("TinyRecipe") and len(genesis["recipe"]["source_sha256"]) == 32
    assert genesis["scheduler"] == "StepLR" and genesis["checkpoint_every"] == 4
    assert genesis["fingerprints"]["sketch_k"] == 256 and genesis["init"]["sketch"].shape == (256,)


def test_init_fingerprint_equals_safetensors_of_the_same_weights(run, tmp_path):
    genesis = ledger.open(run / "L").genesis()
    model = TinyRecipe().build_model(3)
    save_model(model, str(tmp_path / "init.safetensors"))
    assert safetensors_digests(tmp_path / "init.safetensors") == genesis["init"]["tensor_digests"]
    assert model_digest(genesis["init"]["tensor_digests"]) == genesis["init"]["model_digest"]


def test_step_entries_carry_metrics_lr_grad_norm_batch(run):
    steps = [e.body() for e in ledger.open(run / "L").entries() if e.kind is Kind.STEP]
    # the pre-hook sees the lr used by the step, before the scheduler advances (StepLR: halves every 5)
    assert [b["metrics"]["lr"] for b in steps] == [1e-2] * 5 + [5e-3] * 5
    assert all(b["metrics"]["grad_norm"] > 0 and b["optimizer_steps"] == 1 for b in steps)
    assert all(b["norms"].shape == (6,) and "norms" in b["carries"] and "batch" in b["carries"] for b in steps)
    recipe = TinyRecipe()
    from ledger.torch import batch_digest

    assert [b["batch_digest"] for b in steps] == [batch_digest(recipe.batch(s)) for s in range(10)]


def test_checkpoints_are_content_addressed_and_match(run):
    book = ledger.open(run / "L")
    checkpoints = [e for e in book.entries() if e.kind is Kind.CHECKPOINT]
    assert len(checkpoints) == 4
    for entry in checkpoints:
        body = entry.body()
        directory = run / "L" / body["path"]
        assert directory.name == body["state_digest"].hex()
        assert _state.digests_of(directory).state_digest == body["state_digest"]
        assert _state.read_meta(directory)["step"] == entry.step


def test_seal_and_model_check(run, tmp_path):
    seal = list(ledger.open(run / "L").entries())[-1].body()
    assert seal["final"]["tensor_digests"] == safetensors_digests(run / "model.safetensors")
    report = verify_ledger(run / "L", key=SIGNER.public, model=run / "model.safetensors")
    assert report.verdict == "pass" and report.check("model").status == "pass"
    weights = load_file(str(run / "model.safetensors"))
    weights["1.weight"] = weights["1.weight"].clone()
    weights["1.weight"][3] += 1e-6
    save_file(weights, str(tmp_path / "edited.safetensors"))
    report = verify_ledger(run / "L", key=SIGNER.public, model=tmp_path / "edited.safetensors")
    model = report.check("model")
    assert report.verdict == "fail" and model.status == "fail" and model.data["differ"] == ["1.weight"]
    assert "1.weight" in model.detail


def test_recipe_run_replays_bit_exactly_on_cpu(run):
    """Re-running steps t+1…u from the checkpoint at t reproduces the checkpoint at u exactly."""
    recipe = TinyRecipe()
    checkpoints = {e.step: e.body() for e in ledger.open(run / "L").entries() if e.kind is Kind.CHECKPOINT}
    for t, u in [(-1, 3), (3, 7), (7, 9)]:
        model = recipe.build_model(0)  # a different seed: everything comes from the checkpoint
        optimizer = recipe.build_optimizer(model)
        scheduler = build_scheduler(recipe, optimizer)
        lt.restore(run / "L" / checkpoints[t]["path"], model, optimizer, scheduler)
        for step in range(t + 1, u + 1):
            run_step(recipe, model, optimizer, scheduler, 3, step)
        replayed = lt.snapshot_digests(lt.snapshot(u, model, optimizer, scheduler))
        assert replayed.model == checkpoints[u]["tensor_digests"]
        assert replayed.state_digest == checkpoints[u]["state_digest"], (t, u)


def test_three_line_integration_and_context_manager(tmp_path, keys):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Recorder(tmp_path / "L", model=model, optimizer=opt, key=keys[0], seed=0) as rec:
        for _ in range(5):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss, batch=torch.zeros(1), accuracy=torch.tensor(0.5))
    frame = ledger.open(tmp_path / "L").to_pandas()
    steps = frame[frame.kind == "step"]
    assert steps.step.tolist() == list(range(5)) and steps.accuracy.tolist() == [0.5] * 5
    assert verify_ledger(tmp_path / "L", key=keys[1]).verdict == "pass"
    assert ledger.open(tmp_path / "L").sealed


def test_exception_leaves_a_valid_unsealed_ledger(tmp_path):
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(RuntimeError, match="diverged"), pytest.warns(RuntimeWarning, match="valid but unsealed"):
        with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=0, checkpoint_every=2) as rec:
            for step in range(5):
                model(torch.randn(2, 4)).sum().backward()
                opt.step()
                rec.step(loss=1.0)
                if step == 2:
                    raise RuntimeError("diverged")
    report = verify_ledger(tmp_path / "L", key=SIGNER.public)
    assert report.verdict == "pass" and report.check("seal").status == "warn"
    assert [k for k, _ in kinds_steps(tmp_path / "L")].count("step") == 3


def test_a_tensor_the_model_drops_mid_run_is_one_clear_error(tmp_path):
    """A module that sets a registered buffer to None drops it from its state_dict: the recorder says
    which tensor is gone (it died of a KeyError), and what was recorded before stays valid."""
    from ledger.errors import ConfigurationError

    model = torch.nn.Linear(4, 1)
    model.register_buffer("scratch", torch.zeros(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=0)
    for step in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        if step == 2:
            model.scratch = None
            with pytest.raises(ConfigurationError, match="the model no longer has scratch"):
                rec.step(loss=1.0)
        else:
            rec.step(loss=1.0)
    rec.abort()
    assert [k for k, _ in kinds_steps(tmp_path / "L")].count("step") == 2
    assert verify_ledger(tmp_path / "L", key=SIGNER.public).check("chain").status == "pass"


def test_sketch_estimates_distances_and_is_order_independent():
    torch.manual_seed(0)
    a = {f"w{i}": torch.randn(64, 64) for i in range(6)}
    sketch = CountSketch(seed=7)
    errors = []
    for scale in (1e-3, 1e-1, 1.0):
        b = {k: v + scale * torch.randn_like(v) for k, v in a.items()}
        true = math.sqrt(sum(float((b[k] - a[k]).double().pow(2).sum()) for k in a))
        estimate = float(np.linalg.norm(sketch(b) - sketch(a)))
        errors.append(abs(estimate - true) / true)
    # relative error ~ 1/sqrt(k) = 0.0625 for k = 256; stated bound in FORMAT.md: 3/sqrt(k)
    assert max(errors) < 3 / math.sqrt(256)
    # a differently ordered and chunked computation gives the same sketch within the stated tolerance
    reordered = dict(reversed(list(a.items())))
    import ledger.torch as fp

    chunked = CountSketch(seed=7)
    old, fp._CHUNK = fp._CHUNK, 1000
    try:
        other = chunked({k: v.t().contiguous().t() for k, v in reordered.items()})
    finally:
        fp._CHUNK = old
    base = sketch(a)
    assert np.allclose(other, base, rtol=0, atol=1e-9 * np.linalg.norm(base))


def test_tied_weights_are_fingerprinted_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    tensors, aliases = canonical_state(model)
    assert list(tensors) == ["emb.weight"] and aliases == {"head.weight": "emb.weight"}
    assert torch_digests(tensors).keys() == {"emb.weight"}


def test_retention_keeps_the_last_n_and_records_prunes(tmp_path):
    path = train(TinyRecipe(), steps=8, path=tmp_path / "L", key=SIGNER, seed=1, checkpoint_every=2,
                 keep=("last", 2))
    entries = list(ledger.open(path).entries())
    prunes = [e.body() for e in entries if e.kind is Kind.PRUNE]
    alive = sorted(p.name for p in (path / "checkpoints").iterdir())
    checkpoints = [e.body() for e in entries if e.kind is Kind.CHECKPOINT]
    assert len(checkpoints) == 5 and len(prunes) == 3 and len(alive) == 2
    assert {p["state_digest"].hex() for p in prunes} | set(alive) == {c["state_digest"].hex() for c in checkpoints}
    assert verify_ledger(path, key=SIGNER.public).verdict == "pass"


CRASHING_CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from recipes import TinyRecipe
from ledger import Signer
from ledger.hooks import Recorder, deterministic
from ledger.torch import build_scheduler, run_step
deterministic()
recipe = TinyRecipe()
model = recipe.build_model(5); opt = recipe.build_optimizer(model); sched = build_scheduler(recipe, opt)
rec = Recorder(sys.argv[1], model=model, optimizer=opt, scheduler=sched, key=Signer.from_seed(bytes(range(32))),
               seed=5, checkpoint_every=4, recipe=recipe, determinism={"rng": "reseed-per-step/v1"})
for step in range(1000):
    metrics, batch = run_step(recipe, model, opt, sched, 5, step)
    rec.step(batch=batch, **metrics)
    rec.flush()
    print(step, flush=True)
    if step == 9:
        time.sleep(60)  # killed here: steps 8 and 9 were recorded after the last checkpoint (step 7)
"""


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_chain(tmp_path):
    path = tmp_path / "L"
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD, str(path), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.strip() == "9":
            break
    child.kill()
    child.wait()
    before = verify_ledger(path, key=SIGNER.public)
    assert before.verdict == "pass" and before.check("seal").status == "warn"
    recipe = TinyRecipe()
    model = recipe.build_model(0)
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    rec = Recorder.resume(path, model=model, optimizer=opt, scheduler=sched, key=SIGNER)
    assert rec.current_step == 8
    for step in range(8, 12):
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
    rec.close(final_weights=tmp_path / "model.safetensors")
    entries = list(ledger.open(path).entries())
    resume = next(e for e in entries if e.kind is Kind.RESUME).body()
    assert resume["checkpoint_step"] == 7 and resume["superseded"]["steps"] == [8, 9]
    report = verify_ledger(path, key=SIGNER.public, model=tmp_path / "model.safetensors")
    assert report.verdict == "pass" and report.check("seal").status == "pass"
    # the resumed run ends where an uninterrupted run ends: same final weights, bit for bit
    clean = train(TinyRecipe(), steps=12, path=tmp_path / "clean", key=SIGNER, seed=5, checkpoint_every=4)
    final_clean = list(ledger.open(clean).entries())[-1].body()["final"]["model_digest"]
    assert entries[-1].body()["final"]["model_digest"] == final_clean


def test_batchnorm_buffers_and_sgd_momentum(tmp_path):
    """Integer buffers (num_batches_tracked) are fingerprinted too; SGD bounds come from grad norms;
    the buffers are left out of the sketches, so moving statistics leave the sketches checked."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=0, checkpoint_every=3) as rec:
        for _ in range(7):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=1.0)
    genesis = ledger.open(tmp_path / "L").genesis()
    assert "1.num_batches_tracked" in genesis["fingerprints"]["tensor_order"]
    assert genesis["fingerprints"]["sketch_skips"] == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    report = verify_ledger(tmp_path / "L", key=SIGNER.public)
    assert report.verdict == "pass", report.to_dict()["checks"]
    continuity = report.check("continuity")
    assert continuity.data["optimizer_family"] == "sgd" and "sketch evidence skipped" not in continuity.detail
    assert continuity.data["sketch_steps_checked"] >= 1 and "1.running_mean" in continuity.data["buffers_moved"]
