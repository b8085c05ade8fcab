"""Run every reliability campaign and regenerate docs/RELIABILITY.md from what they measured.

    python benchmarks/reliability.py            # the long versions (about 30 minutes on 2 cores)
    python benchmarks/reliability.py --quick    # fewer kills and cells (about 5 minutes)
    make campaign                               # the same as the first line

Campaigns (each a script or test file that prints its own counts):
- crash: ``benchmarks/crash_campaign.py`` — SIGKILL a recorded torch training during construction,
  steps, checkpoint writes, resume and close, then resume and verify; again on a saturated CPU;
- disk full: ``tests/test_writer_faults.py`` — ENOSPC injected at every write call of the writer;
- mutation: ``benchmarks/mutation_campaign.py`` — every cell of a 1,000-entry ledger mutated;
- hostile input: ``tests/test_hostile_verify.py`` (the CLI on crafted ledgers and inputs),
  ``tests/test_hostile_format.py`` (the format readers), ``tests/test_verify_resources.py``
  (bombs verified under a 1 GiB limit, peak RSS against a clean ledger) and ``tests/test_fuzz.py``
  (coverage-guided fuzzing of the decoders).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "RELIABILITY.md"


def run(args: list[str], timeout: float) -> tuple[str, float]:
    """Run a command from the repository root; its stdout and the seconds it took."""
    start = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}):\n"
                         f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout, time.monotonic() - start


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def pytest(files: list[str], timeout: float) -> tuple[str, dict[str, int], float]:
    """Run test files serially with their prints shown: (stdout, outcome counts, seconds)."""
    out, seconds = run([sys.executable, "-m", "pytest", *files, "-q", "-s", "-p", "no:cacheprovider", "-n", "0"],
                       timeout)
    summary = out.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|error)", summary)}
    return out, counts, seconds


def campaigns(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    kills = "24" if quick else "100"
    out, _ = run([sys.executable, "benchmarks/crash_campaign.py", "--kills", kills], 3600)
    results["crash"] = last_json(out)
    out, _ = run([sys.executable, "benchmarks/crash_campaign.py", "--kills", "8" if quick else "24", "--busy", "2",
                  "--max-lag", "0.25"], 3600)
    results["crash_busy"] = last_json(out)
    out, seconds = run([sys.executable, "tests/test_writer_faults.py"], 3600)
    results["disk_full"] = {**json.loads(out), "seconds": round(seconds, 1)}
    out, _ = run([sys.executable, "benchmarks/mutation_campaign.py", *(["--cells", "1000"] if quick else [])], 7200)
    results["mutation"] = last_json(out)
    out, counts, seconds = pytest(["tests/test_hostile_verify.py"], 1800)
    groups = re.findall(r"^\.*(\w+): (\d+) of (\d+) cases behaved", out, re.M)  # after pytest's dots
    results["hostile_cli"] = {"groups": {g: [int(a), int(b)] for g, a, b in groups}, "tests": counts,
                              "seconds": round(seconds, 1)}
    out, counts, seconds = pytest(["tests/test_hostile_format.py"], 1800)
    figures = re.search(r'\{\n "clean".*?\n\}', out, re.S)
    results["hostile_format"] = {"tests": counts, "seconds": round(seconds, 1),
                                 "parts": json.loads(figures.group(0)) if figures else {}}
    out, counts, seconds = pytest(["tests/test_verify_resources.py"], 1800)
    rows = re.findall(r"^\.*(\S+?): exit (\S+), ([\d.]+) s, peak RSS (\d+) MiB = ([\d.]+)x clean", out, re.M)
    results["resources"] = {"tests": counts, "cases": [
        {"case": name, "exit": code, "seconds": float(s), "rss_mib": int(rss), "ratio": float(ratio)}
        for name, code, s, rss, ratio in rows]}
    out, counts, seconds = pytest(["tests/test_fuzz.py"], 1800)
    results["fuzz"] = {"tests": counts, "seconds": round(seconds, 1),
                       "corpus": {d.name: len(list(d.iterdir())) for d in sorted((ROOT / "tests/fuzz_corpus").iterdir())
                                  if d.is_dir()}}
    return results


def crash_table(idle: dict[str, Any], busy: dict[str, Any]) -> str:
    def runs(c: dict[str, Any]) -> int:  # a run killed again while resuming counts once
        return int(c["kills"]) - int(c["by_phase"].get("resume", 0))

    rows = [("kills (by phase)", lambda c: f"{c['kills']} ({', '.join(f'{k} {v}' for k, v in c['by_phase'].items())})"),
            ("runs killed (a run killed again while resuming counts once)", runs),
            ("resumes (including those killed again)", lambda c: c["resumed"]),
            ("fresh starts (killed before anything was acknowledged)", lambda c: c["fresh_starts"]),
            ("runs resumed to the end that verify `pass`",
             lambda c: f"{c['verified']} of {runs(c) - int(c['fresh_starts'])}"),
            ("acknowledged steps lost: median / max",
             lambda c: f"{c['lost_acknowledged_median']} / {c['lost_acknowledged_max']}"),
            ("worst writer lag observed (bound)", lambda c: f"{c['observed_lag_max_s']} s ({c['max_lag_bound_s']} s)"),
            ("`.tmp-*` left after resume", lambda c: c["leftovers"]),
            ("violations (lost beyond the bound, unresumable, not verifying)", lambda c: len(c["violations"]))]
    lines = ["| | idle CPU | both cores saturated (`max_lag` 0.25 s) |", "|---|---|---|"]
    lines += [f"| {name} | {value(idle)} | {value(busy)} |" for name, value in rows]
    return "\n".join(lines)


def head() -> str:
    """The commit the campaigns run on (``+changes`` when the tree differs from it)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+changes" if dirty else "")


