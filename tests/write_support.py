"""Instances that keep suppliers and indicators (demo.instance.Catalog), for the fan-out tests.

A :class:`CatalogInstance` is a real HTTPS instance (tests.support.Instance)
whose catalog lives in the test process: stopped and started again, it keeps
what it had, as a real instance keeps its database across a restart.
"""

from __future__ import annotations

import json
import re
import threading

import trustme
from werkzeug.wrappers import Request, Response

from demo.instance import Catalog
from tests.support import Instance

WRITE_METHODS = ("POST", "PUT", "DELETE", "PATCH")


class CatalogInstance(Instance):
    """An HTTPS instance serving a :class:`~demo.instance.Catalog` under ``/api/``, and the lookup path."""

    def __init__(self, ca: trustme.CA, name: str = "") -> None:
        super().__init__(ca)
        self.name = name or f"instance-{self.port}"
        self.catalog = Catalog()
        #: Every request it received, across restarts, in order: (method, path, body).
        self.log: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        self.server.expect_request(re.compile(r"^/api/.*")).respond_with_handler(self._handle)

    def _handle(self, request: Request) -> Response:
        body = request.get_data()
        with self._lock:
            self.log.append((request.method, request.path, body))
            stored = self.catalog.handle(request.method, request.path, body)
        if stored is None:
            status, payload = 200, {"instance": self.name, "path": request.path}
        else:
            status, payload = stored
        return Response(json.dumps(payload), status=status, content_type="application/json",
                        headers={"X-Instance": self.name})

    def contents(self) -> dict:
        return self.catalog.snapshot()

    def writes(self) -> list[tuple[str, str, bytes]]:
        """The write requests it received, in order."""
        with self._lock:
            return [entry for entry in self.log if entry[0] in WRITE_METHODS]

    def served(self, method: str = "GET") -> int:
        """How many requests of *method* reached it."""
        with self._lock:
            return sum(1 for entry in self.log if entry[0] == method)
