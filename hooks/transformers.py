"""Hugging Face ``transformers.Trainer`` callback: one signed ledger entry per optimizer step.

``Trainer(..., callbacks=[LedgerTrainerCallback("runs/ledger", key="keys/trainer.pem")])`` records the
run; docs/FRAMEWORKS.md ("Hugging Face Trainer") says what each recorded value is relative to the
Trainer's own logs. The Trainer gives callbacks no loss and no batch, so the callback reads both from
a forward hook on the model (the model's ``loss`` output and its keyword inputs, training-mode
forwards between ``on_step_begin`` and ``on_step_end`` only).
"""

from __future__ import annotations

import atexit
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from ledger.errors import ConfigurationError
from ledger.hooks._options import callback_options
from ledger.hooks._recorder import Recorder
from ledger.hooks._trainer_cursor import CURSOR_FILE, PREFIX, find_checkpoint, read_cursor, write_cursor

__all__ = ["CURSOR_FILE", "LedgerTrainerCallback"]
_RESUME_OPTIONS = ("passphrase", "keep", "queue_size", "drain_interval", "max_lag", "fsync", "mlflow")
_OURS = ("model", "optimizer", "scheduler", "framework", "seed", "config", "checkpoint_every")
_LIVE: dict[Path, LedgerTrainerCallback] = {}  # ledger path -> the callback whose recorder holds it open


