"""The hop to the instances: one pinning adapter per instance, which instance may take a
request now, and the one place where requests' and urllib3's exceptions become balancer errors.

Whether anything was sent is decided by *when* a failure happened, not by its
type: every exception raised while a connection opens (TCP connect, TLS
handshake, no certificate) leaves the connection as
:class:`~app.pinning.NotConnected`, which is not an ``OSError`` and so travels
through urllib3 and requests untouched (docs/design.md, "Traps"), and becomes
:class:`NotSent`. Any other failure
may have come after bytes of the request left: an ``SSLError`` while reading
an answer must not let a POST be sent twice.
"""

from __future__ import annotations

import functools
import http.client
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import IO

import requests
import urllib3
import urllib3.exceptions
from requests.models import PreparedRequest
from urllib3.util import SKIP_HEADER

from .buffering import DiskBudget
from .errors import BalancerError, InstanceError, InstanceFailed, InstanceTimeout, NoInstanceAvailable
from .headers import host_header
from .health import Health
from .journal import Journal
from .pinning import NotConnected, PinningAdapter, unverified_context
from .pins import PinStore
from .selection import Selection, Slots
from .settings import Config, InstanceSpec
from .shared import NodeSlots, NodeState, node_directory

log = logging.getLogger(__name__)


class NotSent(Exception):
    """The instance could not be reached; no byte of the request left the balancer."""

    def __init__(self, instance: InstanceSpec, reason: str) -> None:
        super().__init__(reason)
        self.instance = instance
        self.reason = reason


class AfterSend(Exception):
    """The instance failed once the request may have reached it, before any answer arrived.

    ``dropped`` is True when the connection was closed or reset before a byte
    of an answer: the shape of a keep-alive connection the instance closed
    just as the request went out, which, once, says nothing about the instance.
    """

    def __init__(self, error: InstanceError, reason: str, dropped: bool) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.dropped = dropped


# -- one instance --------------------------------------------------------------------------


