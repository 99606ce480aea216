"""Header policy for both hops: what is dropped, what is set, what is added.

One hop-by-hop rule serves both directions (RFC 9110 section 7.6.1): the
fixed set, ``Proxy-Connection``, and every name the ``Connection`` header
lists. Everything else goes on as sent, duplicates included.
"""

from __future__ import annotations

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

# The server in front of the application always writes its own Date and
# Server; relaying the instance's as well would send each twice.
_RESPONSE_RECOMPUTED = frozenset({"date", "server"})

Headers = list[tuple[str, str]]


def hop_by_hop(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Lower-cased names that concern this hop only, for this message."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | listed


def end_to_end(headers: Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()) -> Headers:
    """The headers that travel past this hop, in order, duplicates kept."""
    headers = list(headers)
    drop = hop_by_hop(headers) | also_drop
    return [(name, value) for name, value in headers if name.lower() not in drop]


def request_headers(
    client_headers: Iterable[tuple[str, str]],
    *,
    client_addr: str,
    client_proto: str,
    client_host: str | None,
    content_length: int | None,
) -> Headers:
    """Headers for the request to an instance, less ``Host`` (set per instance).

    ``X-Forwarded-For`` keeps what earlier proxies wrote and appends the
    client's address; ``-Proto`` and ``-Host`` describe the request the
    balancer received.
    """
    out = end_to_end(client_headers, _REQUEST_RECOMPUTED)
    forwarded_for = [v for n, v in out if n.lower() == "x-forwarded-for"]
    out = [(n, v) for n, v in out if n.lower() != "x-forwarded-for"]
    if content_length is not None:
        out.append(("Content-Length", str(content_length)))
    out.append(("X-Forwarded-For", ", ".join([*forwarded_for, client_addr])))
    out.append(("X-Forwarded-Proto", client_proto))
    if client_host:
        out.append(("X-Forwarded-Host", client_host))
    return out


def response_headers(instance_headers: Iterable[tuple[str, str]]) -> Headers:
    """Headers of an instance's answer, as relayed to the client."""
    return end_to_end(instance_headers, _RESPONSE_RECOMPUTED)


def host_header(host: str, port: int) -> str:
    """``Host`` for an HTTPS instance (RFC 9110 section 7.2: port omitted when 443)."""
    name = f"[{host}]" if ":" in host else host
    return name if port == 443 else f"{name}:{port}"
