"""What genesis records about the code that ran (the machine and the model: :mod:`ledger.torch`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def code_identity(extra_files: list[Path] | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the working directory (when in a repository) and SHA-256 of
    the running script and of any extra source files (e.g. the recipe)."""
    out: dict[str, Any] = {}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and os.path.isfile(main):
        files.append(Path(main))
    files += [p for p in (extra_files or []) if p.is_file()]
    out["sources"] = {p.name: hashlib.sha256(p.read_bytes()).digest() for p in files}
    return out
