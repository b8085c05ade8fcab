"""The contracts other code builds on: typed entry bodies, the check registry, statuses, the report
and its renderers, error classes and exit codes, moved names."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import ledger
import ledger.format
from ledger import ConfigurationError, FormatError, LedgerWriter, StorageError, VerificationError
from ledger._schema import CheckpointBody, Genesis, ResumeBody, SealBody, StepBody
from ledger.verify import (
    CHECKS,
    Check,
    CheckResult,
    Report,
    Requirement,
    Status,
    load_context,
    render_json,
    render_text,
    run_checks,
    verify_ledger,
)

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "data" / "stored-run"


def bodies(kind: str) -> list[dict]:
    return [e.body() for e in ledger.open(RUN / "ledger").entries() if e.kind.label == kind]


# ----------------------------------------------------------------------------- typed bodies
def _same(a: object, b: object) -> bool:
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))
    return a == b

def test_every_recorded_body_round_trips_through_its_schema():
    """The recorder wrote these bodies through the schema; reading them back and writing them again
    gives the same signed bytes (the schema is the one place a body field is defined)."""
    genesis = ledger.open(RUN / "ledger").genesis()
    typed = Genesis.from_body(genesis)
    assert typed.recorded and "scale" in typed.tensor_order and typed.fingerprints.sketch_k == 256
    reserved = {"format", "run_id", "created_ns", "public_key", "key_id", "payload_type"}
    assert ledger.format.encode_body(typed.to_body()) == ledger.format.encode_body(
        {k: v for k, v in genesis.items() if k not in reserved})
    for body in bodies("step"):  # arrays are read as float64 (what the checks compute in): same values
        again = StepBody.from_body(body, typed).to_body()
        assert set(again) == set(body) and all(_same(again[k], body[k]) for k in body)
    for body in bodies("checkpoint"):
        assert ledger.format.encode_body(CheckpointBody.from_body(body).to_body()) == \
            ledger.format.encode_body(body)
    seal = bodies("seal")[0]
    typed_seal = SealBody.from_body(seal)
    assert typed_seal.steps == 20 and typed_seal.final is not None and typed_seal.final.file == "model.safetensors"
    assert {**typed_seal.recorder_fields(), "entry_count": seal["entry_count"], "head": seal["head"],
            "tree_root": seal["tree_root"]} == seal


@pytest.mark.parametrize(("change", "field"), [
    ({"norms": "not an array"}, "'norms'"),
    ({"norms": [1.0, 2.0]}, "'norms' has 2 values, expected 7"),
    ({"lrs": []}, "'lrs' has 0 values, expected 1"),
    ({"sketch": [1.0]}, "'sketch' has 1 values, expected 256"),
    ({"metrics": {"loss": 10**400}}, "too large"),
    ({"hyper": [{"betas": "xy"}]}, "'betas'"),
    ({"tensor_digests": b"\x00" * 31}, "'tensor_digests'"),
    ({"metrics": [1, 2]}, "'metrics'"),
    ({"batch_digest": "abc"}, "'batch_digest'"),
])
def test_a_malformed_step_body_is_a_format_error_naming_the_field(change, field):
    body = {**bodies("step")[0], **change}
    genesis = Genesis.from_body(ledger.open(RUN / "ledger").genesis())
    with pytest.raises(FormatError, match=field):
        StepBody.from_body(body, genesis)


def test_malformed_genesis_checkpoint_and_resume_bodies_are_format_errors():
    genesis = ledger.open(RUN / "ledger").genesis()
    with pytest.raises(FormatError, match="sketch_k"):
        Genesis.from_body({**genesis, "fingerprints": {**genesis["fingerprints"], "sketch_k": 3}})
    with pytest.raises(FormatError, match="seed"):
        Genesis.from_body({**genesis, "seed": "zero"})
    with pytest.raises(FormatError, match="state_digest"):
        CheckpointBody.from_body({**bodies("checkpoint")[0], "state_digest": b"short"})
    with pytest.raises(FormatError, match="superseded"):
        ResumeBody.from_body({"checkpoint_seq": 1, "checkpoint_step": 1, "state_digest": bytes(32),
                              "superseded": {"first_seq": 5, "last_seq": 2}})


def test_a_genesis_that_breaks_the_schema_fails_provenance_with_the_reason(tmp_path, signer):
    """A signed genesis with fingerprints of the wrong shape is damaged evidence: the format checks
    still run and pass, the provenance checks that read it fail naming seq 0 and the field."""
    writer = LedgerWriter.create(tmp_path / "L", signer, genesis={"fingerprints": {"tensor_order": "x"}})
    writer.seal()
    report = verify_ledger(tmp_path / "L", key=signer.public)
    assert report.check("chain").status == "pass" and report.check("signatures").status == "pass"
    failed = report.check("continuity")
    assert failed.status is Status.FAIL and failed.detail.startswith("seq 0: genesis does not follow the schema")
    assert "tensor_order" in failed.detail and report.verdict == "fail"


# ----------------------------------------------------------------------------- checks, registry, report
def test_the_registry_is_ordered_and_every_check_has_one_contract():
    assert [c.name for c in CHECKS] == ["chain", "signatures", "seal", "heads", "model", "checkpoints", "init",
                                        "continuity", "replay", "independence", "mlflow", "timestamps"]
    assert all(isinstance(c, Check) and callable(c.run) for c in CHECKS)


def test_a_new_check_is_one_function_and_one_registry_entry():
    """What the MLflow, bundle and attestation checks will do: a check reads the context and the
    results before it; an unmet requirement skips it with its reason, not the check itself."""
    def run(ctx):
        chain = ctx.results["chain"]
        return CheckResult("extra", Status.PASS, f"after chain ({chain.status}), {ctx.loaded.records.__len__()} "
                           "entries")

    absent = Requirement(lambda ctx: False, "not asked for", "not asked")
    ctx = load_context(RUN / "ledger", key=RUN / "trainer.pub")
    results = run_checks(ctx, (*CHECKS[:1], Check("extra", run), Check("other", run, (absent,))))
    assert [r.name for r in results] == ["chain", "extra", "other"]
    assert results[1].detail == "after chain (pass), 25 entries"
    assert results[2].status is Status.SKIP and results[2].detail == "not asked for"


def test_status_is_an_enum_with_the_json_strings():
    assert [s.value for s in Status] == ["pass", "fail", "warn", "skip"]
    assert Status.PASS == "pass" and f"{Status.WARN:<6}|" == "warn  |" and str(Status.FAIL) == "fail"
    assert json.dumps({"s": Status.SKIP}) == '{"s": "skip"}'
    with pytest.raises(ConfigurationError, match="unknown check status"):
        CheckResult("x", "maybe", "")


def test_renderers_read_only_the_report(tmp_path):
    """The report carries the series its checks computed; rendering needs no ledger on disk."""
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(RUN, copy)
    report = verify_ledger(copy / "ledger", key=copy / "trainer.pub", model=copy / "model.safetensors")
    shutil.rmtree(copy)
    continuity = report.check("continuity")
    assert continuity.series["steps"] == list(range(20)) and len(continuity.series["ratio"]) == 20
    assert max(continuity.series["ratio"]) <= 1.0 and len(continuity.series["distance_from_init"]) == 20
    assert len(report.series["loss"][0]) == 20 and "lr" in report.series["lrs"]
    text = render_text(report)
    assert text.splitlines()[-1] == report.sentence() and "continuity   pass" in text
    plain = json.loads(render_json(report))
    assert "series" not in plain["checks"]["continuity"] and plain["verdict"] == "pass"
    full = json.loads(render_json(report, series=True))
    assert full["checks"]["continuity"]["series"]["steps"][-1] == 19 and full["series"]["loss"]
    from ledger.verify import render_html

    page = render_html(report)
    assert page.count("<img ") >= 4 and "No update plot" not in page and "No loss plot" not in page


def test_raise_if_failed_carries_the_report(make_ledger, signer):
    path = make_ledger(5)
    passed = verify_ledger(path, key=signer.public)
    assert passed.raise_if_failed() is passed
    failed = Report((CheckResult("chain", Status.FAIL, "broken"),), {"entries": 1})
    with pytest.raises(VerificationError) as caught:
        failed.raise_if_failed()
    assert caught.value.report is failed and caught.value.exit_code == 1


# ----------------------------------------------------------------------------- errors and moved names
def test_a_write_the_disk_refuses_is_a_storage_error_exit_2(tmp_path, signer):
    """ENOSPC from the OS (/dev/full) while appending: StorageError, which the CLI maps to 2."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    writer = LedgerWriter.create(tmp_path / "L", signer)
    full = os.open("/dev/full", os.O_WRONLY)
    good = writer._wal._fd
    writer._wal._fd = full
    try:
        with pytest.raises(StorageError, match="could not append entry 1") as caught:
            writer.append("step", 0, {"metrics": {"loss": 1.0}})
        assert caught.value.exit_code == 2
    finally:
        writer._wal._fd = good
        os.close(full)
        writer.close()


