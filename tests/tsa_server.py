"""A local RFC 3161 time-stamping authority for tests: no network.

:func:`make_authority` builds a throwaway root CA and a TSA certificate (``extendedKeyUsage``
critical ``timeStamping``, signed by that root) with the ``openssl`` command line in a directory,
and an ``openssl ts`` configuration; :meth:`Authority.reply` answers one DER ``TimeStampReq`` with
``openssl ts -reply``. :func:`start_tsa_server` serves an authority over HTTP on 127.0.0.1 (a free
port) the way a TSA does: ``POST`` of ``application/timestamp-query`` → ``application/timestamp-reply``.
``server.mode`` makes it fail for outage tests: ``"ok"``, ``"error"`` (HTTP 500), ``"hang"``
(answers after ``hang_s``: past a client's timeout). The session fixture ``tsa_server`` in
tests/conftest.py wraps it.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_QUERY = 16 << 10

_TSA_EXTENSIONS = """\
[tsa_cert]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = critical, timeStamping
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_TS_CONFIG = """\
[ tsa ]
default_tsa = tsa_config1

[ tsa_config1 ]
dir = {dir}
serial = $dir/tsaserial
crypto_device = builtin
signer_cert = $dir/tsa.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
other_policies = 1.2.3.4.5
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a TSA that is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], cwd=cwd, input=data, capture_output=True, timeout=60, check=False)
    if done.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


@dataclass
class Authority:
    """A throwaway CA and its TSA: ``root`` (PEM file of the root certificate, what a verifier
    trusts), ``tsa_cert`` and ``config`` (the ``openssl ts`` configuration) in ``directory``."""

    directory: Path
    root: Path
    tsa_cert: Path
    config: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, query: bytes) -> bytes:
        """The DER ``TimeStampResp`` ``openssl ts -reply`` gives for a DER ``TimeStampReq``."""
        with self.lock, tempfile.TemporaryDirectory(dir=self.directory) as tmp:  # one at a time: the serial file
            work = Path(tmp)
            (work / "query.tsq").write_bytes(query)
            _openssl("ts", "-reply", "-config", str(self.config), "-queryfile", "query.tsq", "-out", "reply.tsr",
                     cwd=work)
            return (work / "reply.tsr").read_bytes()


def make_authority(directory: Path, name: str = "Test") -> Authority:
    """Create a root CA and a TSA certificate it signs (P-256 keys, ten years) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "3650", "-subj", f"/CN={name} Root CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "tsa.key",
             "-out", "tsa.csr", "-subj", f"/CN={name} TSA", cwd=directory)
    (directory / "tsa_ext.cnf").write_text(_TSA_EXTENSIONS)
    _openssl("x509", "-req", "-in", "tsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tsa.pem", "-days", "3650", "-extfile", "tsa_ext.cnf", "-extensions", "tsa_cert", cwd=directory)
    (directory / "tsaserial").write_text("01\n")
    config = directory / "ts.cnf"
    config.write_text(_TS_CONFIG.format(dir=directory))
    return Authority(directory, directory / "ca.pem", directory / "tsa.pem", config)


class TsaServer(ThreadingHTTPServer):
    """The HTTP front of an :class:`Authority`; ``mode`` and ``hang_s`` set how it answers,
    ``served`` and ``refused`` count the requests answered with a token and those failed on purpose."""

    daemon_threads = True

    def __init__(self, authority: Authority) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.authority = authority
        self.mode = "ok"
        self.hang_s = 5.0
        self.served = 0
        self.refused = 0
        self._thread = threading.Thread(target=self.serve_forever, name="tsa-server", daemon=True)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (its timeout, during ``hang``) is not an error worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """Where a client POSTs its queries."""
        return f"http://127.0.0.1:{self.server_address[1]}/tsr"

    def start(self) -> TsaServer:
        """Serve on a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    server: TsaServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        query = self.rfile.read(min(length, MAX_QUERY))
        mode = self.server.mode
        if mode == "hang":
            time.sleep(self.server.hang_s)
        if mode == "error" or self.headers.get("Content-Type") != "application/timestamp-query":
            self.server.refused += 1
            self._answer(500, b"time-stamping is down", "text/plain")
            return
        try:
            reply = self.server.authority.reply(query)
        except RuntimeError as exc:
            self._answer(400, str(exc).encode(), "text/plain")
            return
        self.server.served += 1
        self._answer(200, reply, "application/timestamp-reply")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass  # quiet


def start_tsa_server(directory: Path) -> TsaServer:
    """Make an authority in ``directory`` and serve it on 127.0.0.1 at a free port."""
    return TsaServer(make_authority(directory)).start()
