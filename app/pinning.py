"""A requests HTTPAdapter whose connections check the instance's pin before any request byte.

The check is a property of the connection (STYLE guideline 4):
:class:`PinningHTTPSConnection` runs it in ``connect()``, right after the TLS
handshake, on the socket that will carry the request. urllib3 connects a
pooled connection before writing the request line, so no code path can send
a byte to an instance whose certificate has not been accepted.

Chain, expiry and host name are not checked (``CERT_NONE``): the pin is the
identity (DESIGN section 3). A refusal is raised as a
:class:`~app.errors.BalancerError`, which is not an ``OSError`` and so
travels through urllib3 and requests untouched.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any, Callable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.util.ssl_ import create_urllib3_context

PinCheck = Callable[[bytes], object]


class PinningHTTPSConnection(HTTPSConnection):
    """An HTTPS connection that refuses to exist unless its peer matches the pin."""

    def __init__(self, *args: Any, pin_check: PinCheck, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pin_check = pin_check

    def connect(self) -> None:
        super().connect()
        try:
            der = self.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            if not der:
                raise ssl.SSLError("the instance presented no certificate")
            self._pin_check(der)
        except BaseException:
            self.close()
            raise
        # The pin, not a CA, verified this peer; saying so also keeps urllib3
        # from warning about an unverified request on every request.
        self.is_verified = True


class PinningHTTPSConnectionPool(HTTPSConnectionPool):
    """A pool whose connections are :class:`PinningHTTPSConnection`.

    ``pin_check`` arrives among the keyword arguments and urllib3 hands it to
    every connection it creates (``conn_kw``).
    """

    ConnectionCls = PinningHTTPSConnection  # type: ignore[assignment]


def unverified_context() -> ssl.SSLContext:
    """A client context that completes the handshake with any certificate; the pin decides."""
    return create_urllib3_context(cert_reqs=ssl.CERT_NONE)


class PinningAdapter(HTTPAdapter):
    """HTTPAdapter for one instance: every connection is checked by *pin_check*.

    Extends requests through its documented hook, ``init_poolmanager``; it
    keeps no per-request state, so greenlets can share it.
    """

    def __init__(self, pin_check: PinCheck, pool_maxsize: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pin_check = pin_check
        self._ssl_context = ssl_context or unverified_context()
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)

    def request_url(self, request: Any, proxies: Any) -> str:
        """The request target exactly as prepared: everything after the authority.

        requests' ``path_url`` rebuilds it with ``urlsplit`` and drops the
        ``?`` of an empty query (RFC 3986 section 6.2.3: not the same URI).
        """
        url: str = request.url
        return url[url.index("/", url.index("//") + 2) :]

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, ssl_context=self._ssl_context, **pool_kwargs)
        # pool_classes_by_scheme is a module-level dict in urllib3: assign a
        # new one, never mutate it. No "http" entry: instances speak HTTPS only.
        self.poolmanager.pool_classes_by_scheme = {
            "https": functools.partial(PinningHTTPSConnectionPool, pin_check=self._pin_check)
        }

