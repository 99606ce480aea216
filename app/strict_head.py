"""An instance's answer head, read strictly, so that nothing in it can split the client's answer.

http.client reads a response head leniently: it ends a line at a bare LF, and
the email parser behind it also splits a line at a bare CR, so
``X-A: a<CR>Injected: yes`` arrives as two fields and would be relayed as two
(RFC 9112 section 2.2 says a bare CR must be refused or replaced). Values with
NUL or other control characters, and a ``Content-Length`` that is not one
number, reach the server in front, which refuses to write them after the
instance's answer has been taken (docs/design.md, "Hostile clients").

:class:`StrictHTTPResponse` checks every line of the head as it reads it,
and the framing once the head is complete. It refuses the answer, which
reaches the client as 502 ``instance_failed``, when

* a line does not end in CRLF, or holds a CR, LF or control character other
  than HTAB before it;
* a field line is not ``token ":" value``: obs-fold is refused, which
  RFC 9112 section 5.2 allows a proxy to do;
* ``Content-Length`` is not exactly one field of digits, or comes with
  ``Transfer-Encoding`` (RFC 9112 section 6.3: "ought to be handled as an error").

The field lines are split by :func:`_read_fields`, not by the email parser
http.client uses: once every line is known to be ``token ":" value CRLF``,
that parser has nothing left to decide, and it cost more than the rest of the
head. The fields come out as it would give them.
"""

from __future__ import annotations

import http.client
import re
from typing import IO, Any

_STATUS_LINE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\r\n")
# RFC 9110 section 5.1 (token) and 5.5 (field value: VCHAR, obs-text, SP, HTAB).
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n")
_DIGITS = re.compile(r"[0-9]+")

# http.client's limits on a head: the length of one line, and lines per head.
_MAXLINE = 65536
_MAXHEADERS = 100


class MalformedHead(http.client.HTTPException):
    """The instance's answer head is not one that can be relayed safely."""


class _CheckedStatusLine:
    """The response's file, checking the status line http.client's ``_read_status`` reads from it."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp

    def readline(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        if not line or (limit > 0 and len(line) >= limit):
            return line  # end of file or an over-long line: http.client reports both
        if not _STATUS_LINE.fullmatch(line):
            raise MalformedHead("malformed status line in the answer head")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


def _read_fields(fp: IO[bytes]) -> list[tuple[str, str]]:
    """The field lines of a head up to its empty line, as (name, value), each line checked.

    Limits and their exceptions are http.client's; a value is what its email
    parser gives: latin-1, without the whitespace after the colon and the CRLF.
    End of file ends the head, as in http.client.
    """
    fields = []
    lines = 0
    while True:
        line = fp.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            raise http.client.LineTooLong("header line")
        end = line == b"\r\n" or not line
        if not end and not _FIELD_LINE.fullmatch(line):
            raise MalformedHead("malformed header field line in the answer head")
        lines += 1
        if lines > _MAXHEADERS:
            raise http.client.HTTPException(f"got more than {_MAXHEADERS} headers")
        if end:
            return fields
        name, _, value = line.decode("iso-8859-1").partition(":")
        fields.append((name, value[:-2].lstrip(" \t")))


class StrictHTTPResponse(http.client.HTTPResponse):
    """http.client's response, refusing a head that could be read in more than one way."""

    def _read_status(self) -> tuple[str, int, str]:
        fp = self.fp
        self.fp = _CheckedStatusLine(fp)  # type: ignore[assignment]
        try:
            return super()._read_status()  # type: ignore[misc]
        finally:
            if isinstance(self.fp, _CheckedStatusLine):  # not closed meanwhile
                self.fp = fp

    def begin(self) -> None:
        """http.client's ``begin()``, with the fields read by :func:`_read_fields` and the framing checked."""
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_fields(self.fp)  # the head of a 100 (Continue), skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)

        fields = _read_fields(self.fp)
        msg = http.client.HTTPMessage()
        first: dict[str, str] = {}
        lengths = []
        for name, value in fields:
            msg.set_raw(name, value)
            key = name.lower()
            first.setdefault(key, value)
            if key == "content-length":
                lengths.append(value)
        self.headers = self.msg = msg

        if lengths and (
            len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0].strip(" \t")) or "transfer-encoding" in first
        ):
            self.close()
            raise MalformedHead("ambiguous Content-Length in the answer head")

        # From here on as in http.client, with each field looked up once.
        tr_enc = first.get("transfer-encoding")
        self.chunked = bool(tr_enc) and tr_enc.lower() == "chunked"  # type: ignore[union-attr]
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._closes(first)
        self.length = None
        length = first.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def _closes(self, first: dict[str, str]) -> bool:
        """http.client's ``_check_close()``: whether the connection ends with this answer."""
        conn = first.get("connection")
        if self.version == 11:
            return bool(conn) and "close" in conn.lower()  # type: ignore[union-attr]
        if first.get("keep-alive"):
            return False
        if conn and "keep-alive" in conn.lower():
            return False
        pconn = first.get("proxy-connection")
        if pconn and "keep-alive" in pconn.lower():
            return False
        return True
