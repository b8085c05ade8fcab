"""Benchmark of what `ledger verify` costs next to the training it checks.

Records a run of examples/charlm.py's ``recipe`` with ``ledger.hooks.train`` (signed, checkpointed,
sealed with the final weights) and times it: the training cost. Then verifies it with
``verify_ledger`` (key, model, recipe, ``--replay R`` random intervals, replay seed 0), timed end to
end, and once more piece by piece, calling the internal checks in the order and with the arguments
``verify_ledger`` uses, to show where verification time goes. Finally compares the replay check's
seconds per replayed step with the recorded training's seconds per step. Figures only, no assertions.

    python benchmarks/verify_cost.py                              # defaults, ~1 min on 2 cores
    python benchmarks/verify_cost.py --steps 400 --checkpoint-every 50 --replay 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import ledger
from ledger.hooks import train
from ledger.verify import CHECKS, Options, load_context, run_checks, verify_ledger

ROOT = Path(__file__).resolve().parent.parent
RECIPE = f"{ROOT / 'examples' / 'charlm.py'}:recipe"
SIGNER = ledger.Signer.from_seed(bytes(32))
T = TypeVar("T")
Row = tuple[str, float, str]  # piece, seconds, check status ("" for a step that is not a check)


def record(recipe: Any, path: Path, weights: Path, steps: int, checkpoint_every: int) -> float:
    """Train and record ``steps`` steps of ``recipe``; wall seconds."""
    started = time.perf_counter()
    train(recipe, steps=steps, path=path, key=SIGNER, seed=0, checkpoint_every=checkpoint_every,
          final_weights=weights)
    return time.perf_counter() - started


def timed(rows: list[Row], name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``, append (name, seconds, status when it returns a CheckResult) to ``rows``."""
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    rows.append((name, time.perf_counter() - started, getattr(out, "status", "")))
    return out


def pieces(path: Path, weights: Path, replay: int) -> list[Row]:
    """Every step of ``verify_ledger`` timed on its own: loading the context, then each check of the
    registry in order on it (the same calls ``verify_ledger`` makes)."""
    rows: list[Row] = []
    ctx = timed(rows, "load (read + hash)", load_context, path, Options(replay=replay, replay_seed=0),
                key=SIGNER.public, model=weights, recipe=RECIPE)
    results: dict[str, Any] = {}
    for check in CHECKS:
        results[check.name] = timed(rows, check.name, lambda c=check: run_checks(replace(ctx, results=results),
                                                                                  (c,))[0])
    return rows


def print_table(rows: list[Row], end_to_end: float) -> None:
    """Check, seconds, share of the summed pieces, status; then both totals."""
    total = sum(seconds for _, seconds, _ in rows)
    print(f"\n{'check':<20} {'seconds':>9} {'share':>7}  status")
    for name, seconds, status in rows:
        print(f"{name:<20} {seconds:>9.3f} {100 * seconds / total:>6.1f}%  {status}")
    print(f"{'sum of pieces':<20} {total:>9.3f} {100.0:>6.1f}%")
    print(f"{'verify_ledger':<20} {end_to_end:>9.3f}          (end to end, first call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps to record (default 120)")
    parser.add_argument("--checkpoint-every", type=int, default=40, help="checkpoint cadence (default 40)")
    parser.add_argument("--replay", type=int, default=2, help="random intervals replayed (default 2, as the CLI)")
    args = parser.parse_args()
    recipe, _ = ledger.load_recipe(RECIPE)
    with tempfile.TemporaryDirectory(prefix="verify-cost-") as tmp:
        path, weights = Path(tmp) / "ledger", Path(tmp) / "model.safetensors"
        train_s = record(recipe, path, weights, args.steps, args.checkpoint_every)
        per_train = train_s / args.steps
        print(f"recorded {args.steps} steps of examples/charlm.py:recipe (checkpoint every {args.checkpoint_every}) "
              f"in {train_s:.2f} s: {1e3 * per_train:.1f} ms/step")
        started = time.perf_counter()
        report = verify_ledger(path, key=SIGNER.public, model=weights, recipe=RECIPE, replay=args.replay,
                               replay_seed=0)
        verify_s = time.perf_counter() - started
        print(f"verify_ledger: {report.verdict.upper()} in {verify_s:.2f} s ({report.ledger['entries']} entries)")
        rows = pieces(path, weights, args.replay)
    print_table(rows, verify_s)
    replay = report.check("replay").data
    steps, replay_s = int(replay.get("replayed_steps", 0)), float(replay.get("seconds", 0.0))
    per_replay = replay_s / steps if steps else float("nan")
    chosen = [f"{i['from_step'] + 1}…{i['to_step']} ({', '.join(i['why'])})" for i in replay.get("intervals", [])]
    print(f"\nreplay ({replay.get('mode', report.check('replay').status)}): {len(chosen)} of "
          f"{replay.get('available_intervals', 0)} intervals: {'; '.join(chosen) or 'none'}")
    print(f"  {steps} steps in {replay_s:.2f} s: {1e3 * per_replay:.1f} ms/replayed step vs "
          f"{1e3 * per_train:.1f} ms/recorded training step → ratio {per_replay / per_train:.2f}")
    print(f"  replay covers {100 * float(replay.get('cost_fraction', 0.0)):.0f}% of the run's steps and takes "
          f"{100 * replay_s / train_s:.0f}% of its training time")
    top = max(rows, key=lambda r: r[1])
    print(f"\nsummary: train {train_s:.2f} s ({args.steps} steps) | verify {verify_s:.2f} s "
          f"({verify_s / train_s:.2f}× training) | largest piece {top[0]} {top[1]:.2f} s "
          f"({100 * top[1] / sum(r[1] for r in rows):.0f}%) | replay {per_replay / per_train:.2f}× training per step, "
          f"{100 * float(replay.get('cost_fraction', 0.0)):.0f}% of steps | verdict {report.verdict}")


if __name__ == "__main__":
    main()
