"""Benchmark of `ledger publish` and `ledger verify DIR` (release bundles, docs/PUBLISHING.md).

1. The example run: examples/charlm.py's ``recipe`` recorded with ``ledger.hooks.train`` (signed,
   checkpointed, sealed), then published with a P-256 release key and the bundle verified with the
   trainer's and the release key — next to ``verify_ledger`` on the ledger alone.
2. A large model (``--model-gib``, 1 GiB by default): a safetensors file of float32 tensors of 64 MiB,
   sealed in a ledger written with ``LedgerWriter`` (the seal's final digests are the file's), then
   ``ledger publish`` of it beside ``model_signing sign key`` of the same file (the reference OMS CLI,
   as a subprocess), and the bundle verify beside ``model_signing verify key``. Every timing is the
   best of ``--repeat`` runs with the file in the page cache (the first touch warms it).

    python benchmarks/publish.py                      # ~2 min on 2 cores
    python benchmarks/publish.py --model-gib 0.25 --repeat 1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ledger
from ledger._crypto import load_release_signer
from ledger._fingerprint import model_digest, safetensors_digests
from ledger._publish import publish
from ledger.verify import verify_ledger
from ledger.verify._bundle import verify_bundle

ROOT = Path(__file__).resolve().parent.parent
SIGNER = ledger.Signer.from_seed(bytes(32))
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def best(repeat: int, fn: Callable[[int], Any]) -> float:
    """The fastest of ``repeat`` calls ``fn(i)`` (wall seconds)."""
    times = []
    for i in range(repeat):
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    return min(times)


def keys(tmp: Path) -> tuple[Path, Path, Path]:
    """A P-256 release key pair and the trainer's public key on disk."""
    private, public = ledger.generate_keypair(tmp / "keys" / "release", key_type="p256")
    trainer = tmp / "keys" / "trainer.pub"
    trainer.write_bytes(ledger._crypto.public_key_pem(SIGNER.public.raw))
    return private, public, trainer


def example_run(tmp: Path, steps: int, repeat: int) -> list[tuple[str, float]]:
    """Record the charlm example, publish it, verify the bundle and the ledger alone."""
    sys.path.insert(0, str(ROOT / "examples"))
    from charlm import recipe  # type: ignore[import-not-found]

    from ledger.hooks import train

    private, public, trainer = keys(tmp)
    started = time.perf_counter()
    train(recipe, steps=steps, path=tmp / "L", key=SIGNER, seed=0, checkpoint_every=max(1, steps // 3),
          final_weights=tmp / "final" / "model.safetensors")
    trained = time.perf_counter() - started
    signer = load_release_signer(private)
    rows = [(f"recorded training ({steps} steps)", trained)]
    rows.append(("`ledger publish` (P-256: attestations and model.sig)", best(repeat, lambda i: publish(
        tmp / "L", tmp / "final" / "model.safetensors", tmp / f"bundle{i}", signer, release_key_path=private))))
    rows.append(("`ledger verify DIR --key --release-key` (bundle checks + usual checks)", best(repeat, lambda i: (
        verify_bundle(tmp / f"bundle{i}", key=trainer, release_key=public, replay=0).raise_if_failed()))))
    rows.append(("`ledger verify LEDGER --key --model` (the ledger alone)", best(repeat, lambda i: verify_ledger(
        tmp / "L", key=SIGNER.public, model=tmp / "final" / "model.safetensors", replay=0).raise_if_failed())))
    return rows


def big_model(tmp: Path, gib: float) -> Path:
    """A safetensors file of ~``gib`` GiB (float32 tensors of 64 MiB) and a ledger sealing it."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    count = max(1, round(gib * 16))
    tensors = {f"layers.{i}.weight": rng.standard_normal((4096, 4096), dtype=np.float32) for i in range(count)}
    (tmp / "big").mkdir()
    save_file(tensors, str(tmp / "big" / "model.safetensors"))
    del tensors
    digests = safetensors_digests(tmp / "big" / "model.safetensors")
    writer = ledger.LedgerWriter.create(tmp / "BL", SIGNER, genesis={"config": {"what": "1 GiB benchmark"}})
    writer.append("step", 0, {"metrics": {"loss": 1.0}})
    writer.seal({"final": {"tensor_digests": digests, "model_digest": model_digest(digests)}})
    return tmp / "big" / "model.safetensors"


def large(tmp: Path, gib: float, repeat: int) -> list[tuple[str, float]]:
    """``ledger publish`` beside ``model_signing sign key`` of the same file, and both verifiers."""
    private, public, trainer = keys(tmp / "k")
    weights = big_model(tmp, gib)
    size = weights.stat().st_size / (1 << 30)
    signer = load_release_signer(private)
    oms_dir = tmp / "oms"
    oms_dir.mkdir()
    shutil.copy(weights, oms_dir / "model.safetensors")

    def oms_sign(i: int) -> None:
        subprocess.run([str(MODEL_SIGNING), "sign", "key", "--private_key", str(private), "--signature",
                        str(tmp / f"oms{i}.sig"), str(oms_dir)], check=True, capture_output=True)

    def oms_verify(i: int) -> None:
        subprocess.run([str(MODEL_SIGNING), "verify", "key", "--signature", str(tmp / "oms0.sig"), "--public_key",
                        str(public), str(oms_dir)], check=True, capture_output=True)

    rows = [(f"`model_signing sign key` of the {size:.2f} GiB file (subprocess)", best(repeat, oms_sign))]
    rows.append((f"`ledger publish` of the same {size:.2f} GiB (copy + SHA-256, tensor digests vs seal, ledger "
                 "verify, attestations, model.sig)", best(repeat, lambda i: publish(
                     tmp / "BL", weights, tmp / f"bundle{i}", signer, release_key_path=private))))
    rows.append(("`model_signing verify key` (subprocess)", best(repeat, oms_verify)))
    rows.append(("`ledger verify DIR --key --release-key` (subjects, OMS, model, …)", best(repeat, lambda i: (
        verify_bundle(tmp / f"bundle{i}", key=trainer, release_key=public, replay=0).raise_if_failed()))))
    rows.append(("… tensor digests of the file alone (`safetensors_digests`)", best(repeat, lambda i: (
        safetensors_digests(weights)))))
    return rows


def main() -> None:
    """Run both parts and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--model-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as scratch:
        tmp = Path(scratch)
        (tmp / "example").mkdir()
        (tmp / "large").mkdir()
        for title, rows in (("example run (charlm)", example_run(tmp / "example", args.steps, args.repeat)),
                            (f"{args.model_gib} GiB model", large(tmp / "large", args.model_gib, args.repeat))):
            print(f"\n### {title}\n\n| what | seconds |\n|---|---|")
            for name, seconds in rows:
                print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
