"""The floor contender of ``make bench``: the least this stack can do to relay a request.

A bare WSGI app, no Flask and no requests: each gevent worker keeps a stack
of kept-alive TLS connections (``http.client``) to the one instance and
relays the request's method and target, and the answer's status, headers and
body, nothing more. No pin check, no rules, no failover: what it costs is
what gunicorn, gevent, TLS and http.client cost, under the balancer's own
gunicorn settings (``bench/floor/gunicorn.conf.py``).
"""

from __future__ import annotations

import http.client
import os
import ssl

HOST, PORT = os.environ["FLOOR_INSTANCE"].rsplit(":", 1)
_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server"})
_idle: list[http.client.HTTPSConnection] = []
_context: ssl.SSLContext | None = None


def _connection() -> http.client.HTTPSConnection:
    global _context
    if _idle:
        return _idle.pop()
    if _context is None:  # built in the worker, after gevent patched ssl
        _context = ssl.create_default_context()
        _context.check_hostname = False
        _context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection(HOST, int(PORT), context=_context, timeout=30)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    conn = _connection()
    try:
        conn.request(environ["REQUEST_METHOD"], environ["RAW_URI"], headers={"Host": f"{HOST}:{PORT}"})
        resp = conn.getresponse()
        body = resp.read()
    except Exception:
        conn.close()
        raise
    if not resp.will_close:
        _idle.append(conn)
    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _DROP]
    start_response(f"{resp.status} {resp.reason}", headers)
    return [body]
