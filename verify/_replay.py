"""``replay``: re-execute chosen intervals from their checkpoints with the recipe and compare.

Intervals: every continuity anomaly, the top-Q largest updates, and N uniformly random intervals
drawn from the verifier's own randomness (the seed is printed; ``--replay-seed`` reproduces it).
On the recorded environment the whole training state must come out bit for bit; elsewhere (or with
``--tolerance``) the relative rule ‖W′−W_u‖ ≤ ρ·‖W_u−W_t‖ applies to weights and optimizer state.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from ledger._state import FILES, digests_of
from ledger.verify._context import Context
from ledger.verify._continuity import movement
from ledger.verify._result import CheckResult, Status
from ledger.verify._run import Checkpoint, RunView

DEFAULT_RHO = 1e-3
TOP_Q = 1


def intervals(view: RunView) -> list[tuple[Checkpoint, Checkpoint]]:
    """Consecutive pairs of checkpoints whose files are here (pruned or missing ones break a pair)."""
    stored = view.stored_checkpoints()
    return [(a, b) for a, b in zip(stored, stored[1:], strict=False) if b.step > a.step]


def choose(view: RunView, pairs: list[tuple[Checkpoint, Checkpoint]], anomalies: list[dict[str, Any]],
           movement: dict[int, float], n_random: int, seed: int) -> dict[int, list[str]]:
    """Index of each chosen interval → why it was chosen."""
    why: dict[int, list[str]] = {}
    for anomaly in anomalies:
        for i, (a, b) in enumerate(pairs):
            if a.step < anomaly["step"] <= b.step:
                why.setdefault(i, []).append("continuity anomaly")
    moved = sorted(range(len(pairs)), key=lambda i: -sum(movement.get(s, 0.0)
                                                           for s in range(pairs[i][0].step + 1, pairs[i][1].step + 1)))
    for i in moved[:TOP_Q]:
        why.setdefault(i, []).append("largest update")
    rng = random.Random(seed)
    for i in rng.sample(range(len(pairs)), min(n_random, len(pairs))):
        why.setdefault(i, []).append("random")
    return why


def _same_env(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    keys = ("torch", "cpu_capability", "machine", "device", "blas")
    return [f"{k}: recorded {recorded.get(k)!r}, here {here.get(k)!r}" for k in keys if recorded.get(k) != here.get(k)]


def _vector(tensors: dict[str, Any]) -> Any:
    import torch

    return torch.cat([t.detach().double().reshape(-1) for _, t in sorted(tensors.items())]) if tensors else \
        torch.zeros(0, dtype=torch.float64)


def check_replay(ctx: Context) -> CheckResult:
    """Replay the chosen intervals (see the module docstring): every continuity anomaly, the
    largest update and ``--replay`` random ones; checkpoints that the ``checkpoints`` check already
    matched are not hashed again."""
    view, recipe, progress = ctx.view, ctx.recipe, ctx.progress
    assert view is not None
    continuity, checkpoints = ctx.results.get("continuity"), ctx.results.get("checkpoints")
    anomalies = list(continuity.data.get("anomalies", [])) if continuity is not None else []
    verified_steps = frozenset(checkpoints.data.get("matched", [])) if checkpoints is not None else frozenset()
    seed, tolerance = ctx.options.replay_seed, ctx.options.tolerance
    pairs = intervals(view)
    if not pairs:
        return CheckResult("replay", Status.SKIP, "fewer than two stored checkpoints: no interval can be replayed",
                           summary="no replayable interval")
    import torch

    from ledger.torch import deterministic, environment

    recorded_env = view.genesis.environment
    differences = _same_env(recorded_env, environment(str(recorded_env.get("device", "cpu"))))
    mode = "tolerance" if tolerance is not None or differences else "bit-exact"
    rho = tolerance if tolerance is not None else DEFAULT_RHO
    threads = int(view.genesis.determinism.get("threads") or recorded_env.get("threads") or torch.get_num_threads())
    chosen = choose(view, pairs, anomalies, movement(view), ctx.options.replay, seed)
    genesis_groups = view.optimizer.param_groups
    run_seed = int(view.genesis.seed or 0)
    reports, failures, replayed_steps = [], [], 0
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    try:
        deterministic(threads=threads)
        for done, i in enumerate(sorted(chosen)):
            if progress:
                progress("replay", done, len(chosen))
            a, b = pairs[i]
            result = _replay_one(view, recipe, a, b, run_seed, genesis_groups, mode, rho,
                                 start_verified=a.step in verified_steps)
            result["why"] = chosen[i]
            replayed_steps += b.step - a.step
            reports.append(result)
            if result["problems"]:
                failures.append(result)
    finally:
        torch.set_num_threads(previous_threads)
    if progress:
        progress("replay", len(chosen), len(chosen))
    total_steps = max(view.last_step + 1, 1)
    data: dict[str, Any] = {
        "mode": mode, "rho": rho if mode == "tolerance" else None, "seed": seed, "threads": threads,
        "environment_differences": differences, "intervals": reports, "available_intervals": len(pairs),
        "replayed_steps": replayed_steps, "cost_fraction": replayed_steps / total_steps,
        "seconds": time.perf_counter() - started,
    }
    how = "bit-exact" if mode == "bit-exact" else f"relative tolerance ρ={rho:g}" + (
        f" (environment differs: {differences[0]})" if differences else "")
    if failures:
        first = failures[0]
        return CheckResult("replay", Status.FAIL,
                           f"{len(failures)} of {len(reports)} replayed interval(s) fail ({how}): "
                           f"steps {first['from_step'] + 1}…{first['to_step']}: {'; '.join(first['problems'][:3])}",
                           data)
    return CheckResult("replay", Status.PASS, f"{len(reports)} of {len(pairs)} interval(s) replayed {how}: "
                       f"{replayed_steps} steps ({100 * data['cost_fraction']:.0f}% of the run), seed {seed}", data)


def _replay_one(view: RunView, recipe: Any, a: Checkpoint, b: Checkpoint, run_seed: int,
                genesis_groups: list[dict[str, Any]], mode: str, rho: float,
                start_verified: bool = False) -> dict[str, Any]:
    from ledger.torch import batch_digest, build_scheduler, load_tensors, restore, run_step, snapshot, snapshot_digests

    problems: list[str] = []
    if not start_verified and digests_of(a.directory).state_digest != a.body.state_digest:
        return {"from_step": a.step, "to_step": b.step, "problems": ["the start checkpoint does not match its entry"]}
    model = recipe.build_model(run_seed)
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    restore(a.directory, model, optimizer, scheduler)
    # hyperparameters: the restored optimizer against the ledger (genesis, and the lr logged for step t+1)
    first = view.steps.get(a.step + 1)
    first_lrs = first.lrs if first is not None else None
    for g, (group, claimed) in enumerate(zip(optimizer.param_groups, genesis_groups, strict=False)):
        for key in ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov"):
            if key in claimed and key in group:
                have = list(group[key]) if isinstance(group[key], tuple) else group[key]
                if have != claimed[key]:
                    problems.append(f"group {g} {key}: restored {have!r}, ledger says {claimed[key]!r}")
        if first_lrs is not None and g < len(first_lrs):
            lr = float(group["lr"].item() if hasattr(group["lr"], "item") else group["lr"])
            if lr != float(first_lrs[g]):
                problems.append(f"group {g} learning rate: restored {lr!r}, ledger logs {float(first_lrs[g])!r} "
                                f"for step {a.step + 1}")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches_ok, metrics_ok, steps = 0, 0, list(range(a.step + 1, b.step + 1))
    for s in steps:
        metrics, batch = run_step(recipe, model, optimizer, scheduler, run_seed, s)
        logged = view.steps.get(s)
        if logged is not None and logged.batch_digest is not None:
            if batch_digest(batch) == logged.batch_digest:
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
    opt_distance, opt_ratio = _relative(snap.optimizer_tensors, load_tensors(b.directory / FILES[1]),
                                        load_tensors(a.directory / FILES[1]))
    exact = replayed.state_digest == expected.state_digest
    if mode == "bit-exact" and not exact:
        what = "weights" if replayed.model_digest != expected.model_digest else \
            "optimizer state" if replayed.optimizer_digest != expected.optimizer_digest else \
            "scheduler/RNG/step state"
        problems.append(f"the replayed state differs from the checkpoint at step {b.step} in its {what} "
                        f"(distance {distance:.3g}, {ratio:.3g}× the interval's movement)")
    elif mode == "tolerance":
        for what, r in (("weights", ratio), ("optimizer state", opt_ratio)):
            if r > rho:
                problems.append(f"replayed {what} are {r:.3g}× the interval's movement away from the checkpoint "
                                f"(ρ = {rho:g})")
    return {"from_step": a.step, "to_step": b.step, "steps": len(steps), "distance": distance, "ratio": ratio,
            "optimizer_distance": opt_distance, "optimizer_ratio": opt_ratio, "bit_exact": exact,
            "batches_matched": batches_ok, "metrics_matched": metrics_ok, "problems": problems}


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
