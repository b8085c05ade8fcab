"""The typed bodies of the entries the recorder writes and the verifier reads (docs/FORMAT.md §12).

One frozen dataclass per entry kind — :class:`Genesis`, :class:`StepBody`, :class:`CheckpointBody`,
:class:`ResumeBody`, :class:`PruneBody`, :class:`SealBody` — each with ``to_body()`` (the exact map
that is encoded and signed) and ``from_body(map)``, which validates every field a check reads — a
hostile ledger can hold any CBOR value there — and raises :class:`~ledger.errors.FormatError` naming
the field; fields no check reads are kept as they are. Adding a body field means adding it here,
once, for both sides (docs/ARCHITECTURE.md).

Also here, once: where a checkpoint entry's files are (:func:`checkpoint_directory`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ledger.errors import FormatError

T = TypeVar("T")
Floats = npt.NDArray[Any]
HASH = 32
MAX_INT = 1 << 63  # integers a check uses must fit an int64


# ----------------------------------------------------------------------------- field readers
def _req(body: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> T:
    if key not in body:
        raise FormatError(f"{where} body has no {key!r}")
    return _typed(body[key], kind, f"{where} {key!r}")


def _opt(body: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> T | None:
    value = body.get(key)
    return None if value is None else _typed(value, kind, f"{where} {key!r}")


def _typed(value: Any, kind: type[T] | tuple[type, ...], what: str) -> T:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise FormatError(f"{what} is a boolean, expected {' or '.join(k.__name__ for k in kinds)}")
    if not isinstance(value, kinds):
        raise FormatError(f"{what} is a {type(value).__name__}, expected {' or '.join(k.__name__ for k in kinds)}")
    return value  # type: ignore[return-value]


def _body(body: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise FormatError(f"{where} body is a {type(body).__name__}, not a map")
    return body


def _text(body: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = body.get(key, default)
    return default if value is None else str(_typed(value, str, f"{where} {key!r}"))


def _int(value: Any, what: str, low: int = -MAX_INT) -> int:
    """An integer in [low, 2^63)."""
    number = _typed(value, int, what)
    if not low <= number < MAX_INT:
        raise FormatError(f"{what} is out of range ({number})")
    return int(number)


def _number(value: Any, what: str) -> float:
    """A finite-or-not float from an int or a float (an integer too large for a float is refused)."""
    number: int | float = _typed(value, (int, float), what)
    try:
        return float(number)
    except OverflowError:
        raise FormatError(f"{what} is too large for a float") from None


def _digest(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH:
        raise FormatError(f"{what} is not a 32-byte digest")
    return value


def _digest_map(value: Any, what: str) -> dict[str, bytes]:
    if not isinstance(value, Mapping):
        raise FormatError(f"{what} is not a map of tensor digests")
    return {str(name): _digest(d, f"{what}[{name!r}]") for name, d in value.items()}


def _floats(value: Any, what: str, length: int | None = None) -> Floats:
    """A 1-D float64 array from a typed array or a list of numbers (of ``length`` values when given)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "fiu":
            raise FormatError(f"{what} is not a 1-D numeric array")
        out = value.astype(np.float64)
    elif isinstance(value, list):
        out = np.asarray([_number(v, f"{what}[{i}]") for i, v in enumerate(value)], dtype=np.float64)
    else:
        raise FormatError(f"{what} is not a numeric array")
    if length is not None and len(out) != length:
        raise FormatError(f"{what} has {len(out)} values, expected {length}")
    return out


# ----------------------------------------------------------------------------- genesis
def _group(value: Any, what: str) -> dict[str, Any]:
    """A param group's hyperparameters: the ones the bounds use must be numbers (betas two of them)."""
    group = dict(_typed(value, Mapping, what))
    for key in ("lr", "weight_decay", "momentum", "dampening", "eps"):
        if group.get(key) is not None:
            _number(group[key], f"{what} {key!r}")
    if group.get("betas") is not None:
        betas = _typed(group["betas"], list, f"{what} 'betas'")
        if len(betas) != 2:
            raise FormatError(f"{what} 'betas' has {len(betas)} values, expected 2")
        for beta in betas:
            _number(beta, f"{what} 'betas'")
    if "tensors" in group and not all(isinstance(n, str) for n in _typed(group["tensors"], list, f"{what} 'tensors'")):
        raise FormatError(f"{what} 'tensors' holds a non-text name")
    return group


@dataclass(frozen=True, slots=True)
class InitFingerprint:
    """The init state's fingerprint in genesis (step −1)."""

    tensor_digests: dict[str, bytes]
    model_digest: bytes
    sketch: Floats
    norms: Floats
    step: int = -1

    def to_body(self) -> dict[str, Any]:
        """The ``init`` map of genesis."""
        return {"step": self.step, "tensor_digests": dict(self.tensor_digests), "model_digest": self.model_digest,
                "sketch": self.sketch, "norms": self.norms}

    @classmethod
    def from_body(cls, body: Any, tensors: int, sketch_k: int) -> InitFingerprint:
        """Read and validate the ``init`` map (``tensors`` norms, ``sketch_k`` sketch values)."""
        body = _typed(body, Mapping, "genesis 'init'")
        return cls(_digest_map(_req(body, "tensor_digests", Mapping, "init"), "init 'tensor_digests'"),
                   _digest(body.get("model_digest"), "init 'model_digest'"),
                   _floats(body.get("sketch"), "init 'sketch'", sketch_k),
                   _floats(body.get("norms"), "init 'norms'", tensors),
                   _int(body.get("step", -1), "init 'step'"))


