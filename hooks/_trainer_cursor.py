"""The chain cursor a Hugging Face Trainer checkpoint carries: ``checkpoint-N/ledger_cursor.json``.

The Trainer restores no callback state, so :class:`ledger.hooks.transformers.LedgerTrainerCallback`
writes this file into each ``checkpoint-N/`` it sees saved, and reads it back when the Trainer resumes
from one. The checkpoint's files, this one included, are pinned by the signed manifest the ledger
records of the directory right after it is written (a checkpoint entry of layout ``"files"``,
docs/FORMAT.md §11.1), which resume checks first. No torch and no transformers here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ledger
from ledger import _dcp
from ledger._io import read_regular
from ledger._record import Kind
from ledger.errors import ConfigurationError

CURSOR_FILE = "ledger_cursor.json"
CURSOR_FORMAT = "training-ledger/hf-trainer-cursor/v1"
MAX_CURSOR = 1 << 20  # bytes: a cursor file is a few hundred
PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def write_cursor(directory: Path, ledger_path: Path, global_step: int, cursor: Mapping[str, Any]) -> Path:
    """Write ``directory/ledger_cursor.json`` (atomically): the ledger and the chain cursor after
    ``global_step`` (the ledger checkpoint written with the directory)."""
    body: dict[str, Any] = {"format": CURSOR_FORMAT, "ledger": str(ledger_path), "global_step": global_step,
                            "cursor": dict(cursor),
                            "manifest": "the ledger's checkpoint entry of layout 'files' at this step"}
    target = directory / CURSOR_FILE
    tmp = directory / f".{CURSOR_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


def find_checkpoint(args: Any, global_step: int) -> Path:
    """The checkpoint-N directory the Trainer resumed from: ``TrainingArguments.resume_from_checkpoint``
    when it names one holding a cursor, else ``<output_dir>/checkpoint-<global_step>`` (the Trainer
    does not tell callbacks which directory it read)."""
    named = getattr(args, "resume_from_checkpoint", None)
    if isinstance(named, (str, os.PathLike)) and (Path(named) / CURSOR_FILE).is_file():
        return Path(named)
    return Path(args.output_dir) / f"{PREFIX}-{global_step}"


def read_cursor(directory: Path, global_step: int, ledger_path: Path) -> dict[str, Any]:
    """The chain cursor saved with ``directory`` (a checkpoint at ``global_step``); its files must
    still match what was recorded of them (ConfigurationError naming those that do not)."""
    path = directory / CURSOR_FILE
    # the files first, this one included: a cursor file the ledger's signed manifest vouches for is parsed
    changed = _dcp.compare(directory, _manifest(ledger_path, directory, global_step - 1), nested=True)
    if changed:
        raise ConfigurationError(f"{directory} changed since the ledger recorded it ({'; '.join(changed[:5])}); "
                                 "resume from an unmodified checkpoint")
    try:
        body = json.loads(read_regular(path, what="ledger cursor file", limit=MAX_CURSOR,
                                       error=ConfigurationError).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigurationError(f"the Trainer resumed at global_step {global_step} but {path} could not be read "
                                 f"({exc}); resume from a checkpoint-N written with LedgerTrainerCallback, or set "
                                 "TrainingArguments.resume_from_checkpoint to its directory") from None
    cursor = body.get("cursor") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != CURSOR_FORMAT or not isinstance(cursor, dict) \
            or not isinstance(cursor.get("checkpoint"), dict):
        raise ConfigurationError(f"{path} is not a ledger cursor file ({CURSOR_FORMAT})")
    if body.get("global_step") != global_step or cursor["checkpoint"].get("step") != global_step - 1:
        raise ConfigurationError(f"{path} was written at global_step {body.get('global_step')}, but the Trainer "
                                 f"resumed at global_step {global_step}")
    return cursor


def _manifest(ledger_path: Path, directory: Path, step: int) -> dict[str, dict[str, Any]]:
    """The files of the last manifest the ledger recorded for ``directory`` at ``step`` (the chain and
    signatures are checked by ``Recorder.resume`` right after)."""
    where = str(directory.absolute())
    found = [e.body() for e in ledger.open(ledger_path).entries() if e.kind is Kind.CHECKPOINT and e.step == step]
    files = [b["files"] for b in found if b.get("layout") == "files" and b.get("path") == where]
    if not files:
        raise ConfigurationError(f"the ledger at {ledger_path} records no manifest of {directory}; resume from a "
                                 "checkpoint-N written with LedgerTrainerCallback into this ledger")
    return dict(files[-1])
