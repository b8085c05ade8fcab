"""The PyTorch recorder: genesis, one signed entry per optimizer step, checkpoints, seal, resume."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ledger import torch as lt
from ledger._fingerprint import model_digest, safetensors_digests
from ledger._reader import Ledger
from ledger._record import Kind
from ledger._schema import (
    CheckpointBody,
    FinalWeights,
    Genesis,
    PruneBody,
    ResumeBody,
    SealBody,
    StepBody,
    Superseded,
    checkpoint_directory,
    checkpoint_root,
)
from ledger._state import digests_of
from ledger._writer import LedgerWriter
from ledger.errors import ConfigurationError, FormatError, LedgerError, StorageError
from ledger.hooks._genesis import build_genesis
from ledger.hooks._norms import Norms, Pending, total_norm
from ledger.hooks._options import RECALIBRATE_EVERY, Cadence, FingerprintOptions
from ledger.hooks._queue import WriterQueue

Body = StepBody | CheckpointBody | PruneBody


class Recorder:
    """Records a training run into a signed ledger.

    Three lines in an existing loop::

        rec = Recorder("runs/ledger", model=model, optimizer=opt, key="keys/trainer.pem", seed=seed,
                       checkpoint_every=100, config={...})
        ...  rec.step(loss=loss, batch=(x, y))     # once per optimizer step, after it
        rec.close(final_weights="out/model.safetensors")

    Genesis is written at construction (config, seed, environment, code identity, optimizer
    hyperparameters, architecture and the init fingerprint). ``step`` computes per-tensor norms
    (every step), the count-sketch and full digests (at the cadence of ``fingerprints``, a
    :class:`FingerprintOptions`) and hands the entry to a background writer: the training thread
    never waits on disk. Checkpoints (init state, every ``checkpoint_every`` steps, at close) are
    hashed and written off the training thread; their entry is appended once the files are durable.

    ``optimizer`` may be a list (a GAN, a separate optimizer for embeddings): every optimizer is
    recorded, its groups bounded by its own update rule (a parameter no recorded optimizer updates
    must not move); pass the matching list of schedulers, if any.

    ``base``: the run fine-tunes a published model: ``{"id": "org/name", "revision": "…"}``; genesis
    declares it with the init's tensor digests, and ``ledger verify --base FILE`` checks that the init
    is that model ("fine-tuned from <id>") instead of a random draw.

    ``determinism``: settings genesis records for replay (threads, deterministic algorithms) and
    ``rng``, the run's RNG discipline: ``"stream"`` (the default: a loop that draws from the global
    generators as it goes; replay restores a checkpoint's RNG state and continues) or
    ``"reseed-per-step/v1"`` (every step reseeded by :func:`ledger.torch.run_step`, as
    :func:`ledger.hooks.train` does).

    ``keep``: checkpoint retention, None (all), ("last", n) or ("every", n). Entries wait in a
    bounded queue (``queue_size``) that a background thread drains every ``drain_interval`` seconds:
    a crash loses at most what waits there.
    """

    def __init__(self, path: str | os.PathLike[str], *, model: Any, optimizer: Any, key: Any, seed: int,
                 checkpoint_every: int | None = None, config: Mapping[str, Any] | None = None, scheduler: Any = None,
                 fingerprints: FingerprintOptions | None = None, checkpoint_dir: str | os.PathLike[str] | None = None,
                 keep: tuple[str, int] | None = None, queue_size: int = 256, drain_interval: float = 0.05,
                 passphrase: bytes | None = None, recipe: Any = None, determinism: Mapping[str, Any] | None = None,
                 base: Mapping[str, Any] | None = None, fsync: str = "group",
                 clock: Callable[[], int] = time.time_ns, **deprecated: Any) -> None:
        options = _options(fingerprints, deprecated)
        _check_checkpointing(checkpoint_every, keep)
        run_id = secrets.token_hex(16)
        sketch_seed = int.from_bytes(hashlib.sha256(b"sketch/" + run_id.encode()).digest()[:8], "big") >> 1
        sketcher = lt.CountSketch(sketch_seed, options.sketch_k)
        tensors, aliases = lt.canonical_state(model)
        root = Path(path)
        user_dir = str(Path(checkpoint_dir)) if checkpoint_dir and Path(checkpoint_dir) != root / "checkpoints" \
            else None
        genesis = build_genesis(model=model, optimizer=optimizer, scheduler=scheduler, seed=int(seed), config=config,
                                tensors=tensors, aliases=aliases, options=options, sketcher=sketcher, recipe=recipe,
                                determinism=determinism, checkpoint_every=checkpoint_every,
                                checkpoint_dir=user_dir, keep=keep, base=base)
        writer = LedgerWriter.create(path, key, genesis=genesis.to_body(), run_id=run_id, passphrase=passphrase,
                                     clock=clock, fsync=fsync)
        self._attach(root, model, optimizer, scheduler, writer, genesis, options, sketcher, first_step=0, keep=keep,
                     queue_size=queue_size, drain_interval=drain_interval)
        if checkpoint_every:
            self._checkpoint(-1)

    def _attach(self, path: Path, model: Any, optimizer: Any, scheduler: Any, writer: LedgerWriter,
                genesis: Genesis, options: FingerprintOptions, sketcher: lt.CountSketch, *, first_step: int,
                keep: tuple[str, int] | None, queue_size: int, drain_interval: float,
                last_checkpoint_step: int | None = None,
                alive: Sequence[tuple[int, int, CheckpointBody]] = ()) -> None:
        """Set up recording onto ``writer`` from step ``first_step`` (a new run or a resumed one)."""
        tensors, _ = lt.canonical_state(model)
        if list(tensors) != genesis.tensor_order:
            raise ConfigurationError("this model's tensors differ from the ledger's genesis architecture")
        self.path, self.model, self.optimizer, self.scheduler = path, model, optimizer, scheduler
        self.seed, self.checkpoint_every, self.keep = int(genesis.seed or 0), genesis.checkpoint_every, keep
        self.checkpoint_root = checkpoint_root(path, genesis)
        self._names = list(tensors)
        self._writer, self._sketcher, self._step = writer, sketcher, first_step
        self._cadence = Cadence(options)
        self._error: BaseException | None = None
        self._queue = WriterQueue(self._run_job, queue_size, drain_interval)
        self._optimizers = lt.optimizers_of(optimizer)
        if len(self._optimizers) != len(genesis.all_optimizers):
            raise ConfigurationError(f"the ledger records {len(genesis.all_optimizers)} optimizer(s), "
                                     f"{len(self._optimizers)} given")
        self._slots: list[dict[str, Any]] = [{} for _ in self._optimizers]  # per optimizer, since the last entry
        self._hooks = [hook for k, opt in enumerate(self._optimizers) for hook in (
            opt.register_step_pre_hook(functools.partial(self._pre_step, k)),
            opt.register_step_post_hook(functools.partial(self._post_step, k)))]
        self._logged_hyper = [_hyper(g) for o in genesis.all_optimizers for g in o.param_groups]
        self._last_step_time: float | None = None
        self._tensor_cache: dict[str, torch.Tensor] | None = None
        self._norm_plan: Norms | None = None
        self._last_checkpoint_step = last_checkpoint_step
        self._alive_checkpoints: list[tuple[int, int, CheckpointBody]] = list(alive)  # (seq, step, body)
        self._closed = False

    # ----------------------------------------------------------------- the optimizer hook
    def _pre_step(self, k: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before optimizer k's step (before a scheduler advances): the hyperparameters it uses."""
        self._slots[k].update(lrs=[_float(group["lr"]) for group in optimizer.param_groups],
                              hyper=[_hyper(group) for group in optimizer.param_groups])

    def _post_step(self, k: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        """After optimizer k's step, before ``zero_grad``: the gradients the step used — those of
        the last closure call for ``optimizer.step(closure)`` — as one norm per param group."""
        grad_norms = [total_norm([p.grad for p in group["params"] if p.grad is not None])
                      for group in optimizer.param_groups]
        self._slots[k].update(grad_norms=torch.stack(grad_norms), steps=self._slots[k].get("steps", 0) + 1)

    def _gather(self) -> dict[str, Any]:
        """What the hooks saw since the last entry, every optimizer's groups in order (an optimizer
        that took no step contributes its current learning rates and zero gradient norms)."""
        slots, self._slots = self._slots, [{} for _ in self._optimizers]
        each = [int(slot.get("steps", 0)) for slot in slots]
        if not any("lrs" in slot for slot in slots):
            return {"steps": sum(each)}
        lrs: list[float] = []
        hyper: list[dict[str, Any]] = []
        grads: list[torch.Tensor] = []
        for opt, slot in zip(self._optimizers, slots, strict=True):
            groups = opt.param_groups
            lrs += slot.get("lrs") or [_float(g["lr"]) for g in groups]
            hyper += slot.get("hyper") or [_hyper(g) for g in groups]
            grads.append(slot["grad_norms"] if "grad_norms" in slot else torch.zeros(len(groups), dtype=torch.float64))
        hook = {"steps": sum(each), "lrs": lrs, "hyper": hyper, "grad_norms": torch.cat([g.cpu() for g in grads])}
        if len(each) > 1:
            hook["each"] = each
        return hook

    # ----------------------------------------------------------------- per step
    def step(self, loss: Any = None, batch: Any = None, **metrics: Any) -> None:
        """Record optimizer step ``self.current_step`` (call once per optimizer step, after it).
        ``loss`` and metrics may be floats or tensors; ``batch`` (any pytree of tensors) is digested."""
        self._raise_background_error()
        cadence = self._cadence
        now = time.perf_counter()
        if self._last_step_time is not None:
            cadence.periods.append(now - self._last_step_time)
        step = self._step
        if step % RECALIBRATE_EVERY == 1:
            self._tensor_cache = None  # a module may have reassigned a parameter or buffer
            cadence.calibrate()
        values = {} if loss is None else {"loss": _detached(loss)}
        values.update({name: _detached(v) for name, v in metrics.items()})
        hook = self._gather()
        t0 = time.perf_counter()
        tensors = self._tensors()
        with torch.no_grad():
            if self._norm_plan is None:
                self._norm_plan = Norms(list(tensors.values()))
            norms = self._norm_plan.measure(list(tensors.values()))
        t1 = time.perf_counter()
        cadence.costs["norms"].append(t1 - t0)
        sketch = None
        if cadence.sketch_due(step):
            sketch = self._sketcher(tensors)
            cadence.costs["sketch"].append(time.perf_counter() - t1)
        digests = None
        if cadence.digests:
            t2 = time.perf_counter()
            digests = lt.torch_digests(tensors)
            cadence.costs["digests"].append(time.perf_counter() - t2)
        due = bool(self.checkpoint_every) and (step + 1) % int(self.checkpoint_every or 1) == 0
        batch_d = lt.batch_digest(batch) if batch is not None else None  # now: the caller may reuse the buffers
        self._queue.put(lambda: self._append(Kind.STEP, step, self._step_body(values, hook, norms, sketch, digests,
                                                                              batch_d)))
        self._step = step + 1
        if due:
            self._checkpoint(step)
        self._last_step_time = time.perf_counter()

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The fingerprinted tensors (cached with their norm blocks; refreshed at each calibration)."""
        if self._tensor_cache is None:
            self._norm_plan = None
            state = self.model.state_dict(keep_vars=True)
            self._tensor_cache = {name: state[name] for name in self._names}
        return self._tensor_cache

    def _step_body(self, values: dict[str, Any], hook: dict[str, Any], norms: Pending,
                   sketch: np.ndarray | None, digests: dict[str, bytes] | None, batch_d: bytes | None) -> StepBody:
        metrics = {name: float(v) for name, v in values.items()}
        carries = ["norms"]
        lrs = grad_norms = hyper = None
        if hook.get("lrs") is not None:
            metrics.setdefault("lr", hook["lrs"][0])
            lrs = np.asarray(hook["lrs"], dtype=np.float64)
        if hook.get("grad_norms") is not None:
            grad_norms = hook["grad_norms"].cpu().numpy()
            metrics.setdefault("grad_norm", float(np.sqrt(np.square(grad_norms).sum())))
        if hook.get("hyper") is not None and hook["hyper"] != self._logged_hyper:
            hyper = self._logged_hyper = hook["hyper"]
        if sketch is not None:
            carries.append("sketch")
        if digests is not None:
            carries.append("digests")
        if batch_d is not None:
            carries.append("batch")
        return StepBody(norms=norms.value(), metrics=metrics, optimizer_steps=int(hook.get("steps", 0)),
                        optimizer_steps_each=hook.get("each"),
                        lrs=lrs, grad_norms=grad_norms, sketch=sketch, hyper=hyper,
                        tensor_digests=b"".join(digests[name] for name in self._names) if digests else None,
                        model_digest=model_digest(digests) if digests else None, batch_digest=batch_d,
                        carries=tuple(carries))

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint(self, step: int) -> None:
        snap = lt.snapshot(step, self.model, self.optimizer, self.scheduler)
        self._last_checkpoint_step = step
        self._queue.put(lambda: self._write_checkpoint(snap))

    def _write_checkpoint(self, snap: lt.Snapshot) -> None:
        directory, digests = lt.write_checkpoint(snap, self.checkpoint_root)
        self._writer.sync()
        body = CheckpointBody.of(digests, _relative(directory, self.path),
                                 [{k: v for k, v in g.items() if k != "params"} for g in snap.meta["param_groups"]])
        seq = self._append(Kind.CHECKPOINT, snap.step, body)
        self._writer.sync()
        self._alive_checkpoints.append((seq, snap.step, body))
        self._apply_retention()

    def _apply_retention(self) -> None:
        if not self.keep:
            return
        mode, n = self.keep
        alive = self._alive_checkpoints
        if mode == "last":
            drop = alive[:-n] if len(alive) > n else []
        else:  # every n-th checkpoint by position, the init state and the newest stay
            drop = [c for i, c in enumerate(alive[:-1]) if i % n and c[1] != -1]
        for seq, step, body in drop:
            shutil.rmtree(checkpoint_directory(self.path, body), ignore_errors=True)
            self._append(Kind.PRUNE, step, PruneBody(seq, body.state_digest, f"retention: keep {mode} {n}"))
            alive.remove((seq, step, body))

    # ----------------------------------------------------------------- background writer
    def _append(self, kind: Kind, step: int, body: Body) -> int:
        """Append one typed entry (on the writer thread, or the caller's once it has stopped);
        returns its seq."""
        return self._writer.append(kind, step, body.to_body()).seq

    def _run_job(self, job: Callable[[], Any]) -> None:
        try:
            if self._error is None:
                job()
        except BaseException as exc:  # surfaced on the training thread at the next call
            self._error = exc

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, LedgerError):
                raise error
            if isinstance(error, OSError):
                raise StorageError(f"the ledger's background writer could not write: {error}") from error
            raise error

    def flush(self) -> None:
        """Return once everything queued so far is appended to the ledger."""
        self._queue.join()
        self._raise_background_error()

    @property
    def current_step(self) -> int:
        """The step number the next ``step()`` call records."""
        return self._step

    # ----------------------------------------------------------------- closing
    def close(self, final_weights: str | os.PathLike[str] | None = None) -> None:
        """Drain the queue, checkpoint the final state (when checkpointing), save the final weights
        as safetensors at ``final_weights`` (or fingerprint the file already there, which must hold
        this model's weights), and seal the ledger with their digests, the entry count and head."""
        if self._closed:
            return
        last = self._step - 1
        if self.checkpoint_every and self._last_checkpoint_step != last:
            self._checkpoint(last)
        self.flush()
        live = lt.torch_digests(self._tensors())
        file = None
        if final_weights is not None:
            target = Path(final_weights)
            if target.exists():
                on_disk = safetensors_digests(target)
                if on_disk != live:
                    differ = sorted(set(on_disk) ^ set(live) | {n for n in live if on_disk.get(n) != live[n]})
                    raise ConfigurationError(f"{target} does not hold this model's current weights "
                                             f"(differs in {', '.join(differ[:5])}); not sealing")
            else:
                from safetensors.torch import save_model

                target.parent.mkdir(parents=True, exist_ok=True)
                save_model(self.model, str(target))
                if safetensors_digests(target) != live:
                    raise FormatError(f"{target} was written but does not read back to the same weights")
            file = target.name
        self._stop_thread()
        seal = SealBody(0, b"", b"", FinalWeights(live, model_digest(live), file), self._step)
        self._writer.seal(seal.recorder_fields(), step=last)
        self._closed = True

    def abort(self) -> None:
        """Stop recording without sealing: everything queued is written, the ledger stays valid and
        unsealed (verify reports it as such)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._stop_thread()
            self._writer.close()
            self._closed = True

    def _stop_thread(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._queue.stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self.abort()
        warnings.warn(f"training raised {exc_type.__name__}; the ledger at {self.path} is valid but unsealed "
                      f"(last recorded step {self._step - 1})", RuntimeWarning, stacklevel=2)

    # ----------------------------------------------------------------- resume
    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, model: Any, optimizer: Any, key: Any, scheduler: Any = None,
               passphrase: bytes | None = None, keep: tuple[str, int] | None = None, queue_size: int = 256,
               drain_interval: float = 0.05, fsync: str = "group") -> Recorder:
        """Continue a crashed run: load the last durable checkpoint (its digests checked against
        the ledger), restore model, optimizer, scheduler and RNG states, append a ``resume`` entry
        marking the step entries recorded after that checkpoint as superseded, and go on."""
        _check_checkpointing(None, keep)
        root = Path(path)
        entries = list(Ledger(root).entries())
        genesis = Genesis.from_body(entries[0].body())
        if not genesis.recorded or genesis.fingerprints is None:
            raise ConfigurationError(f"{path} was not written by the recorder; it cannot be resumed")
        checkpoints = [(e, CheckpointBody.from_body(e.body())) for e in entries if e.kind is Kind.CHECKPOINT]
        if not checkpoints:
            raise ConfigurationError(f"{path} holds no checkpoint to resume from (record with checkpoint_every=)")
        last, body = checkpoints[-1]
        directory = checkpoint_directory(root, body)
        if digests_of(directory).state_digest != body.state_digest:
            raise FormatError(f"checkpoint {directory} does not match its ledger entry (seq {last.seq}); "
                              "refusing to resume from it")
        lt.restore(directory, model, optimizer, scheduler)
        superseded = [e for e in entries if e.seq > last.seq and e.kind is Kind.STEP]
        writer = LedgerWriter.open(path, key, passphrase=passphrase, fsync=fsync)
        span = Superseded(superseded[0].seq, superseded[-1].seq, (superseded[0].step, superseded[-1].step),
                          len(superseded)) if superseded else None
        writer.append(Kind.RESUME, last.step, ResumeBody(last.seq, last.step, body.state_digest,
                                                         writer.recovery.torn_bytes, span).to_body())
        writer.sync()
        policy = genesis.fingerprints
        options = FingerprintOptions(policy.sketch, policy.digests, policy.sketch_k)
        pruned = {PruneBody.from_body(e.body()).state_digest for e in entries if e.kind is Kind.PRUNE}
        recorder = cls.__new__(cls)
        recorder._attach(root, model, optimizer, scheduler, writer, genesis, options,
                         lt.CountSketch(policy.sketch_seed, policy.sketch_k), first_step=last.step + 1, keep=keep,
                         queue_size=queue_size, drain_interval=drain_interval, last_checkpoint_step=last.step,
                         alive=[(e.seq, e.step, b) for e, b in checkpoints if b.state_digest not in pruned])
        return recorder


def _options(fingerprints: FingerprintOptions | None, deprecated: dict[str, Any]) -> FingerprintOptions:
    """The fingerprint policy; ``sketch=``, ``digests=``, ``sketch_k=`` keywords (before 0.2) still
    work one release, with a warning."""
    unknown = sorted(set(deprecated) - {"sketch", "digests", "sketch_k"})
    if unknown:
        raise TypeError(f"Recorder() got an unexpected keyword argument {unknown[0]!r}")
    if not deprecated:
        return fingerprints or FingerprintOptions()
    warnings.warn(f"Recorder({', '.join(f'{k}=' for k in sorted(deprecated))}…) is deprecated: pass "
                  "fingerprints=FingerprintOptions(...)", DeprecationWarning, stacklevel=3)
    return dataclasses.replace(fingerprints or FingerprintOptions(), **deprecated)


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


HYPER_KEYS = ("betas", "momentum", "weight_decay", "eps", "dampening", "nesterov")


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a param group that a scheduler may move (besides the lr), as logged."""
    out: dict[str, Any] = {}
    for key in HYPER_KEYS:
        if key in group:
            value = group[key]
            out[key] = [_float(v) for v in value] if isinstance(value, (list, tuple)) else \
                value if isinstance(value, bool) else _float(value)
    return out


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _relative(directory: Path, root: Path) -> str:
    try:
        return str(directory.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(directory.resolve())


def _check_checkpointing(checkpoint_every: int | None, keep: Any) -> None:
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigurationError("checkpoint_every must be a positive number of steps")
    if keep is not None and not (isinstance(keep, tuple) and len(keep) == 2 and keep[0] in ("last", "every")
                                 and isinstance(keep[1], int) and keep[1] >= 1):
        raise ConfigurationError("keep must be None, ('last', n) or ('every', n)")
