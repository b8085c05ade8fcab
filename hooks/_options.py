"""What the recorder fingerprints and how often: the options a user sets, and the cadence that
keeps the optional fingerprints within the overhead budget; the checks of ``Recorder``'s other
options (checkpointing, the writer queue)."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any

from ledger._fingerprint import SKETCH_K, check_sketch_k
from ledger.errors import ConfigurationError

OVERHEAD_BUDGET = 0.01  # the recorder's target: ≤ 1% of the step time
RECALIBRATE_EVERY = 50


@dataclass(frozen=True, slots=True)
class FingerprintOptions:
    """The fingerprint policy of a recorded run (recorded in genesis ``fingerprints``).

    ``sketch``: ``"auto"`` (a cadence that keeps its cost near 0.4 % of the step), an interval in
    steps, or 0 (off). ``digests``: ``"auto"`` (every step when they cost < 0.5 % of the step, else
    at checkpoints), ``"every"`` or ``"checkpoints"``. ``sketch_k``: buckets of the count-sketch (a
    power of two). Per-tensor norms are taken every step whatever the policy."""

    sketch: str | int = "auto"
    digests: str = "auto"
    sketch_k: int = SKETCH_K

    def __post_init__(self) -> None:
        if not (self.sketch == "auto" or (isinstance(self.sketch, int) and not isinstance(self.sketch, bool)
                                          and self.sketch >= 0)):
            raise ConfigurationError("sketch must be 'auto', 0 (off) or a positive interval in steps")
        if self.digests not in ("auto", "every", "checkpoints"):
            raise ConfigurationError("digests must be 'auto', 'every' or 'checkpoints'")
        check_sketch_k(self.sketch_k)


class Cadence:
    """When the optional fingerprints are taken: chosen from the median of the recent step times and
    of their recent costs, re-measured every ``RECALIBRATE_EVERY`` steps, under ``OVERHEAD_BUDGET``."""

    def __init__(self, options: FingerprintOptions) -> None:
        self.options = options
        self.sketch_every = 1 if options.sketch == "auto" else int(options.sketch)
        self.digests = options.digests in ("auto", "every")
        self.periods: collections.deque[float] = collections.deque(maxlen=32)
        self.costs: dict[str, collections.deque[float]] = {
            name: collections.deque(maxlen=5) for name in ("norms", "sketch", "digests")}

    def sketch_due(self, step: int) -> bool:
        """True when step ``step`` carries a sketch."""
        return bool(self.sketch_every) and step % self.sketch_every == 0

    def calibrate(self) -> None:
        """Choose the sketch interval and whether full digests go in every step."""
        if not self.periods:
            return
        budget = OVERHEAD_BUDGET * statistics.median(self.periods)
        if self.options.sketch == "auto" and self.costs["sketch"]:
            self.sketch_every = max(1, math.ceil(statistics.median(self.costs["sketch"]) / (0.4 * budget)))
        if self.options.digests == "auto" and self.costs["digests"]:
            self.digests = statistics.median(self.costs["digests"]) < 0.5 * budget


def resolve(fingerprints: FingerprintOptions | None, deprecated: dict[str, Any]) -> FingerprintOptions:
    """The fingerprint policy; ``sketch=``, ``digests=``, ``sketch_k=`` keywords (before 0.2) still
    work one release, with a warning."""
    unknown = sorted(set(deprecated) - {"sketch", "digests", "sketch_k"})
    if unknown:
        raise TypeError(f"Recorder() got an unexpected keyword argument {unknown[0]!r}")
    if not deprecated:
        return fingerprints or FingerprintOptions()
    warnings.warn(f"Recorder({', '.join(f'{k}=' for k in sorted(deprecated))}…) is deprecated: pass "
                  "fingerprints=FingerprintOptions(...)", DeprecationWarning, stacklevel=3)
    return dataclasses.replace(fingerprints or FingerprintOptions(), **deprecated)


def check_checkpointing(checkpoint_every: int | None, keep: Any) -> None:
    """Refuse a ``checkpoint_every`` or ``keep`` that is not a valid setting."""
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigurationError("checkpoint_every must be a positive number of steps")
    if keep is not None and not (isinstance(keep, tuple) and len(keep) == 2 and keep[0] in ("last", "every")
                                 and isinstance(keep[1], int) and keep[1] >= 1):
        raise ConfigurationError("keep must be None, ('last', n) or ('every', n)")


def check_queue(queue_size: int, drain_interval: float, max_lag: float) -> None:
    """Refuse writer-queue bounds that are not positive."""
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ConfigurationError("queue_size must be a positive number of entries")
    if not drain_interval > 0 or not max_lag > 0:
        raise ConfigurationError("drain_interval and max_lag must be positive numbers of seconds")


def callback_options(owner: str, options: dict[str, Any], ours: tuple[str, ...], mlflow: Any) -> dict[str, Any]:
    """The ``Recorder`` options a framework callback (``owner``) passes through, ``mlflow`` (True or an
    ``MlflowSink``: mirror the ledger into MLflow) among them; the options the callback sets itself
    (``ours``) and unknown ones are refused, each with one line."""
    import inspect

    from ledger.hooks._recorder import Recorder

    taken = sorted(set(options) & set(ours))
    if taken:
        raise ConfigurationError(f"{owner} sets Recorder's {', '.join(taken)} itself (from the trainer): remove "
                                 "them from its arguments")
    allowed = set(inspect.signature(Recorder.__init__).parameters) - {"self", "path", "key", "deprecated", *ours}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigurationError(f"{owner} got an unknown option {unknown[0]!r}: it takes {', '.join(sorted(allowed))}")
    return {**options, "mlflow": mlflow} if mlflow is not None else options
