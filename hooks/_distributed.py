"""The recorder under torch.distributed: global rank 0 writes the one ledger of the run; every other
rank runs a :class:`Follower`, which writes nothing and takes part in the same collectives at the same
points (``Recorder(...)`` on every rank with the same arguments, ``step``/``checkpoint``/``close``
called on every rank at the same points).

What travels, and when:
- at construction: rank 0 broadcasts the run id once its ledger exists (or why it could not be
  created, which every rank raises);
- at every checkpoint (``checkpoint_every``, ``checkpoint()``, the final one at ``close``): each rank's
  32-byte model digest, all-gathered; rank 0 records them in the checkpoint entry (``ranks``) and
  verify names a rank whose weights differ from rank 0's. Every rank hashes its own copy of the
  weights there (a replicated layout such as DDP holds the whole model on every rank).
Nothing travels per step: the checkpoint schedule is fixed by ``checkpoint_every`` on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ledger import _dcp
from ledger import torch as lt
from ledger._fingerprint import model_digest
from ledger.errors import ConfigurationError, LedgerError
from ledger.hooks._options import RECALIBRATE_EVERY, Cadence, FingerprintOptions


@dataclass(frozen=True, slots=True)
class Ranks:
    """The process group a recorded run trains in (world size > 1)."""

    rank: int
    world: int
    backend: str

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a broadcast of one picklable object)."""
        box = [value if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def digests(self, model: Any) -> list[bytes]:
        """Every rank's parameter digest (:func:`parameter_digest`), by rank (an all-gather of 32 bytes
        per rank)."""
        mine = parameter_digest(lt.torch_digests(lt.canonical_state(model)[0]),
                                {n for n, _ in model.named_parameters(remove_duplicate=False)})
        every: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(every, mine)
        return [bytes(d) for d in every]

    def describe(self, sharded: bool) -> dict[str, Any]:
        """What genesis records about the process group (``distributed``, docs/FORMAT.md §12)."""
        if sharded:
            return {"backend": self.backend, "world_size": self.world, "writer_rank": 0, "layout": "sharded",
                    "fingerprints": "each rank fingerprints its local shards; norms and sketches reduced, "
                                    "tensor-blocked/v1 digests combined on rank 0"}
        return {"backend": self.backend, "world_size": self.world, "writer_rank": 0, "layout": "replicated",
                "rank_check": "every rank's model digest at each checkpoint"}


def parameter_digest(digests: dict[str, bytes], parameters: set[str]) -> bytes:
    """The model digest over the parameters' tensor digests only: what data-parallel replicas keep
    equal (buffers such as BatchNorm running statistics are updated by each rank's own forward)."""
    return model_digest({name: d for name, d in digests.items() if name in parameters})


def ranks(enabled: bool | None = None) -> Ranks | None:
    """The process group when torch.distributed is initialised with more than one process (and
    ``enabled`` is not False: a recorder built on one rank only), else None."""
    dist = torch.distributed
    if enabled is False or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def follower(enabled: bool | None = None) -> bool:
    """True on a rank that does not write (every rank but global rank 0)."""
    group = ranks(enabled)
    return group is not None and group.rank != 0


def restore_on_rank(group: Ranks, directory: Path, model: Any, optimizer: Any, scheduler: Any) -> None:
    """A follower's part of a crash resume: restore the checkpoint rank 0 restored, from its files
    (every rank must see the checkpoint directory: one machine or a shared filesystem)."""
    if not directory.is_dir():
        raise ConfigurationError(f"rank {group.rank} cannot see the checkpoint rank 0 resumes from ({directory}): "
                                 "resume on a filesystem every rank sees, or restore the state on every rank and "
                                 "pass Recorder.resume(..., at=cursor)")
    lt.restore(directory, unwrap_model(model), optimizer, scheduler, rng=False)  # its RNG was not recorded


def dcp_manifest(group: Ranks | None, directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest of a DCP checkpoint directory (``ledger._dcp``): each rank hashes the files it
    wrote (so ranks on other machines need not share a filesystem), rank 0 also the coordinator's
    ``.metadata``; the pieces are all-gathered (names, sizes, digests: never file contents)."""
    if not directory.is_dir():
        raise ConfigurationError(f"{directory} is not a directory: pass the checkpoint_id given to "
                                 "torch.distributed.checkpoint.save")
    rank = group.rank if group else 0
    try:
        mine: tuple[str, Any] = ("ok", _dcp.rank_files(directory, rank, coordinator=rank == 0))
    except (LedgerError, OSError) as exc:  # shared: every rank raises it, none waits in the collective
        mine = ("error", f"rank {rank}: {exc}")
    every: list[Any] = [mine]
    if group is not None:
        every = [None] * group.world
        torch.distributed.all_gather_object(every, mine)
    failed = [why for status, why in every if status == "error"]
    if failed:
        raise ConfigurationError(f"could not record the DCP checkpoint {directory}: {'; '.join(failed[:4])}")
    return {name: info for _, part in every for name, info in part.items()}


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel`` (its tensors carry no ``module.`` prefix, so the
    ledger's names are those of the released weights); anything else as is."""
    parallel = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, parallel) else model


@contextlib.contextmanager
def announce(group: Ranks | None) -> Iterator[Callable[[Any], None]]:
    """On rank 0, around the creation (or reopening) of the ledger: ``told(value)`` tells every rank
    what they need of it (the run id; where a resume continues); an exception before it tells them
    why there is nothing (and is raised)."""
    done = False

    def told(value: Any) -> None:
        nonlocal done
        if group is not None:
            group.share(("ok", value))
        done = True

    try:
        yield told
    except BaseException as exc:
        if group is not None and not done:
            group.share(("error", str(exc) or type(exc).__name__))
        raise


def joined(group: Ranks) -> Any:
    """On a follower: what rank 0 announced (:func:`announce`); rank 0's reason when it could not
    create or reopen the ledger, raised."""
    told = group.share(None)
    if told[0] == "error":
        raise ConfigurationError(f"rank 0 could not start the ledger: {told[1]}")
    return told[1]


class Follower:
    """What ``Recorder(...)`` is on a rank that does not write: the step counter, and the collectives
    rank 0 runs at the same points (checkpoints). Behaves like a recorder to the training loop."""

    def __init__(self, path: str | os.PathLike[str], *, model: Any, optimizer: Any = None,
                 checkpoint_every: int | None = None, resumed: tuple[str, int] | None = None, **_: Any) -> None:
        """As ``Recorder(...)`` on rank 0 (the same arguments), or ``resumed`` = (run id, first step)
        as announced by rank 0's ``Recorder.resume``."""
        from ledger.hooks._capture import hookable
        from ledger.hooks._sharded_run import ShardedRun, group_grad_norms

        group = ranks()
        assert group is not None and group.rank != 0
        self._group, self.path, self.model = group, Path(path), unwrap_model(model)
        self.checkpoint_every, self._closed = checkpoint_every, False
        self._sharded: ShardedRun | None = None
        self._cadence = Cadence(FingerprintOptions())  # rank 0's, adopted at step 0 (sharded runs)
        self._hooks: list[Any] = []
        self._cache: dict[str, torch.Tensor] | None = None  # the sharded tensors (state_dict is not free)
        if resumed:
            self.run_id, self._step = resumed
            self._last_checkpoint: int | None = self._step - 1
            return
        plan = joined(group)  # phase 1: rank 0 checked the settings; its checkpoint_every; is the model sharded?
        self.checkpoint_every = plan["checkpoint_every"]
        if plan["sharded"] is not None:
            self._sharded = ShardedRun(self.model, *plan["sharded"])
            self._sharded.init(self._sharded.tensors())  # rank 0's genesis fingerprint
            if plan["gradients"]:  # the collective rank 0's hook takes
                self._hooks = [opt.register_step_post_hook(lambda opt, args, kwargs: group_grad_norms(opt))
                               for opt in hookable(optimizer)]
        self.run_id, self._step = str(joined(group)), 0  # phase 2: the ledger exists
        self._last_checkpoint = None
        if self.checkpoint_every:  # rank 0 checkpoints the init state
            self._checkpoint(-1)
        joined(group)  # phase 3: rank 0's recorder is set up (its init checkpoint landed)

    @property
    def current_step(self) -> int:
        """The step number the next ``step()`` call records."""
        return self._step

    def step(self, loss: Any = None, batch: Any = None, **metrics: Any) -> None:
        """Count the step; at a checkpoint step, share this rank's model digest with rank 0."""
        self._refuse_closed("step")
        step, self._step = self._step, self._step + 1
        if self._sharded is not None:
            self._sharded.sync(step, self._cadence, self._group, self._cadence.tick(step))
            if self._cache is None or step % RECALIBRATE_EVERY == 1:  # as rank 0 refreshes its tensors
                self._cache = self._sharded.tensors()
            self._sharded.measure(step, self._cache, self._cadence)
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
            self._checkpoint(step)

    def _checkpoint(self, step: int) -> None:
        self._group.digests(self.model)
        self._last_checkpoint = step

    def checkpoint(self) -> dict[str, Any]:
        """Take part in rank 0's checkpoint of the state after the last step; this rank's cursor."""
        self._refuse_closed("checkpoint")
        if self._sharded is not None:
            from ledger.hooks._sharded_run import refuse

            raise refuse("checkpoint()")
        if self._last_checkpoint != self._step - 1:
            self._checkpoint(self._step - 1)
        return self.cursor()

    def cursor(self) -> dict[str, Any]:
        """This rank's position (rank 0's cursor names the chain head)."""
        return {"run_id": self.run_id, "step": self._step - 1, "rank": self._group.rank}

    def record_dcp(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Hash the DCP files this rank wrote and send their digests to rank 0."""
        self._refuse_closed("record_dcp")
        dcp_manifest(self._group, Path(directory))
        return self.cursor()

    def record_files(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Rank 0 records the files it wrote; nothing to do here."""
        self._refuse_closed("record_files")
        return self.cursor()

    def flush(self) -> None:
        """Nothing is written on this rank."""
        self._refuse_closed("flush")

    def close(self, final_weights: str | os.PathLike[str] | None = None) -> None:
        """Take part in the final checkpoint (when checkpointing) or, for a sharded model, in the final
        digests and the gathering of the final weights (when ``final_weights`` is given, as on rank 0);
        rank 0 seals."""
        if self._closed:
            return
        if self._sharded is not None:
            tensors = self._sharded.tensors()
            self._sharded.final(tensors, list(tensors), final_weights, self._group)
        elif self.checkpoint_every and self._last_checkpoint != self._step - 1:
            self._checkpoint(self._step - 1)
        self.abort()

    def abort(self) -> None:
        """Stop (rank 0 leaves its ledger valid and unsealed)."""
        for hook in self._hooks:
            hook.remove()
        self._closed = True

    def _refuse_closed(self, what: str) -> None:
        if self._closed:
            raise ConfigurationError(f"the recorder is closed; {what}() records nothing more")

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
