"""Hostile clients against a real gunicorn balancer (docs/design.md, "Hostile clients").

Each test plays one attack found against the balancer and asserts the fixed
behaviour: slow bodies and slow readers hold no instance slot, idle and
trickling connections are cut after ``Timeouts client``, bodies are bounded,
no client rewrites the request the rules matched, the balancer's own pages
answer operators only, and a refused connection costs one log line.
Every client here talks to loopback only and stops by itself.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from werkzeug import Request, Response

from .support import Gunicorn, RawResponse, get, raw_request, read_response, write_config

SUPPLIERS = "/api/v.1.1/suppliers"
ALLOWED = (
    ("GET", SUPPLIERS),
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/v.1.1/big"),
    ("GET", "/api/v.1.1/huge"),
)


@pytest.fixture
def instance(make_instance):
    inst = make_instance()
    inst.server.expect_request(SUPPLIERS).respond_with_json({"suppliers": []})
    inst.server.expect_request("/api/v.1.1/lookup", method="POST").respond_with_handler(
        lambda req: Response(b'{"matched": %d}' % len(req.get_data()), content_type="application/json")
    )
    inst.server.expect_request("/api/v.1.1/big").respond_with_data(b"x" * BIG, content_type="application/octet-stream")
    inst.server.expect_request("/api/v.1.1/huge").respond_with_data(b"h" * HUGE, content_type="application/octet-stream")
    return inst


BIG = 4 * 1024 * 1024
#: More than loopback's socket buffers hold: a client that stops reading it really stops the sender.
HUGE = 48 * 1024 * 1024


def small_window_client(port: int) -> socket.socket:
    """A connection whose receive buffer is small from the handshake on."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def balancer_tls(tmp_path: Path, ca) -> tuple[Path, Path]:
    own = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "balancer_cert.pem", tmp_path / "balancer_key.pem"
    own.cert_chain_pems[0].write_to_path(str(cert))
    own.private_key_pem.write_to_path(str(key))
    return cert, key


def client_context(**kwargs) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, value in kwargs.items():
        setattr(context, name, value)
    return context


def https_get(port: int, target: str = SUPPLIERS, timeout: float = 10.0) -> RawResponse:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with client_context().wrap_socket(sock) as tls:
            tls.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            return read_response(tls)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def ends_within(sock: socket.socket, limit: float) -> bool:
    """Read until the peer ends the connection (True), or *limit* seconds pass (False)."""
    deadline = time.monotonic() + limit
    sock.setblocking(True)
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


# -- instance slots are for instances --------------------------------------------------------


