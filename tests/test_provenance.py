"""Provenance scenarios (docs/VERIFYING.md): each asserts the verdict, the check that fires and the
exit code. Tiny CPU models, real training, real ledgers and checkpoints on disk."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXED_SEED
from recipes import TinyRecipe
from safetensors.torch import load_file, save_file

import ledger
from ledger import Kind, LedgerWriter, Signer
from ledger.hooks import FingerprintOptions, Recorder
from ledger.torch import build_scheduler, deterministic, run_step
from ledger.verify import verify_ledger

SIGNER = Signer.from_seed(FIXED_SEED)
STEPS, EVERY, SEED = 12, 4, 3
RECIPE_SPEC = f"{Path(__file__).with_name('recipes.py')}:recipe"


def record(path: Path, recipe: Any = None, *, before: Callable[[Any], None] | None = None,
           during: Callable[[int, Any], bool] | None = None, steps: int = STEPS,
           fingerprints: FingerprintOptions | None = None) -> Path:
    """Record a recipe run by hand. ``before(model)`` may alter the init; ``during(step, model)``
    may alter the weights before a step (returning True to skip the real training step, which is
    then logged as if it had happened)."""
    recipe = recipe or TinyRecipe()
    deterministic()
    model = recipe.build_model(SEED)
    if before:
        before(model)
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    rec = Recorder(path, model=model, optimizer=optimizer, scheduler=scheduler, key=SIGNER, seed=SEED,
                   checkpoint_every=EVERY, recipe=recipe,
                   fingerprints=fingerprints or FingerprintOptions(batch="every"),
                   determinism={"threads": torch.get_num_threads(), "rng": "reseed-per-step/v1"})
    for step in range(steps):
        if during and during(step, model):
            rec._capture.slots[0] = {"steps": 1, "lrs": [optimizer.param_groups[0]["lr"]],
                               "grad_norms": torch.ones(1, dtype=torch.float64)}
            if scheduler:
                scheduler.step()
            metrics, batch = {"loss": 0.5}, recipe.batch(step)
        else:
            metrics, batch = run_step(recipe, model, optimizer, scheduler, SEED, step)
        rec.step(batch=batch, **metrics)
    rec.close(final_weights=path.parent / f"{path.name}.safetensors")
    return path


def foreign_state() -> dict[str, torch.Tensor]:
    """Weights of an unrelated model of the same shape (another seed, trained a little)."""
    recipe = TinyRecipe()
    model = recipe.build_model(99)
    opt = recipe.build_optimizer(model)
    for step in range(30):
        run_step(recipe, model, opt, None, 99, step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def drift_toward(foreign: dict[str, torch.Tensor]) -> Callable[[int, Any], bool]:
    """A ``during`` hook: steps 4…7 are never trained; the weights creep toward ``foreign``."""

    def drift(step: int, model: Any) -> bool:
        if 4 <= step <= 7:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.add_(0.0005 * (foreign[name] - p))
            return True
        return False

    return drift


def verify(path: Path, **kwargs: Any):
    kwargs.setdefault("key", SIGNER.public)
    kwargs.setdefault("recipe", RECIPE_SPEC)
    kwargs.setdefault("replay", 10)
    kwargs.setdefault("replay_seed", 1)
    return verify_ledger(path, **kwargs)


def resign(src: Path, dst: Path, change: Callable[[Kind, int, dict], dict]) -> Path:
    """The trainer rewrites and re-signs a whole ledger with their own key (checkpoints copied)."""
    entries = list(ledger.open(src).entries())
    genesis = change(Kind.GENESIS, -1, entries[0].body())
    fields = {k: v for k, v in genesis.items() if k not in ("format", "run_id", "created_ns", "public_key",
                                                             "key_id", "payload_type")}
    writer = LedgerWriter.create(dst, SIGNER, genesis=fields)
    for entry in entries[1:-1]:
        writer.append(entry.kind, entry.step, change(entry.kind, entry.step, entry.body()))
    seal = entries[-1].body()
    writer.seal({k: v for k, v in seal.items() if k not in ("entry_count", "head", "tree_root")}, step=entries[-1].step)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst


def restate(name: str, **fields: Any) -> Callable[[Kind, int, dict], dict]:
    """A :func:`resign` change: genesis's architecture states ``fields`` (kind, shape, dtype) for tensor ``name``."""
    def change(kind: Kind, step: int, body: dict) -> dict:
        if kind is not Kind.GENESIS:
            return body
        tensors = [{**t, **fields} if t["name"] == name else t for t in body["architecture"]["tensors"]]
        return {**body, "architecture": {**body["architecture"], "tensors": tensors}}
    return change


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("honest") / "L")


def failed(report) -> list[str]:
    return [c.name for c in report.checks if c.status == "fail"]


