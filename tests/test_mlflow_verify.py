"""``ledger verify --mlflow-run``: a real ``mlflow server`` holding a run published from a real recorded
ledger (written here per the mirror's contract, docs/VERIFYING.md, so these tests do not depend on the
mirror), compared with the ledger; each edit made in MLflow is caught by the right check, naming what
differs, with exit 1; an unreachable server or a run without a ledger is exit 2 with one line."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow_server import RUNNING, free_port

import ledger
from ledger import Signer
from ledger._crypto import public_key_pem
from ledger.hooks import Recorder
from ledger.verify import _mlflow as mlflow_check
from ledger.verify import load_context, verify_mlflow_run

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

pytestmark = pytest.mark.slow
SIGNER = Signer.from_seed(bytes(range(32)))
CONFIG = {"lr": 0.05, "model": {"width": 4, "act": "relu"}, "note": "x" * 7000}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Path]:
    """A real recorded, closed ledger (12 steps; step 3 logs +inf, step 4 NaN) and its public key."""
    root = tmp_path_factory.mktemp("recorded")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(root / "L", model=model, optimizer=opt, key=SIGNER, seed=7, config=CONFIG) as rec:
        for step in range(12):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            extra = {"weird": float("inf") if step == 3 else float("nan") if step == 4 else step / 3}
            rec.step(loss=loss, batch=torch.zeros(1), **extra)
    pub = root / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    return root / "L", pub


PARAMS = {"lr": "0.05", "model.width": "4", "model.act": "relu", "note": "x" * 6000, "ledger.seed": "7"}


def publish(uri: str, path: Path, pub: Path, keep=lambda metric: True, params: dict | None = None,
            drop_last_part: bool = False) -> str:
    """Write an MLflow run from a ledger as the mirror does (log_batch of its metrics, params and tags;
    log_artifacts of the ledger directory under ledger/); return the run id."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = f"verify-{time.time_ns()}"
    experiment = client.create_experiment(name)
    run_id = client.create_run(experiment).info.run_id
    metrics = [Metric(key, float(value), entry.time_ns // 1_000_000, entry.step)
               for entry in ledger.open(path).entries() if entry.kind.label == "step"
               for key, value in entry.metrics().items()]
    metrics = [m for m in metrics if keep(m)]
    ctx = load_context(path)
    genesis = ctx.view.genesis
    # genesis config flattened with ".", str(v) truncated to 6000 characters, and the seed (the contract)
    params = PARAMS if params is None else params
    tags = {"ledger.run_id": genesis.run_id, "ledger.key_id": genesis.key_id.hex(),
            "ledger.format": str(genesis.format),
            "ledger.head": ctx.loaded.hashes[-1].hex(), "ledger.entries": str(len(ctx.loaded.hashes)),
            "ledger.mirrored_seq": str(len(ctx.loaded.hashes) - 1),
            "ledger.owned": json.dumps({"metrics": sorted({m.key for m in metrics}), "params": sorted(params),
                                        "tags": []})}
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    staging = path.parent / f"publish-{run_id}"
    shutil.copytree(path, staging)
    shutil.copy(pub, staging / "key.pub")
    if drop_last_part:  # a run still going: its last entries are not uploaded yet
        sorted((staging / "parts").glob("*.parquet"))[-1].unlink()
    client.log_artifacts(run_id, str(staging), "ledger")
    return run_id


def verify(uri: str, run_id: str, *extra: str) -> tuple[int, dict, str]:
    """The real CLI in a subprocess: exit code, the JSON report (or {}), stderr."""
    proc = subprocess.run([sys.executable, "-m", "ledger", "verify", "--mlflow-run", run_id, "--tracking-uri", uri,
                           "--json", *extra], capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.fixture
def published(mlflow_server, recorded) -> tuple[str, str, Path]:
    path, pub = recorded
    return mlflow_server, publish(mlflow_server, path, pub), pub


def test_verify_from_mlflow_passes_and_counts_values(published):
    uri, run_id, pub = published
    mlflow.MlflowClient(tracking_uri=uri).log_metric(run_id, "user_metric", 1.0, step=0)  # not the ledger's
    code, report, err = verify(uri, run_id, "--key", str(pub))
    assert code == 0, (report, err)
    check = report["checks"]["mlflow"]
    assert check["status"] == "pass" and report["checks"]["chain"]["status"] == "pass"
    # 48 metric values (loss, lr, grad_norm, weird × 12 steps; +inf stored as 1.797e308, NaN as NaN),
    # 5 params (lr, model.width, model.act, note truncated to 6000, ledger.seed), 6 tags
    assert check["compared"] == 48 + 5 + 6 and "59 values compared (48 metric points read)" in check["detail"]
    assert check["not_covered"]["metrics"] == ["user_metric"]
    assert report["ledger"]["mlflow_run"] == run_id


def _detail(report: dict) -> str:
    return report["checks"]["mlflow"]["detail"]


def test_metric_relogged_for_an_existing_step(published):
    uri, run_id, pub = published
    mlflow.MlflowClient(tracking_uri=uri).log_metric(run_id, "loss", 0.001, step=5)
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    assert code == 1 and report["checks"]["mlflow"]["status"] == "fail"
    assert report["checks"]["chain"]["status"] == "pass"
    assert "metric loss step 5: MLflow 0.001, ledger" in _detail(report)
    assert report["checks"]["mlflow"]["differs"] == [{"kind": "metric", "key": "loss", "step": 5, "mlflow": 0.001,
                                                      "ledger": report["checks"]["mlflow"]["differs"][0]["ledger"]}]


def test_owned_metric_at_a_step_the_ledger_lacks(published):
    uri, run_id, pub = published
    mlflow.MlflowClient(tracking_uri=uri).log_metric(run_id, "weird", 2.5, step=500)
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    assert code == 1 and "metric weird step 500: MLflow 2.5, ledger absent" in _detail(report)


def test_ledger_tag_overwritten(published):
    uri, run_id, pub = published
    mlflow.MlflowClient(tracking_uri=uri).set_tag(run_id, "ledger.run_id", "someone-else")
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    assert code == 1 and "tag ledger.run_id: MLflow 'someone-else', ledger '" in _detail(report)


def test_param_edited_in_the_tracking_database(published):
    uri, run_id, pub = published
    with sqlite3.connect(RUNNING[uri].db_path) as db:
        changed = db.execute("UPDATE params SET value = '0.5' WHERE run_uuid = ? AND key = 'lr'", (run_id,)).rowcount
    assert changed == 1
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    assert code == 1 and "param lr: MLflow '0.5', ledger '0.05'" in _detail(report)


def test_artifact_part_replaced(published, tmp_path):
    uri, run_id, pub = published
    client = mlflow.MlflowClient(tracking_uri=uri)
    local = Path(client.download_artifacts(run_id, "ledger/parts", dst_path=str(tmp_path)))
    part = sorted(local.glob("*.parquet"))[0]
    table = pq.read_table(part)
    records = table["record"].to_pylist()
    data = bytearray(records[3])
    data[-1] ^= 1
    records[3] = bytes(data)
    index = table.schema.get_field_index("record")
    table = table.set_column(index, table.schema.field("record"), pa.array(records, table.schema.field("record").type))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(part).metadata), part, compression="zstd")
    client.log_artifact(run_id, str(part), "ledger/parts")
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    assert code == 1 and report["checks"]["chain"]["status"] == "fail"
    assert report["checks"]["chain"]["first_bad_seq"] == 3


