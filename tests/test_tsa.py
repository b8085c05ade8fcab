"""Trusted timestamps of tree heads (RFC 3161) against a local TSA (tests/tsa_server.py: a throwaway
CA, ``openssl ts -reply`` over HTTP on 127.0.0.1): the query and the token's verification
(ledger/_tsa.py), the background timestamper (hooks/_tsa.py), a real recorded run with ``tsa=`` and
``ledger verify --tsa-roots`` (check ``timestamps``)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("rfc3161_client")

from ledger import _tsa  # noqa: E402
from ledger._note import TreeHead, sign_note  # noqa: E402
from ledger.errors import ConfigurationError, FormatError, VerificationError  # noqa: E402
from ledger.hooks._tsa import Timestamper, TsaOptions, _post, options_of  # noqa: E402

TEXT = TreeHead("training-ledger/test", 7, bytes(range(32))).text()


def stamp(server, text: bytes = TEXT) -> tuple[_tsa.Request, bytes]:
    """A query for ``text`` and the local TSA's answer over HTTP."""
    query = _tsa.request(text)
    return query, _post(server.url, query.der, 10.0)


@pytest.fixture
def roots(tsa_server):
    return _tsa.load_roots(tsa_server.authority.root)


# ----------------------------------------------------------------------------- ledger/_tsa.py
def test_token_verifies_and_says_when(tsa_server, roots) -> None:
    query, answer = stamp(tsa_server)
    assert query.digest == hashlib.sha256(TEXT).digest()
    arrived = _tsa.accept(answer, query)
    checked = _tsa.verify_token(answer, query.digest, roots)
    assert checked == arrived
    assert abs(checked.time.timestamp() - time.time()) < 120
    assert "Test TSA" in checked.tsa


def test_token_for_another_digest_fails(tsa_server, roots) -> None:
    _, answer = stamp(tsa_server, b"another head\n")
    with pytest.raises(VerificationError, match="another digest"):
        _tsa.verify_token(answer, hashlib.sha256(TEXT).digest(), roots)


def test_token_from_another_ca_fails(tsa_server, roots, tmp_path: Path) -> None:
    from tsa_server import make_authority

    other = make_authority(tmp_path / "other", "Other")
    query = _tsa.request(TEXT)
    answer = other.reply(query.der)
    _tsa.accept(answer, query)  # a well-formed answer to the query …
    with pytest.raises(VerificationError, match="does not verify against the TSA roots"):
        _tsa.verify_token(answer, query.digest, roots)  # … from a TSA these roots do not vouch for
    assert _tsa.verify_token(answer, query.digest, _tsa.load_roots(other.root)).digest == query.digest


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "garbage", "huge"])
def test_damaged_token_is_a_format_or_verification_error(tsa_server, roots, damage: str) -> None:
    query, answer = stamp(tsa_server)
    token = {"truncated": answer[:-20], "flipped": answer[:-40] + bytes([answer[-40] ^ 1]) + answer[-39:],
             "empty": b"", "garbage": os.urandom(300), "huge": answer + bytes(_tsa.MAX_TOKEN)}[damage]
    with pytest.raises((FormatError, VerificationError)):
        _tsa.verify_token(token, query.digest, roots)


def test_answer_to_another_query_is_refused(tsa_server) -> None:
    query, answer = stamp(tsa_server)
    replay = _tsa.request(TEXT)  # same head, fresh nonce: an old answer replayed does not fit it
    with pytest.raises(VerificationError, match="nonce"):
        _tsa.accept(answer, replay)
    with pytest.raises(VerificationError, match="another digest"):
        _tsa.accept(answer, _tsa.request(b"other\n"))


def test_roots_file_must_hold_certificates(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        _tsa.load_roots(tmp_path / "absent.pem")
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="no readable PEM"):
        _tsa.load_roots(tmp_path / "bad.pem")
    os.mkfifo(tmp_path / "fifo.pem")
    with pytest.raises(ConfigurationError, match="FIFO"):
        _tsa.load_roots(tmp_path / "fifo.pem")


