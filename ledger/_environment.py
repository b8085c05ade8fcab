"""What genesis records about the machine, the code and the model's structure."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


def environment(device: str) -> dict[str, Any]:
    """Python, torch, numpy and BLAS versions, CPU capability, thread count, device."""
    import numpy as np
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device,
        "mkl": bool(torch.backends.mkl.is_available()), "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    config = torch.__config__.show()
    env["blas"] = {key: match.group(1) for key in ("BLAS_INFO", "LAPACK_INFO")
                   if (match := re.search(rf"{key}=([^,\s]+)", config))}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


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


def architecture(model: Any, tensors: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    """Module classes, and names, shapes and dtypes of the fingerprinted tensors."""
    from ledger._fingerprint import safetensors_dtype

    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "modules": [[name, type(module).__name__] for name, module in model.named_modules()],
        "tensors": [{"name": name, "shape": list(t.shape), "dtype": safetensors_dtype(t),
                     "kind": "parameter" if name in params else "buffer"} for name, t in tensors.items()],
        "aliases": aliases,
        "parameters": int(sum(t.numel() for name, t in tensors.items() if name in params)),
    }


def optimizer_groups(optimizer: Any, names_by_id: dict[int, str]) -> list[dict[str, Any]]:
    """Each param group's hyperparameters and the names of its tensors."""
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _plain(v) for k, v in group.items() if k != "params"}
        hyper["tensors"] = [names_by_id.get(id(p), f"<unnamed {i}>") for i, p in enumerate(group["params"])]
        groups.append(hyper)
    return groups


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