@dataclass(frozen=True, slots=True)
class FingerprintPolicy:
    """What the recorder fingerprints and how often (genesis ``fingerprints``)."""

    tensor_order: list[str]
    sketch: str | int
    sketch_k: int
    sketch_seed: int
    digests: str | int
    overhead_budget: float | None  # None: every "auto" kind every step
    norms: str = "every step (L2, float32, tensor_order)"
    sketch_kind: str = "count-sketch/v1"
    tensor_digest: str = "tensor/v1"  # the per-tensor digest scheme (docs/FORMAT.md §10.1); written when not v1
    batch: str | int = "every"  # batch digests: "auto" (budgeted), "every" or an interval; before 0.3 every step
    grad_norms: str = "every"  # "auto": only for optimizers whose update bound uses them (SGD); before 0.3 every step
    sketch_skips: tuple[str, ...] = ()  # tensors every sketch leaves out (the buffers); written when some are

    def to_body(self) -> dict[str, Any]:
        """The ``fingerprints`` map of genesis."""
        body = {"tensor_order": list(self.tensor_order), "norms": self.norms, "sketch": self.sketch,
                "sketch_k": self.sketch_k, "sketch_seed": self.sketch_seed, "sketch_kind": self.sketch_kind,
                "digests": self.digests, "overhead_budget": self.overhead_budget}
        if self.sketch_skips:
            body["sketch_skips"] = list(self.sketch_skips)
        for name, legacy in (("batch", "every"), ("grad_norms", "every")):  # written when not what older ledgers did
            if getattr(self, name) != legacy:
                body[name] = getattr(self, name)
        if self.tensor_digest != "tensor/v1":
            body["tensor_digest"] = self.tensor_digest
        return body

    @classmethod
    def from_body(cls, body: Any) -> FingerprintPolicy:
        """Read and validate the ``fingerprints`` map."""
        body = _typed(body, Mapping, "genesis 'fingerprints'")
        order = _req(body, "tensor_order", list, "fingerprints")
        if not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
            raise FormatError("fingerprints 'tensor_order' holds a non-text or repeated name")
        k = _int(_req(body, "sketch_k", int, "fingerprints"), "fingerprints 'sketch_k'")
        if k < 2 or k & (k - 1) or k > 1 << 20:
            raise FormatError(f"fingerprints 'sketch_k' {k} is not a power of two between 2 and 2^20")
        budget = body.get("overhead_budget", 0.01)
        if not budget_ok(budget):
            raise FormatError("fingerprints 'overhead_budget' is not a fraction between 0 and 1 or null")
        grads = _text(body, "grad_norms", "every", "fingerprints")
        if grads not in GRAD_NORM_POLICIES:
            raise FormatError(f"fingerprints 'grad_norms' {grads[:20]!r} is not 'auto' or 'every'")
        kind = _text(body, "sketch_kind", SKETCH_KINDS[0], "fingerprints")
        if kind not in SKETCH_KINDS:
            raise FormatError(f"fingerprints 'sketch_kind' {kind[:40]!r} is not a sketch this verifier knows "
                              f"({', '.join(SKETCH_KINDS)}): upgrade training-ledger")
        skips = body.get("sketch_skips", [])
        if not isinstance(skips, list) or not all(isinstance(n, str) for n in skips) \
                or len(set(skips)) != len(skips) or not set(skips) <= set(order):
            raise FormatError("fingerprints 'sketch_skips' is not a list of distinct names of 'tensor_order'")
        if skips and kind == SKETCH_KINDS[0]:
            raise FormatError(f"fingerprints 'sketch_skips' needs sketch_kind {SKETCH_KINDS[1]!r} (the sketch of "
                              f"{SKETCH_KINDS[0]!r} covers every tensor)")
        return cls(list(order), _interval(body, "sketch", "auto"), k,
                   _int(_req(body, "sketch_seed", int, "fingerprints"), "fingerprints 'sketch_seed'"),
                   _interval(body, "digests", "auto"),
                   None if budget is None else float(budget),
                   _text(body, "norms", "", "fingerprints"), kind,
                   _scheme(_text(body, "tensor_digest", "tensor/v1", "fingerprints")),
                   _interval(body, "batch", "every"), grads, tuple(skips))


# count-sketch/v1: every tensor of tensor_order; v2: those not in sketch_skips (docs/FORMAT.md §10)
SKETCH_KINDS = ("count-sketch/v1", "count-sketch/v2")
# the policies of the optional fingerprints, as FingerprintOptions takes them and genesis states them
POLICY_WORDS = {"sketch": ("auto", "every"), "digests": ("auto", "every", "checkpoints"), "batch": ("auto", "every")}
GRAD_NORM_POLICIES = ("auto", "every")


def interval_ok(kind: str, value: Any) -> bool:
    """Whether ``value`` is a policy of the optional fingerprint ``kind``: one of its words or a
    number of steps ≥ 0."""
    return value in POLICY_WORDS[kind] or (isinstance(value, int) and not isinstance(value, bool)
                                           and 0 <= value < 1 << 62)


