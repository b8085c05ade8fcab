"""Benchmark of the Recorder's overhead on a training loop: step time, peak memory, cadence, cost split.

Two reference workloads, both built from examples/charlm.py (loaded with importlib):

- ``charlm``: ``CharRecipe()`` as shipped (dim 64, 2 layers, 4 heads, context 64, batch 32);
- ``15M``: the same ``CharTransformer`` at dim 512, 5 layers, 8 heads, context 64, batch 8
  (15,841,792 parameters);
- ``many``: dim 96, 9 layers, batch 16: 112 tensors of mixed sizes (96 to 36,864 elements), which
  stresses the per-tensor Python cost.

For each, a plain and a recorded copy of the model (same seed, same batches) train in interleaved
blocks (P R R P P R R P …) so machine noise hits both alike; warm-up blocks are dropped. The
recorder runs at its defaults (the 1% budget, checkpoint_every=None); its step
clock is reset at the start of each of its blocks so its cadence calibration does not count the
plain blocks, and its queue is flushed at the end of each, inside the block's time: the headline
ratio compares whole blocks (a writer round left pending at a block's end counts towards it; the
median step alone would leave the writer's work out). Background costs are measured
by wrapping the recorder's queue ``put`` and ``LedgerWriter.append`` in this benchmark only. Peak
memory: one subprocess per configuration, VmHWM reset once model and optimizer are built. One
checkpoint of the 15M model (snapshot + write, fingerprinted, fsynced) is compared with plain
``safetensors`` saves of the same tensors. Figures only, no assertions.

    python benchmarks/recorder_overhead.py                  # defaults, ~1-3 min on 2 cores
    python benchmarks/recorder_overhead.py --steps 800 120 400 --profile 300 30 100   # + cProfile of rec.step
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import importlib.util
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

import ledger
from ledger import Kind, Signer
from ledger._parts import fsync_path
from ledger.format import encode_body
from ledger.hooks import FingerprintOptions, Recorder
from ledger.hooks._failures import Job
from ledger.torch import canonical_state, snapshot, snapshot_digests
from ledger.torch import write_checkpoint as write

ROOT = Path(__file__).resolve().parent.parent
KEY = Signer.from_seed(bytes(32))
SEED = 0
WORKLOADS: dict[str, dict[str, int]] = {
    "charlm": {}, "15M": {"dim": 512, "layers": 5, "heads": 8, "context": 64, "batch_size": 8},
    "many": {"dim": 96, "layers": 9, "heads": 4, "context": 64, "batch_size": 16}}
Row = tuple[str, float, str, float | None]  # figure, value, baseline/target label, baseline value


def make_recipe(name: str) -> Any:
    """The workload's CharRecipe (examples/charlm.py is loaded from its file, not installed)."""
    if "charlm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("charlm", ROOT / "examples" / "charlm.py")
        assert spec is not None and spec.loader is not None
        sys.modules["charlm"] = module = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules["charlm"].CharRecipe(**WORKLOADS[name])


def one_step(recipe: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, rec: Recorder | None, step: int,
             prof: cProfile.Profile | None = None) -> tuple[float, float]:
    """Training step ``step`` (recorded when ``rec``); seconds of the whole step and of ``rec.step``."""
    x, y = batch = recipe.batch(step)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    t1 = time.perf_counter()
    if rec is not None:
        with prof or contextlib.nullcontext():
            rec.step(loss=loss, batch=batch)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def us(values: list[float]) -> float:
    """Median in microseconds (nan when empty)."""
    return statistics.median(values) * 1e6 if values else float("nan")


