"""Release bundles: `ledger publish` and `ledger verify DIR` on a real recorded run, checked with
independent implementations (securesystemslib DSSE, in-toto-attestation, the model_signing CLI)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXED_SEED
from recipes import TinyRecipe

import ledger
from ledger import Kind, Signer
from ledger._attest import LEDGER_PREDICATE, PAYLOAD_TYPE, SLSA_PREDICATE, open_envelope, pae, seal_envelope
from ledger._cli import cli
from ledger._crypto import load_release_key, load_release_signer
from ledger._fingerprint import safetensors_digests
from ledger._record import entry_hash, merkle_root
from ledger.hooks import train

SIGNER = Signer.from_seed(FIXED_SEED)
VENV_BIN = Path(sys.executable).parent


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def verify_json(bundle: Path, *extra: object) -> tuple[int, dict]:
    code, out, err = invoke("verify", bundle, "--json", *extra)
    assert code in (0, 1), err
    return code, json.loads(out)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real recorded run (TinyRecipe, 6 steps, checkpoints every 4), sealed, with a config.json
    beside the final weights and a P-256 release key."""
    out = tmp_path_factory.mktemp("run")
    train(TinyRecipe(), steps=6, path=out / "L", key=SIGNER, seed=3, checkpoint_every=4,
          final_weights=out / "final" / "model.safetensors", config={"purpose": "publish test"})
    (out / "final" / "config.json").write_text('{"model_type": "tiny"}')
    ledger.generate_keypair(out / "keys" / "release", key_type="p256")
    (out / "keys" / "trainer.pem").write_bytes(_trainer_pem())
    (out / "keys" / "trainer.pub").write_bytes(ledger._crypto.public_key_pem(SIGNER.public.raw))
    return out