def test_slow_uploads_and_slow_readers_hold_no_instance_slot(tmp_path, instance, start_balancer):
    """Enough slow clients to hold every slot of the old balancer; every normal request is still 200 at once.

    scanners_count is 2 and the queue 1 s: before bodies and answers were held
    by the balancer, 4 slow uploads and 4 clients that never read a 48 MiB answer
    took both slots and every other request got 503.
    """
    config = write_config(
        tmp_path,
        [instance],
        ALLOWED,
        scanners_count=2,
        extra='  <Timeouts queue="1" client="20"/>\n  <Failover buffer_bytes="65536"/>\n',
    )
    balancer = start_balancer(config)
    hostile: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=10)
            sock.sendall(b"POST /api/v.1.1/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
            hostile.append(sock)
        for _ in range(4):
            sock = small_window_client(balancer.port)
            sock.sendall(b"GET /api/v.1.1/huge HTTP/1.1\r\nHost: x\r\n\r\n")
            hostile.append(sock)

        def trickle() -> None:
            while not stop.wait(0.5):
                for sock in hostile[:4]:
                    sock.sendall(b"x")

        dribbler = threading.Thread(target=trickle, daemon=True)
        dribbler.start()
        time.sleep(1.0)  # every slow client is in: the old balancer had no slot left now
        statuses = [get(balancer.port, SUPPLIERS).status for _ in range(20)]
        lookups = [get(balancer.port, "/api/v.1.1/lookup", method="POST", body=b"abc") for _ in range(5)]
    finally:
        stop.set()
        for sock in hostile:
            sock.close()
    assert statuses == [200] * 20
    assert [(r.status, r.body) for r in lookups] == [(200, b'{"matched": 3}')] * 5
    # The slow uploads never reached the instance: only the 5 whole lookups did.
    assert sum(1 for req in instance.requests if req.path == "/api/v.1.1/lookup") == 5


def test_large_answer_is_relayed_whole_to_a_reader_that_keeps_up(tmp_path, instance, start_balancer):
    """The buffered relay keeps an answer byte for byte, past memory and through the disk spool."""
    config = write_config(tmp_path, [instance], ALLOWED, extra='  <Failover buffer_bytes="65536"/>\n')
    balancer = start_balancer(config)
    resp = get(balancer.port, "/api/v.1.1/big")
    assert resp.status == 200
    assert resp.body == b"x" * BIG


def test_body_over_the_limit_is_413_and_nothing_is_sent(tmp_path, instance, start_balancer):
    config = write_config(tmp_path, [instance], ALLOWED, extra='  <Limits body_bytes="1000"/>\n')
    balancer = start_balancer(config)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v.1.1/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        resp = read_response(sock)
    assert resp.status == 413
    assert resp.json() == {
        "error": "request_too_large",
        "description": "The request body is 1001 bytes; the balancer accepts at most 1000 (Limits body_bytes).",
    }
    assert resp.header("Connection") == "close"
    ok = get(balancer.port, "/api/v.1.1/lookup", method="POST", body=b"y" * 1000)
    assert (ok.status, ok.body) == (200, b'{"matched": 1000}')
    assert [req.path for req in instance.requests] == ["/api/v.1.1/lookup"]


def spool_sizes(pid: int, spool: Path) -> int:
    """Total size of the deleted temporary files worker *pid* holds open under *spool*.

    Only deleted (anonymous) files: the runtime directory, made under TMPDIR too, holds the
    workers' shared files, which are no spool.
    """
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(spool)) and target.endswith(" (deleted)"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


def worker_pids(balancer: Gunicorn) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", balancer.log())]


def test_huge_chunked_upload_is_refused_with_413_and_bounded_disk(tmp_path, instance, start_balancer):
    """A 300 MiB chunked upload: 413 once it passes Limits body_bytes, and less than that ever on disk."""
    spool = tmp_path / "spool"
    spool.mkdir()
    limit = 4 * 1024 * 1024
    config = write_config(
        tmp_path, [instance], ALLOWED, extra=f'  <Limits body_bytes="{limit}"/>\n  <Failover buffer_bytes="65536"/>\n'
    )
    balancer = start_balancer(config, TMPDIR=str(spool))
    (pid,) = worker_pids(balancer)
    largest = 0
    sending = threading.Event()
    sending.set()

    def watch() -> None:
        nonlocal largest
        while sending.is_set():
            largest = max(largest, spool_sizes(pid, spool))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent = 0
    chunk = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        sock.sendall(b"POST /api/v.1.1/lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 300 * 1024 * 1024:
                sock.sendall(chunk)
                sent += 0x10000
        except OSError:
            pass
        resp = read_response(sock)
    sending.clear()
    watcher.join()
    assert resp.status == 413
    assert resp.json()["error"] == "request_too_large"
    assert sent < 64 * 1024 * 1024, "the balancer kept reading long after the limit"
    assert 0 < largest <= limit
    assert spool_sizes(pid, spool) == 0
    assert [req.path for req in instance.requests] == []


def test_transfer_coding_other_than_chunked_is_501(tmp_path, instance, start_balancer):
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    resp = raw_request(
        balancer.port,
        b"POST /api/v.1.1/lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    assert resp.status == 501
    assert resp.header("Content-Type") == "application/json"
    assert resp.json()["error"] == "transfer_coding_not_implemented"
    assert instance.requests == []


# -- slow clients are cut ---------------------------------------------------------------------


def test_idle_tls_connections_are_closed_after_timeouts_client(tmp_path, ca, instance, start_balancer):
    """2,000 TCP connections that never start a handshake: all closed within client + 2 s; a normal request is served."""
    config = write_config(
        tmp_path, [instance], ALLOWED, workers=2, tls=balancer_tls(tmp_path, ca), extra='  <Timeouts client="2"/>\n'
    )
    balancer = start_balancer(config, scheme="https")
    selector = selectors.DefaultSelector()
    idle: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(2000):
            sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=5)
            sock.setblocking(False)
            idle.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        opened = time.monotonic()
        normal = https_get(balancer.port, timeout=15)
        open_left = set(idle)
        deadline = opened + 2 + 2
        while open_left and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj in open_left and closed_by_peer(key.fileobj):  # type: ignore[arg-type]
                    open_left.discard(key.fileobj)  # type: ignore[arg-type]
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
        for sock in idle:
            sock.close()
    assert normal.status == 200
    assert len(open_left) == 0, f"{len(open_left)} idle connections still open {time.monotonic() - started:.1f}s in"
    assert "Traceback" not in balancer.log()


def test_slowloris_head_is_cut_after_timeouts_client(tmp_path, instance, start_balancer):
    """A head sent one byte at a time, on a new and on a kept-alive connection, is cut after Timeouts client."""
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED, extra='  <Timeouts client="2"/>\n'))
    for keep_alive_first in (False, True):
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
            if keep_alive_first:
                sock.sendall(f"GET {SUPPLIERS} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert read_response(sock).status == 200
            started = time.monotonic()
            cut = None
            for byte in b"GET " + SUPPLIERS.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
                try:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.25)
                    sock.setblocking(False)
                    if closed_by_peer(sock):
                        cut = time.monotonic() - started
                        break
                finally:
                    sock.setblocking(True)
            assert cut is not None and 1.5 <= cut <= 4.0, cut


