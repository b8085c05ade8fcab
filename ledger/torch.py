"""The torch adapter: everything in ``ledger`` that needs PyTorch, in one module.

It imports torch at its top, so ``import ledger.torch`` needs the ``torch`` extra
(``pip install 'training-ledger[torch]'``); the format modules never import it. What lives here:
fingerprints of live tensors (digests, the count-sketch on any device, batch digests), the training
state of a checkpoint (snapshot, write, restore, RNG states), what genesis records about the
machine and the model, and the functions that run step ``s`` of a recipe (:func:`run_step`,
:func:`continue_step`).
The byte-level definitions are in docs/FORMAT.md §10–§11 and in the torch-free modules
(``ledger._fingerprint``, ``ledger._state``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import random
import re
import shutil
import stat
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ledger._encoding import encode_body
from ledger._fingerprint import (
    _CHUNK,
    BATCH_DOMAIN,
    SKETCH_K,
    TORCH_TO_SAFETENSORS,
    check_sketch_k,
    sketch_hash,
    tensor_digest,
)
from ledger._parts import fsync_path
from ledger._recipe import step_seed
from ledger._state import FILES, StateDigests, read_meta, state_digest
from ledger.errors import ConfigurationError, FormatError

# ----------------------------------------------------------------------------- tensor fingerprints


def canonical_state(model_or_state: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a model is fingerprinted by: its ``state_dict`` (parameters and persistent
    buffers), tied weights kept once under the lexicographically first name as
    ``safetensors.torch.save_model`` keeps them. Returns (tensors, aliases: dropped → kept)."""
    from safetensors.torch import _remove_duplicate_names

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else dict(model_or_state)
    state = {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}
    aliases: dict[str, str] = {}
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            aliases[name] = kept
            del state[name]
    return state, aliases


def safetensors_dtype(tensor: torch.Tensor) -> str:
    """The safetensors dtype string of a torch tensor."""
    name = str(tensor.dtype).removeprefix("torch.")
    try:
        return TORCH_TO_SAFETENSORS[name]
    except KeyError:
        raise ConfigurationError(f"tensors of dtype {name} cannot be fingerprinted") from None


@functools.cache
def _numpy_safe_dtypes() -> frozenset[torch.dtype]:
    return frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                      torch.uint8})


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian contiguous bytes of a tensor, on the CPU (a copy; never touches the live tensor)."""
    if _zero_copy(tensor):  # memoryview cannot cast a (0, n) array: an empty tensor takes the path below
        return tensor.detach().numpy().data.cast("B")  # zero-copy fast path (no torch ops)
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    if sys.byteorder != "little" and flat.element_size() > 1:
        raw = flat.numpy().byteswap().view(np.uint8)
    return raw.data


def torch_digests(tensors: Mapping[str, torch.Tensor], scheme: str = "tensor/v1", *,
                  workers: int = 1) -> dict[str, bytes]:
    """Tensor digests of named torch tensors (copied to the CPU one at a time), in the digest scheme
    a genesis states (``tensor/v1``, or ``tensor-blocked/v1``: docs/FORMAT.md §10.1). ``workers`` > 1
    hashes the CPU tensors whose bytes need no copy in that many threads (largest first; hashlib
    releases the GIL), so memory stays one copied tensor whatever the thread count."""
    from ledger._blocked import digest_function

    digest = digest_function(scheme)

    def one(name: str) -> bytes:
        t = tensors[name]
        return digest(name, safetensors_dtype(t), tuple(t.shape), tensor_bytes(t))

    shared = [n for n, t in tensors.items() if _zero_copy(t)] if workers > 1 and scheme == "tensor/v1" else []
    out: dict[str, bytes] = {}
    if len(shared) > 1:
        from concurrent.futures import ThreadPoolExecutor

        shared.sort(key=lambda n: -tensors[n].nbytes)
        with ThreadPoolExecutor(min(workers, len(shared)), thread_name_prefix="ledger-hash") as pool:
            out.update(zip(shared, pool.map(one, shared), strict=True))
    out.update((name, one(name)) for name in tensors if name not in out)
    return {name: out[name] for name in tensors}


def _zero_copy(tensor: torch.Tensor) -> bool:
    """Whether :func:`tensor_bytes` reads the tensor's own CPU memory (no copy)."""
    return tensor.device.type == "cpu" and tensor.dtype in _numpy_safe_dtypes() and tensor.is_contiguous() \
        and sys.byteorder == "little" and bool(tensor.numel())