class Probe:
    """Times the background work of each step entry, wall and CPU time of the writer thread, by
    wrapping the recorder's queue ``put`` (the job: body, batch digest) and its writer's ``append``
    (encode, sign, WAL write, fsync, roll-over). Wall time includes waits for the GIL."""

    def __init__(self, rec: Recorder) -> None:
        self.wall: dict[str, list[float]] = {"job": [], "append": [], "latency": []}  # latency: enqueue → appended
        self.cpu: dict[str, list[float]] = {"job": [], "append": []}
        self.body: dict[str, Any] | None = None
        put, append, enqueued = rec._queue.put, rec._writer.append, [0.0]

        def timed_put(job: Job) -> None:
            t_put = time.perf_counter()

            def timed_job() -> Any:
                t0, c0 = time.perf_counter(), time.thread_time()
                enqueued[0] = t_put
                result = job.run()
                self.wall["job"].append(time.perf_counter() - t0)
                self.cpu["job"].append(time.thread_time() - c0)
                return result
            put(dataclasses.replace(job, run=timed_job))

        def timed_append(kind: Any, step: int, body: Any, **options: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            entry = append(kind, step, body, **options)
            if kind is Kind.STEP:
                self.cpu["append"].append(time.thread_time() - c0)
                self.wall["append"].append(time.perf_counter() - t0)
                self.wall["latency"].append(time.perf_counter() - enqueued[0])
                self.body = dict(body)
            return entry

        rec._queue.put = timed_put  # type: ignore[method-assign]
        rec._writer.append = timed_append  # type: ignore[method-assign]


def interleaved(name: str, steps: int, block: int, warmup: int, tmp: Path, budget: float = 0.01) -> dict[str, Any]:
    """Train a plain and a recorded copy in ABBA-ordered blocks; per-step times and recorder figures."""
    recipe = make_recipe(name)
    models = {mode: recipe.build_model(SEED) for mode in ("plain", "recorded")}
    opts = {mode: recipe.build_optimizer(model) for mode, model in models.items()}
    rec = Recorder(tmp / name, model=models["recorded"], optimizer=opts["recorded"], key=KEY, seed=SEED,
                   fingerprints=FingerprintOptions(budget=budget),
                   checkpoint_every=None)
    probe = Probe(rec)
    r: dict[str, Any] = {"plain": [], "recorded": [], "rec_step": [], "flush": [],
                         "costs": {k: [] for k in rec._cadence.costs}, "blocks": {"plain": [], "recorded": []},
                         "next": {"plain": 0, "recorded": 0}}

    def run_block(mode: str, n: int, keep: bool) -> None:
        recorder = rec if mode == "recorded" else None
        if recorder is not None:
            recorder._last_step_time = None  # its period estimate must not include the plain block
        start, bookkeeping = time.perf_counter(), 0.0
        for _ in range(n):
            total, part = one_step(recipe, models[mode], opts[mode], recorder, r["next"][mode])
            t0 = time.perf_counter()
            r["next"][mode] += 1
            if keep:
                r[mode].append(total)
                r["rec_step"] += [part] if recorder else []
            for k, v in rec._cadence.costs.items() if recorder else ():  # a changed value is a new measurement
                if v and (not r["costs"][k] or r["costs"][k][-1] != v[-1]):
                    r["costs"][k].append(v[-1])
            bookkeeping += time.perf_counter() - t0  # this benchmark's own, left out of the block's time
        if recorder is not None:  # the writer's rounds the block left pending count towards it
            t0 = time.perf_counter()
            recorder.flush()
            r["flush"] += [time.perf_counter() - t0] if keep else []
        if keep:  # per step: the block's whole time, its flush included
            r["blocks"][mode].append((time.perf_counter() - start - bookkeeping) / n)

    for mode in ("plain", "recorded"):
        run_block(mode, warmup, keep=False)
    for i, lo in enumerate(range(0, steps, block)):
        for mode in (("plain", "recorded") if i % 2 == 0 else ("recorded", "plain")):
            run_block(mode, min(block, steps - lo), keep=True)
    # the optimizer pre-step hook runs inside optimizer.step (so inside the step time): timed alone
    r["hook"] = timeit.repeat(lambda: rec._capture.pre_step(0, opts["recorded"], (), {}), number=1, repeat=50)
    r["post_hook"] = timeit.repeat(lambda: rec._capture.post_step(0, opts["recorded"], (), {}), number=1, repeat=50)
    rec._capture.gather()  # drop what the timed hooks captured
    r["cadence"] = (dict(rec._cadence.every), statistics.median(rec._cadence.periods))
    t0 = time.perf_counter()
    rec.close()
    r["close"] = time.perf_counter() - t0
    bodies = [e.body() for e in ledger.open(tmp / name).entries() if e.kind is Kind.STEP]
    r["carries"] = {c: sum(c in b["carries"] for b in bodies) for c in ("norms", "sketch", "digests", "batch")}
    r.update(params=sum(p.numel() for p in models["plain"].parameters()), probe=probe, entries=len(bodies),
             param_mib=sum(p.numel() * p.element_size() for p in models["plain"].parameters()) / 2**20)
    return r


def child_memory(name: str, mode: str, steps: int) -> None:
    """In a subprocess: build the workload, reset the RSS high-water mark, run ``steps`` steps (plain,
    or recorded from the Recorder's construction to its close) and print the peak RSS in KiB."""
    recipe = make_recipe(name)
    model = recipe.build_model(SEED)
    opt = recipe.build_optimizer(model)
    if mode == "libraries":  # plain training with the recorder's libraries loaded: what recording adds beyond them
        import pyarrow.parquet  # noqa: F401

        from ledger import _writer  # noqa: F401
        from ledger.hooks import _recorder  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS (ru_maxrss counts the parent's too)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(Path(tmp) / "l", model=model, optimizer=opt, key=KEY, seed=SEED) if mode == "recorded" else None
        for s in range(steps):
            one_step(recipe, model, opt, rec, s)
        if rec is not None:
            rec.close()
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))