def test_client_that_stops_reading_is_cut_and_frees_its_slot(tmp_path, instance, start_balancer):
    """A client that never reads a 48 MiB answer: the instance's slot is free at once, the client cut after client s."""
    config = write_config(
        tmp_path, [instance], ALLOWED, scanners_count=1, extra='  <Timeouts queue="0" client="2"/>\n'
    )
    balancer = start_balancer(config)
    with small_window_client(balancer.port) as sock:
        sock.sendall(b"GET /api/v.1.1/huge HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)
        # scanners_count is 1 and the queue 0: a held slot would make this 503.
        assert get(balancer.port, SUPPLIERS).status == 200
        # Reading would let the balancer write on: watch its log instead (bounded wait; the
        # cut comes Timeouts client after the socket buffers filled up).
        deadline = time.monotonic() + 20
        while "read nothing of its answer for 2s" not in balancer.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "read nothing of its answer for 2s" in balancer.log()
        # What the kernel still held for us arrives as we read, then the end of the connection.
        assert ends_within(sock, 30)
    assert "Traceback" not in balancer.log()


# -- no client rewrites the request -----------------------------------------------------------


def test_script_name_and_path_info_headers_cannot_shorten_the_matched_path(tmp_path, instance, start_balancer):
    """gunicorn's forwarder headers from 127.0.0.1: 404, and nothing reaches the instance."""
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    for headers in ({"SCRIPT_NAME": "/admin/delete-all"}, {"PATH_INFO": SUPPLIERS}):
        resp = get(balancer.port, "/admin/delete-all" + SUPPLIERS, headers=headers)
        assert resp.status == 404
        assert resp.json()["error"] == "request_not_allowed"
        resp = get(balancer.port, "/admin/delete-all" + SUPPLIERS, method="POST", headers=headers, body=b"x")
        assert resp.status == 404
    assert instance.requests == []


REWRITERS = {
    "Forwarded": "for=10.9.9.9;proto=https",
    "X-Real-IP": "10.9.9.9",
    "X-Forwarded-Port": "8443",
    "X-Forwarded-Prefix": "/admin",
    "X-Original-URL": "/admin/delete-all",
    "X-Rewrite-URL": "/admin/delete-all",
    "X-HTTP-Method-Override": "DELETE",
    "X-HTTP-Method": "DELETE",
    "X-Method-Override": "DELETE",
    "X-Forwarded-For": "10.9.9.9",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
}


def forwarded_headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower() != "host"}


def test_headers_that_rewrite_the_request_never_reach_an_instance(tmp_path, instance, start_balancer):
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    resp = get(balancer.port, SUPPLIERS, headers=REWRITERS)
    assert resp.status == 200
    (req,) = instance.requests
    assert forwarded_headers(req) == {
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": f"127.0.0.1:{balancer.port}",
    }


