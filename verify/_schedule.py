"""The recipe's schedule against the log: every logged learning rate and hyperparameter must follow
the recipe's optimizer and scheduler (stepped alone, no training); and recipe calls traced so that
recipe code that raises becomes a one-line warning."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ledger.verify._run import RunView

HYPER_KEYS = ("betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
SCHEDULE_RTOL = 1e-9  # schedules computed with another libm may differ in the last bits
_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def hyper_in_effect(view: RunView, step: int) -> list[dict[str, Any]]:
    """The optimizer hyperparameters in effect at ``step``: the genesis param groups updated by the
    ``hyper`` of every step entry up to ``step`` (a scheduler may move betas, momentum, …)."""
    groups = [dict(g) for g in view.optimizer.param_groups]
    cols = view.steps.columns
    for row in sorted(cols.hyper):
        if cols.steps[row] > step:
            break
        for g, changes in enumerate(cols.hyper[row]):
            if g < len(groups):
                groups[g].update(changes)
    return groups


def plain_number(value: Any) -> Any:
    """A live hyperparameter as genesis records it (tensors → numbers, tuples → lists)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain_number(v) for v in value]
    return value


def _same(have: Any, claimed: Any) -> bool:
    """Equal hyperparameters (floats to :data:`SCHEDULE_RTOL`, lists element-wise)."""
    if isinstance(have, list) and isinstance(claimed, list):
        return len(have) == len(claimed) and all(_same(h, c) for h, c in zip(have, claimed, strict=True))
    if isinstance(have, bool) or isinstance(claimed, bool) or not isinstance(have, (int, float)) \
            or not isinstance(claimed, (int, float)):
        return bool(have == claimed)
    return abs(float(have) - float(claimed)) <= SCHEDULE_RTOL * max(abs(float(have)), abs(float(claimed)))


class RecipeRaised(Exception):
    """Recipe code raised while replay used it; the message is the check's one-line detail."""


class TracedRecipe:
    """The verifier's recipe with every call named (``doing``), so that an exception raised by
    recipe code is reported as what replay was doing and at which step."""

    def __init__(self, recipe: Any) -> None:
        self._recipe = recipe
        self.doing, self.step = "using the recipe", -1

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._recipe, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.doing = f"running {name}()"
            out = attr(*args, **kwargs)
            self.doing = f"finishing the step after {name}()"
            return out

        return call

    @contextlib.contextmanager
    def guard(self, doing: str, step: int) -> Iterator[None]:
        """Turn any exception raised inside into :class:`RecipeRaised` naming ``doing`` (or the
        recipe method running) and ``step``."""
        self.doing, self.step = doing, step
        try:
            yield
        except RecipeRaised:
            raise
        except (Exception, SystemExit) as exc:  # a recipe calling sys.exit() ends the check, not the verifier
            lines = str(exc).strip().splitlines()
            message = lines[0][:300] if lines else ""
            raise RecipeRaised(f"the recipe raised while {self.doing} at step {self.step}: "
                               f"{type(exc).__name__}: {message}") from exc


@dataclass(frozen=True, slots=True)
class Schedule:
    """What rebuilding the recipe's optimizer and scheduler showed: ``misfit`` (its param groups are
    not the ledger's: nothing can be replayed), ``problem`` (the first logged learning rate or
    hyperparameter the recipe contradicts) and the number of logged steps compared."""

    misfit: str | None
    problem: str | None
    steps: int


def _misfit(groups: list[dict[str, Any]], claimed: list[dict[str, Any]]) -> str | None:
    if len(groups) != len(claimed):
        return f"the recipe's optimizer has {len(groups)} param group(s), the ledger's {len(claimed)}"
    for g, (group, logged) in enumerate(zip(groups, claimed, strict=True)):
        if "tensors" in logged and list(group["tensors"]) != list(logged["tensors"]):
            return f"param group {g} of the recipe's optimizer updates other tensors than the ledger's"
    return None


def check_schedule(view: RunView, recipe: Any, seed: int) -> Schedule:
    """Rebuild the recipe's model, optimizer and scheduler, check the param groups against genesis,
    then step the scheduler alone (no training) through every step number and compare each logged
    learning rate and the hyperparameters in effect with the recipe's."""
    from ledger.torch import build_scheduler, optimizer_groups

    recipe = recipe if isinstance(recipe, TracedRecipe) else TracedRecipe(recipe)
    with recipe.guard("rebuilding the optimizer and scheduler", -1):
        model = recipe.build_model(seed)
        optimizer = recipe.build_optimizer(model)
        scheduler = build_scheduler(recipe, optimizer)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    misfit = _misfit(optimizer_groups(optimizer, names), view.optimizer.param_groups)
    if misfit is not None:
        return Schedule(misfit, None, 0)
    claimed = [dict(g) for g in view.optimizer.param_groups]
    compared, columns = 0, view.steps.columns
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCHEDULER_ORDER_WARNING)
        for s in range(view.last_step + 1):
            if s in view.steps:
                row = view.steps.row(s)
                lrs = columns.lrs[row] if columns.has_lrs[row] else None
                for g, changes in enumerate(columns.hyper.get(row) or []):
                    if g < len(claimed):
                        claimed[g].update(changes)
                live = optimizer.param_groups
                if lrs is not None:
                    compared += 1
                    if len(lrs) != len(live):
                        return Schedule(None, f"step {s}: {len(lrs)} learning rate(s) logged for {len(live)} "
                                              "param group(s)", compared)
                    for g, (logged, group) in enumerate(zip(lrs, live, strict=True)):
                        want = float(plain_number(group["lr"]))
                        if not _same(float(logged), want):
                            which = f" for group {g}" if len(live) > 1 else ""
                            return Schedule(None, f"the logged learning rates do not follow the recipe's schedule: "
                                                  f"step {s}: logged lr {float(logged)!r}{which}, the recipe's "
                                                  f"schedule gives {want!r}", compared)
                for g, (group, logged_group) in enumerate(zip(live, claimed, strict=True)):
                    for key in HYPER_KEYS:
                        if key in group and key in logged_group and not _same(plain_number(group[key]),
                                                                              logged_group[key]):
                            return Schedule(None, f"the logged hyperparameters do not follow the recipe: step {s}: "
                                                  f"group {g} {key} in effect {logged_group[key]!r}, the recipe "
                                                  f"gives {plain_number(group[key])!r}", compared)
            if scheduler is not None:
                with recipe.guard("stepping the recipe's scheduler alone (learning-rate schedule)", s):
                    scheduler.step()
    return Schedule(None, None, compared)
