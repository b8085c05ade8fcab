"""Benchmark of verifying a ledger with large stored checkpoints: `ledger verify` next to a bare read.

Records, with the real ``Recorder``, a model of two float32 tensors making up ``--mib`` MiB (SGD,
a checkpoint after each of 2 steps, then the close's): three stored checkpoints of that size. Then
times, each in its own process, interleaved, repeated, warm page cache:

* ``bare``    SHA-256 of every checkpoint file over all cores (one file after another, N byte
  ranges each, one thread each): reading the checkpoints once, the least any check of them costs;
* ``verify``  ``ledger verify LEDGER --key PUB``, a whole CLI process: check ``checkpoints`` hashes
  every file, check ``continuity`` streams consecutive checkpoints (the bound between them, their
  distance, the logged norms and sketch at each; ``verify/_continuity.py``).

Prints the median wall seconds, the paired ratio to ``bare`` (the median of each round's ratio),
the median CPU seconds (user + system, all threads) and the peak RSS of each (``getrusage`` of the
child). Continuity's memory is O(chunk) whatever the model's size: compare the peak RSS at two
``--mib``. Figures only, no assertions.

    python benchmarks/verify_checkpoints.py                 # 1 GiB model: 3.1 GB of checkpoints, ~5 min
    python benchmarks/verify_checkpoints.py --mib 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_fingerprint import run_child  # noqa: E402

BARE_ALL = r"""
import hashlib, os, sys, threading
n, paths = int(sys.argv[1]), sys.argv[2:]
def run(fd, lo, hi):
    h, buf = hashlib.sha256(), bytearray(4 << 20)
    view = memoryview(buf)
    while lo < hi:
        got = os.preadv(fd, [view[:min(len(buf), hi - lo)]], lo)
        h.update(view[:got]); lo += got
for path in paths:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    step = -(-size // n)
    threads = [threading.Thread(target=run, args=(fd, i * step, min((i + 1) * step, size))) for i in range(n)]
    [t.start() for t in threads]; [t.join() for t in threads]
    os.close(fd)
"""

RECORD = r"""
import sys
from pathlib import Path
import torch
from ledger import generate_keypair
from ledger.hooks import Recorder
out, mib = Path(sys.argv[1]), int(sys.argv[2])
generate_keypair(out / "key")
torch.manual_seed(0)
half = (mib << 20) // 8
model = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(half) * 0.01),
                                "b": torch.nn.Parameter(torch.randn(half) * 0.01)})
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
rec = Recorder(out / "run.ledger", model=model, optimizer=opt, key=out / "key.pem", seed=0, checkpoint_every=1)
for _ in range(2):
    opt.zero_grad()
    loss = model["a"][:1000].square().sum() + model["b"][:1000].square().sum()
    loss.backward()
    opt.step()
    rec.step(loss=loss)
rec.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the model in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--dir", default=None, help="where to record (default a temporary folder in /tmp)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="verify-cp-", dir=args.dir or "/tmp"))
    try:
        subprocess.run([sys.executable, "-c", RECORD, str(tmp), str(args.mib)], check=True)
        files = sorted(str(p) for p in (tmp / "run.ledger" / "checkpoints").glob("*/*") if p.is_file())
        weights = [f for f in files if f.endswith("model.safetensors")]
        cases = {
            "bare": [sys.executable, "-c", BARE_ALL, str(cpus), *files],
            "verify": [str(Path(sys.executable).parent / "ledger"), "verify", str(tmp / "run.ledger"),
                       "--key", str(tmp / "key.pub")],
        }
        run_child(cases["bare"])  # the page cache holds the files from here on
        results: dict[str, list[tuple[float, float | None, int, float]]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, argv in cases.items():
                results[name].append(run_child(argv))
        size = sum(os.path.getsize(f) for f in files)
        print(f"{len(weights)} checkpoints of a {args.mib} MiB model ({size / (1 << 30):.2f} GiB of files), "
              f"{cpus} CPUs, {args.rounds} interleaved rounds, warm page cache")
        print(f"{'process':<8} {'wall s':>8} {'paired':>8} {'cpu s':>7} {'peak RSS':>10}")
        bare = results["bare"]
        for name, rows in results.items():
            wall = statistics.median(row[0] for row in rows)
            paired = statistics.median(row[0] / b[0] for row, b in zip(rows, bare, strict=True))
            cpu = statistics.median(row[3] for row in rows)
            rss = max(row[2] for row in rows)
            print(f"{name:<8} {wall:>8.2f} {paired:>7.2f}× {cpu:>7.2f} {rss / (1 << 20):>7.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
