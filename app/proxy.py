"""The Flask blueprint: AllowedRequests as rules, the forwarding view, and JSON errors.

Steps of one request: check the raw target, match it against the rules,
read the body as framed (held when it may be sent again), hand it to
:func:`app.failover.exchange`, relay the answer as sent.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from flask import Blueprint, Flask, Request, Response, current_app, g, request
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.routing import Map, RequestRedirect

from . import accesslog, routing
from .buffering import BufferedAnswer, DiskBudget, HeldBody, NoRoom
from .errors import (
    BalancerError,
    CodingNotImplemented,
    InstanceError,
    InvalidHost,
    MethodNotAllowed,
    RequestBodyInvalid,
    RequestNotAllowed,
    RequestTooLarge,
    json_body,
)
from .failover import exchange
from .fanout import HEADER as FANOUT_HEADER, Result, fan_out
from .headers import request_headers, response_headers, valid_host
from .settings import Config, allows
from .status import ReservedPaths
from .upstream import Answer, Balancer, Outgoing

log = logging.getLogger(__name__)

EXTENSION = "ctbalancer"
#: app.extensions key of the (rule, method) pairs whose requests may be sent again.
REPEATABLE = "ctbalancer.repeatable"
#: app.extensions key of a Map of the rules that do not end in '/' (see _match_shadowed).
SLASHLESS = "ctbalancer.slashless"
#: app.extensions key: the (rule, method) pairs of ``fanout="true"`` requests.
FANOUT = "ctbalancer.fanout"
ENDPOINT = "forward"

#: Bytes read from a client's body at a time.
RELAY_CHUNK = 64 * 1024
#: Bytes read from an instance per write to the client, at most. Each chunk
#: costs a pass through urllib3, werkzeug and gunicorn and a send: a 1 MB
#: answer in 64 KiB chunks spent about a tenth of its CPU on that.
#: A small answer is read whole whatever this is (http.client stops at its
#: Content-Length), so this only bounds the memory of a large one in flight.
ANSWER_CHUNK = 256 * 1024


class RelayedResponse(Response):
    """A response that adds nothing: no default Content-Type, no computed length."""

    default_mimetype = None
    automatically_set_content_length = False

    def get_wsgi_headers(self, environ: dict) -> Headers:
        """The headers as they are, unless werkzeug has something to change.

        werkzeug copies the headers of every response to rewrite Location and
        Content-Location and to drop what 1xx, 204 and 304 answers must not
        carry; an answer with none of those needs no copy.
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
    environ = request.environ
    g.target = routing.check_target(routing.raw_target(environ))
    if environ.get("SCRIPT_NAME"):
        # Rules are matched on exactly the path that is forwarded: no server
        # in front may move part of it into SCRIPT_NAME (docs/design.md, "Hostile clients").
        raise RequestNotAllowed(f"{request.method} {g.target} is not in AllowedRequests.")
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    if coding is not None and coding.strip().lower() != "chunked":
        raise CodingNotImplemented(
            f"Transfer-Encoding {coding[:64]!r} is not implemented; the balancer accepts chunked only."
        )
    host = environ.get("HTTP_HOST")
    if host is not None and not valid_host(host):
        raise InvalidHost("The Host header is not a host name or address with an optional port.")
    exc = request.routing_exception
    if isinstance(exc, RequestRedirect):
        exc = _match_shadowed()
    if exc is None:
        return
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allow = sorted(exc.valid_methods or ())
        raise MethodNotAllowed(f"{request.method} is not allowed for this path; allowed: {', '.join(allow)}.", allow)
    # NotFound, and RequestRedirect: a trailing slash is a different path
    # (docs/design.md, "Which requests pass"), so werkzeug's slash redirect must not happen.
    if isinstance(exc, (RequestRedirect, HTTPException)) and exc.code in (404, 308):
        raise RequestNotAllowed(f"{request.method} {request.path} is not in AllowedRequests.")


