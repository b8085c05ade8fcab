"""The MLflow mirror against a real ``mlflow server`` (the session fixture ``mlflow_server``): a recorded
run's metrics, params, tags and artifacts land in the run, the downloaded ``ledger/`` verifies; a
server outage leaves training and the ledger unaffected, the seal records the gap and ``ledger mlflow
sync`` fills it, nothing twice; ``Recorder.resume`` goes on in the same run."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")

import ledger  # noqa: E402
from ledger._mirror import accepts_name, params_of  # noqa: E402
from ledger._schema import SealBody  # noqa: E402
from ledger.errors import ConfigurationError, FormatError  # noqa: E402
from ledger.hooks import Recorder  # noqa: E402
from ledger.hooks.mlflow import MlflowSink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _recipe() -> Any:
    data, _ = ledger.load_recipe(f"{ROOT / 'examples' / 'charlm.py'}:recipe")
    return data


def _train(rec: Recorder, model: Any, optimizer: Any, data: Any, steps: range, pause: float = 0.0) -> None:
    from torch.nn import functional as F

    for step in steps:
        x, y = data.batch(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss=loss, batch=(x, y), lr=3e-3)
        if pause:
            time.sleep(pause)


def _setup(tmp: Path, seed: int = 1) -> tuple[Path, Path, Any, Any, Any]:
    private, public = ledger.generate_keypair(tmp / "trainer")
    data = _recipe()
    model = data.build_model(seed)
    return private, public, data, model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _step_metrics(path: Path) -> dict[tuple[str, int], tuple[float, int]]:
    """(name, step) -> (value, ms) of every step entry of the ledger."""
    out = {}
    for entry in ledger.open(path).entries():
        if entry.kind.label == "step":
            for name, value in entry.body().get("metrics", {}).items():
                out[(name, entry.step)] = (float(value), entry.time_ns // 1_000_000)
    return out


def _check_run(uri: str, run_id: str, path: Path, tmp: Path, public: Path) -> None:
    """Every step's metrics once at its step and time; params; tags; the downloaded ledger verifies."""
    client = _client(uri)
    ledger_metrics = _step_metrics(path)
    for name in {n for n, _ in ledger_metrics if accepts_name(n)}:
        history = client.get_metric_history(run_id, name)
        seen = [(m.step, m.value, m.timestamp) for m in history]
        assert len(seen) == len({s for s, _, _ in seen}), f"{name}: a step logged twice"
        expected = sorted((s, v, t) for (n, s), (v, t) in ledger_metrics.items() if n == name)
        assert len(seen) == len(expected)
        for (s, v, t), (es, ev, et) in zip(sorted(seen), expected, strict=True):
            assert (s, t) == (es, et) and math.isclose(v, ev, rel_tol=1e-12)
    run = client.get_run(run_id)
    opened = ledger.open(path)
    genesis = opened.genesis()
    last = opened.last_entry()
    tags = run.data.tags
    assert tags["ledger.run_id"] == genesis["run_id"]
    assert tags["ledger.key_id"] == bytes(genesis["key_id"]).hex()
    assert tags["ledger.mirrored_seq"] == str(last.seq)
    assert tags["ledger.entries"] == str(last.seq + 1)
    assert tags["ledger.head"] == last.hash.hex()
    assert run.data.params["ledger.seed"] == str(genesis["seed"])
    assert run.data.params["opt.name"] == "adamw" and run.data.params["mlflow.run_id"] == run_id
    download = Path(client.download_artifacts(run_id, "ledger", str(tmp)))
    for folder in ("parts", "heads"):  # every part, every signed tree head
        assert sorted(p.name for p in (download / folder).iterdir()) == sorted(
            p.name for p in (path / folder).iterdir())
    assert any((download / "heads").iterdir())
    done = _cli("verify", str(download), "--key", str(public))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (download / "key.pub").read_bytes() == public.read_bytes()


