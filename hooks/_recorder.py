"""The PyTorch recorder: genesis, one signed entry per optimizer step, checkpoints, seal, resume."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ledger import torch as lt
from ledger._fingerprint import model_digest, safetensors_digests
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
    checkpoint_root,
)
from ledger._writer import LedgerWriter
from ledger.errors import ConfigurationError, FormatError, LedgerError, StorageError
from ledger.hooks import _resume
from ledger.hooks._genesis import build_genesis
from ledger.hooks._norms import Norms, Pending, total_norm
from ledger.hooks._options import RECALIBRATE_EVERY, Cadence, FingerprintOptions
from ledger.hooks._queue import WriterQueue

Body = StepBody | CheckpointBody | PruneBody
MAX_LAG = 1.0  # seconds: the default time bound on what waits unwritten


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    """A job for the writer thread: ``step`` is the step a step entry records (None for a checkpoint)."""

    run: Callable[[], Any]
    step: int | None = None


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

    ``keep``: checkpoint retention, None (all), ("last", n) or ("every", n).

    **What a crash can lose.** ``step`` returns (the step is *acknowledged*) once its entry is
    queued; a background thread appends queued entries every ``drain_interval`` seconds. Two bounds
    hold what may wait unappended: ``queue_size`` entries and ``max_lag`` seconds — ``step`` waits
    while ``queue_size`` entries wait or an entry queued more than ``max_lag`` seconds earlier is
    not yet appended (a checkpoint being written counts as waiting). So ``kill -9`` loses at most
    the steps acknowledged within ``max_lag`` seconds before the last acknowledged one, and at most
    ``queue_size`` of them; an appended entry survives the process (it is in the OS), and
    :meth:`flush` also makes it survive power loss (fsync). A checkpoint's entry is appended once
    its files are durable. A background failure (a checkpoint that could not be written, the disk
    refusing an append) is raised by the next ``step``, ``flush`` or ``close``.
    """

    def __init__(self, path: str | os.PathLike[str], *, model: Any, optimizer: Any, key: Any, seed: int,
                 checkpoint_every: int | None = None, config: Mapping[str, Any] | None = None, scheduler: Any = None,
                 fingerprints: FingerprintOptions | None = None, checkpoint_dir: str | os.PathLike[str] | None = None,
                 keep: tuple[str, int] | None = None, queue_size: int = 256, drain_interval: float = 0.05,
                 passphrase: bytes | None = None, recipe: Any = None, determinism: Mapping[str, Any] | None = None,
                 base: Mapping[str, Any] | None = None, fsync: str = "group",
                 clock: Callable[[], int] = time.time_ns, max_lag: float = MAX_LAG, **deprecated: Any) -> None:
        options = _options(fingerprints, deprecated)
        _check_checkpointing(checkpoint_every, keep)
        _check_queue(queue_size, drain_interval, max_lag)
        run_id = secrets.token_hex(16)
        sketch_seed = int.from_bytes(hashlib.sha256(b"sketch/" + run_id.encode()).digest()[:8], "big") >> 1
        sketcher = lt.CountSketch(sketch_seed, options.sketch_k)
        tensors, aliases = lt.canonical_state(model)
        root = Path(path)
        user_dir = str(Path(checkpoint_dir).absolute()) if checkpoint_dir and \
            Path(checkpoint_dir).absolute() != (root / "checkpoints").absolute() else None
        genesis = build_genesis(model=model, optimizer=optimizer, scheduler=scheduler, seed=int(seed), config=config,
                                tensors=tensors, aliases=aliases, options=options, sketcher=sketcher, recipe=recipe,
                                determinism=determinism, checkpoint_every=checkpoint_every,
                                checkpoint_dir=user_dir, keep=keep, base=base)
        existed = os.path.lexists(root)  # create() takes only an absent or empty directory
        with _resume.storage(f"create the ledger at {root}", "give a writable directory with free space"):
            writer = LedgerWriter.create(path, key, genesis=genesis.to_body(), run_id=run_id, passphrase=passphrase,
                                         clock=clock, fsync=fsync)
        made: Path | None = None  # the init checkpoint's directory, when this call created it
        try:
            self._attach(root, model, optimizer, scheduler, writer, genesis, options, sketcher, first_step=0,
                         keep=keep, queue_size=queue_size, drain_interval=drain_interval, max_lag=max_lag,
                         last_checkpoint_step=-1 if checkpoint_every else None)
            if checkpoint_every:  # the init state, before returning: a run killed later can always resume
                snap = lt.snapshot(-1, model, optimizer, scheduler)
                with _resume.storage(f"write the init checkpoint under {self.checkpoint_root}",
                                     f"nothing was left at {root}: free space or fix permissions and start again"):
                    directory, digests, created = self._store_checkpoint(snap)
                    made = directory if created else None
                    self._enter_checkpoint(snap, directory, digests, created)
        except BaseException:
            if hasattr(self, "_queue"):
                self._stop_thread()
            writer.release()
            _undo_construction(root, existed, made)
            raise

    def _attach(self, path: Path, model: Any, optimizer: Any, scheduler: Any, writer: LedgerWriter,
                genesis: Genesis, options: FingerprintOptions, sketcher: lt.CountSketch, *, first_step: int,
                keep: tuple[str, int] | None, queue_size: int, drain_interval: float, max_lag: float,
                last_checkpoint_step: int | None = None,
                alive: Sequence[tuple[int, int, CheckpointBody]] = ()) -> None:
        """Set up recording onto ``writer`` from step ``first_step`` (a new run or a resumed one)."""
        tensors, _ = lt.canonical_state(model)
        if list(tensors) != genesis.tensor_order:
            raise ConfigurationError("this model's tensors differ from the ledger's genesis architecture")
        self.path, self.model, self.optimizer, self.scheduler = path, model, optimizer, scheduler
        self.seed, self.checkpoint_every, self.keep = int(genesis.seed or 0), genesis.checkpoint_every, keep
        self.checkpoint_root = checkpoint_root(path, genesis)
        self._genesis = genesis
        self._names = list(tensors)
        self._writer, self._sketcher, self._step = writer, sketcher, first_step
        self._cadence = Cadence(options)
        self._failure: BaseException | None = None  # a background failure not raised yet
        self._checkpoints_failed: list[tuple[int, BaseException]] = []  # (step, why) not raised yet
        self._failure_lock = threading.Lock()  # both are set on the writer thread, taken on the training one
        self._broken: BaseException | None = None  # the append failure that stopped the writer
        self._lost: list[int] = []  # acknowledged steps whose entry was not written
        self._closed = False
        self._queue = WriterQueue(self._run_job, queue_size, drain_interval, max_lag)
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
        self._refuse_closed("step")
        self._raise_failure()
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
        self._queue.put(_Job(lambda: self._append(Kind.STEP, step, self._step_body(values, hook, norms, sketch,
                                                                                   digests, batch_d)), step))
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
        self._queue.put(_Job(lambda: self._checkpoint_job(snap)))

    def _checkpoint_job(self, snap: lt.Snapshot) -> None:
        """On the writer thread: write the files; a failure there is reported and recording goes on
        (step entries do not depend on it); a failure to append the entry stops the writer."""
        try:
            stored = self._store_checkpoint(snap)
        except Exception as exc:  # noqa: BLE001 - reported on the training thread
            with self._failure_lock:
                self._checkpoints_failed.append((snap.step, exc))
            return
        self._enter_checkpoint(snap, *stored)

    def _store_checkpoint(self, snap: lt.Snapshot) -> tuple[Path, Any, bool]:
        """Write a snapshot's files durably under the checkpoint root (directory, digests, and
        whether this run created the directory)."""
        return lt.place_checkpoint(snap, self.checkpoint_root, tag=_resume.run_tag(self._writer.run_id))

    def _enter_checkpoint(self, snap: lt.Snapshot, directory: Path, digests: Any, created: bool) -> None:
        """Append the entry of a written checkpoint (``created``: whether this run made its directory;
        retention never deletes one it did not), then apply retention."""
        self._writer.sync()
        body = CheckpointBody.of(digests, self._stored_path(directory),
                                 [{k: v for k, v in g.items() if k != "params"} for g in snap.meta["param_groups"]],
                                 created)
        seq = self._append(Kind.CHECKPOINT, snap.step, body)
        self._writer.sync()
        self._alive_checkpoints.append((seq, snap.step, body))
        self._apply_retention()

    def _stored_path(self, directory: Path) -> str:
        """A checkpoint's ``path`` (docs/FORMAT.md §11): ``checkpoints/<hex>``, relative to the ledger
        directory, for the default root; the absolute ``<checkpoint_dir>/<hex>`` for a user root."""
        if self._genesis.checkpoint_dir:
            return str(directory.absolute())
        return f"checkpoints/{directory.name}"

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
            # the prune entry first: a kill in between leaves a pruned directory, which resume removes
            self._append(Kind.PRUNE, step, PruneBody(seq, body.state_digest, f"retention: keep {mode} {n}"))
            alive.remove((seq, step, body))
            _resume.remove_checkpoint(self.path, body, self._genesis, [b.state_digest for _, _, b in alive])

    # ----------------------------------------------------------------- background writer
    def _append(self, kind: Kind, step: int, body: Body) -> int:
        """Append one typed entry (on the writer thread, or the caller's once it has stopped);
        returns its seq."""
        return self._writer.append(kind, step, body.to_body()).seq

    def _run_job(self, job: _Job) -> None:
        """Run one job on the writer thread. Once an append has failed on the disk (the writer is
        broken) later jobs are not run and the steps they carry are counted as lost; any other
        failure is kept for the training thread, and later entries are still appended."""
        if self._broken is not None:
            if job.step is not None:
                self._lost.append(job.step)
            return
        try:
            job.run()
        except BaseException as exc:  # surfaced on the training thread at the next call
            if job.step is not None:
                self._lost.append(job.step)
            if isinstance(exc, (StorageError, OSError)) or self._writer.closed:
                self._broken = exc
            else:
                with self._failure_lock:
                    self._failure = self._failure or exc

    def _raise_failure(self) -> None:
        """Raise a background failure on the training thread: once for a failure the writer
        survived, at every call once the writer is broken."""
        if self._broken is not None:
            if not self._queue.stopped:
                self._queue.join()  # every queued step is counted
            raise StorageError(f"the ledger's writer failed ({_reason(self._broken)}); {_steps(self._lost)} "
                               f"acknowledged by step() were not written and no more can be; the ledger is valid "
                               f"up to seq {self._writer.next_seq - 1}: fix the cause, then continue with "
                               "Recorder.resume") from self._broken
        with self._failure_lock:
            failed, self._checkpoints_failed = self._checkpoints_failed, []
            failure = None if failed else self._failure
            if failure is not None:
                self._failure = None
        if failed:  # every checkpoint that failed since the last report, once (another failure comes next)
            failure = _CheckpointFailed(failed, self.checkpoint_root)
        if failure is None:
            return
        lost = f"; {_steps(self._lost)} acknowledged by step() were not written" if self._lost else ""
        self._lost = []
        if isinstance(failure, _CheckpointFailed):
            raise StorageError(f"{failure}{lost}; later step entries are still recorded") from failure.__cause__
        if isinstance(failure, LedgerError):
            raise type(failure)(f"{failure}{lost}") from failure
        raise failure

    def flush(self) -> None:
        """Return once everything queued so far is appended to the ledger and durable (fsync);
        raise a background failure."""
        self._refuse_closed("flush")
        if not self._queue.stopped:  # stopped by a close() that failed after it
            self._queue.join()
        if self._broken is None:
            try:
                self._writer.sync()
            except StorageError as exc:
                self._broken = exc
        self._raise_failure()

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
        if self._writer.sealed:  # an earlier close() sealed, then could not roll (disk full): finish that
            self._writer.close()
            self._closed = True
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
        """Stop recording without sealing: everything queued that can be written is, the ledger
        stays valid and unsealed (verify reports it as such). Never raises for a background
        failure: one not raised yet, or a log that could not be rolled into a part, is a warning."""
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        problems = []
        if self._checkpoints_failed:
            problems.append(str(_CheckpointFailed(self._checkpoints_failed, self.checkpoint_root)))
        if self._broken is not None or self._failure is not None:
            problems.append(f"{_reason(self._broken or self._failure)} ({_steps(self._lost)} not written)")
        try:
            self._writer.close()
        except (LedgerError, OSError) as exc:  # the entries stay in wal.log; resume or open recovers them
            self._writer.release()
            problems.append(f"could not close the ledger writer ({_reason(exc)}; its entries stay in wal.log)")
        if problems:
            warnings.warn(f"the ledger at {self.path} was aborted after a failure: {'; '.join(problems)}",
                          RuntimeWarning, stacklevel=2)

    def _stop_thread(self) -> None:
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        self._queue.stop()

    def _refuse_closed(self, what: str) -> None:
        if self._closed:
            raise ConfigurationError(f"the recorder is closed (close() or abort() was called); {what}() records "
                                     "nothing more: continue with Recorder.resume or start a new Recorder")

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
               drain_interval: float = 0.05, max_lag: float = MAX_LAG, fsync: str = "group") -> Recorder:
        """Continue a crashed run. Before acting on anything the ledger names, check its chain and
        every signature with ``key`` (the writer's; genesis must declare its public key) and that
        every checkpoint path lies inside the checkpoint root; then remove ``.tmp-*`` leftovers,
        load the last intact checkpoint (its files match its entry; a newer damaged or missing one
        is passed over), restore model, optimizer, scheduler and RNG states, append a ``resume``
        entry marking the step entries recorded after that checkpoint as superseded, and go on."""
        _check_checkpointing(None, keep)
        _check_queue(queue_size, drain_interval, max_lag)
        root = Path(path)
        signer = _resume.signer_of(key, passphrase)
        tensors, _ = lt.canonical_state(model)
        plan = _resume.plan(root, signer, {name: tuple(t.shape) for name, t in tensors.items()})
        advice = "check that the ledger directory is writable and has free space"
        with _resume.storage(f"open the ledger at {root} for writing", advice):
            writer = LedgerWriter.open(path, signer, fsync=fsync)
        last, body = plan.checkpoint, plan.body
        try:
            if writer.next_seq != len(plan.entries) or writer.head != plan.entries[-1].hash:
                raise FormatError(f"{root} changed while it was being checked; resume again")
            _resume.clean(root, plan.genesis, plan.pruned, run_id=writer.run_id, recorded=plan.recorded,
                          alive=[b for _, _, b in plan.alive])
            lt.restore(plan.directory, model, optimizer, scheduler)
            superseded = [e for e in plan.entries if e.seq > last.seq and e.kind is Kind.STEP]
            span = Superseded(superseded[0].seq, superseded[-1].seq, (superseded[0].step, superseded[-1].step),
                              len(superseded)) if superseded else None
            with _resume.storage(f"append the resume entry to {root}", advice):
                writer.append(Kind.RESUME, last.step, ResumeBody(last.seq, last.step, body.state_digest,
                                                                 writer.recovery.torn_bytes, span).to_body())
                writer.sync()
        except BaseException:
            _give_up(writer)
            raise
        if plan.skipped:
            warnings.warn(f"resumed {root} from the checkpoint at step {last.step}, passing over newer ones: "
                          + "; ".join(f"step {s}: {why}" for s, why in plan.skipped), RuntimeWarning, stacklevel=2)
        policy = plan.genesis.fingerprints
        assert policy is not None
        options = FingerprintOptions(policy.sketch, policy.digests, policy.sketch_k)
        recorder = cls.__new__(cls)
        recorder._attach(root, model, optimizer, scheduler, writer, plan.genesis, options,
                         lt.CountSketch(policy.sketch_seed, policy.sketch_k), first_step=last.step + 1, keep=keep,
                         queue_size=queue_size, drain_interval=drain_interval, max_lag=max_lag,
                         last_checkpoint_step=last.step,
                         alive=[c for c in plan.alive if c[0] <= last.seq])
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