def _trainer_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(FIXED_SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def bundle(run: Path) -> Path:
    code, out, err = invoke("publish", run / "L", "--model", run / "final" / "model.safetensors",
                            "--out", run / "bundle", "--release-key", run / "keys" / "release.pem")
    assert code == 0, err
    assert "published" in out
    return run / "bundle"


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def trusted(run: Path) -> list[object]:
    return ["--release-key", run / "keys" / "release.pub", "--key", run / "keys" / "trainer.pub"]


def envelopes(bundle: Path) -> list[dict]:
    return [json.loads(line) for line in (bundle / "attestations.intoto.jsonl").read_text().splitlines()]


def statement_of(envelope: dict) -> dict:
    return json.loads(base64.b64decode(envelope["payload"]))


def test_pae_known_answer_from_the_dsse_specification():
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected


def test_the_documented_dsse_vector_is_reproduced():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ledger._attest import statement
    from ledger._crypto import ReleaseSigner

    doc = (Path(__file__).resolve().parent.parent / "docs" / "PUBLISHING.md").read_text()
    block = doc.split("<!-- dsse-vector:begin -->")[1].split("<!-- dsse-vector:end -->")[0]
    documented = json.loads(block.strip().removeprefix("```json").removesuffix("```"))
    signer = ReleaseSigner(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    ours = seal_envelope(statement({"model/model.safetensors": "00" * 32}, LEDGER_PREDICATE, {"runId": "example"}),
                         [signer])
    assert ours == documented
    assert open_envelope(json.dumps(documented).encode(), {signer.public.key_id.hex(): signer.public}).verified


# ----------------------------------------------------------------------------- keys
def test_keygen_p256_writes_pkcs8_and_spki_and_never_overwrites(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    code, _, err = invoke("keygen", "--type", "p256", tmp_path / "k" / "rel")
    assert code == 0, err
    private, public = tmp_path / "k" / "rel.pem", tmp_path / "k" / "rel.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert load_release_key(public).algorithm == "p256"
    before = private.read_bytes()
    code, _, err = invoke("keygen", "--type", "p256", tmp_path / "k" / "rel")
    assert code == 2 and "already exists" in err and private.read_bytes() == before
    code, _, _ = invoke("keygen", tmp_path / "k" / "trainer")  # the default stays Ed25519
    assert code == 0 and ledger.load_signer(tmp_path / "k" / "trainer.pem").public.raw


# ----------------------------------------------------------------------------- the bundle
def test_layout_and_hugging_face_loading(run, bundle):
    from safetensors.torch import load_file

    assert sorted(p.name for p in bundle.iterdir()) == ["LEDGER.md", "attestations.intoto.jsonl", "ledger", "model",
                                                        "model.sig", "release.pub"]
    assert sorted(p.name for p in (bundle / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert {"parts", "key.pub", "wal.log"} <= {p.name for p in (bundle / "ledger").iterdir()}
    loaded = load_file(str(bundle / "model" / "model.safetensors"))  # what from_pretrained(subfolder="model") reads
    original = load_file(str(run / "final" / "model.safetensors"))
    assert loaded.keys() == original.keys() and all((loaded[k] == original[k]).all() for k in loaded)
    card = (bundle / "LEDGER.md").read_text()
    genesis = ledger.open(bundle / "ledger").genesis()
    assert genesis["run_id"] in card and genesis["key_id"].hex() in card
    assert load_release_key(run / "keys" / "release.pub").key_id.hex() in card
    assert "ledger verify release --key TRAINER.pub --release-key LAB_RELEASE.pub" in card
    assert "release/release.pub" not in card and "release/ledger/key.pub" not in card
    assert "manifest.json" not in {p.name for p in (bundle / "ledger").iterdir()}  # no verifier reads it
    assert not [p for p in run.iterdir() if p.name.startswith(".bundle.")]  # no temporary directory left


def test_dsse_envelopes_verify_with_securesystemslib(run, bundle):
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import CryptoSigner, SSlibKey

    release = load_release_key(run / "keys" / "release.pub")
    key = SSlibKey.from_crypto(serialization.load_pem_public_key((run / "keys" / "release.pub").read_bytes()),
                               keyid=release.key_id.hex())
    lines = envelopes(bundle)
    assert len(lines) == 2
    for raw in lines:
        envelope = Envelope.from_dict(json.loads(json.dumps(raw)))
        assert envelope.payload_type == PAYLOAD_TYPE and envelope.pae() == pae(PAYLOAD_TYPE, envelope.payload)
        assert list(envelope.verify([key], 1)) == [release.key_id.hex()]
        envelope.payload = envelope.payload.replace(b'"runId"', b'"runID"')
        with pytest.raises(VerificationError):
            envelope.verify([key], 1)
    # and the other way: securesystemslib signs, our reader verifies
    private = serialization.load_pem_private_key((run / "keys" / "release.pem").read_bytes(), None)
    theirs = Envelope(base64.b64decode(lines[0]["payload"]), PAYLOAD_TYPE, {})
    theirs.sign(CryptoSigner(private, key))
    opened = open_envelope(json.dumps(theirs.to_dict()).encode(), {release.key_id.hex(): release})
    assert opened.verified == (release.key_id.hex(),) and opened.bad == ()


def test_statements_follow_in_toto_and_slsa_and_state_the_ledger(run, bundle):
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    statements = {s["predicateType"]: s for s in map(statement_of, envelopes(bundle))}
    assert set(statements) == {LEDGER_PREDICATE, SLSA_PREDICATE}
    model_sha = hashlib.sha256((bundle / "model" / "model.safetensors").read_bytes()).hexdigest()
    for s in statements.values():
        Statement.copy_from_pb(json_format.ParseDict(s, statement_pb2.Statement())).validate()
        assert {x["name"]: x["digest"]["sha256"] for x in s["subject"]}["model/model.safetensors"] == model_sha
    json_format.ParseDict(statements[SLSA_PREDICATE]["predicate"], provenance_pb2.Provenance())  # no unknown field
    book = ledger.open(run / "L")
    entries = list(book.entries())
    genesis, seal = entries[0].body(), entries[-1].body()
    root = merkle_root([entry_hash(e.record) for e in entries]).hex()
    predicate = statements[LEDGER_PREDICATE]["predicate"]
    assert predicate["runId"] == genesis["run_id"] and predicate["origin"] == f"training-ledger/{genesis['run_id']}"
    assert predicate["ledger"]["treeSize"] == len(entries) and predicate["ledger"]["rootHash"] == root
    assert predicate["ledger"]["sealTreeRoot"] == seal["tree_root"].hex()
    assert predicate["keys"]["trainer"]["keyId"] == genesis["key_id"].hex()
    assert predicate["keys"]["release"]["keyId"] == load_release_key(run / "keys" / "release.pub").key_id.hex()
    final = safetensors_digests(bundle / "model" / "model.safetensors")
    assert predicate["weights"]["final"]["tensorDigests"] == {k: v.hex() for k, v in sorted(final.items())}
    assert predicate["weights"]["init"]["modelDigest"] == genesis["init"]["model_digest"].hex()
    assert predicate["recipe"]["sourceSha256"] == genesis["recipe"]["source_sha256"].hex()
    slsa = statements[SLSA_PREDICATE]["predicate"]
    assert slsa["buildDefinition"]["externalParameters"]["config"] == {"purpose": "publish test"}
    assert slsa["runDetails"]["byproducts"][0]["digest"] == {"rfc9162_sha256": root}
    # the steps that carry a batch digest (the budget may leave some out; the predicate counts them)
    batches = [e.body()["batch_digest"] for e in entries if e.kind is Kind.STEP and "batch_digest" in e.body()]
    deps = {d["name"]: d for d in slsa["buildDefinition"]["resolvedDependencies"]}
    assert deps["batch-digests"]["digest"] == {"rfc9162_sha256": merkle_root([entry_hash(b) for b in batches]).hex()}
    assert deps["recipe"]["digest"] == {"sha256": genesis["recipe"]["source_sha256"].hex()}


def test_model_signing_cli_accepts_the_release_and_rejects_a_changed_byte(run, copy):
    command = [str(VENV_BIN / "model_signing"), "verify", "key", "--signature", str(copy / "model.sig"),
               "--public_key", str(run / "keys" / "release.pub"), str(copy / "model")]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    bad = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0


# ----------------------------------------------------------------------------- verify DIR
def test_bundle_verifies_with_keys_and_says_self_consistent_without(run, bundle):
    code, report = verify_json(bundle, *trusted(run))
    assert code == 0 and report["verdict"] == "pass"
    for name in ("bundle", "attestations", "subjects", "release", "oms", "chain", "signatures", "seal", "model"):
        assert report["checks"][name]["status"] == "pass", (name, report["checks"][name])
    code, report = verify_json(bundle)
    assert code == 0
    assert report["checks"]["attestations"]["status"] == "warn"
    assert "self-consistent, signer not authenticated" in report["checks"]["attestations"]["detail"]


def _tamper_weight(bundle: Path) -> None:
    path = bundle / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _tamper_attestation(bundle: Path) -> None:
    lines = envelopes(bundle)
    payload = base64.b64decode(lines[0]["payload"]).replace(b'"treeSize":', b'"treeSize":1')
    lines[0]["payload"] = base64.b64encode(payload).decode()
    (bundle / "attestations.intoto.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def _tamper_part(bundle: Path) -> None:
    part = next((bundle / "ledger" / "parts").iterdir())
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))


def _tamper_signature(bundle: Path) -> None:
    sig = json.loads((bundle / "model.sig").read_text())
    raw = bytearray(base64.b64decode(sig["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[10] ^= 1
    sig["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    (bundle / "model.sig").write_text(json.dumps(sig))


@pytest.mark.parametrize(("tamper", "failed"), [
    (_tamper_weight, {"subjects", "oms", "model"}),
    (_tamper_attestation, {"attestations"}),
    (_tamper_part, {"chain"}),
    (_tamper_signature, {"oms"}),
], ids=["weight-byte", "attestation", "part", "model.sig"])
def test_tamper_matrix_fails_naming_the_check(run, copy, tamper, failed):
    tamper(copy)
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and report["verdict"] == "fail"
    statuses = {name: c["status"] for name, c in report["checks"].items()}
    assert failed <= {n for n, s in statuses.items() if s == "fail"}, statuses


def test_a_wrong_release_key_fails_the_attestations(run, bundle, tmp_path):
    ledger.generate_keypair(tmp_path / "other", key_type="p256")
    code, report = verify_json(bundle, "--release-key", tmp_path / "other.pub")
    assert code == 1
    assert report["checks"]["attestations"]["status"] == "fail" and report["checks"]["oms"]["status"] == "fail"


def test_policy_keys_ids_origin_and_minimum(run, bundle, tmp_path):
    genesis = ledger.open(bundle / "ledger").genesis()
    release_id = load_release_key(run / "keys" / "release.pub").key_id.hex()
    shutil.copy(run / "keys" / "trainer.pub", tmp_path / "trainer.pub")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'origin = "training-ledger/{genesis["run_id"]}"\nmin_signatures = 1\n'
                      f'keys = ["trainer.pub"]\nkey_ids = ["{release_id}"]\n')
    code, report = verify_json(bundle, "--policy", policy)
    assert code == 0 and all(report["checks"][n]["status"] == "pass"
                             for n in ("attestations", "oms", "release", "signatures"))
    policy.write_text(f'origin = "training-ledger/another-run"\nkey_ids = ["{release_id}"]\n')
    code, report = verify_json(bundle, "--policy", policy)
    assert code == 1 and "policy" in report["checks"]["release"]["detail"]
    policy.write_text(f'min_signatures = 2\nkeys = ["trainer.pub"]\nkey_ids = ["{release_id}"]\n')
    code, report = verify_json(bundle, "--policy", policy)
    assert code == 1 and "2 needed" in report["checks"]["attestations"]["detail"]
    policy.write_text(f'key_ids = ["{release_id}"]\ntrust_everything = true\n')
    code, _, err = invoke("verify", bundle, "--policy", policy)
    assert code == 2 and "unknown field" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- hostile bundles
def _resign(run: Path, bundle: Path, edit) -> None:
    signer = load_release_signer(run / "keys" / "release.pem")
    lines = []
    for envelope in envelopes(bundle):
        statement = statement_of(envelope)
        edit(statement)
        lines.append(seal_envelope(statement, [signer]))
    (bundle / "attestations.intoto.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_dot_dot_subject_is_compared_never_opened(run, copy, tmp_path):
    (copy.parent / "outside.safetensors").write_bytes(b"x")

    def edit(statement: dict) -> None:
        statement["subject"].append({"name": "model/../../outside.safetensors",
                                     "digest": {"sha256": hashlib.sha256(b"x").hexdigest()}})

    _resign(run, copy, edit)
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and report["checks"]["attestations"]["status"] == "pass"
    assert "not a file in model/" in report["checks"]["subjects"]["detail"]


def test_dot_dot_shard_in_an_index_is_refused(run, copy):
    (copy.parent / "evil.safetensors").write_bytes((copy / "model" / "model.safetensors").read_bytes())
    (copy / "model" / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: "../../evil.safetensors"
                                            for name in safetensors_digests(copy.parent / "evil.safetensors")}}
    (copy / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    code, report = verify_json(copy, *trusted(run))  # the index is read for its shards by the bundle check
    assert code == 1 and report["checks"]["bundle"]["status"] == "fail"
    assert "not a file name next to the index" in report["checks"]["bundle"]["detail"]
    assert report["checks"]["model"]["status"] == "skip"


@pytest.mark.parametrize("where", ["model/model.safetensors", "ledger", "model.sig"])
def test_symlinks_fail_the_layout_and_nothing_is_read(run, copy, where):
    target = copy / where
    moved = copy.parent / ("outside-" + target.name)
    target.rename(moved)
    os.symlink(moved, target)
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and report["checks"]["bundle"]["status"] == "fail"
    assert "symlink" in report["checks"]["bundle"]["detail"]
    assert all(c["status"] == "skip" for n, c in report["checks"].items() if n != "bundle")


def test_a_fifo_in_the_bundle_fails_without_blocking(run, copy):
    os.mkfifo(copy / "model" / "extra.bin")
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and "FIFO" in report["checks"]["bundle"]["detail"]


def test_verify_writes_nothing_in_the_bundle(run, copy):
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    verify_json(copy, *trusted(run))
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


# ----------------------------------------------------------------------------- publish refusals and options
def test_publish_refuses_an_existing_out_and_leaves_it_alone(run, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = invoke("publish", run / "L", "--model", run / "final" / "model.safetensors", "--out", out,
                          "--release-key", run / "keys" / "release.pem")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_publish_refuses_weights_that_are_not_the_sealed_ones(run, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "final" / "model.safetensors"))
    weights["0.bias"] = weights["0.bias"] + 1e-3
    save_file(weights, str(tmp_path / "edited.safetensors"))
    code, _, err = invoke("publish", run / "L", "--model", tmp_path / "edited.safetensors", "--out",
                          tmp_path / "out", "--release-key", run / "keys" / "release.pem")
    assert code == 1 and "not the sealed final weights" in err and "0.bias" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["edited.safetensors"]


def test_publish_refuses_an_unsealed_ledger_and_a_missing_key(run, tmp_path):
    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from ledger.hooks import Recorder

    with pytest.raises(RuntimeError, match="stop"), pytest.warns(RuntimeWarning, match="unsealed"):
        with Recorder(tmp_path / "U", model=model, optimizer=opt, key=SIGNER, seed=0) as rec:
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            rec.step(loss=1.0)
            raise RuntimeError("stop")  # the ledger is left unsealed
    code, _, err = invoke("publish", tmp_path / "U", "--model", run / "final" / "model.safetensors", "--out",
                          tmp_path / "out", "--release-key", run / "keys" / "release.pem")
    assert code == 2 and "not sealed" in err
    code, _, err = invoke("publish", run / "L", "--model", run / "final" / "model.safetensors", "--out",
                          tmp_path / "out2")
    assert code == 2 and "--release-key" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_ed25519_release_key_skips_model_sig_and_checkpoints_travel(run, tmp_path):
    out = tmp_path / "b"
    code, stdout, err = invoke("publish", run / "L", "--model", run / "final" / "model.safetensors", "--out", out,
                               "--release-key", run / "keys" / "trainer.pem", "--include-checkpoints")
    assert code == 0, err
    assert "model.sig not written" in stdout and not (out / "model.sig").exists()
    assert (out / "ledger" / "checkpoints").is_dir()
    code, report = verify_json(out, "--key", run / "keys" / "trainer.pub")
    assert code == 0
    statuses = {n: c["status"] for n, c in report["checks"].items()}
    assert statuses["attestations"] == "pass" and statuses["oms"] == "skip" and statuses["checkpoints"] == "pass"


# ----------------------------------------------------------------------------- heads, timestamps, shards
def test_heads_and_tsa_tokens_are_attested_and_checked(run, tmp_path):
    from ledger._note import open_note

    ledger_copy = tmp_path / "L"
    shutil.copytree(run / "L", ledger_copy)
    size = len(list(ledger.open(ledger_copy).entries()))
    token = b"\x30\x03\x02\x01\x00"  # stands for the DER token a TSA returned for heads/<size>.note
    (ledger_copy / "heads" / f"{size}.tsr").write_bytes(token)
    out = tmp_path / "b"
    code, _, err = invoke("publish", ledger_copy, "--model", run / "final" / "model.safetensors", "--out", out,
                          "--release-key", run / "keys" / "release.pem")
    assert code == 0, err
    statements = {s["predicateType"]: s for s in map(statement_of, envelopes(out))}
    predicate = statements[LEDGER_PREDICATE]["predicate"]
    final = (out / "ledger" / "heads" / f"{size}.note").read_bytes()
    head, signed = open_note(final, SIGNER.public.raw)
    assert signed and head.size == size and head.root.hex() == predicate["ledger"]["rootHash"]
    assert {h["size"] for h in predicate["heads"]} >= {size}
    assert predicate["timestamps"] == [{"size": size, "file": f"ledger/heads/{size}.tsr",
                                        "sha256": hashlib.sha256(token).hexdigest()}]
    code, report = verify_json(out, *trusted(run))
    assert code == 0 and report["checks"]["release"]["timestamps"] == 1
    (out / "ledger" / "heads" / f"{size}.tsr").write_bytes(token + b"\x00")
    code, report = verify_json(out, *trusted(run))
    assert code == 1 and "timestamps" in report["checks"]["release"]["detail"]


def test_a_sharded_index_is_published_and_verified(run, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "final" / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    (tmp_path / "w").mkdir()
    for file, members in shards.items():
        save_file({n: weights[n] for n in members}, str(tmp_path / "w" / file))
    index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
    (tmp_path / "w" / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "b"
    code, _, err = invoke("publish", run / "L", "--model", tmp_path / "w" / "model.safetensors.index.json",
                          "--out", out, "--release-key", run / "keys" / "release.pem")
    assert code == 0, err
    assert sorted(p.name for p in (out / "model").iterdir()) == [*sorted(shards), "model.safetensors.index.json"]
    code, report = verify_json(out, *trusted(run))
    assert code == 0 and report["checks"]["model"]["status"] == "pass" and report["checks"]["subjects"]["files"] == 3


def test_a_signed_predicate_naming_another_release_pem_fails_release(run, copy, tmp_path):
    _, other = ledger.generate_keypair(tmp_path / "other", key_type="p256")

    def edit(statement: dict) -> None:
        if statement["predicateType"] == LEDGER_PREDICATE:
            statement["predicate"]["keys"]["release"]["publicKeyPem"] = other.read_text()

    _resign(run, copy, edit)
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and report["checks"]["attestations"]["status"] == "pass"
    assert "publicKeyPem" in report["checks"]["release"]["detail"]


def test_ed25519_envelopes_verify_with_securesystemslib(run, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    out = tmp_path / "b"
    assert invoke("publish", run / "L", "--model", run / "final" / "model.safetensors", "--out", out,
                  "--release-key", run / "keys" / "trainer.pem")[0] == 0
    public = load_release_key(run / "keys" / "trainer.pub")
    assert public.key_id == SIGNER.public.key_id  # the ledger's key id is the release key id too
    key = SSlibKey.from_crypto(serialization.load_pem_public_key(public.pem()), keyid=public.key_id.hex())
    for raw in envelopes(out):
        assert list(Envelope.from_dict(raw).verify([key], 1)) == [public.key_id.hex()]


def test_an_encrypted_p256_release_key_signs_with_its_passphrase(run, tmp_path, monkeypatch):
    private, public = ledger.generate_keypair(tmp_path / "enc", b"correct horse", key_type="p256")
    args = ("publish", run / "L", "--model", run / "final" / "model.safetensors", "--release-key", private)
    monkeypatch.delenv("LEDGER_KEY_PASSPHRASE", raising=False)
    code, _, err = invoke(*args, "--out", tmp_path / "a")
    assert code == 2 and "encrypted" in err and not (tmp_path / "a").exists()
    monkeypatch.setenv("LEDGER_KEY_PASSPHRASE", "correct horse")
    code, _, err = invoke(*args, "--out", tmp_path / "b")
    assert code == 0, err
    code, report = verify_json(tmp_path / "b", "--release-key", public)
    assert code == 0 and report["checks"]["oms"]["status"] == "pass"


def test_a_transformers_model_loads_from_the_bundle_with_subfolder_model(run, tmp_path, monkeypatch):
    """The Hugging Face layout: from_pretrained(DIR, subfolder="model") reads the published weights
    (offline), and they are the sealed ones."""
    pytest.importorskip("transformers")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ledger.hooks import Recorder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=0)
    ids = torch.randint(0, 50, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    rec.step(loss=loss)
    model.save_pretrained(tmp_path / "final")
    rec.close(final_weights=tmp_path / "final" / "model.safetensors")
    out = tmp_path / "bundle"
    code, _, err = invoke("publish", tmp_path / "L", "--model", tmp_path / "final" / "model.safetensors", "--out", out,
                          "--release-key", run / "keys" / "release.pem")
    assert code == 0, err
    assert {"config.json", "generation_config.json"} <= {p.name for p in (out / "model").iterdir()}
    loaded = GPT2LMHeadModel.from_pretrained(out, subfolder="model", local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    assert verify_json(out, *trusted(run))[0] == 0


def test_verify_as_a_subprocess_writes_nothing_anywhere(run, copy, tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "ledger", "verify", str(copy), *map(str, trusted(run))],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


# ----------------------------------------------------------------------------- review findings (issue #13)
def _resign_files(run: Path, bundle: Path, edit=None) -> None:
    """Re-sign both attestations (with the lab's release key) so that they name every file now in
    model/ with its SHA-256: a forgery that only the layout rules can catch."""
    subjects = [{"name": f"model/{p.name}", "digest": {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}}
                for p in sorted((bundle / "model").iterdir())]

    def set_subjects(statement: dict) -> None:
        statement["subject"] = subjects
        if edit is not None:
            edit(statement)

    _resign(run, bundle, set_subjects)
    (bundle / "model.sig").unlink()
    from ledger import _oms

    _oms.sign(bundle / "model", bundle / "model.sig", run / "keys" / "release.pem")


def _add_index_beside(copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    sealed = load_file(str(copy / "model" / "model.safetensors"))
    names = sorted(sealed)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for file, members in shards.items():
        save_file({n: sealed[n] for n in members}, str(copy / "model" / file))
    (copy / "model" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}))
    save_file({k: v + 1.0 for k, v in sealed.items()}, str(copy / "model" / "model.safetensors"))  # a loader's pick


def _point_at_index(statement: dict) -> None:
    if statement["predicateType"] == LEDGER_PREDICATE:
        statement["predicate"]["weights"]["file"] = "model/model.safetensors.index.json"


@pytest.mark.parametrize("extra", ["index-beside-the-file", "pytorch_model.bin", "weights.gguf"])
def test_a_second_weights_entry_or_a_stray_weight_file_fails_the_bundle(run, copy, extra):
    """Finding 1: verify compared one entry while a loader would read another file."""
    if extra == "index-beside-the-file":
        _add_index_beside(copy)
        _resign_files(run, copy, _point_at_index)
    else:
        (copy / "model" / extra).write_bytes(b"not the sealed weights")
        _resign_files(run, copy)
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and report["checks"]["bundle"]["status"] == "fail", report["checks"]["bundle"]
    assert report["checks"]["model"]["status"] == "skip"
    assert ("both" if extra.startswith("index") else extra) in report["checks"]["bundle"]["detail"]


@pytest.mark.parametrize("shard", ["model.safetensors", "model.safetensors.index.json", "config.json"])
def test_publish_refuses_shard_names_that_collide_in_model(run, tmp_path, shard):
    """Findings 1 and 6: a shard named like the entry, the index or a config file (exit 3 before)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "final" / "model.safetensors"))
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
    save_file({n: weights[n] for n in names[3:]}, str(tmp_path / shard))
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: "a.safetensors" if i < 3 else shard
                                                                for i, n in enumerate(names)}}))
    code, _, err = invoke("publish", run / "L", "--model", index, "--out", tmp_path / "out",
                          "--release-key", run / "keys" / "release.pem")
    assert code == 2 and repr(shard) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _forged(tmp_path: Path) -> Path:
    """A forger's bundle: its own trainer key, its own P-256 release key, published as the docs say."""
    train(TinyRecipe(), steps=3, path=tmp_path / "L", key=Signer.from_seed(bytes(32)), seed=1,
          final_weights=tmp_path / "final" / "model.safetensors")
    ledger.generate_keypair(tmp_path / "forger", key_type="p256")
    code, _, err = invoke("publish", tmp_path / "L", "--model", tmp_path / "final" / "model.safetensors",
                          "--out", tmp_path / "release", "--release-key", tmp_path / "forger.pem")
    assert code == 0, err
    return tmp_path / "release"


def test_keys_or_a_policy_inside_the_bundle_are_refused_and_the_card_names_none(tmp_path):
    """Finding 2: the card's command trusted the keys shipped in the bundle (a forgery passed)."""
    release = _forged(tmp_path)
    card = (release / "LEDGER.md").read_text()
    assert "ledger verify release --key TRAINER.pub --release-key LAB_RELEASE.pub" in card
    assert "--public_key LAB_RELEASE.pub release/model" in card
    for args in (["--key", release / "ledger" / "key.pub", "--release-key", release / "release.pub"],
                 ["--release-key", release / "model" / ".." / "release.pub"]):
        code, out, err = invoke("verify", release, *args)
        assert code == 2 and "inside the bundle" in err and len(err.strip().splitlines()) == 1, (out, err)
    (release / "policy.toml").write_text('keys = ["release.pub"]\n')
    code, _, err = invoke("verify", release, "--policy", release / "policy.toml")
    assert code == 2 and "inside the bundle" in err
    (tmp_path / "policy.toml").write_text(f'keys = ["{release / "release.pub"}"]\n')
    code, _, err = invoke("verify", release, "--policy", tmp_path / "policy.toml")
    assert code == 2 and "inside the bundle" in err
    (release / "policy.toml").unlink()
    # the card's policy snippet (key ids), kept outside the folder: pins exactly the forger's ids
    snippet = card.split("```toml\n")[1].split("```")[0]
    (tmp_path / "policy.toml").write_text(snippet)
    code, report = verify_json(release, "--policy", tmp_path / "policy.toml")
    assert code == 0 and report["checks"]["attestations"]["status"] == "pass"
    assert report["checks"]["signatures"]["status"] == "pass"


def test_with_a_policy_the_trainer_key_does_not_count_toward_min_signatures(run, copy, tmp_path):
    """Finding 3: --key (the trainer's) was added to the policy's accepted keys."""
    ledger.generate_keypair(tmp_path / "second", key_type="p256")
    shutil.copy(run / "keys" / "release.pub", tmp_path / "release.pub")
    (tmp_path / "policy.toml").write_text('min_signatures = 2\nkeys = ["release.pub", "second.pub"]\n')
    signers = [load_release_signer(run / "keys" / "release.pem"), load_release_signer(run / "keys" / "trainer.pem")]
    lines = [json.dumps(seal_envelope(statement_of(e), signers)) for e in envelopes(copy)]
    (copy / "attestations.intoto.jsonl").write_text("\n".join(lines) + "\n")
    code, report = verify_json(copy, "--policy", tmp_path / "policy.toml", "--key", run / "keys" / "trainer.pub")
    assert code == 1 and "2 needed" in report["checks"]["attestations"]["detail"]
    assert report["checks"]["signatures"]["status"] == "pass"  # --key still authenticates the ledger
    code, _, err = invoke("verify", copy, "--policy", tmp_path / "policy.toml", "--release-key",
                          run / "keys" / "release.pub")
    assert code == 2 and "not both" in err


def test_a_bundle_never_reads_checkpoints_outside_it(run, tmp_path):
    """Finding 4: genesis checkpoint_dir (absolute, or ../) led verify out of DIR."""
    outside = tmp_path / "outside-ckpts"
    train(TinyRecipe(), steps=6, path=tmp_path / "L", key=SIGNER, seed=3, checkpoint_every=4,
          final_weights=tmp_path / "final" / "model.safetensors", checkpoint_dir=outside)
    assert any(outside.iterdir())
    out = tmp_path / "b"
    code, _, err = invoke("publish", tmp_path / "L", "--model", tmp_path / "final" / "model.safetensors",
                          "--out", out, "--release-key", run / "keys" / "release.pem")
    assert code == 0, err
    code, report = verify_json(out, *trusted(run))
    checkpoints = report["checks"]["checkpoints"]
    assert code == 0 and checkpoints["status"] == "warn" and checkpoints["matched"] == [], checkpoints
    assert len(checkpoints["missing"]) == 3
    # with --include-checkpoints they travel and are read from DIR/ledger/checkpoints
    code, _, err = invoke("publish", tmp_path / "L", "--model", tmp_path / "final" / "model.safetensors",
                          "--out", tmp_path / "c", "--release-key", run / "keys" / "release.pem",
                          "--include-checkpoints")
    assert code == 0, err
    shutil.rmtree(outside)
    code, report = verify_json(tmp_path / "c", *trusted(run))
    assert code == 0 and report["checks"]["checkpoints"]["status"] == "pass"


def test_include_checkpoints_copies_only_the_ledgers_own_and_verify_names_uncovered_files(run, tmp_path):
    """Finding 5: the whole checkpoint directory was copied (other runs, private files)."""
    shutil.copytree(run / "L", tmp_path / "L")
    root = tmp_path / "L" / "checkpoints"
    own = sorted(p.name for p in root.iterdir())
    (root / "other-run").mkdir()
    (root / "other-run" / "secret.txt").write_text("private")
    (root / ("ab" * 32)).mkdir()
    (root / ("ab" * 32) / "model.safetensors").write_bytes(b"x")
    (root / own[0] / "notes.txt").write_text("private")
    out = tmp_path / "b"
    code, _, err = invoke("publish", tmp_path / "L", "--model", run / "final" / "model.safetensors", "--out", out,
                          "--release-key", run / "keys" / "release.pem", "--include-checkpoints")
    assert code == 0, err
    copied = out / "ledger" / "checkpoints"
    assert sorted(p.name for p in copied.iterdir()) == own
    from ledger._state import FILES

    assert all(sorted(p.name for p in (copied / d).iterdir()) == sorted(FILES) for d in own)
    code, report = verify_json(out, *trusted(run))
    assert code == 0 and report["checks"]["bundle"]["status"] == "pass", report["checks"]["bundle"]
    (out / "ledger" / "notes.txt").write_text("unchecked")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    code, report = verify_json(out, *trusted(run))
    assert code == 0 and report["checks"]["bundle"]["status"] == "warn"
    assert report["checks"]["bundle"]["uncovered"] == ["ledger/notes.txt"]
    (out / "LEDGER.md").write_text((out / "LEDGER.md").read_text() + "\nAlso: trust us.\n")
    code, report = verify_json(out, *trusted(run))
    assert report["checks"]["bundle"]["uncovered"] == ["LEDGER.md", "ledger/notes.txt"]


def test_hostile_inputs_end_with_exit_1_or_2_never_3(run, copy, tmp_path):
    """Finding 6: deep directory names (ENAMETOOLONG) and a deeply nested TOML policy exited 3."""
    fd = os.open(copy / "model", os.O_RDONLY)
    for _ in range(30):
        os.mkdir("d" * 200, dir_fd=fd)
        child = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    code, out, err = invoke("verify", copy, *trusted(run))
    assert code == 1 and "bundle" in out and err.strip() == "", err
    (tmp_path / "p.toml").write_text("keys = " + "[" * 30000 + "]" * 30000 + "\n")
    code, _, err = invoke("verify", run / "bundle", "--policy", tmp_path / "p.toml")
    assert code == 2 and "nests too deeply" in err and len(err.strip().splitlines()) == 1


def test_the_attested_release_algorithm_is_that_of_its_key_and_model_sig_is_required(run, copy):
    """Finding 7: a predicate claiming "ed25519" for a P-256 key, model.sig deleted: oms skipped, exit 0."""
    def claim_ed25519(statement: dict) -> None:
        if statement["predicateType"] == LEDGER_PREDICATE:
            statement["predicate"]["keys"]["release"]["algorithm"] = "ed25519"

    _resign(run, copy, claim_ed25519)
    (copy / "model.sig").unlink()
    code, report = verify_json(copy, *trusted(run))
    assert code == 1
    assert "algorithm" in report["checks"]["release"]["detail"]
    assert report["checks"]["oms"]["status"] == "fail" and "P-256" in report["checks"]["oms"]["detail"]


def test_unnamed_files_fail_by_name_without_being_hashed(run, copy, monkeypatch):
    """Finding 8: a file no attestation names was hashed in full (twice) before failing by name."""
    from ledger.verify import _bundle_checks

    with open(copy / "model" / "notes.txt", "wb") as handle:
        handle.truncate(1 << 30)  # sparse
    hashed: list[str] = []
    real = _bundle_checks._sha256
    monkeypatch.setattr(_bundle_checks, "_sha256", lambda path: hashed.append(path.name) or real(path))
    code, report = verify_json(copy, *trusted(run))
    assert code == 1 and "model/notes.txt is not named" in report["checks"]["subjects"]["detail"]
    assert hashed == [] and report["checks"]["oms"]["status"] == "skip"