@pytest.mark.slow
def test_recorded_run_is_mirrored_and_its_download_verifies(mlflow_server: str, tmp_path: Path) -> None:
    private, public, data, model, optimizer = _setup(tmp_path)
    sink = MlflowSink(tracking_uri=mlflow_server, experiment="mirror-test", run_name="mirrored", interval=0.2)
    rec = Recorder(tmp_path / "ledger", model=model, optimizer=optimizer, key=private, seed=1, checkpoint_every=10,
                   config={"lr": 3e-3, "opt": {"name": "adamw", "betas": [0.9, 0.99]}}, mlflow=sink)
    run_id = rec._genesis.config["mlflow"]["run_id"]
    assert run_id == sink.run_id
    times = []
    from torch.nn import functional as F

    for step in range(30):
        x, y = data.batch(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        t0 = time.perf_counter()
        rec.step(loss=loss, batch=(x, y), lr=3e-3, **{"acc#top1": 0.5})  # a name MLflow refuses
        times.append(time.perf_counter() - t0)
    rec.close()
    seal = ledger.open(tmp_path / "ledger").last_entry().body()
    assert seal["mirror"] == {"mlflow_run_id": run_id, "mirrored_through_seq": seal["entry_count"] - 1,
                              "missing": False}
    assert sorted(times)[len(times) // 2] < 0.025  # rec.step never waits for MLflow (median, 2 shared cores)
    _check_run(mlflow_server, run_id, tmp_path / "ledger", tmp_path / "download", public)
    run = _client(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and "acc#top1" not in run.data.metrics
    assert json.loads(run.data.tags["ledger.owned"])["refused"] == ["acc#top1"]
    checked = _cli("verify", "--mlflow-run", run_id, "--tracking-uri", mlflow_server, "--key", str(public), "--json")
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr
    mlflow_check = json.loads(checked.stdout)["checks"]["mlflow"]
    assert mlflow_check["status"] == "pass" and mlflow_check["refused_names"] == ["acc#top1"], mlflow_check
    assert json.loads(checked.stdout)["checks"]["heads"]["status"] == "pass"  # the heads came with the ledger


@pytest.mark.slow
def test_server_killed_mid_run_gap_in_the_seal_sync_fills_it_once(tmp_path: Path) -> None:
    """A server of its own, SIGKILLed mid-run and restarted on the same port and database."""
    from mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path / "server")
    try:
        private, public, data, model, optimizer = _setup(tmp_path)
        sink = MlflowSink(tracking_uri=server.tracking_uri, experiment="mirror-test", interval=0.1, close_timeout=2.0)
        rec = Recorder(tmp_path / "ledger", model=model, optimizer=optimizer, key=private, seed=1,
                       checkpoint_every=10, config={"opt": {"name": "adamw"}}, mlflow=sink)
        run_id = str(sink.run_id)
        _train(rec, model, optimizer, data, range(10))
        rec.flush()
        deadline = time.monotonic() + 20
        while (rec._mirror.cursor or -1) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()
        started = time.perf_counter()
        _train(rec, model, optimizer, data, range(10, 30))
        assert time.perf_counter() - started < 20  # training went on at its pace
        with pytest.warns(RuntimeWarning, match="mlflow sync"):
            rec.close()
        seal = ledger.open(tmp_path / "ledger").last_entry().body()
        assert seal["mirror"]["missing"] is True and seal["mirror"]["mlflow_run_id"] == run_id
        assert 10 <= seal["mirror"]["mirrored_through_seq"] < seal["entry_count"] - 1
        done = _cli("verify", str(tmp_path / "ledger"), "--key", str(public), "--report", str(tmp_path / "r.html"))
        assert done.returncode == 0, done.stdout + done.stderr

        refused = _cli("mlflow", "sync", str(tmp_path / "ledger"))  # the server still down: exit 2, one line
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        server = start_mlflow_server(tmp_path / "server", port=server.port)
        client = _client(server.tracking_uri)
        assert len(client.get_metric_history(run_id, "loss")) < 30  # the gap, as the restarted server has it
        first = _cli("mlflow", "sync", str(tmp_path / "ledger"))
        assert first.returncode == 0, first.stderr
        second = _cli("mlflow", "sync", str(tmp_path / "ledger"), "--tracking-uri", server.tracking_uri,
                      "--run-id", run_id, "--report", str(tmp_path / "r.html"))
        assert second.returncode == 0 and second.stdout.startswith("mirrored 0 metric values and 0 parts"), \
            second.stdout
        uploaded = client.download_artifacts(run_id, "ledger/report.html", str(tmp_path / "report"))
        assert Path(uploaded).read_bytes() == (tmp_path / "r.html").read_bytes()
        _check_run(server.tracking_uri, run_id, tmp_path / "ledger", tmp_path / "download", public)
        checked = _cli("verify", "--mlflow-run", run_id, "--tracking-uri", server.tracking_uri, "--key", str(public),
                       "--json")
        assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr
        mlflow_check = json.loads(checked.stdout)["checks"]["mlflow"]
        assert mlflow_check["status"] == "pass" and "since filled" in mlflow_check["detail"], mlflow_check
    finally:
        server.stop()


def _mirrored(tmp: Path, uri: str) -> tuple[Path, Any, Any, Any, MlflowSink, Recorder]:
    """A recorder mirroring into a new run of the server at ``uri`` (a pass every 0.1 s)."""
    private, _, data, model, optimizer = _setup(tmp)
    sink = MlflowSink(tracking_uri=uri, experiment="mirror-test", interval=0.1)
    rec = Recorder(tmp / "ledger", model=model, optimizer=optimizer, key=private, seed=1, checkpoint_every=5,
                   config={"opt": {"name": "adamw"}}, mlflow=sink)
    return private, data, model, optimizer, sink, rec


@pytest.mark.slow
def test_resume_continues_the_same_run(mlflow_server: str, tmp_path: Path) -> None:
    private, data, model, optimizer, sink, rec = _mirrored(tmp_path, mlflow_server)
    _train(rec, model, optimizer, data, range(12))
    rec.flush()
    time.sleep(0.5)
    rec.abort()  # as a crash leaves it: unsealed, steps 10 and 11 after the last checkpoint
    model = data.build_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    resumed = Recorder.resume(tmp_path / "ledger", model=model, optimizer=optimizer, key=private)
    assert resumed._mirror is not None and resumed._mirror.run_id == sink.run_id
    _train(resumed, model, optimizer, data, range(resumed.current_step, 20))
    resumed.close()
    client = _client(mlflow_server)
    run = client.get_run(str(sink.run_id))
    last = ledger.open(tmp_path / "ledger").last_entry()
    assert run.data.tags["ledger.mirrored_seq"] == str(last.seq)
    steps = sorted(m.step for m in client.get_metric_history(str(sink.run_id), "loss"))
    assert steps == sorted([*range(20), 10, 11])  # superseded steps 10, 11 hold two values: expected
    assert last.body()["mirror"]["missing"] is False


_CHILD = """
import sys, time, torch
from pathlib import Path
from torch.nn import functional as F
import ledger
from ledger.hooks import Recorder
from ledger.hooks.mlflow import MlflowSink
root, uri = Path(sys.argv[1]), sys.argv[2]
data, _ = ledger.load_recipe(sys.argv[3])
model = data.build_model(1)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
rec = Recorder(root / "ledger", model=model, optimizer=optimizer, key=root / "trainer.pem", seed=1,
               checkpoint_every=5, mlflow=MlflowSink(tracking_uri=uri, interval=0.1))
for step in range(12):
    x, y = data.batch(step)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()
    rec.step(loss=1.0, batch=(x, y))
rec.flush()
print(rec._genesis.config["mlflow"]["run_id"], flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_resume_after_kill_9_continues_the_same_run(mlflow_server: str, tmp_path: Path) -> None:
    private, _, data, _, _ = _setup(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mlflow_server,
                              f"{ROOT / 'examples' / 'charlm.py'}:recipe"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        client = _client(mlflow_server)
        deadline = time.monotonic() + 30
        while int(client.get_run(run_id).data.tags.get("ledger.mirrored_seq", -1)) < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    model = data.build_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    resumed = Recorder.resume(tmp_path / "ledger", model=model, optimizer=optimizer, key=private)
    assert resumed._mirror.run_id == run_id
    _train(resumed, model, optimizer, data, range(resumed.current_step, 16))
    resumed.close()
    last = ledger.open(tmp_path / "ledger").last_entry()
    assert last.body()["mirror"] == {"mlflow_run_id": run_id, "mirrored_through_seq": last.seq - 1, "missing": False}
    assert client.get_run(run_id).data.tags["ledger.mirrored_seq"] == str(last.seq)
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(16))


@pytest.mark.slow
def test_mlflow_true_attaches_to_the_active_run(mlflow_server: str, tmp_path: Path) -> None:
    import mlflow

    private, _, data, model, optimizer = _setup(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        with mlflow.start_run() as run:
            rec = Recorder(tmp_path / "ledger", model=model, optimizer=optimizer, key=private, seed=1, mlflow=True)
            assert rec._genesis.config["mlflow"] == {"tracking_uri": mlflow_server,
                                                     "experiment_id": run.info.experiment_id,
                                                     "run_id": run.info.run_id}
            _train(rec, model, optimizer, data, range(5))
            rec.close()
            assert _client(mlflow_server).get_run(run.info.run_id).info.status == "RUNNING"  # the user's run
    finally:
        mlflow.set_tracking_uri(None)
    assert len(_client(mlflow_server).get_metric_history(run.info.run_id, "loss")) == 5


def test_unreachable_server_at_construction_writes_nothing(tmp_path: Path) -> None:
    private, _, _, model, optimizer = _setup(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigurationError, match="could not create an MLflow run"):
        Recorder(tmp_path / "ledger", model=model, optimizer=optimizer, key=private, seed=1,
                 mlflow=MlflowSink(tracking_uri=f"http://127.0.0.1:{port}"))
    assert not (tmp_path / "ledger").exists()


def test_config_flattens_to_params_and_the_seal_field_is_typed() -> None:
    config = {"lr": 0.1, "opt": {"name": "adamw", "betas": [0.9, 0.99], "x": {}}, "long": "a" * 7000, "a#b": 1,
              "../up": 2, "": 3}
    assert params_of(config, 7) == {"lr": "0.1", "opt.name": "adamw", "opt.betas": "[0.9, 0.99]", "opt.x": "{}",
                                    "long": "a" * 6000, "ledger.seed": "7"}
    # MLflow's own rule (mlflow.utils.validation), so a name it refuses is never sent in a batch
    from mlflow.utils.validation import _validate_metric_name

    for name in ("loss", "train/loss", "lr group 0", "a:b", "é", "a#b", "../x", "/x", "a//b", "", ".", "x" * 251):
        try:
            _validate_metric_name(name)
            mlflow_ok = len(name) <= 250
        except Exception:
            mlflow_ok = False
        assert accepts_name(name) == mlflow_ok, name
    base = {"entry_count": 3, "head": b"\0" * 32, "tree_root": b"\0" * 32}
    mirror = {"mlflow_run_id": "abc", "mirrored_through_seq": -1, "missing": True}
    assert SealBody.from_body({**base, "mirror": mirror}).recorder_fields() == {"mirror": mirror}
    for bad in ({**mirror, "missing": 1}, {**mirror, "mirrored_through_seq": -2}, {"missing": False}):
        with pytest.raises(FormatError):
            SealBody.from_body({**base, "mirror": bad})


def _ledger_for_sync(tmp: Path) -> tuple[Path, Path]:
    from conftest import write_ledger

    from ledger import Signer
    from ledger._crypto import public_key_pem

    signer = Signer.from_seed(bytes(range(32)))
    path = write_ledger(tmp / "L", signer, 20)  # genesis config {"lr": 1e-3}: param lr "0.001"
    public = tmp / "trainer.pub"
    public.write_bytes(public_key_pem(signer.public.raw))
    return path, public


def _new_run(uri: str) -> str:
    client = _client(uri)
    return str(client.create_run(client.create_experiment(f"sync-{time.time_ns()}")).info.run_id)


@pytest.mark.slow
def test_sync_sets_up_a_run_whose_set_up_never_happened(mlflow_server: str, tmp_path: Path) -> None:
    """A mirror whose cursor moved before its set-up failed (params, key, static tags never written):
    the set-up is decided by what the run holds, so sync repairs it."""
    path, public = _ledger_for_sync(tmp_path)
    run_id = _new_run(mlflow_server)
    _client(mlflow_server).set_tag(run_id, "ledger.mirrored_seq", "5")
    done = _cli("mlflow", "sync", str(path), "--run-id", run_id, "--tracking-uri", mlflow_server)
    assert done.returncode == 0, done.stderr
    run = _client(mlflow_server).get_run(run_id)
    assert run.data.params["lr"] == "0.001" and run.data.tags["ledger.format"] == "1"
    assert [a.path for a in _client(mlflow_server).list_artifacts(run_id, "ledger") if not a.is_dir] == [
        "ledger/key.pub"]


@pytest.mark.slow
def test_a_param_the_run_already_holds_does_not_stop_the_mirror(mlflow_server: str, tmp_path: Path) -> None:
    """MLflow refuses to change a logged param: the mirror leaves it, warns, mirrors everything else,
    and verify names the difference."""
    path, public = _ledger_for_sync(tmp_path)
    run_id = _new_run(mlflow_server)
    _client(mlflow_server).log_param(run_id, "lr", "1e-3")  # the user's own spelling of the same lr
    done = _cli("mlflow", "sync", str(path), "--run-id", run_id, "--tracking-uri", mlflow_server)
    assert done.returncode == 0 and "already holds other values for params ['lr']" in done.stderr, done.stderr
    assert len(_client(mlflow_server).get_metric_history(run_id, "loss")) == 20
    assert json.loads(_client(mlflow_server).get_run(run_id).data.tags["ledger.owned"])["conflicts"] == ["lr"]
    checked = _cli("verify", "--mlflow-run", run_id, "--tracking-uri", mlflow_server, "--key", str(public))
    assert checked.returncode == 1 and "param lr: MLflow '1e-3', ledger '0.001'" in checked.stdout, checked.stdout


@pytest.mark.slow
def test_resume_while_the_server_is_down_goes_on(mlflow_server: str, tmp_path: Path) -> None:
    """A resume names the run genesis recorded without contacting the server: training goes on, the
    mirror retries, close records the gap."""
    private, data, model, optimizer, sink, rec = _mirrored(tmp_path, mlflow_server)
    _train(rec, model, optimizer, data, range(7))
    rec.abort()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    model = data.build_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    resumed = Recorder.resume(tmp_path / "ledger", model=model, optimizer=optimizer, key=private,
                              mlflow=MlflowSink(tracking_uri=dead, run_id=sink.run_id, close_timeout=1.0))
    _train(resumed, model, optimizer, data, range(resumed.current_step, 12))
    with pytest.warns(RuntimeWarning, match="mlflow sync"):
        resumed.close()
    mirror = ledger.open(tmp_path / "ledger").last_entry().body()["mirror"]
    assert mirror["missing"] is True and mirror["mlflow_run_id"] == sink.run_id


@pytest.mark.slow
def test_a_run_still_going_verifies_live_heads_follow_the_published_parts(tmp_path: Path, monkeypatch) -> None:
    """The mirror uploads a signed head only once the uploaded parts hold what it covers: a head
    ahead of the published parts read as a fork while the run went on (second-pass review)."""
    from ledger._writer import LedgerWriter

    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to ./mlruns of the creating process
    create = LedgerWriter.create.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(LedgerWriter, "create", classmethod(
        lambda cls, *a, **k: create(cls, *a, **{**k, "rollover_entries": 8})))  # a run of many parts, small
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    private, public, _, _, _ = _setup(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = MlflowSink(tracking_uri=uri, experiment="live", interval=0.1)
    rec = Recorder(tmp_path / "L", model=model, optimizer=optimizer, key=private, seed=3, checkpoint_every=3,
                   mlflow=sink)
    for step in range(20):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss=1.0 / (step + 1), batch=torch.zeros(1))
    rec.flush()
    deadline = time.monotonic() + 30
    while (rec._mirror.cursor or -1) < rec._writer.next_seq - 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # one more pass: the parts and heads uploads follow the metrics
    live = _cli("verify", "--mlflow-run", str(sink.run_id), "--tracking-uri", uri, "--key", str(public), "--live",
                "--json")
    rec.close()
    checks = json.loads(live.stdout)["checks"]
    assert live.returncode == 0 and checks["heads"]["status"] == "pass", checks["heads"]["detail"]
    assert (tmp_path / "L" / "heads").is_dir() and len(list((tmp_path / "L" / "heads").iterdir())) > 2
