"""Request-target spellings, byte for byte, against one real gunicorn balancer (docs/design.md, "Which requests pass").

Every row is sent over a raw socket, so no client library normalises the
target on the way. A refused row must leave the instance untouched; a passing
row must reach it exactly once, with the method and the raw request target
the instance saw compared as bytes (``REQUEST_URI`` of its werkzeug server).

The ``layer`` of each row says who answers: ``app`` (the balancer's JSON
errors), ``gunicorn`` (its own 400, before the application is called) or
``instance`` (forwarded).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import trustme
from werkzeug import Request, Response

from .support import Gunicorn, Instance, config_port, raw_request, write_config

ALLOWED = (
    ("GET", "/api/v.1.1/suppliers"),
    ("GET", "/api/{version}/suppliers"),
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/v2/items/"),
    # OPTIONS is listed on this path only: elsewhere it is refused with 405,
    # never answered by the balancer itself.
    ("OPTIONS", "/api/v2/items/"),
)


@dataclass(frozen=True)
class Row:
    id: str
    request_line: bytes
    status: int
    #: The JSON ``error`` code; None for a forwarded answer or gunicorn's own 400.
    error: str | None = None
    #: The request line the instance must see (method and raw target); None: nothing forwarded.
    forwarded: bytes | None = None
    allow: str | None = None
    layer: str = "app"
    body: bytes = b""


def ok(id: str, request_line: bytes, forwarded: bytes | None = None, body: bytes = b"") -> Row:
    """A row that reaches the instance, by default with the target unchanged."""
    return Row(id, request_line, 200, forwarded=forwarded or request_line, layer="instance", body=body)


def invalid(id: str, request_line: bytes) -> Row:
    return Row(id, request_line, 400, "invalid_path")


def not_allowed(id: str, request_line: bytes) -> Row:
    return Row(id, request_line, 404, "request_not_allowed")


def method(id: str, request_line: bytes, allow: str) -> Row:
    return Row(id, request_line, 405, "method_not_allowed", allow=allow)


def by_gunicorn(id: str, request_line: bytes) -> Row:
    return Row(id, request_line, 400, layer="gunicorn")


ROWS = [
    # -- passes, target unchanged --------------------------------------------------
    ok("exact", b"GET /api/v.1.1/suppliers"),
    ok("placeholder", b"GET /api/v2/suppliers"),
    ok("placeholder-with-dots-inside", b"GET /api/v.2.0/suppliers"),
    ok("placeholder-three-dots", b"GET /api/.../suppliers"),
    ok("query-order-and-repeats-kept", b"GET /api/v.1.1/suppliers?b=2&a=1&a=3&b="),
    ok("query-escapes-kept", b"GET /api/v.1.1/suppliers?q=a%20b%2Bc&plus=a+b&amp=%26"),
    ok("query-may-hold-slashes-and-dots", b"GET /api/v.1.1/suppliers?next=/a/../b//c&x=%2F"),
    ok("escaped-question-mark-stays-in-path", b"GET /api/v.1.1%3F/suppliers"),
    ok("escaped-dot-inside-a-segment", b"GET /api/v%2E1/suppliers"),
    ok("escaped-tilde", b"GET /api/v%7E1/suppliers"),
    ok("sub-delims-in-placeholder", b"GET /api/v1:a@b!$&'()*+,=/suppliers"),
    ok("escaped-utf8-in-placeholder", b"GET /api/v%C3%A9/suppliers"),
    # urllib3 upper-cases escapes, which RFC 3986 section 6.2.2.1 allows.
    ok("query-hex-case", b"GET /api/v.1.1/suppliers?a=%2e%2e%2f%c3%a9", b"GET /api/v.1.1/suppliers?a=%2E%2E%2F%C3%A9"),
    ok("query-escaped-nul-is-data", b"GET /api/v.1.1/suppliers?a=%00"),
    # RFC 3986 section 6.2.3: an empty query is not the same as none.
    ok("empty-query-kept", b"GET /api/v.1.1/suppliers?"),
    ok("head-where-get-listed", b"HEAD /api/v.1.1/suppliers"),
    ok("head-on-placeholder", b"HEAD /api/v7/suppliers"),
    ok("post-listed", b"POST /api/v9/lookup", body=b'{"ioc":"1.2.3.4"}'),
    ok("trailing-slash-listed", b"GET /api/v2/items/"),
    ok("options-where-listed", b"OPTIONS /api/v2/items/"),
    # -- 405 with Allow ---------------------------------------------------------------
    method("delete-not-listed", b"DELETE /api/v.1.1/suppliers", "GET, HEAD"),
    method("options-not-listed-here", b"OPTIONS /api/v.1.1/suppliers", "GET, HEAD"),
    method("get-where-only-post", b"GET /api/v9/lookup", "POST"),
    # HEAD: the 405 has no body to read the code from; status, type and Allow still count.
    method("head-where-only-post", b"HEAD /api/v9/lookup", "POST"),
    method("post-where-get-and-options", b"POST /api/v2/items/", "GET, HEAD, OPTIONS"),
    # -- 404 --------------------------------------------------------------------------
    not_allowed("unknown-path", b"GET /api/v.1.1/unknown"),
    not_allowed("root", b"GET /"),
    not_allowed("extra-trailing-slash", b"GET /api/v.1.1/suppliers/"),
    not_allowed("missing-trailing-slash-no-redirect", b"GET /api/v2/items"),
    not_allowed("options-missing-trailing-slash", b"OPTIONS /api/v2/items"),
    not_allowed("case-sensitive-prefix", b"GET /API/v.1.1/suppliers"),
    not_allowed("case-sensitive-last", b"GET /api/v.1.1/Suppliers"),
    not_allowed("params-make-another-segment", b"GET /api/v.1.1/suppliers;x=1"),
    not_allowed("placeholder-one-segment-only", b"GET /api/a/b/suppliers"),
    not_allowed("reserved-prefix", b"GET /_balancer/anything"),
    # -- 400 invalid_path: could mean another path ---------------------------------
    invalid("placeholder-dot", b"GET /api/./suppliers"),
    invalid("placeholder-dotdot", b"GET /api/../suppliers"),
    invalid("dotdot-back-to-allowed", b"GET /api/../api/v.1.1/suppliers"),
    invalid("dot-then-allowed", b"GET /api/./v.1.1/suppliers"),
    invalid("trailing-dot-segment", b"GET /api/v.1.1/suppliers/."),
    invalid("escaped-dotdot-lower", b"GET /api/%2e%2e/suppliers"),
    invalid("escaped-dot-upper", b"GET /api/%2E/suppliers"),
    invalid("dot-escaped-dot", b"GET /api/.%2e/suppliers"),
    invalid("escaped-dot-dot", b"GET /api/%2e./suppliers"),
    invalid("escaped-dotdot-back-to-allowed", b"GET /api/%2E%2E/api/v.1.1/suppliers"),
    invalid("double-escaped-dotdot", b"GET /api/%252e%252e/suppliers"),
    invalid("dotdot-params", b"GET /api/..;/v.1.1/suppliers"),
    invalid("dot-params", b"GET /api/.;x=1/suppliers"),
    invalid("escaped-slash-upper", b"GET /api/v.1.1%2Fsuppliers"),
    invalid("escaped-slash-lower", b"GET /api%2fv.1.1/suppliers"),
    invalid("double-escaped-slash", b"GET /api/v.1.1%252Fsuppliers"),
    invalid("escaped-backslash", b"GET /api/v.1.1%5Csuppliers"),
    invalid("escaped-backslash-lower", b"GET /api/v.1.1%5csuppliers"),
    invalid("literal-backslash", b"GET /api/v.1.1\\suppliers"),
    invalid("raw-brackets-in-path", b"GET /api/[v1]/suppliers"),
    invalid("raw-pipe-in-path", b"GET /api/v|1/suppliers"),
    # Not allowed raw in a query either; urllib3 would percent-encode them on
    # the way, so the instance would not see what the client sent.
    invalid("raw-brackets-and-pipe-in-query", b"GET /api/v.1.1/suppliers?a[]=1&b=x|y"),
    invalid("raw-braces-in-query", b"GET /api/v.1.1/suppliers?q={x}"),
    invalid("leading-empty-segment", b"GET //api/v.1.1/suppliers"),
    invalid("inner-empty-segment", b"GET /api//v.1.1/suppliers"),
    invalid("absolute-form", b"GET http://other/api/v.1.1/suppliers"),
    invalid("absolute-form-https", b"GET https://127.0.0.1/api/v.1.1/suppliers"),
    invalid("asterisk-form", b"OPTIONS *"),
    invalid("bad-escape", b"GET /api/v%zz/suppliers"),
    invalid("truncated-escape", b"GET /api/v.1.1/suppliers?q=%2"),
    invalid("fragment", b"GET /api/v.1.1/suppliers#x"),
    invalid("iis-unicode-escape", b"GET /api/%u002e%u002e/suppliers"),
    invalid("escaped-nul-in-placeholder", b"GET /api/v%00/suppliers"),
    invalid("escaped-nul-after-allowed", b"GET /api/v.1.1/suppliers%00.json"),
    invalid("double-escaped-nul", b"GET /api/v%2500/suppliers"),
    invalid("escaped-newline", b"GET /api/v%0a1/suppliers"),
    invalid("authority-form", b"CONNECT other:443"),
    # -- gunicorn's own 400, before the application is called -----------------
    by_gunicorn("non-ascii-byte", b"GET /api/v\xe9/suppliers"),
    by_gunicorn("non-ascii-byte-in-query", b"GET /api/v.1.1/suppliers?q=\xe9"),
    by_gunicorn("raw-nul", b"GET /api/v\x00/suppliers"),
    by_gunicorn("raw-tab", b"GET /api/v\t1/suppliers"),
    by_gunicorn("raw-del", b"GET /api/v\x7f/suppliers"),
    by_gunicorn("raw-space", b"GET /api/v 1/suppliers"),
    by_gunicorn("relative-target", b"GET api/v.1.1/suppliers"),
]


#: Rows the balancer gets wrong today, kept strict so they fail loudly once fixed.
KNOWN_DEVIATIONS: dict[str, str] = {}


def echo(request: Request) -> Response:
    """The instance's answer: what it received, as JSON."""
    return Response(
        json.dumps(
            {"method": request.method, "target": request.environ["REQUEST_URI"], "body": request.get_data(as_text=True)}
        ),
        content_type="application/json",
    )


