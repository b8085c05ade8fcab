"""A recorded run whose model is sharded across ranks (FSDP2 ``fully_shard``): the collectives every
rank runs at the same points, in the same order, whether it writes (rank 0's ``Recorder``) or not
(a ``Follower``). Fingerprints come from :class:`ledger.hooks._sharded.ShardedFingerprints` (each
rank on its local shards; digests in ``tensor-blocked/v1``, docs/FORMAT.md §10.1).

Per step: the cadence (rank 0's choice, broadcast at step 0 and at every recalibration, so ranks
never disagree about which collectives a step runs), the norms (one all-reduce of 8 bytes per
tensor), the sketch when due (one reduce of 8·k bytes), full digests when due (one gather of block
hashes); in the optimizer's post-step hook, the per-group gradient norms (one all-reduce). The norms
and gradient norms are launched on the shards' lane (``ledger._device``: on CUDA a side stream, the
all-reduce included; with gloo the all-reduce runs on gloo's threads) and read by the writer thread,
so the training thread waits for neither; the optional sketch and digests, scheduled by the cost
budget, do wait. At
``close``: the final digests, and the full weights gathered to rank 0 only when the user asks for
the final weights file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from ledger._blocked import TENSOR_BLOCKED_V1, safetensors_digests_as
from ledger.errors import ConfigurationError, FormatError
from ledger.hooks._norms import total_square
from ledger.hooks._options import Cadence
from ledger.hooks._sharded import ShardedFingerprints, Summed, launch_summed, local_part, sharded_state, sum_device
from ledger.torch import buffer_names

SCHEME = TENSOR_BLOCKED_V1


class Ready:
    """A sketch already finished (the sharded path reduces it to rank 0): the interface of a
    measurement launched and finished later (``Pending``, ``PendingSketch``)."""

    def __init__(self, values: npt.NDArray[np.float64]) -> None:
        self._values = values

    def value(self) -> npt.NDArray[np.float64]:
        """The values."""
        return self._values


def is_sharded(model: Any) -> bool:
    """True when the model holds DTensors (FSDP2 ``fully_shard``, tensor parallelism)."""
    return ShardedFingerprints.is_sharded(dict(model.state_dict()))


def refuse(what: str) -> ConfigurationError:
    """What the recorder does not do for a sharded model yet, and what to do instead."""
    return ConfigurationError(f"{what} is not available for a sharded (FSDP2) model: checkpoint with "
                              "torch.distributed.checkpoint and record it with rec.record_dcp(DIR)")


def group_grad_norms(optimizer: Any) -> Summed:
    """Per param group, the L2 norm of the global gradients (float64; ``value()``), from each
    rank's local shards (every rank calls it, in the optimizer's post-step hook): the squares summed
    where the shards are, one all-reduce, one copy to the host, launched by :func:`launch_summed`
    (the training thread waits neither for the device nor for gloo)."""
    groups: list[list[torch.Tensor]] = []
    for group in optimizer.param_groups:
        flats = []
        for p in group["params"]:
            part = None if p.grad is None else local_part("gradient", p.grad)
            if part is not None and part.flat.numel():
                flats.append(part.flat if part.flat.is_floating_point() else part.flat.double())
        groups.append(flats)
    reads = [t for flats in groups for t in flats]
    device = sum_device(reads)
    return launch_summed(reads, lambda: torch.stack([total_square(flats, device) for flats in groups]) if groups
                         else torch.zeros(0, dtype=torch.float64, device=device))


class ShardedRun:
    """The collectives of one sharded run on this rank (see the module docstring)."""

    def __init__(self, model: Any, sketch_seed: int, sketch_k: int, skip: Sequence[str] | None = None) -> None:
        """``skip``: the tensors the sketches leave out (rank 0's, which followers are told; by default
        the model's buffers)."""
        self.model = model
        self.skip = tuple(buffer_names(model, self.tensors()) if skip is None else skip)
        self.fingerprints = ShardedFingerprints(sketch_seed, sketch_k, self.skip)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fingerprinted tensors (DTensors and plain ones), the same names on every rank."""
        return sharded_state(self.model)[0]

    def init(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, bytes] | None, Any, Any]:
        """The init fingerprint: digests and sketch on rank 0 (None elsewhere), norms everywhere."""
        return self.fingerprints.digests(tensors), self.fingerprints.sketch(tensors), self.fingerprints.norms(tensors)

    @staticmethod
    def sync(step: int, cadence: Cadence, group: Any, recalibrated: bool) -> None:
        """At the first step and at each recalibration, every rank adopts rank 0's cadence."""
        if step == cadence.start or recalibrated:
            cadence.adopt(group.share(cadence.state()))

    def measure(self, step: int, tensors: Mapping[str, torch.Tensor],
                cadence: Cadence) -> tuple[Summed, Ready | None, dict[str, bytes] | None]:
        """This step's norms, sketch (when due) and digests (when due); costs recorded for the cadence."""
        fingerprints = self.fingerprints

        def sketch() -> Ready | None:
            whole = fingerprints.sketch(tensors)  # on rank 0; None elsewhere
            return Ready(whole) if whole is not None else None

        return cadence.take(step, lambda: fingerprints.launch_norms(tensors), sketch,
                            lambda: fingerprints.digests(tensors))

    def final(self, tensors: Mapping[str, torch.Tensor], names: list[str],
              final_weights: str | os.PathLike[str] | None, group: Any) -> tuple[dict[str, bytes] | None, str | None]:
        """The final digests (rank 0) and, when rank 0 was given ``final_weights``, the full weights
        gathered to rank 0 and saved there as safetensors (checked to read back to the same digests).
        Returns (digests, file name) on rank 0, (None, None) elsewhere."""
        live = self.fingerprints.digests(tensors)
        rank = group.rank if group is not None else 0
        wanted = final_weights is not None if group is None else group.share(final_weights is not None)
        if not wanted:
            return live, None
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0 or final_weights is None:
            return None, None
        assert live is not None
        target = Path(final_weights)
        if target.exists():
            raise ConfigurationError(f"{target} exists; a sharded run writes its final weights itself: remove it")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: cast(torch.Tensor, full[name]).contiguous() for name in names}, str(target))
        if safetensors_digests_as(target, SCHEME) != live:
            raise FormatError(f"{target} was written but does not read back to the sharded weights' digests")
        return live, target.name