def batch_digest(batch: Any) -> bytes:
    """Digest of a batch: its leaves in pytree order (tensors digested like weights under their
    leaf index, other leaves as deterministic CBOR), then the list of leaf digests."""
    from torch.utils._pytree import tree_flatten

    leaves, _ = tree_flatten(batch)
    h = hashlib.sha256(BATCH_DOMAIN + len(leaves).to_bytes(8, "big"))
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            h.update(tensor_digest(str(index), safetensors_dtype(leaf), tuple(leaf.shape), tensor_bytes(leaf)))
        else:
            h.update(hashlib.sha256(encode_body({"leaf": leaf})).digest())
    return h.digest()


# ----------------------------------------------------------------------------- count-sketch on any device
def sketch_slots(seed: int, name: str, start: int, stop: int, k: int, device: Any) -> torch.Tensor:
    """Slot of each coordinate in [start, stop) of tensor ``name`` (int64 on ``device``): bucket b
    with sign + is slot b, with sign − slot k + b (docs/FORMAT.md §10)."""
    return cast(torch.Tensor, sketch_hash(torch.arange(start, stop, dtype=torch.int64, device=device), seed, name, k))


def _acc_dtype(flat: torch.Tensor) -> torch.dtype:
    return torch.float32 if flat.device.type == "mps" else torch.float64


def _slot_dtype(k: int) -> torch.dtype:
    return torch.int16 if 2 * k <= 32767 else torch.int32