def test_honest_run_passes_with_bit_exact_replay(honest):
    report = verify(honest, model=honest.parent / "L.safetensors")
    assert report.verdict == "pass", report.to_dict()["checks"]
    assert report.rests_on == ["chain", "signatures", "seal", "heads", "model", "checkpoints", "init", "continuity",
                              "replay"]
    replay = report.check("replay").data
    assert replay["mode"] == "bit-exact" and all(i["bit_exact"] for i in replay["intervals"])
    assert len(replay["intervals"]) == 3 and replay["cost_fraction"] == 1.0
    assert all(i["batches_matched"] == i["steps"] == i["metrics_matched"] for i in replay["intervals"])
    margin = report.check("continuity").data["margin"]
    assert 0 < margin <= 1
    print(f"honest: continuity margin {margin:.4f}; replay distances {[i['distance'] for i in replay['intervals']]}")


def test_start_from_another_models_weights(tmp_path):
    foreign = foreign_state()
    path = record(tmp_path / "L", before=lambda m: m.load_state_dict(foreign))
    report = verify(path)
    assert failed(report) == ["init"] and report.verdict == "fail"
    assert len(report.check("init").data["differ"]) == 6


def test_recipe_that_ignores_the_seed(tmp_path):
    class Fixed(TinyRecipe):
        def build_model(self, seed: int):
            return super().build_model(0)

    path = record(tmp_path / "L", Fixed())
    report = verify(path, recipe=Fixed())
    init = report.check("init")
    assert init.status == "fail" and "do not change with the seed" in init.detail
    assert init.data["differ"] == [] and set(init.data["seed_independent"]) == {"0.weight", "0.bias", "4.weight",
                                                                               "4.bias"}


def test_partial_reuse_is_localised(tmp_path):
    foreign = foreign_state()

    def copy_head(model):
        with torch.no_grad():
            model[4].weight.copy_(foreign["4.weight"])
            model[4].bias.copy_(foreign["4.bias"])

    report = verify(record(tmp_path / "L", before=copy_head))
    assert report.check("init").status == "fail"
    assert report.check("init").data["differ"] == ["4.bias", "4.weight"]


def test_foreign_weights_swapped_in_at_step_6(tmp_path):
    foreign = foreign_state()

    def swap(step, model):
        if step == 6:
            model.load_state_dict(foreign)
        return False

    path = record(tmp_path / "L", during=lambda s, m: swap(s, m))
    report = verify(path)
    continuity, replay = report.check("continuity"), report.check("replay")
    assert continuity.status == "fail" and "step 6" in continuity.detail
    assert continuity.data["anomalies"][0]["step"] == 6 and continuity.data["anomalies"][0]["ratio"] > 10
    bad = [i for i in replay.data["intervals"] if i["problems"]]
    assert replay.status == "fail" and [(i["from_step"], i["to_step"]) for i in bad] == [(3, 7)]
    print(f"swap: continuity ratio {continuity.data['anomalies'][0]['ratio']:.1f}, replay ratio {bad[0]['ratio']:.3g}")


def test_gradual_move_toward_another_model_without_training(tmp_path):
    drift = drift_toward(foreign_state())
    report = verify(record(tmp_path / "L", during=drift))
    replay = report.check("replay")
    assert replay.status == "fail" and report.verdict == "fail"
    bad = [(i["from_step"], i["to_step"]) for i in replay.data["intervals"] if i["problems"]]
    assert (3, 7) in bad


def test_learning_rate_in_the_ledger_differs_from_the_one_used(honest, tmp_path):
    def halve_lr(kind, step, body):
        if kind is Kind.STEP:
            body["lrs"] = body["lrs"] * 0.5
            body["metrics"]["lr"] *= 0.5
        return body

    report = verify(resign(honest, tmp_path / "L", halve_lr))
    replay = report.check("replay")
    assert replay.status == "fail" and "learning rate" in replay.detail


def test_invented_loss_in_a_signed_ledger(honest, tmp_path):
    def better_loss(kind, step, body):
        if kind is Kind.STEP and step == 5:
            body["metrics"]["loss"] *= 0.9
        return body

    report = verify(resign(honest, tmp_path / "L", better_loss))
    replay = report.check("replay")
    assert failed(report) == ["replay"] and "step 5: loss recomputed" in replay.detail


def test_forged_optimizer_moments_in_a_checkpoint(honest, tmp_path):
    path = tmp_path / "L"
    shutil.copytree(honest, path)
    checkpoint = next(e for e in ledger.open(path).entries() if e.kind is Kind.CHECKPOINT and e.step == 7).body()
    optimizer_file = path / checkpoint["path"] / "optimizer.safetensors"
    state = load_file(str(optimizer_file))
    key = next(k for k in state if k.endswith("exp_avg"))
    state[key] = state[key] * 1.01
    save_file(state, str(optimizer_file))
    report = verify(path)
    assert report.check("checkpoints").status == "fail" and "optimizer state" in report.check("checkpoints").detail
    assert report.check("replay").status == "fail" and report.verdict == "fail"


