"""Forwarding through a real gunicorn balancer to real HTTPS instances (docs/design.md, "Which requests pass")."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from pathlib import Path

import pytest
from werkzeug import Request, Response

from .support import Spec, get, raw_request, read_response, write_config

ALLOWED = (
    ("GET", "/api/v.1.1/suppliers"),
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/v.1.1/stream"),
    ("GET", "/api/v.1.1/gzip"),
    ("GET", "/api/v.1.1/cookies"),
    ("GET", "/api/v.1.1/redirect"),
    ("GET", "/api/v.1.1/teapot"),
    ("GET", "/api/v.1.1/slow"),
)


@pytest.fixture
def instance(make_instance):
    return make_instance()


@pytest.fixture
def balancer(tmp_path, instance, start_balancer):
    return start_balancer(write_config(tmp_path, [instance], ALLOWED, extra='  <Timeouts connect="2" read="2"/>\n'))


def seen_headers(req: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in req.headers.items()}


def test_headers_are_forwarded_less_hop_by_hop_with_forwarded_fields(instance, balancer):
    instance.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"ok": True})
    resp = get(
        balancer.port,
        "/api/v.1.1/suppliers?b=2&a=1&a=0",
        headers={
            "Authorization": "Bearer s3cr3t",
            "Connection": "close, X-Hop",
            "X-Hop": "per-hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Connection": "keep-alive",
            "X-Custom": "kept",
            "X-Forwarded-For": "198.51.100.7",
        },
    )
    assert resp.status == 200
    (req,) = instance.requests
    assert req.environ["REQUEST_URI"] == "/api/v.1.1/suppliers?b=2&a=1&a=0"
    assert seen_headers(req) == {
        "host": f"127.0.0.1:{instance.port}",
        "authorization": "Bearer s3cr3t",
        "x-custom": "kept",
        # The peer is no FrontProxy: the chain it sent is forged as far as the balancer knows.
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-host": f"127.0.0.1:{balancer.port}",
    }


def test_client_accept_encoding_and_user_agent_go_on_unchanged(instance, balancer):
    instance.server.expect_request("/api/v.1.1/suppliers").respond_with_json({})
    get(balancer.port, "/api/v.1.1/suppliers", headers={"User-Agent": "siem/1.0", "Accept-Encoding": "gzip"})
    headers = seen_headers(instance.requests[0])
    assert headers["user-agent"] == "siem/1.0"
    assert headers["accept-encoding"] == "gzip"


def test_body_with_content_length(instance, balancer):
    instance.server.expect_request("/api/v2/lookup", method="POST").respond_with_data("looked up")
    body = b'{"url": "http://example.test/"}' * 1000
    resp = get(balancer.port, "/api/v2/lookup", method="POST", body=body, headers={"Content-Type": "application/json"})
    assert (resp.status, resp.body) == (200, b"looked up")
    (req,) = instance.requests
    assert req.get_data() == body
    assert req.headers["Content-Length"] == str(len(body))
    assert req.headers["Content-Type"] == "application/json"
    assert "Transfer-Encoding" not in req.headers


def test_chunked_upload_arrives_with_content_length(instance, balancer):
    instance.server.expect_request("/api/v2/lookup", method="POST").respond_with_data("ok")
    parts = [b"a" * 10, b"b" * 70000, b"c"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    resp = raw_request(
        balancer.port,
        b"POST /api/v2/lookup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
    )
    assert (resp.status, resp.body) == (200, b"ok")
    (req,) = instance.requests
    assert req.get_data() == b"".join(parts)
    assert req.headers["Content-Length"] == str(70011)
    assert "Transfer-Encoding" not in req.headers


def test_answer_relayed_byte_for_byte_gzip_not_decoded(instance, balancer):
    payload = gzip.compress(b'{"suppliers": []}' * 100)
    instance.server.expect_request("/api/v.1.1/gzip").respond_with_response(
        Response(payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    )
    resp = get(balancer.port, "/api/v.1.1/gzip", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert resp.body == payload
    assert resp.header("Content-Encoding") == "gzip"
    assert resp.header("Content-Length") == str(len(payload))


def test_status_and_duplicate_set_cookie_kept_no_cookie_jar(instance, balancer):
    instance.server.expect_request("/api/v.1.1/cookies").respond_with_response(
        Response("brewing", status=418, headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")])
    )
    first = get(balancer.port, "/api/v.1.1/cookies")
    second = get(balancer.port, "/api/v.1.1/cookies")
    assert (first.status, first.body) == (418, b"brewing")
    assert first.all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert second.all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    # What one client was given is never sent on behalf of another.
    assert [r.headers.get("Cookie") for r in instance.requests] == [None, None]


def test_redirect_relayed_not_followed(instance, balancer):
    instance.server.expect_request("/api/v.1.1/redirect").respond_with_response(
        Response("moved", status=302, headers={"Location": "https://elsewhere.test/x"})
    )
    resp = get(balancer.port, "/api/v.1.1/redirect")
    assert (resp.status, resp.body, resp.header("Location")) == (302, b"moved", "https://elsewhere.test/x")
    assert len(instance.requests) == 1


def test_head_is_forwarded_as_head(instance, balancer):
    instance.server.expect_request("/api/v.1.1/suppliers", method="HEAD").respond_with_response(
        Response(b"z" * 1234, content_type="application/json")
    )
    resp = get(balancer.port, "/api/v.1.1/suppliers", method="HEAD")
    assert resp.status == 200
    assert resp.header("Content-Length") == "1234"
    assert [r.method for r in instance.requests] == ["HEAD"]


def _worker_rss_kib(master_pid: int) -> int:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    (worker,) = children
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_answer_is_streamed_without_growing_memory(instance, balancer):
    size = 256 * 1024 * 1024
    block = b"x" * 65536

    def stream(_request: Request) -> Response:
        return Response((block for _ in range(size // len(block))), headers={"Content-Length": str(size)})

    instance.server.expect_request("/api/v.1.1/stream").respond_with_handler(stream)
    get(balancer.port, "/api/v.1.1/suppliers")  # warm the worker up (imports, first connection)
    before = _worker_rss_kib(balancer.proc.pid)
    with socket.create_connection(("127.0.0.1", balancer.port)) as sock:
        sock.sendall(b"GET /api/v.1.1/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    after = _worker_rss_kib(balancer.proc.pid)
    assert received > size  # headers plus the whole body
    assert after - before < 10 * 1024, f"worker RSS grew by {after - before} KiB"


def test_instance_connection_released_when_client_goes_away(instance, balancer):
    finished = threading.Event()

    def endless(_request: Request) -> Response:
        def body():
            try:
                while True:
                    yield b"y" * 65536
                    time.sleep(0.001)
            finally:
                finished.set()

        return Response(body())

    instance.server.expect_request("/api/v.1.1/stream").respond_with_handler(endless)
    with socket.create_connection(("127.0.0.1", balancer.port)) as sock:
        sock.sendall(b"GET /api/v.1.1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        while got < 1 << 20:
            got += len(sock.recv(65536))
    # The instance's generator stops once the balancer drops its connection.
    assert finished.wait(20), "the instance kept streaming after the client left"


def test_instance_down_gives_503_with_retry_after(tmp_path, start_balancer):
    from .support import free_port

    balancer = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", free_port())]))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert resp.status == 503
    # Every instance is now cooling down (Failover cooldown, default 10 s): retry when the first is tried again.
    assert resp.header("Retry-After") == "10"
    assert resp.header("Content-Type") == "application/json"
    body = resp.json()
    assert body["error"] == "no_instance_available"
    assert "connection refused" in body["description"]
    assert not (tmp_path / "certs").exists() or not list((tmp_path / "certs").glob("*.pem"))


def test_slow_instance_gives_504(instance, balancer):
    def slow(_request: Request) -> Response:
        time.sleep(4)
        return Response("late")

    instance.server.expect_request("/api/v.1.1/slow").respond_with_handler(slow)
    resp = get(balancer.port, "/api/v.1.1/slow")
    assert resp.status == 504
    assert resp.json() == {
        "error": "instance_timeout",
        "description": f"The instance 127.0.0.1:{instance.port} did not answer in time.",
        "host": "127.0.0.1",
        "port": instance.port,
    }
