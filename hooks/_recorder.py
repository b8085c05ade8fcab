"""The PyTorch recorder: genesis, one signed entry per optimizer step, checkpoints, seal, resume."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ledger import _dcp
from ledger import torch as lt
from ledger._filehash import threads
from ledger._fingerprint import model_digest, safetensors_digests
from ledger._record import Kind
from ledger._schema import CheckpointBody, FinalWeights, Genesis, SealBody
from ledger._writer import LedgerWriter
from ledger.errors import ConfigurationError, FormatError, LedgerError, StorageError
from ledger.hooks import _distributed, _resume
from ledger.hooks._capture import Capture, detached, hookable, reads_gradients
from ledger.hooks._checkpointing import Alive, Body, Checkpoints, reason, undo_construction
from ledger.hooks._failures import Failures, Job
from ledger.hooks._genesis import build_genesis
from ledger.hooks._norms import Norms
from ledger.hooks._options import (
    RECALIBRATE_EVERY,
    Cadence,
    FingerprintOptions,
    check_checkpointing,
    check_queue,
    writer_interval,
)
from ledger.hooks._options import resolve as resolve_options
from ledger.hooks._queue import WriterQueue
from ledger.hooks._sharded import sharded_state
from ledger.hooks._sharded_run import ShardedRun, group_grad_norms, is_sharded, refuse
from ledger.hooks._tsa import Timestamper, TsaOptions, options_of, timestamps_field

MAX_LAG = 1.0  # seconds: the default time bound on what waits unwritten
COPY_FLOOR = 4 << 20  # bytes of batch copies that may wait for the writer thread, whatever the model


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

    ``tsa``: the URL of an RFC 3161 time-stamping authority (or :class:`ledger.hooks._tsa.TsaOptions`):
    every signed tree head (at each checkpoint, and the seal's) is timestamped on a background
    thread — training never waits on it; a failure is retried with backoff — and the tokens go into
    the next entry's ``timestamps`` and ``heads/<size>.tsr``; the seal records the heads still
    unstamped after a bounded wait (docs/FORMAT.md §13, ``ledger verify --tsa-roots``).

    ``framework``: what genesis records about a training framework driving the recorder (its name,
    version, and how its step numbers, loss, gradient norm and batches map to the ledger's); the
    framework callbacks (:mod:`ledger.hooks.lightning`, :mod:`ledger.hooks.transformers`) fill it.
    ``optimizer`` may be a framework's wrapper (accelerate, Lightning): the torch optimizer inside is
    recorded.

    **torch.distributed.** Construct the recorder on every rank with the same arguments and call it at
    the same points: global rank 0 writes the one ledger, every other rank gets a
    :class:`ledger.hooks._distributed.Follower` that writes nothing and takes part in the collectives
    (docs/FRAMEWORKS.md); rank 0's settings (``checkpoint_every``, whether it records at all) are
    the ones every rank follows. A ``DistributedDataParallel`` model is recorded as the module it
    wraps. ``distributed=False``: this process records on its own, as if it were alone (construct it
    on one rank only; nothing about the other ranks is recorded).

    **What a crash can lose.** ``step`` returns (the step is *acknowledged*) once its entry is
    queued; a background thread appends queued entries every ``drain_interval`` seconds (by
    default the lesser of 0.25 s and ``max_lag``/4, and a checkpoint's snapshot at once: a round of
    several entries costs about half the CPU per entry of a round of one or two, whose code and data
    the training step has evicted from the caches; an explicit interval is the writer's only clock). Two bounds
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
                 keep: tuple[str, int] | None = None, queue_size: int = 256, drain_interval: float | None = None,
                 passphrase: bytes | None = None, recipe: Any = None, determinism: Mapping[str, Any] | None = None,
                 base: Mapping[str, Any] | None = None, fsync: str = "group",
                 clock: Callable[[], int] = time.time_ns, max_lag: float = MAX_LAG,
                 framework: Mapping[str, Any] | None = None, distributed: bool | None = None,
                 mlflow: Any = None, tsa: str | TsaOptions | None = None, **deprecated: Any) -> None:
        group = _distributed.ranks(distributed)
        with _distributed.announce(group) as told:  # every rank learns whether the model is sharded, or why not
            options = resolve_options(fingerprints, deprecated)
            check_checkpointing(checkpoint_every, keep)
            check_queue(queue_size, drain_interval, max_lag)
            stamping = options_of(tsa)
            hookable(optimizer)  # nothing is written for an optimizer the recorder cannot hook
            model = _distributed.unwrap_model(model)
            run_id = secrets.token_hex(16)
            sketch_seed = int.from_bytes(hashlib.sha256(b"sketch/" + run_id.encode()).digest()[:8], "big") >> 1
            sharded = ShardedRun(model, sketch_seed, options.sketch_k) if is_sharded(model) else None
            if sharded is not None and checkpoint_every:
                raise refuse("checkpoint_every")
            told({"sharded": (sketch_seed, options.sketch_k, sharded.skip) if sharded else None,
                  "checkpoint_every": checkpoint_every,  # the followers adopt rank 0's settings
                  "gradients": reads_gradients(optimizer, options.grad_norms)})
        with _distributed.announce(group) as told:  # every rank learns the run id, or why there is none
            tensors, aliases = sharded_state(model) if sharded else lt.canonical_state(model)
            sketcher = lt.CountSketch(sketch_seed, options.sketch_k,
                                      sharded.skip if sharded else lt.buffer_names(model, tensors))
            root = Path(path)
            config, mirror = _mlflow_config(mlflow, config)  # the run exists before genesis names it
            user_dir = str(Path(checkpoint_dir).absolute()) if checkpoint_dir and \
                Path(checkpoint_dir).absolute() != (root / "checkpoints").absolute() else None
            genesis = build_genesis(model=model, optimizer=optimizer, scheduler=scheduler, seed=int(seed),
                                    config=config, tensors=tensors, aliases=aliases, options=options,
                                    sketcher=sketcher, recipe=recipe, determinism=determinism,
                                    checkpoint_every=checkpoint_every, checkpoint_dir=user_dir, keep=keep, base=base,
                                    framework=framework, sharded=sharded,
                                    distributed=group.describe(sharded is not None) if group else None)
            existed = os.path.lexists(root)  # create() takes only an absent or empty directory
            with _resume.storage(f"create the ledger at {root}", "give a writable directory with free space"):
                writer = LedgerWriter.create(path, key, genesis=genesis.to_body(), run_id=run_id,
                                             passphrase=passphrase, clock=clock, fsync=fsync)
            told(run_id)
        ranks = group.digests(model) if group and checkpoint_every else None  # before anything here can fail
        made: Path | None = None  # the init checkpoint's directory, when this call created it
        try:
            with _distributed.announce(group) as told:  # every rank learns that the recorder is set up, or why not
                self._attach(root, model, optimizer, scheduler, writer, genesis, options, sketcher, first_step=0,
                             keep=keep, queue_size=queue_size, drain_interval=drain_interval, max_lag=max_lag,
                             last_checkpoint_step=-1 if checkpoint_every else None, sharded=sharded, group=group,
                             tsa=stamping)
                if checkpoint_every:  # the init state, before returning: a run killed later can always resume
                    snap = self._checkpoints.take(-1, model, optimizer, scheduler)
                    with _resume.storage(f"write the init checkpoint under {self.checkpoint_root}",
                                         f"nothing was left at {root}: free space or fix permissions and start again"):
                        directory, digests, created = self._checkpoints.store(snap)
                        made = directory if created else None
                        self._checkpoints.enter(snap, directory, digests, created, ranks)
                told(None)
            if mirror is not None:
                self._start_mirror(*mirror)
        except BaseException:
            if hasattr(self, "_queue"):
                self._stop_thread()
            stamper: Timestamper | None = getattr(self, "_tsa", None)
            if stamper is not None:
                stamper.stop()
            writer.release()
            undo_construction(root, existed, made)
            raise

    def __new__(cls, *args: Any, **kwargs: Any) -> Recorder:
        if cls is Recorder and _distributed.follower(kwargs.get("distributed")):  # a rank that does not write
            return cast(Recorder, _distributed.Follower(*args, **kwargs))
        return super().__new__(cls)

    def _attach(self, path: Path, model: Any, optimizer: Any, scheduler: Any, writer: LedgerWriter,
                genesis: Genesis, options: FingerprintOptions, sketcher: lt.CountSketch, *, first_step: int,
                keep: tuple[str, int] | None, queue_size: int, drain_interval: float | None, max_lag: float,
                last_checkpoint_step: int | None = None,
                alive: Sequence[Alive] = (), sharded: ShardedRun | None = None,
                group: _distributed.Ranks | None = None, tsa: TsaOptions | None = None) -> None:
        """Set up recording onto ``writer`` from step ``first_step`` (a new run or a resumed one)."""
        self._sharded = sharded
        tensors = sharded.tensors() if sharded else lt.canonical_state(model)[0]
        if list(tensors) != genesis.tensor_order:
            raise ConfigurationError("this model's tensors differ from the ledger's genesis architecture")
        self.path, self.model, self.optimizer, self.scheduler = path, model, optimizer, scheduler
        self.seed, self.checkpoint_every, self.keep = int(genesis.seed or 0), genesis.checkpoint_every, keep
        self._genesis = genesis
        self._ranks = group
        self._names = list(tensors)
        self._writer, self._sketcher, self._step = writer, sketcher, first_step
        self._cadence = Cadence(options)
        lock = threading.Lock()  # background failures: set on the writer thread, taken on the training one
        self._checkpoints = Checkpoints(path, genesis, writer, self._append, keep=keep, lock=lock,
                                        last_step=last_checkpoint_step, alive=alive)
        self.checkpoint_root = self._checkpoints.root
        self._failures = Failures(writer, self._checkpoints, lock)
        self._closed = False
        self._queue = WriterQueue(self._failures.run, queue_size, writer_interval(drain_interval, max_lag), max_lag)
        # at the default rounds a snapshot (a copy of the training state) is written at once; an explicit
        # drain_interval is the writer's only clock, as its caller asked
        self._snapshot_wakes = drain_interval is None
        self._capture = Capture(optimizer, genesis, self._names,  # the optimizer step hooks
                                group_grad_norms if sharded else None, reads_gradients(optimizer, options.grad_norms))
        self._last_step_time: float | None = None
        self._tensor_cache: dict[str, torch.Tensor] | None = None
        self._homes: list[tuple[dict[str, Any], str, torch.Tensor]] = []  # where each cached tensor lives
        self._tensor_list: list[torch.Tensor] = []
        # batch copies waiting for the writer thread: at most 5% of the model's bytes (4 MiB at least)
        self._copies = lt.CopyAllowance(max(COPY_FLOOR, sum(t.nbytes for t in tensors.values()) // 20))
        self._norm_plan: Norms | None = None
        self._mirror: Any = None  # the MLflow mirror (ledger.hooks.mlflow.Mirror), when mirroring
        self._tsa = Timestamper(tsa, path / "heads").start() if tsa is not None else None
        if self._tsa is not None:
            writer.on_head = self._tsa.submit  # each head, once heads/<size>.note is durable
            self._tsa.catch_up(path)  # a resumed run: heads an earlier process left unstamped

    def _start_mirror(self, sink: Any, config: Mapping[str, Any], created: bool) -> None:
        from ledger.hooks import mlflow as mirroring

        self._mirror = mirroring.start(sink, config, self.path, created)
        self._mirror_timeout = float(sink.close_timeout)

    # ----------------------------------------------------------------- per step
    def step(self, loss: Any = None, batch: Any = None, **metrics: Any) -> None:
        """Record optimizer step ``self.current_step`` (call once per optimizer step, after it).
        ``loss`` and metrics may be floats or tensors; ``batch`` (any pytree of tensors) is digested."""
        self._refuse_closed("step")
        self._failures.raise_pending(self._queue)
        cadence = self._cadence
        now = time.perf_counter()
        if self._last_step_time is not None:
            cadence.periods.append(now - self._last_step_time)
        step = self._step
        recalibrated = cadence.tick(step)
        if step % RECALIBRATE_EVERY == 1:
            self._tensor_cache = None  # a module may have replaced a tensor in a way _tensors does not see
        values = {} if loss is None else {"loss": detached(loss)}
        if metrics:
            values.update({name: detached(v) for name, v in metrics.items()})
        slots = self._capture.gather()
        tensors = self._tensors()
        if self._sharded is not None:  # the same collectives on every rank
            if self._ranks is not None:
                ShardedRun.sync(step, cadence, self._ranks, recalibrated)
            self._enqueue(step, values, slots, *self._sharded.measure(step, tensors, cadence), batch)
            return
        plan = self._norm_plan
        if plan is None or not plan.current(self._tensor_list):  # built, or a storage was replaced
            plan = self._norm_plan = Norms(self._tensor_list, previous=plan)
        self._enqueue(step, values, slots, *cadence.take(  # norms and sketch are finished on the writer thread
            step, lambda: plan.measure(self._tensor_list), lambda: self._sketcher.measure(tensors),
            lambda: lt.torch_digests(tensors)), batch)

    def _enqueue(self, step: int, values: dict[str, Any], slots: list[dict[str, Any]], norms: Any, sketch: Any,
                 digests: dict[str, bytes] | None, batch: Any) -> None:
        """Queue step ``step``'s entry (encoded and appended on the writer thread), then its checkpoint
        when one is due. A batch due for its digest is copied now (the caller may reuse its buffers)
        and digested on the writer thread, or digested now when it is large."""
        leaves = None
        if batch is not None and self._cadence.due("batch", step):
            t0 = time.perf_counter()
            leaves = lt.BatchLeaves(batch, allowance=self._copies)
            self._cadence.measured("batch", time.perf_counter() - t0)
        capture = self._capture
        self._queue.put(Job(lambda: self._append(Kind.STEP, step, capture.body(
            values, slots, norms, sketch, digests, leaves.digest() if leaves is not None else None)), step))
        self._step = step + 1
        if bool(self.checkpoint_every) and (step + 1) % int(self.checkpoint_every or 1) == 0:
            self._checkpoint(step)
        self._last_step_time = time.perf_counter()

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The fingerprinted tensors (cached with their norm blocks; refreshed at each calibration, and
        when a module put another tensor in the place of one: ``self.ema = 0.9 * self.ema + …``)."""
        if any(table.get(key) is not tensor for table, key, tensor in self._homes):
            self._tensor_cache = None
        if self._tensor_cache is None and self._sharded is not None:
            self._tensor_cache = self._sharded.tensors()
        if self._tensor_cache is None:  # the norm plan follows by itself (Norms.current)
            state = self.model.state_dict(keep_vars=True)
            gone = [name for name in self._names if name not in state]
            if gone:
                names = ", ".join(gone[:3]) + (" …" if len(gone) > 3 else "")
                raise ConfigurationError(f"the model no longer has {names} (set to None or deleted): the recorder "
                                         "fingerprints the tensors the model had when it started; keep them in it")
            self._tensor_cache = {name: state[name] for name in self._names}
            self._tensor_list = list(self._tensor_cache.values())
            self._homes = _homes(self.model, self._tensor_cache)
        return self._tensor_cache

    def _checkpoint(self, step: int) -> None:
        ranks = self._ranks.digests(self.model) if self._ranks else None
        snap = self._checkpoints.take(step, self.model, self.optimizer, self.scheduler)
        self._queue.put(Job(lambda: self._checkpoints.write(snap, ranks)), wake=self._snapshot_wakes)

    def checkpoint(self) -> dict[str, Any]:
        """Write a checkpoint of the training state after the last recorded step now (unless one of
        it exists) and return once it is durable, with :meth:`cursor`. A framework calls this where it
        saves its own checkpoint, so that both hold the same state and the framework checkpoint can
        carry the cursor (``Recorder.resume(..., at=cursor)`` continues from it)."""
        self._refuse_closed("checkpoint")
        if self._sharded is not None:
            raise refuse("checkpoint()")
        if self._checkpoints.last_step != self._step - 1:
            self._checkpoint(self._step - 1)
        self.flush()
        return self.cursor()

    def record_dcp(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Record a ``torch.distributed.checkpoint`` directory just saved (call on every rank once
        ``dcp.save(..., checkpoint_id=directory)`` returned): a checkpoint entry of layout ``"dcp"``
        at the last recorded step holds the signed manifest of its files (each rank hashes the files
        it wrote), so ``ledger verify --checkpoints DIR`` can check the directory (docs/FORMAT.md
        §11.1). Returns once the entry is durable, with :meth:`cursor`."""
        self._refuse_closed("record_dcp")
        where = Path(directory)
        return self._manifest(CheckpointBody.dcp(_distributed.dcp_manifest(self._ranks, where), str(where.absolute())))

    def record_files(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Record a checkpoint directory this process (rank 0) wrote with another tool — a Hugging Face
        Trainer ``checkpoint-N/``, subdirectories included: a checkpoint entry of layout ``"files"``
        at the last recorded step holds the signed manifest of every file in it, which ``ledger verify
        --checkpoints DIR`` checks (docs/FORMAT.md §11.1). No collective: other ranks' calls do
        nothing. Returns once the entry is durable, with :meth:`cursor`."""
        self._refuse_closed("record_files")
        where = Path(directory)
        try:
            files = _dcp.tree_files(where)
        except (LedgerError, OSError) as exc:
            raise ConfigurationError(f"could not record the files of {where}: {reason(exc)}") from None
        return self._manifest(CheckpointBody.dcp(files, str(where.absolute()), "files"))

    def _manifest(self, body: CheckpointBody) -> dict[str, Any]:
        """Append a manifest's checkpoint entry at the last recorded step, durably; the cursor."""
        step = self._step - 1
        self._queue.put(Job(lambda: self._append(Kind.CHECKPOINT, step, body)))
        self.flush()
        return self.cursor()

    def cursor(self) -> dict[str, Any]:
        """Where the chain stands (JSON-able): run id, last recorded step, seq and hash of the last
        appended entry, and the last checkpoint appended ({step, state_digest}) or None. Entries still
        queued are not counted: call after :meth:`flush` or :meth:`checkpoint`."""
        alive = self._checkpoints.alive
        last = {"step": alive[-1][1], "state_digest": alive[-1][2].state_digest.hex()} if alive else None
        return {"run_id": self._writer.run_id, "step": self._step - 1, "seq": self._writer.next_seq - 1,
                "head": self._writer.head.hex(), "checkpoint": last}

    # ----------------------------------------------------------------- background writer
    def _append(self, kind: Kind, step: int, body: Body) -> int:
        """Append one typed entry (on the writer thread, or the caller's once it has stopped);
        returns its seq. Timestamp tokens that arrived since the last entry go into this one."""
        tokens = self._tsa.take() if self._tsa is not None else []
        fields = {**body.to_body(), **timestamps_field(tokens)}
        try:
            return self._writer.append(kind, step, fields).seq
        except BaseException:
            if tokens and self._tsa is not None:
                self._tsa.give_back(tokens)
            raise

    def flush(self) -> None:
        """Return once everything queued so far is appended to the ledger and durable (fsync);
        raise a background failure."""
        self._refuse_closed("flush")
        if not self._queue.stopped:  # stopped by a close() that failed after it
            self._queue.join()
        if self._failures.broken is None:
            try:
                self._writer.sync()
            except StorageError as exc:
                self._failures.broken = exc
        self._failures.raise_pending(self._queue)

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
            if self._tsa is not None:
                self._tsa.finish(str(self.path))
            return
        last = self._step - 1
        if self.checkpoint_every and self._checkpoints.last_step != last:
            self._checkpoint(last)
        self.flush()
        if self._sharded is not None:  # every rank: the final digests; the full weights only when asked for
            live, file = cast(tuple[dict[str, bytes], str | None],
                              self._sharded.final(self._tensors(), self._names, final_weights, self._ranks))
        else:
            live, file = self._final(final_weights)
        self._stop_thread()
        mirrored, deadline = None, time.monotonic() + getattr(self, "_mirror_timeout", 0.0)
        if self._mirror is not None:  # how far the mirror got before the seal, recorded in it
            mirrored = self._mirror.settle(self._writer.next_seq - 1, deadline - time.monotonic())
        seal = SealBody(0, b"", b"", FinalWeights(live, model_digest(live), file), self._step, mirrored)
        stamped = self._tsa.seal_fields() if self._tsa is not None else {}  # after a bounded wait
        self._writer.seal({**seal.recorder_fields(), **stamped}, step=last)
        self._closed = True
        if self._tsa is not None:  # a bounded wait for the final head's token; a warning names heads left unstamped
            self._tsa.finish(str(self.path))
        if self._mirror is not None:  # the seal and the parts the close rolled: bounded, never raises
            self._mirror.finish(max(deadline - time.monotonic(), 0.0 if mirrored and mirrored["missing"] else 10.0))

    def _final(self, final_weights: str | os.PathLike[str] | None) -> tuple[dict[str, bytes], str | None]:
        """The final weights' digests, and the file holding them: saved at ``final_weights`` as
        safetensors, or the file already there, which must hold them."""
        live = lt.torch_digests(self._tensors(), workers=threads())  # training is over: every core
        if final_weights is None:
            return live, None
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
        return live, target.name

    def abort(self) -> None:
        """Stop recording without sealing: everything queued that can be written is, the ledger
        stays valid and unsealed (verify reports it as such). Never raises for a background
        failure: one not raised yet, or a log that could not be rolled into a part, is a warning."""
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        if self._mirror is not None:
            self._mirror.stop()
        if self._tsa is not None:
            self._tsa.stop()
        problems = self._failures.problems()
        try:
            self._writer.close()
        except (LedgerError, OSError) as exc:  # the entries stay in wal.log; resume or open recovers them
            self._writer.release()
            problems.append(f"could not close the ledger writer ({reason(exc)}; its entries stay in wal.log)")
        if problems:
            warnings.warn(f"the ledger at {self.path} was aborted after a failure: {'; '.join(problems)}",
                          RuntimeWarning, stacklevel=2)

    def _stop_thread(self) -> None:
        if hasattr(self, "_capture"):
            self._capture.remove()
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
               drain_interval: float | None = None, max_lag: float = MAX_LAG, fsync: str = "group",
               at: Mapping[str, Any] | None = None, distributed: bool | None = None,
               mlflow: Any = None, tsa: str | TsaOptions | None = None) -> Recorder:
        """Continue a crashed run. Before acting on anything the ledger names, check its chain and
        every signature with ``key`` (the writer's; genesis must declare its public key) and that
        every checkpoint path lies inside the checkpoint root; then remove ``.tmp-*`` leftovers,
        load the last intact checkpoint (its files match its entry; a newer damaged or missing one
        is passed over), restore model, optimizer, scheduler and RNG states, append a ``resume``
        entry marking the step entries recorded after that checkpoint as superseded, and go on.

        ``at``: a framework (Lightning, the HF Trainer) already restored model, optimizer and
        scheduler from its own checkpoint, which carried this :meth:`cursor`: the ledger checkpoint
        the cursor names must be in the chain and the live model and optimizer digests must equal
        it (a one-line :class:`ConfigurationError` otherwise); nothing is restored from the ledger.
        Under torch.distributed call it on every rank (rank 0 writes), or pass ``distributed=False``
        on the one rank that records.

        ``mlflow``: a run recorded with ``mlflow=`` goes on mirroring into the same MLflow run (genesis
        ``config["mlflow"]`` names it); ``False`` stops mirroring, an ``MlflowSink`` overrides where.
        ``tsa``: timestamp the heads written from now on (as ``Recorder(tsa=...)``)."""
        group = _distributed.ranks(distributed)
        if group is not None and group.rank:
            run_id, first, every, directory = _distributed.joined(group)
            if directory is not None:  # rank 0 restored this checkpoint: so does every rank
                _distributed.restore_on_rank(group, Path(directory), model, optimizer, scheduler)
            return cast(Recorder, _distributed.Follower(path, model=model, checkpoint_every=every,
                                                        resumed=(run_id, first)))
        with _distributed.announce(group) as told:
            check_checkpointing(None, keep)
            check_queue(queue_size, drain_interval, max_lag)
            stamping = options_of(tsa)
            root = Path(path)
            model = _distributed.unwrap_model(model)
            writer, plan = _resume.reopen(root, key, passphrase, model, optimizer, scheduler, fsync, at)
            told((writer.run_id, plan.checkpoint.step + 1, plan.genesis.checkpoint_every,
                  None if at is not None else str(plan.directory.absolute())))
        last = plan.checkpoint
        if plan.skipped:
            warnings.warn(f"resumed {root} from the checkpoint at step {last.step}, passing over newer ones: "
                          + "; ".join(f"step {s}: {why}" for s, why in plan.skipped), RuntimeWarning, stacklevel=2)
        policy = plan.genesis.fingerprints
        assert policy is not None
        options = FingerprintOptions(policy.sketch, policy.digests, policy.sketch_k, policy.batch,
                                     policy.overhead_budget, policy.grad_norms)
        recorder = cls.__new__(cls)
        recorder._attach(root, model, optimizer, scheduler, writer, plan.genesis, options,
                         lt.CountSketch(policy.sketch_seed, policy.sketch_k, policy.sketch_skips),
                         first_step=last.step + 1, keep=keep,
                         queue_size=queue_size, drain_interval=drain_interval, max_lag=max_lag,
                         last_checkpoint_step=last.step,
                         alive=[c for c in plan.alive if c[0] <= last.seq], group=group, tsa=stamping)
        recorded = plan.genesis.config.get("mlflow") if isinstance(plan.genesis.config, Mapping) else None
        if mlflow is not False and (mlflow is not None or isinstance(recorded, Mapping)):
            try:
                recorder._start_mirror(*_mlflow_attach(mlflow, recorded))
            except BaseException:
                recorder.abort()
                raise
        return recorder



