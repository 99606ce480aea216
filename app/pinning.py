"""A requests HTTPAdapter whose connections check the instance's pin before any request byte.

The check is a property of the connection (STYLE guideline 4):
:class:`PinningHTTPSConnection` runs it in ``connect()``, right after the TLS
handshake, on the socket that will carry the request. urllib3 connects a
pooled connection before writing the request line, so no code path can send
a byte to an instance whose certificate has not been accepted.

Chain, expiry and host name are not checked (``CERT_NONE``): the pin is the
identity (docs/design.md, "Reference certificates"). A refusal is raised as a
:class:`~app.errors.BalancerError`, which is not an ``OSError`` and so
travels through urllib3 and requests untouched.

A keep-alive connection is checked once, when it opens. The connection keeps
what the pin check returned; when that has an ``is_current()`` that now says
False (the reference file was replaced or deleted, docs/design.md, "Reference certificates"),
:class:`PinningHTTPSConnectionPool` closes the connection before reuse, so
urllib3 opens a new one and the check runs again (docs/design.md, "Traps").
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from typing import Any, Callable

import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.util.ssl_ import create_urllib3_context

from .strict_head import StrictHTTPResponse

log = logging.getLogger(__name__)

#: Checks a peer's DER certificate; raises to refuse it. What it returns is
#: kept by the connection (see :meth:`PinningHTTPSConnection.pin_is_current`).
PinCheck = Callable[[bytes], object]


class NotConnected(Exception):
    """The connection could not be opened (TCP connect or TLS handshake): nothing was sent.

    ``reason`` says how in a few words (:func:`describe_connect`); ``__cause__``
    is the library's exception. Not an ``OSError``: raised from ``connect()``
    it travels through urllib3 and requests untouched (docs/design.md,
    "Traps"), so the caller knows for certain that no request byte left.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_connect(exc: BaseException, timeout: float | None) -> str:
    """Why a connection could not be opened, in a few words; the one wording of every such failure."""
    limit = f" ({timeout:g} s)" if timeout is not None else ""
    if isinstance(exc, urllib3.exceptions.NameResolutionError) or isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # a subclass of ConnectTimeoutError
        exc = exc.__cause__ or exc
    elif isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"no connection within the connect timeout{limit}"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within the connect timeout{limit}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


