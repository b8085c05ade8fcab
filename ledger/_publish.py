"""``ledger publish``: a release bundle of weights, ledger, attestations and OMS signature.

Layout (docs/PUBLISHING.md): ``model/`` (the weights as a Hugging Face repository folder),
``ledger/`` (parts, log, ``key.pub``, ``heads/``, and with ``include_checkpoints`` the
``<state digest>`` directories of the ledger's own checkpoint entries), ``attestations.intoto.jsonl``,
``model.sig`` (P-256 release keys), ``release.pub`` and ``LEDGER.md``. The bundle is built in a
temporary directory beside ``out`` and renamed into place when whole; an existing ``out`` is never
touched. Before anything is signed, the copied weights are checked against the seal's tensor
digests and the copied ledger is verified (chain, seal, model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ledger import __version__
from ledger._attest import LEDGER_PREDICATE, SLSA_PREDICATE, jsonable, provenance, seal_envelope, statement
from ledger._crypto import ReleaseSigner, public_key_pem
from ledger._io import open_regular
from ledger._layout import create_file, fsync_dir
from ledger._publish_card import model_card
from ledger._publish_facts import heads_of, ledger_facts, ledger_predicate
from ledger._text import printable
from ledger.errors import ConfigurationError, StorageError, VerificationError

#: Files copied from beside the weights when present (a Hugging Face repository's model files).
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
_CHUNK = 8 << 20
_HEAD_FILE = re.compile(r"^[0-9]{1,20}\.(note|tsr)$")


def copy_file(src: Path, dst: Path, what: str) -> str:
    """Copy a regular file to a new ``dst`` (never over one), fsynced; its SHA-256 (hex)."""
    digest = hashlib.sha256()
    try:
        with open_regular(src, what=what, error=ConfigurationError) as handle:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            with os.fdopen(fd, "wb") as out:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {src} does not exist") from None
    except FileExistsError:
        raise ConfigurationError(f"{what} {src}: the bundle already holds a file named {dst.name}") from None
    return digest.hexdigest()


def _copy_tree(src: Path, dst: Path, what: str) -> None:
    """Copy a directory of regular files and directories (a symlink or a special file is refused)."""
    dst.mkdir()
    for item in sorted(src.iterdir()):
        if item.is_symlink():
            raise ConfigurationError(f"{what} {item} is a symlink; a bundle holds regular files only")
        if item.is_dir():
            _copy_tree(item, dst / item.name, what)
        else:
            copy_file(item, dst / item.name, what)


def _weights(model: Path) -> tuple[list[tuple[Path, str]], str]:
    """The files of the weights (source, name in ``model/``) and the entry file's name there: a single
    file becomes ``model.safetensors``, an index ``model.safetensors.index.json`` beside its shards."""
    from ledger._fingerprint import _shard_files

    if model.name.endswith(".index.json"):
        entry = "model.safetensors.index.json"
        files = [(model, entry)] + [(shard, shard.name) for shard in _shard_files(model)]
        taken = {"model.safetensors", entry, model.name, *CONFIG_FILES}
        clash = sorted(name for _, name in files[1:] if name in taken)
        if clash:
            raise ConfigurationError(f"--model {model}: shard {clash[0]!r} would be named like the bundle's entry, "
                                     "its index or a config file in model/ (a loader could read it instead): rename "
                                     "the shards")
    elif model.name.endswith(".safetensors"):
        entry = "model.safetensors"
        files = [(model, entry)]
    else:
        raise ConfigurationError(f"--model {model}: give a .safetensors file or a sharded *.index.json")
    names = {name for _, name in files}
    files += [(model.parent / n, n) for n in CONFIG_FILES if n not in names and (model.parent / n).is_file()]
    return files, entry


def _gate(ledger_dir: Path, weights: Path) -> None:
    """Refuse to sign a ledger that does not verify or weights that are not the sealed ones."""
    from ledger.verify import verify_ledger

    report = verify_ledger(ledger_dir, model=weights, replay=0)
    failed = [c for c in report.checks if c.status.value == "fail"]
    model = report.check("model")
    if model.status.value == "fail":
        raise VerificationError(f"the weights are not the sealed final weights ({model.detail}): not published", report)
    if failed:
        raise VerificationError(f"the ledger does not verify ({failed[0].name}: {failed[0].detail}): not published",
                                report)
    if model.status.value != "pass":
        raise VerificationError(f"the weights could not be compared with the seal ({model.detail}): not published",
                                report)


def _checkpoint_dirs(book: Any, root: Path) -> list[Path]:
    """The ``<state digest>`` directories under ``root`` that this ledger's checkpoint entries name
    (in the recorder's layout, not pruned, present): nothing else in ``root`` is published."""
    from ledger._record import Kind
    from ledger._schema import CheckpointBody, PruneBody

    named: dict[str, None] = {}
    pruned: set[str] = set()
    for item in book.entries():
        if item.kind is Kind.CHECKPOINT:
            body = CheckpointBody.from_body(item.body())
            if body.stored_here:
                named[body.state_digest.hex()] = None
        elif item.kind is Kind.PRUNE:
            pruned.add(PruneBody.from_body(item.body()).state_digest.hex())
    return [root / name for name in named if name not in pruned and (root / name).is_dir()]


def _copy_ledger(ledger: Path, dst: Path, checkpoints: list[Path] | None) -> None:
    dst.mkdir()
    _copy_tree(ledger / "parts", dst / "parts", "ledger part")
    if (ledger / "wal.log").is_file():  # manifest.json is a convenience index no verifier reads: left out
        copy_file(ledger / "wal.log", dst / "wal.log", "ledger wal.log")
    if (ledger / "heads").is_dir():
        (dst / "heads").mkdir()
        for item in sorted((ledger / "heads").iterdir()):
            if _HEAD_FILE.match(item.name):
                copy_file(item, dst / "heads" / item.name, "tree head file")
    if checkpoints is not None:
        from ledger._state import FILES

        (dst / "checkpoints").mkdir()
        for directory in checkpoints:
            (dst / "checkpoints" / directory.name).mkdir()
            for name in FILES:
                if (directory / name).is_file() and not (directory / name).is_symlink():
                    copy_file(directory / name, dst / "checkpoints" / directory.name / name, "checkpoint file")


def publish(ledger: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str],
            signer: ReleaseSigner, *, release_key_path: str | os.PathLike[str] | None = None,
            passphrase: bytes | None = None, include_checkpoints: bool = False) -> dict[str, Any]:
    """Write the release bundle of the sealed ``ledger`` and its final weights ``model`` to ``out``
    (which must not exist), signed with ``signer``; the OMS ``model.sig`` is written when the
    release key is P-256 (``release_key_path`` is its PEM, read by ``model_signing``). Returns what
    was written. Raises :class:`ConfigurationError` (exit 2) for inputs that cannot be used and
    :class:`VerificationError` (exit 1) when the ledger does not verify or the weights differ
    from the seal's."""
    from ledger import _oms
    from ledger._reader import Ledger
    from ledger._schema import Genesis, checkpoint_root

    ledger, model, out = Path(ledger), Path(model), Path(out)
    if os.path.lexists(out):
        raise ConfigurationError(f"{out} already exists; publish never overwrites: give a new --out")
    book = Ledger(ledger)
    if not book.sealed:
        raise ConfigurationError(f"{ledger} is not sealed: only a finished run (closed recorder) can be published")
    if signer.public.algorithm == "p256" and release_key_path is not None:
        _oms._require()
    files, entry = _weights(model)
    checkpoints = None
    if include_checkpoints:
        root = checkpoint_root(ledger, Genesis.from_body(book.genesis()))
        if not root.is_dir():
            raise ConfigurationError(f"--include-checkpoints: the run's checkpoint directory {root} is not there")
        checkpoints = _checkpoint_dirs(book, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".publishing", dir=out.parent))
    try:
        (tmp / "model").mkdir()
        subjects = {f"model/{name}": copy_file(src, tmp / "model" / name, "weights file") for src, name in files}
        _copy_ledger(ledger, tmp / "ledger", checkpoints)
        _gate(tmp / "ledger", tmp / "model" / entry)
        facts = ledger_facts(tmp / "ledger", entry=f"model/{entry}", version=__version__)
        create_file(tmp / "ledger" / "key.pub", public_key_pem(bytes.fromhex(facts["keys"]["trainer"]["publicKey"])))
        facts["keys"]["release"] = {"keyId": signer.public.key_id.hex(), "algorithm": signer.public.algorithm,
                                    "publicKeyPem": signer.public.pem().decode("ascii")}
        heads, stamps = heads_of(tmp / "ledger", facts)
        predicate = ledger_predicate(facts, heads, stamps)
        lines = [seal_envelope(statement(subjects, LEDGER_PREDICATE, predicate), [signer]),
                 seal_envelope(statement(subjects, SLSA_PREDICATE, jsonable(provenance(facts))), [signer])]
        create_file(tmp / "attestations.intoto.jsonl",
                    b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in lines))
        create_file(tmp / "release.pub", signer.public.pem())
        skipped = None
        if signer.public.algorithm == "p256" and release_key_path is not None:
            _oms.sign(tmp / "model", tmp / "model.sig", release_key_path, passphrase)
        else:
            skipped = ("model.sig not written: OMS key signatures need an ECDSA P-256 release key "
                       "(`ledger keygen --type p256`)")
        create_file(tmp / "LEDGER.md", model_card(facts, subjects, has_oms=skipped is None).encode("utf-8"))
        for directory in (tmp / "model", tmp / "ledger", tmp):
            fsync_dir(directory)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)  # fails on a non-empty directory that appeared meanwhile
        except OSError as exc:
            raise StorageError(f"cannot move the bundle into place at {out}: {exc.strerror or exc}") from exc
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "files": sorted(subjects), "release_key_id": signer.public.key_id.hex(),
            "tree_size": facts["ledger"]["treeSize"], "root": facts["ledger"]["rootHash"], "skipped": skipped}


def describe(result: dict[str, Any]) -> str:
    """What ``publish`` wrote, in a few lines for the terminal."""
    lines = [f"published {printable(result['out'])}: {len(result['files'])} model file(s), ledger of "
             f"{result['tree_size']} entries (root {result['root'][:16]}…), release key "
             f"{result['release_key_id'][:16]}…"]
    if result.get("skipped"):
        lines.append(f"note: {result['skipped']}")
    return "\n".join(lines)


__all__ = ["CONFIG_FILES", "copy_file", "describe", "publish"]
