"""The balancer's own paths under ``/_balancer/`` (docs/design.md, "Reserved paths"): health and status, never forwarded.

::

    GET /_balancer/health   200 {"status": "serving", "worker_pid": ...} while the process serves
    GET /_balancer/status   200 every configured instance as this worker sees it

Served by a WSGI middleware in front of Flask rather than by rules in its
``url_map``: ``flask --app wsgi routes`` keeps listing exactly AllowedRequests
(docs/design.md, "Running"), and no rule, ``{name}`` placeholders included, can ever
match a reserved path, whatever its spelling decodes to.

Health is kept per worker process (each gunicorn worker has its own), so the
status body names the worker that answered.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from werkzeug.wrappers import Request, Response

from . import accesslog, metrics, probe
from .errors import BalancerError, Forbidden, MethodNotAllowed, RequestNotAllowed, json_body
from .health import DISABLED, NOT_PINNED, UP
from .pins import sha256
from .shared import live_workers
from .settings import InstanceSpec, allows
from .upstream import Balancer

PREFIX = "/_balancer"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ReservedPaths:
    """WSGI middleware: ``/_balancer`` and everything under it is answered here, the rest goes on to *app*.

    Also starts this worker's probe loops at its first request (lazily, after
    gevent has patched; nothing is started by ``flask routes``).
    """

    def __init__(self, app: WSGIApp, balancer: Balancer) -> None:
        self.app = app
        self.balancer = balancer
        self.views = {"/health": self.health, "/status": self.status, "/metrics": self.metrics}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        probe.start(self.balancer)
        self.balancer.store.start()
        path = environ.get("PATH_INFO", "")
        if path != PREFIX and not path.startswith(PREFIX + "/"):

            def counted(status: str, headers: list, exc_info: Any = None) -> Any:
                # Every answer to a client is counted; the balancer's own pages are not.
                metrics.count_answer(status, environ.get(accesslog.KEY, {}).get("error"))
                return start_response(status, headers, exc_info)

            return self.app(environ, counted)
        return self.serve(Request(environ))(environ, start_response)

    def serve(self, request: Request) -> Response:
        view = self.views.get(request.path[len(PREFIX) :])
        try:
            if view is not None and view != self.health and not allows(
                self.balancer.config.admin_allow, request.remote_addr or ""
            ):
                # Instance addresses, references and in-flight counts are for
                # operators only: the TCP peer, never X-Forwarded-For, decides.
                raise Forbidden(f"{request.path} may be read from the addresses of <Admin allow> only.")
            if view is None:
                raise RequestNotAllowed(
                    f"{request.path} is not a path of the balancer; it serves {PREFIX}/health, {PREFIX}/status and {PREFIX}/metrics."
                )
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{request.method} is not allowed for this path; allowed: GET, HEAD.", ["GET", "HEAD"])
            if view == self.metrics:
                response = Response(view(), status=200, content_type=metrics.CONTENT_TYPE)
            else:
                response = Response(json_body(view()), status=200, mimetype="application/json")
        except BalancerError as exc:
            accesslog.note(request.environ, error=exc.code)
            response = exc.get_response()
        # Each answer is one moment's view.
        response.headers["Cache-Control"] = "no-store"
        return response

    def metrics(self) -> bytes:
        return metrics.exposition(self.balancer)

    def health(self) -> dict[str, Any]:
        return {"status": "serving", "worker_pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        config = self.balancer.config
        upstreams = {u.spec: u for u in self.balancer.upstreams}
        shared = self.balancer.shared
        answers = metrics.instance_answers()
        journal = self.balancer.journal
        owed = journal.counts() if journal is not None else None
        return {
            "scope": "node",
            "workers": live_workers(shared) if shared is not None else [os.getpid()],
            "worker_pid": os.getpid(),
            "configuration": str(config.path),
            "pin_store": self.balancer.store.state(),
            "instances": [self.instance(spec, upstreams.get(spec), answers, owed) for spec in config.instances],
        }

    def instance(
        self, spec: InstanceSpec, upstream: Any, answers: dict[str, float], owed: dict[str, int] | None
    ) -> dict[str, Any]:
        store = self.balancer.store
        entry = store.known(spec.reference_name)
        fingerprint = sha256(entry.der) if entry.der is not None else None
        problem = entry.problem
        if upstream is None:
            state, in_flight, answered, error, error_at = DISABLED, 0, 0, None, None
        else:
            health = upstream.health
            state, in_flight = health.state, upstream.slots.in_flight
            answered = int(answers.get(upstream.name, 0))
            error, error_at = health.last_error, health.last_error_at
            if state == UP and fingerprint is None and problem is None:
                state = NOT_PINNED
            journal = self.balancer.journal
            withheld = journal.withheld(spec.name) if journal is not None else None
            if withheld is not None:
                state = withheld  # owes fan-out writes, or diverged: takes no request whatever its health
        fields = {
            "host": spec.host,
            "api_port": spec.api_port,
            "matching_port": spec.matching_port,
            "enabled": spec.enabled,
            "state": state,
            "in_flight": in_flight,
            "requests_total": answered,
            "last_error": error,
            "last_error_at": _iso(error_at),
            "reference": store.location(spec.reference_name),
            "reference_sha256": fingerprint,
            "reference_error": problem,
        }
        if owed is not None:
            fields["journal_pending"] = owed.get(spec.name, 0)
        return fields


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
