"""Shared fixtures: keys and small real ledgers on disk."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import ledger
from ledger import LedgerWriter, Signer

FIXED_SEED = bytes(range(32))


def fixed_clock(start: int = 1_767_225_600_000_000_000, step: int = 1_000_000) -> Callable[[], int]:
    """A deterministic clock (ns) for byte-stable ledgers."""
    counter = itertools.count()
    return lambda: start + step * next(counter)


def step_body(i: int) -> dict:
    """A body shaped like a real step entry."""
    rng = np.random.default_rng(i)
    return {"metrics": {"loss": 1.0 / (i + 1), "lr": 1e-3, "grad_norm": float(rng.random())},
            "norms": rng.random(8).astype(np.float32)}


def write_ledger(path: Path, signer: Signer, steps: int, *, seal: bool = True, rollover: int = 8192,
                 run_id: str | None = None, clock: Callable[[], int] | None = None) -> Path:
    """Write a ledger of ``steps`` step entries (and a seal)."""
    writer = LedgerWriter.create(path, signer, genesis={"config": {"lr": 1e-3}}, run_id=run_id,
                                 rollover_entries=rollover, clock=clock or fixed_clock())
    for i in range(steps):
        writer.append("step", i, step_body(i))
    if seal:
        writer.seal()
    else:
        writer.close()
    return path


@pytest.fixture
def signer() -> Signer:
    return Signer.from_seed(FIXED_SEED)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh key pair on disk: (private .pem, public .pub)."""
    return ledger.generate_keypair(tmp_path / "keys" / "trainer")


@pytest.fixture
def make_ledger(tmp_path: Path, signer: Signer) -> Callable[..., Path]:
    counter = itertools.count()

    def make(steps: int = 20, **kwargs) -> Path:
        return write_ledger(tmp_path / f"ledger{next(counter)}", kwargs.pop("signer", signer), steps, **kwargs)

    return make


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` (sqlite, local artifacts) for the session; yields its tracking URI."""
    from mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.tracking_uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tsa_server(tmp_path_factory: pytest.TempPathFactory):
    """A local RFC 3161 TSA (throwaway CA, ``openssl ts -reply`` over HTTP on 127.0.0.1) for the
    session; yields the running :class:`tsa_server.TsaServer` (``.url``, ``.authority.root``, ``.mode``)."""
    from tsa_server import start_tsa_server

    server = start_tsa_server(tmp_path_factory.mktemp("tsa"))
    try:
        yield server
    finally:
        server.stop()
