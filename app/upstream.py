"""The hop to the instances: one pinned requests session per instance, round-robin choice,
and the one place where requests' and urllib3's exceptions become balancer errors.
"""

from __future__ import annotations

import itertools
import random
import logging
import threading
from dataclasses import dataclass
from typing import IO, Iterator

import requests
import urllib3.exceptions
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from urllib3.util import SKIP_HEADER

from .config import Config, InstanceSpec
from .errors import BalancerError, InstanceFailed, InstanceTimeout, NoInstanceAvailable
from .pinning import PinningAdapter, unverified_context
from .pins import PinStore

log = logging.getLogger(__name__)


class NotSent(Exception):
    """The instance could not be reached; no byte of the request left the balancer."""

    def __init__(self, instance: InstanceSpec, reason: str) -> None:
        super().__init__(reason)
        self.instance = instance
        self.reason = reason


class Upstream:
    """One instance: its session with the pinning adapter, and its in-flight cap.

    Requests are sent with the adapter's ``send()``, not ``Session.send()``:
    the latter reads (and decodes) the body of every 3xx answer even when
    redirects are not followed, and stores the instance's cookies in a jar
    shared by all clients. The session only carries the mount, on the
    instance's URL with the trailing slash (``https://host:port`` would also
    match ``https://host:port0``).
    """

    def __init__(self, spec: InstanceSpec, store: PinStore, scanners_count: int, ssl_context: object) -> None:
        self.spec = spec
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = PinningAdapter(
            lambda der: store.check(spec, der),
            pool_maxsize=scanners_count,
            ssl_context=ssl_context,  # type: ignore[arg-type]
        )
        self.session.mount(spec.base_url, adapter)
        self.adapter = self.session.get_adapter(spec.base_url)
        assert isinstance(self.adapter, PinningAdapter)
        self.slots = threading.BoundedSemaphore(scanners_count)

    def send(self, prepared: PreparedRequest, timeout: tuple[float, float]) -> requests.Response:
        """Send *prepared* and return the answer with its body unread.

        Raises :class:`NotSent` when nothing was sent, a
        :class:`~app.errors.BalancerError` otherwise.
        """
        try:
            return self.adapter.send(prepared, stream=True, timeout=timeout, verify=False)
        except BalancerError:
            raise
        except requests.RequestException as exc:
            raise translate(self.spec, exc) from exc

    def close(self) -> None:
        self.session.close()


def translate(spec: InstanceSpec, exc: requests.RequestException) -> Exception:
    """The balancer's view of a requests exception: NotSent, or a client-facing error."""
    reason = _reason(exc)
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)) or isinstance(
        reason, urllib3.exceptions.NewConnectionError
    ):
        return NotSent(spec, _describe(reason))
    if isinstance(exc, requests.ReadTimeout):
        return InstanceTimeout(
            f"The instance {spec.name} did not answer in time.", spec.host, spec.api_port
        )
    return InstanceFailed(
        f"The instance {spec.name} failed after the request was sent: {_describe(reason)}.",
        spec.host,
        spec.api_port,
    )


def _reason(exc: BaseException) -> BaseException:
    """The innermost urllib3 or OS error behind a requests exception."""
    seen = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if isinstance(seen, urllib3.exceptions.MaxRetryError) and seen.reason is not None:
        seen = seen.reason
    return seen


def _describe(reason: BaseException) -> str:
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return "connection failed"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "connection timed out"
    if isinstance(reason, urllib3.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return "connection lost"
    return type(reason).__name__


@dataclass(frozen=True)
class Outgoing:
    """What to send, independent of which instance gets it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: "bytes | IO[bytes] | None"

    def prepare(self, upstream: Upstream, host_header: str) -> PreparedRequest:
        """A PreparedRequest for *upstream*, built field by field.

        ``Request.prepare()`` would re-quote the target and, for a streamed
        body, add ``Transfer-Encoding: chunked`` beside our Content-Length.
        """
        headers = CaseInsensitiveDict(self.headers)
        headers["Host"] = host_header
        # urllib3 would add a User-Agent and http.client an Accept-Encoding
        # the client never sent (DESIGN section 5).
        headers.setdefault("User-Agent", SKIP_HEADER)
        headers.setdefault("Accept-Encoding", SKIP_HEADER)
        prepared = PreparedRequest()
        prepared.method = self.method
        prepared.url = upstream.spec.base_url[:-1] + self.target
        prepared.headers = headers
        prepared.body = self.body  # type: ignore[assignment]
        return prepared


class Balancer:
    """The enabled instances of one configuration, chosen in turn."""

    def __init__(self, config: Config, store: PinStore) -> None:
        context = unverified_context()
        self.config = config
        self.store = store
        self.upstreams = [
            Upstream(spec, store, config.balancer.scanners_count, context) for spec in config.enabled_instances
        ]
        # Each worker starts at a random place in the turn, so that workers
        # that see little traffic do not all send their first requests to
        # the first instance.
        self._turn = itertools.count(random.randrange(max(len(self.upstreams), 1)))

    def candidates(self) -> Iterator[Upstream]:
        """Every enabled instance once, starting with the next in turn."""
        n = len(self.upstreams)
        if not n:
            return iter(())
        start = next(self._turn) % n
        return (self.upstreams[(start + i) % n] for i in range(n))

    def no_instance(self, reasons: list[str]) -> NoInstanceAvailable:
        detail = "; ".join(reasons) if reasons else "no instance is enabled"
        return NoInstanceAvailable(f"No instance could take the request: {detail}.")

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close()