def _scatter(slots: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``values`` into ``size`` slots in the accumulation dtype. On the CPU ``bincount``
    (deterministic); elsewhere ``index_add_``, whose summation order may vary (within the stated
    tolerance), so deterministic-algorithms mode is lifted for this one call."""
    dtype = _acc_dtype(values)
    if values.device.type == "cpu":
        return torch.bincount(slots, weights=values.to(dtype), minlength=size)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        return torch.zeros(size, dtype=dtype, device=values.device).index_add_(0, slots.long(), values.to(dtype))
    finally:
        torch.use_deterministic_algorithms(was)


class CountSketch:
    """A seeded count-sketch with k buckets on torch tensors (any device): bucket and sign of each
    coordinate come from an integer hash of (seed, tensor name, index), so the sketch is the same on
    any device up to floating-point summation order, and equals ``ledger._weights.NumpySketch`` on
    the same values. Distances between sketches estimate L2 distances (relative error about 1/√k).

    ``cache_limit`` (elements): below it the slots are computed once and kept (2 bytes per
    coordinate for k ≤ 16383, on the tensors' device); above it they are recomputed in chunks at
    each call.
    """

    def __init__(self, seed: int, k: int = SKETCH_K, cache_limit: int = 1 << 25) -> None:
        check_sketch_k(k)
        self.seed, self.k, self.cache_limit = seed, k, cache_limit
        self._cache: dict[tuple[str, int, str], Any] = {}  # slots per tensor (a list while being built)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The sketch (float64, k values) of the named tensors, summed over tensors."""
        total: torch.Tensor | None = None
        cache_ok = sum(t.numel() for t in tensors.values()) <= self.cache_limit
        with torch.no_grad():
            for name, tensor in tensors.items():
                flat = tensor.detach().reshape(-1)
                n = flat.numel()
                if n == 0:
                    continue
                key = (name, n, str(flat.device))
                slots = self._cache.get(key) if cache_ok else None
                if slots is None:
                    acc = torch.zeros(2 * self.k, dtype=_acc_dtype(flat), device=flat.device)
                    for lo in range(0, n, _CHUNK):
                        hi = min(lo + _CHUNK, n)
                        chunk_slots = sketch_slots(self.seed, name, lo, hi, self.k, flat.device)
                        acc += _scatter(chunk_slots, flat[lo:hi], 2 * self.k)
                        if cache_ok:
                            self._cache.setdefault(key, []).append(chunk_slots.to(_slot_dtype(self.k)))
                    if cache_ok:
                        self._cache[key] = torch.cat(self._cache[key])
                else:
                    acc = _scatter(slots, flat, 2 * self.k)
                signed = acc[: self.k] - acc[self.k:]
                total = signed if total is None else total + signed.to(total.device)
        if total is None:
            return np.zeros(self.k)
        return total.double().cpu().numpy()


# ----------------------------------------------------------------------------- training state (checkpoints)
@dataclass(frozen=True, slots=True)
class Snapshot:
    """A training state copied off the live objects (CPU tensors), ready to be written."""

    step: int
    model: dict[str, torch.Tensor]
    aliases: dict[str, str]
    optimizer_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _plain(value: Any) -> Any:
    """Tensors → lists/numbers for CBOR; containers recursively; tuples → lists (values must
    round-trip into a checkpoint, unlike genesis's :func:`_describe`)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), python and numpy."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": np.asarray(np_keys, dtype=np.uint32), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]])


def optimizers_of(optimizer: Any) -> list[Any]:
    """One optimizer, or each of a list or tuple of them, framework wrappers unwrapped
    (:func:`unwrap_optimizer`). Schedulers pass through unchanged."""
    return [unwrap_optimizer(o) for o in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer])]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper: an object that passes for a
    ``torch.optim.Optimizer`` (``isinstance`` holds) without being an initialised one (it has no
    step-hook registry of its own) and wraps one in ``optimizer`` (accelerate's
    ``AcceleratedOptimizer``) or ``_optimizer`` (Lightning's ``LightningOptimizer``). Their ``step``
    calls the wrapped optimizer's, whose step hooks the recorder registers. Anything else as is."""
    for _ in range(8):  # wrappers of wrappers, bounded
        if not isinstance(optimizer, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" in vars(optimizer):
            return optimizer
        inner = vars(optimizer).get("_optimizer", vars(optimizer).get("optimizer"))
        if not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner
    return optimizer


def snapshot(step: int, model: Any, optimizer: Any, scheduler: Any = None) -> Snapshot:
    """Copy the full training state to CPU tensors and plain values (on the calling thread).
    ``optimizer`` (and ``scheduler``) may be a list: with several optimizers, state tensors are named
    ``state/<k>.<param index>/<key>`` for the k-th, and ``param_groups`` holds all their groups in
    order, ``optimizer_groups`` how many each has (docs/FORMAT.md §11)."""
    tensors, aliases = canonical_state(model)
    model_copy = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    optimizers = optimizers_of(optimizer)
    several = len(optimizers) > 1
    opt_tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    groups: list[Any] = []
    for k, opt in enumerate(optimizers):
        opt_state = opt.state_dict()
        for index, values in opt_state["state"].items():
            where = f"{k}.{index}" if several else f"{index}"
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"state/{where}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars[f"{where}/{key}"] = _plain(value)
        groups += _plain(opt_state["param_groups"])
    meta: dict[str, Any] = {
        "step": step, "param_groups": groups, "optimizer_scalars": scalars,
        "optimizer_class": type(optimizers[0]).__name__, "aliases": aliases,
        "scheduler": None if scheduler is None else [_plain(s.state_dict()) for s in scheduler]
        if isinstance(scheduler, (list, tuple)) else _plain(scheduler.state_dict()), "rng": rng_state()}
    if several:
        meta["optimizer_groups"] = [len(opt.param_groups) for opt in optimizers]
        meta["optimizer_classes"] = [type(opt).__name__ for opt in optimizers]
    return Snapshot(step, model_copy, aliases, opt_tensors, meta)


def snapshot_digests(snap: Snapshot, meta: bytes | None = None) -> StateDigests:
    """The digests a snapshot's checkpoint files will have (``meta``: its encoded state.cbor)."""
    from ledger._fingerprint import model_digest

    model_d = torch_digests(snap.model)
    md, od = model_digest(model_d), model_digest(torch_digests(snap.optimizer_tensors))
    meta_d = hashlib.sha256(encode_body(snap.meta) if meta is None else meta).digest()
    return StateDigests(model_d, md, od, meta_d, state_digest(md, od, meta_d))


TEMPORARY = re.compile(r"^\.tmp-(?:([0-9a-f]{8})-)?([0-9a-f]{16})-([0-9]+)$")
_writing: set[str] = set()  # temporary directories a thread of this process is writing now
_writing_lock = threading.Lock()


def temporary_name(digest: bytes, tag: str = "") -> str:
    """The temporary directory a checkpoint is written in before its rename:
    ``.tmp-[<tag>-]<first 16 hex of the state digest>-<pid>`` (``tag``: 8 hex digits naming the run, so
    a clean-up in a checkpoint root shared by several runs removes only its own; :data:`TEMPORARY`)."""
    if tag and not re.fullmatch(r"[0-9a-f]{8}", tag):
        raise ConfigurationError(f"a checkpoint's temporary tag is 8 hex digits, not {tag!r}")
    return f".tmp-{tag + '-' if tag else ''}{digest.hex()[:16]}-{os.getpid()}"


def being_written(path: Path) -> bool:
    """True while a thread of this process writes the temporary checkpoint directory ``path``."""
    with _writing_lock:
        return str(Path(path).absolute()) in _writing


def place_checkpoint(snap: Snapshot, root: Path, *, tag: str = "") -> tuple[Path, StateDigests, bool]:
    """Write a snapshot durably under ``root/<state digest>/``; return the directory, its digests and
    whether this call created it (False: a real directory of that name was already there — the same
    state, content-addressed — and is used as it is).

    The files are written to a temporary directory (:func:`temporary_name`), fsynced and renamed into
    place, so a checkpoint directory either is complete or does not exist; on failure the temporary
    directory is removed. A ``<hex>`` name that exists as anything but a real directory (a symlink, a
    file) is refused (:class:`FormatError`), never used or replaced."""
    from safetensors.torch import save_file

    meta = encode_body(snap.meta)
    digests = snapshot_digests(snap, meta)
    final = root / digests.state_digest.hex()
    if _existing(final):
        return final, digests, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / temporary_name(digests.state_digest, tag)
    key = str(tmp.absolute())
    with _writing_lock:
        _writing.add(key)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover of the same state
        tmp.mkdir()
        save_file(snap.model, str(tmp / FILES[0]))
        save_file(snap.optimizer_tensors, str(tmp / FILES[1]))
        (tmp / FILES[2]).write_bytes(meta)
        for name in FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _existing(final):  # another run wrote the same state meanwhile: use it
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, digests, False
    except BaseException:
        if not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _writing_lock:
            _writing.discard(key)
    fsync_path(root)
    return final, digests, True


def _existing(final: Path) -> bool:
    """True when ``final`` is a real directory (lstat), False when absent; refuses anything else."""
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        return True
    raise FormatError(f"{final} exists but is not a directory (a symlink or a file); refusing to use or replace it")


def write_checkpoint(snap: Snapshot, root: Path, *, tag: str = "") -> tuple[Path, StateDigests]:
    """Write a snapshot durably under ``root/<state digest>/`` and return its digests
    (:func:`place_checkpoint`, which also says whether the directory was created)."""
    directory, digests, _ = place_checkpoint(snap, root, tag=tag)
    return directory, digests


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU; nothing unpickled)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def restore(directory: Path, model: Any, optimizer: Any = None, scheduler: Any = None, *,
            rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into live objects (safetensors and CBOR only; nothing is unpickled).
    Returns the decoded metadata."""
    meta = read_meta(directory)
    weights = load_tensors(directory / FILES[0])
    for alias, kept in dict(meta.get("aliases", {})).items():
        weights[alias] = weights[kept]
    current = model.state_dict()
    differ = [f"{name} {tuple(weights[name].shape)} vs {tuple(current[name].shape)}" for name in current
              if name in weights and tuple(weights[name].shape) != tuple(current[name].shape)]
    if differ:
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model: tensor shapes differ "
                                 f"({', '.join(differ[:3])}, checkpoint vs model); build the model the run recorded")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a dtype or size torch refuses: the model is not the recorded one
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model: "
                                 f"{str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if optimizer is not None:
        optimizers = optimizers_of(optimizer)
        counts = list(meta.get("optimizer_groups", [len(meta["param_groups"])]))
        if len(counts) != len(optimizers):
            raise ConfigurationError(f"checkpoint {directory.name} holds {len(counts)} optimizer(s), "
                                     f"{len(optimizers)} given")
        states: list[dict[int, dict[str, Any]]] = [{} for _ in optimizers]
        entries = [*load_tensors(directory / FILES[1]).items(), *dict(meta["optimizer_scalars"]).items()]
        for key, value in entries:
            where, name = key.removeprefix("state/").split("/", 1)
            k, _, index = where.rpartition(".")
            states[int(k) if k else 0].setdefault(int(index), {})[name] = value
        groups = [dict(g) for g in meta["param_groups"]]
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        start = 0
        for opt, state, count in zip(optimizers, states, counts, strict=True):
            try:
                opt.load_state_dict({"state": state, "param_groups": groups[start:start + count]})
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigurationError(f"checkpoint {directory.name}'s optimizer state does not fit this "
                                         f"optimizer ({str(exc).splitlines()[0]}); build the optimizer the run "
                                         "recorded") from exc
            start += count
    if scheduler is not None and meta.get("scheduler") is not None:
        saved = meta["scheduler"]
        for sched, sched_state in zip(optimizers_of(scheduler), saved if isinstance(saved, list) else [saved],
                                      strict=True):
            sched.load_state_dict(dict(sched_state))
    if rng:
        set_rng_state(meta["rng"])
    return meta


# ----------------------------------------------------------------------------- what genesis records
def environment(device: str) -> dict[str, Any]:
    """Python, torch, numpy and BLAS versions, CPU capability, thread count, device."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device,
        "mkl": bool(torch.backends.mkl.is_available()),  # type: ignore[no-untyped-call]
        "mkldnn": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    config = torch.__config__.show()
    env["blas"] = {key: match.group(1) for key in ("BLAS_INFO", "LAPACK_INFO")
                   if (match := re.search(rf"{key}=([^,\s]+)", config))}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


def architecture(model: Any, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Module classes, and names, shapes and dtypes of the fingerprinted tensors."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "modules": [[name, type(module).__name__] for name, module in model.named_modules()],
        "tensors": [{"name": name, "shape": list(t.shape), "dtype": safetensors_dtype(t),
                     "kind": "parameter" if name in params else "buffer"} for name, t in tensors.items()],
        "aliases": dict(aliases),
        "parameters": int(sum(t.numel() for name, t in tensors.items() if name in params)),
    }


def optimizer_groups(optimizer: Any, names_by_id: Mapping[int, str]) -> list[dict[str, Any]]:
    """Each param group's hyperparameters and the names of its tensors."""
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _describe(v) for k, v in group.items() if k != "params"}
        hyper["tensors"] = [names_by_id.get(id(p), f"<unnamed {i}>") for i, p in enumerate(group["params"])]
        groups.append(hyper)
    return groups


def _describe(value: Any) -> Any:
    """A hyperparameter for genesis: numbers, text and lists as they are, anything else its repr."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


# ----------------------------------------------------------------------------- running a recipe
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's random and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def deterministic(seed: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Make torch deterministic: deterministic algorithms, a fixed CPU thread count (default:
    the current one) and, when ``seed`` is given, every RNG seeded. Returns the settings, which
    genesis records and replay re-applies."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
        torch.backends.cudnn.benchmark = False
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    return {"deterministic_algorithms": True, "threads": threads}


def build_scheduler(recipe: Any, optimizer: Any) -> Any:
    """The recipe's scheduler, or None when it defines none."""
    builder = getattr(recipe, "build_scheduler", None)
    return builder(optimizer) if builder is not None else None


#: RNG disciplines a run declares in genesis ``determinism["rng"]`` (docs/FORMAT.md §12), which replay
#: follows: every RNG reseeded before each step (:func:`run_step`, what ``ledger.hooks.train`` does), or
#: one stream continued from the checkpoint's RNG state (:func:`continue_step`, a hand-written loop).
RESEED_PER_STEP = "reseed-per-step/v1"
STREAM = "stream"


def continue_step(recipe: Any, model: Any, optimizer: Any, scheduler: Any,
                  step: int) -> tuple[dict[str, float], Any]:
    """Run optimizer step ``step`` of a recipe on the RNG streams as they are (nothing reseeded):
    take ``recipe.batch(step)``, call ``recipe.train_step``, then advance the scheduler — what a
    hand-written loop over a recipe does, and how replay re-runs a run recorded with the
    :data:`STREAM` discipline. Returns (metrics as floats, the batch)."""
    batch = recipe.batch(step)
    metrics = recipe.train_step(model, optimizer, batch)
    if scheduler is not None:
        scheduler.step()
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise ConfigurationError("recipe.train_step must return a dict of metrics with a 'loss'")
    return {name: float(value) for name, value in metrics.items()}, batch


def run_step(recipe: Any, model: Any, optimizer: Any, scheduler: Any, seed: int,
             step: int) -> tuple[dict[str, float], Any]:
    """Run optimizer step ``step`` of a recipe: seed every RNG with :func:`ledger._recipe.step_seed`,
    then :func:`continue_step` (``recipe.batch(step)``, ``recipe.train_step``, the scheduler) — the
    :data:`RESEED_PER_STEP` discipline. Returns (metrics as floats, the batch)."""
    seed_everything(step_seed(seed, step))
    return continue_step(recipe, model, optimizer, scheduler, step)


__all__ = ["RESEED_PER_STEP", "STREAM", "CountSketch", "Snapshot", "architecture", "batch_digest", "build_scheduler",
           "canonical_state", "continue_step", "deterministic", "environment", "load_tensors", "optimizer_groups",
           "restore", "rng_state", "run_step", "safetensors_dtype", "seed_everything", "set_rng_state",
           "sketch_slots", "snapshot", "snapshot_digests", "tensor_bytes", "torch_digests", "unwrap_optimizer",
           "write_checkpoint", "place_checkpoint", "temporary_name", "being_written", "TEMPORARY"]
