"""Replay soundness (issue 9): the virtual init checkpoint, the final state always replayed, the
run's own RNG discipline, recipe errors as warnings, the largest update by distance, logged learning
rates against the recipe's schedule, and hyperparameters in effect at a checkpoint. Tiny CPU
models, real training, real ledgers and checkpoints on disk."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from recipes import TinyRecipe
from test_provenance import EVERY, SEED, SIGNER, STEPS, drift_toward, foreign_state, record, resign, verify

from ledger import Kind
from ledger._schema import Genesis
from ledger.hooks import FingerprintOptions, Recorder, train
from ledger.torch import RESEED_PER_STEP, STREAM, build_scheduler, deterministic, run_step
from ledger.verify._replay import RESEED, rng_discipline

TESTS = Path(__file__).parent


def spans(report: Any, failing: bool = False) -> list[tuple[int, int]]:
    """(from_step, to_step) of the replayed intervals (only the failing ones with ``failing``)."""
    return [(i["from_step"], i["to_step"]) for i in report.check("replay").data["intervals"]
            if i["problems"] or not failing]


def trained(path: Path, recipe: Any = None, **options: Any) -> Path:
    """A run driven by ``ledger.hooks.train`` (RNG reseeded per step, recorded in genesis)."""
    options.setdefault("checkpoint_every", EVERY)
    options.setdefault("fingerprints", FingerprintOptions(batch="every"))
    return train(recipe or TinyRecipe(), steps=STEPS, path=path, key=SIGNER, seed=SEED,
                 final_weights=path.parent / f"{path.name}.safetensors", **options)


def forged(path: Path, during: Callable[[int, Any], bool], keep: tuple[str, int] | None = None) -> Path:
    """Like ``test_provenance.record`` (``during`` may skip real steps), declaring reseed-per-step
    like ``train`` and keeping only ``keep`` checkpoints."""
    recipe = TinyRecipe()
    deterministic()
    model = recipe.build_model(SEED)
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    rec = Recorder(path, model=model, optimizer=optimizer, scheduler=scheduler, key=SIGNER, seed=SEED,
                   checkpoint_every=EVERY, recipe=recipe, keep=keep,
                   determinism={"threads": torch.get_num_threads(), "rng": RESEED_PER_STEP})
    for step in range(STEPS):
        if during(step, model):
            rec._capture.slots[0] = {"steps": 1, "lrs": [optimizer.param_groups[0]["lr"]],
                               "grad_norms": torch.ones(1, dtype=torch.float64)}
            scheduler.step()
            metrics, batch = {"loss": 0.5}, recipe.batch(step)
        else:
            metrics, batch = run_step(recipe, model, optimizer, scheduler, SEED, step)
        rec.step(batch=batch, **metrics)
    rec.close()
    return path


def hand_loop(path: Path, recipe: TinyRecipe, *, scheduler_step: bool = True,
              keep: tuple[str, int] | None = None) -> Path:
    """README's loop: the recipe's model, optimizer, scheduler, ``batch`` and ``train_step`` called
    in order, nothing reseeded, a Recorder added (no ``recipe=``, no ``determinism``)."""
    model = recipe.build_model(SEED)
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    rec = Recorder(path, model=model, optimizer=optimizer, scheduler=scheduler, key=SIGNER, seed=SEED,
                   checkpoint_every=EVERY, keep=keep)
    for step in range(STEPS):
        batch = recipe.batch(step)
        metrics = recipe.train_step(model, optimizer, batch)
        if scheduler_step:
            scheduler.step()
        rec.step(batch=batch, **metrics)
    rec.close()
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(tmp_path_factory.mktemp("trained") / "L")


@pytest.fixture(scope="module")
def last_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(tmp_path_factory.mktemp("last") / "L", keep=("last", 1))


# ----------------------------------------------------------------------------- 1. virtual init checkpoint
def test_virtual_init_replays_a_run_that_kept_only_its_last_checkpoint(last_only):
    report = verify(last_only)
    replay = report.check("replay")
    assert report.verdict == "pass" and replay.status == "pass", replay.detail
    (interval,) = replay.data["intervals"]
    assert (interval["from_step"], interval["to_step"], interval["start"]) == (-1, STEPS - 1, "virtual init")
    assert interval["bit_exact"] and interval["batches_matched"] == STEPS and "final state" in interval["why"]
    assert replay.data["virtual_init"] and replay.data["cost_fraction"] == 1.0
    assert "from the init rebuilt from the recipe" in replay.detail


def test_a_recipe_whose_init_is_not_the_genesis_init_fails_the_virtual_interval(last_only):
    class Other(TinyRecipe):
        def build_model(self, seed: int) -> Any:
            return super().build_model(seed + 1)

    replay = verify(last_only, recipe=Other()).check("replay")
    assert replay.status == "fail" and "the recipe's init is not the genesis init" in replay.detail


def test_walk_to_foreign_weights_keeping_only_the_last_checkpoint_fails_replay(tmp_path):
    path = forged(tmp_path / "L", drift_toward(foreign_state()), keep=("last", 1))
    report = verify(path)
    replay = report.check("replay")
    assert replay.status == "fail" and report.verdict == "fail", replay.detail
    assert spans(report, failing=True) == [(-1, STEPS - 1)]
    bad = replay.data["intervals"][0]
    print(f"walk, keep last 1: replay distance {bad['distance']:.3g}, ratio {bad['ratio']:.3g}; "
          f"continuity {report.check('continuity').status}")


def test_nothing_to_replay_warns_with_a_recipe(tmp_path):
    path = trained(tmp_path / "L", checkpoint_every=None)
    report = verify(path)
    replay = report.check("replay")
    assert replay.status == "warn" and replay.detail.startswith("no interval could be replayed: the run stored no "
                                                                "checkpoint")
    assert f"the logged learning rates of {STEPS} steps follow the recipe's schedule" in replay.detail
    assert report.verdict == "pass" and {"check": "replay", "status": "warn",
                                         "reason": "nothing replayed"} in report.not_shown


# ----------------------------------------------------------------------------- 2. final state
def test_the_final_state_is_always_replayed(run):
    replay = verify(run, replay=0).check("replay")
    final = [(i["from_step"], i["to_step"]) for i in replay.data["intervals"] if "final state" in i["why"]]
    assert replay.status == "pass" and final == [(7, STEPS - 1)]


# ----------------------------------------------------------------------------- 3. RNG discipline
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_hand_written_loop_replays_bit_exactly(tmp_path, dropout):
    recipe = TinyRecipe(dropout=dropout)
    report = verify(hand_loop(tmp_path / "L", recipe), recipe=recipe)
    replay = report.check("replay")
    assert replay.status == "pass" and report.verdict == "pass", replay.detail
    assert replay.data["rng"] == STREAM and "RNG stream continued" in replay.detail
    assert len(replay.data["intervals"]) == 3 and all(i["bit_exact"] for i in replay.data["intervals"])


def test_hand_written_loop_with_only_its_last_checkpoint_replays_from_the_virtual_init(tmp_path):
    recipe = TinyRecipe(dropout=0.1)
    replay = verify(hand_loop(tmp_path / "L", recipe, keep=("last", 1)), recipe=recipe).check("replay")
    assert replay.status == "pass", replay.detail
    (interval,) = replay.data["intervals"]
    assert interval["start"] == "virtual init" and interval["bit_exact"], interval


def test_a_loop_that_skips_its_recipes_scheduler_fails_replay(tmp_path):
    recipe = TinyRecipe()
    replay = verify(hand_loop(tmp_path / "L", recipe, scheduler_step=False), recipe=recipe).check("replay")
    assert replay.status == "fail"
    assert "step 5: logged lr 0.01, the recipe's schedule gives 0.005" in replay.detail
    assert (3, 7) in [(i["from_step"], i["to_step"]) for i in replay.data["intervals"] if i["problems"]]


def test_train_records_its_discipline_and_still_replays(run):
    import ledger

    genesis = Genesis.from_body(next(iter(ledger.open(run).entries())).body())
    assert genesis.determinism["rng"] == RESEED_PER_STEP == RESEED and rng_discipline(genesis) == RESEED
    replay = verify(run).check("replay")
    assert replay.status == "pass" and replay.data["rng"] == RESEED and "RNG reseeded per step" in replay.detail


def test_rng_discipline_of_legacy_and_hand_written_ledgers():
    assert rng_discipline(Genesis(recipe={"run_step": "ledger.run_step/v1"})) == RESEED  # train() before `rng`
    assert rng_discipline(Genesis(recipe=None)) == STREAM  # a loop: no recipe recorded
    assert rng_discipline(Genesis(recipe={"run_step": "ledger.run_step/v1"}, determinism={"rng": STREAM})) == STREAM


# ----------------------------------------------------------------------------- 4. recipe errors warn
RAISING = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
from recipes import TinyRecipe


class RaisingBatch(TinyRecipe):
    def batch(self, step):
        if step >= 5:
            raise RuntimeError("the data shard is gone")
        return super().batch(step)


class TwoGroups(TinyRecipe):
    def build_optimizer(self, model):
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        return torch.optim.AdamW([{{"params": weights}}, {{"params": rest, "weight_decay": 0.0}}], lr=self.lr,
                                 weight_decay=0.01)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("name", "detail"), [
    ("RaisingBatch", "the recipe raised while running batch() at step 5: RuntimeError: the data shard is gone"),
    ("TwoGroups", "the recipe's optimizer has 2 param group(s), the ledger's 1: the recipe does not fit this run"),
])
def test_recipe_errors_warn_and_the_other_checks_still_run(run, tmp_path, name, detail):
    from ledger._crypto import public_key_pem

    file = tmp_path / "bad_recipes.py"
    file.write_text(RAISING)
    spec = f"{file}:{name}"
    report = verify(run, recipe=spec)
    replay = report.check("replay")
    assert replay.status == "warn" and replay.detail.startswith(detail), replay.detail
    assert report.verdict == "pass" and [c.name for c in report.checks if c.status == "pass"] == [
        "chain", "signatures", "seal", "heads", "checkpoints", "init", "continuity"]
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    command = [sys.executable, "-m", "ledger", "verify", str(run), "--key", str(pub), "--recipe", spec,
               "--replay", "10", "--replay-seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(re.findall(r"^\s+replay\s+warn\s", done.stdout, re.M)) == 1 and detail in done.stdout
    assert verify(run, recipe=spec, require=["replay"]).verdict == "fail"  # a warn fails only when required


# ----------------------------------------------------------------------------- 5. largest update by distance
def test_largest_update_is_ranked_by_distance_not_norm_change(tmp_path):
    def permute(step: int, model: Any) -> bool:
        if step == 5:  # same norms, other weights
            with torch.no_grad():
                w = model[0].weight
                order = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))
                w.copy_(w.flatten()[order].reshape(w.shape))
        return False

    report = verify(record(tmp_path / "L", during=permute), replay=0)
    replay = report.check("replay")
    largest = [(i["from_step"], i["to_step"]) for i in replay.data["intervals"] if "largest update" in i["why"]]
    assert largest == [(3, 7)] and replay.data["largest_update"]["from_step"] == 3
    moved = {(m["from_step"], m["to_step"]): (round(m["distance"], 3), m["evidence"]) for m in replay.data["movement"]}
    print(f"permuted at step 5: interval movement {moved}")
    assert replay.status == "fail" and (3, 7) in spans(report, failing=True)


# ----------------------------------------------------------------------------- 6. logged lr against the schedule
def test_a_forged_learning_rate_fails_even_when_its_interval_is_not_replayed(run, tmp_path):
    def double_lr_at_5(kind: Kind, step: int, body: dict[str, Any]) -> dict[str, Any]:
        if kind is Kind.STEP and step == 5:
            body["lrs"] = body["lrs"] * 2
            body["metrics"]["lr"] *= 2
        return body

    report = verify(resign(run, tmp_path / "L", double_lr_at_5), replay=0)
    replay = report.check("replay")
    assert (3, 7) not in spans(report)
    assert replay.status == "fail" and replay.detail.startswith(
        "the logged learning rates do not follow the recipe's schedule: step 5: logged lr 0.01, the recipe's "
        "schedule gives 0.005"), replay.detail


# ----------------------------------------------------------------------------- 7. hyperparameters in effect
class OneCycle(TinyRecipe):
    """A scheduler that moves AdamW's β1 as well as the learning rate."""

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=STEPS + 1,
                                                   cycle_momentum=True)


