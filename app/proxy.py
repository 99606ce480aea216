"""The Flask blueprint: AllowedRequests as rules, the forwarding view, and JSON errors.

Steps of one request: check the raw target, match it against the rules,
read the body as framed (held when it may be sent again), hand it to
:func:`app.failover.exchange`, relay the answer as sent.
"""

from __future__ import annotations

import logging
import tempfile
from typing import IO, Iterator

from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.routing import Map, RequestRedirect

from . import routing
from .config import Config
from .failover import exchange
from .errors import (
    BalancerError,
    MethodNotAllowed,
    RequestBodyInvalid,
    RequestNotAllowed,
)
from .headers import request_headers, response_headers
from .status import ReservedPaths
from .upstream import Answer, Balancer, Outgoing

log = logging.getLogger(__name__)

EXTENSION = "ctbalancer"
#: app.extensions key of the (rule, method) pairs whose requests may be sent again.
REPEATABLE = "ctbalancer.repeatable"
#: app.extensions key of a Map of the rules that do not end in '/' (see _match_shadowed).
SLASHLESS = "ctbalancer.slashless"
ENDPOINT = "forward"

#: Bytes read from a client's body at a time.
RELAY_CHUNK = 64 * 1024
#: Bytes read from an instance per write to the client, at most. Each chunk
#: costs a pass through urllib3, werkzeug and gunicorn and a send: a 1 MB
#: answer in 64 KiB chunks spent about a tenth of its CPU on that (issue #6).
#: A small answer is read whole whatever this is (http.client stops at its
#: Content-Length), so this only bounds the memory of a large one in flight.
ANSWER_CHUNK = 256 * 1024
#: A chunked upload is counted before it is sent with a Content-Length; up to
#: this size it stays in memory, beyond it spills to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024


class RelayedResponse(Response):
    """A response that adds nothing: no default Content-Type, no computed length."""

    default_mimetype = None
    automatically_set_content_length = False

    def get_wsgi_headers(self, environ: dict) -> Headers:
        """The headers as they are, unless werkzeug has something to change.

        werkzeug copies the headers of every response to rewrite Location and
        Content-Location and to drop what 1xx, 204 and 304 answers must not
        carry; an answer with none of those needs no copy (issue #6).
        """
        status = self.status_code
        if 100 <= status < 200 or status in (204, 304):
            return super().get_wsgi_headers(environ)
        for name, _value in self.headers:
            if name.lower() in _REWRITTEN_BY_WERKZEUG:
                return super().get_wsgi_headers(environ)
        return self.headers


_REWRITTEN_BY_WERKZEUG = frozenset({"location", "content-location"})


def make_blueprint(config: Config) -> Blueprint:
    """A blueprint with one rule per AllowedRequests entry, all served by :func:`forward`."""
    bp = Blueprint("proxy", __name__)
    for allowed in config.allowed:
        # provide_automatic_options=False: OPTIONS passes only where listed.
        bp.add_url_rule(
            routing.to_rule(allowed.path),
            endpoint=ENDPOINT,
            view_func=forward,
            methods=[allowed.method],
            provide_automatic_options=False,
        )
    bp.before_app_request(check_request)
    bp.app_errorhandler(BalancerError)(render_error)
    bp.app_errorhandler(HTTPException)(render_http_exception)
    return bp


def check_request() -> None:
    """Refuse, before any view runs, what must not reach an instance."""
    g.target = routing.check_target(routing.raw_target(request.environ))
    exc = request.routing_exception
    if isinstance(exc, RequestRedirect):
        exc = _match_shadowed()
    if exc is None:
        return
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allow = sorted(exc.valid_methods or ())
        raise MethodNotAllowed(f"{request.method} is not allowed for this path; allowed: {', '.join(allow)}.", allow)
    # NotFound, and RequestRedirect: a trailing slash is a different path
    # (DESIGN section 5), so werkzeug's slash redirect must not happen.
    if isinstance(exc, (RequestRedirect, HTTPException)) and exc.code in (404, 308):
        raise RequestNotAllowed(f"{request.method} {request.path} is not in AllowedRequests.")


