"""Benchmark of `ledger verify` on long ledgers recorded by the real ``Recorder``.

Records a tiny model (two linear layers, 4 tensors) for N steps with ``ledger.hooks.Recorder`` —
AdamW and SGD with momentum, Nesterov and weight decay — at default fingerprint settings with a
checkpoint every N/10 steps, sealed with the final weights; the ledgers are cached (by optimizer and
N) under ``--cache``, since recording 10⁵ steps takes minutes. Then times, as whole processes, side
by side in one run: ``ledger verify --sample 0``, a full ``ledger verify``, and the baseline — a
plain Python script that reads every part with pyarrow and SHA-256s every stored record. Prints
seconds, entries/s and the ratio to the baseline (medians of ``--repeat`` runs); ``--profile`` also
runs ``--sample 0`` under cProfile and prints where the time goes (``--profile full``: the full verify,
whose signature workers the profile shows as the parent's wait). Figures only, no assertions.

    python benchmarks/verify_scaling.py                               # 10⁵ steps: minutes to record
    python benchmarks/verify_scaling.py --steps 20000 --optimizers sgd --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ledger
from ledger.hooks import Recorder

BASELINE = """
import hashlib, sys
from pathlib import Path
import pyarrow.parquet as pq
n = 0
for part in sorted(Path(sys.argv[1], "parts").glob("*.parquet")):
    for record in pq.read_table(part, columns=["record"]).column("record").to_pylist():
        hashlib.sha256(record).digest()
        n += 1
print(n)
"""


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum, Nesterov and weight decay."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4)
    raise SystemExit(f"unknown optimizer {name!r}")


def record(directory: Path, optimizer_name: str, steps: int) -> Path:
    """Record ``steps`` steps of a tiny regression model into ``directory/ledger``; returns it."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = make_optimizer(optimizer_name, model)
    signer, public = ledger.generate_keypair(directory / "keys" / "trainer")
    xs, ys = torch.randn(64, 32, 16), torch.randn(64, 32, 1)  # 64 batches, reused in turn
    rec = Recorder(directory / "ledger", model=model, optimizer=optimizer, key=signer, seed=0,
                   checkpoint_every=max(1, steps // 10), config={"optimizer": optimizer_name, "steps": steps})
    for step in range(steps):
        x, y = xs[step % 64], ys[step % 64]
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss=loss, batch=(x, y))
    rec.close(final_weights=directory / "model.safetensors")
    return directory / "ledger"


def cached(cache: Path, optimizer_name: str, steps: int) -> Path:
    """The cached ledger for (optimizer, steps), recorded first if absent."""
    directory = cache / f"{optimizer_name}-{steps}"
    if (directory / "done").exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    record(directory, optimizer_name, steps)
    print(f"recorded {optimizer_name} × {steps} steps in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    (directory / "done").touch()
    return directory


def verify_command(directory: Path, sample: bool) -> list[str]:
    """``ledger verify`` of a cached run (key and released model given)."""
    return [sys.executable, "-m", "ledger", "verify", str(directory / "ledger"),
            "--key", str(directory / "keys" / "trainer.pub"), "--model", str(directory / "model.safetensors"),
            *(["--sample", "0"] if sample else [])]


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and exit status of a whole process. It may write its bytecode, as an installed
    package has it compiled: under PYTHONDONTWRITEBYTECODE every module edited since its .pyc was
    written would be compiled again in every process (~10 ms for a large one)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    if done.returncode == 1:  # a failed verdict on an honest run is worth seeing
        print(done.stdout, file=sys.stderr)
    return seconds, done.returncode


def entries(directory: Path) -> int:
    """Entries in the ledger (what the baseline hashes)."""
    done = subprocess.run([sys.executable, "-c", BASELINE, str(directory / "ledger")], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def profile(directory: Path, top: int, sample: bool) -> None:
    """``verify --sample 0`` (or the full verify) in this process under cProfile: the functions with
    the most own time, then by cumulative time."""
    from click.testing import CliRunner

    from ledger._cli import cli

    profiler = cProfile.Profile()
    profiler.enable()
    result = CliRunner().invoke(cli, verify_command(directory, sample)[3:])
    profiler.disable()
    print(f"\ncProfile of verify{' --sample 0' if sample else ''} (exit {result.exit_code}), by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"], choices=["adamw", "sgd"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ledger-verify-scaling")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the full verify (every signature, every body)")
    parser.add_argument("--profile", nargs="?", const="sample0", choices=["sample0", "full"])
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for name in args.optimizers:
        directory = cached(args.cache, name, args.steps)
        n = entries(directory)
        timed(verify_command(directory, True))  # a first run compiles what has changed since the last
        base, sample, full, status = [], [], [], set()
        for _ in range(args.repeat):  # interleaved, so that machine noise hits each alike
            base.append(timed([sys.executable, "-c", BASELINE, str(directory / "ledger")])[0])
            seconds, rc = timed(verify_command(directory, True))
            sample.append(seconds)
            status.add(rc)
            if args.full:
                seconds, rc = timed(verify_command(directory, False))
                full.append(seconds)
                status.add(rc)
        b = statistics.median(base)
        rows.append((name, n, b, statistics.median(sample), statistics.median(full) if full else None, status))
        if args.profile:
            profile(directory, args.top, args.profile == "sample0")
    print(f"\n{'optimizer':<10}{'entries':>9}{'baseline s':>12}{'sample0 s':>11}{'k ent/s':>9}{'ratio':>8}"
          f"{'full s':>9}{'k ent/s':>9}{'ratio':>8}  exit")
    for name, n, b, s, f, status in rows:
        full_cols = f"{f:>9.2f}{n / f / 1e3:>9.1f}{f / b:>8.2f}" if f is not None else f"{'—':>9}{'—':>9}{'—':>8}"
        print(f"{name:<10}{n:>9}{b:>12.2f}{s:>11.2f}{n / s / 1e3:>9.1f}{s / b:>8.2f}{full_cols}  "
              f"{','.join(map(str, sorted(status)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
