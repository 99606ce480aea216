"""Misbehaving and killable instances, and a bounded load, for the high-availability tests (docs/design.md, "Failover")."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trustme

from .peers import Peer
from .support import ROOT, free_port, server_context

# -- scripted TLS instances ---------------------------------------------------------------------

#: Script actions besides the bytes of an answer.
CLOSE = "close"  # read the request, then close the connection (TLS close_notify, then FIN)
RESET = "reset"  # read the request, then reset the connection (RST)
GARBLED = "garbled"  # read the request, send half a status line, then close
BAD_RECORD = "bad-record"  # read the request, send a TLS record that fails to decrypt, then close
CUT = "cut"  # read the request, send a head announcing 100 bytes and 10 of them, then close


def answer(status: int = 200, body: bytes = b"{}", close: bool = False, reason: str = "OK") -> bytes:
    """The bytes of a complete HTTP/1.1 answer."""
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


@dataclass
class Received:
    connection: int  # 0-based number of the TLS connection it came on
    index: int  # 0-based number of the request on that connection
    method: str
    path: str
    body: bytes


Script = Callable[[Received], "bytes | str"]


class ScriptedInstance(Peer):
    """A TLS server that reads HTTP/1.1 requests and, for each, does what *script* says.

    The script gets the request (with its connection and position on it) and returns the bytes
    to answer with, :data:`CLOSE` or :data:`RESET`. Every request read is recorded, whatever
    happens next: what an instance counts is what it received.
    """

    def __init__(self, cert: trustme.LeafCert, script: Script) -> None:
        self.context = server_context(cert)
        self.script = script
        self._numbered = 0
        super().__init__()
        #: Every request read, whatever happened next (Peer's byte record is not used here).
        self.received: list[Received] = []  # type: ignore[assignment]

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            number = self._numbered
            self._numbered += 1
        tls = self.context.wrap_socket(conn, server_side=True)
        tls.settimeout(30)
        reader = tls.makefile("rb")
        index = 0
        try:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                request = Received(number, index, method, path, reader.read(length))
                with self._lock:
                    self.received.append(request)
                action = self.script(request)
                if action == CLOSE:
                    return
                if action == RESET:
                    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if action == GARBLED:
                    tls.sendall(b"HTTP/1.1 20")
                    return
                if action == CUT:
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                    return
                if action == BAD_RECORD:
                    # Application data that no key decrypts: the client's read fails with an SSLError.
                    with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                        raw.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
                    time.sleep(0.2)
                    return
                tls.sendall(action)  # type: ignore[arg-type]
                index += 1
        except ValueError:
            return
        finally:
            reader.close()
            tls.close()

    def count(self, method: str | None = None) -> int:
        return len([r for r in self.received if method is None or r.method == method])


class SilentInstance(Peer):
    """Accepts TCP connections and never says a word: the TLS handshake runs into the connect timeout."""

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        while conn.recv(65536):  # until the client or close() ends the connection
            pass


# -- an instance in its own process --------------------------------------------------------------


class InstanceProcess:
    """``tests/ha_instance.py`` in its own process: killed with SIGKILL, it dies the way a host does."""

    def __init__(self, ca: trustme.CA, directory: Path, name: str) -> None:
        self.port = free_port()
        cert = ca.issue_cert("127.0.0.1")
        self.cert_path = directory / f"{name}_cert.pem"
        self.key_path = directory / f"{name}_key.pem"
        cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        cert.private_key_pem.write_to_path(str(self.key_path))
        self.log_path = directory / f"{name}.requests"
        self.log_path.touch()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> "InstanceProcess":
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "ha_instance.py"), str(self.port), str(self.cert_path),
             str(self.key_path), str(self.log_path)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.stdout.readline().strip() == b"ready":
                return self
            time.sleep(0.05)
        raise RuntimeError("instance did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def requests(self) -> list[str]:
        return self.log_path.read_text().splitlines()


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    at: float
    method: str
    status: int | None  # None: the request failed on the client side
    port: int | None  # which instance answered (from its JSON), when known
    error: str = ""


@dataclass
class Load:
    """Client threads sending GET and a repeatable lookup POST through the balancer until stopped.

    Bounded: each thread stops by itself after *max_seconds*, and pauses *pause* seconds between
    requests so that a 2-core machine keeps room for the balancer and the instances.
    """

    port: int
    threads: int = 4
    keep_alive: bool = True
    pause: float = 0.01
    max_seconds: float = 60.0
    get_target: str = "/api/v.1.1/suppliers"
    post_target: str = "/api/v2/lookup"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]

    def start(self) -> "Load":
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._workers:
            t.join(30)
        return self.outcomes

    def _run(self, number: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn: http.client.HTTPConnection | None = None
        i = number
        while not self._stop.is_set() and time.monotonic() < deadline:
            method = "GET" if i % 2 else "POST"
            i += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            headers = {} if self.keep_alive else {"Connection": "close"}
            try:
                if method == "GET":
                    conn.request("GET", self.get_target, headers=headers)
                else:
                    conn.request("POST", self.post_target, body=b'{"url": "http://example.test/"}', headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                port = None
                if resp.status == 200:
                    port = json.loads(body)["port"]
                self._record(Outcome(time.monotonic(), method, resp.status, port, "" if resp.status == 200 else body.decode()))
                if not self.keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self._record(Outcome(time.monotonic(), method, None, None, repr(exc)))
                conn.close()
                conn = None
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def statuses(outcomes: list[Outcome]) -> Counter:
    return Counter((o.method, o.status) for o in outcomes)
