"""The access log: one JSON line per request, through gunicorn's own access-log plumbing.

gunicorn opens the file named by ``accesslog`` (``-`` for stderr) in the
master and in every worker, and reopens it on SIGUSR1 (the master reopens
its files and passes the signal on to the workers), which is what logrotate's
``postrotate`` sends. Only the line is this project's: :class:`JSONAccessLogger`
replaces gunicorn's Apache-style format with JSON, whose escaping keeps a
hostile request target on its line.

Each line has: ``time`` (UTC, ISO 8601), ``client`` (the TCP peer), ``method``,
``target`` (as received), ``status``, ``error`` (the balancer's own error
code, when it answered itself), ``instance`` (``HOST:PORT`` of the instance
that answered, or that the error names), ``attempts`` (instances tried),
``head_seconds`` (from the request sent to the instance's answer head),
``seconds`` (the whole request), ``bytes_in`` (request body) and
``bytes_out`` (answer body). Never a header value or a body.

The application leaves what only it knows in the WSGI environ under
:data:`KEY` (see :func:`note`). Imported by the gunicorn master: it loads
nothing of the app.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gunicorn.glogging import Logger

#: The environ key of what the application noted about a request.
KEY = "ctbalancer.access"


def note(environ: dict[str, Any], **fields: Any) -> None:
    """Record *fields* of this request for its access-log line."""
    environ.setdefault(KEY, {}).update(fields)


def line(environ: dict[str, Any], status: int | None, bytes_out: int | None, seconds: float) -> str:
    """The JSON line of one request."""
    noted = environ.get(KEY, {})
    length = environ.get("CONTENT_LENGTH")
    bytes_in = noted.get("bytes_in")
    if bytes_in is None:
        bytes_in = int(length) if length and length.isdigit() else 0
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client": environ.get("REMOTE_ADDR"),
        "method": environ.get("REQUEST_METHOD"),
        "target": environ.get("RAW_URI") or environ.get("PATH_INFO"),
        "status": status,
        "error": noted.get("error"),
        "instance": noted.get("instance"),
        "attempts": noted.get("attempts", 0),
        "head_seconds": _rounded(noted.get("head_seconds")),
        "seconds": _rounded(seconds),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out or 0,
    }
    return json.dumps(record, ensure_ascii=True)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class JSONAccessLogger(Logger):
    """gunicorn's logger, writing :func:`line` to the access log."""

    def access(self, resp, req, environ, request_time) -> None:  # type: ignore[no-untyped-def]
        if not self.access_log_enabled:
            return
        try:
            self.access_log.info(
                "%s", line(environ, getattr(resp, "status_code", None), getattr(resp, "sent", 0), request_time.total_seconds())
            )
        except Exception:
            self.exception("access log line failed")