def _match_shadowed() -> HTTPException | None:
    """Match again when werkzeug offered a slash redirect; return what still refuses the request.

    werkzeug answers /e/f with a redirect to /e/f/ as soon as a rule /e/f/
    exists, without trying a placeholder rule such as /e/{x} that matches
    /e/f exactly (found by tests/test_fuzz.py, docs/design.md, "Hostile clients"). The rules that do
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
    """Receive the request whole, send it to the next instance that takes it, and relay its answer."""
    # The request object itself: one context lookup rather than one per attribute.
    req = request._get_current_object()  # type: ignore[attr-defined]
    extensions = current_app.extensions
    balancer: Balancer = extensions[EXTENSION]
    config = balancer.config
    body = _receive_body(req, config, balancer.disk)
    try:
        client_headers = req.headers
        remote_addr = req.remote_addr or ""
        headers = request_headers(
            client_headers.items(),
            client_addr=remote_addr,
            client_proto=req.scheme,
            client_host=client_headers.get("Host"),
            content_length=None if body is None else body.size,
            from_front_proxy=bool(config.front_proxy) and allows(config.front_proxy, remote_addr),
        )
        outgoing = Outgoing(method=req.method, target=g.target, headers=headers, body=None if body is None else body.content())
        if balancer.journal is not None and _rule_pair(req) in extensions[FANOUT]:
            result = fan_out(balancer, balancer.journal, outgoing)
            accesslog.note(
                req.environ,
                instance=result.delivery.upstream.name,
                attempts=result.applied,
                bytes_in=0 if body is None else body.size,
            )
            return _relay_fanout(result)
        answer = exchange(balancer, outgoing, _repeatable(req, extensions[REPEATABLE]))
        accesslog.note(
            req.environ,
            instance=answer.upstream.name,
            attempts=answer.attempts,
            head_seconds=answer.head_seconds,
            bytes_in=0 if body is None else body.size,
        )
    finally:
        # Sent whole by now (or never to be sent): a spooled body's disk goes back at once.
        if body is not None:
            body.close()
    return _relay(answer, config)


def _rule_pair(req: Request) -> tuple[str, str]:
    return (req.url_rule.rule if req.url_rule is not None else "", req.method)


def _relay_fanout(result: Result) -> Response:
    """The answer of the first instance (configuration order) that applied the write, with the fan-out header."""
    delivery = result.delivery
    headers = Headers(delivery.headers)
    headers[FANOUT_HEADER] = result.header
    return Response(delivery.body, status=delivery.status, headers=headers)


def _repeatable(req: Request, pairs: frozenset[tuple[str, str]]) -> bool:
    """Whether the matched AllowedRequests entry may be sent to a second instance (HEAD follows GET)."""
    rule = req.url_rule.rule if req.url_rule is not None else ""
    method = req.method
    return (rule, method) in pairs or (method == "HEAD" and (rule, "GET") in pairs)


def _receive_body(req: Request, config: Config, disk: DiskBudget) -> HeldBody | None:
    """The whole request body, held before any instance slot is taken; None when the request has none.

    In memory up to ``Failover buffer_bytes``, beyond that on disk. A body
    over ``Limits body_bytes`` is refused with 413 before a byte of it is
    stored when its length is announced, as soon as it passes the limit when
    it is chunked; one that the worker's disk budget cannot hold now gets
    413 with ``Retry-After``. A client silent for ``Timeouts client`` seconds
    while sending it gets 400 (the worker's socket timeout).
    """
    environ = req.environ
    length = req.content_length
    chunked = "HTTP_TRANSFER_ENCODING" in environ
    if length is None and not chunked:
        return None
    limit = config.limits.body_bytes
    if length is not None and length > limit:
        raise _too_large(length, limit)
    body = HeldBody(config.failover.buffer_bytes, disk)
    stream = _ClientInput(environ, config.timeouts.client)
    left = length
    try:
        while left is None or left > 0:
            chunk = stream.read(RELAY_CHUNK if left is None else min(RELAY_CHUNK, left))
            if not chunk:
                if left:
                    raise RequestBodyInvalid(f"The request body ended {left} bytes before its Content-Length.")
                break
            if left is None and body.size + len(chunk) > limit:
                raise _too_large(None, limit)
            body.write(chunk)
            if left is not None:
                left -= len(chunk)
    except NoRoom:
        body.close()
        raise RequestTooLarge(
            "The balancer has no room to hold this request body now (Limits spool_bytes); try again later.",
            retry_after=5,
        ) from None
    except BaseException:
        body.close()
        raise
    return body


def _too_large(length: int | None, limit: int) -> RequestTooLarge:
    size = f"{length} bytes" if length is not None else f"over {limit} bytes"
    return RequestTooLarge(f"The request body is {size}; the balancer accepts at most {limit} (Limits body_bytes).")


class _ClientInput:
    """``wsgi.input``, failing with 400 when the client breaks its body's framing or falls silent.

    The worker (:mod:`app.worker`) gives the client socket a timeout of
    ``Timeouts client``: a client that stops sending its body is cut after
    that long, here as a 400. Errors of the server's body reader (a bad chunk
    size, a client gone in the middle of a chunk) become the same 400.
    """

    def __init__(self, environ: dict, silence: float) -> None:
        self._stream = environ["wsgi.input"]
        self._silence = silence

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except TimeoutError as exc:
            raise RequestBodyInvalid(
                f"The client sent nothing of its request body for {self._silence:g} seconds."
            ) from exc
        except Exception as exc:
            raise RequestBodyInvalid("The request body is malformed or ended early.") from exc


def _relay(answer: Answer, config: Config) -> Response:
    """The instance's answer, read off the instance ahead of the client; its slot is freed once it is read."""
    response = answer.response
    raw = response.raw
    status = response.status_code
    reason = raw.reason or ""
    if answer.body is not None:
        # The common case: a small answer, read whole in the attempt (app.upstream.Upstream.read_small).
        body: Iterable[bytes] = [answer.body]
    else:
        balancer: Balancer = current_app.extensions[EXTENSION]
        body = BufferedAnswer(
            _chunks(answer), answer.close, config.failover.buffer_bytes, config.limits.answer_bytes, balancer.disk
        )
    # direct_passthrough: the server iterates the body itself, and its
    # close() (WSGI) reaches the BufferedAnswer; for HEAD, 1xx, 204 and 304
    # werkzeug sends no body and closes the response.
    return RelayedResponse(
        body,
        status=f"{status} {reason}" if reason.isprintable() and reason.isascii() and reason else status,
        headers=response_headers(raw.headers.items()),
        direct_passthrough=True,
    )


