"""The base install (`pip install training-ledger`, no extras) verifies a stored run without torch.

tests/data/stored-run/ is a small recorded run kept in the repository (tests/data/make_stored_run.py
wrote it): checkpoints, a bf16 buffer, sealed final weights. The slow test builds a fresh virtual
environment with the base install only and runs the real `ledger` command there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.verify import verify_ledger

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "data" / "stored-run"
NO_RECIPE_CHECKS = {"chain": "pass", "signatures": "pass", "seal": "pass", "model": "pass", "checkpoints": "pass",
                    "continuity": "pass", "init": "skip", "replay": "skip", "independence": "skip",
                    "mlflow": "skip", "heads": "skip", "timestamps": "skip"}  # heads: a run from before them


def test_stored_run_verifies_here():
    report = verify_ledger(RUN / "ledger", key=RUN / "trainer.pub", model=RUN / "model.safetensors")
    assert {c.name: c.status for c in report.checks} == NO_RECIPE_CHECKS
    assert report.check("continuity").data["checkpoint_intervals_checked"] == 2


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with `pip install <this project>` and nothing else (a copy of the
    sources is installed, so the checkout gets no build files)."""
    tmp = tmp_path_factory.mktemp("base")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("ledger", "hooks", "verify"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "ledger"), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_base_install_has_no_torch_scipy_or_matplotlib(base_venv):
    probe = "import importlib.util as u; print([m for m in ('torch', 'scipy', 'matplotlib') if u.find_spec(m)])"
    out = subprocess.run([str(base_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_base_install_verifies_a_stored_run_with_checkpoints(base_venv, tmp_path):
    common = [str(RUN / "ledger"), "--key", str(RUN / "trainer.pub"), "--model", str(RUN / "model.safetensors")]
    out = run_in(base_venv, "verify", *common, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert {name: c["status"] for name, c in report["checks"].items()} == NO_RECIPE_CHECKS
    assert report["checks"]["continuity"]["checkpoint_intervals_checked"] == 2  # weights read with numpy
    # a check that needs a missing extra is skipped with the exact install line, and fails when required
    foreign = RUN / "model.safetensors"
    out = run_in(base_venv, "verify", *common, "--against", str(foreign), "--json")
    independence = json.loads(out.stdout)["checks"]["independence"]
    assert out.returncode == 0 and independence["status"] == "skip"
    assert "pip install 'training-ledger[lineage]'" in independence["detail"]
    out = run_in(base_venv, "verify", *common, "--against", str(foreign), "--require", "independence")
    assert out.returncode == 1 and "required, but skip" in out.stdout
    # the report and lineage commands say which extra they need, in one line, exit 2
    out = run_in(base_venv, "verify", *common, "--report", str(tmp_path / "r.html"))
    assert out.returncode == 2 and "pip install 'training-ledger[report]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.html").exists()
    out = run_in(base_venv, "compare", str(foreign), str(foreign))
    assert out.returncode == 2 and "pip install 'training-ledger[lineage]'" in out.stderr
    # init and replay need torch: skipped with the install line (the recipe is not imported), failing if required
    recipe = f"{ROOT / 'examples' / 'charlm.py'}:recipe"
    out = run_in(base_venv, "verify", *common, "--recipe", recipe, "--json")
    checks = json.loads(out.stdout)["checks"]
    assert out.returncode == 0 and checks["init"]["status"] == checks["replay"]["status"] == "skip", out.stderr
    assert "pip install 'training-ledger[torch]'" in checks["init"]["detail"]
    out = run_in(base_venv, "verify", *common, "--recipe", recipe, "--require", "init")
    assert out.returncode == 1
