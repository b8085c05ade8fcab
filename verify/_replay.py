"""``replay``: re-execute chosen intervals from their checkpoints with the recipe and compare.

Intervals run between consecutive stored checkpoints. With a recipe the init is always regenerable:
when no checkpoint of step −1 is stored, a *virtual init checkpoint* takes its place (the recipe's
model at the genesis seed, which must equal the genesis init fingerprint, with a fresh optimizer and
scheduler), so retention or a run with only a closing checkpoint still leaves (−1 → first stored
checkpoint) to replay. Chosen: every continuity anomaly, the interval ending at the last stored
checkpoint ("final state": the weights the seal commits to), the interval whose weights moved
farthest ("largest update": sketch distance between its ends, else the distance between the stored
weights, else the sum of norm changes), and N uniformly random intervals drawn from the verifier's
own randomness (the seed is printed; ``--replay-seed`` reproduces it).

Steps are re-run under the run's own RNG discipline, recorded in genesis ``determinism["rng"]``:
``reseed-per-step/v1`` (every RNG reseeded before each step, as ``ledger.hooks.train`` and
:func:`ledger.torch.run_step` do; also ledgers written by ``train`` before the field existed) or
``stream`` (the checkpoint's RNG state restored and continued, as a hand-written loop calling the
recipe's ``batch``/``train_step`` does; the default). On the recorded environment the whole training
state must come out bit for bit; elsewhere (or with ``--tolerance``) the relative rule
‖W′−W_u‖ ≤ ρ·‖W_u−W_t‖ applies to weights and optimizer state.

Independently of the intervals, the recipe's optimizer and scheduler are rebuilt on the init model
and the scheduler is stepped alone (no training) to check every logged learning rate — and the
hyperparameters in effect (genesis groups updated by the steps' ``hyper``) — against the recipe.
Recipe code that raises makes the check warn, naming what it was doing and at which step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ledger._encoding import encode_body
from ledger._schema import Genesis
from ledger._state import FILES, digests_of, read_meta
from ledger.verify._context import Context
from ledger.verify._intervals import Interval, choose, interval_movement, intervals, logged_sketch
from ledger.verify._result import CheckResult, Status
from ledger.verify._run import RunView
from ledger.verify._schedule import (
    HYPER_KEYS,
    RecipeRaised,
    TracedRecipe,
    check_schedule,
    hyper_in_effect,
    plain_number,
)

DEFAULT_RHO = 1e-3
RESEED = "reseed-per-step/v1"  # = ledger.torch.RESEED_PER_STEP (this module imports torch only inside the check)
STREAM = "stream"  # = ledger.torch.STREAM
LEGACY_RUN_STEP = "ledger.run_step/v1"  # genesis ``recipe["run_step"]`` of ledgers written by train() before ``rng``
_META_PARTS = {"rng": "RNG state", "scheduler": "scheduler state", "param_groups": "optimizer hyperparameters",
               "optimizer_scalars": "optimizer step counts", "step": "step number",
               "optimizer_class": "optimizer class", "aliases": "tied-weight aliases"}


def rng_discipline(genesis: Genesis) -> str:
    """How the run drew its random numbers: genesis ``determinism["rng"]``; without it
    ``reseed-per-step/v1`` for ledgers that ``train()`` wrote before the field existed (genesis
    ``recipe["run_step"] == "ledger.run_step/v1"``), else ``stream``."""
    declared = genesis.determinism.get("rng")
    if declared is not None:
        return str(declared)
    if (genesis.recipe or {}).get("run_step") == LEGACY_RUN_STEP:
        return RESEED
    return STREAM


def _same_env(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    keys = ("torch", "cpu_capability", "machine", "device", "blas")
    return [f"{k}: recorded {recorded.get(k)!r}, here {here.get(k)!r}" for k in keys if recorded.get(k) != here.get(k)]


def _vector(tensors: dict[str, Any]) -> Any:
    import torch

    return torch.cat([t.detach().double().reshape(-1) for _, t in sorted(tensors.items())]) if tensors else \
        torch.zeros(0, dtype=torch.float64)


def _nothing_replayed(view: RunView) -> str:
    if not view.checkpoints:
        return "the run stored no checkpoint (record with checkpoint_every= so that close() stores the final state)"
    if not view.stored_checkpoints():
        return "no checkpoint's files are here (pruned or moved; give --checkpoints DIR)"
    return "no stored checkpoint follows the init"


def check_replay(ctx: Context) -> CheckResult:
    """Check the logged learning rates against the recipe's schedule, then replay the chosen
    intervals (see the module docstring): every continuity anomaly, the final state, the largest
    update and ``--replay`` random ones; checkpoints that the ``checkpoints`` check already matched
    are not hashed again. Recipe code that raises makes the check warn."""
    view, progress = ctx.view, ctx.progress
    assert view is not None
    recipe = TracedRecipe(ctx.recipe)
    continuity, checkpoints = ctx.results.get("continuity"), ctx.results.get("checkpoints")
    anomalies = list(continuity.data.get("anomalies", [])) if continuity is not None else []
    verified_steps = frozenset(checkpoints.data.get("matched", [])) if checkpoints is not None else frozenset()
    seed, tolerance = ctx.options.replay_seed, ctx.options.tolerance
    discipline = rng_discipline(view.genesis)
    if len(view.genesis.all_optimizers) > 1:
        return CheckResult("replay", Status.WARN, f"the run has {len(view.genesis.all_optimizers)} optimizers; a "
                           "recipe builds one, so nothing was replayed (continuity checks every optimizer's steps)",
                           summary="several optimizers: not replayed")
    if discipline not in (RESEED, STREAM):
        return CheckResult("replay", Status.WARN, f"the run declares the RNG discipline {discipline!r}, which this "
                           "verifier cannot follow: nothing was replayed", {"rng": discipline},
                           summary="unknown RNG discipline")
    pairs = intervals(view)
    import torch

    from ledger.torch import deterministic, environment

    recorded_env = view.genesis.environment
    differences = _same_env(recorded_env, environment(str(recorded_env.get("device", "cpu"))))
    mode = "tolerance" if tolerance is not None or differences else "bit-exact"
    rho = tolerance if tolerance is not None else DEFAULT_RHO
    threads = int(view.genesis.determinism.get("threads") or recorded_env.get("threads") or torch.get_num_threads())
    run_seed = int(view.genesis.seed or 0)
    reports: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    total_steps = max(view.last_step + 1, 1)
    data: dict[str, Any] = {
        "mode": mode, "rho": rho if mode == "tolerance" else None, "seed": seed, "threads": threads,
        "rng": discipline, "environment_differences": differences, "intervals": reports,
        "available_intervals": len(pairs), "virtual_init": any(p.start is None for p in pairs),
        "replayed_steps": 0, "cost_fraction": 0.0, "schedule_steps_compared": 0, "seconds": 0.0,
    }
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        deterministic(threads=threads)
        schedule = check_schedule(view, recipe, run_seed)
        data["schedule_steps_compared"] = schedule.steps
        if schedule.misfit is not None:
            return CheckResult("replay", Status.WARN, f"{schedule.misfit}: the recipe does not fit this run, nothing "
                               "was replayed", data, summary="the recipe does not fit the ledger's optimizer")
        if pairs:
            measured = continuity.series.get("checkpoint_distances", []) if continuity is not None else []
            moved = interval_movement(view, pairs, measured)
            chosen = choose(pairs, anomalies, [m["distance"] for m in moved], ctx.options.replay, seed)
            largest = max(range(len(pairs)), key=lambda i: moved[i]["distance"])
            data["movement"] = [{"from_step": p.from_step, "to_step": p.to_step, **m} for p, m in zip(pairs, moved,
                                                                                                   strict=True)]
            data["largest_update"] = {"from_step": pairs[largest].from_step, "to_step": pairs[largest].to_step,
                                      **moved[largest]}
            for done, i in enumerate(sorted(chosen)):
                if progress:
                    progress("replay", done, len(chosen))
                interval = pairs[i]
                result = _replay_one(view, recipe, interval, run_seed, discipline, mode, rho,
                                     verified=(interval.start is not None and interval.from_step in verified_steps,
                                               interval.to_step in verified_steps))
                result["why"] = chosen[i]
                result["moved"], result["moved_by"] = moved[i]["distance"], moved[i]["evidence"]
                data["replayed_steps"] += interval.to_step - interval.from_step
                reports.append(result)
                if result["problems"]:
                    failures.append(result)
            if progress:
                progress("replay", len(chosen), len(chosen))
    except RecipeRaised as exc:
        data["error"] = str(exc)
        return CheckResult("replay", Status.WARN, str(exc), data, summary="the recipe raised")
    finally:
        torch.set_num_threads(previous_threads)
        data["seconds"] = time.perf_counter() - started
        data["cost_fraction"] = data["replayed_steps"] / total_steps
    how = "bit-exact" if mode == "bit-exact" else f"relative tolerance ρ={rho:g}" + (
        f" (environment differs: {differences[0]})" if differences else "")
    problems = [schedule.problem] if schedule.problem else []
    if failures:
        first = failures[0]
        problems.append(f"{len(failures)} of {len(reports)} replayed interval(s) fail ({how}): steps "
                        f"{first['from_step'] + 1}…{first['to_step']}: {'; '.join(first['problems'][:3])}")
    if problems:
        return CheckResult("replay", Status.FAIL, "; ".join(problems), data)
    lrs = f"the logged learning rates of {schedule.steps} steps follow the recipe's schedule"
    if not reports:
        return CheckResult("replay", Status.WARN, f"no interval could be replayed: {_nothing_replayed(view)}; {lrs}",
                           data, summary="nothing replayed")
    rng = "RNG reseeded per step" if discipline == RESEED else "RNG stream continued from each checkpoint"
    virtual = " (from the init rebuilt from the recipe)" if any(r["start"] == "virtual init" for r in reports) \
        else ""
    return CheckResult("replay", Status.PASS, f"{len(reports)} of {len(pairs)} interval(s) replayed {how}{virtual}: "
                       f"{data['replayed_steps']} steps ({100 * data['cost_fraction']:.0f}% of the run), {rng}, "
                       f"seed {seed}; {lrs}", data)


def _init_differs(view: RunView, model: Any, mode: str, rho: float) -> str | None:
    """Why the rebuilt init is not the genesis init (None when it is): bit for bit, or in tolerance
    mode within ρ of the init sketch's norm."""
    from ledger.torch import CountSketch, canonical_state, torch_digests

    tensors, _ = canonical_state(model)
    digests = torch_digests(tensors, view.digest_scheme)
    recorded = view.init.tensor_digests
    differ = sorted(n for n in set(recorded) | set(digests) if recorded.get(n) != digests.get(n))
    if not differ:
        return None
    sketch = logged_sketch(view, -1)
    if mode == "tolerance" and sketch is not None and set(recorded) == set(digests):
        policy = view.policy
        rebuilt = CountSketch(policy.sketch_seed, policy.sketch_k, policy.sketch_skips)(
            {n: tensors[n] for n in view.tensor_order if n in tensors})
        if float(np.linalg.norm(rebuilt - sketch)) <= rho * float(np.linalg.norm(sketch)):
            return None
    return (f"the recipe's init is not the genesis init ({len(differ)} tensor(s) differ: "
            f"{', '.join(differ[:3])}{' …' if len(differ) > 3 else ''})")