def test_unreachable_server_is_exit_2_with_one_line(tmp_path):
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    started = time.monotonic()
    code, report, err = verify(f"http://127.0.0.1:{free_port()}", "0" * 32, "--key", str(pub))
    assert code == 2 and report == {}
    assert len(err.strip().splitlines()) == 1 and err.startswith("ledger: error: cannot read MLflow run")
    assert time.monotonic() - started < 60


def test_run_without_ledger_artifacts_is_exit_2(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = client.create_run(client.create_experiment(f"empty-{time.time_ns()}")).info.run_id
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    code, _, err = verify(mlflow_server, run_id, "--key", str(pub))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no ledger artifacts" in err


def test_without_key_or_with_a_missing_local_store_is_exit_2_and_writes_nothing(published, tmp_path):
    """The run's own key.pub is not evidence: --key is required; a sqlite URI naming no database is
    refused before MLflow would create one."""
    uri, run_id, pub = published
    code, _, err = verify(uri, run_id)
    assert code == 2 and "--mlflow-run needs --key" in err
    store = tmp_path / "none.db"
    code, _, err = verify(f"sqlite:///{store}", run_id, "--key", str(pub))
    assert code == 2 and "does not exist" in err and not store.exists()


def test_a_ledger_value_absent_from_mlflow_fails(mlflow_server, recorded):
    path, pub = recorded
    run_id = publish(mlflow_server, path, pub, keep=lambda m: not (m.key == "lr" and m.step == 2))
    report = verify_mlflow_run(run_id, mlflow_server, key=pub)
    check = report.check("mlflow")
    assert report.verdict == "fail" and check.status == "fail"
    assert "metric lr step 2: absent from MLflow, ledger " in check.detail and check.data["missing_count"] == 1


def test_metric_history_reading_is_paged_and_capped(mlflow_server, recorded, monkeypatch):
    path, pub = recorded
    run_id = publish(mlflow_server, path, pub)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    client.log_batch(run_id, metrics=[Metric("loss", 0.5, 0, 1000 + i) for i in range(200)])
    monkeypatch.setattr(mlflow_check, "PAGE", 16)
    monkeypatch.setattr(mlflow_check, "EXTRA_PER_KEY", 50)
    check = verify_mlflow_run(run_id, mlflow_server, key=pub).check("mlflow")
    assert check.status == "fail" and "stopped reading metric 'loss' after 64 values" in check.data["capped"]
    assert "at most 62 are read for it" in check.data["capped"]


def test_history_paging_that_cannot_end_stops():
    """A hostile server: empty pages that ask for more, a token seen before, endless pages."""

    class Page(list):
        token = "again"

    class Store:
        def __init__(self, points):
            self.points, self.calls = points, 0

        def get_metric_history(self, **_):
            self.calls += 1
            return Page(self.points)

    for points in ([], [Metric("loss", 1.0, 0, 0)]):
        store = Store(points)
        with pytest.raises(mlflow_check._Hostile):
            list(mlflow_check._history_pages(store, "r", "loss", 1000))
        assert store.calls <= 2


def test_values_mlflow_shows_edited_in_the_database(published):
    """The latest value MLflow shows (its latest_metrics table: run list, compare, search) and a
    metric's timestamp are compared too."""
    uri, run_id, pub = published
    with sqlite3.connect(RUNNING[uri].db_path) as db:
        assert db.execute("UPDATE latest_metrics SET value = 0.0001 WHERE run_uuid = ? AND key = 'loss'",
                          (run_id,)).rowcount == 1
        assert db.execute("UPDATE metrics SET timestamp = timestamp + 31536000000 WHERE run_uuid = ? AND key = 'lr' "
                          "AND step = 3", (run_id,)).rowcount == 1
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    detail = _detail(report)
    assert code == 1 and "metric (latest shown) loss step 11: MLflow 0.0001" in detail, detail
    assert "metric (time) lr step 3:" in detail


def test_the_ledger_value_logged_again_by_the_user_only_warns(published, recorded):
    uri, run_id, pub = published
    step3 = next(e for e in ledger.open(recorded[0]).entries() if e.kind.label == "step" and e.step == 3)
    mlflow.MlflowClient(tracking_uri=uri).log_metric(run_id, "loss", step3.metrics()["loss"], step=3)
    code, report, _ = verify(uri, run_id, "--key", str(pub))
    check = report["checks"]["mlflow"]
    assert code == 0 and check["status"] == "warn" and check["duplicates"] == 1, check["detail"]


def test_values_a_resume_superseded_are_reported_not_failed(mlflow_server, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(rec, steps, crash_at=None):
        for step in steps:
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=float(step) + 0.25, batch=torch.zeros(1))
            if step == crash_at:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError), pytest.warns(RuntimeWarning, match="unsealed"):
        with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=7, checkpoint_every=3) as rec:
            train(rec, range(8), crash_at=7)
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=SIGNER)
    first = rec.current_step
    train(rec, range(first, 10))
    rec.close()
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    run_id = publish(mlflow_server, tmp_path / "L", pub)
    report = verify_mlflow_run(run_id, mlflow_server, key=pub)
    check = report.check("mlflow")
    assert report.verdict == "pass", {c.name: c.detail for c in report.checks if c.status == "fail"}
    assert first < 8  # steps first … 7 were recorded twice: MLflow holds both values
    assert check.data["superseded"] >= 8 - first and "superseded by a resume" in check.detail


