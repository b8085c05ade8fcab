"""The genesis a recorder writes: what the run is, where it starts, and how it is fingerprinted."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ledger import torch as lt
from ledger._environment import code_identity
from ledger._fingerprint import model_digest
from ledger._schema import SKETCH_KINDS, FingerprintPolicy, Genesis, InitFingerprint, OptimizerInfo
from ledger.errors import ConfigurationError
from ledger.hooks._norms import POLICY as NORM_POLICY
from ledger.hooks._options import FingerprintOptions

STEP_CONVENTION = "step s is the s-th optimizer step; its entry is written after it; init is step -1"


def build_genesis(*, model: Any, optimizer: Any, scheduler: Any, seed: int, config: Mapping[str, Any] | None,
                  tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str], options: FingerprintOptions,
                  sketcher: lt.CountSketch, recipe: Any, determinism: Mapping[str, Any] | None,
                  checkpoint_every: int | None, checkpoint_dir: str | None,
                  keep: tuple[str, int] | None, base: Mapping[str, Any] | None = None,
                  framework: Mapping[str, Any] | None = None, distributed: Mapping[str, Any] | None = None,
                  sharded: Any = None) -> Genesis:
    """Genesis of a new recorded run (the init state is fingerprinted here; ``sharded``: a
    :class:`ledger.hooks._sharded_run.ShardedRun` when the model is sharded across ranks, whose
    collectives every rank runs first)."""
    if sharded is not None:
        init_digests, init_sketch, norms = sharded.init(tensors)
        scheme = "tensor-blocked/v1"
    else:
        init_digests, init_sketch, scheme = lt.torch_digests(tensors), sketcher(tensors), "tensor/v1"
        norms = torch.stack([t.detach().double().norm() for t in tensors.values()]).cpu().numpy() if tensors \
            else np.zeros(0)
    device = str(next(iter(tensors.values())).device) if tensors else "cpu"
    names_by_id: dict[int, str] = {}  # a tied parameter under its kept name (first in UTF-8 order, as canonical_state)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in names_by_id or name.encode() < names_by_id[id(param)].encode():
            names_by_id[id(param)] = name
    recipe_files: list[Path] = []
    if recipe is not None:
        source = inspect.getsourcefile(type(recipe))
        recipe_files = [Path(source)] if source else []
    infos = [OptimizerInfo(f"{type(opt).__module__}.{type(opt).__qualname__}", lt.optimizer_groups(opt, names_by_id),
                           tuple(f"{c.__module__}.{c.__qualname__}" for c in type(opt).__mro__ if c is not object))
             for opt in lt.optimizers_of(optimizer)]
    return Genesis(
        config=dict(config or {}), seed=seed, environment=lt.environment(device),
        code=code_identity(recipe_files),
        recipe={"class": f"{type(recipe).__module__}.{type(recipe).__qualname__}",
                "source_sha256": hashlib.sha256(recipe_files[0].read_bytes()).digest() if recipe_files else None,
                "run_step": "ledger.run_step/v1"} if recipe is not None else None,
        determinism={"rng": "stream", **(determinism or {})},
        optimizer=infos[0], optimizers=tuple(infos) if len(infos) > 1 else (),
        scheduler=None if scheduler is None else "+".join(type(s).__name__ for s in lt.optimizers_of(scheduler)),
        architecture=lt.architecture(model, tensors, aliases),
        init=InitFingerprint(init_digests, model_digest(init_digests), init_sketch, norms),
        fingerprints=FingerprintPolicy(list(tensors), options.sketch, options.sketch_k, sketcher.seed,
                                       options.digests, options.budget, norms=NORM_POLICY, tensor_digest=scheme,
                                       batch=options.batch, grad_norms=options.grad_norms,
                                       sketch_kind=SKETCH_KINDS[1] if sketcher.skip else SKETCH_KINDS[0],
                                       sketch_skips=tuple(sorted(sketcher.skip))),
        checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir,
        retention=list(keep) if keep else "all", step_convention=STEP_CONVENTION,
        base=_declared_base(base, init_digests), framework=_framework(framework),
        distributed=dict(distributed) if distributed is not None else None)


def _framework(framework: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The training framework's facts for genesis (short scalars: name, version, how its step, loss,
    gradient norm and batch map to the ledger's)."""
    if framework is None:
        return None
    if not isinstance(framework, Mapping) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in framework.items()):
        raise ConfigurationError("framework must map names to text, numbers, booleans or None")
    return dict(framework)


def _declared_base(base: Mapping[str, Any] | None, init_digests: dict[str, bytes]) -> dict[str, Any] | None:
    """The base model a fine-tuning run starts from: its id, revision and the init's digests."""
    if base is None:
        return None
    if not isinstance(base.get("id"), str) or not base["id"]:
        raise ConfigurationError("base must name the model it starts from: base={'id': 'org/name', 'revision': …}")
    revision = base.get("revision")
    return {"id": base["id"], "revision": None if revision is None else str(revision),
            "tensor_digests": dict(init_digests)}
