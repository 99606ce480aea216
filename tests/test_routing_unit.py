"""Route matching and header policy as plain functions: no server, no network."""

from __future__ import annotations

import re

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from pathlib import Path

from app.settings import AllowedRequest, BalancerSpec, Config, InstanceSpec
from app.errors import InvalidPath
from app.factory import create_app
from app.headers import (
    HOP_BY_HOP,
    host_header,
    request_headers,
    response_headers,
)
from app.routing import CONVERTERS, SegmentConverter, check_target, raw_target, to_rule

pytestmark = pytest.mark.unit

# -- check_target -------------------------------------------------------------------

PASSING = [
    "/",
    "/api/v.1.1/suppliers",
    "/api/v2/items/",
    "/api/.../suppliers",
    "/api/.a/..b/suppliers",
    "/api/v%2E1/suppliers",
    "/api/v%7e1/suppliers",
    "/api/v.1.1%3F/suppliers",
    "/api/a;b=c/suppliers",
    "/api/v.1.1/suppliers?b=2&a=1&a=3",
    "/api/v.1.1/suppliers?q=a%20b%2Bc",
    "/api/v.1.1/suppliers?next=/a/../b//c&x=%2F&y=%2e%2e&z=%00",
    "/api/v1:a@b!$&'()*+,=/suppliers",
    "/api/v.1.1/suppliers?",
    "/a%20b",
]


@pytest.mark.parametrize("target", PASSING)
def test_check_target_returns_target_unchanged(target: str) -> None:
    assert check_target(target) == target


REFUSED = [
    # absolute, authority and asterisk forms
    ("http://other/api/v.1.1/suppliers", "absolute and asterisk forms"),
    ("https://127.0.0.1/api", "absolute and asterisk forms"),
    ("other:443", "absolute and asterisk forms"),
    ("*", "absolute and asterisk forms"),
    ("", "absolute and asterisk forms"),
    ("api/v.1.1/suppliers", "absolute and asterisk forms"),
    # dot segments, literal, escaped, escaped twice, behind ;params
    ("/api/./suppliers", "dot segment"),
    ("/api/../suppliers", "dot segment"),
    ("/api/../api/v.1.1/suppliers", "dot segment"),
    ("/..", "dot segment"),
    ("/.", "dot segment"),
    ("/api/v.1.1/suppliers/..", "dot segment"),
    ("/api/v.1.1/suppliers/.", "dot segment"),
    ("/api/%2e%2e/suppliers", "dot segment"),
    ("/api/%2E/suppliers", "dot segment"),
    ("/api/.%2e/suppliers", "dot segment"),
    ("/api/%2e./suppliers", "dot segment"),
    ("/api/%252e%252e/suppliers", "dot segment"),
    ("/api/%252E/suppliers", "dot segment"),
    ("/api/..;/v.1.1/suppliers", "dot segment"),
    ("/api/.;x=1/suppliers", "dot segment"),
    ("/api/%2e%2e;x/suppliers", "dot segment"),
    # escaped separators
    ("/api%2fv.1.1/suppliers", "escaped '/'"),
    ("/api/v.1.1%2Fsuppliers", "escaped '/'"),
    ("/api/v.1.1%252Fsuppliers", "escaped '/'"),
    ("/api/v.1.1%5Csuppliers", "escaped '/'"),
    ("/api/v.1.1%5csuppliers", "escaped '/'"),
    ("/api/v.1.1%255csuppliers", "escaped '/'"),
    # escaped control characters in the path
    ("/api/v%00/suppliers", "escaped control character"),
    ("/api/v.1.1/suppliers%00.json", "escaped control character"),
    ("/api/v%2500/suppliers", "escaped control character"),
    ("/api/v%0A/suppliers", "escaped control character"),
    ("/api/v%0d/suppliers", "escaped control character"),
    ("/api/v%1f/suppliers", "escaped control character"),
    ("/api/v%7F/suppliers", "escaped control character"),
    # empty segments
    ("//api/v.1.1/suppliers", "empty segment"),
    ("/api//v.1.1/suppliers", "empty segment"),
    ("/api/v.1.1//", "empty segment"),
    # characters not allowed raw
    ("/api/v.1.1\\suppliers", "must be percent-encoded"),
    ("/api/v.1.1/suppliers#x", "not allowed in a URI"),
    ("/api/v.1.1/suppliers?q=#", "not allowed in a URI"),
    ("/api/v 1/suppliers", "not allowed in a URI"),
    ("/api/v\t1/suppliers", "not allowed in a URI"),
    ("/api/v\x00/suppliers", "not allowed in a URI"),
    ("/api/v\x7f/suppliers", "not allowed in a URI"),
    ("/api/v\xe9/suppliers", "not allowed in a URI"),
    ("/api/v.1.1/suppliers?q=\xe9", "not allowed in a URI"),
    ("/api/v.1.1/suppliers?x=a|b^c&y[]=1", "must be percent-encoded"),
    ("/api/{version}/suppliers", "must be percent-encoded"),
    ("/api/v|1/suppliers", "must be percent-encoded"),
    ("/api/[v1]/suppliers", "must be percent-encoded"),
    ("/api/v1]/suppliers", "must be percent-encoded"),
    ("/api/v<1>/suppliers", "must be percent-encoded"),
    ('/api/"v1"/suppliers', "must be percent-encoded"),
    ("/api/v^1/suppliers", "must be percent-encoded"),
    ("/api/`v1`/suppliers", "must be percent-encoded"),
    # bad escapes
    ("/api/v%zz/suppliers", "does not start an escape"),
    ("/api/%u002e%u002e/suppliers", "does not start an escape"),
    ("/api/v.1.1/suppliers?q=%2", "does not start an escape"),
    ("/api/v.1.1/suppliers%", "does not start an escape"),
]