def _match_shadowed() -> HTTPException | None:
    """Match again when werkzeug offered a slash redirect; return what still refuses the request.

    werkzeug answers /e/f with a redirect to /e/f/ as soon as a rule /e/f/
    exists, without trying a placeholder rule such as /e/{x} that matches
    /e/f exactly (found by tests/test_fuzz.py, issue #7). The rules that do
    not end in '/' are matched again on their own.
    """
    adapter = current_app.extensions[SLASHLESS].bind_to_environ(request.environ)
    try:
        request.url_rule, request.view_args = adapter.match(return_rule=True)
    except HTTPException as again:
        return again
    request.routing_exception = None
    return None


def forward(**_placeholders: str) -> Response:
    """Send the request to the next instance that takes it and relay its answer."""
    # The request object itself: one context lookup rather than one per attribute (issue #6).
    req = request._get_current_object()  # type: ignore[attr-defined]
    extensions = current_app.extensions
    balancer: Balancer = extensions[EXTENSION]
    repeatable = _repeatable(req, extensions[REPEATABLE])
    body, length, held = _request_body(
        req, balancer.config.failover.buffer_bytes if repeatable else 0, balancer.config.timeouts.read
    )
    client_headers = req.headers
    headers = request_headers(
        client_headers.items(),
        client_addr=req.remote_addr or "",
        client_proto=req.scheme,
        client_host=client_headers.get("Host"),
        content_length=length,
    )
    outgoing = Outgoing(method=req.method, target=g.target, headers=headers, body=body)
    return _relay(exchange(balancer, outgoing, repeatable and held))


def _repeatable(req: Request, pairs: frozenset[tuple[str, str]]) -> bool:
    """Whether the matched AllowedRequests entry may be sent to a second instance (HEAD follows GET)."""
    rule = req.url_rule.rule if req.url_rule is not None else ""
    method = req.method
    return (rule, method) in pairs or (method == "HEAD" and (rule, "GET") in pairs)


def _request_body(
    req: Request, buffer_bytes: int, silence: float
) -> tuple[bytes | IO[bytes] | None, int | None, bool]:
    """The body to send on, its length, and whether it is held (so it can be sent again).

    A body announced by Content-Length is held in memory up to
    *buffer_bytes* and streamed beyond; a chunked one is always counted in a
    spool, which can be read again. A client silent for *silence* seconds
    while sending it gets 400.
    """
    environ = req.environ
    length = req.content_length
    if length is not None:
        if not length:
            return b"", 0, True
        body = _ExactBody(_ClientInput(environ, silence), length)
        if length <= buffer_bytes:
            return body.read_all(), length, True
        return body, length, False
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        # The server in front has de-chunked it; count it so the instance
        # gets a Content-Length, without holding a large upload in memory.
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        stream = _ClientInput(environ, silence)
        size = 0
        while chunk := stream.read(RELAY_CHUNK):
            spool.write(chunk)
            size += len(chunk)
        spool.seek(0)
        return spool, size, True
    return None, None, True


class _ClientInput:
    """``wsgi.input``, failing with 400 when the client breaks its body's framing or falls silent.

    Without a limit, a client that stops sending its body keeps its greenlet
    and, for a streamed body, the instance connection and a scanners_count
    slot for as long as it keeps the connection open: a few such clients
    lock everyone else out of an instance (issue #7). gunicorn's worker
    gives the client socket no timeout, so one is set on it (``Timeouts
    read``, the longest silence allowed on either side) for each read, and
    the previous one put back. Errors of the server's body reader (a bad
    chunk size, a client gone in the middle of a chunk) become the same 400.
    """

    def __init__(self, environ: dict, silence: float) -> None:
        self._stream = environ["wsgi.input"]
        self._socket = environ.get("gunicorn.socket")
        self._silence = silence

    def read(self, size: int = -1) -> bytes:
        previous = self._socket.gettimeout() if self._socket is not None else None
        if self._socket is not None:
            self._socket.settimeout(self._silence)
        try:
            return self._stream.read(size)
        except TimeoutError as exc:
            raise RequestBodyInvalid(
                f"The client sent nothing of its request body for {self._silence:g} seconds."
            ) from exc
        except Exception as exc:
            raise RequestBodyInvalid("The request body is malformed or ended early.") from exc
        finally:
            if self._socket is not None:
                self._socket.settimeout(previous)