# ----------------------------------------------------------------------------- hooks/_tsa.py
def test_options() -> None:
    assert options_of(None) is None
    assert options_of("http://127.0.0.1:1/tsr") == TsaOptions("http://127.0.0.1:1/tsr")
    for bad in ("ftp://x/", "127.0.0.1", 5):
        with pytest.raises(ConfigurationError):
            options_of(bad)
    assert TsaOptions("https://u:secret@tsa.example:8443/a?k=v").public_url == "https://tsa.example:8443/a"


def note(size: int) -> bytes:
    from ledger import Signer

    return sign_note(TreeHead("training-ledger/test", size, hashlib.sha256(b"%d" % size).digest()),
                     Signer.from_seed(bytes(32)))


def test_timestamper_stamps_writes_and_hands_over(tsa_server, roots, tmp_path: Path) -> None:
    stamper = Timestamper(TsaOptions(tsa_server.url), tmp_path).start()
    for size in (3, 5):
        stamper.submit(size, note(size))
    assert stamper.settle(30)
    tokens = dict(stamper.take())
    assert sorted(tokens) == [3, 5] and stamper.take() == []
    for size, token in tokens.items():
        assert (tmp_path / f"{size}.tsr").read_bytes() == token
        text = TreeHead("training-ledger/test", size, hashlib.sha256(b"%d" % size).digest()).text()
        _tsa.verify_token(token, hashlib.sha256(text).digest(), roots)
    assert stamper.stop() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.tsr", "5.tsr"]  # no temporary file left


def test_timestamper_retries_a_failing_tsa_and_never_blocks(tsa_server, tmp_path: Path) -> None:
    tsa_server.mode = "hang"
    tsa_server.hang_s = 3.0
    try:
        stamper = Timestamper(TsaOptions(tsa_server.url, timeout=0.5, backoff=0.2, max_backoff=0.4), tmp_path).start()
        started = time.perf_counter()
        for size in range(1, 50):
            stamper.submit(size, note(size))
        assert time.perf_counter() - started < 0.5  # queued, not sent
        time.sleep(1.5)
        tsa_server.mode = "error"
        time.sleep(1.0)
        left = stamper.unstamped()
        assert stamper.failures >= 2 and left and any("500" in why for why in left.values())
        assert not stamper.settle(0.5)  # bounded
        tsa_server.mode = "ok"
        assert stamper.settle(60), stamper.unstamped()
        assert sorted(size for size, _ in stamper.take()) == list(range(1, 50))
        assert stamper.stop() == {}
    finally:
        tsa_server.mode = "ok"


def test_timestamper_reports_what_is_left(tmp_path: Path) -> None:
    from tsa_server import free_port

    stamper = Timestamper(TsaOptions(f"http://127.0.0.1:{free_port()}/", timeout=0.5, backoff=0.1), tmp_path).start()
    stamper.submit(4, note(4))
    stamper.submit(6, b"not a note")
    left = stamper.stop(1.0)
    assert sorted(left) == [4, 6]
    assert "could not be reached" in left[4] and "note could not be read" in left[6]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a recorded run, verified
def train(path: Path, tsa, steps: int = 10, checkpoint_every: int = 3, pause: float = 0.0) -> list[float]:
    """A tiny real run with the real Recorder; the time each ``rec.step`` took."""
    import torch

    from ledger import Signer
    from ledger.hooks import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    rec = Recorder(path, model=model, optimizer=opt, key=Signer.from_seed(bytes(32)), seed=0,
                   checkpoint_every=checkpoint_every, tsa=tsa)
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        started = time.perf_counter()
        rec.step(loss=1.0)
        times.append(time.perf_counter() - started)
        time.sleep(pause)
    rec.close()
    return times