def budget_ok(value: Any) -> bool:
    """Whether ``value`` is an overhead budget: a fraction of the step time in (0, 1), or None."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1)


def _interval(body: Mapping[str, Any], key: str, default: str) -> str | int:
    """An optional fingerprint's policy in genesis (:func:`interval_ok`)."""
    value = body.get(key, default)
    if interval_ok(key, value):
        return cast(str | int, value)
    raise FormatError(f"fingerprints '{key}' is not {', '.join(repr(w) for w in POLICY_WORDS[key])} "
                      "or a number of steps")


def _scheme(scheme: str) -> str:
    from ledger._blocked import SCHEMES

    if scheme not in SCHEMES:
        raise FormatError(f"fingerprints 'tensor_digest' {scheme[:40]!r} is not a digest scheme this verifier knows "
                          f"({', '.join(SCHEMES)})")
    return scheme


@dataclass(frozen=True, slots=True)
class OptimizerInfo:
    """The optimizer's class, its base classes (``mro``: qualified names, most derived first, so a
    subclass of a known optimizer is recognised) and its param groups (hyperparameters plus
    ``tensors``: the names of the tensors each group updates)."""

    class_name: str
    param_groups: list[dict[str, Any]]
    mro: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        """The ``optimizer`` map of genesis (``mro`` only when known)."""
        body: dict[str, Any] = {"class": self.class_name, "param_groups": [dict(g) for g in self.param_groups]}
        if self.mro:
            body["mro"] = list(self.mro)
        return body

    @classmethod
    def from_body(cls, body: Any) -> OptimizerInfo:
        """Read and validate the ``optimizer`` map."""
        body = _typed(body, Mapping, "genesis 'optimizer'")
        groups = [_group(g, f"optimizer param group {i}")
                  for i, g in enumerate(_req(body, "param_groups", list, "optimizer"))]
        mro = _typed(body.get("mro", []), list, "optimizer 'mro'")
        return cls(str(_req(body, "class", str, "optimizer")), groups, tuple(str(m) for m in mro))


def _architecture(value: Any) -> dict[str, Any]:
    """The architecture map; its ``tensors`` list (name, shape, dtype, kind) is validated."""
    arch = dict(_typed(value, Mapping, "genesis 'architecture'"))
    for i, t in enumerate(_typed(arch.get("tensors", []), list, "architecture 'tensors'")):
        what = f"architecture tensor {i}"
        t = _typed(t, Mapping, what)
        _req(t, "name", str, what)
        for d in _req(t, "shape", list, what):
            _int(d, f"{what} 'shape'", 0)
        _opt(t, "dtype", str, what)
        if t.get("kind", "parameter") not in ("parameter", "buffer"):  # checks read exactly these two words
            raise FormatError(f"{what} 'kind' is not 'parameter' or 'buffer'")
    return arch


def _scalars(value: Any, what: str) -> dict[str, Any] | None:
    """A map of short scalar facts (genesis ``framework``, ``distributed``): text keys, values text,
    numbers, booleans or null."""
    if value is None:
        return None
    facts = dict(_typed(value, Mapping, what))
    for key, item in facts.items():
        if not isinstance(key, str) or not (item is None or isinstance(item, (str, int, float, bool))):
            raise FormatError(f"{what} holds a non-text key or a value that is not text, a number or a boolean")
    return facts


def _base(value: Any) -> dict[str, Any] | None:
    """A declared base model (fine-tuning): ``id``, ``revision`` and per-tensor ``tensor_digests``."""
    if value is None:
        return None
    base = _typed(value, Mapping, "genesis 'base'")
    return {"id": str(_req(base, "id", str, "base")), "revision": _opt(base, "revision", str, "base"),
            "tensor_digests": _digest_map(_req(base, "tensor_digests", Mapping, "base"), "base 'tensor_digests'")}


