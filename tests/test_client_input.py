"""Bad input from clients, and bad answers from an instance, against one real gunicorn balancer (docs/design.md, "Hostile clients").

The instance is a :class:`~tests.peers.RawInstance`: it parses HTTP/1.1 itself
and keeps every request it received, complete or not, so each test can
assert exactly what reached it. The balancer runs with ``scanners_count="1"``
and ``<Timeouts read="2" client="2"/>``: a request slot that is not given back shows at
once as a 503 on the next request, and a stalled client is cut after two
seconds of silence.

After every test the worker must be the one that booted (no "Worker
exiting", no second "Booting worker") and must still forward a request.

Who answers: ``gunicorn`` refuses malformed framing and heads before the
application runs (its own HTML page); the ``app`` answers with its JSON
errors; nothing in either case reaches the instance.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from .peers import RawInstance, Received
from .support import Gunicorn, Spec, config_port, raw_request, read_response, server_context, write_config

ALLOWED = (
    ("GET", "/a"),
    ("POST", "/a"),
    ("GET", "/big"),
    ("GET", "/r/{case}"),
)

BIG = b"x" * (8 * 1024 * 1024)

#: Heads an instance answers with for ``GET /r/{case}``: each tries to get a
#: header of its own choosing (``Injected``) into the client's response.
BAD_HEADS = {
    "bare-cr-in-value": b"X-A: foo\rInjected: yes\r\n",
    "bare-lf-in-value": b"X-A: foo\nInjected: yes\r\n",
    "obs-fold": b"X-A: foo\r\n Injected: yes\r\n",
    "nul-in-value": b"X-A: foo\x00Injected: yes\r\n",
    "control-in-value": b"X-A: foo\x0bInjected: yes\r\n",
    "space-in-name": b"X A: foo\r\nInjected: yes\r\n",
    "content-length-not-a-number": b"Content-Length: abc\r\nInjected: yes\r\n",
    "two-different-content-lengths": b"Content-Length: 7\r\nInjected: yes\r\n",
    "content-length-and-chunked": b"Transfer-Encoding: chunked\r\nInjected: yes\r\n",
}


def respond(request: Received) -> bytes | None:
    """The instance: /big is 8 MiB, /r/{case} a malformed head, everything else a small JSON answer."""
    if request.target == "/big":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG
    if request.target.startswith("/r/"):
        case = request.target[3:]
        if case == "content-length-and-chunked":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + BAD_HEADS[case] + b"\r\n2\r\nok\r\n0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + BAD_HEADS[case] + b"Connection: close\r\n\r\nok"
    body = b'{"ok": true}'
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture(scope="module")
def instance(ca: trustme.CA) -> Iterator[RawInstance]:
    inst = RawInstance(server_context(ca.issue_cert("127.0.0.1")), respond)
    yield inst
    inst.close()


@pytest.fixture(scope="module")
def balancer(instance: RawInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    directory: Path = tmp_path_factory.mktemp("client-input")
    config = write_config(
        directory,
        [Spec("127.0.0.1", instance.port, 9999)],
        ALLOWED,
        scanners_count=1,
        # cooldown="0": an instance answer refused as malformed does not keep
        # the next test's requests away from the instance.
        extra='  <Timeouts connect="5" read="2" client="2"/>\n  <Failover cooldown="0"/>\n',
    )
    g = Gunicorn(config, config_port(config), directory / "gunicorn.log").start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def worker_survives(balancer: Gunicorn, instance: RawInstance) -> Iterator[None]:
    """After each test: the same worker, no traceback, and a request still goes through."""
    start = len(balancer.log())
    yield
    log = balancer.log()
    assert log.count("Booting worker") == 1, log
    assert "Worker exiting" not in log, log
    assert "Traceback" not in log[start:], log[start:]
    before = len(instance.requests)
    resp = raw_request(balancer.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (resp.status, resp.json()) == (200, {"ok": True})
    assert [(r.method, r.target, r.complete) for r in instance.requests[before:]] == [("GET", "/a", True)]


def forwarded_headers(request: Received) -> list[tuple[str, str]]:
    """What the client's headers became, less those the balancer sets (Host, X-Forwarded-*)."""
    return [(n, v) for n, v in request.headers if n != "Host" and not n.startswith("X-Forwarded-")]


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send *data* and read until the balancer closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


# -- refused before the application runs ----------------------------------------------------


@dataclass(frozen=True)
class Refused:
    id: str
    head: bytes
    status: int
    title: str
    body: bytes = b""


H = b"Host: x\r\n"
#: A complete second request behind each bad one, on the same connection: if
#: the framing were read another way, it would reach the instance.
SMUGGLED = b"GET /a?smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

