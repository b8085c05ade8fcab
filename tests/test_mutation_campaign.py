"""The mutation campaign's fast version: sampled cells of a real signed ledger, each mutated and
verified; every mutant must be detected (or, for an unsealed log's last frame, reported as torn)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mutation_campaign.py"


@pytest.mark.slow
def test_sampled_cell_mutations_are_all_detected():
    done = subprocess.run([sys.executable, str(SCRIPT), "--entries", "200", "--cells", "120"],
                          capture_output=True, text=True, timeout=300)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["cases"] >= 170, counts
    assert counts["missed"] == 0 and counts["crashed"] == 0, done.stdout
    assert counts["detected"] >= counts["cases"] - 3, counts
    assert done.returncode == 0