def _mlflow_config(option: Any, config: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, Any]:
    """Create or attach the MLflow run a ``mlflow=`` option asks for; the config genesis records (with
    ``config["mlflow"]``) and what starting the mirror needs (None when not mirroring)."""
    if option is None or option is False:
        return config, None
    if config is not None and "mlflow" in config:
        raise ConfigurationError("config['mlflow'] is where the recorder names the MLflow run: rename that key")
    from ledger.hooks import mlflow as mirroring

    sink = mirroring.sink_of(option)
    assert sink is not None
    named, created = sink.open(active=option is True)
    return {**(config or {}), "mlflow": named}, (sink, named, created)


def _mlflow_attach(option: Any, recorded: Any) -> tuple[Any, Mapping[str, Any], bool]:
    """For a resume: the run genesis names (or the one an ``MlflowSink`` names), attached."""
    from ledger.hooks import mlflow as mirroring

    sink = mirroring.sink_of(option) if option not in (None, True) else None
    if sink is None:
        if not isinstance(recorded, Mapping) or not recorded.get("run_id"):
            raise ConfigurationError("this ledger's genesis names no MLflow run: pass mlflow=MlflowSink(run_id=…)")
        sink = mirroring.MlflowSink(tracking_uri=recorded.get("tracking_uri"), run_id=str(recorded["run_id"]))
    named = mirroring.named_offline(sink) if sink.run_id else sink.open()[0]
    return sink, named, False


def _homes(model: Any, tensors: Mapping[str, torch.Tensor]) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Where each tensor lives: its module's ``_parameters`` or ``_buffers`` table, its key there,
    and the tensor, so that a step can tell cheaply (~0.1 µs a tensor) that a module put another
    object there. Tensors a state_dict takes from elsewhere (extra state, hooks) are left out."""
    homes = []
    for name, tensor in tensors.items():
        prefix, _, key = name.rpartition(".")
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        for table in (module._parameters, module._buffers):
            if table.get(key) is tensor:
                homes.append((table, key, tensor))
                break
    return homes

