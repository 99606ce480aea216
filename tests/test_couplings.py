"""Each private name or undocumented behaviour of a dependency the code relies on (docs/design.md, "Couplings").

One test per coupling, against the installed library: when an upgrade changes
what the code relies on, the test names it before the balancer misbehaves.
"""

from __future__ import annotations

import http.client
import inspect
import io
import socket
import threading

import gunicorn.http.wsgi
import gunicorn.util
import pytest
import requests
import urllib3
import urllib3.exceptions
from gunicorn.config import Config as GunicornConfig
from gunicorn.http.message import Request as GunicornRequest
from gunicorn.http.parser import RequestParser
from gunicorn.workers.ggevent import GeventWorker
from requests.models import PreparedRequest
from urllib3.connectionpool import HTTPSConnectionPool

from app.strict_head import StrictHTTPResponse
from app.upstream import _innermost

pytestmark = pytest.mark.unit


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *_args: object, **_kwargs: object) -> io.BytesIO:
        return self._file


HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n{}"
)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_http_client_begin_attributes_match_strict_head(method: str) -> None:
    """app.strict_head overrides HTTPResponse._read_status and begin(), and reads _method: same results."""
    assert callable(getattr(http.client.HTTPResponse, "_read_status", None))
    plain = http.client.HTTPResponse(_FakeSocket(HEAD), method=method)  # type: ignore[arg-type]
    strict = StrictHTTPResponse(_FakeSocket(HEAD), method=method)  # type: ignore[arg-type]
    assert strict._method == method  # type: ignore[attr-defined]
    plain.begin()
    strict.begin()
    for name in ("status", "reason", "version", "chunked", "chunk_left", "length", "will_close"):
        assert getattr(strict, name) == getattr(plain, name), name
    assert strict.headers.items() == plain.headers.items()


def test_urllib3_pool_get_conn_and_closed_pool() -> None:
    """app.pinning overrides HTTPSConnectionPool._get_conn(timeout) and tests pool.pool is None after close()."""
    assert list(inspect.signature(HTTPSConnectionPool._get_conn).parameters) == ["self", "timeout"]
    pool = HTTPSConnectionPool("127.0.0.1", 1, maxsize=1)
    assert pool.pool is not None
    pool.close()
    assert pool.pool is None


def test_urllib3_new_connection_error_is_a_connect_timeout_error() -> None:
    """app.pinning.describe_connect tests NewConnectionError before ConnectTimeoutError for this reason."""
    assert issubclass(urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)


def test_urllib3_response_length_remaining() -> None:
    """app.upstream.read_small reads HTTPResponse.length_remaining to decide whether to read a body whole."""
    response = urllib3.HTTPResponse(body=io.BytesIO(b"abc"), headers={"Content-Length": "3"}, preload_content=False)
    assert response.length_remaining == 3
    assert response.read(decode_content=False) == b"abc"
    assert response.length_remaining == 0


def test_requests_exception_args_carry_the_urllib3_error() -> None:
    """app.upstream._innermost walks requests' args[0] and ProtocolError's args[1] to the OS error."""

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()  # no answer: the shape of a keep-alive race

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        adapter = requests.adapters.HTTPAdapter(max_retries=0)
        prepared = PreparedRequest()
        prepared.prepare(method="GET", url=f"http://127.0.0.1:{listener.getsockname()[1]}/")
        with pytest.raises(requests.ConnectionError) as info:
            adapter.send(prepared, timeout=5)
    assert isinstance(info.value.args[0], urllib3.exceptions.ProtocolError)
    assert isinstance(_innermost(info.value), http.client.RemoteDisconnected)


def test_requests_sends_a_plain_dict_of_headers_once_each() -> None:
    """app.upstream.Outgoing.prepare gives PreparedRequest.headers a plain dict, not a CaseInsensitiveDict."""
    seen: list[bytes] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        seen.append(conn.recv(65536))
        conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        conn.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        prepared = PreparedRequest()
        prepared.method = "GET"
        prepared.url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
        prepared.headers = {"Host": "instance", "X-A": "1", "User-Agent": urllib3.util.SKIP_HEADER}  # type: ignore[assignment]
        prepared.body = None
        response = requests.adapters.HTTPAdapter(max_retries=0).send(prepared, timeout=5)
    assert response.status_code == 204
    head = seen[0].decode("latin-1").lower()
    assert head.count("\r\nhost: instance\r\n") == 1 and head.count("\r\nx-a: 1\r\n") == 1
    assert "user-agent" not in head


