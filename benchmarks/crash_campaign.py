"""Crash campaign: SIGKILL a real recorded torch training at chosen moments, then resume and verify.

    python benchmarks/crash_campaign.py --kills 120 [--busy 2] [--max-lag 1.0] [--seed 7]

Each trial trains ``TinyRecipe`` under ``ledger.hooks.Recorder`` in a child process and kills it
(SIGKILL) during one phase — construction (genesis, init checkpoint), steps, right after a
checkpoint is queued (its files being written), a resume, or close — chosen from what the child
printed, plus a random delay. Then, in this process: ``Recorder.resume`` works (or, when nothing
was acknowledged, the message says to start again), no step acknowledged by ``rec.step`` is lost
beyond the stated bound (those acknowledged within ``max_lag`` seconds of the last one, at most
``queue_size``), no ``.tmp-*`` is left, and after a few more steps and ``close`` the ledger
verifies. Children are forked from one process that imported torch once, so a kill costs
milliseconds, not an interpreter start. ``--busy N`` runs N busy-loop processes meanwhile (a
saturated CPU). The last line printed is one JSON object with the counts
(docs/RELIABILITY.md is generated from it). ``tests/test_crash_campaign.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
EVERY, STEPS, QUEUE = 5, 40, 256
PHASES = ("construct", "steps", "checkpoint", "resume", "close")

ZYGOTE = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from recipes import TinyRecipe
from ledger import Signer
from ledger.hooks import Recorder
from ledger.torch import build_scheduler, run_step
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they die
EVERY, STEPS, MAX_LAG = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
KEY = Signer.from_seed(bytes(range(32)))

def say(line):
    os.write(1, (line + "\n").encode())

def child(path, mode):
    say(f"child {os.getpid()}")
    recipe = TinyRecipe()
    model = recipe.build_model(5); opt = recipe.build_optimizer(model); sched = build_scheduler(recipe, opt)
    say("start")
    if mode == "fresh":
        rec = Recorder(path, model=model, optimizer=opt, scheduler=sched, key=KEY, seed=5, checkpoint_every=EVERY,
                       keep=("last", 3), recipe=recipe, determinism={"rng": "reseed-per-step/v1"}, max_lag=MAX_LAG)
    else:
        rec = Recorder.resume(path, model=model, optimizer=opt, scheduler=sched, key=KEY, keep=("last", 3),
                              max_lag=MAX_LAG)
    say(f"ready {rec.current_step}")
    first = rec.current_step
    for step in range(first, first + STEPS):
        metrics, batch = run_step(recipe, model, opt, sched, 5, step)
        rec.step(batch=batch, **metrics)
        say(f"ack {step} {time.monotonic()}")
        if (step + 1) % EVERY == 0:
            say(f"ckpt {step}")
    say("closing")
    rec.close()
    say("closed")

say("zygote")
for line in sys.stdin:
    path, mode = line.split()
    if os.fork() == 0:
        try:
            child(path, mode)
        finally:
            os._exit(0)
"""


