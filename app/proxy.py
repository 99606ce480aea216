"""The Flask blueprint: AllowedRequests as rules, the forwarding view, and JSON errors.

Steps of one request: check the raw target, match it against the rules,
read the body as framed, choose an instance, send, relay the answer as sent.
"""

from __future__ import annotations

import logging
import tempfile
from typing import IO, Iterator

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.routing import RequestRedirect

from . import routing
from .config import Config
from .errors import (
    BalancerError,
    MethodNotAllowed,
    RequestBodyInvalid,
    RequestNotAllowed,
)
from .headers import host_header, request_headers, response_headers
from .upstream import Balancer, NotSent, Outgoing, Upstream

log = logging.getLogger(__name__)

EXTENSION = "ctbalancer"
ENDPOINT = "forward"

#: Bytes read from an instance per write to the client.
RELAY_CHUNK = 64 * 1024
#: A chunked upload is counted before it is sent with a Content-Length; up to
#: this size it stays in memory, beyond it spills to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024


class RelayedResponse(Response):
    """A response that adds nothing: no default Content-Type, no computed length."""

    default_mimetype = None
    automatically_set_content_length = False


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
    if exc is None:
        return
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allow = sorted(exc.valid_methods or ())
        raise MethodNotAllowed(f"{request.method} is not allowed for this path; allowed: {', '.join(allow)}.", allow)
    # NotFound, and RequestRedirect: a trailing slash is a different path
    # (DESIGN section 5), so werkzeug's slash redirect must not happen.
    if isinstance(exc, (RequestRedirect, HTTPException)) and exc.code in (404, 308):
        raise RequestNotAllowed(f"{request.method} {request.path} is not in AllowedRequests.")


def forward(**_placeholders: str) -> Response:
    """Send the request to the next instance that takes it and relay its answer."""
    balancer: Balancer = current_app.extensions[EXTENSION]
    body, length = _request_body()
    headers = request_headers(
        request.headers.items(),
        client_addr=request.remote_addr or "",
        client_proto=request.scheme,
        client_host=request.headers.get("Host"),
        content_length=length,
    )
    outgoing = Outgoing(method=request.method, target=g.target, headers=headers, body=body)
    timeouts = balancer.config.timeouts
    reasons: list[str] = []
    for upstream in balancer.candidates():
        if not upstream.slots.acquire(timeout=timeouts.connect):
            reasons.append(f"{upstream.spec.name} has scanners_count requests in flight")
            continue
        try:
            prepared = outgoing.prepare(upstream, host_header(upstream.spec.host, upstream.spec.api_port))
            answer = upstream.send(prepared, (timeouts.connect, timeouts.read))
        except NotSent as exc:
            upstream.slots.release()
            log.warning("instance %s not reached (%s); trying the next", upstream.spec.name, exc.reason)
            reasons.append(f"{upstream.spec.name}: {exc.reason}")
            continue
        except BaseException:
            upstream.slots.release()
            raise
        return _relay(answer, upstream)
    raise balancer.no_instance(reasons)


def _request_body() -> tuple[bytes | IO[bytes] | None, int | None]:
    """The body to send on and its length, exactly as the client framed it."""
    environ = request.environ
    length = request.content_length
    if length is not None:
        return (_ExactBody(environ["wsgi.input"], length) if length else b""), length
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        # The server in front has de-chunked it; count it so the instance
        # gets a Content-Length, without holding a large upload in memory.
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        stream = environ["wsgi.input"]
        size = 0
        while chunk := stream.read(RELAY_CHUNK):
            spool.write(chunk)
            size += len(chunk)
        spool.seek(0)
        return spool, size
    return None, None


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


def _relay(answer: object, upstream: Upstream) -> Response:
    """The instance's answer as a streamed response; frees the slot when done."""
    raw = answer.raw  # type: ignore[attr-defined]
    status = answer.status_code  # type: ignore[attr-defined]
    reason = raw.reason or ""
    response = RelayedResponse(
        _stream(raw, upstream),
        status=f"{status} {reason}" if reason.isprintable() and reason.isascii() and reason else status,
        headers=response_headers(raw.headers.items()),
    )
    # Not direct_passthrough: werkzeug then wraps the body in a
    # ClosingIterator, and the server's close() reaches finish() below.

    def finish() -> None:
        try:
            answer.close()  # type: ignore[attr-defined]
        finally:
            upstream.slots.release()

    response.call_on_close(finish)
    return response


def _stream(raw: object, upstream: Upstream) -> Iterator[bytes]:
    """Bytes as the instance sent them (no gzip decoding); errors are logged, not hidden."""
    try:
        yield from raw.stream(RELAY_CHUNK, decode_content=False)  # type: ignore[attr-defined]
    except (Urllib3Error, OSError) as exc:
        # Raising makes the server cut the client connection, so the client
        # sees a broken answer instead of a complete-looking short one.
        log.warning("instance %s failed while sending its answer: %s", upstream.spec.name, type(exc).__name__)
        raise


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
    """Register the rules, converters and per-app balancer on *app*."""
    app.url_map.converters.update(routing.CONVERTERS)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = True
    app.extensions[EXTENSION] = balancer
    app.register_blueprint(make_blueprint(config))
