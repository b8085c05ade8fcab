"""Benchmark of release fingerprinting: `ledger verify --model` next to a bare SHA-256 of the file.

Writes a safetensors file (default 1 GiB: 16 float32 tensors of 64 MiB plus 240 small ones) and a
sealed ledger whose seal holds that file's final weights (``LedgerWriter`` and the seal body the
recorder writes, docs/FORMAT.md §12), then times, each in its own process, interleaved, repeated:

* ``bare-N``     SHA-256 of the file over all cores: N byte ranges, one thread each (the baseline);
* ``bare-1``     SHA-256 of the whole file on one thread;
* ``digests``    ``safetensors_digests`` (the hashing verify and the recorder's close run);
* ``blocked``    ``safetensors_blocked_digests`` (``tensor-blocked/v1``, the same bounded reader);
* ``mmap-ref``   the per-tensor digests from a memory map on one thread, the way they were computed
  before the chunked, parallel reader (the same digests; it checks they are byte-identical);
* ``verify``     ``ledger verify LEDGER --key PUB --model FILE``, a whole CLI process;
* ``verify-nomodel`` the same without ``--model``: start-up and the other checks alone;
* ``model_signing`` ``model_signing sign key`` of the file's folder, when the package is installed;
* ``import-cli``  ``import ledger._cli, ledger.verify``: the start-up every ``ledger verify`` pays;
* ``import-pandas`` ``import pandas``, which pyarrow imports on the first array it converts when
  pandas is installed (``pa.array``, ``pc.equal(column, "x")``, ``to_numpy()``); ``verify`` reads its
  columns from their buffers (``ledger/_arrow.py``) so as not to pay it.

Prints the median wall seconds (whole process, start-up included), its ratio to ``bare-N``'s median
and the median of the per-round (paired) ratios, the median CPU seconds, the median seconds the
hashing took inside the process where the child reports it and each process's peak RSS
(``getrusage`` of the child). The file is read once before timing: figures are warm-cache.
Figures only, no assertions.

    python benchmarks/release_fingerprint.py                  # 1 GiB, 3 rounds
    python benchmarks/release_fingerprint.py --mib 256 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = 64 << 20  # bytes of each large tensor
SMALL = 240  # small tensors (biases, norms): 1–16 KiB each

BARE = r"""
import hashlib, os, sys, time, threading
path, n = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
step = -(-size // n)
def run(lo, hi, out, i):
    h, buf = hashlib.sha256(), bytearray(4 << 20)
    view = memoryview(buf)
    while lo < hi:
        got = os.preadv(fd, [view[:min(len(buf), hi - lo)]], lo)
        h.update(view[:got]); lo += got
    out[i] = h.digest()
out = [b""] * n
threads = [threading.Thread(target=run, args=(i * step, min((i + 1) * step, size), out, i)) for i in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
print(time.perf_counter() - t0)
"""

DIGESTS = r"""
import sys, time
from ledger._blocked import safetensors_blocked_digests
from ledger._fingerprint import safetensors_digests
read = safetensors_blocked_digests if sys.argv[2:] == ["blocked"] else safetensors_digests
t0 = time.perf_counter()
read(sys.argv[1])
print(time.perf_counter() - t0)
"""

MMAP_REF = r"""
import mmap, sys, time
from ledger._fingerprint import model_digest, read_shards, tensor_digest
t0 = time.perf_counter()
digests = {}
for shard in read_shards(sys.argv[1]):
    with mmap.mmap(shard.fd, 0, access=mmap.ACCESS_READ) as data:
        for name, e in shard.entries.items():
            view = memoryview(data)[shard.start + e.begin:shard.start + e.end]
            digests[name] = tensor_digest(name, e.dtype, e.shape, view)
            view.release()
seconds = time.perf_counter() - t0
assert model_digest(digests).hex() == sys.argv[2], "the memory-mapped reference digests differ"
print(seconds)
"""

KEYGEN = r"""
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
"""


def write_model(path: Path, mib: int) -> None:
    """A safetensors file: float32 tensors of 64 MiB making up ``mib`` MiB, then SMALL small ones,
    filled with random bytes (the hash does not care what the floats are)."""
    tensors: list[tuple[str, int]] = [(f"layers.{i:02d}.weight", BIG) for i in range(max(1, (mib << 20) // BIG))]
    tensors += [(f"layers.{i % 16:02d}.norm{i // 16}.{'bias' if i % 2 else 'weight'}", 1024 << (i % 5))
                for i in range(SMALL)]
    header, offset = {}, 0
    for name, size in tensors:
        header[name] = {"dtype": "F32", "shape": [size // 4], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        block = os.urandom(4 << 20)
        for _, size in tensors:
            for lo in range(0, size, len(block)):
                handle.write(block[:min(len(block), size - lo)])


def write_ledger(tmp: Path, model: Path) -> str:
    """A sealed ledger ``run.ledger`` whose seal's ``final`` holds ``model``'s digests, its key in
    ``pub.pem``; the model digest (hex). Run in a child, so this process stays small (a child's
    peak RSS on Linux includes what its parent held when it forked)."""
    import ledger
    from ledger._crypto import public_key_pem
    from ledger._fingerprint import model_digest, safetensors_digests

    signer = ledger.Signer.from_seed(bytes(32))
    (tmp / "pub.pem").write_bytes(public_key_pem(signer.public.raw))
    digests = safetensors_digests(model)
    writer = ledger.LedgerWriter.create(tmp / "run.ledger", signer, genesis={"config": {}})
    final = {"tensor_digests": digests, "model_digest": model_digest(digests), "file": model.name}
    writer.seal({"final": final, "steps": 0}, step=0)
    return model_digest(digests).hex()


def run_child(argv: list[str]) -> tuple[float, float | None, int, float]:
    """Wall seconds, the seconds the child printed (if it prints one number), peak RSS in bytes,
    CPU seconds (user + system, all its threads)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # reaped here, for its rusage
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode()
    if process.returncode:
        raise SystemExit(f"{argv[:4]} exited {process.returncode}: {errors[-2000:]}")
    try:
        inner: float | None = float(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        inner = None
    return wall, inner, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the large tensors in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--dir", default=None, help="where to write the file (default a temporary folder in /tmp)")
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)  # internal: write the ledger there
    args = parser.parse_args()
    if args.setup:
        print(write_ledger(Path(args.setup), Path(args.setup) / "model" / "model.safetensors"))
        return
    cpus = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="release-fp-", dir=args.dir or "/tmp"))
    try:
        weights = tmp / "model" / "model.safetensors"
        weights.parent.mkdir()
        write_model(weights, args.mib)
        expected = subprocess.run([sys.executable, __file__, "--setup", str(tmp)], check=True, capture_output=True,
                                  text=True).stdout.strip()
        python, bin_dir = sys.executable, Path(sys.executable).parent
        verify = [str(bin_dir / "ledger"), "verify", str(tmp / "run.ledger"), "--key", str(tmp / "pub.pem")]
        cases: dict[str, list[str]] = {
            f"bare-{cpus}": [python, "-c", BARE, str(weights), str(cpus)],
            "bare-1": [python, "-c", BARE, str(weights), "1"],
            "digests": [python, "-c", DIGESTS, str(weights)],
            "blocked": [python, "-c", DIGESTS, str(weights), "blocked"],
            "mmap-ref": [python, "-c", MMAP_REF, str(weights), expected],
            "verify": [*verify, "--model", str(weights)],
            "verify-nomodel": verify,
        }
        if shutil.which("model_signing", path=str(bin_dir)) or shutil.which("model_signing"):
            subprocess.run([python, "-c", KEYGEN, str(tmp / "ms.pem")], check=True)
            exe = shutil.which("model_signing", path=str(bin_dir)) or "model_signing"
            cases["model_signing"] = [exe, "sign", "key", str(weights.parent), "--private_key", str(tmp / "ms.pem"),
                                      "--signature", str(tmp / "model.sig")]
        cases["import-cli"] = [python, "-c", "import ledger._cli, ledger.verify"]
        cases["import-pandas"] = [python, "-c", "import pandas"]
        run_child(cases[f"bare-{cpus}"])  # the page cache holds the file from here on
        results: dict[str, list[tuple[float, float | None, int, float]]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, argv in cases.items():
                results[name].append(run_child(argv))
        size = weights.stat().st_size
        bare = results[f"bare-{cpus}"]
        base = statistics.median(row[0] for row in bare)
        base_inner = statistics.median(row[1] for row in bare if row[1] is not None)
        print(f"{size / (1 << 30):.3f} GiB, {cpus} CPUs, {args.rounds} interleaved rounds, warm page cache")
        print(f"{'process':<15} {'wall s':>8} {'× bare':>7} {'paired':>7} {'cpu s':>6} {'hash s':>8} {'× bare':>7} "
              f"{'peak RSS':>10}")
        for name, rows in results.items():  # paired: the median of each round's ratio to that round's bare-N
            wall = statistics.median(row[0] for row in rows)
            paired = statistics.median(row[0] / b[0] for row, b in zip(rows, bare, strict=True))
            cpu = statistics.median(row[3] for row in rows)
            inners = [row[1] for row in rows if row[1] is not None]
            inner = f"{statistics.median(inners):>8.3f} {statistics.median(inners) / base_inner:>6.2f}×" \
                if inners else f"{'':>8} {'':>7}"
            rss = max(row[2] for row in rows)
            print(f"{name:<15} {wall:>8.3f} {wall / base:>6.2f}× {paired:>6.2f}× {cpu:>6.2f} {inner} "
                  f"{rss / (1 << 20):>7.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
