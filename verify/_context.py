"""What a verification has loaded and been asked, in one frozen object every check reads."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger._crypto import PublicKey
from ledger._merkle import PrefixTree
from ledger._reader import Ledger
from ledger.errors import ConfigurationError
from ledger.verify._inputs import ModelDigests
from ledger.verify._load import Loaded
from ledger.verify._result import CheckResult
from ledger.verify._run import RunView

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Options:
    """How to verify: ``sample`` (check the head and N random entries only, drawn with
    ``sample_seed``), ``workers`` for signatures, ``replay`` random intervals drawn with
    ``replay_seed``, ``tolerance`` (force the relative replay rule with this ρ), ``require`` (checks
    whose warn or skip fails the verdict)."""

    sample: int | None = None
    sample_seed: int = 0
    workers: int | None = None
    replay: int = 2
    replay_seed: int = 0
    tolerance: float | None = None
    require: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 0:
            raise ConfigurationError("--sample must be zero or more")
        if self.replay < 0 or (self.tolerance is not None and self.tolerance <= 0):
            raise ConfigurationError("--replay must be ≥ 0 and --tolerance > 0")


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a check may read: the ledger as loaded (``loaded``: rows and recomputed hashes;
    ``view``: the decoded run, None when the genesis is unreadable), the inputs the verifier named
    (each None when not given), the options, and the results of the checks that ran before.
    ``base`` is the declared fine-tuning base's weights (``--base``); ``recipe_files`` the files the
    recipe opened while it was imported (disclosure, :mod:`ledger.verify._disclosure`)."""

    ledger: Ledger
    loaded: Loaded
    view: RunView | None
    options: Options
    view_error: str | None = None
    key: PublicKey | None = None
    model: Path | None = None
    checkpoints: Path | None = None
    recipe: Any = None
    recipe_digest: bytes | None = None
    against: tuple[Path, ...] = ()
    base: Path | None = None
    recipe_files: tuple[str, ...] = ()
    progress: Progress | None = None
    results: Mapping[str, CheckResult] = field(default_factory=dict)
    mlflow: Any = None  # the MLflow run to compare with (verify/_mlflow.MlflowSource), for check ``mlflow``
    tsa_roots: tuple[Any, ...] = ()  # trusted TSA root certificates (``--tsa-roots``), for check ``timestamps``
    model_digests: ModelDigests | None = None  # the ``model`` file's tensor/v1 digests, hashing since the load began
    # draws --sample entries: one stream seeded with sample_seed, shared by the checks in order (chain,
    # then signatures), so a seed reproduces the whole draw
    rng: random.Random = field(default_factory=random.Random)
    # what several checks derive from the same entries, derived once by the first that asks (:meth:`tree`);
    # the registry's copies of the context share it
    shared: dict[str, Any] = field(default_factory=dict)

    def tree(self) -> PrefixTree:
        """The Merkle tree of the entry hashes (its perfect subtrees), built once: the seal's root and
        the signed tree heads' prefix roots are read from it."""
        tree = self.shared.get("tree")
        if tree is None:
            tree = self.shared["tree"] = PrefixTree(self.loaded.hashes)
        assert isinstance(tree, PrefixTree)
        return tree