def peak_rss(name: str, mode: str, steps: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process while it trains."""
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--child-memory", name, mode,
                          str(steps)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def report_workload(name: str, r: dict[str, Any], rss: tuple[float, float, float]) -> list[Row]:
    plain, recorded = statistics.median(r["plain"]), statistics.median(r["recorded"])
    pairs = list(zip(r["blocks"]["plain"], r["blocks"]["recorded"], strict=True))
    ratios = sorted(b / a for a, b in pairs)  # block totals, flushes included: the headline
    paired = statistics.median(ratios)
    spread = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    every, period = r["cadence"]
    c, probe, budget = r["costs"], r["probe"], plain * 1e4
    print(f"\n== {name}: {r['params']:,} parameters, {len(r['plain'])} timed steps per side, "
          f"torch threads {torch.get_num_threads()} ==")
    print(f"recorded/plain, paired blocks of whole time (the writer's block-end flush included): {paired:.4f}x "
          f"(target ≤ 1.02x; quartiles {spread[0]:.4f}–{spread[1]:.4f}x over {len(pairs)} pairs); median step "
          f"(flushes excluded): plain {1e3 * plain:.2f} ms, recorded {1e3 * recorded:.2f} ms → {recorded / plain:.4f}x")
    print(f"rec.step on the training thread: median {us(r['rec_step']):.0f} µs (1% budget of the plain step: "
          f"{budget:.0f} µs); optimizer hooks: pre-step {us(r['hook']):.0f} µs, post-step {us(r['post_hook']):.0f} µs")
    per = {kind: us(c[kind]) / max(every.get(kind, 1), 1) if every.get(kind, 1) else 0.0 for kind in c}
    print("  by kind, training thread: " + "; ".join(
        f"{kind} {us(c[kind]):.0f} µs each ({len(c[kind])} measured)" + (
            f", every {every[kind]} → {per[kind]:.0f} µs/step" if kind in every else " every step")
        for kind in c))
    sketch_every = every["sketch"]
    print("cadence chosen by the budget: " + ", ".join(f"{k} every {n}" for k, n in every.items())
          + f" steps (period estimate {1e3 * period:.2f} ms) → continuity localises a splice to ≤ {sketch_every} "
          f"steps; {r['entries']} step entries carrying " + ", ".join(f"{k} {v}" for k, v in r["carries"].items()))
    enc = sign = float("nan")
    if probe.body is not None:
        body, encoded = probe.body, encode_body(probe.body)  # sign ≈ Ed25519 over a message of the body's size
        enc, sign = (timeit.timeit(f, number=200) / 200 for f in (lambda: encode_body(body), lambda: KEY.sign(encoded)))
    job, app = us(probe.cpu["job"]), us(probe.cpu["append"])
    print(f"writer thread CPU per step entry: {job:.0f} µs (body, batch digest, then append {app:.0f} µs: encode "
          f"≈ {enc * 1e6:.0f}, sign ≈ {sign * 1e6:.0f} when warm, the rest framing/WAL write/fsync); wall incl. GIL "
          f"waits {us(probe.wall['job']):.0f} µs")
    # the steadier figure beside the ratio: the recorder's CPU per step (all its training-thread time,
    # the optional kinds' steps included, and the writer's), as a share of the plain step
    step_mean, writer_mean = 1e6 * statistics.mean(r["rec_step"]), 1e6 * statistics.mean(probe.cpu["job"])
    cpu = step_mean + writer_mean
    print(f"recorder CPU per step: {cpu:.0f} µs = {cpu / (1e4 * plain):.2f}% of the plain step (rec.step mean "
          f"{step_mean:.0f} µs + writer mean {writer_mean:.0f} µs)")
    print(f"enqueue→appended {us(probe.wall['latency']):.0f} µs; block-end flush {us(r['flush']):.0f} µs; "
          f"close {1e3 * r['close']:.0f} ms")
    print(f"peak RSS while training (subprocess, from built model + optimizer): plain {rss[0]:.0f} MiB, "
          f"recorded {rss[1]:.0f} MiB → +{rss[1] - rss[0]:.0f} MiB = "
          f"{100 * (rss[1] - rss[0]) / r['param_mib']:.0f}% of the parameter bytes "
          f"({r['param_mib']:.1f} MiB; target ≤ 5%); beyond plain training with the recorder's libraries "
          f"loaded ({rss[2]:.0f} MiB): +{rss[1] - rss[2]:.0f} MiB = {100 * (rss[1] - rss[2]) / r['param_mib']:.0f}%")
    return [(f"{name} recorded/plain, paired blocks", paired, "target ≤ 1.02", None),
            (f"{name} median step recorded (ms)", 1e3 * recorded, "plain step, flushes excluded", 1e3 * plain),
            (f"{name} rec.step, training thread (µs)", us(r["rec_step"]), "1% of the plain step", budget),
            (f"{name} writer CPU per step (µs)", job, "1% of the plain step", budget),
            (f"{name} recorder CPU per step (µs)", cpu, "1% of the plain step", budget),
            (f"{name} sketch every (steps)", sketch_every, f"digests every {every['digests']}", None),
            (f"{name} peak RSS recorded (MiB)", rss[1], "plain peak RSS", rss[0])]


def bench_checkpoint(repeat: int, tmp: Path) -> list[Row]:
    """snapshot + write (fingerprinted, fsynced) vs safetensors save_file of the same tensors."""
    recipe = make_recipe("15M")
    model = recipe.build_model(SEED)
    opt = recipe.build_optimizer(model)
    one_step(recipe, model, opt, None, 0)
    tensors, _ = canonical_state(model)
    opt_tensors = {f"state/{i}/{k}": v for i, state in opt.state_dict()["state"].items()
                   for k, v in state.items() if hasattr(v, "detach")}
    t: dict[str, list[float]] = {k: [] for k in ("snapshot", "write", "digests", "save", "save+fsync")}
    size = base_size = 0
    for n in range(repeat):
        t0 = time.perf_counter()
        snap = snapshot(0, model, opt)
        t1 = time.perf_counter()
        directory, _ = write(snap, tmp / f"ckpt{n}")
        t2 = time.perf_counter()
        snapshot_digests(snap)  # the digest part of write, timed alone
        t3 = time.perf_counter()
        for key, value in (("snapshot", t1 - t0), ("write", t2 - t1), ("digests", t3 - t2)):
            t[key].append(value)
        (base := tmp / f"plain{n}").mkdir()
        t0 = time.perf_counter()
        save_file(tensors, str(base / "model.safetensors"))
        save_file(opt_tensors, str(base / "optimizer.safetensors"))
        t["save"].append(time.perf_counter() - t0)
        for f in base.iterdir():
            fsync_path(f)
        t["save+fsync"].append(time.perf_counter() - t0)
        size, base_size = (sum(f.stat().st_size for f in d.iterdir()) for d in (directory, base))
    m = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    total = m["snapshot"] + m["write"]
    print(f"\n== checkpoint of the 15M model + AdamW state after one step (median of {repeat}) ==")
    print(f"snapshot (training thread) {m['snapshot']:.0f} ms; write (background) {m['write']:.0f} ms, of which "
          f"digests ≈ {m['digests']:.0f} ms; total {total:.0f} ms, {size / 2**20:.1f} MiB")
    print(f"plain save_file model + optimizer: {m['save']:.0f} ms, with fsync {m['save+fsync']:.0f} ms, "
          f"{base_size / 2**20:.1f} MiB → checkpoint / (save_file + fsync) {total / m['save+fsync']:.2f}x")
    return [("checkpoint snapshot+write (ms)", total, "save_file + fsync", m["save+fsync"]),
            ("checkpoint training-thread part (ms)", m["snapshot"], "save_file + fsync", m["save+fsync"])]


def profile(name: str, steps: int, tmp: Path) -> None:
    """cProfile of rec.step on the training thread (the pre-step hook is timed separately)."""
    recipe = make_recipe(name)
    model = recipe.build_model(SEED)
    opt = recipe.build_optimizer(model)
    rec = Recorder(tmp / f"profile-{name}", model=model, optimizer=opt, key=KEY, seed=SEED)
    prof = cProfile.Profile()
    for s in range(steps):
        one_step(recipe, model, opt, rec, s, prof if s >= 2 else None)
    rec.close()
    print(f"\n== cProfile of rec.step, {name}, steps 2..{steps - 1} (tottime, top 15) ==")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pair: dict[str, Any] = {"type": int, "nargs": 3, "metavar": ("CHARLM", "15M", "MANY")}
    parser.add_argument("--steps", **pair, default=[800, 60, 400], help="timed steps per side")
    parser.add_argument("--block", **pair, default=[40, 5, 20], help="steps per interleaved block")
    parser.add_argument("--warmup", **pair, default=[10, 3, 10], help="untimed steps per side first")
    parser.add_argument("--memory-steps", **pair, default=[60, 8, 30], help="steps of each memory subprocess")
    parser.add_argument("--profile", **pair, help="also print a cProfile of rec.step over this many steps")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoint repetitions")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both sides)")
    parser.add_argument("--budget", type=float, default=0.01, help="the recorder's budget (default 1%%)")
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), help="these workloads only")
    parser.add_argument("--child-memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory[0], args.child_memory[1], int(args.child_memory[2]))
        return
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(WORKLOADS):
            if args.only and name not in args.only:
                continue
            result = interleaved(name, args.steps[i], args.block[i], args.warmup[i], Path(tmp), args.budget)
            rss = (peak_rss(name, "plain", args.memory_steps[i], args.threads),
                   peak_rss(name, "recorded", args.memory_steps[i], args.threads),
                   peak_rss(name, "libraries", args.memory_steps[i], args.threads))
            rows += report_workload(name, result, rss)
        if args.checkpoints > 0:  # --checkpoints 0: no checkpoint comparison
            rows += bench_checkpoint(args.checkpoints, Path(tmp))
        for i, name in enumerate(WORKLOADS if args.profile else ()):
            profile(name, args.profile[i], Path(tmp))
    print("\n== summary ==")
    print(f"{'figure':40} {'value':>10}  {'baseline/target':28} {'ratio':>8}")
    for figure, value, label, base in rows:
        ratio = f"{value / base:.3f}x" if base else "-"
        print(f"{figure:40} {value:10,.2f}  {label:28} {ratio:>8}" + (f"  (baseline {base:,.2f})" if base else ""))


if __name__ == "__main__":
    main()
