"""The checkpoint format: a full training state in files that load without unpickling.

A checkpoint is a directory named by its state digest (docs/FORMAT.md §11):

- ``model.safetensors``: the model's canonical tensors (tied weights once);
- ``optimizer.safetensors``: every tensor of the optimizer state, named ``state/<param index>/<key>``;
- ``state.cbor``: deterministic CBOR with the step, the optimizer's param groups and non-tensor
  state, the scheduler's state and the RNG states (torch CPU/CUDA, python, numpy).

``state digest = SHA-256(domain ‖ model digest ‖ optimizer-tensors digest ‖ SHA-256(state.cbor))``.
torch is imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ledger._encoding import decode_body, encode_body
from ledger._fingerprint import canonical_state, model_digest, safetensors_digests, torch_digests
from ledger._parts import fsync_path
from ledger.errors import ConfigurationError, FormatError

STATE_DOMAIN = b"training-ledger/state/v1\x00"
FILES = ("model.safetensors", "optimizer.safetensors", "state.cbor")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A training state copied off the live objects (CPU tensors), ready to be written."""

    step: int
    model: dict[str, Any]
    aliases: dict[str, str]
    optimizer_tensors: dict[str, Any]
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StateDigests:
    """Digests of a written (or re-read) checkpoint."""

    model: dict[str, bytes]
    model_digest: bytes
    optimizer_digest: bytes
    meta_digest: bytes
    state_digest: bytes

    def entry_body(self) -> dict[str, Any]:
        """The fields a checkpoint entry carries."""
        return {"tensor_digests": dict(self.model), "model_digest": self.model_digest,
                "optimizer_digest": self.optimizer_digest, "meta_digest": self.meta_digest,
                "state_digest": self.state_digest}


def _plain(value: Any) -> Any:
    """Tensors → lists/numbers for CBOR; containers recursively; tuples → lists."""
    if hasattr(value, "detach"):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), python and numpy."""
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state().numpy().tobytes(),
             "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
             "numpy": {"name": np_name, "keys": np.asarray(np_keys, dtype=np.uint32), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import torch

    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]])


def snapshot(step: int, model: Any, optimizer: Any, scheduler: Any = None) -> Snapshot:
    """Copy the full training state to CPU tensors and plain values (on the calling thread)."""
    tensors, aliases = canonical_state(model)
    model_copy = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    opt_state = optimizer.state_dict()
    opt_tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            if hasattr(value, "detach"):
                opt_tensors[f"state/{index}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{index}/{key}"] = _plain(value)
    meta = {"step": step, "param_groups": _plain(opt_state["param_groups"]), "optimizer_scalars": scalars,
            "optimizer_class": type(optimizer).__name__, "aliases": aliases,
            "scheduler": _plain(scheduler.state_dict()) if scheduler is not None else None, "rng": rng_state()}
    return Snapshot(step, model_copy, aliases, opt_tensors, meta)


def _state_digest(model_d: bytes, optimizer_d: bytes, meta_d: bytes) -> bytes:
    return hashlib.sha256(STATE_DOMAIN + model_d + optimizer_d + meta_d).digest()


def snapshot_digests(snap: Snapshot, meta: bytes | None = None) -> StateDigests:
    """The digests a snapshot's checkpoint files will have (``meta``: its encoded state.cbor)."""
    model_d = torch_digests(snap.model)
    md, od = model_digest(model_d), model_digest(torch_digests(snap.optimizer_tensors))
    meta_d = hashlib.sha256(encode_body(snap.meta) if meta is None else meta).digest()
    return StateDigests(model_d, md, od, meta_d, _state_digest(md, od, meta_d))


def write(snap: Snapshot, root: Path) -> tuple[Path, StateDigests]:
    """Write a snapshot durably under ``root/<state digest>/`` and return its digests.

    The files are written to a temporary directory, fsynced and renamed into place, so a
    checkpoint directory either is complete or does not exist."""
    from safetensors.torch import save_file

    meta = encode_body(snap.meta)
    digests = snapshot_digests(snap, meta)
    final = root / digests.state_digest.hex()
    if final.is_dir():
        return final, digests  # content-addressed: the same state is already there
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{digests.state_digest.hex()[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(snap.model, str(tmp / FILES[0]))
    save_file(snap.optimizer_tensors, str(tmp / FILES[1]))
    (tmp / FILES[2]).write_bytes(meta)
    for name in FILES:
        fsync_path(tmp / name)
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(root)
    return final, digests


def digests_of(directory: Path) -> StateDigests:
    """Recompute the digests of a checkpoint directory from its files."""
    for name in FILES:
        if not (directory / name).is_file():
            raise FormatError(f"checkpoint {directory.name} lacks {name}")
    model_d = safetensors_digests(directory / FILES[0])
    opt_d = safetensors_digests(directory / FILES[1])
    meta_d = hashlib.sha256((directory / FILES[2]).read_bytes()).digest()
    md, od = model_digest(model_d), model_digest(opt_d)
    return StateDigests(model_d, md, od, meta_d, _state_digest(md, od, meta_d))


def restore_weights_only(directory: Path) -> dict[str, Any]:
    """The model tensors of a checkpoint (CPU, via safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(directory / FILES[0]))


def optimizer_tensors(directory: Path) -> dict[str, Any]:
    """The optimizer-state tensors of a checkpoint (CPU, via safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(directory / FILES[1]))


def read_meta(directory: Path) -> dict[str, Any]:
    """The decoded ``state.cbor`` of a checkpoint."""
    return decode_body((directory / FILES[2]).read_bytes())


def restore(directory: Path, model: Any, optimizer: Any = None, scheduler: Any = None, *,
            rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into live objects (safetensors and CBOR only; nothing is unpickled).
    Returns the decoded metadata."""
    import torch
    from safetensors.torch import load_file

    meta = read_meta(directory)
    weights = load_file(str(directory / FILES[0]))
    for alias, kept in dict(meta.get("aliases", {})).items():
        weights[alias] = weights[kept]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if optimizer is not None:
        tensors = load_file(str(directory / FILES[1]))
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
        for key, value in dict(meta["optimizer_scalars"]).items():
            index, name = key.split("/", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [dict(g) for g in meta["param_groups"]]
        for group in groups:
            for name in ("betas",):
                if isinstance(group.get(name), list):
                    group[name] = tuple(group[name])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(dict(meta["scheduler"]))
    if rng:
        set_rng_state(meta["rng"])
    del torch
    return meta
