"""Header policy for both hops: what is dropped, what is set, what is added.

One hop-by-hop rule serves both directions (RFC 9110 section 7.6.1): the
fixed set, ``Proxy-Connection``, and every name the ``Connection`` header
lists. Everything else goes on as sent, duplicates included.
"""

from __future__ import annotations

import re
from typing import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Set by the balancer for the next hop, whatever the client sent:
# Host names the instance; Content-Length is recomputed from the body the
# balancer sends; Expect was already answered by the server in front of the
# application, and the instance cannot answer it through urllib3.
_REQUEST_RECOMPUTED = frozenset({"host", "content-length", "expect", "x-forwarded-proto", "x-forwarded-host"})

# Headers with which a client could make an instance, or a proxy in front of
# it, act on another path, method, address or port than the balancer checked
# (docs/design.md, "Hostile clients"): never forwarded, whoever sent them.
_REQUEST_REWRITERS = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)

# The server in front of the application always writes its own Date and
# Server; relaying the instance's as well would send each twice.
_RESPONSE_RECOMPUTED = frozenset({"date", "server"})

Headers = list[tuple[str, str]]

# What each direction drops when no Connection header lists more names:
# computed once, not per message.
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_RECOMPUTED | _REQUEST_REWRITERS
_RESPONSE_DROP = HOP_BY_HOP | _RESPONSE_RECOMPUTED


def _listed(values: Iterable[str]) -> set[str]:
    """Lower-cased names listed in ``Connection`` header values."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def _keyed(headers: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str, str]], frozenset[str] | set[str]]:
    """(lower-cased name, name, value) of each header, and the names its Connection headers list."""
    keyed = [(name.lower(), name, value) for name, value in headers]
    connection = [value for key, _, value in keyed if key == "connection"]
    return keyed, (_listed(connection) if connection else frozenset())


def request_headers(
    client_headers: Iterable[tuple[str, str]],
    *,
    client_addr: str,
    client_proto: str,
    client_host: str | None,
    content_length: int | None,
    from_front_proxy: bool = False,
) -> Headers:
    """Headers for the request to an instance, less ``Host`` (set per instance).

    ``X-Forwarded-For`` is the peer's address, appended to what the peer
    sent only when it is a configured front proxy (*from_front_proxy*):
    anyone else could forge the leftmost entry an instance may log or trust.
    ``-Proto`` and ``-Host`` describe the request the balancer received
    (*client_host* already checked by :func:`valid_host`).
    """
    keyed, listed = _keyed(client_headers)
    drop = _REQUEST_DROP | listed if listed else _REQUEST_DROP
    out = []
    forwarded_for = []
    for key, name, value in keyed:
        if key in drop:
            continue
        if key == "x-forwarded-for":
            if from_front_proxy:
                forwarded_for.append(value)
        else:
            out.append((name, value))
    if content_length is not None:
        out.append(("Content-Length", str(content_length)))
    forwarded_for.append(client_addr)
    out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", client_proto))
    if client_host:
        out.append(("X-Forwarded-Host", client_host))
    return out


def response_headers(instance_headers: Iterable[tuple[str, str]]) -> Headers:
    """Headers of an instance's answer, as relayed to the client."""
    keyed, listed = _keyed(instance_headers)
    drop = _RESPONSE_DROP | listed if listed else _RESPONSE_DROP
    return [(name, value) for key, name, value in keyed if key not in drop]


# RFC 9112 section 3.2 and RFC 3986 section 3.2.2: a reg-name or IPv4 address, or
# an IP literal in brackets, then an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")


def valid_host(value: str) -> bool:
    """Whether *value* is a syntactically valid ``Host`` field value."""
    return len(value) <= 255 and _HOST.fullmatch(value) is not None


def host_header(host: str, port: int) -> str:
    """``Host`` for an HTTPS instance (RFC 9110 section 7.2: port omitted when 443)."""
    name = f"[{host}]" if ":" in host else host
    return name if port == 443 else f"{name}:{port}"
