"""The gunicorn worker: gevent's, with the deadlines and refusals a hostile client meets.

gunicorn's gevent worker leaves three doors open (docs/design.md, "Hostile
clients"): gevent completes the server-side TLS handshake before the worker
sees the connection, with no timeout; the keep-alive timeout covers the wait
for a request head only after the first one, and never a head that trickles
in; and a client that stops reading its answer holds the greenlet forever.
This worker closes them:

* the TLS handshake and the first request head together must complete
  within ``Timeouts client`` seconds; later heads have that long once their
  first byte arrived, after an idle wait of up to gunicorn's ``keepalive``;
* every read and write on the client socket gives up after ``Timeouts
  client`` seconds without progress (:class:`PacedSocket`);
* gunicorn's own refusals (malformed request line or header, a header too
  long) are answered in the balancer's JSON, and each refused connection
  costs one bounded log line, never a traceback.

The worker class is named by ``gunicorn.conf.py``; this module is imported by
the master, so it loads nothing of the app beyond the configuration.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl

import gevent
from gevent.socket import wait_read
from gunicorn import http, util
from gunicorn.http import errors as http_errors
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.workers.ggevent import GeventWorker

from .lifecycle import active
from .settings import Timeouts

log = logging.getLogger(__name__)

#: The ``Server`` header of every answer (gunicorn would name itself and its version).
SERVER = "ctbalancer"

#: Longest part of a client's input quoted in a log line.
LOG_QUOTE = 120


class ClientTooSlow(Exception):
    """The client did not finish its handshake or request head in time."""


class PacedSocket:
    """The client socket, with writes that fail only when the client reads nothing for *idle* seconds.

    gevent's ``sendall`` with a timeout bounds the whole call: a client on a
    slow link would be cut in the middle of a large chunk while it is still
    reading. Here each ``send`` waits at most *idle* seconds for room in the
    socket buffer, so only a client that stops reading is cut. Everything
    else is the socket's own.
    """

    def __init__(self, sock, idle: float) -> None:  # type: ignore[no-untyped-def]
        self._sock = sock
        self._idle = idle
        #: gunicorn's parsed request being served on this connection.
        self.request = None

    def close_after_response(self) -> None:
        """Close the connection once the current answer is sent (``Connection: close``).

        gunicorn drops an application's ``Connection`` header; its request's
        ``must_close`` is what makes it answer ``close`` and stop reading.
        """
        if self.request is not None:
            self.request.must_close = True

    def sendall(self, data) -> None:  # type: ignore[no-untyped-def]
        view = memoryview(data).cast("B")
        while view:
            sent = self._sock.send(view[: 1024 * 1024], timeout=self._idle)
            view = view[sent:]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._sock, name)


class BalancerWorker(GeventWorker):
    """gunicorn's gevent worker with client deadlines, JSON refusals and one-line logs."""

    def init_process(self) -> None:
        # gunicorn's Response reads the module-level SERVER for its Server header.
        gunicorn_wsgi.SERVER = SERVER
        config = active()
        self.client_timeout = (config.timeouts if config is not None else Timeouts()).client
        super().init_process()

    def handle(self, listener, client, addr) -> None:  # type: ignore[no-untyped-def]
        client.setblocking(1)
        client.settimeout(self.client_timeout)
        peer = _peer(addr)
        req = None
        handshaken = not isinstance(client, ssl.SSLSocket)
        try:
            listener_name = listener.getsockname()
            paced = PacedSocket(client, self.client_timeout)
            with gevent.Timeout(self.client_timeout, ClientTooSlow("TLS handshake and request head")):
                if not handshaken:
                    client.do_handshake()
                    handshaken = True
                parser = http.get_parser(self.cfg, client, addr)
                req = self._head(parser, "request head")
            while req:
                paced.request = req
                self.handle_request(listener_name, req, paced, addr)
                if not self.cfg.keepalive or not self._next_request_begins(client, parser):
                    break
                req = None
                with gevent.Timeout(self.client_timeout, ClientTooSlow("request head")):
                    req = self._head(parser, "request head")
        except (StopIteration, http_errors.NoMoreData):
            pass
        except ClientTooSlow as exc:
            log.info("client %s closed: no complete %s within %gs", peer, exc, self.client_timeout)
        except ssl.SSLEOFError:
            # Closed before or during the handshake: TCP health checks, port scans.
            log.debug("client %s closed the connection during the TLS handshake", peer)
        except ssl.SSLError as exc:
            if not handshaken:
                log.info("TLS handshake with %s failed: %s", peer, _quote(exc.reason or exc.strerror or str(exc)))
            else:
                log.debug("TLS error with %s: %s", peer, exc)
        except TimeoutError:
            # A read of the body times out inside the app (400); this is a write: the client stopped reading.
            log.info("client %s closed: read nothing of its answer for %gs", peer, self.client_timeout)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, None):
                log.info("client %s: %s", peer, _quote(str(exc)))
        except Exception as exc:
            self.handle_error(req, client, addr, exc)
        finally:
            util.close(client)

    @staticmethod
    def _head(parser, what: str):  # type: ignore[no-untyped-def]
        """The next request head; a socket silent for the client timeout meanwhile is a slow head."""
        try:
            return next(parser)
        except TimeoutError:
            raise ClientTooSlow(what) from None

    def _next_request_begins(self, client, parser) -> bool:  # type: ignore[no-untyped-def]
        """Wait, up to ``keepalive`` seconds, for the first byte of the next request on a kept-alive connection."""
        # parser.unreader.buf: bytes of a pipelined request already read (declared in docs/design.md, "Couplings").
        buffered = parser.unreader.buf
        if buffered.seek(0, os.SEEK_END) or (isinstance(client, ssl.SSLSocket) and client.pending()):
            return True
        try:
            wait_read(client.fileno(), timeout=self.cfg.keepalive)
        except (TimeoutError, OSError):
            return False
        return True

    def handle_error(self, req, client, addr, exc) -> None:  # type: ignore[no-untyped-def]
        """gunicorn's refusals, as JSON, with one bounded log line; anything else stays gunicorn's 500."""
        status, reason, code = _refusal(exc)
        if status is None:
            super().handle_error(req, client, addr, exc)
            return
        log.info("invalid request from %s: %s %s", _peer(addr), code, _quote(str(exc)))
        from . import metrics  # in the worker only: it loads ssl

        metrics.count_answer(str(status), code)
        description = {
            400: "The request is malformed.",
            414: "The request line is too long.",
            431: "The request's header fields are too large.",
            501: "The request uses a transfer coding the balancer does not implement; only chunked is.",
            417: "The request's Expect header cannot be met.",
        }.get(status, "The request is malformed.")
        from .errors import json_body  # in the worker only: the master loads no more of the app than it needs

        body = json_body({"error": code, "description": description})
        head = (
            f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        try:
            util.write_nonblock(client, head + body)
        except Exception:
            log.debug("the refusal could not be sent to %s", _peer(addr))


#: gunicorn's request errors: (status, reason, error code).
_REFUSALS: tuple[tuple[type, int, str, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "request_line_too_long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "request_headers_too_large"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "transfer_coding_not_implemented"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (http_errors.ParseException, 400, "Bad Request", "invalid_request"),
)


#: Errors gunicorn answers with 500 as the application's or the set-up's fault, not the client's.
_NOT_REFUSALS = (
    http_errors.InvalidResponseHeader,
    http_errors.InvalidResponseHeaderName,
    http_errors.ConfigurationProblem,
)


def _refusal(exc: BaseException) -> tuple[int | None, str, str]:
    if isinstance(exc, _NOT_REFUSALS):
        return None, "", ""
    for cls, status, reason, code in _REFUSALS:
        if isinstance(exc, cls):
            return status, reason, code
    return None, "", ""


def _peer(addr) -> str:  # type: ignore[no-untyped-def]
    if isinstance(addr, tuple) and addr:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "unix socket"


def _quote(text: str) -> str:
    """*text* as one printable line of at most :data:`LOG_QUOTE` characters."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= LOG_QUOTE else text[:LOG_QUOTE] + "..."
