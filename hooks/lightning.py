"""PyTorch Lightning: :class:`LedgerCallback` records ``Trainer.fit`` into a signed ledger.

One line in an existing Lightning script::

    trainer = Trainer(callbacks=[LedgerCallback("runs/ledger", key="keys/trainer.pem")], ...)

Genesis is written at ``on_train_start`` (model, optimizer and schedulers exist, nothing has
stepped yet), one step entry per optimizer step (``trainer.global_step``; gradient accumulation over
n batches gives one entry per n batches), the seal with the final weights at ``on_train_end`` and a
valid unsealed ledger when fit raises. Every Lightning checkpoint save also writes a ledger
checkpoint and carries the chain head (the callback's ``state_dict``), so
``trainer.fit(model, ckpt_path=...)`` continues the same ledger with a ``resume`` entry.
This module imports lightning; ``ledger.hooks`` does not import it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback

from ledger.errors import ConfigurationError, LedgerError
from ledger.hooks._options import callback_options
from ledger.hooks._recorder import Recorder

SEED_VARIABLE = "PL_GLOBAL_SEED"  # what lightning.seed_everything sets
RESERVED = ("loss", "lr", "grad_norm")  # metric names the recorder fills itself
SET_BY_CALLBACK = ("model", "optimizer", "scheduler", "framework", "path")

STEP_MAPPING = "ledger step s is the optimizer step after which trainer.global_step == s + 1"
GRAD_NORM = ("after clipping: the gradients the optimizer step used (Lightning clips and, with AMP, "
             "unscales before optimizer.step); recorded when genesis fingerprints.grad_norms asks for them")
BATCH = ("batch_digest([b1, ..., bn]) of the step's micro-batches as on_train_batch_start received them "
         "(after transfer to the device), digested after the optimizer step; n = 1 without accumulation")
METRICS = ("values logged with self.log(..., on_step=True) during the step's batches, up to on_train_batch_end "
           "(the last micro-batch's value of each name, as Lightning's loggers get it); a logged loss, lr or "
           "grad_norm is recorded as logged/<name>")


class LedgerCallback(Callback):
    """Records a Lightning ``Trainer.fit`` into the ledger at ``path``.

    ``key``: the trainer's private key (path or :class:`ledger.Signer`). ``seed``: the run's seed;
    when None, the one ``lightning.seed_everything`` set (``PL_GLOBAL_SEED``), read at train start.
    ``checkpoint_every``: the recorder's own ledger checkpoints (every Lightning checkpoint save writes
    one as well). ``config``: recorded in genesis. ``final_weights``: where the seal writes the final
    weights as safetensors (default: ``model.safetensors`` next to the ledger directory).
    ``mlflow``: True or an ``MlflowSink``, mirror the ledger into MLflow (``Recorder(mlflow=…)``).
    Other keyword arguments go to :class:`ledger.hooks.Recorder`
    (``fingerprints``, ``keep``, ``checkpoint_dir``, ``passphrase``, ...).

    Under DDP the recorder is built on every rank and only global rank 0 writes.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: Any, seed: int | None = None,
                 checkpoint_every: int | None = None, mlflow: Any = None, config: Mapping[str, Any] | None = None,
                 final_weights: str | os.PathLike[str] | None = None, **recorder_options: Any) -> None:
        recorder_options = callback_options("LedgerCallback", recorder_options, SET_BY_CALLBACK, mlflow)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigurationError(f"seed must be an int, got {seed!r}")
        self.path = Path(path)
        self.key, self.seed, self.checkpoint_every, self.config = key, seed, checkpoint_every, config
        self.final_weights = Path(final_weights) if final_weights is not None else \
            self.path.absolute().parent / "model.safetensors"
        self.options = recorder_options
        self.recorder: Recorder | None = None
        self._loaded: dict[str, Any] = {}  # the state a Lightning checkpoint carried (load_state_dict)
        self._saved: tuple[int, dict[str, Any]] | None = None  # (current_step, cursor) of the last save
        self._sealed: dict[str, Any] | None = None  # the cursor before the seal
        self._reset_step(0)

    def _reset_step(self, global_step: int) -> None:
        self._global_step = global_step  # trainer.global_step after the last recorded step
        self._batches: list[Any] = []  # the current step's micro-batches
        self._losses: list[torch.Tensor] = []  # their undivided losses
        self._before: dict[str, Any] = {}  # the logged on_step caches when the step began

    # ----------------------------------------------------------------- genesis or resume
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Write genesis (or continue the ledger a restored Lightning checkpoint names)."""
        if self.recorder is not None:
            raise ConfigurationError("this LedgerCallback already recorded a fit: use a new LedgerCallback "
                                     "(and ledger path) for each Trainer.fit")
        if not pl_module.automatic_optimization and len(trainer.optimizers) > 1:
            raise ConfigurationError("LedgerCallback records manual optimization with one optimizer only "
                                     f"({len(trainer.optimizers)} configured)")
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ConfigurationError("the LightningModule configured no optimizer: nothing to record")
        optimizer: Any = optimizers[0] if len(optimizers) == 1 else optimizers
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scheduler: Any = None if not schedulers else schedulers[0] if len(schedulers) == 1 else schedulers
        if self._loaded.get("sealed"):
            raise ConfigurationError(f"this Lightning checkpoint was saved after the ledger at {self.path} was sealed; "
                                     "a sealed ledger takes no more steps: record the new fit into a new path")
        cursor = self._loaded.get("cursor")
        if cursor is not None:
            resume_options = set(inspect.signature(Recorder.resume).parameters)
            options = {k: v for k, v in self.options.items() if k in resume_options}
            self.recorder = Recorder.resume(self.path, model=pl_module, optimizer=optimizer, key=self.key,
                                            scheduler=scheduler, at=cursor, **options)
        else:
            if trainer.global_step != 0:
                raise ConfigurationError(f"fit starts at global_step {trainer.global_step} from a checkpoint that "
                                         "carries no ledger cursor (saved without LedgerCallback, or weights only): "
                                         "a new ledger starts at global_step 0")
            self.recorder = Recorder(self.path, model=pl_module, optimizer=optimizer, key=self.key,
                                     seed=self._seed(), checkpoint_every=self.checkpoint_every, config=self.config,
                                     scheduler=scheduler, framework=self._framework(trainer), **self.options)
        self._reset_step(trainer.global_step)
        self._check_step(trainer.global_step + 1)

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        value = os.environ.get(SEED_VARIABLE)
        if value is None:
            raise ConfigurationError("LedgerCallback needs the run's seed: call lightning.seed_everything(s) before "
                                     "Trainer.fit, or pass LedgerCallback(seed=s)")
        try:
            return int(value)
        except ValueError:
            raise ConfigurationError(f"{SEED_VARIABLE}={value!r} is not an integer seed: "
                                     "pass LedgerCallback(seed=s)") from None

    def _framework(self, trainer: Any) -> dict[str, Any]:
        n = trainer.accumulate_grad_batches
        loss = ("training_step's loss (Lightning's outputs['loss'], undivided)" if n == 1 else
                "mean over the step's micro-batches of training_step's undivided loss (Lightning's "
                f"outputs['loss'] × accumulate_grad_batches = {n}; the last step of an epoch may have fewer)")
        return {"name": "lightning", "version": lightning.__version__, "step_mapping": STEP_MAPPING,
                "loss": loss, "grad_norm": GRAD_NORM, "batch": BATCH, "metrics": METRICS,
                "accumulate_grad_batches": n, "precision": str(trainer.precision)}

    # ----------------------------------------------------------------- per step
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Remember the micro-batch (and, at a step's first one, what was logged before it)."""
        if self.recorder is None:
            return
        if not self._batches:
            self._before = {key: metric._forward_cache for key, metric in _on_step_results(trainer)}
        self._batches.append(batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record a step entry when this batch ended an optimizer step (``global_step`` advanced)."""
        rec = self.recorder
        if rec is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor):
            n = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._losses.append(loss.detach().double() * n)
        global_step = trainer.global_step
        if global_step == self._global_step:
            return  # accumulating: no optimizer step yet
        if global_step != self._global_step + 1:
            raise LedgerError(f"trainer.global_step went from {self._global_step} to {global_step} in one batch; "
                              "LedgerCallback records one optimizer step per batch at most")
        self._check_step(global_step)
        metrics = self._logged(trainer)
        mean = torch.stack(self._losses).mean() if self._losses else None
        rec.step(loss=mean, batch=list(self._batches), **metrics)
        self._reset_step(global_step)

    def _check_step(self, global_step: int) -> None:
        assert self.recorder is not None
        if self.recorder.current_step != global_step - 1:
            raise LedgerError(f"the ledger would record step {self.recorder.current_step} for trainer.global_step "
                              f"{global_step}, but ledger step s is global_step s + 1: the ledger at {self.path} "
                              "and the Trainer's progress disagree")

    def _logged(self, trainer: Any) -> dict[str, torch.Tensor]:
        """The on_step values logged since the step began (a cache Lightning replaced since then)."""
        metrics: dict[str, torch.Tensor] = {}
        for key, metric in _on_step_results(trainer):
            value = metric._forward_cache
            if value is self._before.get(key) or not isinstance(value, torch.Tensor) or value.numel() != 1:
                continue
            name = metric.meta.name
            metrics[f"logged/{name}" if name in RESERVED else name] = value.detach()
        return metrics

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The chain head for the Lightning checkpoint being saved; writes the matching ledger
        checkpoint first (once per recorded step, however many Lightning saves there are)."""
        rec = self.recorder
        if self._sealed is not None:
            return {"cursor": self._sealed, "sealed": True}
        if rec is None:
            return dict(self._loaded)
        if self._saved is None or self._saved[0] != rec.current_step:
            self._saved = (rec.current_step, rec.checkpoint())
        return {"cursor": self._saved[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the chain head a Lightning checkpoint carried: ``on_train_start`` resumes from it."""
        self._loaded = dict(state_dict)

    # ----------------------------------------------------------------- end
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Seal the ledger and write the final weights as safetensors."""
        rec = self.recorder
        if rec is None or self._sealed is not None:
            return
        cursor = rec.cursor()
        rec.close(final_weights=self.final_weights)
        self._sealed = cursor

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Leave a valid unsealed ledger (everything recorded so far is written)."""
        rec = self.recorder
        if rec is None or self._sealed is not None:
            return
        rec.abort()
        warnings.warn(f"training raised {type(exception).__name__}; the ledger at {self.path} is valid but unsealed "
                      f"(last recorded step {rec.current_step - 1})", RuntimeWarning, stacklevel=2)


def _on_step_results(trainer: Any) -> list[tuple[str, Any]]:
    """The training loop's logged results that keep a per-step value (``on_step=True``); validation
    results live in another collection."""
    results = trainer.fit_loop.epoch_loop._results
    return [(key, metric) for key, metric in results.items() if metric.meta.on_step and not metric.has_reset]