def test_a_gap_is_excused_only_by_the_seal_mirror_field():
    assert mlflow_check.recorded_gap(None) is None
    assert mlflow_check.recorded_gap({"mlflow_run_id": "r", "mirrored_through_seq": 9, "missing": False}) is None
    assert mlflow_check.recorded_gap({"mlflow_run_id": "r", "mirrored_through_seq": 9, "missing": True}) == 9
    assert mlflow_check.as_stored(float("-inf")) == -sys.float_info.max


def test_a_run_mirrored_by_the_recorder_verifies_from_mlflow(mlflow_server, tmp_path):
    """The mirror and the verifier agree on the contract: a run recorded with mlflow= passes."""
    from ledger.hooks.mlflow import MlflowSink

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = MlflowSink(tracking_uri=mlflow_server, experiment=f"mirrored-{time.time_ns()}", interval=0.2)
    with Recorder(tmp_path / "L", model=model, optimizer=opt, key=SIGNER, seed=3, config=CONFIG, mlflow=sink) as rec:
        for step in range(10):
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=float("inf") if step == 4 else 1.0 / (step + 1), batch=torch.zeros(1))
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    code, report, err = verify(mlflow_server, sink.run_id, "--key", str(pub))
    assert code == 0, (err, {k: c["detail"] for k, c in report.get("checks", {}).items() if c["status"] != "pass"})
    check = report["checks"]["mlflow"]
    assert check["status"] == "pass" and check["metric_points"] >= 10 and check["differs_count"] == 0