def test_resume_after_a_crash_passes_and_reports_superseded_steps(tmp_path):
    recipe = TinyRecipe()
    deterministic()
    model = recipe.build_model(SEED)
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, scheduler=sched, key=SIGNER, seed=SEED,
                   checkpoint_every=EVERY, recipe=recipe, determinism={"rng": "reseed-per-step/v1"})
    for step in range(10):
        metrics, batch = run_step(recipe, model, opt, sched, SEED, step)
        rec.step(batch=batch, **metrics)
    rec.abort()  # the process dies after step 9; the last checkpoint is at step 7
    model = recipe.build_model(0)
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, scheduler=sched, key=SIGNER)
    for step in range(rec.current_step, STEPS):
        metrics, batch = run_step(recipe, model, opt, sched, SEED, step)
        rec.step(batch=batch, **metrics)
    rec.close()
    report = verify(tmp_path / "L")
    assert report.verdict == "pass", report.to_dict()["checks"]
    assert report.check("continuity").data["superseded_steps"] == [8, 9]
    assert "2 superseded step entries excluded" in report.check("continuity").detail


def test_missing_recipe_skips_init_and_replay_and_require_fails(honest):
    report = verify_ledger(honest, key=SIGNER.public)
    assert report.verdict == "pass"
    assert {n["check"] for n in report.not_shown} == {"model", "init", "replay", "independence",
                                                          "mlflow", "timestamps"}
    assert "init (no --recipe given); replay (no --recipe given)" in report.sentence()
    required = verify_ledger(honest, key=SIGNER.public, require=["init"])
    assert required.verdict == "fail" and required.check("init").status == "fail"


def test_cli_exit_codes_for_provenance(honest, tmp_path):
    import subprocess
    import sys

    from ledger._crypto import public_key_pem

    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    base = [sys.executable, "-m", "ledger", "verify", str(honest), "--key", str(pub), "--recipe", RECIPE_SPEC]
    ok = subprocess.run(base + ["--replay", "1", "--replay-seed", "7"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "seed 7" in ok.stdout
    missing = subprocess.run(base[:-2] + ["--recipe", "nope.py:recipe"], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_tolerance_mode_on_weights_and_optimizer_state(honest, tmp_path):
    report = verify(honest, tolerance=1e-3)
    replay = report.check("replay")
    assert replay.status == "pass" and replay.data["mode"] == "tolerance" and replay.data["rho"] == 1e-3
    assert all(i["ratio"] == 0 and i["optimizer_ratio"] == 0 for i in replay.data["intervals"])
    assert "relative tolerance ρ=0.001" in replay.detail
    drift = drift_toward(foreign_state())
    drifted = verify(record(tmp_path / "L", during=drift), tolerance=1e-3).check("replay")
    bad = next(i for i in drifted.data["intervals"] if i["from_step"] == 3)
    assert drifted.status == "fail" and bad["ratio"] > 1e-3 and bad["optimizer_ratio"] > 1e-3


def test_checkpoints_kept_elsewhere_missing_and_sharded_weights(tmp_path):
    """Checkpoints under a user path; moved away they are reported missing (a warning), handed over
    with --checkpoints they verify again; a sharded safetensors index works as --model."""
    import json

    from ledger.hooks import train

    store = tmp_path / "store"
    path = train(TinyRecipe(), steps=8, path=tmp_path / "L", key=SIGNER, seed=SEED, checkpoint_every=4,
                 checkpoint_dir=store, final_weights=tmp_path / "model.safetensors")
    assert verify(path).check("checkpoints").status == "pass"
    moved = tmp_path / "elsewhere"
    store.rename(moved)
    missing = verify(path)
    assert missing.check("checkpoints").status == "warn" and missing.check("checkpoints").data["missing"] == [-1, 3, 7]
    assert missing.check("replay").status == "warn" and missing.verdict == "pass"
    assert "no checkpoint's files are here" in missing.check("replay").detail
    back = verify(path, checkpoints=moved)
    assert back.check("checkpoints").status == "pass" and back.check("replay").status == "pass"
    weights = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:3]}, str(tmp_path / "model-1.safetensors"))
    save_file({n: weights[n] for n in names[3:]}, str(tmp_path / "model-2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: f"model-{1 if i < 3 else 2}.safetensors"
                                                for i, n in enumerate(names)}}))
    assert verify(path, model=index).check("model").status == "pass"