class _ExactBody:
    """A reader of exactly *length* bytes that fails if the client stops early.

    Without it a short upload would leave the instance waiting for the rest
    until the read timeout.
    """

    def __init__(self, stream: IO[bytes], length: int) -> None:
        self._stream = stream
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._stream.read(size)
        if not data:
            raise RequestBodyInvalid(f"The request body ended {self._left} bytes before its Content-Length.")
        self._left -= len(data)
        return data

    def read_all(self) -> bytes:
        parts = []
        while data := self.read(RELAY_CHUNK):
            parts.append(data)
        return b"".join(parts)


def _relay(answer: Answer) -> Response:
    """The instance's answer as a streamed response; frees its slot when done."""
    raw = answer.response.raw
    status = answer.response.status_code
    reason = raw.reason or ""
    # direct_passthrough: the server iterates the _Relay itself, and its
    # close() (WSGI) reaches answer.close(); for HEAD, 1xx, 204 and 304
    # werkzeug sends no body and closes the response, which closes the _Relay.
    return RelayedResponse(
        _Relay(answer),
        status=f"{status} {reason}" if reason.isprintable() and reason.isascii() and reason else status,
        headers=response_headers(raw.headers.items()),
        direct_passthrough=True,
    )


class _Relay:
    """The body of an instance's answer as the WSGI iterable: bytes as sent, no gzip decoding.

    Errors are logged, not hidden: raising makes the server cut the client
    connection, so the client sees a broken answer instead of a
    complete-looking short one. ``close()`` frees the answer's connection and
    slot, whether the body was read to its end or not.
    """

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._chunks = answer.response.raw.stream(ANSWER_CHUNK, decode_content=False)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except (Urllib3Error, OSError) as exc:
            log.warning(
                "instance %s failed while sending its answer: %s", self._answer.upstream.spec.name, type(exc).__name__
            )
            raise

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._answer.close()


def render_error(exc: BalancerError) -> Response:
    response = jsonify(exc.body())
    response.status_code = exc.status
    for name, value in exc.headers():
        response.headers[name] = value
    return response


def render_http_exception(exc: HTTPException) -> Response:
    """werkzeug's own errors (malformed requests) as JSON too."""
    name = (exc.name or "error").lower().replace(" ", "_")
    response = jsonify({"error": name, "description": exc.description or exc.name})
    response.status_code = exc.code or 500
    return response


def install(app: Flask, config: Config, balancer: Balancer) -> None:
    """Register the rules, converters and per-app balancer on *app*, and serve /_balancer/ beside them."""
    app.url_map.converters.update(routing.CONVERTERS)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = True
    app.extensions[EXTENSION] = balancer
    app.extensions[REPEATABLE] = frozenset(
        (routing.to_rule(a.path), a.method) for a in config.allowed if a.safe_to_repeat
    )
    app.register_blueprint(make_blueprint(config))
    app.extensions[SLASHLESS] = Map(
        [rule.empty() for rule in app.url_map.iter_rules() if not rule.rule.endswith("/")],
        converters=routing.CONVERTERS,
        merge_slashes=False,
        strict_slashes=True,
    )
    # In front of Flask, not in its url_map: `flask routes` lists exactly
    # AllowedRequests, and no rule ({name} included) can match /_balancer/.
    app.wsgi_app = ReservedPaths(app.wsgi_app, balancer)  # type: ignore[method-assign]