def test_a_run_still_going_warns_for_values_past_its_published_parts(mlflow_server, tmp_path):
    from conftest import write_ledger

    path = write_ledger(tmp_path / "L", SIGNER, 37, seal=False, rollover=8)  # part 4 holds seq 32-37
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    run_id = publish(mlflow_server, path, pub, params={"lr": "0.001", "ledger.seed": "None"}, drop_last_part=True)
    report = verify_mlflow_run(run_id, mlflow_server, key=pub, live=True)
    check = report.check("mlflow")
    assert report.verdict == "pass" and check.status == "warn", check.detail
    assert "after the published ledger's last step" in check.detail and not check.data["sealed"]
    # without --live the same run fails: a published ledger cut short hides what MLflow holds after the cut
    check = verify_mlflow_run(run_id, mlflow_server, key=pub).check("mlflow")
    assert check.status == "fail" and "is not sealed" in check.detail


def test_two_step_entries_at_one_step_mirrored_by_sync_pass(tmp_path, monkeypatch):
    """Train and eval metrics in two entries at one step (the public LedgerWriter allows it): the
    check keeps each key's own time, so our own mirror's output passes (second-pass review)."""
    from ledger import LedgerWriter

    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to ./mlruns of the creating process

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("two")).info.run_id
    clock = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 250_000_000))  # 250 ms apart
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, genesis={"config": {"lr": 0.1}}, run_id="two-entries",
                                 clock=lambda: next(clock))
    for step in range(3):
        writer.append("step", step, {"metrics": {"loss": 1.0 / (step + 1)}})
        writer.append("step", step, {"metrics": {"eval_loss": 2.0 / (step + 1)}})
    writer.seal()
    synced = subprocess.run([sys.executable, "-m", "ledger", "mlflow", "sync", str(tmp_path / "L"), "--run-id",
                             run_id, "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr
    code, report, err = verify(uri, run_id, "--key", str(pub))
    assert code == 0 and report["checks"]["mlflow"]["status"] == "pass", (err, _detail(report))