@pytest.mark.parametrize(("target", "reason"), REFUSED)
def test_check_target_refuses(target: str, reason: str) -> None:
    with pytest.raises(InvalidPath) as info:
        check_target(target)
    assert reason in info.value.description
    assert info.value.status == 400
    assert info.value.body() == {"error": "invalid_path", "description": info.value.description}


def test_escaped_control_characters_are_data_in_the_query() -> None:
    # Only the path decides which resource is meant; the query goes on as sent.
    assert check_target("/a?x=%00%0a%7f%2F%5C") == "/a?x=%00%0a%7f%2F%5C"


def test_escapes_that_are_not_controls_pass_in_the_path() -> None:
    for escape in ("%20", "%21", "%2B", "%7E", "%80", "%C3%A9", "%FF", "%2520"):
        target = f"/a{escape}b"
        assert check_target(target) == target


# -- raw_target ------------------------------------------------------------------------


def test_raw_target_prefers_gunicorn_raw_uri() -> None:
    environ = {"RAW_URI": "/api/%2e%2e/x?a=1", "REQUEST_URI": "/other", "PATH_INFO": "/api/../x", "QUERY_STRING": "a=1"}
    assert raw_target(environ) == "/api/%2e%2e/x?a=1"


def test_raw_target_uses_request_uri_without_raw_uri() -> None:
    assert raw_target({"REQUEST_URI": "/a%2Fb", "PATH_INFO": "/a/b"}) == "/a%2Fb"


def test_raw_target_rebuilt_from_path_info_when_no_raw_form() -> None:
    # PATH_INFO is latin-1 decoded bytes: "é" in UTF-8 arrives as two characters.
    environ = {"PATH_INFO": "/a b/\xc3\xa9/../c", "QUERY_STRING": "x=%20&y"}
    assert raw_target(environ) == "/a%20b/%C3%A9/../c?x=%20&y"
    assert raw_target({"PATH_INFO": "/a", "QUERY_STRING": ""}) == "/a"


# -- to_rule and the {name} converter ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/api/v.1.1/suppliers", "/api/v.1.1/suppliers"),
        ("/api/{version}/suppliers", "/api/<segment:version>/suppliers"),
        ("/api/{version}/lookup/{id}", "/api/<segment:version>/lookup/<segment:id>"),
        ("/api/{_v2}/", "/api/<segment:_v2>/"),
        ("/", "/"),
    ],
)
def test_to_rule(path: str, rule: str) -> None:
    assert to_rule(path) == rule


def test_to_rule_leaves_what_is_not_a_placeholder() -> None:
    assert to_rule("/api/{2x}/a") == "/api/{2x}/a"
    assert to_rule("/api/{}/a") == "/api/{}/a"


SEGMENT = re.compile(SegmentConverter.regex)


