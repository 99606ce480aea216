"""Hostile and misbehaving peers for the reliability tests (docs/design.md, "Hostile clients").

Small threaded socket servers, each recording every byte it receives after
the TLS handshake, so a test can assert that *nothing* of a request reached
it, or exactly what did:

* :class:`RecordingPeer`: completes the handshake with a given certificate and
  key, answers nothing (an impostor on the instance's address);
* :class:`PlainPeer`: no TLS at all (another service on the port);
* :class:`NoCertificatePeer`: TLS 1.2 with anonymous ciphers only, so it has
  no certificate to present;
* :class:`InterceptingRelay`: terminates TLS with its own certificate and
  relays, byte for byte, to the real instance (a TLS-intercepting proxy);
* :class:`RawInstance`: a minimal HTTP/1.1 instance that parses what it gets
  itself, counts complete and incomplete requests, and answers with whatever
  bytes the test gives it (header values werkzeug would refuse to write).

All listen on 127.0.0.1, on a free port or on the port they take over, and
stop with :meth:`close`.
"""

from __future__ import annotations

import hashlib
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: How long a peer waits on a silent connection before it gives up on it.
IDLE = 10.0


def listen(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1; SO_REUSEADDR lets it take over a port just freed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def context_from_pem(cert_pem: bytes, key_pem: bytes, directory: Path) -> ssl.SSLContext:
    """A server context presenting *cert_pem* with *key_pem* (files written under *directory*)."""
    name = hashlib.sha256(cert_pem).hexdigest()[:16]
    cert_file, key_file = directory / f"peer-{name}-cert.pem", directory / f"peer-{name}-key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    # No TLS 1.3 session tickets: a client that closes right after the
    # handshake (the balancer refusing the certificate) would leave them
    # unread and reset the connection, and the peer could then miss its own
    # handshake completing.
    context.num_tickets = 0
    return context


class Peer:
    """Accepts connections in a thread and hands each to :meth:`serve` in its own thread."""

    def __init__(self, port: int = 0) -> None:
        self.sock = listen(port)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.handshakes = 0
        self.received = bytearray()
        #: What ended connections early (handshake failures included), for diagnosis.
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._active = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._active += 1
                self._open.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE)
            self.serve(conn)
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.errors.append(exc)
        finally:
            conn.close()
            with self._lock:
                self._active -= 1
                self._ended.notify_all()

    def wait_idle(self, limit: float = IDLE) -> bool:
        """Wait (at most *limit* seconds) until every accepted connection has been served to its end."""
        with self._lock:
            return self._ended.wait_for(lambda: self._active == 0, limit)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def record(self, data: bytes) -> None:
        with self._lock:
            self.received += data

    def drain(self, conn: socket.socket) -> None:
        """Record everything until the other side closes."""
        while data := conn.recv(65536):
            self.record(data)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would
        # leave the port listening until the next connection arrives.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class RecordingPeer(Peer):
    """Completes TLS handshakes with *context* and records every byte sent afterwards; answers nothing."""

    def __init__(self, context: ssl.SSLContext, port: int = 0) -> None:
        self.context = context
        super().__init__(port)

    def serve(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            with self._lock:
                self.handshakes += 1
            self.drain(tls)


class PlainPeer(Peer):
    """Not TLS: records what arrives, optionally answers *reply* in clear text and closes."""

    def __init__(self, reply: bytes = b"", port: int = 0) -> None:
        self.reply = reply
        super().__init__(port)

    def serve(self, conn: socket.socket) -> None:
        if self.reply:
            self.record(conn.recv(65536))
            conn.sendall(self.reply)
            return
        self.drain(conn)


class NoCertificatePeer(RecordingPeer):
    """TLS 1.2 with anonymous (aNULL) cipher suites only: there is no certificate to present."""

    def __init__(self, port: int = 0) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("aNULL:@SECLEVEL=0")
        super().__init__(context, port)


class InterceptingRelay(Peer):
    """A TLS-intercepting proxy: its own certificate towards the client, a relay to the real instance.

    ``received`` is what the client sent it after the handshake; ``relayed``
    what it passed on to the instance. It opens the upstream connection right
    after the client's handshake, as a real intercepting proxy does.
    """

    def __init__(self, context: ssl.SSLContext, upstream_port: int, port: int = 0) -> None:
        self.context = context
        self.upstream_port = upstream_port
        self.relayed = bytearray()
        self.upstream_connections = 0
        super().__init__(port)

    def serve(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            with self._lock:
                self.handshakes += 1
            client = ssl.create_default_context()
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            with client.wrap_socket(socket.create_connection(("127.0.0.1", self.upstream_port), timeout=IDLE)) as up:
                with self._lock:
                    self.upstream_connections += 1
                self._pump(tls, up)

    def _pump(self, tls: ssl.SSLSocket, up: ssl.SSLSocket) -> None:
        """Relay both ways in this one thread (an SSL socket must not be used by two at once).

        Reads do not block: a socket can be readable for TLS records that carry
        no data (session tickets), and a blocking read would then wait for
        data that is not coming.
        """
        other = {tls: up, up: tls}
        for sock in other:
            sock.setblocking(False)
        while True:
            ready = [s for s in other if s.pending()] or select.select(list(other), [], [], IDLE)[0]
            if not ready:
                return
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                if not data:
                    return
                if sock is tls:
                    self.record(data)
                    with self._lock:
                        self.relayed += data
                other[sock].settimeout(IDLE)
                other[sock].sendall(data)
                other[sock].setblocking(False)


@dataclass
class Received:
    """One request as a :class:`RawInstance` read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool
    head: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def ok_json(request: Received) -> bytes:
    """The default answer: 200 with a small JSON body naming what was received."""
    body = b'{"ok": true}'
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class _Conn:
    buffer: bytearray = field(default_factory=bytearray)


class RawInstance(Peer):
    """An HTTPS instance that parses HTTP/1.1 itself and answers with the bytes *respond* returns.

    ``requests`` lists every request whose head arrived, in order; a request
    whose body stopped before its ``Content-Length`` (or last chunk) is kept
    with ``complete=False`` and is never answered. ``respond`` may return
    ``None`` to close the connection without an answer.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        respond: Callable[[Received], bytes | None] = ok_json,
        port: int = 0,
    ) -> None:
        self.context = context
        self.respond = respond
        self.requests: list[Received] = []
        super().__init__(port)

    @property
    def complete(self) -> list[Received]:
        return [r for r in self.requests if r.complete]

    def serve(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            with self._lock:
                self.handshakes += 1
            state = _Conn()
            while True:
                request = self._read_request(tls, state)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                if not request.complete:
                    return
                answer = self.respond(request)
                if answer is None:
                    return
                tls.sendall(answer)
                if b"connection: close" in answer.lower() or request.header("Connection") == ["close"]:
                    return

    def _fill(self, tls: ssl.SSLSocket, state: _Conn) -> bool:
        data = tls.recv(65536)
        if not data:
            return False
        self.record(data)
        state.buffer += data
        return True

    def _read_request(self, tls: ssl.SSLSocket, state: _Conn) -> Received | None:
        while b"\r\n\r\n" not in state.buffer:
            if not self._fill(tls, state):
                return None
        end = state.buffer.index(b"\r\n\r\n")
        head = bytes(state.buffer[:end])
        del state.buffer[: end + 4]
        line, *fields = head.decode("latin-1").split("\r\n")
        method, target, _version = line.split(" ", 2)
        headers = [(n, v.strip(" \t")) for n, _, v in (f.partition(":") for f in fields)]
        request = Received(method, target, headers, b"", complete=False, head=head)
        lengths = request.header("Content-Length")
        if "chunked" in ",".join(request.header("Transfer-Encoding")).lower():
            return self._read_chunked(tls, state, request)
        length = int(lengths[0]) if lengths else 0
        while len(state.buffer) < length:
            if not self._fill(tls, state):
                request.body = bytes(state.buffer)
                return request
        request.body = bytes(state.buffer[:length])
        del state.buffer[:length]
        request.complete = True
        return request

    def _read_chunked(self, tls: ssl.SSLSocket, state: _Conn, request: Received) -> Received:
        body = bytearray()
        while True:
            while b"\r\n" not in state.buffer:
                if not self._fill(tls, state):
                    request.body = bytes(body)
                    return request
            end = state.buffer.index(b"\r\n")
            size = int(bytes(state.buffer[:end]).split(b";")[0], 16)
            while len(state.buffer) < end + 2 + size + 2:
                if not self._fill(tls, state):
                    request.body = bytes(body)
                    return request
            body += state.buffer[end + 2 : end + 2 + size]
            del state.buffer[: end + 2 + size + 2]
            if size == 0:
                request.body = bytes(body)
                request.complete = True
                return request