class Zygote:
    """One process that imported torch and the recorder; forks a trainer per trial."""

    def __init__(self, max_lag: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(TESTS), str(EVERY), str(STEPS), str(max_lag)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(lambda line: line == "zygote", 0, timeout=120)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()

    def wait_for(self, match: Any, start: int, timeout: float = 60.0) -> int | None:
        """Index of the first line from ``start`` on that ``match``es, None after ``timeout`` or "closed"."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(start, len(self.lines)):
                    if match(self.lines[i]):
                        return i
                    if self.lines[i] == "closed":
                        return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def run(self, path: Path, mode: str) -> tuple[int, int]:
        """Start a trainer; returns (its pid, index of its first line)."""
        start = len(self.lines)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path} {mode}\n")
        self.proc.stdin.flush()
        i = self.wait_for(lambda line: line.startswith("child "), start)
        assert i is not None, "the zygote did not fork a trainer"
        return int(self.lines[i].split()[1]), i

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def kill(pid: int) -> None:
    """SIGKILL a trainer and wait until it is gone (its lock released)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise RuntimeError(f"trainer {pid} did not die")


def _kill_at(zygote: Zygote, pid: int, start: int, phase: str, rng: random.Random) -> bool:
    """Kill during ``phase``; False when the child finished first."""
    if phase in ("construct", "resume"):
        i = zygote.wait_for(lambda line: line == "start", start)
        delay = rng.uniform(0.0, 0.06)
    elif phase == "steps":
        target = rng.randrange(STEPS // 2)
        i = zygote.wait_for(lambda line: line.startswith("ack ") and int(line.split()[1]) % STEPS >= target, start)
        delay = rng.uniform(0.0, 0.01)
    elif phase == "checkpoint":
        nth = rng.randrange(1, STEPS // EVERY)
        count = [0]

        def match(line: str) -> bool:
            count[0] += line.startswith("ckpt ")
            return count[0] >= nth

        i = zygote.wait_for(match, start)
        delay = rng.uniform(0.0, 0.004)
    else:
        i = zygote.wait_for(lambda line: line == "closing", start)
        delay = rng.uniform(0.0, 0.03)
    if i is None:
        return False
    time.sleep(delay)
    kill(pid)
    return True


def _acks(lines: list[str]) -> list[tuple[int, float]]:
    return [(int(x.split()[1]), float(x.split()[2])) for x in lines if x.startswith("ack ")]


def _check(path: Path, lines: list[str], max_lag: float, stats: dict[str, Any]) -> Any:
    """After a kill: count lost acknowledged steps against the bound, resume, check leftovers."""
    import ledger
    from ledger import Kind, Signer
    from ledger.errors import ConfigurationError
    from ledger.hooks import Recorder

    sys.path.insert(0, str(TESTS))
    from recipes import TinyRecipe

    from ledger.torch import build_scheduler

    acks = _acks(lines)
    ready = any(x.startswith("ready") for x in lines)
    entries = list(ledger.open(path).entries()) if (path / "parts").is_dir() or (path / "wal.log").exists() else []
    resumes = [e.seq for e in entries if e.kind is Kind.RESUME]
    since = resumes[-1] if resumes and "resume" in stats["_mode"] else -1
    recorded = {e.step for e in entries if e.kind is Kind.STEP and e.seq > since}
    lost = [s for s, _ in acks if s not in recorded]
    if lost:
        last_t = acks[-1][1]
        window = sum(1 for _, t in acks if t >= last_t - max_lag - 0.05)
        first_lost_t = next(t for s, t in acks if s == lost[0])
        stats["lag_s"].append(last_t - first_lost_t)
        if len(lost) > min(window, QUEUE) or lost != [s for s, _ in acks][-len(lost):]:
            stats["violations"].append(f"lost {lost} of {len(acks)} acknowledged (bound {min(window, QUEUE)})")
    stats["lost"].append(len(lost))
    if entries and entries[-1].kind is Kind.SEAL:
        stats["sealed"] += 1
        return None
    recipe = TinyRecipe()
    model = recipe.build_model(0)
    opt = recipe.build_optimizer(model)
    sched = build_scheduler(recipe, opt)
    try:
        rec = Recorder.resume(path, model=model, optimizer=opt, scheduler=sched,
                              key=Signer.from_seed(bytes(range(32))), keep=("last", 3))
    except (ConfigurationError, ledger.NotALedgerError) as exc:
        if "start" not in str(exc) and "not a ledger" not in str(exc) and "does not exist" not in str(exc):
            raise
        if ready:
            stats["violations"].append(f"acknowledged a constructor yet: {exc}")
        stats["fresh_starts"] += 1
        shutil.rmtree(path, ignore_errors=True)
        return None
    stats["resumed"] += 1
    leftovers = list((path / "checkpoints").glob(".tmp-*"))
    stats["leftovers"] += len(leftovers)
    return rec, recipe, model, opt, sched


def campaign(kills: int, *, max_lag: float = 1.0, busy: int = 0, seed: int = 7, workdir: Path | None = None,
             progress: Any = None) -> dict[str, Any]:
    """Run trials until ``kills`` SIGKILLs landed; returns the counts."""
    from ledger import Signer
    from ledger.torch import run_step
    from ledger.verify import verify_ledger

    rng = random.Random(seed)
    stats: dict[str, Any] = {"kills": 0, "by_phase": dict.fromkeys(PHASES, 0), "resumed": 0, "fresh_starts": 0,
                             "sealed": 0, "finished_before_kill": 0, "lost": [], "lag_s": [], "leftovers": 0,
                             "verified": 0, "violations": [], "_mode": ""}
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="crash-")) if own else Path(workdir)  # type: ignore[arg-type]
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    zygote = Zygote(max_lag)
    key = Signer.from_seed(bytes(range(32)))
    try:
        trial = 0
        while stats["kills"] < kills:
            phase = PHASES[trial % len(PHASES)]
            path = base / f"run{trial}"
            trial += 1
            modes = ["fresh", "resume"] if phase == "resume" else ["fresh"]
            for gen, mode in enumerate(modes):
                stats["_mode"] = mode
                pid, start = zygote.run(path, mode)
                killed = _kill_at(zygote, pid, start, phase if gen == len(modes) - 1 else "steps", rng)
                if not killed:
                    stats["finished_before_kill"] += 1
                    kill(pid)
                stats["kills"] += killed
                stats["by_phase"][phase if gen == len(modes) - 1 else "steps"] += killed
                checked = _check(path, zygote.lines[start:], max_lag, stats)
                if checked is None:
                    break
                rec, recipe, model, opt, sched = checked
                if gen < len(modes) - 1:
                    rec.abort()  # the next generation resumes in a child
                    continue
                for step in range(rec.current_step, rec.current_step + 2):
                    metrics, batch = run_step(recipe, model, opt, sched, 5, step)
                    rec.step(batch=batch, **metrics)
                rec.close()
            if path.is_dir():
                report = verify_ledger(path, key=key.public)
                if report.verdict == "pass":
                    stats["verified"] += 1
                else:
                    stats["violations"].append(f"{path.name}: verify {report.verdict}: "
                                               + "; ".join(c.detail for c in report.checks if c.status == "fail"))
                shutil.rmtree(path, ignore_errors=True)
            if progress:
                progress(stats)
    finally:
        zygote.close()
        for loop in loops:
            loop.kill()
            loop.wait()
        if own:
            shutil.rmtree(base, ignore_errors=True)
    lost = stats.pop("lost")
    del stats["_mode"]
    lag = stats.pop("lag_s")
    stats.update({"lost_acknowledged_median": statistics.median(lost) if lost else 0,
                  "lost_acknowledged_max": max(lost, default=0), "runs_with_loss": sum(1 for n in lost if n),
                  "max_lag_bound_s": max_lag, "observed_lag_max_s": round(max(lag, default=0.0), 4),
                  "busy_loops": busy, "queue_size": QUEUE})
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=120)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes to run meanwhile")
    parser.add_argument("--max-lag", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    started = time.monotonic()
    stats = campaign(args.kills, max_lag=args.max_lag, busy=args.busy, seed=args.seed,
                     progress=lambda s: print(f"{s['kills']} kills", file=sys.stderr, flush=True))
    stats["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(stats, sort_keys=True))


if __name__ == "__main__":
    main()