def _chunks(answer: Answer) -> Iterator[bytes]:
    """The body of a large answer as sent; a failure is logged, then raised to cut the client's connection."""
    try:
        yield from answer.response.raw.stream(ANSWER_CHUNK, decode_content=False)
    except (Urllib3Error, OSError) as exc:
        log.warning("instance %s failed while sending its answer: %s", answer.upstream.spec.name, type(exc).__name__)
        raise


def render_error(exc: BalancerError) -> Response:
    accesslog.note(
        request.environ,
        error=exc.code,
        attempts=exc.attempts,
        instance=exc.instance if isinstance(exc, InstanceError) else None,
    )
    response = exc.get_response()
    if exc.closes_connection:
        close = getattr(request.environ.get("gunicorn.socket"), "close_after_response", None)
        if close is not None:  # app.worker's socket: gunicorn ignores an application's Connection header
            close()
    return response  # type: ignore[return-value]


def render_http_exception(exc: HTTPException) -> Response:
    """werkzeug's own errors (malformed requests) as JSON too."""
    name = (exc.name or "error").lower().replace(" ", "_")
    body = json_body({"error": name, "description": exc.description or exc.name})
    return Response(body, status=exc.code or 500, mimetype="application/json")


def install(app: Flask, config: Config, balancer: Balancer) -> None:
    """Register the rules, converters and per-app balancer on *app*, and serve /_balancer/ beside them."""
    app.url_map.converters.update(routing.CONVERTERS)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = True
    app.extensions[EXTENSION] = balancer
    app.extensions[FANOUT] = frozenset((routing.to_rule(a.path), a.method) for a in config.allowed if a.fanout)
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
