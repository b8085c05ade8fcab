"""The PyTorch recorder: genesis, one signed entry per optimizer step, checkpoints, seal, resume."""

from __future__ import annotations

import collections
import hashlib
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ledger import _environment, _state
from ledger._fingerprint import SKETCH_K, CountSketch, batch_digest, canonical_state, model_digest, torch_digests
from ledger._reader import Ledger
from ledger._record import Kind
from ledger._writer import LedgerWriter
from ledger.errors import ConfigurationError, FormatError, LedgerError
from ledger.hooks._queue import WriterQueue

OVERHEAD_BUDGET = 0.01  # the recorder's target: ≤ 1% of the step time
_RECALIBRATE_EVERY = 50


class Recorder:
    """Records a training run into a signed ledger.

    Three lines in an existing loop::

        rec = Recorder("runs/ledger", model=model, optimizer=opt, key="keys/trainer.pem", seed=seed,
                       checkpoint_every=100, config={...})
        ...  rec.step(loss=loss, batch=(x, y))     # once per optimizer step, after it
        rec.close(final_weights="out/model.safetensors")

    Genesis is written at construction (config, seed, environment, code identity, optimizer
    hyperparameters, architecture and the init fingerprint). ``step`` computes per-tensor norms
    (every step), the count-sketch and full digests (every step when cheap, else at a cadence that
    keeps the overhead near 1%) and hands the entry to a background writer: the training thread
    never waits on disk. Checkpoints (init state, every ``checkpoint_every`` steps, at close) are
    hashed and written off the training thread; their entry is appended once the files are durable.

    ``sketch``: "auto", an interval in steps, or 0 (off). ``digests``: "auto", "every" or
    "checkpoints". ``keep``: checkpoint retention, None (all), ("last", n) or ("every", n).
    Entries wait in a bounded queue (``queue_size``) that a background thread drains every
    ``drain_interval`` seconds: a crash loses at most what waits there.
    """

    def __init__(self, path: str | os.PathLike[str], *, model: Any, optimizer: Any, key: Any, seed: int,
                 checkpoint_every: int | None = None, config: Mapping[str, Any] | None = None, scheduler: Any = None,
                 sketch: str | int = "auto", digests: str = "auto", sketch_k: int = SKETCH_K,
                 checkpoint_dir: str | os.PathLike[str] | None = None, keep: tuple[str, int] | None = None,
                 queue_size: int = 256, drain_interval: float = 0.05, passphrase: bytes | None = None,
                 recipe: Any = None, determinism: Mapping[str, Any] | None = None, fsync: str = "group",
                 clock: Callable[[], int] = time.time_ns, _writer: LedgerWriter | None = None,
                 _genesis: Mapping[str, Any] | None = None, _first_step: int = 0) -> None:
        _check_policy(sketch, digests, checkpoint_every, keep)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.seed, self.checkpoint_every, self.keep = int(seed), checkpoint_every, keep
        self.path = Path(path)
        self._sketch_policy, self._digest_policy = sketch, digests
        tensors, aliases = canonical_state(model)
        self._names = list(tensors)
        self._params = dict(model.named_parameters())
        if _writer is None:
            self.checkpoint_root = Path(checkpoint_dir) if checkpoint_dir else self.path / "checkpoints"
            run_id = _random_run_id()
            sketch_seed = int.from_bytes(hashlib.sha256(b"sketch/" + run_id.encode()).digest()[:8], "big") >> 1
            self._sketcher = CountSketch(sketch_seed, sketch_k)
            init_digests = torch_digests(tensors)
            genesis = self._genesis(config, tensors, aliases, init_digests, sketch_k, sketch_seed, recipe,
                                    determinism)
            self._writer = LedgerWriter.create(path, key, genesis=genesis, run_id=run_id, passphrase=passphrase,
                                               clock=clock, fsync=fsync)
            self._step = 0
        else:
            genesis = dict(_genesis or {})
            policy = genesis["fingerprints"]
            if policy["tensor_order"] != self._names:
                raise ConfigurationError("this model's tensors differ from the ledger's genesis architecture")
            stored = genesis.get("checkpoint_dir")
            self.checkpoint_root = Path(stored) if stored else self.path / "checkpoints"
            self._sketcher = CountSketch(int(policy["sketch_seed"]), int(policy["sketch_k"]))
            self._writer, self._step = _writer, _first_step
        self._error: BaseException | None = None
        self._queue = WriterQueue(self._run_job, queue_size, drain_interval)
        self._hook_state: dict[str, Any] = {"steps": 0}
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self._last_step_time: float | None = None
        self._periods: collections.deque[float] = collections.deque(maxlen=32)
        self._costs: dict[str, collections.deque[float]] = {
            name: collections.deque(maxlen=5) for name in ("norms", "sketch", "digests")}
        self._tensor_cache: dict[str, Any] | None = None
        self._sketch_every = 1 if sketch == "auto" else int(sketch)
        self._digest_every = digests in ("auto", "every")
        self._last_checkpoint_step: int | None = None
        self._alive_checkpoints: list[tuple[int, int, dict[str, Any]]] = []  # (seq, step, entry body)
        self._closed = False
        if _writer is None and checkpoint_every:
            self._checkpoint(-1)

    # ----------------------------------------------------------------- genesis
    def _genesis(self, config: Mapping[str, Any] | None, tensors: dict[str, Any], aliases: dict[str, str],
                 init_digests: dict[str, bytes], sketch_k: int, sketch_seed: int, recipe: Any,
                 determinism: Mapping[str, Any] | None) -> dict[str, Any]:
        device = str(next(iter(tensors.values())).device) if tensors else "cpu"
        names_by_id = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        recipe_files = []
        if recipe is not None:
            import inspect

            source = inspect.getsourcefile(type(recipe))
            recipe_files = [Path(source)] if source else []
        norms = torch.stack([t.detach().double().norm() for t in tensors.values()]).cpu().numpy()
        return {
            "config": dict(config or {}),
            "seed": self.seed,
            "environment": _environment.environment(device),
            "code": _environment.code_identity(recipe_files),
            "recipe": {"class": f"{type(recipe).__module__}.{type(recipe).__qualname__}",
                       "source_sha256": hashlib.sha256(recipe_files[0].read_bytes()).digest() if recipe_files else None,
                       "run_step": "ledger.run_step/v1"} if recipe is not None else None,
            "determinism": dict(determinism or {}),
            "optimizer": {"class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
                          "param_groups": _environment.optimizer_groups(self.optimizer, names_by_id)},
            "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
            "architecture": _environment.architecture(self.model, tensors, aliases),
            "init": {"step": -1, "tensor_digests": init_digests, "model_digest": model_digest(init_digests),
                     "sketch": self._sketcher(tensors), "norms": norms},
            "fingerprints": {"tensor_order": list(tensors), "norms": "every step (L2, float32, tensor_order)",
                             "sketch": self._sketch_policy, "sketch_k": sketch_k, "sketch_seed": sketch_seed,
                             "sketch_kind": "count-sketch/v1", "digests": self._digest_policy,
                             "overhead_budget": OVERHEAD_BUDGET},
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_dir": None if self.checkpoint_root == self.path / "checkpoints" else str(self.checkpoint_root),
            "retention": list(self.keep) if self.keep else "all",
            "step_convention": "step s is the s-th optimizer step; its entry is written after it; init is step -1",
        }

    # ----------------------------------------------------------------- the optimizer hook
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before each optimizer step: learning rates and gradient norms per param group."""
        lrs, grad_norms = [], []
        for group in optimizer.param_groups:
            lr = group["lr"]
            lrs.append(float(lr.item() if hasattr(lr, "item") else lr))
            grads = [p.grad for p in group["params"] if p.grad is not None]
            grad_norms.append(torch.stack(torch._foreach_norm(grads)).double().square().sum().sqrt() if grads
                              else torch.zeros((), dtype=torch.float64))
        self._hook_state.update(lrs=lrs, grad_norms=torch.stack(grad_norms), steps=self._hook_state["steps"] + 1)

    # ----------------------------------------------------------------- per step
    def step(self, loss: Any = None, batch: Any = None, **metrics: Any) -> None:
        """Record optimizer step ``self.current_step`` (call once per optimizer step, after it).
        ``loss`` and metrics may be floats or tensors; ``batch`` (any pytree of tensors) is digested."""
        self._raise_background_error()
        now = time.perf_counter()
        if self._last_step_time is not None:
            self._periods.append(now - self._last_step_time)
        step = self._step
        if step % _RECALIBRATE_EVERY == 1:
            self._calibrate()
        values = {} if loss is None else {"loss": _detached(loss)}
        values.update({name: _detached(v) for name, v in metrics.items()})
        hook = dict(self._hook_state)
        self._hook_state = {"steps": 0}
        t0 = time.perf_counter()
        tensors = self._tensors()
        with torch.no_grad():
            norms = _norms(list(tensors.values()))
        t1 = time.perf_counter()
        self._costs["norms"].append(t1 - t0)
        sketch = None
        if self._sketch_every and step % self._sketch_every == 0:
            sketch = self._sketcher(tensors)
            self._costs["sketch"].append(time.perf_counter() - t1)
        digests = None
        if self._digest_every:
            t2 = time.perf_counter()
            digests = torch_digests(tensors)
            self._costs["digests"].append(time.perf_counter() - t2)
        due = bool(self.checkpoint_every) and (step + 1) % int(self.checkpoint_every or 1) == 0
        batch_d = batch_digest(batch) if batch is not None else None  # now: the caller may reuse the buffers
        self._put(lambda: self._step_entry(step, values, hook, norms, sketch, digests, batch_d))
        self._step = step + 1
        if due:
            self._checkpoint(step)
        self._last_step_time = time.perf_counter()

    def _tensors(self) -> dict[str, Any]:
        """The fingerprinted tensors (cached; refreshed at each calibration in case a module
        reassigned a parameter or buffer)."""
        if self._tensor_cache is None:
            state = self.model.state_dict(keep_vars=True)
            self._tensor_cache = {name: state[name] for name in self._names}
        return self._tensor_cache

    def _calibrate(self) -> None:
        """Choose the sketch cadence and whether full digests go in every step, from the median of
        the recent step times and of the recent costs, so the recorder stays near its budget."""
        self._tensor_cache = None
        if not self._periods:
            return
        budget = OVERHEAD_BUDGET * statistics.median(self._periods)
        if self._sketch_policy == "auto" and self._costs["sketch"]:
            self._sketch_every = max(1, math.ceil(statistics.median(self._costs["sketch"]) / (0.4 * budget)))
        if self._digest_policy == "auto" and self._costs["digests"]:
            self._digest_every = statistics.median(self._costs["digests"]) < 0.5 * budget

    def _step_entry(self, step: int, values: dict[str, Any], hook: dict[str, Any], norms: Any,
                    sketch: np.ndarray | None, digests: dict[str, bytes] | None,
                    batch_d: bytes | None) -> tuple[Kind, int, dict]:
        metrics = {name: float(v) for name, v in values.items()}
        carries = ["norms"]
        body: dict[str, Any] = {"norms": norms.cpu().numpy()}
        if hook.get("lrs") is not None:
            metrics.setdefault("lr", hook["lrs"][0])
            body["lrs"] = np.asarray(hook["lrs"], dtype=np.float64)
            grad_norms = hook["grad_norms"].cpu().numpy()
            body["grad_norms"] = grad_norms
            metrics.setdefault("grad_norm", float(np.sqrt(np.square(grad_norms).sum())))
        body["optimizer_steps"] = int(hook.get("steps", 0))
        if sketch is not None:
            body["sketch"] = sketch
            carries.append("sketch")
        if digests is not None:
            body["tensor_digests"] = b"".join(digests[name] for name in self._names)
            body["model_digest"] = model_digest(digests)
            carries.append("digests")
        if batch_d is not None:
            body["batch_digest"] = batch_d
            carries.append("batch")
        body["metrics"] = metrics
        body["carries"] = carries
        return Kind.STEP, step, body

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint(self, step: int) -> None:
        snap = _state.snapshot(step, self.model, self.optimizer, self.scheduler)
        self._last_checkpoint_step = step
        self._put(lambda: self._checkpoint_entry(snap))

    def _checkpoint_entry(self, snap: _state.Snapshot) -> tuple[Kind, int, dict] | None:
        directory, digests = _state.write(snap, self.checkpoint_root)
        self._writer.sync()
        body = {**digests.entry_body(), "path": _relative(directory, self.path),
                "optimizer_hyper": [{k: v for k, v in g.items() if k != "params"} for g in snap.meta["param_groups"]]}
        entry = self._writer.append(Kind.CHECKPOINT, snap.step, body)
        self._writer.sync()
        self._alive_checkpoints.append((entry.seq, snap.step, body))
        self._apply_retention()
        return None

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
            shutil.rmtree(_checkpoint_path(self.path, body["path"]), ignore_errors=True)
            self._writer.append(Kind.PRUNE, step, {"checkpoint_seq": seq, "state_digest": body["state_digest"],
                                                   "reason": f"retention: keep {mode} {n}"})
            alive.remove((seq, step, body))

    # ----------------------------------------------------------------- background writer
    def _put(self, job: Callable[[], Any]) -> None:
        self._queue.put(job)

    def _run_job(self, job: Callable[[], Any]) -> None:
        try:
            if self._error is None:
                result = job()
                if result is not None:
                    kind, step, body = result
                    self._writer.append(kind, step, body)
        except BaseException as exc:  # surfaced on the training thread at the next call
            self._error = exc

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, LedgerError):
                raise error
            raise FormatError(f"the ledger's background writer failed: {type(error).__name__}: {error}") from error

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
        tensors = self._tensors()
        live = torch_digests(tensors)
        final: dict[str, Any] = {"tensor_digests": live, "model_digest": model_digest(live)}
        if final_weights is not None:
            from ledger._fingerprint import safetensors_digests

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
            final["file"] = target.name
        self._stop_thread()
        self._writer.seal({"final": final, "steps": self._step}, step=last)
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
        self._hook.remove()
        self._queue.stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self.abort()
        print(f"ledger: training raised {exc_type.__name__}; the ledger at {self.path} is valid but unsealed "
              f"(last recorded step {self._step - 1})", file=sys.stderr)

    # ----------------------------------------------------------------- resume
    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, model: Any, optimizer: Any, key: Any, scheduler: Any = None,
               passphrase: bytes | None = None, **options: Any) -> Recorder:
        """Continue a crashed run: load the last durable checkpoint (its digests checked against
        the ledger), restore model, optimizer, scheduler and RNG states, append a ``resume`` entry
        marking the step entries recorded after that checkpoint as superseded, and go on."""
        book = Ledger(path)
        entries = list(book.entries())
        genesis = entries[0].body()
        checkpoints = [e for e in entries if e.kind is Kind.CHECKPOINT]
        if not checkpoints:
            raise ConfigurationError(f"{path} holds no checkpoint to resume from (record with checkpoint_every=)")
        last = checkpoints[-1]
        body = last.body()
        directory = _checkpoint_path(Path(path), body["path"])
        found = _state.digests_of(directory)
        if found.state_digest != body["state_digest"]:
            raise FormatError(f"checkpoint {directory} does not match its ledger entry (seq {last.seq}); "
                              "refusing to resume from it")
        _state.restore(directory, model, optimizer, scheduler)
        superseded = [e for e in entries if e.seq > last.seq and e.kind is Kind.STEP]
        writer = LedgerWriter.open(path, key, passphrase=passphrase, fsync=options.pop("fsync", "group"))
        resume_body: dict[str, Any] = {"checkpoint_seq": last.seq, "checkpoint_step": last.step,
                                       "state_digest": body["state_digest"],
                                       "recovered_torn_bytes": writer.recovery.torn_bytes}
        if superseded:
            resume_body["superseded"] = {"first_seq": superseded[0].seq, "last_seq": superseded[-1].seq,
                                         "steps": [superseded[0].step, superseded[-1].step],
                                         "count": len(superseded)}
        writer.append(Kind.RESUME, last.step, resume_body)
        writer.sync()
        recorder = cls(path, model=model, optimizer=optimizer, key=key, seed=int(genesis["seed"]),
                       checkpoint_every=genesis.get("checkpoint_every"), scheduler=scheduler,
                       sketch=genesis["fingerprints"]["sketch"], digests=genesis["fingerprints"]["digests"],
                       _writer=writer, _genesis=genesis, _first_step=last.step + 1, **options)
        recorder._last_checkpoint_step = last.step
        pruned = {bytes(e.body()["state_digest"]) for e in entries if e.kind is Kind.PRUNE}
        recorder._alive_checkpoints = [(e.seq, e.step, e.body()) for e in checkpoints
                                       if bytes(e.body()["state_digest"]) not in pruned]
        return recorder


def _norms(tensors: list[Any]) -> Any:
    """Per-tensor L2 norms (float32), one fused call when every tensor is floating point; integer
    buffers (e.g. BatchNorm's num_batches_tracked) are widened first."""
    if all(t.is_floating_point() for t in tensors):
        return torch.stack(torch._foreach_norm(tensors)).float()
    return torch.stack([(t if t.is_floating_point() else t.double()).norm().float() for t in tensors])


def _checkpoint_path(root: Path, stored: str) -> Path:
    """A checkpoint entry's path: relative to the ledger directory unless absolute."""
    return Path(stored) if Path(stored).is_absolute() else root / stored


def _detached(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach()
    return value


def _relative(directory: Path, root: Path) -> str:
    try:
        return str(directory.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(directory.resolve())


def _random_run_id() -> str:
    import secrets

    return secrets.token_hex(16)


def _check_policy(sketch: Any, digests: str, checkpoint_every: int | None, keep: Any) -> None:
    if not (sketch == "auto" or (isinstance(sketch, int) and sketch >= 0)):
        raise ConfigurationError("sketch must be 'auto', 0 (off) or a positive interval in steps")
    if digests not in ("auto", "every", "checkpoints"):
        raise ConfigurationError("digests must be 'auto', 'every' or 'checkpoints'")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigurationError("checkpoint_every must be a positive number of steps")
    if keep is not None and not (isinstance(keep, tuple) and len(keep) == 2 and keep[0] in ("last", "every")
                                 and isinstance(keep[1], int) and keep[1] >= 1):
        raise ConfigurationError("keep must be None, ('last', n) or ('every', n)")
