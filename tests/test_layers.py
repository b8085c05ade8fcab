"""One-way dependencies: ``ledger`` imports without torch; ``ledger.verify`` never imports hooks."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_ledger_and_verify_import_without_torch_scipy_matplotlib_or_pandas():
    loaded = _modules_after("import ledger, ledger.format, ledger.verify, ledger.verify.report, ledger._cli")
    assert {"torch", "scipy", "matplotlib", "pandas"}.isdisjoint(loaded)
    assert "ledger.hooks" not in loaded and "ledger.torch" not in loaded


def test_only_the_torch_adapter_imports_torch_in_ledger():
    """The format modules never import torch, not even inside a function: the torch adapter does —
    ledger/torch.py, and ledger/_device.py (where its measurements run), which only it imports."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "ledger"
    importing = sorted(p.name for p in root.glob("*.py")
                       if re.search(r"^\s*(import torch|from torch[ .])", p.read_text(), re.M))
    assert importing == ["_device.py", "torch.py"]
    device_users = sorted(p.name for p in root.glob("*.py") if re.search(r"ledger\._device|from ledger import _device",
                                                                          p.read_text()))
    assert device_users == ["torch.py"]
    adapter_users = sorted(p.name for p in root.glob("*.py")
                           if re.search(r"^\s*(from ledger\.torch |from ledger import torch|import ledger\.torch)",
                                        p.read_text(), re.M))
    assert adapter_users == []  # the format modules import nothing from the adapter


def test_only_one_module_touches_cryptography_hazmat_and_pyarrow_writers():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("ledger", "hooks", "verify") for p in (root / d).rglob("*.py")]
    hazmat = sorted(p.name for p in sources if "cryptography.hazmat" in p.read_text())
    writers = sorted(p.name for p in sources if "write_table" in p.read_text() or "ParquetWriter" in p.read_text())
    assert hazmat == ["_crypto.py"]
    assert writers == ["_parts.py"]


def test_public_surface_is_declared():
    import ledger
    import ledger.verify

    assert all(hasattr(ledger, name) for name in ledger.__all__)
    assert all(not name.startswith("_") or name == "__version__" for name in ledger.__all__)
    assert all(hasattr(ledger.verify, name) for name in ledger.verify.__all__)