class Upstream:
    """One instance: its pinning adapter, its in-flight cap and its health.

    Requests are sent with the adapter's ``send()``, never through a
    ``requests.Session``: ``Session.send()`` reads (and decodes) the body of
    every 3xx answer even when redirects are not followed, and stores the
    instance's cookies in a jar shared by all clients.
    """

    def __init__(
        self, spec: InstanceSpec, store: PinStore, config: Config, ssl_context: ssl.SSLContext, freed: threading.Condition
    ) -> None:
        self.spec = spec
        self.name = spec.name
        #: Per-request constants of this instance: its Host header and the URL a target is appended to.
        self.host_header = host_header(spec.host, spec.api_port)
        self.url_prefix = spec.base_url[:-1]
        self.adapter = PinningAdapter(
            lambda der: store.check(spec, der),
            pool_maxsize=config.balancer.scanners_count,
            ssl_context=ssl_context,
        )
        shared = node_directory()
        count = config.balancer.scanners_count
        self.slots: Slots | NodeSlots = (
            NodeSlots(shared / f"slots-{spec.host}_{spec.api_port}", count, freed)
            if shared is not None
            else Slots(count, freed)
        )
        self.health = Health(
            spec.host,
            spec.api_port,
            config.failover.cooldown,
            quarantine_mismatch=config.failover.on_mismatch == "failover",
            state=NodeState(shared / f"health-{spec.host}_{spec.api_port}") if shared is not None else None,
        )

    def send(self, prepared: PreparedRequest, timeout: tuple[float, float]) -> requests.Response:
        """Send *prepared* and return the answer with its body unread.

        Raises :class:`NotSent` when nothing was sent, :class:`AfterSend`
        when the instance failed before answering, and the pin check's
        :class:`~app.errors.BalancerError` as it is.
        """
        try:
            return self.adapter.send(prepared, stream=True, timeout=_timeout(*timeout), verify=False)
        except NotConnected as exc:
            raise NotSent(self.spec, exc.reason) from exc
        except BalancerError:
            raise
        except requests.RequestException as exc:
            raise translate(self.spec, exc) from exc

    def read_small(self, response: requests.Response, limit: int) -> bytes | None:
        """The whole body of *response* when its length is known and at most *limit*, else None.

        Read here, inside the attempt, so that an instance that fails in the
        middle of a small answer is an attempt that failed after sending
        (and a repeatable request goes to the next instance), not a client
        connection cut after a complete-looking head. Bytes as sent: no
        gzip decoding. Raises :class:`AfterSend`.
        """
        raw = response.raw
        length = raw.length_remaining
        if length is None or length > limit:
            return None
        try:
            return raw.read(decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise translate(self.spec, exc, answering=True) from exc


@functools.lru_cache(maxsize=256)
def _timeout(connect: float, read: float) -> urllib3.Timeout:
    """urllib3's Timeout for (connect, read), built once per pair rather than per request.

    Shared safely: urllib3 clones it before starting its clock. Nearly every
    request gets the same pair (the configured timeouts, unless the request's
    deadline is closer), so a small cache holds them.
    """
    return urllib3.Timeout(connect=connect, read=read)


def translate(spec: InstanceSpec, exc: BaseException, answering: bool = False) -> AfterSend:
    """The balancer's view of a failure once the connection was open: the one place where
    requests', urllib3's, http.client's, ssl's and the OS's exceptions become balancer errors
    (connect failures are the connection's own, :class:`~app.pinning.NotConnected`).

    *answering* says the answer's head had arrived: a connection that drops
    then is a cut-off answer, not a keep-alive race.
    """
    reason = _innermost(exc)
    if isinstance(exc, requests.ReadTimeout) or isinstance(reason, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        error: InstanceError = InstanceTimeout(
            f"The instance {spec.name} did not answer in time.", spec.host, spec.api_port
        )
        return AfterSend(error, "no answer within the read timeout", dropped=False)
    if answering:
        described = f"answer cut off ({type(reason).__name__})"
        error = InstanceFailed(
            f"The instance {spec.name} failed while sending its answer: {type(reason).__name__}.",
            spec.host,
            spec.api_port,
        )
        return AfterSend(error, described, dropped=False)
    dropped = isinstance(reason, _DROPPED)
    described = "connection closed before an answer" if dropped else _describe(reason)
    error = InstanceFailed(
        f"The instance {spec.name} failed after the request was sent: {described}.", spec.host, spec.api_port
    )
    return AfterSend(error, described, dropped)


# A connection closed or reset with no answer: what a keep-alive race looks like.
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _innermost(exc: BaseException) -> BaseException:
    """The innermost urllib3, http.client or OS error behind a requests exception."""
    seen: BaseException = exc
    for _ in range(4):
        if isinstance(seen, requests.RequestException) and seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        elif isinstance(seen, urllib3.exceptions.MaxRetryError) and seen.reason is not None:
            seen = seen.reason
        elif isinstance(seen, urllib3.exceptions.ProtocolError) and len(seen.args) > 1 and isinstance(
            seen.args[1], BaseException
        ):
            seen = seen.args[1]
        else:
            break
    return seen


def _describe(reason: BaseException) -> str:
    if isinstance(reason, (urllib3.exceptions.SSLError, ssl.SSLError)):
        return "TLS error"
    if isinstance(reason, (urllib3.exceptions.ProtocolError, http.client.HTTPException)):
        return "connection lost or answer malformed"
    if isinstance(reason, OSError):
        return "connection lost"
    return type(reason).__name__


# -- what is sent ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """What to send, independent of which instance gets it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: "bytes | IO[bytes] | None"

    @functools.cached_property
    def _fields(self) -> dict[str, tuple[str, str]]:
        """The headers by lower-cased name, the last of each name winning (as in a CaseInsensitiveDict)."""
        return {name.lower(): (name, value) for name, value in self.headers}

    def prepare(self, upstream: Upstream) -> PreparedRequest:
        """A PreparedRequest for *upstream*, built field by field.

        ``Request.prepare()`` would re-quote the target and, for a streamed
        body, add ``Transfer-Encoding: chunked`` beside our Content-Length.
        The headers are a plain dict with the fields of a
        CaseInsensitiveDict built from ``headers`` (one name each, whatever
        its case): requests and urllib3 copy and walk it, and a plain dict
        costs less to both. requests looks ``Content-Length`` up
        by that spelling, which :func:`~app.headers.request_headers` uses.
        """
        fields = dict(self._fields)
        fields["host"] = ("Host", upstream.host_header)
        # urllib3 would add a User-Agent and http.client an Accept-Encoding
        # the client never sent (docs/design.md, "Which requests pass").
        fields.setdefault("user-agent", ("User-Agent", SKIP_HEADER))
        fields.setdefault("accept-encoding", ("Accept-Encoding", SKIP_HEADER))
        prepared = PreparedRequest()
        prepared.method = self.method
        prepared.url = upstream.url_prefix + self.target
        prepared.headers = dict(fields.values())  # type: ignore[assignment]
        prepared.body = self.body  # type: ignore[assignment]
        return prepared

    def rewind(self) -> None:
        """Put a held body back at its start before it is sent (again)."""
        seek = getattr(self.body, "seek", None)
        if seek is not None:
            seek(0)


class Answer:
    """An instance's answer, holding its instance's slot until closed.

    ``body`` is the whole body when it was read in the attempt
    (:meth:`Upstream.read_small`), else None: it is then still on the connection.
    """

    def __init__(
        self, response: requests.Response, upstream: Upstream, body: bytes | None = None, holds_slot: bool = True
    ) -> None:
        self.response = response
        self.upstream = upstream
        self.body = body
        self._holds_slot = holds_slot
        self._open = True
        #: For the access log: instances tried for this answer, and seconds from sending to the head.
        self.attempts = 1
        self.head_seconds: float | None = None

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self.response.close()
        finally:
            if self._holds_slot:
                self.upstream.slots.release()


# -- the instances of one worker ------------------------------------------------------------


class Balancer:
    """The enabled instances of one configuration, as one worker sees them."""

    def __init__(self, config: Config, store: PinStore) -> None:
        self.config = config
        self.store = store
        self.ssl_context = unverified_context()
        # Created in the worker after gevent's patch: waiting greenlets yield.
        self.freed = threading.Condition()
        self.upstreams = [
            Upstream(spec, store, config, self.ssl_context, self.freed) for spec in config.enabled_instances
        ]
        #: The fan-out journal of this machine, when an allowed request is fanned out.
        self.journal = Journal(config.journal_dir) if config.fanout else None
        journal = self.journal
        self.selection = Selection(
            self.upstreams, self.freed, withheld=(lambda u: journal.withheld(u.name)) if journal is not None else None
        )
        #: Set by app.fanout once this worker's replay loop runs.
        self.replaying = False
        #: The node's runtime directory (None for a single process such as flask run).
        self.shared = node_directory()
        #: Set by app.probe once this worker's probe loops run.
        self.probing = False
        #: Disk this worker may fill with held bodies and answers (Limits spool_bytes).
        self.disk = DiskBudget(config.limits.spool_bytes)

    def no_instance(self, reasons: list[str]) -> NoInstanceAvailable:
        """503 listing *reasons*, with a Retry-After for when an instance may take requests again."""
        detail = "; ".join(dict.fromkeys(reasons)) if reasons else "no instance is enabled"
        return NoInstanceAvailable(
            f"No instance could take the request: {detail}.",
            retry_after=self.selection.retry_after(self.config.failover.cooldown),
        )
