"""Which request targets may pass: the raw-target check and AllowedRequests as werkzeug rules.

werkzeug matches rules against the *decoded* ``PATH_INFO``, in which ``%2F``
already looks like ``/`` and ``%2E%2E`` like ``..``. An instance may decode
differently, so every spelling that could mean another path is refused here,
on the raw request target, before any rule is matched (docs/design.md, "Which requests pass").
"""

from __future__ import annotations

import re
from typing import Mapping
from urllib.parse import quote

from werkzeug.routing import BaseConverter

from .errors import InvalidPath

# One or two dots followed by the end of the segment.
_DOT_SEGMENT = r"\.\.?(?![^/])"


class SegmentConverter(BaseConverter):
    """``{name}``: exactly one non-empty path segment, never ``.`` or ``..``."""

    regex = rf"(?!{_DOT_SEGMENT})[^/]+"
    part_isolating = True


CONVERTERS = {"segment": SegmentConverter}

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Escapes that name a separator, or a separator escaped twice.
_ENCODED_SEPARATOR = re.compile(r"%(?:25)?(?:2f|5c)", re.IGNORECASE)
_ENCODED_DOT = re.compile(r"%(?:25)?2e", re.IGNORECASE)
# An escaped control character (NUL above all) in the path: an instance that
# decodes it may end the path there, or split a log line, and so see another
# path. Raw ones are refused below, and by gunicorn before that.
_ENCODED_CONTROL = re.compile(r"%(?:25)?(?:[01][0-9a-f]|7f)", re.IGNORECASE)
# Control characters, space, "#" and anything outside ASCII: never valid raw in
# a request target, and re-encoding them on the way out would change the bytes.
_FORBIDDEN_ANYWHERE = re.compile(r"[^\x21-\x7e]|#")
# Characters RFC 3986 does not allow raw in a path or a query (sections 3.3
# and 3.4: "[" and "]" are gen-delims, not pchar). urllib3 would
# percent-encode them on the way out, so the instance would not see what the
# client sent (docs/design.md, "Which requests pass"): the client must encode them itself.
_NOT_IN_URI = re.compile(r'["<>\\^`{|}\[\]]')


def to_rule(path: str) -> str:
    """The werkzeug rule string for an AllowedRequests path."""
    return _PLACEHOLDER.sub(r"<segment:\1>", path)


def raw_target(environ: Mapping[str, object]) -> str:
    """The request target exactly as the client sent it.

    gunicorn gives ``RAW_URI`` and werkzeug's server ``REQUEST_URI``; other
    servers (and test clients) get a target rebuilt from ``PATH_INFO``.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        # WSGI strings are latin-1 decoded bytes; keep them as such.
        return raw
    path = quote(str(environ.get("PATH_INFO", "")).encode("latin-1"), safe="/:@!$&'()*+,;=~")
    query = str(environ.get("QUERY_STRING", ""))
    return f"{path}?{query}" if query else path


def check_target(target: str) -> str:
    """Return *target* when it is an origin-form path that means only itself.

    Raises :class:`InvalidPath` for absolute or asterisk form, dot segments
    (literal, escaped, or hidden behind ``;params``), escaped ``/`` or ``\\``,
    escaped control characters in the path, empty segments, bad escapes and
    characters RFC 3986 does not allow.
    """
    if not target.startswith("/"):
        raise InvalidPath(
            "The request target must be a path starting with '/'; absolute and asterisk forms are not forwarded."
        )
    path, _, query = target.partition("?")
    if _FORBIDDEN_ANYWHERE.search(target):
        raise InvalidPath("The request target contains a character that is not allowed in a URI.")
    if _NOT_IN_URI.search(target):
        raise InvalidPath(
            "The request target contains a character that must be percent-encoded (RFC 3986), "
            'one of " < > \\ ^ ` { | } [ ].'
        )
    if _PERCENT.search(target):
        raise InvalidPath("The request target contains a '%' that does not start an escape.")
    if _ENCODED_SEPARATOR.search(path):
        raise InvalidPath("The path contains an escaped '/' or '\\', which an instance may read as a separator.")
    if _ENCODED_CONTROL.search(path):
        raise InvalidPath("The path contains an escaped control character such as %00.")
    segments = path[1:].split("/")
    for i, segment in enumerate(segments):
        if segment == "" and i != len(segments) - 1:
            raise InvalidPath("The path contains an empty segment ('//').")
        bare = _ENCODED_DOT.sub(".", segment.split(";", 1)[0])
        if bare in (".", ".."):
            raise InvalidPath("The path contains a dot segment ('.' or '..'), literal or escaped.")
    return target