def test_a_configured_front_proxy_may_extend_x_forwarded_for_and_say_https(tmp_path, instance, start_balancer):
    config = write_config(tmp_path, [instance], ALLOWED, extra='  <FrontProxy allow="127.0.0.1"/>\n')
    balancer = start_balancer(config)
    resp = get(balancer.port, SUPPLIERS, headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"})
    assert resp.status == 200
    (req,) = instance.requests
    headers = forwarded_headers(req)
    assert headers["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"


@pytest.mark.parametrize("host", [b"a b", b"\xff", b"x/y", b"x@y"])
def test_host_that_names_no_host_is_400(tmp_path, instance, start_balancer, host):
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    resp = raw_request(balancer.port, b"GET " + SUPPLIERS.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert resp.status == 400
    assert resp.json()["error"] in ("invalid_host", "invalid_request")
    assert instance.requests == []


# -- the balancer's own pages -----------------------------------------------------------------


def get_from(address: str, port: int, target: str, extra: str = "") -> RawResponse:
    """GET *target* from a client socket bound to *address* (127.0.0.2 plays a second machine)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
        return read_response(sock)


def test_status_answers_admin_addresses_only_and_health_answers_everyone(tmp_path, instance, start_balancer):
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    refused = get_from("127.0.0.2", balancer.port, "/_balancer/status")
    assert refused.status == 403
    assert refused.json() == {
        "error": "forbidden",
        "description": "/_balancer/status may be read from the addresses of <Admin allow> only.",
    }
    assert get_from("127.0.0.1", balancer.port, "/_balancer/status").status == 200
    assert get_from("127.0.0.2", balancer.port, "/_balancer/health").status == 200
    # X-Forwarded-For never decides.
    forged = get_from("127.0.0.2", balancer.port, "/_balancer/status", "X-Forwarded-For: 127.0.0.1\r\n")
    assert forged.status == 403


def test_admin_allow_replaces_the_default(tmp_path, instance, start_balancer):
    config = write_config(tmp_path, [instance], ALLOWED, extra='  <Admin allow="127.0.0.2/32"/>\n')
    balancer = start_balancer(config)
    assert get_from("127.0.0.2", balancer.port, "/_balancer/status").status == 200
    assert get_from("127.0.0.1", balancer.port, "/_balancer/status").status == 403


# -- TLS and logs ----------------------------------------------------------------------------


def test_failed_handshakes_cost_one_log_line_each(tmp_path, ca, instance, start_balancer):
    config = write_config(tmp_path, [instance], ALLOWED, tls=balancer_tls(tmp_path, ca))
    balancer = start_balancer(config, scheme="https")
    assert https_get(balancer.port).status == 200  # the reference is learned (one log line) before counting
    before = balancer.log().count("\n")
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                sock.recv(1024)
            except OSError:
                pass
    assert https_get(balancer.port).status == 200
    time.sleep(0.3)
    log = balancer.log()
    added = log.count("\n") - before
    assert added <= 200, log[-3000:]
    assert log.count("TLS handshake with 127.0.0.1:") == 200
    assert "Traceback" not in log


def test_default_tls_refuses_cbc_suites_and_tls_1_1(tmp_path, ca, instance, start_balancer):
    config = write_config(tmp_path, [instance], ALLOWED, tls=balancer_tls(tmp_path, ca))
    balancer = start_balancer(config, scheme="https")
    cbc = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA:AES128-SHA")
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLError):
            cbc.wrap_socket(sock).close()
    gcm = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        with gcm.wrap_socket(sock) as tls:
            assert tls.version() == "TLSv1.2"
            assert "GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0]


def test_tls_min_version_1_3(tmp_path, ca, instance, start_balancer):
    config = write_config(
        tmp_path, [instance], ALLOWED, tls=balancer_tls(tmp_path, ca), extra='  <TLS min_version="1.3"/>\n'
    )
    balancer = start_balancer(config, scheme="https")
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLError):
            client_context(maximum_version=ssl.TLSVersion.TLSv1_2).wrap_socket(sock).close()
    assert https_get(balancer.port).status == 200


def test_server_header_names_the_balancer(tmp_path, instance, start_balancer):
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    resp = get(balancer.port, SUPPLIERS)
    assert resp.all("Server") == ["ctbalancer"]


def test_invalid_requests_cost_one_short_log_line_each(tmp_path, instance, start_balancer):
    """gunicorn quoted a whole invalid header (up to 4 KB) in its log; here each refusal is one line of bounded length."""
    balancer = start_balancer(write_config(tmp_path, [instance], ALLOWED))
    before = balancer.log()
    for _ in range(50):
        resp = raw_request(balancer.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01" + b"N" * 4000 + b": v\r\n\r\n")
        assert resp.status == 400
        assert resp.json()["error"] == "invalid_request"
    time.sleep(0.3)
    added = balancer.log()[len(before):].splitlines()
    refusals = [line for line in added if "invalid request from 127.0.0.1:" in line]
    assert len(refusals) == 50, added[:3]
    assert all(len(line) < 400 for line in refusals), refusals[0]
    # Nothing else but the worker's own start-up warnings (plain HTTP), never a traceback.
    assert [line for line in added if line not in refusals and "app.factory" not in line] == []