def render(r: dict[str, Any], quick: bool, commit: str) -> str:
    crash, busy, disk, mut = r["crash"], r["crash_busy"], r["disk_full"], r["mutation"]
    cli = r["hostile_cli"]
    behaved = sum(a for a, _ in cli["groups"].values())
    total = sum(b for _, b in cli["groups"].values())
    res_rows = "\n".join(f"| {c['case']} | {c['exit']} | {c['seconds']:.2f} | {c['rss_mib']} | {c['ratio']:.2f}× |"
                         for c in r["resources"]["cases"])
    part_rows = "\n".join(f"| {name} | {f['outcome'].split(':')[0]} | {float(f['seconds']):.2f} | "
                          f"{float(f['rss_mib']):.0f} |" for name, f in r["hostile_format"]["parts"].items())
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(disk["outcomes"].items()))
    return f"""# Reliability: what was measured

Generated by `python benchmarks/reliability.py{' --quick' if quick else ''}` (`make campaign`) on
{dt.date.today().isoformat()} at commit `{commit}`, on the development machine (2 CPU cores). Do not
edit by hand: run the command again. What the guarantees are is stated in
[FORMAT.md §6.2 and §12](FORMAT.md) and in the `Recorder` docstring; the threat model in
[SECURITY.md](SECURITY.md).

## The promise
- **Training keeps going or stops with a clear error.** A background failure (a checkpoint that could
  not be written, the disk refusing an append) is raised by the next `step()`, `flush()` or `close()`,
  with the number of acknowledged steps that were not written; entries after a failed checkpoint are
  still appended.
- **Nothing acknowledged is lost beyond the bound.** `kill -9` loses at most the steps acknowledged
  within `max_lag` (1 s by default) of the last acknowledged one, and at most `queue_size` (256);
  `rec.flush()` makes everything durable. A full disk never leaves a torn frame in the log.
- **Nothing is accepted that should not be**, and `ledger verify` never hangs, never exhausts memory,
  never writes, and runs no code but the recipe the verifier names.

## Crashes (`benchmarks/crash_campaign.py`)
SIGKILL of a real recorded torch training at moments chosen across construction, steps, checkpoint
writes, resume and close; then `Recorder.resume` (or a fresh start when nothing was acknowledged),
training to the end, `close()` and `ledger verify`.

{crash_table(crash, busy)}

Before this work (issue #10): 9 of 53 killed runs could not be resumed and 390 acknowledged steps
were lost (median 2, max 55, the writer ~0.7 s behind on two busy cores).

## Full disk (`tests/test_writer_faults.py`)
ENOSPC injected at each of the writer's {disk['write_calls']} write calls in turn (log frames, parts,
log resets, manifests) during create, appends, roll-overs and close, in four ways (that call fails;
every call fails until space returns; half the bytes land, then the disk is full; half land, the
next call fails, then space is back): {disk['injections']} injections — {outcomes}. Bad (an
acknowledged entry lost, a ledger that does not reopen or verify, a traceback, files left by a failed
create): **{len(disk['bad'])}**. Before this work: 9 bad of 44 (the log left with a torn frame that
later appends built on, failed creates leaving `parts/`, `wal.log` and a lock file).
A real kernel cut (`RLIMIT_FSIZE`, a short write then EFBIG) is tested as well.

## Every cell mutated (`benchmarks/mutation_campaign.py`)
A {mut['entries']}-entry signed ledger: every row × column of every Parquet part, and one byte of
every log frame of an unsealed ledger, changed one at a time and verified with the trainer's key.

| cases | detected | tail dropped (unsealed log, reported as torn) | missed | crashed | seconds |
|---|---|---|---|---|---|
| {mut['cases']} | {mut['detected']} | {mut['tail-dropped']} | {mut['missed']} | {mut['crashed']} | {mut['seconds']} |

A damaged last frame of an unsealed ledger's log reads as a write torn by a crash; it is dropped and
reported (`torn_tail_bytes`). Cutting an unsealed ledger short is undetectable without an external
anchor (SECURITY.md).

## Hostile input
- **The CLI on crafted ledgers and inputs** (`tests/test_hostile_verify.py`): {behaved} of {total}
  cases end as documented — a report with a failed check naming the seq or file (exit 1), or one line
  (exit 2) for an input that cannot be used — with no traceback, no hang (10 s), no file changed;
  by group: {', '.join(f'{g} {a}/{b}' for g, (a, b) in sorted(cli['groups'].items()))}. `ledger info`
  and `ledger log` on the same ledgers: output or one line. Before this work, 38 of 151 misbehaved
  (9 hangs on FIFOs, 4 internal errors, the rest tracebacks or wrong exit codes).
- **The format readers** (`tests/test_hostile_format.py`): {r['hostile_format']['tests'].get('passed', 0)}
  tests, each crafted record, body, typed body, safetensors file, index, checkpoint file or part a
  `FormatError`. Part bombs, read in a child under a 1 GiB address-space limit:

| part | outcome | seconds | peak RSS MiB |
|---|---|---|---|
{part_rows}

- **Verify on hostile ledgers under a 1 GiB limit** (`tests/test_verify_resources.py`), peak RSS of
  the whole CLI against verifying the same ledger undamaged:

| case | exit | seconds | peak RSS MiB | × clean |
|---|---|---|---|---|
{res_rows}

- **Fuzzing** (`tests/test_fuzz.py`, atheris): the record decoder, the log frame reader and the
  safetensors header reader, each for 20 s per run; every input that ever broke a reader is kept in
  `tests/fuzz_corpus/` ({', '.join(f'{k}: {v}' for k, v in r['fuzz']['corpus'].items())} files) and
  replayed by the fast tests. This run: {', '.join(f'{n} {k}' for k, n in r['fuzz']['tests'].items())}.

## Raw figures
```json
{json.dumps(r, indent=1, sort_keys=True, default=str)[:20000]}
```
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kills and cells (minutes, not half an hour)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    commit = head()  # taken first: what the campaigns ran on, whatever lands while they run
    results = campaigns(args.quick)
    args.out.write_text(render(results, args.quick, commit))
    print(f"wrote {args.out}", file=sys.stderr)
    bad = (len(results["crash"]["violations"]) + len(results["crash_busy"]["violations"])
           + len(results["disk_full"]["bad"]) + results["mutation"]["missed"] + results["mutation"]["crashed"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