def _check_checkpointing(checkpoint_every: int | None, keep: Any) -> None:
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigurationError("checkpoint_every must be a positive number of steps")
    if keep is not None and not (isinstance(keep, tuple) and len(keep) == 2 and keep[0] in ("last", "every")
                                 and isinstance(keep[1], int) and keep[1] >= 1):
        raise ConfigurationError("keep must be None, ('last', n) or ('every', n)")


def _check_queue(queue_size: int, drain_interval: float, max_lag: float) -> None:
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ConfigurationError("queue_size must be a positive number of entries")
    if not drain_interval > 0 or not max_lag > 0:
        raise ConfigurationError("drain_interval and max_lag must be positive numbers of seconds")


def _undo_construction(root: Path, existed: bool, made: Path | None) -> None:
    """Remove what a failed ``Recorder()`` made: the ledger directory (emptied, when it was an empty
    directory before) and the init checkpoint's directory in a ``checkpoint_dir``; a warning names
    what could not be removed."""
    left: list[str] = []

    def remove(path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, onerror=lambda function, name, exc: left.append(name))
            else:
                path.unlink()
        except OSError as exc:
            left.append(exc.filename or str(path))

    if made is not None and not made.absolute().is_relative_to(root.absolute()):
        remove(made)
    if not existed:
        remove(root)
    else:
        try:
            children = list(root.iterdir())
        except OSError:
            children = []
        for child in children:
            remove(child)
    if left:
        warnings.warn(f"could not remove {left[0]} after Recorder() failed: delete it", RuntimeWarning, stacklevel=3)


def _give_up(writer: LedgerWriter) -> None:
    """Close a writer on an error path: roll if the disk allows, else release the lock (its entries
    stay in the log, where resume or open recovers them)."""
    try:
        writer.close()
    except (LedgerError, OSError):
        writer.release()


class _CheckpointFailed(Exception):
    """Checkpoints whose files could not be written (the run goes on without them)."""

    def __init__(self, failed: Sequence[tuple[int, BaseException]], root: Path) -> None:
        steps = [step for step, _ in failed]
        reasons = list(dict.fromkeys(_reason(exc) for _, exc in failed))
        which = f"the checkpoint of step {steps[0]}" if len(steps) == 1 else \
            f"the checkpoints of steps {', '.join(map(str, steps))}"
        super().__init__(f"could not write {which} under {root}: {'; '.join(reasons)}")
        self.steps = steps
        self.__cause__ = failed[0][1]


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def _steps(lost: list[int]) -> str:
    """'3 step entries (steps 40–42)', or '0 step entries'."""
    if not lost:
        return "0 step entries"
    span = f"step {lost[0]}" if len(lost) == 1 else f"steps {lost[0]}–{lost[-1]}"
    return f"{len(lost)} step entr{'y' if len(lost) == 1 else 'ies'} ({span})"