@dataclass(frozen=True, slots=True)
class Genesis:
    """The genesis body. Writer fields (format, run id, creation time, key) are present on every
    ledger; the training fields only when the recorder wrote it (:attr:`recorded`); ``config`` is
    the producer's own and kept as it is."""

    run_id: str = ""
    format: int = 1
    created_ns: int = 0
    public_key: bytes = b""
    key_id: bytes = b""
    payload_type: str = ""
    config: Any = field(default_factory=dict)
    seed: int | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    determinism: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerInfo | None = None
    scheduler: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    init: InitFingerprint | None = None
    fingerprints: FingerprintPolicy | None = None
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    retention: Any = "all"
    step_convention: str = ""
    base: dict[str, Any] | None = None
    optimizers: tuple[OptimizerInfo, ...] = ()  # every optimizer, when the run has more than one
    framework: dict[str, Any] | None = None  # the training framework and how its numbers map to the ledger's
    distributed: dict[str, Any] | None = None  # torch.distributed: backend, world size, layout, writer rank

    @property
    def all_optimizers(self) -> list[OptimizerInfo]:
        """Every recorded optimizer in order (their param groups, concatenated, are the groups that
        per-step arrays such as ``lrs`` index)."""
        return list(self.optimizers) or ([self.optimizer] if self.optimizer is not None else [])

    @property
    def recorded(self) -> bool:
        """True when the recorder wrote this genesis (it carries the fingerprint policy and init)."""
        return self.fingerprints is not None and self.init is not None and self.optimizer is not None

    @property
    def tensor_order(self) -> list[str]:
        """Names of the fingerprinted tensors, in the order of per-tensor arrays."""
        return list(self.fingerprints.tensor_order) if self.fingerprints else []

    def tensors(self) -> dict[str, dict[str, Any]]:
        """Each fingerprinted tensor's architecture entry (name, shape, dtype, kind) by name."""
        return {t["name"]: dict(t) for t in self.architecture.get("tensors", [])}

    def layouts(self) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """Each fingerprinted tensor's shape and dtype (safetensors name), as the architecture states them."""
        return {name: (tuple(t["shape"]), t.get("dtype")) for name, t in self.tensors().items()}

    def tensor_sizes(self) -> dict[str, int]:
        """Element count of each fingerprinted tensor, from the architecture."""
        return {name: math.prod(t["shape"]) for name, t in self.tensors().items()}

    def to_body(self) -> dict[str, Any]:
        """The recorder's genesis fields (the writer adds format, run id, time and key)."""
        if self.optimizer is None or self.init is None or self.fingerprints is None:
            raise FormatError("a recorder genesis needs optimizer, init and fingerprints")
        body = {
            "config": self.config, "seed": self.seed, "environment": dict(self.environment),
            "code": dict(self.code), "recipe": self.recipe, "determinism": dict(self.determinism),
            "optimizer": self.optimizer.to_body(), "scheduler": self.scheduler,
            "architecture": dict(self.architecture), "init": self.init.to_body(),
            "fingerprints": self.fingerprints.to_body(), "checkpoint_every": self.checkpoint_every,
            "checkpoint_dir": self.checkpoint_dir, "retention": self.retention,
            "step_convention": self.step_convention,
        }
        if self.base is not None:
            body["base"] = dict(self.base)
        if self.optimizers:
            body["optimizers"] = [o.to_body() for o in self.optimizers]
        if self.framework is not None:
            body["framework"] = dict(self.framework)
        if self.distributed is not None:
            body["distributed"] = dict(self.distributed)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Genesis:
        """Read a genesis body: the writer's fields always, the training part when present."""
        w = "genesis"
        body = _body(body, w)
        out = cls(run_id=str(_opt(body, "run_id", str, w) or ""),
                  format=_int(body.get("format", 0), "genesis 'format'"),
                  created_ns=_int(body.get("created_ns", 0), "genesis 'created_ns'"),
                  public_key=_opt(body, "public_key", bytes, w) or b"", key_id=_opt(body, "key_id", bytes, w) or b"",
                  payload_type=str(_opt(body, "payload_type", str, w) or ""), config=body.get("config", {}))
        if not isinstance(body.get("fingerprints"), Mapping):
            return out  # not written by the recorder
        policy = FingerprintPolicy.from_body(body["fingerprints"])
        checkpoint_every = _opt(body, "checkpoint_every", int, w)
        if checkpoint_every is not None:
            _int(checkpoint_every, "genesis 'checkpoint_every'", 1)
        return replace(
            out, seed=_int(_req(body, "seed", int, w), "genesis 'seed'"),
            environment=dict(_opt(body, "environment", Mapping, w) or {}),
            code=dict(_opt(body, "code", Mapping, w) or {}),
            recipe=dict(r) if (r := _opt(body, "recipe", Mapping, w)) is not None else None,
            determinism=dict(_opt(body, "determinism", Mapping, w) or {}),
            optimizer=OptimizerInfo.from_body(body.get("optimizer")),
            scheduler=_opt(body, "scheduler", str, w),
            architecture=_architecture(body.get("architecture", {})),
            init=InitFingerprint.from_body(body.get("init"), len(policy.tensor_order), policy.sketch_k),
            fingerprints=policy, checkpoint_every=checkpoint_every,
            checkpoint_dir=_opt(body, "checkpoint_dir", str, w),
            retention=body.get("retention", "all"), step_convention=str(body.get("step_convention", "")),
            base=_base(body.get("base")),
            optimizers=tuple(OptimizerInfo.from_body(o) for o in _opt(body, "optimizers", list, w) or []),
            framework=_scalars(body.get("framework"), "genesis 'framework'"),
            distributed=_scalars(body.get("distributed"), "genesis 'distributed'"))


