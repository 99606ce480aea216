"""The access log through a real gunicorn with 2 workers: one JSON line per request, reopened on SIGUSR1."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

from werkzeug import Response

from .support import get, write_config

ALLOWED = (
    ("GET", "/api/v.1.1/suppliers"),
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/v.1.1/teapot"),
)
FIELDS = {
    "time", "client", "method", "target", "status", "error", "instance", "attempts",
    "head_seconds", "seconds", "bytes_in", "bytes_out",
}


def read_lines(path, count: int, limit: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    return [json.loads(line) for line in lines]


def test_one_json_line_per_request_with_what_happened(tmp_path, make_instance, start_balancer):
    a, b = make_instance(), make_instance()
    names = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    for inst in (a, b):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_data(b'{"suppliers": []}', content_type="application/json")
        inst.server.expect_request("/api/v.1.1/teapot").respond_with_data(b"short and stout", status=418)
        inst.server.expect_request("/api/v2/lookup", method="POST").respond_with_handler(
            lambda req: Response(b"%d" % len(req.get_data()))
        )
    log = tmp_path / "access.log"
    config = write_config(tmp_path, [a, b], ALLOWED, workers=2, extra=f'  <AccessLog file="{log}"/>\n')
    balancer = start_balancer(config)

    expected: Counter = Counter()
    for _ in range(40):
        assert get(balancer.port, "/api/v.1.1/suppliers").status == 200
    expected[("GET", "/api/v.1.1/suppliers", 200, None)] = 40
    for _ in range(20):
        assert get(balancer.port, "/nope?x=%22y%22").status == 404
    expected[("GET", "/nope?x=%22y%22", 404, "request_not_allowed")] = 20
    for _ in range(10):
        assert get(balancer.port, "/api/v.1.1/../x").status == 400
    expected[("GET", "/api/v.1.1/../x", 400, "invalid_path")] = 10
    for _ in range(10):
        assert get(balancer.port, "/api/v.1.1/suppliers", method="DELETE").status == 405
    expected[("DELETE", "/api/v.1.1/suppliers", 405, "method_not_allowed")] = 10
    for _ in range(10):
        assert get(balancer.port, "/api/v.1.1/teapot").status == 418
    expected[("GET", "/api/v.1.1/teapot", 418, None)] = 10
    for _ in range(10):
        assert get(balancer.port, "/api/v2/lookup", method="POST", body=b"12345").body == b"5"
    expected[("POST", "/api/v2/lookup", 200, None)] = 10

    lines = read_lines(log, 100)
    assert len(lines) == 100
    assert Counter((r["method"], r["target"], r["status"], r["error"]) for r in lines) == expected
    for r in lines:
        assert set(r) == FIELDS
        assert r["client"] == "127.0.0.1"
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        if r["error"] is None:  # answered by an instance
            assert r["instance"] in names and r["attempts"] == 1
            assert isinstance(r["head_seconds"], float) and 0 <= r["head_seconds"] <= r["seconds"]
        else:
            assert (r["instance"], r["attempts"], r["head_seconds"]) == (None, 0, None)
    suppliers = [r for r in lines if r["target"] == "/api/v.1.1/suppliers" and r["method"] == "GET"]
    assert {r["instance"] for r in suppliers} == names  # both instances answered
    assert all(r["bytes_out"] == len(b'{"suppliers": []}') and r["bytes_in"] == 0 for r in suppliers)
    assert all(r["bytes_in"] == 5 and r["bytes_out"] == 1 for r in lines if r["method"] == "POST")
    assert all(r["bytes_out"] == len(b"short and stout") for r in lines if r["status"] == 418)
    # Never a header value or a body.
    assert "12345" not in log.read_text() and "short and stout" not in log.read_text()

    # logrotate: move the file away, SIGUSR1 to the master; the next lines go to a new file.
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    os.kill(balancer.proc.pid, signal.SIGUSR1)
    time.sleep(1.0)
    for _ in range(6):
        assert get(balancer.port, "/api/v.1.1/suppliers").status == 200
    assert len(read_lines(log, 6)) == 6
    assert len(rotated.read_text().splitlines()) == 100


def test_an_instance_error_names_the_instance_and_the_attempts(tmp_path, start_balancer):
    from .support import Spec, free_port

    down = free_port()
    log = tmp_path / "access.log"
    config = write_config(tmp_path, [Spec("127.0.0.1", down)], ALLOWED, extra=f'  <AccessLog file="{log}"/>\n')
    balancer = start_balancer(config)
    assert get(balancer.port, "/api/v.1.1/suppliers").status == 503
    (line,) = read_lines(log, 1)
    assert (line["status"], line["error"], line["attempts"], line["instance"]) == (503, "no_instance_available", 1, None)