def _gunicorn_request(data: bytes) -> tuple[GunicornRequest, RequestParser]:
    cfg = GunicornConfig()
    parser = RequestParser(cfg, iter([data]), ("127.0.0.1", 1))
    return next(parser), parser


def test_gunicorn_environ_carries_the_socket_it_was_given() -> None:
    """app.proxy reaches app.worker.PacedSocket through environ["gunicorn.socket"]."""
    req, _ = _gunicorn_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    marker = object()
    _resp, environ = gunicorn.http.wsgi.create(req, marker, ("127.0.0.1", 1), ("127.0.0.1", 2), GunicornConfig())
    assert environ["gunicorn.socket"] is marker


def test_gunicorn_request_must_close_closes_the_connection() -> None:
    """PacedSocket.close_after_response sets Request.must_close; Response.should_close honours it."""
    req, _ = _gunicorn_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = gunicorn.http.wsgi.Response(req, None, GunicornConfig())
    resp.response_length = 0
    assert resp.should_close() is False
    req.must_close = True
    assert resp.should_close() is True


def test_gunicorn_server_header_comes_from_the_module_attribute() -> None:
    """app.worker sets gunicorn.http.wsgi.SERVER; Response reads it when it is created."""
    req, _ = _gunicorn_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    saved = gunicorn.http.wsgi.SERVER
    try:
        gunicorn.http.wsgi.SERVER = "ctbalancer"
        assert gunicorn.http.wsgi.Response(req, None, GunicornConfig()).version == "ctbalancer"
    finally:
        gunicorn.http.wsgi.SERVER = saved


def test_gunicorn_parser_keeps_pipelined_bytes_in_unreader_buf() -> None:
    """app.worker looks at parser.unreader.buf to know a pipelined request is already read."""
    data = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    req, parser = _gunicorn_request(data)
    assert req.path == "/a"
    assert isinstance(parser.unreader.buf, io.BytesIO)
    assert parser.unreader.buf.getvalue().startswith(b"GET /b")


def test_gunicorn_worker_hooks_keep_their_signatures() -> None:
    """app.worker.BalancerWorker replaces handle() and calls handle_request() and util.write_nonblock()."""
    assert list(inspect.signature(GeventWorker.handle).parameters) == ["self", "listener", "client", "addr"]
    assert list(inspect.signature(GeventWorker.handle_request).parameters) == ["self", "listener_name", "req", "sock", "addr"]
    assert list(inspect.signature(gunicorn.util.write_nonblock).parameters)[:2] == ["sock", "data"]


def test_gevent_socket_send_takes_a_timeout() -> None:
    """app.worker.PacedSocket calls send(data, timeout=...), a gevent extension of the socket API."""
    import gevent.socket
    import gevent.ssl

    for cls in (gevent.socket.socket, gevent.ssl.SSLSocket):
        assert "timeout" in inspect.signature(cls.send).parameters


def test_gevent_stream_server_wraps_through_the_context() -> None:
    """app.tls defers the handshake by overriding SSLContext.wrap_socket, which gevent's server calls."""
    import gevent.server

    source = inspect.getsource(gevent.server.StreamServer)
    assert "self.wrap_socket = ssl_context.wrap_socket" in source


def test_gunicorn_uses_its_c_parser() -> None:
    """gunicorn.conf.py requires http_parser "fast": gunicorn-h1c must be installed and accepted by gunicorn."""
    from gunicorn.http.message import _check_fast_parser

    cfg = GunicornConfig()
    cfg.set("http_parser", "fast")
    assert _check_fast_parser(cfg) is True


def test_urllib3_reads_every_answer_through_the_connections_getresponse() -> None:
    """PinningHTTPSConnection.getresponse asks for quick ACKs: urllib3 must call it, without arguments, per request."""
    source = inspect.getsource(HTTPSConnectionPool._make_request)
    assert "conn.getresponse()" in source


def test_ack_at_once_sets_tcp_quickack_on_a_tcp_socket() -> None:
    from app.pinning import ack_at_once

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            ack_at_once(client)
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    a, b = socket.socketpair()  # not TCP: nothing to do, and no error
    with a, b:
        ack_at_once(a)
    ack_at_once(None)
