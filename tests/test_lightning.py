"""LedgerCallback on real ``lightning.Trainer`` fits (CPU, tiny model): one entry per optimizer step,
the logged on_step values, the undivided loss, resume from a Lightning checkpoint, a failed fit,
AMP skipped steps; every ledger checked with the real ``ledger verify`` CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ledger  # noqa: E402
from ledger import Kind  # noqa: E402
from ledger.errors import ConfigurationError  # noqa: E402
from ledger.hooks import FingerprintOptions  # noqa: E402
from ledger.hooks.lightning import LedgerCallback  # noqa: E402
from ledger.torch import batch_digest  # noqa: E402

BATCHES = 16  # per epoch, batch size 4


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(4 * BATCHES, 6, generator=g), torch.randn(4 * BATCHES, 1, generator=g))


def loader() -> DataLoader:
    return DataLoader(data(), batch_size=4, shuffle=False)


def batches() -> list[Any]:
    return list(loader())


class Tiny(L.LightningModule):
    """A two-layer MLP that logs values the tests know exactly."""

    def __init__(self, optimizer: str = "sgd", fail_at: int | None = None, inf_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer_name, self.fail_at, self.inf_at = optimizer, fail_at, inf_at
        self.losses: list[float] = []  # the undivided loss of every training batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if self.inf_at is not None and batch_idx == self.inf_at:
            loss = loss * float("inf")
        self.losses.append(float(loss.detach()))
        self.log("marker", 100.0 * self.global_step + batch_idx, on_step=True, on_epoch=False)
        self.log("both", batch_idx + 0.25, on_step=True, on_epoch=True)
        self.log("epoch_only", 7.0, on_step=False, on_epoch=True)
        self.log("loss", loss, on_step=True, on_epoch=False)
        if batch_idx % 8 == 0:
            self.log("sometimes", 1000.0 + batch_idx, on_step=True, on_epoch=False)
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("diverged")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_metric", 3.0, on_step=True, on_epoch=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.fixture(autouse=True)
def seeded(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test (seed_everything sets it)
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(3, verbose=False)


def trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False, max_epochs=2,
                                   num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


def verify(path: Path, keys: tuple[Path, Path], model: Path | None = None) -> tuple[int, dict[str, Any]]:
    """The real CLI: ``ledger verify LEDGER --key PUB [--model FINAL] --json``."""
    command = [sys.executable, "-m", "ledger", "verify", str(path), "--key", str(keys[1]), "--json"]
    if model is not None:
        command += ["--model", str(model)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def steps_of(path: Path) -> list[Any]:
    return [e for e in ledger.open(path).entries() if e.kind is Kind.STEP]


@pytest.mark.parametrize("optimizer, accumulate", [("sgd", 1), ("adamw", 4)])
def test_fit_records_each_optimizer_step_and_verifies(tmp_path, keys, optimizer, accumulate):
    model = Tiny(optimizer)
    callback = LedgerCallback(tmp_path / "run" / "ledger", key=keys[0], checkpoint_every=5, config={"test": 1},
                              fingerprints=FingerprintOptions(batch="every", grad_norms="every"))
    fitted = trainer(callbacks=[callback], accumulate_grad_batches=accumulate, val_check_interval=8,
                     limit_val_batches=2)
    fitted.fit(model, loader(), loader())
    n = 2 * BATCHES // accumulate
    entries = steps_of(tmp_path / "run" / "ledger")
    assert [e.step for e in entries] == list(range(n))
    bodies = [e.body() for e in entries]
    assert all(b["optimizer_steps"] == 1 for b in bodies)
    genesis = ledger.open(tmp_path / "run" / "ledger").genesis()
    assert genesis["seed"] == 3 and genesis["config"] == {"test": 1}
    framework = genesis["framework"]
    assert framework["name"] == "lightning" and framework["version"] == L.__version__
    assert "global_step == s + 1" in framework["step_mapping"] and "after clipping" in framework["grad_norm"]
    assert ("undivided" in framework["loss"]) and (accumulate == 1 or "= 4" in framework["loss"])
    assert framework["accumulate_grad_batches"] == accumulate and "on_step=True" in framework["metrics"]
    data_batches = batches() * 2
    for s, body in enumerate(bodies):
        micro = list(range(s * accumulate, (s + 1) * accumulate))  # batch indices across the two epochs
        last = micro[-1] % BATCHES
        metrics = body["metrics"]
        # the logged on_step values of the step's last micro-batch, exactly; no epoch or validation values
        assert metrics["marker"] == 100.0 * s + last and metrics["both"] == last + 0.25
        assert not {"epoch_only", "both_epoch", "both_step", "val_metric", "val_metric_step"} & set(metrics)
        assert ("sometimes" in metrics) == any(b % BATCHES % 8 == 0 for b in micro)
        if "sometimes" in metrics:
            assert metrics["sometimes"] == 1000.0 + next(b % BATCHES for b in micro if b % BATCHES % 8 == 0)
        # loss: the mean of the undivided micro-batch losses; the user's own logged loss kept aside
        assert metrics["loss"] == pytest.approx(sum(model.losses[b] for b in micro) / accumulate, rel=1e-6)
        assert metrics["logged/loss"] == pytest.approx(model.losses[micro[-1]], rel=1e-6)
        assert metrics["grad_norm"] > 0 and metrics["lr"] > 0
        assert body["batch_digest"] == batch_digest([data_batches[b] for b in micro])
    code, report = verify(tmp_path / "run" / "ledger", keys, tmp_path / "run" / "model.safetensors")
    assert code == 0 and report["verdict"] == "pass", report
    checks = report["checks"]
    assert {name: checks[name]["status"] for name in ("chain", "signatures", "seal", "model", "continuity")} == \
        dict.fromkeys(("chain", "signatures", "seal", "model", "continuity"), "pass")
    assert checks["continuity"]["steps_checked"] == n
    # a Lightning checkpoint saved after the seal: the sealed ledger is not continued
    fitted.save_checkpoint(tmp_path / "after.ckpt")
    with pytest.raises(ConfigurationError, match="sealed"):
        trainer(callbacks=[LedgerCallback(tmp_path / "run" / "ledger", key=keys[0])], max_epochs=3).fit(
            Tiny(optimizer), loader(), ckpt_path=tmp_path / "after.ckpt")
    assert ledger.open(tmp_path / "run" / "ledger").sealed


@pytest.mark.slow
@pytest.mark.parametrize("resume_from", [6, 3])
def test_failed_fit_leaves_an_unsealed_ledger_and_resume_continues_the_chain(tmp_path, keys, resume_from):
    path, saves = tmp_path / "ledger", tmp_path / "ckpt"
    checkpoints = ModelCheckpoint(dirpath=saves, every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(RuntimeError, match="diverged"), pytest.warns(RuntimeWarning, match="valid but unsealed"):
        callbacks = [LedgerCallback(path, key=keys[0], checkpoint_every=4), checkpoints]
        trainer(callbacks=callbacks, enable_checkpointing=True, max_epochs=1).fit(Tiny("adamw", fail_at=7), loader())
    assert [e.step for e in steps_of(path)] == list(range(7)) and not ledger.open(path).sealed
    code, report = verify(path, keys)
    assert code == 0 and report["verdict"] == "pass" and report["checks"]["seal"]["status"] == "warn", report
    # resume from the Lightning checkpoint at global_step g (ledger step g - 1): the steps after it are superseded
    saved = saves / f"epoch=0-step={resume_from}.ckpt"
    assert torch.load(saved, weights_only=False)["callbacks"]
    final = tmp_path / "final.safetensors"
    resumed = Tiny("adamw")  # a different init: everything comes from the Lightning checkpoint
    trainer(callbacks=[LedgerCallback(path, key=keys[0], final_weights=final)],
            max_steps=10).fit(resumed, loader(), ckpt_path=saved)
    book = ledger.open(path)
    kinds = [(e.kind.label, e.step) for e in book.entries()]
    at = [k for k, _ in kinds].index("resume")
    assert kinds[at] == ("resume", resume_from - 1) and book.sealed
    assert [s for k, s in kinds[at:] if k == "step"] == list(range(resume_from, 10))
    code, report = verify(path, keys, final)
    continuity = report["checks"]["continuity"]
    assert continuity["superseded_steps"] == list(range(resume_from, 7))
    assert code == 0 and report["verdict"] == "pass", continuity
    assert continuity["status"] == "pass" and report["checks"]["model"]["status"] == "pass"


def test_amp_step_skipped_by_the_grad_scaler_is_an_entry_without_optimizer_steps(tmp_path, keys):
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    # digests every step: continuity then checks on the weights that the skipped step did not move them
    # (with the automatic cadence, a skipped step between sketches is checked on its norms only: a warning)
    every = FingerprintOptions(sketch=1, digests="every")
    trainer(callbacks=[LedgerCallback(tmp_path / "ledger", key=keys[0], fingerprints=every)], plugins=[precision],
            max_epochs=1).fit(Tiny("sgd", inf_at=5), loader())
    bodies = [e.body() for e in steps_of(tmp_path / "ledger")]
    assert len(bodies) == BATCHES
    assert [b["optimizer_steps"] for b in bodies] == [0 if s == 5 else 1 for s in range(BATCHES)]
    code, report = verify(tmp_path / "ledger", keys, tmp_path / "model.safetensors")
    continuity = report["checks"]["continuity"]
    assert code == 0 and continuity["status"] == "pass", continuity["detail"]
    assert continuity["skipped_steps"] == [5]


def test_bad_configuration_is_refused_before_anything_is_written(tmp_path, keys, monkeypatch):
    assert LedgerCallback(tmp_path / "L", key=keys[0], mlflow=True).options["mlflow"] is True  # to the Recorder
    with pytest.raises(ConfigurationError, match="unknown option 'checkpoint_evry'"):
        LedgerCallback(tmp_path / "L", key=keys[0], checkpoint_evry=3)
    with pytest.raises(ConfigurationError, match="sets Recorder's model itself"):
        LedgerCallback(tmp_path / "L", key=keys[0], model=nn.Linear(1, 1))
    # a Lightning checkpoint saved without the callback carries no cursor: no new ledger mid-run
    plain = trainer(max_steps=2)
    plain.fit(Tiny(), loader())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ConfigurationError, match="global_step 2 from a checkpoint that carries no ledger cursor"):
        trainer(callbacks=[LedgerCallback(tmp_path / "L", key=keys[0])], max_steps=4).fit(
            Tiny(), loader(), ckpt_path=tmp_path / "plain.ckpt")
    monkeypatch.delenv("PL_GLOBAL_SEED")
    with pytest.raises(ConfigurationError, match="seed_everything"):
        trainer(callbacks=[LedgerCallback(tmp_path / "L", key=keys[0])], max_steps=2).fit(Tiny(), loader())
    assert not (tmp_path / "L").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_two_processes_write_one_ledger_that_verifies(tmp_path, keys):
    """Lightning's DDP launcher (strategy="ddp", gloo, 2 CPU processes): rank 0 writes, rank 1 takes
    part in the checkpoints' digest exchange; one ledger, one entry per optimizer step."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("lightning_ddp.py")), str(tmp_path),
                          str(keys[0])], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    book = ledger.open(tmp_path / "ledger")
    assert book.genesis()["distributed"]["world_size"] == 2
    assert [e.step for e in steps_of(tmp_path / "ledger")] == list(range(BATCHES // 2))  # half the batches each
    code, report = verify(tmp_path / "ledger", keys, tmp_path / "model.safetensors")
    assert code == 0 and report["verdict"] == "pass", report
    assert report["checks"]["continuity"]["status"] == "pass" and report["checks"]["checkpoints"]["status"] == "pass"