REFUSED = [
    # Framing: RFC 9112 section 6.3, a message whose length is ambiguous is an error.
    Refused("content-length-and-chunked", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400, "Bad Request", b"0\r\n\r\n"),
    Refused("chunked-and-content-length", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400, "Bad Request", b"0\r\n\r\n"),
    Refused("two-different-content-lengths", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 0\r\n", 400, "Bad Request", b"hello"),
    Refused("two-equal-content-lengths", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n", 400, "Bad Request", b"hello"),
    Refused("content-length-list", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n", 400, "Bad Request", b"hello"),
    Refused("content-length-negative", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n", 400, "Bad Request", b"hello"),
    Refused("content-length-plus-sign", b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n", 400, "Bad Request", b"hello"),
    Refused("chunked-twice", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n", 400, "Bad Request", b"0\r\n\r\n"),
    Refused("transfer-encoding-not-ending-in-chunked", b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n", 400, "Bad Request", b"hello"),
    Refused("chunked-in-http-1.0", b"POST /a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n", 400, "Bad Request", b"0\r\n\r\n"),
    # Sizes: gunicorn's limit_request_line (4094), limit_request_field_size (8190), limit_request_fields (100).
    Refused("oversized-uri", b"GET /a?" + b"q" * 5000 + b" HTTP/1.1\r\n" + H, 414, "URI Too Long"),
    Refused("oversized-header-line", b"GET /a HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 9000 + b"\r\n", 431, "Request Header Fields Too Large"),
    Refused("too-many-headers", b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-H%d: v\r\n" % i for i in range(120)), 431, "Request Header Fields Too Large"),
    # Tokens.
    Refused("invalid-method-token", b"G(ET /a HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("lower-case-method", b"get /a HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("space-before-colon", b"GET /a HTTP/1.1\r\n" + H + b"X-A : a\r\n", 400, "Bad Request"),
    Refused("http-2.0-on-http-1", b"GET /a HTTP/2.0\r\n" + H, 400, "Bad Request"),
    Refused("two-hosts", b"GET /a HTTP/1.1\r\n" + H + b"Host: other\r\n", 400, "Bad Request"),
    Refused("unknown-expectation", b"POST /a HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 5\r\n", 417, "Expectation Failed", b"hello"),
    # NUL, CR and LF as raw bytes in the path and in header values.
    Refused("nul-in-path", b"GET /a\x00b HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("cr-in-path", b"GET /a\rb HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("lf-in-path", b"GET /a\nX-Injected: 1 HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("crlf-in-path", b"GET /a\r\nX-Injected: 1 HTTP/1.1\r\n" + H, 400, "Bad Request"),
    Refused("nul-in-header-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n", 400, "Bad Request"),
    Refused("cr-in-header-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\rX-Injected: 1\r\n", 400, "Bad Request"),
    Refused("lf-in-header-value", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\nX-Injected: 1\r\n", 400, "Bad Request"),
    Refused("obs-fold-in-header", b"GET /a HTTP/1.1\r\n" + H + b"X-A: a\r\n X-Injected: 1\r\n", 400, "Bad Request"),
    Refused("bare-lf-line-ends", b"GET /a HTTP/1.1\n" + b"Host: x\n", 400, "Bad Request"),
]


REFUSAL_CODES = {
    400: "invalid_request",
    414: "request_line_too_long",
    417: "expectation_failed",
    431: "request_headers_too_large",
    501: "transfer_coding_not_implemented",
}


@pytest.mark.parametrize("row", REFUSED, ids=[r.id for r in REFUSED])
def test_refused_by_gunicorn_and_nothing_forwarded(row: Refused, balancer: Gunicorn, instance: RawInstance) -> None:
    before_requests, before_bytes = len(instance.requests), len(instance.received)
    end = b"\n" if row.head.endswith(b"\n") and not row.head.endswith(b"\r\n") else b"\r\n"
    data = exchange(balancer.port, row.head + end + row.body + SMUGGLED)

    # One answer, then the connection is closed: whatever followed was not read as a request.
    assert data.count(b"HTTP/1.1 ") == 1, data
    resp = read_response_bytes(data)
    assert resp.status == row.status
    # gunicorn's refusals are answered in the balancer's JSON (app.worker), with its status line.
    assert data.startswith(f"HTTP/1.1 {row.status} {row.title}\r\n".encode()), data
    assert resp.header("Content-Type") == "application/json"
    assert resp.json()["error"] == REFUSAL_CODES[row.status]
    assert resp.header("Server") == "ctbalancer"
    assert resp.header("Connection") == "close"
    assert instance.requests[before_requests:] == []
    assert len(instance.received) == before_bytes


def read_response_bytes(data: bytes):
    """Parse one response out of *data* with the suite's raw reader."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return read_response(b)


def test_header_name_with_underscore_is_dropped(balancer: Gunicorn, instance: RawInstance) -> None:
    """gunicorn's header_map="drop": X_A could be read as X-A downstream, so it is not passed on."""
    before = len(instance.requests)
    resp = raw_request(balancer.port, b"GET /a HTTP/1.1\r\nHost: x\r\nX_A: 1\r\nX-B: 2\r\nConnection: close\r\n\r\n")
    assert resp.status == 200
    [got] = instance.requests[before:]
    assert (got.method, got.target, got.complete) == ("GET", "/a", True)
    assert forwarded_headers(got) == [("X-B", "2")]


# -- bodies ---------------------------------------------------------------------------------


def test_expect_100_continue(balancer: Gunicorn, instance: RawInstance) -> None:
    """The client gets 100 Continue before it sends the body; the instance gets the body once, no Expect."""
    before = len(instance.requests)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(
            b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert instance.requests[before:] == []
        sock.sendall(b"hello")
        resp = read_response(sock)
    assert (resp.status, resp.json()) == (200, {"ok": True})
    [got] = instance.requests[before:]
    assert (got.method, got.target, got.body, got.complete) == ("POST", "/a", b"hello", True)
    assert forwarded_headers(got) == [("Content-Type", "text/plain"), ("Content-Length", "5")]
    assert got.head.count(b"hello") == 0


def test_invalid_chunk_size_is_400_and_nothing_forwarded(balancer: Gunicorn, instance: RawInstance) -> None:
    before = len(instance.requests)
    resp = raw_request(
        balancer.port,
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    assert resp.status == 400
    assert resp.json()["error"] == "invalid_request_body"
    assert instance.requests[before:] == []


def test_chunked_body_cut_short_is_400_and_nothing_forwarded(balancer: Gunicorn, instance: RawInstance) -> None:
    """A chunked upload is counted before it is sent, so a cut one never reaches the instance."""
    before = len(instance.requests)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        sock.shutdown(socket.SHUT_WR)
        resp = read_response(sock)
    assert resp.status == 400
    assert resp.json()["error"] == "invalid_request_body"
    assert instance.requests[before:] == []


def test_body_shorter_than_content_length_is_400_and_never_complete(balancer: Gunicorn, instance: RawInstance) -> None:
    """The client half-closes after 5 of 10 bytes: 400, and the instance sees a request cut off, never a complete one."""
    before = len(instance.requests)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhello")
        sock.shutdown(socket.SHUT_WR)
        resp = read_response(sock)
    assert resp.status == 400
    assert resp.json() == {
        "error": "invalid_request_body",
        "description": "The request body ended 5 bytes before its Content-Length.",
    }
    # The body is received whole before an instance is chosen: nothing was sent.
    assert wait_for_requests(instance, before, 1, limit=1.0) == []


def test_client_that_stops_sending_its_body_is_cut_after_the_read_timeout(
    balancer: Gunicorn, instance: RawInstance
) -> None:
    """A stalled upload gets 400 after <Timeouts client="2"/> of silence, and never reached an instance."""
    before = len(instance.requests)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=30) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhello")
        resp = read_response(sock)
        assert sock.recv(1) == b""
    assert resp.status == 400
    body = resp.json()
    assert body["error"] == "invalid_request_body"
    assert body["description"] == "The client sent nothing of its request body for 2 seconds."
    assert wait_for_requests(instance, before, 1, limit=1.0) == []


def test_client_that_goes_away_mid_body_leaves_no_complete_request(balancer: Gunicorn, instance: RawInstance) -> None:
    before = len(instance.requests)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.3)
    assert wait_for_requests(instance, before, 1, limit=1.0) == []


def wait_for_requests(instance: RawInstance, before: int, count: int, limit: float = 10.0) -> list[Received]:
    """The requests after *before*, once *count* have been recorded (bounded wait).

    An incomplete request is recorded when its connection ends, so this also
    waits for the balancer to close the connection to the instance.
    """
    deadline = time.monotonic() + limit
    while len(instance.requests) - before < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return instance.requests[before:]


# -- the client goes away while the answer streams -------------------------------------------


def test_client_that_disconnects_mid_response_frees_the_worker(balancer: Gunicorn, instance: RawInstance) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
            # RST instead of FIN: the harshest way to leave.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # scanners_count is 1: a slot still held by a dead answer would make these 503.
    answers = [
        raw_request(balancer.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").status for _ in range(20)
    ]
    assert answers == [200] * 20


# -- an instance's answer cannot split the client's --------------------------------------------


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_malformed_answer_head_is_502_and_injects_nothing(case: str, balancer: Gunicorn, instance: RawInstance) -> None:
    before = len(instance.requests)
    resp = raw_request(balancer.port, f"GET /r/{case} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert resp.all("Injected") == []
    assert resp.all("X-A") == []
    assert resp.status == 502
    assert resp.header("Content-Type") == "application/json"
    body = resp.json()
    assert (body["error"], body["host"], body["port"]) == ("instance_failed", "127.0.0.1", instance.port)
    assert re.fullmatch(r"The instance 127\.0\.0\.1:\d+ failed after the request was sent: .+\.", body["description"])
    assert [(r.method, r.target) for r in instance.requests[before:]] == [("GET", f"/r/{case}")]