class _Tap:
    """A forward hook on the model: the loss output and keyword inputs of each training-mode forward
    while open (the micro-batches of one optimizer step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.open = False
        self.losses: list[torch.Tensor] = []
        self.batches: list[Any] = []
        self.normalised = False  # the Trainer passed num_items_in_batch: each loss is already over the whole step
        self.lossless = 0  # forwards that returned no loss
        self.warned = False
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (self.open and module.training and torch.is_grad_enabled()):
            return
        inputs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
        self.batches.append({"args": list(args), **inputs} if args else inputs)
        self.normalised = self.normalised or kwargs.get("num_items_in_batch") is not None
        loss = output.get("loss") if isinstance(output, Mapping) else \
            output[0] if isinstance(output, tuple) and output and "labels" in kwargs else None
        if isinstance(loss, torch.Tensor) and loss.dim() == 0:
            # a view, not a copy: Trainer.compute_loss scales it in place (average_tokens_across_devices)
            self.losses.append(loss.detach())
        else:
            self.lossless += 1

    def take(self) -> tuple[torch.Tensor | None, list[Any] | None]:
        """Close the window; the step's loss as ``Trainer.training_step`` returned it summed over the
        micro-batches (HF's ``tr_loss`` increment), and the micro-batches' inputs."""
        self.open = False
        losses, batches, normalised, lossless = self.losses, self.batches, self.normalised, self.lossless
        self.losses, self.batches, self.normalised, self.lossless = [], [], False, 0
        total = None
        if lossless and not self.warned:
            self.warned = True
            warnings.warn("the model returned no loss (the Trainer computes it outside the model: label smoothing, "
                          "compute_loss_func or an overridden compute_loss); the ledger's steps carry no loss",
                          RuntimeWarning, stacklevel=2)
        if losses and not lossless:
            total = torch.zeros((), dtype=torch.float32, device=losses[0].device)
            for loss in losses:  # the Trainer's order and dtype: tr_loss (float32) += loss [/ micro-batches]
                total = total + (loss if normalised else loss / len(losses))
        return total, batches or None

    def remove(self) -> None:
        """Take the hook off the model."""
        self._handle.remove()


class LedgerTrainerCallback(TrainerCallback):
    """Records a ``transformers.Trainer`` run into a signed ledger at ``path``.

    Genesis at ``on_train_begin`` (the optimizer exists; nothing has stepped), one entry per optimizer
    step at ``on_step_end`` (ledger step s is ``state.global_step`` s+1), at each ``on_save`` a ledger
    checkpoint of the same state, a signed manifest of the Trainer's ``checkpoint-N/`` files and the
    chain cursor in ``checkpoint-N/ledger_cursor.json`` (the Trainer restores no callback state:
    ``resume_from_checkpoint`` continues the chain from that file), and the seal at ``on_train_end``
    with the final weights written as safetensors at ``final_weights`` (default
    ``<output_dir>/final_weights.safetensors``).

    ``seed`` defaults to ``TrainingArguments.seed``; ``config`` is recorded with the
    ``TrainingArguments`` (secrets dropped). ``recorder_options`` go to :class:`Recorder`. A run that
    raises leaves a valid unsealed ledger: the recorder is aborted at interpreter exit, or when a new
    ``train()`` in the same process records to the same path (or call :meth:`abort`).
    """

    def __init__(self, path: str | os.PathLike[str], *, key: Any, seed: int | None = None,
                 checkpoint_every: int | None = None, mlflow: Any = None, config: Mapping[str, Any] | None = None,
                 final_weights: str | os.PathLike[str] | None = None, **recorder_options: Any) -> None:
        recorder_options = callback_options("LedgerTrainerCallback", recorder_options, _OURS, mlflow)
        self.path = Path(path).absolute()
        self.key, self.seed, self.checkpoint_every = key, seed, checkpoint_every
        self.config, self.final_weights, self.options = dict(config or {}), final_weights, recorder_options
        self.recorder: Recorder | None = None
        self._tap: _Tap | None = None
        self._pending: dict[str, Any] | None = None  # the last step's entry, waiting for the Trainer's log

    # ----------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        """Start (or, resuming from a checkpoint-N this callback wrote, continue) the ledger."""
        previous = _LIVE.get(self.path)
        if previous is not None:  # an earlier train() in this process raised and left it open
            previous.abort()
        if model is None or optimizer is None:
            raise ConfigurationError("the Trainer passed no model or optimizer at on_train_begin; "
                                     "LedgerTrainerCallback needs transformers>=4.40's Trainer")
        if args.load_best_model_at_end:
            raise ConfigurationError("load_best_model_at_end replaces the last step's weights after training, "
                                     "so the sealed weights would not be the trained ones; set it False "
                                     "(load the best checkpoint after train() instead)")
        if state.global_step > 0:
            cursor = read_cursor(find_checkpoint(args, state.global_step), state.global_step, self.path)
            kept = {k: v for k, v in self.options.items() if k in _RESUME_OPTIONS}
            self.recorder = Recorder.resume(self.path, model=model, optimizer=optimizer, key=self.key,
                                            scheduler=lr_scheduler, at=cursor, **kept)
        else:
            config = {"training_arguments": training_arguments(args), **self.config}
            self.recorder = Recorder(self.path, model=model, optimizer=optimizer, key=self.key,
                                     seed=args.seed if self.seed is None else self.seed,
                                     checkpoint_every=self.checkpoint_every, config=config, scheduler=lr_scheduler,
                                     framework=framework(args), **self.options)
        try:
            if state.global_step == 0:
                self.recorder.checkpoint()  # the init state and its learning rates, whatever checkpoint_every says
            if self.recorder.current_step != state.global_step:
                raise ConfigurationError(f"the ledger continues at step {self.recorder.current_step} but the "
                                         f"Trainer is at global_step {state.global_step}")
        except BaseException:
            self.recorder.abort()
            raise
        self._tap = _Tap(model)
        _LIVE[self.path] = self
        atexit.register(self.abort)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the window for the micro-batches of the next optimizer step."""
        self._flush()
        if self._tap is not None:
            self._tap.open = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After an optimizer step: its entry (held until the Trainer's log when one is due now)."""
        rec = self._live()
        self._flush()
        if rec.current_step != state.global_step - 1:
            raise ConfigurationError(f"ledger step {rec.current_step} is not Trainer global_step "
                                     f"{state.global_step} - 1: a step was recorded twice or missed")
        assert self._tap is not None
        loss, batch = self._tap.take()
        self._pending = {"step": state.global_step, "loss": loss, "batch": batch, "metrics": {}}
        if not control.should_log:  # DefaultFlowCallback ran first and decided no log follows
            self._flush()

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        """The Trainer's gradient norm (before clipping) of the step just taken, when it logs one."""
        pending = self._pending
        if pending is not None and logs and "grad_norm" in logs and state.global_step == pending["step"]:
            pending["metrics"]["hf_grad_norm"] = float(logs["grad_norm"])
        self._flush()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._flush()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        self._flush()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A ledger checkpoint of the state the Trainer just saved, and its cursor in checkpoint-N/."""
        rec = self._live()
        self._flush()
        cursor = rec.checkpoint()
        directory = Path(args.output_dir) / f"{PREFIX}-{state.global_step}"
        if state.is_world_process_zero and directory.is_dir():  # the process that wrote it (and the ledger)
            write_cursor(directory, self.path, state.global_step, cursor)
            try:
                rec.record_files(directory)  # the signed manifest of every file, the cursor file included
            except ConfigurationError as exc:  # e.g. a symlink another callback put there: training goes on
                warnings.warn(f"{directory.name} was not recorded ({exc}); verify cannot check its files and the "
                              "run cannot resume from it", RuntimeWarning, stacklevel=2)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Seal the ledger with the final weights."""
        rec = self._live()
        self._flush()
        final = Path(self.final_weights) if self.final_weights else Path(args.output_dir) / "final_weights.safetensors"
        self._release()
        try:
            rec.close(final_weights=final)
        except BaseException:
            rec.abort()  # valid and unsealed, as after a crash
            raise

    # ----------------------------------------------------------------- helpers
    def abort(self) -> None:
        """Stop recording without sealing (the ledger stays valid and unsealed); a step whose entry
        still waited for the Trainer's log is not recorded. Safe to call more than once."""
        rec = self.recorder
        self._pending = None
        self._release()
        if rec is not None:
            rec.abort()

    def _release(self) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if _LIVE.get(self.path) is self:
            del _LIVE[self.path]
        atexit.unregister(self.abort)

    def _live(self) -> Recorder:
        if self.recorder is None:
            raise ConfigurationError("LedgerTrainerCallback has no ledger open: on_train_begin did not run")
        return self.recorder

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._live().step(loss=pending["loss"], batch=pending["batch"], **pending["metrics"])


# --------------------------------------------------------------------- genesis facts
def framework(args: Any) -> dict[str, Any]:
    """What genesis records about the Trainer: how its step, loss, gradient norm and batch map to ours."""
    accumulation = int(args.gradient_accumulation_steps)
    clip = f"to max_grad_norm={args.max_grad_norm}" if args.max_grad_norm and args.max_grad_norm > 0 else "(none)"
    return {
        "name": "transformers", "version": transformers.__version__,
        "step_mapping": "ledger step s is Trainer state.global_step s+1",
        "loss": f"Trainer.training_step's loss summed over the step's {accumulation} micro-batch(es) (what the "
                "step adds to tr_loss); the Trainer logs its mean over logging_steps",
        "grad_norm": f"after clipping {clip}, when genesis fingerprints.grad_norms asks for it; hf_grad_norm is "
                     "the Trainer's logged value, before clipping",
        "batch": "the model's keyword inputs of each micro-batch, in order, without num_items_in_batch (rank 0's)",
        "gradient_accumulation_steps": accumulation,
    }


def training_arguments(args: Any) -> dict[str, Any]:
    """``TrainingArguments.to_dict()`` as plain JSON-able values, without the hub token fields."""
    return {k: _plain(v) for k, v in args.to_dict().items() if not k.endswith("_token")}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
