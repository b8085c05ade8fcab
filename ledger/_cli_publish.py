"""The ``ledger publish`` command (docs/PUBLISHING.md): parse, call :func:`ledger._publish.publish`, print.

Exit codes as every command: 0 written; 1 the ledger does not verify or the weights are not the
sealed ones (nothing written); 2 could not run (unsealed ledger, ``--out`` exists, a missing file
or key, model-signing absent for a P-256 key).
"""

from __future__ import annotations

import json
import os

import click

from ledger.errors import ConfigurationError


@click.command(name="publish")
@click.argument("ledger_path", metavar="LEDGER", type=click.Path())
@click.option("--model", required=True, type=click.Path(), metavar="FINAL",
              help="The released weights: a .safetensors file or a sharded *.index.json (config and tokenizer "
                   "files beside it are copied too).")
@click.option("--out", required=True, type=click.Path(), metavar="DIR",
              help="The bundle directory to create (it must not exist).")
@click.option("--release-key", type=click.Path(), metavar="KEY.pem",
              help="The release private key (P-256 from `ledger keygen --type p256`, or Ed25519); default: "
                   "$LEDGER_RELEASE_KEY. A P-256 key also signs model.sig (OpenSSF Model Signing).")
@click.option("--include-checkpoints", is_flag=True, help="Copy this ledger's own checkpoints (the state-digest "
              "directories its entries name, nothing else) into DIR/ledger/checkpoints.")
@click.option("--passphrase-env", metavar="VAR", default="LEDGER_KEY_PASSPHRASE", show_default=True,
              help="Environment variable holding the release key's passphrase, when it is encrypted.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def publish(ledger_path: str, model: str, out: str, release_key: str | None, include_checkpoints: bool,
            passphrase_env: str, as_json: bool) -> None:
    """Write a release bundle of a sealed LEDGER and its final weights to DIR: model/, ledger/,
    attestations.intoto.jsonl, model.sig, release.pub and LEDGER.md. The weights are checked against the
    seal before anything is signed; DIR is written elsewhere and renamed into place when whole."""
    from ledger._crypto import load_release_signer
    from ledger._publish import describe
    from ledger._publish import publish as publish_bundle

    key_path = release_key or os.environ.get("LEDGER_RELEASE_KEY")
    if not key_path:
        raise ConfigurationError("publish signs the release: give --release-key KEY.pem (make a P-256 one with "
                                 "`ledger keygen --type p256 PREFIX`) or set LEDGER_RELEASE_KEY")
    value = os.environ.get(passphrase_env)
    passphrase = value.encode() if value else None
    signer = load_release_signer(key_path, passphrase)
    result = publish_bundle(ledger_path, model, out, signer, release_key_path=key_path, passphrase=passphrase,
                            include_checkpoints=include_checkpoints)
    click.echo(json.dumps(result, indent=2) if as_json else describe(result))


__all__ = ["publish"]