class PinningHTTPSConnection(HTTPSConnection):
    """An HTTPS connection that refuses to exist unless its peer matches the pin.

    ``connect()`` raises :class:`NotConnected` when the peer cannot be
    reached, and the pin check's own :class:`~app.errors.BalancerError` when
    it refuses the peer; both before any request byte.
    """

    #: Answers are read by a strict parser: a head that could be read in more
    #: than one way must not be relayed (docs/design.md, "Hostile clients").
    response_class = StrictHTTPResponse

    def __init__(self, *args: Any, pin_check: PinCheck, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pin_check = pin_check
        #: What the pin check returned for the peer of this connection.
        self.pinned: object = None

    def connect(self) -> None:
        self.pinned = None
        try:
            super().connect()
        except Exception as exc:
            self.close()
            raise NotConnected(describe_connect(exc, _seconds(self.timeout))) from exc
        try:
            der = self.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            if not der:
                raise ssl.SSLError("the instance presented no certificate")
            self.pinned = self._pin_check(der)
        except BaseException:
            self.close()
            raise
        # The pin, not a CA, verified this peer; saying so also keeps urllib3
        # from warning about an unverified request on every request.
        self.is_verified = True

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        """The instance's answer, its segments acknowledged at once while it is read.

        An instance that writes its answer's head and its body separately,
        with Nagle's algorithm on, holds the body until the head is
        acknowledged; Linux delays that acknowledgement up to 40 ms on a
        kept-alive connection. TCP_QUICKACK sends it at once (docs/design.md,
        "Traps"); the kernel drops the flag by itself later, so it is set for
        every answer.
        """
        ack_at_once(self.sock)
        return super().getresponse(*args, **kwargs)

    def pin_is_current(self) -> bool:
        """Whether the reference this connection was checked against still holds."""
        is_current = getattr(self.pinned, "is_current", None)
        return is_current is None or bool(is_current())


class PinningHTTPSConnectionPool(HTTPSConnectionPool):
    """A pool whose connections are :class:`PinningHTTPSConnection`.

    ``pin_check`` arrives among the keyword arguments and urllib3 hands it to
    every connection it creates (``conn_kw``).
    """

    ConnectionCls = PinningHTTPSConnection  # type: ignore[assignment]

    def _get_conn(self, timeout: float | None = None) -> PinningHTTPSConnection:  # type: ignore[override]
        """A connection from the pool, closed first if its reference changed since it was checked.

        urllib3 reconnects a closed connection before writing the request
        (``_validate_conn``), and ``connect()`` runs the pin check again.
        """
        conn: PinningHTTPSConnection = super()._get_conn(timeout)  # type: ignore[assignment]
        if not conn.is_closed and not conn.pin_is_current():
            log.debug("closing a connection to %s:%s checked against a replaced reference", self.host, self.port)
            conn.close()
        return conn


def presented_certificate(host: str, port: int, timeout: float, context: ssl.SSLContext | None = None) -> bytes:
    """DER of the certificate *host*:*port* presents now: a TLS handshake, no request, nothing saved.

    Raises :class:`NotConnected`. Used by the probes and the ``pins`` commands.
    """
    seen: list[bytes] = []
    conn = PinningHTTPSConnection(
        host, port, timeout=timeout, ssl_context=context or unverified_context(), pin_check=seen.append
    )
    try:
        conn.connect()
    finally:
        conn.close()
    return seen[0]


#: Linux's TCP_QUICKACK; None where the platform has none.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def ack_at_once(sock: Any) -> None:
    """Make the kernel acknowledge what arrives on *sock* without its delayed-ACK wait, where it can."""
    if _QUICKACK is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        pass  # not TCP (a test's socket pair), or closed: nothing to speed up


def _seconds(timeout: object) -> float | None:
    return float(timeout) if isinstance(timeout, (int, float)) else None


def unverified_context() -> ssl.SSLContext:
    """A client context that completes the handshake with any certificate; the pin decides."""
    return create_urllib3_context(cert_reqs=ssl.CERT_NONE)


class PinningAdapter(HTTPAdapter):
    """HTTPAdapter for one instance: every connection is checked by *pin_check*.

    Extends requests through its documented hooks (``init_poolmanager``,
    ``get_connection_with_tls_context``, ``cert_verify``, ``request_url``,
    ``build_response``); it keeps no per-request state, so greenlets can
    share it. ``verify`` and ``cert`` are not used: the pin is the identity
    (docs/design.md, "Reference certificates"), and the pool's context never checks a chain.
    """

    def __init__(self, pin_check: PinCheck, pool_maxsize: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pin_check = pin_check
        self._ssl_context = ssl_context or unverified_context()
        #: The pool of each origin this adapter has sent to (one: it is mounted on one instance).
        self._pools: dict[str, Any] = {}
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)

    def request_url(self, request: Any, proxies: Any) -> str:
        """The request target exactly as prepared: everything after the authority.

        requests' ``path_url`` rebuilds it with ``urlsplit`` and drops the
        ``?`` of an empty query (RFC 3986 section 6.2.3: not the same URI).
        """
        url: str = request.url
        return url[_authority_end(url) :]

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, ssl_context=self._ssl_context, **pool_kwargs)
        # pool_classes_by_scheme is a module-level dict in urllib3: assign a
        # new one, never mutate it. No "http" entry: instances speak HTTPS only.
        self.poolmanager.pool_classes_by_scheme = {
            "https": functools.partial(PinningHTTPSConnectionPool, pin_check=self._pin_check)
        }
        self._pools = {}

    def get_connection_with_tls_context(
        self, request: PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        """The pool of the request's origin, looked up once by requests and then kept.

        requests would parse the URL and build a pool key on every request.
        A pool closed since (``close()``, or the pool manager
        cleared) is looked up again.
        """
        url: str = request.url  # type: ignore[assignment]
        origin = url[: _authority_end(url)]
        pool = self._pools.get(origin)
        if pool is None or pool.pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[origin] = pool
        return pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Nothing: the pin checks the peer, and the pool is never changed per request."""

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        """A Response around urllib3's answer, with its body unread.

        Unlike requests' own, it stores no cookies (the balancer keeps nothing
        between clients, docs/design.md, "Which requests pass") and guesses no text encoding: the
        answer is relayed as raw bytes.
        """
        response = Response()
        response.status_code = resp.status
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url  # type: ignore[assignment]
        response.request = req
        response.connection = self  # type: ignore[attr-defined]
        return response


def _authority_end(url: str) -> int:
    """Where the path of an absolute URL starts."""
    return url.index("/", url.index("//") + 2)