# ----------------------------------------------------------------------------- step
@dataclass(frozen=True, slots=True)
class StepBody:
    """One optimizer step: per-tensor norms (always), learning rates and gradient norms per param
    group, the other hyperparameters per group when they changed since the last entry (``hyper``:
    betas, momentum … moved by a scheduler), and — per ``carries`` — a sketch, full digests
    (concatenated in tensor order) and a batch digest."""

    norms: Floats
    metrics: dict[str, float]
    optimizer_steps: int = 0
    lrs: Floats | None = None
    grad_norms: Floats | None = None
    sketch: Floats | None = None
    tensor_digests: bytes | None = None
    model_digest: bytes | None = None
    batch_digest: bytes | None = None
    carries: tuple[str, ...] = ("norms",)
    hyper: list[dict[str, Any]] | None = None
    optimizer_steps_each: list[int] | None = None  # per optimizer, when the run has several

    def to_body(self) -> dict[str, Any]:
        """The step map (optional fields only when present)."""
        body: dict[str, Any] = {"norms": self.norms}
        if self.lrs is not None:
            body["lrs"] = self.lrs
        if self.grad_norms is not None:
            body["grad_norms"] = self.grad_norms
        body["optimizer_steps"] = self.optimizer_steps
        if self.sketch is not None:
            body["sketch"] = self.sketch
        if self.tensor_digests is not None:
            body["tensor_digests"] = self.tensor_digests
            body["model_digest"] = self.model_digest
        if self.batch_digest is not None:
            body["batch_digest"] = self.batch_digest
        if self.hyper is not None:
            body["hyper"] = [dict(g) for g in self.hyper]
        if self.optimizer_steps_each is not None:
            body["optimizer_steps_each"] = list(self.optimizer_steps_each)
        body["metrics"] = dict(self.metrics)
        body["carries"] = list(self.carries)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any], genesis: Genesis | None = None) -> StepBody:
        """Read a step body; with the ``genesis`` of a recorded run, every array's length is checked
        (norms per tensor, lrs and gradient norms per param group, sketch of k values)."""
        w = "step"
        body = _body(body, w)
        tensors = len(genesis.tensor_order) if genesis is not None and genesis.recorded else None
        groups = sum(len(o.param_groups) for o in genesis.all_optimizers) if genesis is not None and \
            genesis.optimizer else None
        k = genesis.fingerprints.sketch_k if genesis is not None and genesis.fingerprints else None
        metrics = _typed(body.get("metrics", {}), Mapping, "step 'metrics'")
        digests = _opt(body, "tensor_digests", bytes, w)
        if digests is not None and (len(digests) % HASH or (tensors is not None and len(digests) != HASH * tensors)):
            raise FormatError("step 'tensor_digests' is not one 32-byte digest per tensor")
        hyper = _opt(body, "hyper", list, w)
        carries = _typed(body.get("carries", ["norms"]), list, "step 'carries'")
        return cls(
            norms=_floats(body.get("norms"), "step 'norms'", tensors),
            metrics={str(name): _number(v, f"step metric {name!r}") for name, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
            optimizer_steps=_int(body.get("optimizer_steps", 0), "step 'optimizer_steps'", 0),
            lrs=_floats(body["lrs"], "step 'lrs'", groups) if body.get("lrs") is not None else None,
            grad_norms=_floats(body["grad_norms"], "step 'grad_norms'", groups)
            if body.get("grad_norms") is not None else None,
            sketch=_floats(body["sketch"], "step 'sketch'", k) if body.get("sketch") is not None else None,
            tensor_digests=digests,
            model_digest=_digest(body.get("model_digest"), "step 'model_digest'") if digests is not None else None,
            batch_digest=_digest(body["batch_digest"], "step 'batch_digest'") if body.get("batch_digest") is not None
            else None,
            carries=tuple(_typed(c, str, "step 'carries' item") for c in carries),
            hyper=None if hyper is None else [_group(g, f"step 'hyper' group {i}") for i, g in enumerate(hyper)],
            optimizer_steps_each=_steps_each(body, genesis))


def _steps_each(body: Mapping[str, Any], genesis: Genesis | None) -> list[int] | None:
    each = _opt(body, "optimizer_steps_each", list, "step")
    if each is None:
        return None
    if genesis is not None and genesis.optimizer is not None and len(each) != len(genesis.all_optimizers):
        raise FormatError(f"step 'optimizer_steps_each' has {len(each)} values for "
                          f"{len(genesis.all_optimizers)} optimizers")
    return [_int(k, "step 'optimizer_steps_each'", 0) for k in each]


# ----------------------------------------------------------------------------- checkpoints, resume, prune
@dataclass(frozen=True, slots=True)
class RecordedHead:
    """A checkpoint entry's ``tree_head`` (docs/FORMAT.md §13): the signed tree head of the
    entries before it — ``size`` (= the entry's seq), the RFC 9162 ``root`` over them and the
    64-byte Ed25519 ``signature`` of the note text. The writer adds it."""

    size: int
    root: bytes
    signature: bytes

    def to_body(self) -> dict[str, Any]:
        """The ``tree_head`` map."""
        return {"size": self.size, "root": self.root, "signature": self.signature}

    @classmethod
    def from_body(cls, value: Any) -> RecordedHead | None:
        """Read and validate a ``tree_head`` map (None: absent; ledgers before the field)."""
        if value is None:
            return None
        body = _body(value, "checkpoint 'tree_head'")
        signature = body.get("signature")
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise FormatError("checkpoint 'tree_head' 'signature' is not a 64-byte signature")
        return cls(_int(_req(body, "size", int, "checkpoint 'tree_head'"), "checkpoint 'tree_head' 'size'", 0),
                   _digest(body.get("root"), "checkpoint 'tree_head' 'root'"), signature)


@dataclass(frozen=True, slots=True)
class CheckpointBody:
    """A stored training state: its digests (docs/FORMAT.md §11), where its files are, and the
    optimizer hyperparameters it holds (as the recorder copied them; the files are the evidence)."""

    tensor_digests: dict[str, bytes]
    model_digest: bytes
    optimizer_digest: bytes
    meta_digest: bytes
    state_digest: bytes
    path: str
    optimizer_hyper: list[Any] = field(default_factory=list)
    created: bool | None = None  # the recorder made the directory (False: it was there); None: not recorded
    ranks: list[bytes] | None = None  # distributed: each rank's model digest at this step, by rank
    layout: str = "ledger"  # "ledger": our files (§11); "dcp": a torch.distributed.checkpoint directory (§11.1)
    files: dict[str, dict[str, Any]] | None = None  # "dcp": the manifest {name: {size, sha256, rank}}
    tree_head: RecordedHead | None = None  # the signed head of the entries before it (the writer adds it)

    @classmethod
    def dcp(cls, files: dict[str, dict[str, Any]], path: str, layout: str = "dcp") -> CheckpointBody:
        """The entry of a checkpoint directory another tool wrote (layout ``"dcp"`` or ``"files"``):
        its manifest, pinned by ``state_digest`` (docs/FORMAT.md §11.1)."""
        from ledger._dcp import manifest_digest

        return cls({}, b"", b"", b"", manifest_digest(files), path, layout=layout, files=files)

    @property
    def stored_here(self) -> bool:
        """True for a checkpoint in the recorder's own layout (which resume, replay and continuity read)."""
        return self.layout == "ledger"

    @classmethod
    def of(cls, digests: Any, path: str, optimizer_hyper: list[Any], created: bool | None = None,
           ranks: list[bytes] | None = None) -> CheckpointBody:
        """The entry for a written checkpoint, from its :class:`ledger._state.StateDigests`."""
        return cls(dict(digests.model), digests.model_digest, digests.optimizer_digest, digests.meta_digest,
                   digests.state_digest, path, optimizer_hyper, created, ranks)

    def to_body(self) -> dict[str, Any]:
        """The checkpoint map."""
        head = {} if self.tree_head is None else {"tree_head": self.tree_head.to_body()}
        if self.layout != "ledger":
            return {"layout": self.layout, "files": dict(self.files or {}), "state_digest": self.state_digest,
                    "path": self.path, **head}
        body: dict[str, Any] = {**head, "tensor_digests": dict(self.tensor_digests), "model_digest": self.model_digest,
                "optimizer_digest": self.optimizer_digest, "meta_digest": self.meta_digest,
                "state_digest": self.state_digest, "path": self.path,
                "optimizer_hyper": list(self.optimizer_hyper)}
        if self.created is not None:
            body["created"] = self.created
        if self.ranks is not None:
            body["ranks"] = list(self.ranks)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> CheckpointBody:
        """Read and validate a checkpoint body."""
        body = _body(body, "checkpoint")
        return replace(cls._from_body(body), tree_head=RecordedHead.from_body(body.get("tree_head")))

    @classmethod
    def _from_body(cls, body: Mapping[str, Any]) -> CheckpointBody:
        w = "checkpoint"
        path = _req(body, "path", str, w)
        if not path or "\x00" in path:
            raise FormatError("checkpoint 'path' is empty or holds a NUL character")
        layout = _text(body, "layout", "ledger", w)
        if layout in ("dcp", "files"):
            from ledger._dcp import check_files, manifest_digest

            files = check_files(body.get("files"), nested=layout == "files")
            if not Path(path).is_absolute() or Path(path).name in ("", ".", ".."):
                raise FormatError("a DCP checkpoint's 'path' is not an absolute path ending in a directory name")
            if _digest(body.get("state_digest"), "checkpoint 'state_digest'") != manifest_digest(files):
                raise FormatError("a DCP checkpoint's 'state_digest' is not the digest of its 'files'")
            return cls.dcp(files, path, layout)
        if layout != "ledger":
            raise FormatError(f"checkpoint 'layout' {layout[:40]!r} is not 'ledger', 'dcp' or 'files'")
        model, optimizer, meta, state = (_digest(body.get(k), f"checkpoint {k!r}")
                                         for k in ("model_digest", "optimizer_digest", "meta_digest", "state_digest"))
        hyper = _typed(body.get("optimizer_hyper", []), list, "checkpoint 'optimizer_hyper'")
        return cls(_digest_map(_req(body, "tensor_digests", Mapping, w), "checkpoint 'tensor_digests'"),
                   model, optimizer, meta, state, path=path,
                   optimizer_hyper=[_group(g, f"checkpoint 'optimizer_hyper' group {i}") for i, g in enumerate(hyper)],
                   created=_opt(body, "created", bool, w), ranks=_ranks(body.get("ranks")))


def _ranks(value: Any) -> list[bytes] | None:
    """A checkpoint's ``ranks``: one 32-byte model digest per rank (at most 2^16 ranks)."""
    if value is None:
        return None
    ranks = _typed(value, list, "checkpoint 'ranks'")
    if not 1 <= len(ranks) <= 1 << 16:
        raise FormatError(f"checkpoint 'ranks' has {len(ranks)} digests; 1 to 65536 expected")
    return [_digest(d, f"checkpoint 'ranks' {i}") for i, d in enumerate(ranks)]


@dataclass(frozen=True, slots=True)
class Superseded:
    """Step entries recorded after the checkpoint a run resumed from (kept, but not counted)."""

    first_seq: int
    last_seq: int
    steps: tuple[int, int]
    count: int

    def to_body(self) -> dict[str, Any]:
        """The ``superseded`` map of a resume entry."""
        return {"first_seq": self.first_seq, "last_seq": self.last_seq, "steps": list(self.steps),
                "count": self.count}


@dataclass(frozen=True, slots=True)
class ResumeBody:
    """A run continued from checkpoint ``checkpoint_seq`` after a crash."""

    checkpoint_seq: int
    checkpoint_step: int
    state_digest: bytes
    recovered_torn_bytes: int = 0
    superseded: Superseded | None = None

    def to_body(self) -> dict[str, Any]:
        """The resume map."""
        body: dict[str, Any] = {"checkpoint_seq": self.checkpoint_seq, "checkpoint_step": self.checkpoint_step,
                                "state_digest": self.state_digest, "recovered_torn_bytes": self.recovered_torn_bytes}
        if self.superseded is not None:
            body["superseded"] = self.superseded.to_body()
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any], seq: int | None = None) -> ResumeBody:
        """Read and validate a resume body; with ``seq`` (the resume entry's own position in the
        chain) the superseded range must lie before it. Nothing here is proportional to the range:
        a caller tests ``first_seq <= s <= last_seq`` rather than building the range."""
        w = "resume"
        body = _body(body, w)
        span = _opt(body, "superseded", Mapping, w)
        superseded = None
        if span is not None:
            first, last = (_int(span.get(k), f"resume superseded {k!r}", 0) for k in ("first_seq", "last_seq"))
            if first > last:
                raise FormatError("resume 'superseded' range is empty")
            if seq is not None and last >= seq:
                raise FormatError(f"resume 'superseded' last_seq {last} is not before the resume entry (seq {seq})")
            steps = _typed(span.get("steps", [-1, -1]), list, "resume superseded 'steps'")
            if len(steps) != 2:
                raise FormatError("resume superseded 'steps' is not a [first, last] pair")
            superseded = Superseded(first, last, (_int(steps[0], "resume superseded 'steps'"),
                                                  _int(steps[1], "resume superseded 'steps'")),
                                    _int(span.get("count", last - first + 1), "resume superseded 'count'", 0))
            if superseded.count > last - first + 1:
                raise FormatError(f"resume superseded 'count' {superseded.count} is more than its seq range holds")
        return cls(_int(_req(body, "checkpoint_seq", int, w), "resume 'checkpoint_seq'", 0),
                   _int(_req(body, "checkpoint_step", int, w), "resume 'checkpoint_step'"),
                   _digest(body.get("state_digest"), "resume 'state_digest'"),
                   _int(body.get("recovered_torn_bytes", 0), "resume 'recovered_torn_bytes'", 0), superseded)


