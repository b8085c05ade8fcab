"""``LEDGER.md``: the model-card section of a release bundle (docs/PUBLISHING.md).

Markdown a lab can paste into a Hugging Face model card: what the ledger recorded, the identifiers
that pin it (run id, tree size and root, key ids, model digests), and the commands that verify the
release offline. The commands name the lab's keys by placeholders (``LAB_RELEASE.pub``,
``TRAINER.pub``) or pin them by id in a policy: a key taken from the download authenticates nothing,
and ``ledger verify`` refuses one that lies inside the folder it verifies. ``ledger verify`` also
regenerates this text from the attested facts to tell whether LEDGER.md is the card publish wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _row(name: str, value: Any) -> str:
    return f"| {name} | `{value}` |"


def model_card(facts: Mapping[str, Any], subjects: Mapping[str, str], *, has_oms: bool) -> str:
    """The LEDGER.md text for a bundle with these facts (see :func:`ledger._publish_facts.ledger_facts`)
    and model files (bundle path → SHA-256 hex)."""
    ledger, keys, weights = facts["ledger"], facts["keys"], facts["weights"]
    rows = [
        _row("run id", facts["runId"]),
        _row("origin", facts["origin"]),
        _row("ledger entries (sealed)", ledger["treeSize"]),
        _row("ledger root (RFC 9162)", ledger["rootHash"]),
        _row("trainer key id (Ed25519)", keys["trainer"]["keyId"]),
        _row(f"release key id ({keys['release']['algorithm']})", keys["release"]["keyId"]),
        _row("final model digest", weights["final"]["modelDigest"]),
    ]
    if "init" in weights:
        rows.append(_row("init model digest", weights["init"]["modelDigest"]))
    if facts.get("recipe"):
        rows.append(_row("recipe source SHA-256", facts["recipe"]["sourceSha256"]))
    if facts.get("batches"):
        rows.append(_row(f"batch-digest root ({facts['batches']['steps']} steps)", facts["batches"]["root"]))
    files = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(subjects.items()))
    ids = ", ".join(f'"{i}"' for i in dict.fromkeys((keys["release"]["keyId"], keys["trainer"]["keyId"])))
    oms = ("\n\nThe OpenSSF Model Signing signature of `model/` checks with the reference verifier too (with the "
           "lab's P-256 release key, not the `release.pub` of the download):\n\n"
           "```sh\nmodel_signing verify key --signature release/model.sig --public_key LAB_RELEASE.pub "
           "release/model\n```"
           if has_oms else "")
    return f"""## Training ledger

This release comes with a signed, hash-chained record of the training run that produced it
(training-ledger, ledger format version {facts['formatVersion']}). The
ledger (`ledger/`) holds the run's genesis (configuration, seed, software environment, code and
recipe digests, optimizer, architecture and a fingerprint of the initial weights), one signed entry
per optimizer step (metrics, learning rates, gradient norm, a digest of the batch, per-tensor norms
and sketches), the checkpoints' digests, and a seal that commits to the final weights' tensor
digests and to the Merkle root of every entry. `attestations.intoto.jsonl` holds two DSSE-signed
in-toto statements about the files in `model/`: the ledger predicate
(`https://training-ledger.dev/attestation/ledger/v1`) and SLSA Provenance v1.

| | |
|---|---|
{chr(10).join(rows)}

| file | SHA-256 |
|---|---|
{files}

### How to verify

Offline, from a download of this repository (for example `huggingface-cli download ORG/NAME
--local-dir release`). Trust comes from the lab, not from this repository: `LAB_RELEASE.pub` and
`TRAINER.pub` stand for copies of the release key and the trainer key that you obtained from the
lab itself (their key ids are in the table above; the `release.pub` and `ledger/key.pub` of the
download prove nothing, and `ledger verify` refuses a key or policy inside the folder it checks):

```sh
pip install 'training-ledger[publish]'
ledger verify release --key TRAINER.pub --release-key LAB_RELEASE.pub
```

Or pin the keys by id in a policy file kept outside `release/`, after checking the ids against
those the lab announces elsewhere (this file comes with the download: its ids are claims too):

```toml
# policy.toml
origin = "{facts['origin']}"
key_ids = [{ids}]
```

```sh
ledger verify release --policy policy.toml
```

Exit status 0: the attestations are signed by an accepted key, name exactly the files in
`model/`, and state the ledger's root; `{weights['file']}` is the only weights entry in `model/`
(no other weight file is there) and holds the sealed final weights; the ledger's chain, signatures
and seal hold. Exit 1 names the check that failed; exit 2 means it could not run (a missing key, or
one inside the folder). Without `--release-key` or `--policy` the verdict is at best
"self-consistent, signer not authenticated": anyone can make a bundle that says as much.{oms}
"""


__all__ = ["model_card"]
