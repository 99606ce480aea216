"""Real parts for the tests: HTTPS instances, configuration files, gunicorn, a raw HTTP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import trustme
from pytest_httpserver import HTTPServer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    return context


def leaf_der(cert: trustme.LeafCert) -> bytes:
    """DER of the leaf certificate an instance presents."""
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


class Instance:
    """A real HTTPS instance (pytest-httpserver) whose certificate can be changed.

    ``restart(cert)`` stops it and starts it again on the same port with
    another certificate, as an operator would after replacing it.
    """

    def __init__(self, ca: trustme.CA, host: str = "127.0.0.1") -> None:
        self.host = host
        self.cert = ca.issue_cert(host, "localhost")
        self.server = HTTPServer(host=host, port=0, ssl_context=server_context(self.cert), threaded=True)
        self.server.start()
        self.port = self.server.port

    @property
    def der(self) -> bytes:
        return leaf_der(self.cert)

    def restart(self, cert: trustme.LeafCert | None = None) -> None:
        handlers = self.server.handlers, self.server.oneshot_handlers, self.server.ordered_handlers
        self.stop()
        if cert is not None:
            self.cert = cert
        self.server = HTTPServer(host=self.host, port=self.port, ssl_context=server_context(self.cert), threaded=True)
        self.server.handlers, self.server.oneshot_handlers, self.server.ordered_handlers = handlers
        self.server.start()

    def stop(self) -> None:
        if self.server.is_running():
            self.server.stop()

    @property
    def requests(self) -> list:
        """werkzeug Request objects this instance received, in order."""
        return [req for req, _ in self.server.log]


@dataclass
class Spec:
    host: str
    api_port: int
    matching_port: int = 9999
    enabled: bool = True


def write_config(
    directory: Path,
    instances: Iterable[Spec | Instance],
    allowed: Iterable[tuple[str, str]] = (("GET", "/api/v.1.1/suppliers"),),
    *,
    api_port: int | None = None,
    cert_dir: str = "certs",
    workers: int = 1,
    tls: tuple[Path, Path] | None = None,
    extra: str = "",
    scanners_count: int = 10,
) -> Path:
    """Write a kl_balancer.conf into *directory* and return its path."""
    lines = []
    for i, inst in enumerate(instances):
        spec = inst if isinstance(inst, Spec) else Spec(inst.host, inst.port, 9999 - i)
        enabled = "true" if spec.enabled else "false"
        lines.append(
            f'    <Instance enabled="{enabled}" matching_port="{spec.matching_port}" '
            f'api_port="{spec.api_port}">{spec.host}</Instance>'
        )
    requests = "\n".join(f'    <Request method="{m}">{p}</Request>' for m, p in allowed)
    tls_xml = ""
    if tls:
        tls_xml = f"  <SSLCertificatePath>{tls[0]}</SSLCertificatePath>\n  <SSLPrivateKeyPath>{tls[1]}</SSLPrivateKeyPath>\n"
    text = f"""<?xml version="1.0" encoding="utf-8"?>
<Config>
  <Balancer api_port="{api_port or free_port()}" matching_port="9999" cybertrace_port="9998" scanners_count="{scanners_count}">127.0.0.1</Balancer>
{tls_xml}  <CertDirPath>{cert_dir}</CertDirPath>
  <Instances>
{chr(10).join(lines)}
  </Instances>
  <AllowedRequests>
{requests}
  </AllowedRequests>
  <Workers>{workers}</Workers>
{extra}</Config>
"""
    path = directory / "kl_balancer.conf"
    path.write_text(text)
    return path


@dataclass
class Gunicorn:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` in its own process, as docs/design.md, "Running", runs it."""

    config: Path
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    scheme: str = "http"

    def start(self, timeout: float = 30.0) -> "Gunicorn":
        env = {**os.environ, "BALANCER_CONFIG": str(self.config), **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            if "Booting worker" in self.log() and _accepts(self.port):
                workers = self.log().count("Booting worker")
                if workers >= self.expected_workers():
                    time.sleep(0.3)
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not start in {timeout}s:\n{self.log()}")

    def expected_workers(self) -> int:
        text = self.config.read_text()
        if "BALANCER_WORKERS" in self.env:
            return int(self.env["BALANCER_WORKERS"])
        start = text.find("<Workers>")
        return int(text[start + 9 : text.find("</Workers>")]) if start >= 0 else 2

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def config_port(path: Path) -> int:
    text = path.read_text()
    start = text.index('api_port="') + len('api_port="')
    return int(text[start : text.index('"', start)])


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> object:
        return json.loads(self.body)


def raw_request(port: int, data: bytes, timeout: float = 10.0, tls: bool = False) -> RawResponse:
    """Send *data* exactly as given and read one response (the connection is then closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    with sock:
        sock.sendall(data)
        return read_response(sock, head=data.split(b" ", 1)[0] == b"HEAD")


def read_response(sock: socket.socket, head: bool = False) -> RawResponse:
    f = sock.makefile("rb")
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    headers = []
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    resp = RawResponse(status, headers, b"")
    if head or status in (204, 304) or 100 <= status < 200:
        return resp
    if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                break
            body += f.read(size)
            f.readline()
        resp.body = body
    elif resp.header("Content-Length") is not None:
        resp.body = f.read(int(resp.header("Content-Length") or 0))
    else:
        resp.body = f.read()
    return resp


def get(port: int, target: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b"") -> RawResponse:
    """One request with the target sent byte for byte (no client-side normalisation)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def kill_and_reap(pid: int) -> None:
    """SIGKILL a forked child and collect it, whether or not it is still there."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
