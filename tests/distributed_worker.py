"""One rank of a recorded torch.distributed run (gloo, CPU), started by tests/test_distributed.py:
``python tests/distributed_worker.py SCENARIO RANK WORLD PORT OUT KEY``.

Scenarios: ``ddp`` (a DistributedDataParallel loop, checkpoint_every 3, sealed with the final
weights), ``diverge`` (the same, with rank 1's weights nudged after step 4, which DDP does not undo),
``resume`` (``ddp`` stopped after step 5 without sealing, then ``Recorder.resume`` on every rank
continues to the end), ``dcp`` (no ledger checkpoints; after step 3 a torch.distributed.checkpoint
save into OUT/dcp-3, recorded with ``record_dcp``), ``fsdp`` (the ``dcp`` run with the model under
FSDP2 ``fully_shard`` instead of DDP: sharded fingerprints, final weights gathered at close),
``asymmetric`` (rank 1 passes another checkpoint_every: rank 0's is followed), ``alone`` (only rank 0
records, with ``distributed=False``), ``dcp-fails`` (a DCP directory rank 0 cannot hash: every rank
raises the same error). The DDP model ends in a BatchNorm, whose running statistics differ by rank."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ledger.errors import ConfigurationError
from ledger.hooks import Recorder

STEPS = 8


def main() -> None:
    scenario, rank, world, port, out, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
        Path(sys.argv[5]), sys.argv[6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 1))
    if scenario != "fsdp":
        model.append(torch.nn.BatchNorm1d(1))  # per-rank running statistics: not compared between replicas
    if scenario == "fsdp":  # FSDP2: each Linear's parameters sharded on dim 0 (7 rows: 4 + 3)
        from torch.distributed.fsdp import fully_shard

        for layer in model[::2]:
            fully_shard(layer)
        ddp = fully_shard(model)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    every = None if scenario in ("dcp", "fsdp", "dcp-fails") else 5 if scenario == "asymmetric" and rank else 3
    if scenario == "alone":
        rec = Recorder(out / "ledger", model=ddp, optimizer=opt, key=key, seed=0, checkpoint_every=3,
                       distributed=False) if rank == 0 else None
    else:
        rec = Recorder(out / "ledger", model=ddp, optimizer=opt, key=key, seed=0, checkpoint_every=every)
    stop = 6 if scenario == "resume" else STEPS
    for step in range(stop):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scenario == "diverge" and rank == 1 and step == 4:
            with torch.no_grad():
                model[0].bias.add_(1e-3)
        if rec is not None:
            rec.step(loss=loss, batch=x)
        if scenario in ("dcp", "fsdp", "dcp-fails") and step == 3:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=out / "dcp-3")
            if scenario == "dcp-fails":
                dist.barrier()
                if rank == 0:
                    (out / "dcp-3" / "stray").mkdir()  # not a file: rank 0 cannot hash it
                dist.barrier()
                try:
                    rec.record_dcp(out / "dcp-3")
                except ConfigurationError as exc:
                    (out / f"refused-{rank}").write_text(str(exc))
            else:
                rec.record_dcp(out / "dcp-3")
    if scenario == "resume":
        rec.abort()  # as a crash would leave it: valid, unsealed
        rec = Recorder.resume(out / "ledger", model=ddp, optimizer=opt, key=key)
        assert rec.current_step == 6, rec.current_step  # the checkpoint of step 5 (checkpoint_every 3)
        for step in range(rec.current_step, STEPS):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))
            loss = ddp(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss, batch=x)
    if rec is not None:
        rec.close(final_weights=out / "model.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # everything is closed: skip interpreter teardown, where gloo's threads abort at random


if __name__ == "__main__":
    main()