@pytest.mark.parametrize("segment", ["v1", "v.1.1", "...", ".a", "a.", "..a", "a..", "%2e%2e", "a;b", "~", "é"])
def test_segment_regex_matches_one_segment(segment: str) -> None:
    assert SEGMENT.fullmatch(segment)


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b", "/a", "a/", "./a", "../a"])
def test_segment_regex_refuses(segment: str) -> None:
    assert SEGMENT.fullmatch(segment) is None


def test_segment_converter_isolates_parts() -> None:
    assert SegmentConverter.part_isolating is True
    assert CONVERTERS == {"segment": SegmentConverter}


ALLOWED = (
    AllowedRequest("GET", "/api/v.1.1/suppliers", 1),
    AllowedRequest("GET", "/api/{version}/suppliers", 2),
    AllowedRequest("POST", "/api/{version}/lookup", 3),
    AllowedRequest("OPTIONS", "/api/v2/items/", 4),
)


@pytest.fixture
def urls(tmp_path: Path):
    """The url_map of the app itself, as create_app() wires AllowedRequests into it."""
    config = Config(
        path=tmp_path / "kl_balancer.conf",
        balancer=BalancerSpec("127.0.0.1", 9443, 9999, 9998, 10),
        cert_dir=tmp_path / "certs",
        instances=(InstanceSpec("192.0.2.10", 443, 9999, True),),
        allowed=ALLOWED,
    )
    return create_app(config).url_map.bind("balancer", "/")


def test_rules_match_placeholders_on_decoded_path(urls) -> None:
    assert urls.match("/api/v.1.1/suppliers", "GET") == ("proxy.forward", {})
    assert urls.match("/api/v7/suppliers", "GET") == ("proxy.forward", {"version": "v7"})
    assert urls.match("/api/.../suppliers", "HEAD") == ("proxy.forward", {"version": "..."})
    assert urls.match("/api/v7/lookup", "POST") == ("proxy.forward", {"version": "v7"})
    assert urls.match("/api/v2/items/", "OPTIONS") == ("proxy.forward", {})


@pytest.mark.parametrize(
    "path",
    ["/api/./suppliers", "/api/../suppliers", "/api//suppliers", "/api/a/b/suppliers", "/API/v1/suppliers", "/api/v1/suppliers/"],
)
def test_rules_do_not_match(urls, path: str) -> None:
    with pytest.raises(NotFound):
        urls.match(path, "GET")


def test_missing_trailing_slash_is_not_redirected_by_werkzeug_alone(urls) -> None:
    # werkzeug answers with a redirect here; app.proxy turns it into a 404.
    with pytest.raises(RequestRedirect):
        urls.match("/api/v2/items", "OPTIONS")


def test_head_where_get_listed_and_options_only_where_listed(urls) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        urls.match("/api/v.1.1/suppliers", "OPTIONS")
    assert sorted(info.value.valid_methods) == ["GET", "HEAD"]
    with pytest.raises(MethodNotAllowed) as info:
        urls.match("/api/v1/lookup", "HEAD")
    assert sorted(info.value.valid_methods) == ["POST"]


# -- headers: hop by hop ------------------------------------------------------------------


