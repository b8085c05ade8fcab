"""What the recorder fingerprints and how often: the options a user sets, and the cadence that
keeps the optional fingerprints within the overhead budget; the checks of ``Recorder``'s other
options (checkpointing, the writer queue)."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ledger._fingerprint import SKETCH_K, check_sketch_k
from ledger._schema import GRAD_NORM_POLICIES, POLICY_WORDS, budget_ok, interval_ok
from ledger.errors import ConfigurationError

OVERHEAD_BUDGET = 0.01  # the default budget of the optional fingerprints: ≤ 1% of the step time
RECALIBRATE_EVERY = 50
# seconds between the writer thread's rounds by default: a round of several entries costs about half
# the CPU per entry of a round of one or two (the training step evicts the writer's code and data)
DRAIN_INTERVAL = 0.25
N = TypeVar("N")  # what Cadence.take's measurements return: the norms, the sketch, the digests
S = TypeVar("S")
D = TypeVar("D")
SHARES = {"sketch": 0.4, "digests": 0.4, "batch": 0.2}  # each optional kind's share of the budget


@dataclass(frozen=True, slots=True)
class FingerprintOptions:
    """The fingerprint policy of a recorded run (recorded in genesis ``fingerprints``).

    Every step, whatever the policy: learning rates, per-tensor weight norms, and gradient norms
    when the optimizer's update bound uses them (``grad_norms="auto"``: SGD; Adam/AdamW's bound does
    not, so their gradients are not read; ``"every"``: always). Full fingerprints at every
    checkpoint and at the seal. The optional ones — ``sketch`` (the count-sketch), ``digests``
    (full tensor digests between checkpoints) and ``batch`` (batch digests) — are each ``"auto"``
    (scheduled against ``budget``), ``"every"`` / 1 (every step), a fixed interval in steps, or 0
    (``"checkpoints"`` for digests: never between checkpoints). ``budget``: the fraction of the
    measured step time the optional fingerprints may cost on the training thread (default 1%; each
    kind gets its share in :data:`SHARES`), re-measured every ``RECALIBRATE_EVERY`` steps;
    ``None``: every ``"auto"`` kind every step. Each step entry's ``carries`` says what it holds.
    ``sketch_k``: buckets of the count-sketch (a power of two)."""

    sketch: str | int = "auto"
    digests: str | int = "auto"
    sketch_k: int = SKETCH_K
    batch: str | int = "auto"
    budget: float | None = OVERHEAD_BUDGET
    grad_norms: str = "auto"

    def __post_init__(self) -> None:
        for kind, words in POLICY_WORDS.items():  # the rules genesis is read with (ledger._schema)
            if not interval_ok(kind, getattr(self, kind)):
                raise ConfigurationError(f"{kind} must be {', '.join(repr(w) for w in words)} or a number of "
                                         "steps (0: never between checkpoints)")
        if not budget_ok(self.budget):
            raise ConfigurationError("budget must be a fraction of the step time between 0 and 1 (e.g. 0.01), "
                                     "or None (every optional fingerprint every step)")
        if self.grad_norms not in GRAD_NORM_POLICIES:
            raise ConfigurationError("grad_norms must be 'auto' (when the update bound uses them) or 'every'")
        check_sketch_k(self.sketch_k)

    def fixed(self, kind: str) -> int | None:
        """The interval of an optional kind when it is not scheduled by the budget (None when it is)."""
        value = getattr(self, kind)
        if value == "auto":
            return 1 if self.budget is None else None
        return (1 if value == "every" else 0) if isinstance(value, str) else int(value)


class Cadence:
    """When the optional fingerprints are taken: each ``"auto"`` kind every n steps, n chosen from the
    median of the recent step times and of the kind's recent costs on the training thread so that
    it stays within its share of the budget. A kind is due at step s when n > 0 and s % n == 0.
    Until the first calibration every kind is taken at every step: the first two steps of a
    recorder measure each (the first cost, which builds plans and warms caches, is not counted);
    the third calibrates, and every ``RECALIBRATE_EVERY`` steps after it. While a kind has fewer
    than three measurements, a calibration lengthens its interval at most to ``RECALIBRATE_EVERY``
    steps, or to four times what it was when the kind was measured since the last calibration."""

    def __init__(self, options: FingerprintOptions) -> None:
        self.options = options
        self.every: dict[str, int] = {kind: fixed if (fixed := options.fixed(kind)) is not None else 1
                                      for kind in SHARES}
        self.periods: collections.deque[float] = collections.deque(maxlen=32)
        self.costs: dict[str, collections.deque[float]] = {
            name: collections.deque(maxlen=5) for name in ("norms", *SHARES)}
        self.start: int | None = None  # the first step this recorder records
        self._warm: set[str] = set()
        self._fresh: set[str] = set()  # kinds measured since the last calibration

    def tick(self, step: int) -> bool:
        """Step ``step`` begins: calibrate when it is a calibration step; whether it was."""
        if self.start is None:
            self.start = step
        n = step - self.start
        if n >= 2 and n % RECALIBRATE_EVERY == 2:
            self.calibrate()
            return True
        return False

    def measured(self, kind: str, seconds: float) -> None:
        """What taking ``kind`` cost on the training thread (the first time is not counted)."""
        if kind in self._warm:
            self.costs[kind].append(seconds)
            self._fresh.add(kind)
        else:
            self._warm.add(kind)

    def take(self, step: int, norms: Callable[[], N], sketch: Callable[[], S | None],
             digests: Callable[[], D]) -> tuple[N, S | None, D | None]:
        """Step ``step``'s fingerprints on the training thread: the norms, and the sketch and the
        digests when due (else None), each call's cost measured for the next calibration."""
        t0 = time.perf_counter()
        taken_norms = norms()
        t1 = time.perf_counter()
        self.measured("norms", t1 - t0)
        taken_sketch: S | None = None
        taken_digests: D | None = None
        if self.due("sketch", step):
            taken_sketch = sketch()
            t2 = time.perf_counter()
            self.measured("sketch", t2 - t1)
            t1 = t2
        if self.due("digests", step):
            taken_digests = digests()
            self.measured("digests", time.perf_counter() - t1)
        return taken_norms, taken_sketch, taken_digests

    def due(self, kind: str, step: int) -> bool:
        """True when step ``step`` carries the optional fingerprint ``kind``."""
        n = self.every[kind]
        return n > 0 and step % n == 0

    def calibrate(self) -> None:
        """Choose each budgeted kind's interval from the measured costs and step time."""
        if not self.periods or self.options.budget is None:
            return
        budget = self.options.budget * statistics.median(self.periods)
        for kind, share in SHARES.items():
            if self.options.fixed(kind) is None and self.costs[kind]:
                costs = self.costs[kind]
                wanted = max(1, math.ceil(statistics.median(costs) / (share * budget)))
                if len(costs) < 3:  # a median one slow measurement (a preempted sketch) can still set:
                    # grow at most to RECALIBRATE_EVERY, or fourfold after a new measurement, so the
                    # measurements that would correct it still come
                    grown = 4 * self.every[kind] if kind in self._fresh else self.every[kind]
                    wanted = min(wanted, max(grown, RECALIBRATE_EVERY))
                self.every[kind] = wanted
        self._fresh.clear()

    def state(self) -> tuple[int, ...]:
        """The intervals in force (sketch, digests, batch): what rank 0 broadcasts."""
        return tuple(self.every[kind] for kind in SHARES)

    def adopt(self, state: tuple[int, ...]) -> None:
        """Take the intervals rank 0 chose."""
        self.every = dict(zip(SHARES, (int(n) for n in state), strict=True))


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


def check_queue(queue_size: int, drain_interval: float | None, max_lag: float) -> None:
    """Refuse writer-queue bounds that are not positive (``drain_interval`` None: the default)."""
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ConfigurationError("queue_size must be a positive number of entries")
    if not (drain_interval is None or drain_interval > 0) or not max_lag > 0:
        raise ConfigurationError("drain_interval and max_lag must be positive numbers of seconds")


def writer_interval(drain_interval: float | None, max_lag: float) -> float:
    """The writer thread's interval: ``drain_interval``, or by default :data:`DRAIN_INTERVAL` and
    at most a quarter of ``max_lag``."""
    return min(DRAIN_INTERVAL, max_lag / 4) if drain_interval is None else drain_interval


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
