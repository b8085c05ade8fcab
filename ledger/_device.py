"""Where the recorder's measurements of live tensors (norms, sketches) run, part of the torch adapter.

On CUDA a :class:`Lane` runs them on a side stream that first waits for the work already queued
on the current stream, copies their results into pinned host memory without blocking, and makes
the current stream wait (on the device, not the host) until they are done, so a later optimizer
step cannot overwrite a tensor before it was read. The training thread never waits for the device;
the thread that needs the values (the recorder's writer) waits on an event. Elsewhere (CPU, MPS)
there is no stream to order: the work runs when launched, on the current stream, and the values
are moved to the CPU when they are asked for (the stream calls of :class:`HostBackend` do nothing;
a backend that only logs them tests the CUDA order of calls without a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Backend(Protocol):
    """The stream operations a :class:`Lane` needs (``torch.cuda``'s, or none)."""

    def current_stream(self) -> Any: ...
    def new_stream(self) -> Any: ...
    def use(self, stream: Any) -> AbstractContextManager[Any]: ...
    def to_host(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def keep(self, tensor: torch.Tensor, stream: Any) -> None: ...


class _Now:
    """The stream and event of a device without streams: everything is already done."""

    def wait_stream(self, stream: Any) -> None:
        """Nothing to wait for."""

    def wait_event(self, event: Any) -> None:
        """Nothing to wait for."""

    def record_event(self) -> _Now:
        """An event that has happened."""
        return self

    def synchronize(self) -> None:
        """Nothing to wait for."""


_DONE = _Now()


class HostBackend:
    """No streams: work runs on the current stream when launched; values move to the CPU when read."""

    def current_stream(self) -> _Now:
        """The do-nothing stream."""
        return _Now()

    def new_stream(self) -> _Now:
        """The do-nothing stream."""
        return _Now()

    def use(self, stream: Any) -> AbstractContextManager[Any]:
        """No stream to switch to."""
        return nullcontext()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor itself (moved to the CPU by :meth:`Landing.value`)."""
        return tensor

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        """Nothing outlives the call."""


@dataclass(frozen=True, slots=True)
class CudaBackend:
    """The streams of one CUDA device."""

    device: torch.device

    def current_stream(self) -> torch.cuda.Stream:
        """The stream the training thread queues work on."""
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> torch.cuda.Stream:
        """A side stream on the device."""
        return torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def use(self, stream: Any) -> AbstractContextManager[Any]:
        """Queue the work of the block on ``stream``."""
        return torch.cuda.stream(stream)

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pinned host copy, queued on the current stream without waiting for it."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        """Keep the tensor's memory from reuse until ``stream``'s queued work is done."""
        tensor.record_stream(stream)


@dataclass(frozen=True, slots=True)
class Landing:
    """Results launched on a lane: :meth:`value` waits for them (on the thread that needs them)."""

    results: tuple[torch.Tensor, ...]  # on the host (pinned) on CUDA, as computed elsewhere
    done: Any  # the event recorded after the copies
    keep: tuple[torch.Tensor, ...]  # the device results, alive until the copies are done

    def value(self) -> tuple[torch.Tensor, ...]:
        """The results, on the CPU."""
        self.done.synchronize()
        return tuple(result.cpu() for result in self.results)


NOTHING = Landing((), _DONE, ())  # what launching no work lands


class Lane:
    """Launches measurements of tensors off the current stream (see the module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.side = backend.new_stream()
        self.streamless = type(backend) is HostBackend  # no stream to order: work runs when launched

    def launch(self, work: Callable[[], Sequence[torch.Tensor]], reads: Sequence[torch.Tensor]) -> Landing:
        """Run ``work`` (which reads ``reads`` and returns its results as tensors) on the side
        stream after the work queued so far; the current stream waits for it on the device."""
        if self.streamless:  # nothing to order: the work runs now
            with torch.no_grad():
                results = tuple(work())
            return Landing(results, _DONE, ())
        current = self.backend.current_stream()
        self.side.wait_stream(current)
        with self.backend.use(self.side), torch.no_grad():
            results = tuple(work())
            hosts = tuple(self.backend.to_host(result) for result in results)
            done = self.side.record_event()
        for tensor in reads:
            self.backend.keep(tensor, self.side)
        current.wait_event(done)
        return Landing(hosts, done, results)


@functools.cache
def lane_for(device: torch.device) -> Lane:
    """The lane of a device: a side stream on CUDA, no streams elsewhere (one per device and process)."""
    return Lane(CudaBackend(device) if device.type == "cuda" else HostBackend())


def common_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The device of tensors all on one device; the CPU when they are on several (or none)."""
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def lane_of(tensors: Sequence[torch.Tensor]) -> Lane:
    """The lane of tensors on one device (and of an empty list); tensors on several devices get
    the stream-less lane, whose work runs on each device's current stream."""
    return lane_for(common_device(tensors))