@dataclass(frozen=True, slots=True)
class PruneBody:
    """A checkpoint deliberately deleted by retention (so verify can tell pruned from missing)."""

    checkpoint_seq: int
    state_digest: bytes
    reason: str

    def to_body(self) -> dict[str, Any]:
        """The prune map."""
        return {"checkpoint_seq": self.checkpoint_seq, "state_digest": self.state_digest, "reason": self.reason}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PruneBody:
        """Read and validate a prune body."""
        body = _body(body, "prune")
        return cls(_int(_req(body, "checkpoint_seq", int, "prune"), "prune 'checkpoint_seq'", 0),
                   _digest(body.get("state_digest"), "prune 'state_digest'"), _text(body, "reason", "", "prune"))


# ----------------------------------------------------------------------------- seal
@dataclass(frozen=True, slots=True)
class FinalWeights:
    """The released weights the seal commits to."""

    tensor_digests: dict[str, bytes]
    model_digest: bytes
    file: str | None = None

    def to_body(self) -> dict[str, Any]:
        """The ``final`` map of the seal."""
        body: dict[str, Any] = {"tensor_digests": dict(self.tensor_digests), "model_digest": self.model_digest}
        if self.file is not None:
            body["file"] = self.file
        return body


@dataclass(frozen=True, slots=True)
class SealBody:
    """The seal: the format's entry count, head and Merkle root, and (from the recorder) the final
    weights and the number of steps."""

    entry_count: int
    head: bytes
    tree_root: bytes
    final: FinalWeights | None = None
    steps: int | None = None
    mirror: Mapping[str, Any] | None = None  # how far an MLflow mirror got before the seal (§12)

    def recorder_fields(self) -> dict[str, Any]:
        """What the recorder adds to the seal (the writer adds count, head and root)."""
        body: dict[str, Any] = {}
        if self.final is not None:
            body["final"] = self.final.to_body()
        if self.steps is not None:
            body["steps"] = self.steps
        if self.mirror is not None:
            body["mirror"] = dict(self.mirror)
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SealBody:
        """Read and validate a seal body."""
        w = "seal"
        body = _body(body, w)
        final = _opt(body, "final", Mapping, w)
        weights = None
        if final is not None:
            weights = FinalWeights(_digest_map(_req(final, "tensor_digests", Mapping, "seal final"),
                                               "seal final 'tensor_digests'"),
                                   _digest(final.get("model_digest"), "seal final 'model_digest'"),
                                   _opt(final, "file", str, "seal final"))
        steps = _opt(body, "steps", int, w)
        mirror = _opt(body, "mirror", Mapping, w)
        if mirror is not None:
            _req(mirror, "mlflow_run_id", str, "seal mirror")
            _int(_req(mirror, "mirrored_through_seq", int, "seal mirror"), "seal mirror 'mirrored_through_seq'", -1)
            _req(mirror, "missing", bool, "seal mirror")
        return cls(_int(_req(body, "entry_count", int, w), "seal 'entry_count'", 0),
                   _digest(body.get("head"), "seal 'head'"), _digest(body.get("tree_root"), "seal 'tree_root'"),
                   weights, None if steps is None else _int(steps, "seal 'steps'", 0), mirror)


