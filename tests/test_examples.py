"""The examples run end to end as users run them (real training, real CLI verdicts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script, steps", [("charlm.py", 12), ("manual_loop.py", 12), ("hf_trainer.py", 8),
                                           ("lightning_fit.py", 6)])
def test_example_trains_records_and_verifies(tmp_path, script, steps):
    args = [sys.executable, str(EXAMPLES / script), "--out", str(tmp_path / "out"), "--steps", str(steps)]
    if script == "charlm.py":
        args += ["--checkpoint-every", "5"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    expected = ("PASS: chain, signatures, seal, heads, model, checkpoints, init, continuity and replay hold"
                if script == "charlm.py" else
                "PASS: chain, signatures, seal, heads, model, checkpoints and continuity hold")
    assert last.startswith(expected), out.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_distributed_example(tmp_path):
    """examples/distributed.py: 2 DDP processes, one ledger, verified with every check it can run."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "distributed.py"), "--out", str(tmp_path / "out"),
                          "--steps", "26"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith(
        "PASS: chain, signatures, seal, heads, model, checkpoints and continuity hold"), out.stdout