def test_betas_moved_by_the_scheduler_are_compared_as_logged_per_step(tmp_path):
    recipe = OneCycle()
    path = trained(tmp_path / "L", recipe)
    model = recipe.build_model(SEED)
    optimizer = recipe.build_optimizer(model)
    scheduler = recipe.build_scheduler(optimizer)
    logged, previous = {}, list(optimizer.param_groups[0]["betas"])
    for step in range(STEPS):  # what the recorder logs: betas in effect at a step, when they changed
        betas = list(optimizer.param_groups[0]["betas"])
        if betas != previous:
            logged[step], previous = [{"betas": betas}], betas
        optimizer.step()
        scheduler.step()
    assert len(logged) > 5

    def hyper(kind: Kind, step: int, body: dict[str, Any], logged: dict[int, Any] = logged) -> dict[str, Any]:
        if kind is Kind.STEP:
            body.pop("hyper", None)
            if step in logged:
                body["hyper"] = logged[step]
        return body

    replay = verify(resign(path, tmp_path / "H", hyper), recipe=recipe).check("replay")
    assert replay.status == "pass", replay.detail
    # without `hyper` the ledger claims genesis betas throughout: the checkpoints and the schedule disagree
    unlogged = verify(resign(path, tmp_path / "U", lambda k, s, b: hyper(k, s, b, {})), recipe=recipe).check("replay")
    assert unlogged.status == "fail" and "group 0 betas in effect" in unlogged.detail
    assert verify(path, recipe=recipe).check("replay").status == "pass"  # as the recorder logs it


def test_a_forged_jump_of_batchnorm_statistics_is_the_interval_replay_takes(tmp_path):
    """Buffers are exempt from the update bounds and left out of the sketches: only replay checks
    them. The interval where they were forged is the largest update by the real weights (the
    sketches would not see it), so replay takes it without any random draw (review)."""
    from recipes import BatchNormRecipe

    def tamper(step: int, model: Any) -> bool:
        if step == 5:
            with torch.no_grad():
                model[1].running_var.mul_(100.0)
                model[1].running_mean.add_(5.0)
        return False

    recipe = BatchNormRecipe()
    every_step = FingerprintOptions(sketch=1, batch="every", budget=None)  # sketches at both ends of each interval
    report = verify(record(tmp_path / "L", recipe, during=tamper, fingerprints=every_step), recipe=recipe, replay=0)
    assert report.check("continuity").status == "pass"  # the statistics are exempt there
    replay = report.check("replay")
    assert replay.data["largest_update"]["evidence"] == "weights"
    assert replay.status == "fail" and (3, 7) in spans(report, failing=True), replay.detail