# ----------------------------------------------------------------------------- timestamps (§13)
MAX_TIMESTAMPS = 1024  # tokens one entry carries
MAX_TIMESTAMP_TOKEN = 64 << 10  # as ledger._tsa.MAX_TOKEN


@dataclass(frozen=True, slots=True)
class Timestamp:
    """An RFC 3161 token (the TSA's DER ``TimeStampResp``) over the tree head of the first ``size``
    entries: one item of an entry's optional ``timestamps`` field (docs/FORMAT.md §13)."""

    size: int
    token: bytes

    def to_body(self) -> dict[str, Any]:
        """The ``timestamps`` item."""
        return {"size": self.size, "token": self.token}


def timestamps_of(body: Any, where: str, seq: int | None = None) -> list[Timestamp]:
    """An entry body's ``timestamps`` (empty when absent): a list of at most :data:`MAX_TIMESTAMPS`
    maps ``{size, token}``, size ≥ 1 — and at most ``seq`` when the entry's seq is given (a head
    cannot cover the entry carrying its token) — and a token of 1 to :data:`MAX_TIMESTAMP_TOKEN` bytes."""
    value = _body(body, where).get("timestamps")
    if value is None:
        return []
    items = _typed(value, list, f"{where} 'timestamps'")
    if not 1 <= len(items) <= MAX_TIMESTAMPS:
        raise FormatError(f"{where} 'timestamps' holds {len(items)} tokens; 1 to {MAX_TIMESTAMPS} expected")
    out = []
    for i, item in enumerate(items):
        what = f"{where} 'timestamps' item {i}"
        item = _typed(item, Mapping, what)
        size = _int(_req(item, "size", int, what), f"{what} 'size'", 1)
        if seq is not None and size > seq:
            raise FormatError(f"{what} stamps a head of {size} entries, which would include this entry (seq {seq})")
        token = _req(item, "token", bytes, what)
        if not 1 <= len(token) <= MAX_TIMESTAMP_TOKEN:
            raise FormatError(f"{what} 'token' is {len(token)} bytes; 1 to {MAX_TIMESTAMP_TOKEN} expected")
        out.append(Timestamp(size, token))
    return out