@pytest.fixture(scope="module")
def instance(ca: trustme.CA) -> Iterator[Instance]:
    inst = Instance(ca)
    inst.server.expect_request(re.compile(".*", re.S)).respond_with_handler(echo)
    yield inst
    inst.stop()


@pytest.fixture(scope="module")
def balancer(instance: Instance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    directory: Path = tmp_path_factory.mktemp("paths")
    # The default scanners_count (10) is below the number of forwarded rows,
    # so a slot that is not given back shows here as a 503.
    config = write_config(directory, [instance], ALLOWED)
    g = Gunicorn(config, config_port(config), directory / "gunicorn.log").start()
    yield g
    g.stop()


def params() -> list:
    """One parameter per row, named after the layer that answers it."""
    return [
        pytest.param(
            row,
            id=f"{row.layer}-{row.id}",
            marks=[pytest.mark.xfail(reason=KNOWN_DEVIATIONS[row.id], raises=AssertionError, strict=True)]
            if row.id in KNOWN_DEVIATIONS
            else [],
        )
        for row in ROWS
    ]


@pytest.mark.parametrize("row", params())
def test_target(row: Row, balancer: Gunicorn, instance: Instance) -> None:
    instance.server.clear_log()
    head = [row.request_line + b" HTTP/1.1", f"Host: 127.0.0.1:{balancer.port}".encode(), b"Connection: close"]
    if row.body:
        head += [b"Content-Type: application/json", f"Content-Length: {len(row.body)}".encode()]
    resp = raw_request(balancer.port, b"\r\n".join(head) + b"\r\n\r\n" + row.body)

    assert resp.status == row.status, resp.body
    seen = [(req.method + " " + req.environ["REQUEST_URI"]).encode("latin-1") for req in instance.requests]
    if row.forwarded is None:
        assert seen == []
    else:
        assert seen == [row.forwarded]

    verb = row.request_line.split(b" ", 1)[0].decode()
    if row.layer == "instance":
        answer = {"method": verb, "target": row.forwarded.split(b" ", 1)[1].decode("latin-1"), "body": row.body.decode()}
        assert resp.header("Content-Type") == "application/json"
        if verb == "HEAD":
            # No body comes back; the relayed length is that of the echo the instance left out.
            assert resp.header("Content-Length") == str(len(json.dumps(answer)))
        else:
            assert resp.json() == answer
    elif row.layer == "app":
        assert resp.header("Content-Type") == "application/json"
        assert resp.all("Allow") == ([row.allow] if row.allow else [])
        if verb != "HEAD":
            body = resp.json()
            assert body["error"] == row.error
            assert isinstance(body["description"], str) and body["description"]
            if row.allow:
                assert body["allowed_methods"] == row.allow.split(", ")
    else:
        # gunicorn's refusal, written before any application code runs, in the balancer's JSON (app.worker).
        assert resp.header("Content-Type") == "application/json"
        if verb != "HEAD":
            assert resp.json()["error"] == "invalid_request"