def entry_tokens(path: Path) -> dict[int, list[int]]:
    """seq → the head sizes whose tokens that entry carries."""
    import ledger

    return {e.seq: [t["size"] for t in e.body()["timestamps"]] for e in ledger.open(path).entries()
            if e.kind.label != "genesis" and "timestamps" in e.body()}


def note_sizes(path: Path) -> list[int]:
    return sorted(int(p.name[:-5]) for p in (path / "heads").glob("*.note"))


@pytest.fixture(scope="module")
def stamped_run(tsa_server, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stamped") / "L"
    train(path, tsa_server.url, pause=0.05)
    return path


def verify(path: Path, roots: Path | None, **kwargs):
    from ledger import Signer
    from ledger.verify import verify_ledger

    return verify_ledger(path, key=Signer.from_seed(bytes(32)).public, tsa_roots=roots, **kwargs)


def test_recorded_run_has_tokens_in_the_ledger_and_beside_it(stamped_run: Path) -> None:
    import ledger

    sizes = note_sizes(stamped_run)
    entries = list(ledger.open(stamped_run).entries())
    assert len(sizes) == 6 and sizes[-1] == len(entries)  # checkpoints of init, steps 2, 5, 8, 9; the seal's
    assert sorted(int(p.name[:-4]) for p in (stamped_run / "heads").glob("*.tsr")) == sizes
    carried = entry_tokens(stamped_run)
    in_ledger = sorted(s for sizes_ in carried.values() for s in sizes_)
    assert in_ledger == sizes[:-1]  # every head before the seal is in the ledger; the seal's only beside it
    assert all(size <= seq for seq, sizes_ in carried.items() for size in sizes_)
    for seq in carried:
        body = entries[seq].body()
        for item in body["timestamps"]:
            assert (stamped_run / "heads" / f"{item['size']}.tsr").read_bytes() == item["token"]
    assert entries[-1].body()["tsa"] == {"url": entries[-1].body()["tsa"]["url"], "unstamped": []}


def test_verify_with_roots_reports_anchors(stamped_run: Path, tsa_server) -> None:
    report = verify(stamped_run, tsa_server.authority.root)
    assert report.verdict == "pass", [c.to_dict() for c in report.checks]
    check = report.check("timestamps")
    assert check.status == "pass" and "every head has a token" in check.detail
    assert check.data["verified_heads"] == note_sizes(stamped_run) and check.data["heads_without_token"] == []
    anchors = check.data["anchors"]
    assert anchors[-1]["size"] == note_sizes(stamped_run)[-1]  # the whole sealed ledger has an anchor
    assert f"entries up to seq {anchors[-1]['seq']} existed before {anchors[-1]['before']}" in check.detail
    assert [a["size"] for a in anchors] == sorted(a["size"] for a in anchors)
    assert [a["before"] for a in anchors] == sorted({a["before"] for a in anchors})  # earlier parts, earlier times


def test_verify_cli(stamped_run: Path, tsa_server, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from ledger._cli import cli

    base = ["verify", str(stamped_run), "--json"]
    done = CliRunner().invoke(cli, [*base, "--tsa-roots", str(tsa_server.authority.root)])
    assert done.exit_code == 0, done.output
    check = json.loads(done.output)["checks"]["timestamps"]
    assert check["status"] == "pass" and check["anchors"]
    done = CliRunner().invoke(cli, base)
    check = json.loads(done.output)["checks"]["timestamps"]
    assert done.exit_code == 0 and check["status"] == "skip" and "no --tsa-roots given" in check["detail"]
    (tmp_path / "bad.pem").write_text("no certificate here")
    done = CliRunner().invoke(cli, [*base, "--tsa-roots", str(tmp_path / "bad.pem")])
    assert done.exit_code == 2 and "no readable PEM certificate" in done.output


def test_other_roots_fail_naming_each_head(stamped_run: Path, tmp_path: Path) -> None:
    from tsa_server import make_authority

    other = make_authority(tmp_path / "other", "Other")
    check = verify(stamped_run, other.root).check("timestamps")
    assert check.status == "fail"
    for size in note_sizes(stamped_run):
        assert f"head {size} (" in check.detail or f"head {size} (" in " ".join(check.data["problems"])


@pytest.mark.parametrize("forgery", ["another_ca", "another_head", "truncated"])
def test_forged_token_beside_the_ledger_fails_naming_the_size(stamped_run: Path, tsa_server, tmp_path: Path,
                                                              forgery: str) -> None:
    import shutil

    from tsa_server import make_authority

    copy = tmp_path / "L"
    shutil.copytree(stamped_run, copy)
    final = note_sizes(copy)[-1]
    target = copy / "heads" / f"{final}.tsr"
    if forgery == "another_ca":  # a token over the right head from a TSA nobody trusts
        other = make_authority(tmp_path / "other", "Other")
        text = TreeHead(_origin(copy), final, _root(copy, final)).text()
        query = _tsa.request(text)
        forged = other.reply(query.der)
        _tsa.accept(forged, query)
    elif forgery == "another_head":  # a genuine token of an earlier head
        forged = (copy / "heads" / f"{note_sizes(copy)[0]}.tsr").read_bytes()
    else:
        forged = target.read_bytes()[:-30]
    target.chmod(0o644)
    target.write_bytes(forged)
    report = verify(copy, tsa_server.authority.root)
    check = report.check("timestamps")
    assert report.verdict == "fail" and check.status == "fail"
    assert f"head {final} (heads/{final}.tsr)" in check.detail
    assert all(f"head {s} (" not in check.detail for s in note_sizes(copy)[:-1])


def _origin(path: Path) -> str:
    import ledger
    from ledger._note import origin_of

    return origin_of(ledger.open(path).genesis()["run_id"])


def _root(path: Path, size: int) -> bytes:
    import ledger
    from ledger._record import merkle_root

    return merkle_root([e.hash for e in ledger.open(path).entries()][:size])


def test_token_signed_into_a_ledger_for_another_head_fails(tsa_server, tmp_path: Path) -> None:
    """A writer that puts a genuine token of some other head into its (validly signed) ledger."""
    from conftest import step_body

    from ledger import LedgerWriter, Signer

    _, token = stamp(tsa_server)  # a real token over TEXT, a head of another log
    writer = LedgerWriter.create(tmp_path / "L", Signer.from_seed(bytes(32)), genesis={"config": {}})
    for i in range(3):
        writer.append("step", i, step_body(i))
    writer.append("step", 3, {**step_body(3), "timestamps": [{"size": 2, "token": token}]})
    writer.seal()
    check = verify(tmp_path / "L", tsa_server.authority.root).check("timestamps")
    assert check.status == "fail" and "head 2 (seq 4)" in check.detail and "another digest" in check.detail


def test_malformed_timestamps_field_fails(tsa_server, tmp_path: Path) -> None:
    from ledger import LedgerWriter, Signer

    writer = LedgerWriter.create(tmp_path / "L", Signer.from_seed(bytes(32)), genesis={"config": {}})
    writer.append("step", 0, {"timestamps": [{"size": 5, "token": b"x"}]})  # a head that includes itself
    writer.append("step", 1, {"timestamps": "nope"})
    writer.seal()
    check = verify(tmp_path / "L", tsa_server.authority.root).check("timestamps")
    assert check.status == "fail" and "seq 1" in check.detail and "seq 2" in check.detail


def test_ledger_without_timestamps_skips(tsa_server, make_ledger) -> None:
    check = verify(make_ledger(5), tsa_server.authority.root).check("timestamps")
    assert check.status == "skip" and "no timestamps" in check.detail


# ----------------------------------------------------------------------------- the TSA down during training
def test_tsa_down_never_blocks_training_and_leaves_heads_visible(tsa_server, tmp_path: Path) -> None:
    import statistics

    baseline = train(tmp_path / "plain", None, steps=30, checkpoint_every=5)
    tsa_server.mode, tsa_server.hang_s = "hang", 3.0  # accepts, then answers after the client's timeout
    try:
        options = TsaOptions(tsa_server.url, timeout=1.0, backoff=0.1, max_backoff=0.2, close_timeout=0.5)
        with pytest.warns(RuntimeWarning, match="have no timestamp"):
            down = train(tmp_path / "L", options, steps=30, checkpoint_every=5)
    finally:
        tsa_server.mode = "ok"
    # a step never waits for the TSA (1 s timeout, 3 s hang): no step near that, the median as without it
    assert max(down) < 0.5, max(down)
    assert statistics.median(down) < 3 * statistics.median(baseline) + 0.002, (statistics.median(down),
                                                                                 statistics.median(baseline))
    import ledger

    seal = list(ledger.open(tmp_path / "L").entries())[-1].body()
    sizes = note_sizes(tmp_path / "L")
    assert seal["tsa"]["unstamped"] == sizes[:-1] and "timestamps" not in seal
    assert entry_tokens(tmp_path / "L") == {} and not list((tmp_path / "L" / "heads").glob("*.tsr"))
    report = verify(tmp_path / "L", tsa_server.authority.root)
    check = report.check("timestamps")
    assert report.verdict == "pass" and check.status == "warn"
    assert check.data["heads_without_token"] == sizes and "no head was stamped" in check.detail


def test_tsa_back_after_an_outage_stamps_every_head(tsa_server, tmp_path: Path) -> None:
    tsa_server.mode = "error"
    try:
        options = TsaOptions(tsa_server.url, timeout=2.0, backoff=0.1, max_backoff=0.2, close_timeout=30)
        import threading

        threading.Timer(1.0, lambda: setattr(tsa_server, "mode", "ok")).start()
        refused = tsa_server.refused
        train(tmp_path / "L", options, steps=20, checkpoint_every=4, pause=0.1)
    finally:
        tsa_server.mode = "ok"
    assert tsa_server.refused > refused  # it failed, was retried, then stamped
    check = verify(tmp_path / "L", tsa_server.authority.root).check("timestamps")
    assert check.status == "pass", check.detail
    assert check.data["verified_heads"] == note_sizes(tmp_path / "L")


def test_format_vector() -> None:
    """docs/FORMAT.md §13.4: the imprint of the §13.1 example head is SHA-256 of its note text, and a
    query for that text carries exactly it."""
    import re

    spec = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    note_block = re.search(r"<!-- note-vector:begin -->\n```\n(.*?)```", spec, re.S)
    vector = re.search(r"<!-- tsa-vector:begin -->\n```\n([0-9a-f]{64})\n```", spec)
    assert note_block and vector
    text = note_block.group(1).encode().split(b"\n\n")[0] + b"\n"
    assert text.count(b"\n") == 3 and text.startswith(b"training-ledger/example-run\n3\n")
    assert hashlib.sha256(text).hexdigest() == vector.group(1)
    assert _tsa.request(text).digest.hex() == vector.group(1)


def test_resume_stamps_the_heads_an_interrupted_run_left_unstamped(tsa_server, tmp_path: Path) -> None:
    import torch

    import ledger
    from ledger import Signer
    from ledger.hooks import Recorder

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters())
    key = Signer.from_seed(bytes(32))
    dead = TsaOptions(f"http://127.0.0.1:{__import__('tsa_server').free_port()}/", timeout=0.2, backoff=0.1)
    rec = Recorder(tmp_path / "L", model=model, optimizer=opt, key=key, seed=0, checkpoint_every=2, tsa=dead)
    for _ in range(5):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        rec.step(loss=1.0)
    rec.flush()
    rec.abort()  # a crash: unsealed, every head so far without a token
    before = note_sizes(tmp_path / "L")
    assert before and not list((tmp_path / "L" / "heads").glob("*.tsr"))
    rec = Recorder.resume(tmp_path / "L", model=model, optimizer=opt, key=key, tsa=tsa_server.url)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        rec.step(loss=1.0)
    rec.close()
    carried = sorted(s for sizes_ in entry_tokens(tmp_path / "L").values() for s in sizes_)
    assert set(before) <= set(carried)  # the earlier process's heads, stamped after the resume, in the ledger
    check = verify(tmp_path / "L", tsa_server.authority.root).check("timestamps")
    assert check.status == "pass", check.detail
    assert check.data["verified_heads"] == note_sizes(tmp_path / "L")
    assert ledger.open(tmp_path / "L").sealed


# ----------------------------------------------------------------------------- review fixes
def test_a_malformed_certificate_in_an_answer_is_no_crash(tsa_server) -> None:
    """One byte of the TSA's embedded certificate (X.509 version 4): the signer's name is unknown,
    never an exception out of accept() (it killed the timestamper thread)."""
    query, answer = stamp(tsa_server)
    damaged = bytearray(answer)
    at = bytes(damaged).find(bytes.fromhex("a003020102"))
    assert at > 0
    damaged[at + 4] = 3
    assert _tsa.accept(bytes(damaged), query).tsa == "?"


def test_any_failed_query_is_retried_and_the_thread_lives_on(tsa_server, tmp_path: Path, monkeypatch) -> None:
    import ledger.hooks._tsa as hooks_tsa

    calls = {"n": 0}
    real = hooks_tsa._post

    def flaky(url: str, query: bytes, timeout: float) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a parser's surprise")
        return real(url, query, timeout)

    monkeypatch.setattr(hooks_tsa, "_post", flaky)
    stamper = Timestamper(TsaOptions(tsa_server.url, backoff=0.05, max_backoff=0.1), tmp_path).start()
    stamper.submit(3, note(3))
    assert stamper.settle(20), stamper.unstamped()
    assert stamper.failures == 1 and calls["n"] == 2
    assert stamper._thread is not None and stamper._thread.is_alive()
    assert stamper.stop() == {}


def test_a_run_id_too_long_for_heads_is_refused_and_old_ledgers_skip(tsa_server, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    """A run id whose origin is over 1024 bytes silently got no heads, and verify --tsa-roots then
    failed: now create refuses it; a ledger written so before skips timestamps, and prove exits 2."""
    import ledger._note as note_module
    from ledger import LedgerWriter, Signer
    from ledger._cli import main

    long_id = "r" * 1100
    with pytest.raises(ConfigurationError, match="shorter run id"):
        LedgerWriter.create(tmp_path / "new", Signer.from_seed(bytes(32)), run_id=long_id)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(note_module, "MAX_ORIGIN_BYTES", 1 << 20)  # a ledger from before the refusal
    writer = LedgerWriter.create(tmp_path / "old", Signer.from_seed(bytes(32)), run_id=long_id)
    monkeypatch.undo()
    writer._origin = None
    writer.append("step", 0, {"metrics": {"loss": 1.0}})
    writer.append("checkpoint", 0, {"path": "c"})
    writer.seal()
    assert verify(tmp_path / "old", tsa_server.authority.root).check("timestamps").status == "skip"
    with pytest.raises(SystemExit) as exit_info:
        main(["prove", str(tmp_path / "old"), "--seq", "1", "--out", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2 and "no signed tree heads" in capsys.readouterr().err


def test_a_token_moved_to_another_head_s_file_is_not_hidden(stamped_run: Path, tsa_server, tmp_path: Path) -> None:
    """heads/<b>.tsr overwritten with head a's genuine token, both heads' tokens also in the ledger:
    deduplicating on the token alone skipped it ("every head has a token")."""
    import shutil

    copy = tmp_path / "L"
    shutil.copytree(stamped_run, copy)
    stamped = sorted(size for sizes in entry_tokens(copy).values() for size in sizes)
    first, other = stamped[0], stamped[1]
    target = copy / "heads" / f"{other}.tsr"
    target.chmod(0o644)
    target.write_bytes((copy / "heads" / f"{first}.tsr").read_bytes())
    check = verify(copy, tsa_server.authority.root).check("timestamps")
    assert check.status == "fail" and f"head {other} (heads/{other}.tsr)" in check.detail


def test_close_waits_one_close_timeout_in_all_when_the_tsa_is_down(tmp_path: Path) -> None:
    """The wait before the seal and the one after it for the final head share one close_timeout (an
    outage cost 2 x close_timeout at close, and the warning said "not tried")."""
    from tsa_server import free_port

    options = TsaOptions(f"http://127.0.0.1:{free_port()}/", timeout=0.2, backoff=0.05, max_backoff=0.1,
                         close_timeout=1.5)
    stamper = Timestamper(options, tmp_path).start()
    stamper.submit(4, note(4))
    started = time.monotonic()
    fields = stamper.seal_fields()
    assert fields["tsa"]["unstamped"] == [4]
    stamper.submit(6, note(6))  # the final head, after the seal
    with pytest.warns(RuntimeWarning, match="have no timestamp") as caught:
        stamper.finish("L")
    assert time.monotonic() - started < 2.2
    assert "not tried" not in str(caught[0].message) and "could not be reached" in str(caught[0].message)


def test_credentials_in_the_tsa_url_are_sent_as_basic_authorization(tsa_server) -> None:
    """http://user:secret@host/ never worked (urllib put it in the Host header and failed)."""
    import base64
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    seen: dict[str, str | None] = {}

    class Front(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen["authorization"], seen["host"] = self.headers.get("Authorization"), self.headers.get("Host")
            answer = tsa_server.authority.reply(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Front)
    Thread(target=front.serve_forever, daemon=True).start()
    try:
        query = _tsa.request(TEXT)
        answer = _post(f"http://us%40er:p%3Ass@127.0.0.1:{front.server_address[1]}/tsr", query.der, 10.0)
        assert _tsa.accept(answer, query).digest == query.digest
        assert seen["authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
        assert seen["host"] == f"127.0.0.1:{front.server_address[1]}"
    finally:
        front.shutdown()
        front.server_close()


def test_anchors_allow_for_the_accuracy_the_token_states(stamped_run: Path, tsa_server) -> None:
    """The local TSA states accuracy secs:1: an anchor says "before genTime + 1 s", not before genTime."""
    import datetime as dt

    check = verify(stamped_run, tsa_server.authority.root).check("timestamps")
    roots = _tsa.load_roots(tsa_server.authority.root)
    for anchor in check.data["anchors"]:
        size = anchor["size"]
        text = TreeHead(_origin(stamped_run), size, _root(stamped_run, size)).text()
        stamp = _tsa.verify_token((stamped_run / "heads" / f"{size}.tsr").read_bytes(),
                                  hashlib.sha256(text).digest(), roots)
        assert stamp.accuracy == dt.timedelta(seconds=1) and stamp.latest == stamp.time + stamp.accuracy
        assert anchor["before"] == stamp.latest.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert anchor["before"] != stamp.time.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_redirect_is_refused_and_credentials_go_nowhere_else() -> None:
    """RFC 3161 over HTTP needs no redirect; following one handed the query and the Basic
    credentials to the origin it named (second-pass review)."""
    import http.server
    import threading

    from ledger.errors import ConfigurationError
    from ledger.hooks import _tsa as timestamper

    seen: dict[str, object] = {}

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Other(Redirect):
        def do_POST(self) -> None:  # noqa: N802
            seen["authorization"] = self.headers.get("Authorization")
            self.send_response(200)
            self.end_headers()

        do_GET = do_POST  # noqa: N815

    tsa = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    other = http.server.HTTPServer(("127.0.0.1", 0), Other)
    for server in (tsa, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigurationError, match="redirect .* refused"):
            timestamper._post(f"http://alice:s3cret@127.0.0.1:{tsa.server_port}/tsr", b"query", 5)
    finally:
        tsa.shutdown()
        other.shutdown()
    assert seen == {}
