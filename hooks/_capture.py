"""What the optimizer step hooks capture between two step entries (the hyperparameters a step
used, the gradients it used) and the step entry's body built from it and the fingerprints."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ledger import torch as lt
from ledger._device import Landing
from ledger._fingerprint import model_digest
from ledger._schema import Genesis, StepBody
from ledger.errors import ConfigurationError
from ledger.hooks._norms import Pending, group_norms
from ledger.hooks._sharded import Summed

HYPER_KEYS = ("betas", "momentum", "weight_decay", "eps", "dampening", "nesterov")


class Capture:
    """Step pre- and post-hooks on every optimizer of a recorded run (``optimizer``: one or a list,
    matching genesis), and what they saw since the last step entry: ``slots``, one per optimizer."""

    def __init__(self, optimizer: Any, genesis: Genesis, names: list[str],
                 grad_norms: Callable[[Any], Summed] | None = None, gradients: bool = True) -> None:
        self.optimizers = hookable(optimizer)
        self._grad_norms = grad_norms  # per-group norms of the global gradients (sharded runs: a collective)
        self._gradients = gradients  # whether the gradient norms are read (see reads_gradients)
        if len(self.optimizers) != len(genesis.all_optimizers):
            raise ConfigurationError(f"the ledger records {len(genesis.all_optimizers)} optimizer(s), "
                                     f"{len(self.optimizers)} given")
        self._names = names
        self.slots: list[dict[str, Any]] = [{} for _ in self.optimizers]  # per optimizer, since the last entry
        self._logged_hyper = [hyper(g) for o in genesis.all_optimizers for g in o.param_groups]
        # last: nothing after the hooks can raise and leave them on the user's optimizers
        self._hooks = [hook for k, opt in enumerate(self.optimizers) for hook in (
            opt.register_step_pre_hook(functools.partial(self.pre_step, k)),
            opt.register_step_post_hook(functools.partial(self.post_step, k)))]

    def remove(self) -> None:
        """Remove the hooks from the optimizers."""
        for hook in self._hooks:
            hook.remove()

    def pre_step(self, k: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before optimizer k's step (before a scheduler advances): the hyperparameters it uses."""
        self.slots[k].update(lrs=[_float(group["lr"]) for group in optimizer.param_groups],
                             hyper=[hyper(group) for group in optimizer.param_groups])

    def post_step(self, k: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        """After optimizer k's step, before ``zero_grad``: the gradients the step used — those of
        the last closure call for ``optimizer.step(closure)`` — as one norm per param group."""
        slot = self.slots[k]
        slot["steps"] = slot.get("steps", 0) + 1
        if not self._gradients:
            return
        if self._grad_norms is not None:
            slot["grad_norms"] = self._grad_norms(optimizer)
        else:  # launched (on CUDA on a side stream), read on the writer thread
            slot["grad_norms"] = group_norms([[p.grad for p in group["params"] if p.grad is not None]
                                              for group in optimizer.param_groups])

    def gather(self) -> list[dict[str, Any]]:
        """What the hooks saw since the last entry, one slot per optimizer (on the training thread:
        the slots change hands; an optimizer that took no step beside one that did is given its
        current learning rates and hyperparameters). :meth:`body` reads them on the writer thread."""
        slots, self.slots = self.slots, [{} for _ in self.optimizers]
        if any("lrs" in slot for slot in slots):
            for opt, slot in zip(self.optimizers, slots, strict=True):
                if "lrs" not in slot:
                    slot["lrs"] = [_float(g["lr"]) for g in opt.param_groups]
                if "hyper" not in slot:
                    slot["hyper"] = [hyper(g) for g in opt.param_groups]
                if self._gradients and "grad_norms" not in slot:
                    slot["grad_norms"] = torch.zeros(len(opt.param_groups), dtype=torch.float64)
        return slots

    def _hook(self, slots: list[dict[str, Any]]) -> dict[str, Any]:
        """What :meth:`gather` returned as one step's record: the optimizer steps, and when one
        stepped, every optimizer's groups in order."""
        each = [int(slot.get("steps", 0)) for slot in slots]
        if "lrs" not in slots[0]:  # gather fills every slot or none
            return {"steps": sum(each)}
        lrs: list[float] = []
        hypers: list[dict[str, Any]] = []
        grads: list[torch.Tensor] = []
        for slot in slots:
            lrs += slot["lrs"]
            hypers += slot["hyper"]
            if self._gradients:
                norms = slot["grad_norms"]
                grads.append(norms.value()[0] if isinstance(norms, Landing)  # launched on the lane
                             else torch.from_numpy(norms.value()) if isinstance(norms, Summed) else norms)
        hook = {"steps": sum(each), "lrs": lrs, "hyper": hypers,
                "grad_norms": torch.cat([g.cpu() for g in grads]) if self._gradients else None}
        if len(each) > 1:
            hook["each"] = each
        return hook

    def body(self, values: dict[str, Any], slots: list[dict[str, Any]], norms: Pending,
             sketch: Any, digests: dict[str, bytes] | None, batch_d: bytes | None) -> StepBody:
        """The step entry (on the writer thread): metrics, what ``gather`` returned (hyperparameters
        only when they changed since the last entry that logged them) and the fingerprints."""
        hook = self._hook(slots)
        metrics = {name: float(v) for name, v in values.items()}
        carries = ["norms"]
        lrs = grad_norms = hypers = None
        if hook.get("lrs") is not None:
            metrics.setdefault("lr", hook["lrs"][0])
            lrs = np.asarray(hook["lrs"], dtype=np.float64)
        if hook.get("grad_norms") is not None:
            grad_norms = hook["grad_norms"].cpu().numpy()
            metrics.setdefault("grad_norm", float(np.sqrt(np.square(grad_norms).sum())))
        if hook.get("hyper") is not None and hook["hyper"] != self._logged_hyper:
            hypers = self._logged_hyper = hook["hyper"]
        if sketch is not None:
            carries.append("sketch")
        if digests is not None:
            carries.append("digests")
        if batch_d is not None:
            carries.append("batch")
        return StepBody(norms=norms.value(), metrics=metrics, optimizer_steps=int(hook.get("steps", 0)),
                        optimizer_steps_each=hook.get("each"),
                        lrs=lrs, grad_norms=grad_norms, sketch=sketch.value() if sketch is not None else None,
                        hyper=hypers,
                        tensor_digests=b"".join(digests[name] for name in self._names) if digests else None,
                        model_digest=model_digest(digests) if digests else None, batch_digest=batch_d,
                        carries=tuple(carries))


def reads_gradients(optimizer: Any, policy: str) -> bool:
    """Whether the recorder reads the gradient norms at each step: always under ``policy`` "every";
    under "auto" only when the update bound of one of the optimizers uses them — every optimizer but
    Adam and AdamW (and their subclasses), whose bound rests on the learning rate and betas alone."""
    return policy == "every" or not all(isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
                                        for o in lt.optimizers_of(optimizer))


def hookable(optimizer: Any) -> list[Any]:
    """The torch optimizers of ``optimizer`` (one or a list; framework wrappers unwrapped), each one
    whose steps can be hooked; a one-line :class:`ConfigurationError` otherwise (checked before
    anything is written)."""
    optimizers = lt.optimizers_of(optimizer)
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(opt):
            raise ConfigurationError(f"optimizer {type(opt).__module__}.{type(opt).__qualname__} is not an initialised "
                                     "torch.optim.Optimizer whose steps the recorder can hook; pass the torch "
                                     "optimizer it wraps")
    return optimizers


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a param group that a scheduler may move (besides the lr), as logged."""
    out: dict[str, Any] = {}
    for key in HYPER_KEYS:
        if key in group:
            value = group[key]
            out[key] = [_float(v) for v in value] if isinstance(value, (list, tuple)) else \
                value if isinstance(value, bool) else _float(value)
    return out


def detached(value: Any) -> Any:
    """A tensor detached from the graph (a metric kept until the writer thread reads it); anything else as is."""
    return value.detach() if isinstance(value, torch.Tensor) else value
