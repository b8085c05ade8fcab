"""Overhead of the MLflow mirror, side by side with MLflow's own fluent logging, in one run.

The workload is the examples' character transformer (examples/charlm.py), ``--steps`` optimizer
steps on the CPU. Five loops, each round running all of them in turn (the order rotates every round
so machine noise hits each alike; the first round is a warm-up and is dropped):

- ``plain``: training only;
- ``ledger``: ``Recorder`` at its defaults, no mirror;
- ``ledger+mirror``: ``Recorder(..., mlflow=MlflowSink(...))`` (the background mirror at its defaults);
- ``mlflow sync``: ``mlflow.log_metrics({"loss": …}, step=…)`` every step (MLflow's fluent API);
- ``mlflow async``: the same with ``synchronous=False``.

The loop is timed from the first step to the end of the last ``step``/``log_metrics`` call (the
recorder's construction and close are timed apart: close includes waiting for the mirror). A real
``mlflow server`` (sqlite, local artifacts, 127.0.0.1) is started for the run unless
``--tracking-uri`` names one. Prints median ms per step and ratios; no assertions.

    python benchmarks/mlflow_overhead.py                 # ~3 min on 2 cores (~25 s of it server start)
    python benchmarks/mlflow_overhead.py --steps 300 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch.nn import functional as F

import ledger
from ledger.hooks import Recorder
from ledger.hooks.mlflow import MlflowSink

ROOT = Path(__file__).resolve().parent.parent
CPU: list[float] = []  # process CPU seconds of the last timed loop


def loop(recipe: Any, steps: int, after: Callable[[int, torch.Tensor, Any], None]) -> float:
    """Train ``steps`` steps from a fresh model, calling ``after(step, loss, batch)`` after each; seconds."""
    torch.manual_seed(1)
    model = recipe.build_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return _timed(model, optimizer, recipe, steps, after)


def _timed(model: Any, optimizer: Any, recipe: Any, steps: int,
           after: Callable[[int, torch.Tensor, Any], None]) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x, y = recipe.batch(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after(step, loss, (x, y))
    CPU.append(time.process_time() - cpu)  # this process, every thread (the mirror's, the writer's); not the server
    return time.perf_counter() - start


MIRROR_CPU: list[tuple[float, float, float]] = []  # (mirror thread CPU, process CPU, wall) of each mirrored loop


def recorded(recipe: Any, steps: int, key: Path, where: Path, sink: MlflowSink | None) -> tuple[float, float, float]:
    """(construction, loop, close) seconds of a recorded run."""
    torch.manual_seed(1)
    model = recipe.build_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    rec = Recorder(where, model=model, optimizer=optimizer, key=key, seed=1, config={"lr": 3e-3, "steps": steps},
                   mlflow=sink)
    t1 = time.perf_counter()
    seconds = _timed(model, optimizer, recipe, steps, lambda step, loss, batch: rec.step(loss=loss, batch=batch))
    t2 = time.perf_counter()
    if sink is not None and rec._mirror is not None:  # the mirror thread's own CPU time during the loop
        MIRROR_CPU.append((rec._mirror.cpu_seconds, CPU[-1], seconds))
    rec.close()
    if sink is not None:
        body = ledger.open(where).last_entry().body()
        if body.get("mirror", {}).get("missing", True):
            print(f"  warning: the mirror did not complete before the seal: {body.get('mirror')}", file=sys.stderr)
    return t1 - t0, seconds, time.perf_counter() - t2


def fluent(recipe: Any, steps: int, uri: str, synchronous: bool) -> float:
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        return loop(recipe, steps, lambda step, loss, batch: mlflow.log_metrics({"loss": float(loss)}, step=step,
                                                                                  synchronous=synchronous))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--modes", default="plain,ledger,ledger+mirror,mlflow sync,mlflow async",
                        help="comma-separated subset of the loops (plain and ledger are always run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    recipe, _ = ledger.load_recipe(f"{ROOT / 'examples' / 'charlm.py'}:recipe")
    server = None
    with tempfile.TemporaryDirectory(prefix="mlflow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        uri = args.tracking_uri
        if uri is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from mlflow_server import start_mlflow_server

            t = time.perf_counter()
            server = start_mlflow_server(tmp / "server")
            uri = server.tracking_uri
            print(f"mlflow server up in {time.perf_counter() - t:.0f} s at {uri}", file=sys.stderr)
        try:
            key, _ = ledger.generate_keypair(tmp / "trainer")
            counter = iter(range(1 << 30))
            runs: dict[str, Callable[[], float]] = {
                "plain": lambda: loop(recipe, args.steps, lambda *_: None),
                "ledger": lambda: recorded(recipe, args.steps, key, tmp / f"l{next(counter)}", None)[1],
                "ledger+mirror": lambda: _mirrored(recipe, args.steps, key, tmp / f"m{next(counter)}", uri, closes),
                "mlflow sync": lambda: fluent(recipe, args.steps, uri, True),
                "mlflow async": lambda: fluent(recipe, args.steps, uri, False),
            }
            wanted = {"plain", "ledger", *args.modes.split(",")}
            runs = {name: run for name, run in runs.items() if name in wanted}
            closes: list[float] = []
            times: dict[str, list[float]] = {name: [] for name in runs}
            cpus: dict[str, list[float]] = {name: [] for name in runs}
            names = list(runs)
            for round_ in range(args.runs + 1):
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                for name in order:
                    seconds = runs[name]()
                    if round_:
                        times[name].append(seconds)
                        cpus[name].append(CPU[-1])
                print(f"round {round_} done" + (" (warm-up, dropped)" if not round_ else ""), file=sys.stderr)
        finally:
            if server is not None:
                server.stop()
    plain = statistics.median(times["plain"])
    ledger_only = statistics.median(times["ledger"])
    plain_cpu, ledger_cpu = statistics.median(cpus["plain"]), statistics.median(cpus["ledger"])
    print(f"{args.steps} steps, {args.runs} rounds, torch threads {args.threads}; median ms per step, wall | "
          "process CPU (the server's excluded):")
    for name, values in times.items():
        median, cpu = statistics.median(values), statistics.median(cpus[name])
        print(f"  {name:<14} {1000 * median / args.steps:8.2f} ms  x{median / plain:.3f}"
              f"   | {1000 * cpu / args.steps:8.2f} ms  x{cpu / plain_cpu:.3f} of plain"
              + (f"   (x{median / ledger_only:.3f} wall, x{cpu / ledger_cpu:.3f} CPU of ledger)"
                 if name == "ledger+mirror" else ""))
    if MIRROR_CPU:
        own = [cpu / total for cpu, total, _ in MIRROR_CPU[1:] or MIRROR_CPU]
        per_second = [1000 * cpu / wall for cpu, _, wall in MIRROR_CPU[1:] or MIRROR_CPU]
        print(f"  mirror thread CPU during the loop (time.thread_time around each pass, setup pass included): "
              f"median {statistics.median(per_second):.2f} ms per second of training, "
              f"{100 * statistics.median(own):.2f}% of the process's CPU")
    if closes:
        print(f"  mirror close (waits for the mirror, uploads the part): median {statistics.median(closes):.2f} s")
    return 0


def _mirrored(recipe: Any, steps: int, key: Path, where: Path, uri: str, closes: list[float]) -> float:
    _, seconds, close = recorded(recipe, steps, key, where, MlflowSink(tracking_uri=uri, experiment="bench"))
    closes.append(close)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