def test_fixed_hop_by_hop_set() -> None:
    assert HOP_BY_HOP == {
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


def test_names_listed_in_connection_are_hop_by_hop_whatever_their_case() -> None:
    headers = [
        ("CONNECTION", "X-Trace , keep-alive,,  Foo-Bar"),
        ("connection", "close"),
        ("X-Trace", "1"),
        ("foo-bar", "2"),
        ("Close", "3"),
        ("Accept", "*/*"),
    ]
    assert response_headers(headers) == [("Accept", "*/*")]
    assert request_headers(headers, client_addr="192.0.2.1", client_proto="http", client_host=None, content_length=None) == [
        ("Accept", "*/*"),
        ("X-Forwarded-For", "192.0.2.1"),
        ("X-Forwarded-Proto", "http"),
    ]


def test_hop_by_hop_headers_are_dropped_in_both_spellings_both_ways() -> None:
    headers = [
        ("Accept", "*/*"),
        ("Connection", "x-Secret"),
        ("X-SECRET", "1"),
        ("x-secret", "2"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("keep-alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Trailer", "X-Sum"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("Proxy-Authenticate", "Basic"),
        ("X-Secretive", "kept"),
    ]
    assert response_headers(headers) == [("Accept", "*/*"), ("X-Secretive", "kept")]
    forwarded = request_headers(headers, client_addr="::1", client_proto="http", client_host=None, content_length=None)
    assert forwarded[:2] == [("Accept", "*/*"), ("X-Secretive", "kept")]


def test_answer_headers_keep_duplicates_and_order() -> None:
    headers = [
        ("Set-Cookie", "a=1; Path=/"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Vary", "Accept"),
        ("Vary", "Cookie"),
    ]
    assert response_headers(headers) == headers
    assert response_headers(iter(headers)) == headers


# -- headers: request to the instance --------------------------------------------------


def test_request_headers_exact() -> None:
    client = [
        ("Host", "balancer.example:9443"),
        ("Authorization", "Bearer abc.DEF/ghi=="),
        ("X-Forwarded-For", "198.51.100.7"),
        ("Content-Length", "999"),
        ("Expect", "100-continue"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "gone"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("X-Forwarded-Proto", "gopher"),
        ("X-Forwarded-Host", "evil.example"),
        ("Accept", "application/json"),
        ("X-Forwarded-For", "203.0.113.9, 10.0.0.1"),
        ("Transfer-Encoding", "chunked"),
    ]
    out = request_headers(
        client,
        client_addr="192.0.2.1",
        client_proto="https",
        client_host="balancer.example:9443",
        content_length=17,
        from_front_proxy=True,
    )
    assert out == [
        ("Authorization", "Bearer abc.DEF/ghi=="),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Accept", "application/json"),
        ("Content-Length", "17"),
        ("X-Forwarded-For", "198.51.100.7, 203.0.113.9, 10.0.0.1, 192.0.2.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "balancer.example:9443"),
    ]


def test_request_headers_from_a_client_drop_its_forwarding_chain_and_rewriters() -> None:
    """A peer that is not a FrontProxy: its X-Forwarded-For is forged as far as the balancer knows."""
    client = [
        ("X-Forwarded-For", "198.51.100.7"),
        ("Forwarded", "for=10.0.0.1"),
        ("X-Real-IP", "10.0.0.1"),
        ("x-forwarded-port", "443"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("Accept", "*/*"),
    ]
    out = request_headers(client, client_addr="192.0.2.1", client_proto="http", client_host=None, content_length=None)
    assert out == [("Accept", "*/*"), ("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-Proto", "http")]


def test_request_headers_minimal_adds_only_forwarding() -> None:
    out = request_headers([("Host", "x")], client_addr="::1", client_proto="http", client_host=None, content_length=None)
    assert out == [("X-Forwarded-For", "::1"), ("X-Forwarded-Proto", "http")]


def test_request_headers_zero_length_is_sent() -> None:
    out = request_headers([], client_addr="192.0.2.1", client_proto="http", client_host="h", content_length=0)
    assert out == [
        ("Content-Length", "0"),
        ("X-Forwarded-For", "192.0.2.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "h"),
    ]


def test_request_headers_do_not_change_their_input() -> None:
    client = [("X-Forwarded-For", "198.51.100.7"), ("Accept", "*/*")]
    request_headers(client, client_addr="192.0.2.1", client_proto="http", client_host="h", content_length=None)
    assert client == [("X-Forwarded-For", "198.51.100.7"), ("Accept", "*/*")]


# -- headers: answer from the instance ----------------------------------------------------


def test_response_headers_exact() -> None:
    instance = [
        ("Date", "Wed, 01 Jan 2025 00:00:00 GMT"),
        ("Server", "CyberTrace"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Connection", "keep-alive, X-Internal"),
        ("Keep-Alive", "timeout=5"),
        ("X-Internal", "secret"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "b=2"),
        ("Location", "/api/v.1.1/suppliers?page=2"),
        ("server", "again"),
    ]
    assert response_headers(instance) == [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Location", "/api/v.1.1/suppliers?page=2"),
    ]


# -- headers: Host for the instance --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "value"),
    [
        ("192.0.2.10", 443, "192.0.2.10"),
        ("192.0.2.10", 8443, "192.0.2.10:8443"),
        ("ct.example", 443, "ct.example"),
        ("ct.example", 80, "ct.example:80"),
        ("::1", 443, "[::1]"),
        ("2001:db8::10", 9443, "[2001:db8::10]:9443"),
    ],
)
def test_host_header(host: str, port: int, value: str) -> None:
    assert host_header(host, port) == value