def test_encoding_a_bad_value_is_the_callers_mistake():
    with pytest.raises(ConfigurationError, match="cannot encode a set"):
        ledger.format.encode_body({"s": {1, 2}})
    with pytest.raises(FormatError):  # bytes that decode to a value we never write are damaged evidence
        ledger.format.decode_body(bytes.fromhex("a16161f7"))  # {"a": undefined}


@pytest.mark.parametrize("name", ["pae", "entry_hash", "merkle_root", "encode_body", "decode_body", "FORMAT_VERSION",
                                  "PAYLOAD_TYPE"])
def test_moved_names_keep_working_one_release_with_a_warning(name):
    with pytest.warns(DeprecationWarning, match=f"ledger.{name} moved to ledger.format.{name}"):
        old = getattr(ledger, name)
    assert old is getattr(ledger.format, name)
    assert name not in ledger.__all__


def test_the_everyday_surface_is_small():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {"open", "generate_keypair", "LedgerWriter", "Ledger", "load_public_key"} <= set(ledger.__all__)
    assert len(ledger.__all__) <= 24
    with pytest.raises(AttributeError):
        ledger.no_such_name  # noqa: B018


def test_base_install_without_torch_skips_with_the_install_line(tmp_path):
    """In-process stand-in for a missing extra (the slow base-install test runs the real thing):
    a child process where torch and scipy cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['scipy'] = None\n"
            "import importlib.util as u; u.find_spec = (lambda f: lambda n, *a: None if n in ('torch', 'scipy') "
            "else f(n, *a))(u.find_spec)\n"
            "from ledger.verify import verify_ledger\n"
            f"r = verify_ledger({str(RUN / 'ledger')!r}, key={str(RUN / 'trainer.pub')!r}, "
            f"recipe=None, against=[{str(RUN / 'model.safetensors')!r}])\n"
            "print(r.check('independence').detail); print(r.check('continuity').status)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    detail, status = out.stdout.strip().splitlines()
    assert "pip install 'training-ledger[lineage]'" in detail and status == "pass"


def test_the_cli_and_verify_import_no_optional_heavyweight():
    """Start-up is part of `ledger verify --model`'s time (docs/PERFORMANCE.md, release
    fingerprinting): importing the CLI and ledger.verify loads none of torch, pandas, scipy,
    matplotlib, mlflow or safetensors; each loads inside the check, renderer or DataFrame that needs it."""
    heavy = ("torch", "pandas", "scipy", "matplotlib", "mlflow", "safetensors")
    code = f"import sys, ledger._cli, ledger.verify; print(*[m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_dataclasses_are_frozen():
    for cls in (CheckResult, Report, StepBody, Genesis):
        assert dataclasses.fields(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def _set_versions(part: Path, version: int, rows: slice) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(part)
    records = table["record"].to_pylist()
    for i in range(len(records))[rows]:
        records[i] = version.to_bytes(2, "big") + records[i][2:]
    index = table.schema.get_field_index("record")
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(records, pa.binary())), part)


def test_a_damaged_version_field_is_a_broken_chain_not_a_newer_format(make_ledger):
    path = make_ledger(3)
    _set_versions(path / "parts" / "000000.parquet", 7, slice(0, 1))
    out = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and "chain        fail" in out.stdout


def test_sample_seed_reproduces_the_whole_draw(make_ledger, signer):
    path = make_ledger(200)
    first, second = (verify_ledger(path, key=signer.public, sample=5, sample_seed=11) for _ in range(2))
    assert first.to_dict() == second.to_dict()
    assert first.check("signatures").data["checked"] == second.check("signatures").data["checked"]


def test_a_newer_format_is_refused_with_one_line_exit_2(make_ledger, tmp_path):
    """An older verifier does not judge a ledger written in a format it does not know (FORMAT.md §9)."""
    path = make_ledger(3)
    _set_versions(path / "parts" / "000000.parquet", 2, slice(None))
    out = subprocess.run([sys.executable, "-m", "ledger", "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"ledger: error: {path} is in format version 2; this verifier (training-ledger {ledger.__version__}) knows "
        "version 1: upgrade training-ledger"]