def _restored_hyper(view: RunView, optimizer: Any, step: int) -> list[str]:
    """The restored optimizer (checkpoint at ``step``) against the ledger: the hyperparameters in
    effect for step ``step + 1`` and the learning rate logged for it."""
    problems = []
    first = view.steps.get(step + 1)
    first_lrs = first.lrs if first is not None else None
    claimed_groups = hyper_in_effect(view, step + 1)
    for g, (group, claimed) in enumerate(zip(optimizer.param_groups, claimed_groups, strict=False)):
        for key in HYPER_KEYS:
            if key in claimed and key in group:
                have = plain_number(group[key])
                if have != claimed[key]:
                    problems.append(f"group {g} {key}: restored {have!r}, ledger says {claimed[key]!r}")
        if first_lrs is not None and g < len(first_lrs):
            lr = float(plain_number(group["lr"]))
            if lr != float(first_lrs[g]):
                problems.append(f"group {g} learning rate: restored {lr!r}, ledger logs {float(first_lrs[g])!r} "
                                f"for step {step + 1}")
    return problems


def _replay_one(view: RunView, recipe: TracedRecipe, interval: Interval, run_seed: int, discipline: str, mode: str,
                rho: float, verified: tuple[bool, bool] = (False, False)) -> dict[str, Any]:
    """Replay one interval; ``verified``: whether the ``checkpoints`` check already matched its start
    and end checkpoints with their entries (else they are hashed here first)."""
    from ledger.torch import (
        batch_digest,
        build_scheduler,
        continue_step,
        load_tensors,
        restore,
        rng_state,
        run_step,
        set_rng_state,
        snapshot,
        snapshot_digests,
    )

    a, b = interval.start, interval.end
    virtual = a is None
    report: dict[str, Any] = {"from_step": interval.from_step, "to_step": b.step,
                              "start": "virtual init" if virtual else "checkpoint"}
    for which, cp, done in (("start", a, verified[0]), ("end", b, verified[1])):
        if cp is not None and not done and digests_of(cp.directory).state_digest != cp.body.state_digest:
            return {**report, "problems": [f"the {which} checkpoint does not match its entry"]}
    with recipe.guard("building the model, optimizer and scheduler", interval.from_step):
        model = recipe.build_model(run_seed)
        optimizer = recipe.build_optimizer(model)
        scheduler = build_scheduler(recipe, optimizer)
    problems: list[str] = []
    notes: list[str] = []
    end_meta = read_meta(b.directory)
    if a is None:
        differs = _init_differs(view, model, mode, rho)
        if differs is not None:
            return {**report, "problems": [differs]}
        end_rng = end_meta.get("rng")
        if discipline == STREAM and isinstance(end_rng, dict) and {"python", "numpy"} <= set(end_rng):
            # torch's stream is the one the recipe's builders leave; python's and numpy's were the
            # trainer's process's own: take the end's (steps that do not draw from them leave them as they are)
            set_rng_state({**rng_state(), "python": end_rng["python"], "numpy": end_rng["numpy"]})
    else:
        with recipe.guard("restoring the checkpoint into the recipe's model, optimizer and scheduler", a.step):
            restore(a.directory, model, optimizer, scheduler)
        problems += _restored_hyper(view, optimizer, a.step)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches_ok, metrics_ok, steps = 0, 0, list(range(interval.from_step + 1, b.step + 1))
    for s in steps:
        logged = view.steps.get(s)
        with recipe.guard("running step", s):
            if discipline == RESEED:
                metrics, batch = run_step(recipe, model, optimizer, scheduler, run_seed, s)
            else:
                metrics, batch = continue_step(recipe, model, optimizer, scheduler, s)
            digest = batch_digest(batch) if logged is not None and logged.batch_digest is not None else None
        if logged is not None and logged.batch_digest is not None:
            if digest == logged.batch_digest:
                batches_ok += 1
            else:
                problems.append(f"step {s}: the recipe's batch is not the logged batch")
        logged_metrics = logged.metrics if logged is not None else {}
        bad = [k for k, v in metrics.items() if k in logged_metrics and not _close(v, float(logged_metrics[k]),
                                                                                      mode, rho)]
        if bad:
            problems.append(f"step {s}: {bad[0]} recomputed {metrics[bad[0]]!r}, ledger logs "
                            f"{float(logged_metrics[bad[0]])!r}")
        else:
            metrics_ok += 1
    snap = snapshot(b.step, model, optimizer, scheduler)
    replayed = snapshot_digests(snap)
    expected = b.body
    end_weights = load_tensors(b.directory / FILES[0])
    distance, ratio = _relative(snap.model, end_weights, {k: before[k] for k in end_weights if k in before})
    opt_start = load_tensors(a.directory / FILES[1]) if a is not None else {}
    opt_distance, opt_ratio = _relative(snap.optimizer_tensors, load_tensors(b.directory / FILES[1]), opt_start)
    exact = replayed.state_digest == expected.state_digest
    if mode == "bit-exact" and not exact:
        parts = ["weights"] if replayed.model_digest != expected.model_digest else []
        parts += ["optimizer state"] if replayed.optimizer_digest != expected.optimizer_digest else []
        meta_parts = [k for k in sorted(set(snap.meta) | set(end_meta))
                      if encode_body({"v": snap.meta.get(k)}) != encode_body({"v": end_meta.get(k)})]
        parts += [_META_PARTS.get(k, k) for k in meta_parts]
        if virtual and discipline == STREAM and meta_parts == ["rng"] and len(parts) == 1:
            notes.append("the RNG state at the end differs: a virtual init starts from the RNG state the recipe's "
                         "builders leave, not the trainer's (weights and optimizer state replayed bit for bit)")
        else:
            problems.append(f"the replayed state differs from the checkpoint at step {b.step} in its "
                            f"{', '.join(parts) or 'state digest'} (distance {distance:.3g}, {ratio:.3g}× the "
                            "interval's movement)")
    elif mode == "tolerance":
        for what, r in (("weights", ratio), ("optimizer state", opt_ratio)):
            if r > rho:
                problems.append(f"replayed {what} are {r:.3g}× the interval's movement away from the checkpoint "
                                f"(ρ = {rho:g})")
    return {**report, "steps": len(steps), "distance": distance, "ratio": ratio, "optimizer_distance": opt_distance,
            "optimizer_ratio": opt_ratio, "bit_exact": exact, "batches_matched": batches_ok,
            "metrics_matched": metrics_ok, "problems": problems, "notes": notes}


def _relative(replayed: dict[str, Any], end: dict[str, Any], start: dict[str, Any]) -> tuple[float, float]:
    """(‖R − E‖, ‖R − E‖ / ‖E − S‖) over the tensors of ``end`` (missing start tensors count as zero)."""
    import torch

    names = sorted(end)
    zero = {n: torch.zeros_like(end[n]) for n in names}
    distance = float((_vector({n: replayed.get(n, zero[n]) for n in names}) - _vector(end)).norm())
    moved = float((_vector(end) - _vector({n: start.get(n, zero[n]) for n in names})).norm())
    return distance, distance / moved if moved > 0 else (0.0 if distance == 0 else math.inf)


def _close(a: float, b: float, mode: str, rho: float) -> bool:
    if mode == "bit-exact":
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= rho * max(abs(a), abs(b), 1e-12)
