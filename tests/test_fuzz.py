"""Property tests (hypothesis): the configuration loader and the request-target rules (docs/design.md, "Hostile clients").

Bounded in CI (200 examples per property); ``HYPOTHESIS_PROFILE=long`` runs
20000 (see :mod:`tests.hypothesis_profiles`).

* The loader, given arbitrary bytes or a valid file mutated at random, either
  returns a configuration or raises :class:`ConfigError` with a one-line
  message naming the file; nothing else escapes (gunicorn.conf.py turns only
  ConfigError into the one-line start-up error).
* A request target is forwarded only if it means nothing but itself: it
  equals its RFC 3986 normal form (percent-decoding unreserved characters,
  remove_dot_segments), decoding any number of times reveals no dot segment,
  separator, backslash or empty segment, and the decoded path matches an
  AllowedRequests entry for the method, checked here by an independent
  matcher. Requests go through the real application (``create_app``) with
  the WSGI environment gunicorn would build; its single instance listens on
  no port, so a request that passes every check ends in 503
  ``no_instance_available`` and is recorded where urllib3 would send it.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, unquote_to_bytes

import pytest
from gunicorn.util import split_request_uri, unquote_to_wsgi_str
from hypothesis import given
from hypothesis import strategies as st
from urllib3.connectionpool import HTTPConnectionPool

from app.loader import ConfigError, load
from app.settings import Config

from . import hypothesis_profiles
from .support import ROOT, Spec, free_port, write_config

hypothesis_profiles.load()


# -- (a) the configuration loader -------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz-config")
    (directory / "balancer_cert.pem").write_text("not parsed by the loader\n")
    (directory / "balancer_key.pem").write_text("not parsed by the loader\n")
    return directory


@pytest.fixture(scope="module")
def seed_texts(workdir: Path) -> list[str]:
    """Valid configurations to mutate: the documented example, and a dense one with TLS and extras.

    Made once: hypothesis replays examples and needs the same seeds each time.
    """
    dense = write_config(
        workdir,
        [Spec("127.0.0.1", 8443, 9999), Spec("::1", 443, 9998, enabled=False), Spec("ti-1.example", 1, 7)],
        [("GET", "/api/v.1.1/suppliers"), ("POST", "/api/{version}/lookup"), ("OPTIONS", "/a/b/")],
        api_port=9443,
        tls=(workdir / "balancer_cert.pem", workdir / "balancer_key.pem"),
        extra='  <Timeouts connect="2.5" read="30"/>\n  <EventDelimiter>\\|</EventDelimiter>\n',
    ).read_text()
    return [(ROOT / "config" / "kl_balancer.conf").read_text(), dense]


#: Pieces a mutation inserts or puts in place of a value: XML syntax, odd
#: characters, numbers at and past their limits, hosts, paths and names.
TOKENS = [
    "", " ", "\t", "\n", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028", "\ufeff", "é",
    "\U0001f600", "<", ">", "&", "&amp;", "&lt;", "&#0;", "&#x1F600;", "&#xD800;", "&#x85;", "&#x2028;", "&#13;",
    "&undefined;", '"', "'", "<!--", "-->", "<!-- x -->", "<![CDATA[x]]>", "<![CDATA[\n]]>", "<?pi x?>",
    '<?xml version="1.0"?>', '<?xml version="1.0" encoding="latin-1"?>', "<!DOCTYPE Config>",
    '<!DOCTYPE x [<!ENTITY e "v">]>', "&e;", "<Balancer/>", "<Instance/>", "<Instances/>", "<Request/>",
    "<Timeouts/>", "<Workers>2</Workers>", "<x:Balancer xmlns:x='urn:x'/>", "</Config>", "<Config>",
    "0", "-1", "1", "65535", "65536", "99999999999999999999", "1e3", "0x10", " 80 ", "\u0663", "\u00b2",
    "nan", "inf", "-inf", "0.0", "3600", "3600.0001", "1e-320", "true", "false", "TRUE", "yes",
    "127.0.0.1", "::1", "[::1]", "fe80::1%eth0", "999.1.1.1", "a..b", "-a", "a" * 64, "x" * 300,
    "/" + "a" * 300, "a/" * 2100, "/api/{v}", "/api/{v}/{v}", "/{", "/}", "/api/../x", "//", "/_balancer/x",
    "%2F", "GET", "TRACE", "get",
]

_SLOT = re.compile(r'(?<==")[^"]*(?=")|(?<=>)[^<>]+(?=</)')


@st.composite
def mutated(draw: st.DrawFn, seed_texts: list[str]) -> bytes:
    """A valid configuration with a few values replaced and a few edits anywhere, in some encoding."""
    text = draw(st.sampled_from(seed_texts))
    token = st.one_of(
        st.sampled_from(TOKENS),
        st.text(max_size=12),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "/", "9", "<a>", "&amp;", " "]), st.integers(1, 5000)),
    )
    slots = list(_SLOT.finditer(text))
    for match in sorted(draw(st.lists(st.sampled_from(slots), max_size=4, unique_by=lambda m: m.start())),
                        key=lambda m: m.start(), reverse=True):
        text = text[: match.start()] + draw(token) + text[match.end() :]
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate"]))
        size = draw(st.integers(0, 200))
        if kind == "insert":
            text = text[:at] + draw(token) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + size :]
        else:
            text = text[:at] + text[at : at + size] * 2 + text[at + size :]
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


def assert_config_or_one_line_error(directory: Path, data: bytes) -> None:
    path = directory / "kl_balancer.conf"
    path.write_bytes(data)
    try:
        config = load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}:") or message.startswith(f"{path} "), message
        # One line in any log viewer: no CR, LF, NEL, LS, PS, VT, FF or file separators either.
        assert message.splitlines() == [message], repr(message)
        return
    assert isinstance(config, Config)
    assert config.instances


@given(data=st.binary(max_size=4096))
def test_loader_on_arbitrary_bytes(workdir: Path, data: bytes) -> None:
    assert_config_or_one_line_error(workdir, data)


@given(data=st.data())
def test_loader_on_mutated_valid_files(workdir: Path, seed_texts: list[str], data: st.DataObject) -> None:
    assert_config_or_one_line_error(workdir, data.draw(mutated(seed_texts)))


def test_seeds_are_valid(workdir: Path, seed_texts: list[str]) -> None:
    """The mutations start from files that load: otherwise the property only ever sees errors."""
    for text in seed_texts:
        (workdir / "kl_balancer.conf").write_text(text)
        assert isinstance(load(workdir / "kl_balancer.conf"), Config)


def test_tls_path_too_long_for_the_file_system_is_a_config_error(workdir: Path, seed_texts: list[str]) -> None:
    """Found by the mutation property: Path.is_file() raises ENAMETOOLONG where it would say False."""
    text = seed_texts[1].replace(str(workdir / "balancer_cert.pem"), "x" * 300)
    assert "x" * 300 in text
    path = workdir / "kl_balancer.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"<SSLCertificatePath> '.*x{300}' is not a readable file; expected a PEM file"):
        load(path)


# -- (b) which request targets pass ------------------------------------------------------------

ALLOWED = (
    ("GET", "/api/v.1.1/suppliers"),
    ("GET", "/api/{version}/suppliers"),
    ("POST", "/api/{version}/lookup"),
    ("GET", "/e/{x}"),
    ("GET", "/e/f/"),
    ("GET", "/.e/c"),
    ("GET", "/{a}/{b}/c"),
    ("POST", "/e..f"),
)
METHODS = ("GET", "HEAD", "POST", "PUT", "OPTIONS")

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def normalise_escapes(path: str) -> str:
    """RFC 3986 section 6.2.2.2: decode escaped unreserved characters, upper-case the other escapes."""

    def one(m: re.Match[str]) -> str:
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else "%" + m.group(1).upper()

    return _ESCAPE.sub(one, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, step by step."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out += inp[:end]
            inp = inp[end:]
    return out


def decoded_forms(path: str) -> list[str]:
    """*path* decoded once, twice... until nothing changes (at most 5 rounds)."""
    forms = [path]
    for _ in range(5):
        nxt = unquote(forms[-1], encoding="latin-1")
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    return forms


def matches_rule(method: str, decoded_path: str) -> bool:
    """An independent matcher: literal segments equal, {name} one non-empty segment other than . and .."""
    segments = decoded_path.split("/")[1:]
    for rule_method, rule in ALLOWED:
        if method != rule_method and not (method == "HEAD" and rule_method == "GET"):
            continue
        pattern = rule.split("/")[1:]
        if len(pattern) != len(segments):
            continue
        if all(
            (p.startswith("{") and s not in ("", ".", "..")) if p.startswith("{") else p == s
            for p, s in zip(pattern, segments)
        ):
            return True
    return False


def assert_means_only_itself(method: str, target: str) -> None:
    """The invariant every forwarded target must satisfy."""
    assert target.startswith("/") and "#" not in target
    path = target.split("?", 1)[0]
    canonical = normalise_escapes(path)
    assert remove_dot_segments(canonical) == canonical, "dot segments"
    for form in decoded_forms(path):
        segments = form.split("/")[1:]
        assert form.count("/") == path.count("/"), "an escaped '/'"
        assert "\\" not in form, "a backslash"
        assert all(seg.split(";", 1)[0] not in (".", "..") for seg in segments), "a dot segment"
        assert all(segments[:-1]), "an empty segment"
        assert not re.search(r"[\x00-\x1f\x7f]", form), "a control character"
    assert matches_rule(method, unquote_to_bytes(path).decode("latin-1")), "no AllowedRequests entry"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, list[tuple[str, str]]]]:
    """A test client on create_app() for ALLOWED, whose one instance listens on no port, and what urllib3 was given."""
    from app.factory import create_app

    directory = tmp_path_factory.mktemp("fuzz-paths")
    # cooldown="0": every request tries the instance again, so every one that
    # passes the checks shows where urllib3 would have sent it.
    config = load(
        write_config(directory, [Spec("127.0.0.1", free_port(), 9999)], ALLOWED, extra='  <Failover cooldown="0"/>\n')
    )
    app = create_app(config)
    sent: list[tuple[str, str]] = []
    real = HTTPConnectionPool.urlopen

    def spy(self: HTTPConnectionPool, method: str, url: str, *args: object, **kwargs: object) -> object:
        sent.append((method, url))
        return real(self, method, url, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(HTTPConnectionPool, "urlopen", spy)
    try:
        yield app.test_client(), sent
    finally:
        mp.undo()


def send(client: tuple[object, list[tuple[str, str]]], method: str, target: str) -> tuple[int, str | None, list]:
    """*target* through the application with the WSGI environment gunicorn builds from it."""
    test_client, sent = client
    parts = split_request_uri(target)
    del sent[:]
    resp = test_client.open(  # type: ignore[attr-defined]
        "/",
        method=method,
        environ_overrides={
            "RAW_URI": target,
            "PATH_INFO": unquote_to_wsgi_str(parts.path),
            "QUERY_STRING": parts.query,
        },
    )
    body = resp.get_json(silent=True) if method != "HEAD" else None
    return resp.status_code, (body or {}).get("error"), list(sent)


#: Characters the targets are built from: separators, dots, the pieces of
#: %2e %2E %2f %2F %5c %5C %25, parameters, query and fragment, and letters.
ALPHABET = "/.%2eEfF5c;?#" + "apisuvlkoxAZ019-_~"
PIECES = ["", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%252e", "%2f", "%2F", "%5c", "%5C", "%25", "%", "%2",
          "e", "f", "c", "api", "v.1.1", "v1", "suppliers", "lookup", ".e", "e..f", ";", "..;", ".;x", "e;x",
          "%65", "%7E", "~", "%00", "%0a", "a%2fb", "%2e%2e%2f"]


def targets() -> st.SearchStrategy[str]:
    free_text = st.text(alphabet=ALPHABET, max_size=40)
    segment = st.lists(st.sampled_from(PIECES) | st.text(alphabet=ALPHABET.replace("/", ""), max_size=4), max_size=3).map("".join)
    segmented = st.builds(
        lambda segs, query, fragment: "/" + "/".join(segs) + query + fragment,
        st.lists(segment, min_size=1, max_size=5),
        st.sampled_from(["", "?", "?a=1", "?x=/../%2F"]) | st.text(alphabet=ALPHABET, max_size=8).map(lambda q: "?" + q),
        st.sampled_from(["", "", "#", "#x"]),
    )
    from_rules = st.builds(
        lambda rule, fill: re.sub(r"\{[a-z]+\}", lambda _m: fill, rule),
        st.sampled_from([path for _, path in ALLOWED]),
        segment,
    )
    return st.one_of(free_text.map(lambda t: "/" + t), free_text, segmented, from_rules)


def _upper_escapes(text: str) -> str:
    return _ESCAPE.sub(lambda m: "%" + m.group(1).upper(), text)


@given(method=st.sampled_from(METHODS), target=targets())
def test_only_targets_that_mean_themselves_are_forwarded(client, method: str, target: str) -> None:
    status, error, sent = send(client, method, target)
    refused = {400: "invalid_path", 404: "request_not_allowed", 405: "method_not_allowed"}
    if status in refused:
        assert error == refused[status] or method == "HEAD"
        assert sent == []
        return
    # Everything else passed every check and went to the instance.
    assert (status, error if method != "HEAD" else "no_instance_available") == (503, "no_instance_available")
    assert_means_only_itself(method, target)
    # What urllib3 was given is the target itself (escapes may be upper-cased, RFC 3986 section 6.2.2.1).
    assert [(m, _upper_escapes(u)) for m, u in sent] in ([], [(method, _upper_escapes(target))])


@pytest.mark.parametrize(
    "method, target, outcome",
    [
        # Found by the property below: /e/f/ made werkzeug answer /e/f with a
        # slash redirect (our 404) although /e/{x} matches it exactly.
        ("GET", "/e/f", (503, "no_instance_available")),
        ("HEAD", "/e/f", (503, None)),
        ("GET", "/e/f/", (503, "no_instance_available")),
        ("POST", "/e/f", (405, "method_not_allowed")),
        ("GET", "/e/f/x", (404, "request_not_allowed")),
        ("GET", "/e", (404, "request_not_allowed")),
    ],
)
def test_placeholder_match_is_not_shadowed_by_a_trailing_slash_rule(client, method, target, outcome) -> None:
    status, error, sent = send(client, method, target)
    assert (status, error) == outcome
    assert len(sent) == (1 if status == 503 else 0)


CLEAN_SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "-_~!$&'()*+,=:@", min_size=1, max_size=8)


@given(
    rule=st.sampled_from(ALLOWED),
    fill=CLEAN_SEGMENT.filter(lambda s: s not in (".", "..")),
    query=st.sampled_from(["", "?", "?a=b&c=%2F..%2e"]),
)
def test_clean_targets_of_every_rule_are_forwarded(client, rule: tuple[str, str], fill: str, query: str) -> None:
    """The other direction, so the property above cannot pass by refusing everything."""
    method, path = rule
    target = re.sub(r"\{[a-z]+\}", lambda _m: fill, path) + query
    status, error, sent = send(client, method, target)
    assert (status, error) == (503, "no_instance_available")
    assert [(m, _upper_escapes(u)) for m, u in sent] == [(method, _upper_escapes(target))]
