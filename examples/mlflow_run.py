"""The character transformer recorded with its ledger mirrored into MLflow, then verified from the run.

Start a tracking server first (any will do; this one keeps everything under ./mlruns-server)::

    mlflow server --backend-store-uri sqlite:///mlruns-server/mlflow.db \\
        --default-artifact-root mlruns-server/artifacts --host 127.0.0.1 --port 5000

then ``python examples/mlflow_run.py --tracking-uri http://127.0.0.1:5000 --out mlflow-out`` trains
inside an MLflow run (``mlflow=True`` attaches the recorder to the active run), seals the ledger,
and verifies the ledger the run published with ``ledger verify --mlflow-run RUN_ID``. Open
http://127.0.0.1:5000 to see the run: every step's metrics, the config as params, the ``ledger.*``
tags and the ``ledger/`` artifacts (a complete ledger).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)
from torch.nn import functional as F

import ledger
from ledger.hooks import Recorder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    parser.add_argument("--out", type=Path, default=Path("mlflow-out"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fresh_output(args.out)
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    data, _ = ledger.load_recipe(f"{Path(__file__).with_name('charlm.py')}:recipe")

    model = data.build_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mlflow.set_experiment("training-ledger")
    with mlflow.start_run(run_name="charlm") as run:
        rec = Recorder(args.out / "ledger", model=model, optimizer=optimizer, key=private_key, seed=args.seed,
                       checkpoint_every=50, config={"lr": 3e-3, "steps": args.steps}, mlflow=True)
        for step in range(args.steps):
            x, y = data.batch(step)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss=loss, batch=(x, y))  # mirrored by a background thread, never waited for
        rec.close(final_weights=args.out / "model.safetensors")  # waits (bounded) for the mirror
    mirror = ledger.open(args.out / "ledger").last_entry().body().get("mirror", {})
    print(f"MLflow run {run.info.run_id}: mirrored through seq {mirror.get('mirrored_through_seq')}"
          f"{' (incomplete: run `ledger mlflow sync` later)' if mirror.get('missing') else ''}")
    command = [sys.executable, "-m", "ledger", "verify", "--mlflow-run", run.info.run_id,
               "--tracking-uri", mlflow.get_tracking_uri(), "--key", str(public_key)]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