def tsa_status_of(body: Any) -> dict[str, Any] | None:
    """A seal's optional ``tsa`` field: the TSA the recorder asked (``url``) and the heads still
    without a token when it sealed (``unstamped``, sizes), or None."""
    value = _body(body, "seal").get("tsa")
    if value is None:
        return None
    status = _typed(value, Mapping, "seal 'tsa'")
    url = _req(status, "url", str, "seal tsa")
    unstamped = _typed(status.get("unstamped", []), list, "seal tsa 'unstamped'")
    if len(unstamped) > 1 << 16:
        raise FormatError("seal tsa 'unstamped' lists more than 65536 heads")
    return {"url": url[:2048], "unstamped": [_int(s, "seal tsa 'unstamped' item", 1) for s in unstamped]}


# ----------------------------------------------------------------------------- where checkpoints are
def checkpoint_root(ledger_root: Path, genesis: Genesis, override: Path | None = None) -> Path:
    """The directory every checkpoint of a run lies in: ``override`` when a verifier names one
    (``--checkpoints``), else genesis ``checkpoint_dir`` when the recorder was given one (relative
    to the ledger directory unless absolute), else ``LEDGER/checkpoints``."""
    if override is not None:
        return Path(override)
    if genesis.checkpoint_dir:
        return ledger_root / genesis.checkpoint_dir  # an absolute checkpoint_dir replaces ledger_root
    return ledger_root / "checkpoints"


def checkpoint_directory(ledger_root: Path, body: CheckpointBody, genesis: Genesis,
                         override: Path | None = None) -> Path:
    """Where a checkpoint entry's files are: ``root/<state digest hex>``, ``root`` being
    :func:`checkpoint_root` (checkpoints are content-addressed). The entry's stored ``path`` must
    name that directory — relative to the ledger directory, or absolute — and the directory, when
    it exists, must be a real directory inside ``root``, not a symlink; otherwise
    :class:`FormatError` saying what is wrong (nothing refused is ever read or deleted). When a
    verifier names the root (``override``, ``--checkpoints``), the stored path only has to end in
    the digest."""
    directory = checkpoint_location(ledger_root, body, genesis, override)
    root = directory.parent
    if directory.is_symlink():
        raise FormatError(f"checkpoint directory {directory} is a symlink; refusing it")
    if directory.exists():
        try:
            directory.resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise FormatError(f"checkpoint directory {directory} resolves outside the checkpoint root {root}; "
                              "refusing it") from None
    return directory


def checkpoint_location(ledger_root: Path, body: CheckpointBody, genesis: Genesis,
                        override: Path | None = None) -> Path:
    """Where a checkpoint entry's files should be, ``root/<state digest hex>``, checking only what the
    entry says (its stored ``path`` names that directory; :class:`FormatError` otherwise), not what is
    on disk: :func:`checkpoint_directory` checks both."""
    root = checkpoint_root(ledger_root, genesis, override)
    name = body.state_digest.hex()
    directory = root / name
    stored = Path(body.path)
    if ".." in stored.parts or stored.name != name:
        raise FormatError(f"checkpoint path {body.path!r} is not <checkpoint root>/{name[:16]}…; refusing it")
    if override is None:
        expected = directory.absolute()
        if (ledger_root / stored).absolute() != expected and (root / stored).absolute() != expected:
            raise FormatError(f"checkpoint path {body.path!r} lies outside the checkpoint root {root}; refusing it")
    return directory


__all__ = ["CheckpointBody", "FingerprintPolicy", "FinalWeights", "Genesis", "InitFingerprint", "OptimizerInfo",
           "PruneBody", "ResumeBody", "SealBody", "StepBody", "Superseded", "checkpoint_directory",
           "checkpoint_location", "checkpoint_root"]
