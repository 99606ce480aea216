"""An instance's answer head, read strictly, so that nothing in it can split the client's answer.

http.client reads a response head leniently: it ends a line at a bare LF, and
the email parser behind it also splits a line at a bare CR, so
``X-A: a<CR>Injected: yes`` arrives as two fields and would be relayed as two
(RFC 9112 section 2.2 says a bare CR must be refused or replaced). Values with
NUL or other control characters, and a ``Content-Length`` that is not one
number, reach the server in front, which refuses to write them after the
instance's answer has been taken (issue #7).

:class:`StrictHTTPResponse` checks every line of the head as http.client
reads it, and the framing once the head is complete. It refuses the answer,
which reaches the client as 502 ``instance_failed``, when

* a line does not end in CRLF, or holds a CR, LF or control character other
  than HTAB before it;
* a field line is not ``token ":" value``: obs-fold is refused, which
  RFC 9112 section 5.2 allows a proxy to do;
* ``Content-Length`` is not exactly one field of digits, or comes with
  ``Transfer-Encoding`` (RFC 9112 section 6.3: "ought to be handled as an error").
"""

from __future__ import annotations

import http.client
import re
from typing import IO, Any

_STATUS_LINE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\r\n")
# RFC 9110 section 5.1 (token) and 5.5 (field value: VCHAR, obs-text, SP, HTAB).
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n")
_DIGITS = re.compile(r"[0-9]+")


class MalformedHead(http.client.HTTPException):
    """The instance's answer head is not one that can be relayed safely."""


class _CheckedLines:
    """The response's file, checking each line of the head as http.client reads it."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self._status_next = True

    def readline(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        if not line or (limit > 0 and len(line) >= limit):
            return line  # end of file or an over-long line: http.client reports both
        if line == b"\r\n":
            # The end of a head; after a 1xx, another status line follows.
            self._status_next = True
            return line
        pattern = _STATUS_LINE if self._status_next else _FIELD_LINE
        if not pattern.fullmatch(line):
            what = "status line" if self._status_next else "header field line"
            raise MalformedHead(f"malformed {what} in the answer head")
        self._status_next = False
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


class StrictHTTPResponse(http.client.HTTPResponse):
    """http.client's response, refusing a head that could be read in more than one way."""

    def begin(self) -> None:
        fp = self.fp
        self.fp = _CheckedLines(fp)  # type: ignore[assignment]
        try:
            super().begin()
        finally:
            if isinstance(self.fp, _CheckedLines):
                self.fp = fp
        lengths = self.msg.get_all("Content-Length") or []
        if lengths and (
            len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0].strip(" \t")) or "Transfer-Encoding" in self.msg
        ):
            self.close()
            raise MalformedHead("ambiguous Content-Length in the answer head")
