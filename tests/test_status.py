"""/_balancer/health and /_balancer/status, reserved paths, active probes (docs/design.md, "Reserved paths")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from app.pins import der_to_pem, sha256

from .ha_support import ScriptedInstance
from .support import ROOT, Spec, free_port, get, leaf_der, write_config

ISO_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
SCOPE = "node"


def status(port: int) -> dict:
    resp = get(port, "/_balancer/status")
    assert resp.status == 200
    assert resp.header("Content-Type") == "application/json"
    assert resp.header("Cache-Control") == "no-store"
    return resp.json()  # type: ignore[return-value]


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


def entry(host: str, port: int, matching: int, reference: Path, **changes: object) -> dict:
    base = {
        "host": host,
        "api_port": port,
        "matching_port": matching,
        "enabled": True,
        "state": "up",
        "in_flight": 0,
        "requests_total": 0,
        "last_error": None,
        "last_error_at": None,
        "reference": str(reference),
        "reference_sha256": None,
        "reference_error": None,
    }
    base.update(changes)
    return base


def test_health_and_status_answer_exact_json_per_worker(tmp_path, make_instance, start_balancer):
    up = make_instance()
    up.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": up.port})
    refused, disabled = free_port(), free_port()
    specs = [Spec("127.0.0.1", up.port, 9001), Spec("127.0.0.1", refused, 9002), Spec("127.0.0.1", disabled, 9003, False)]
    path = write_config(tmp_path, specs, extra='  <Failover cooldown="60"/>\n', workers=1)
    balancer = start_balancer(path)
    certs = tmp_path / "certs"
    (certs).mkdir()
    (certs / "127.0.0.1_9003.pem").write_bytes(b"not a certificate\n")

    health = get(balancer.port, "/_balancer/health")
    assert (health.status, health.header("Content-Type")) == (200, "application/json")
    pid = health.json()["worker_pid"]
    assert health.json() == {"status": "serving", "worker_pid": pid}
    # The pid is the worker's, a child of the gunicorn master.
    assert Path(f"/proc/{pid}/stat").read_text().split()[3] == str(balancer.proc.pid)

    assert status(balancer.port) == {
        "scope": SCOPE,
        "workers": [pid],
        "worker_pid": pid,
        "configuration": str(path),
        "pin_store": {"type": "directory", "path": str(certs)},
        "instances": [
            entry("127.0.0.1", up.port, 9001, certs / "127.0.0.1_9001.pem", state="not yet pinned"),
            entry("127.0.0.1", refused, 9002, certs / "127.0.0.1_9002.pem", state="not yet pinned"),
            entry(
                "127.0.0.1", disabled, 9003, certs / "127.0.0.1_9003.pem", enabled=False, state="disabled",
                reference_error="the file is not one PEM certificate (BEGIN/END CERTIFICATE)",
            ),
        ],
    }

    # Whatever the turn, two requests have tried the refused instance once (then failed over).
    assert [get(balancer.port, "/api/v.1.1/suppliers").status for _ in range(2)] == [200, 200]
    body = status(balancer.port)
    failed_at = body["instances"][1]["last_error_at"]
    assert ISO_SECOND.fullmatch(failed_at), failed_at
    assert body == {
        "scope": SCOPE,
        "workers": [pid],
        "worker_pid": pid,
        "configuration": str(path),
        "pin_store": {"type": "directory", "path": str(certs)},
        "instances": [
            entry("127.0.0.1", up.port, 9001, certs / "127.0.0.1_9001.pem", reference_sha256=sha256(up.der), requests_total=2),
            entry(
                "127.0.0.1", refused, 9002, certs / "127.0.0.1_9002.pem", state="cooling down",
                last_error="connection refused", last_error_at=failed_at,
            ),
            entry(
                "127.0.0.1", disabled, 9003, certs / "127.0.0.1_9003.pem", enabled=False, state="disabled",
                reference_error="the file is not one PEM certificate (BEGIN/END CERTIFICATE)",
            ),
        ],
    }
    head = get(balancer.port, "/_balancer/status", method="HEAD")
    assert (head.status, head.body) == (200, b"")


def test_reserved_paths_are_never_forwarded_whatever_the_rules(tmp_path, ca, start_balancer):
    instance = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    # Placeholders that would match the reserved paths, were they rules like the others.
    allowed = [("GET", "/{a}/status"), ("GET", "/{a}/{b}"), ("POST", "/{a}/health"), ("GET", "/{a}"), ("PUT", "/{a}/{b}")]
    try:
        balancer = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", instance.port, 9001)], allowed, workers=1))
        answers = {
            target: get(balancer.port, target, method=method)
            for method, target in [
                ("GET", "/_balancer/status"),
                ("GET", "/_balancer/health"),
                ("GET", "/%5Fbalancer/health"),
                ("POST", "/_balancer/health"),
                ("PUT", "/_balancer/x"),
                ("GET", "/_balancer"),
                ("GET", "/_balancer/"),
                ("GET", "/_balancer/metrics"),
                ("GET", "/_balancer/status/"),
            ]
        }
        control = get(balancer.port, "/other/status")
    finally:
        instance.close()
    assert {t: r.status for t, r in answers.items()} == {
        "/_balancer/status": 200,
        "/_balancer/health": 405,
        "/%5Fbalancer/health": 200,
        "/_balancer/x": 404,
        "/_balancer": 404,
        "/_balancer/": 404,
        "/_balancer/metrics": 200,
        "/_balancer/status/": 404,
    }
    assert answers["/_balancer/health"].header("Allow") == "GET, HEAD"
    assert answers["/_balancer/health"].json() == {
        "error": "method_not_allowed",
        "description": "POST is not allowed for this path; allowed: GET, HEAD.",
        "allowed_methods": ["GET", "HEAD"],
    }
    assert answers["/_balancer/x"].json() == {
        "error": "request_not_allowed",
        "description": "/_balancer/x is not a path of the balancer; it serves /_balancer/health, /_balancer/status and /_balancer/metrics.",
    }
    # Only the control request, outside /_balancer/, reached the instance.
    assert control.status == 200
    assert [(r.method, r.path) for r in instance.received] == [("GET", "/other/status")]


def test_flask_routes_lists_exactly_the_allowed_requests(tmp_path):
    path = write_config(
        tmp_path,
        [Spec("127.0.0.1", 8443, 9001)],
        [("GET", "/api/v.1.1/suppliers"), ("POST", "/api/{version}/lookup"), ("GET", "/{a}/status")],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "routes"],
        cwd=ROOT, env={**env, "BALANCER_CONFIG": str(path)}, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.rstrip() for line in done.stdout.splitlines()]
    assert lines[:2] == ["Endpoint       Methods  Rule", "-------------  -------  -----------------------------"]
    # In werkzeug's order; nothing under /_balancer/, nothing but AllowedRequests.
    assert sorted(lines[2:]) == [
        "proxy.forward  GET      /<segment:a>/status",
        "proxy.forward  GET      /api/v.1.1/suppliers",
        "proxy.forward  POST     /api/<segment:version>/lookup",
    ]


# -- active probes --------------------------------------------------------------------------------


def test_probe_finds_a_dead_instance_without_any_request_and_sees_it_come_back(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    port = inst.port
    balancer = start_balancer(
        write_config(tmp_path, [inst], extra='  <HealthCheck interval="1"/>\n  <Timeouts connect="1"/>\n  <Failover cooldown="60"/>\n', workers=1)
    )
    assert status(balancer.port)["instances"][0]["state"] == "not yet pinned"
    inst.stop()
    # The first probe may meet the server while its socket closes (reset); the next ones are refused.
    wait_for(
        lambda: (s := status(balancer.port)["instances"][0])["state"] == "cooling down"
        and s["last_error"] == "probe: connection refused",
        5,
        "probe marks it down",
    )
    inst.restart()
    # The cooldown is 60 s: only a probe can bring it back this soon.
    wait_for(lambda: status(balancer.port)["instances"][0]["state"] == "not yet pinned", 5, "probe brings it back")
    log = balancer.log()
    assert re.search(
        rf"instance 127\.0\.0\.1:{port} is down \(probe: connection (refused|reset by peer)\); skipping it for 60 s", log
    )
    assert f"instance 127.0.0.1:{port} is back up (it was cooling down: probe: connection refused)" in log
    # A probe never learns: still no reference file, and no HTTP request reached the instance.
    assert not (tmp_path / "certs").exists()
    assert inst.requests == []


def test_probe_sends_no_http_request(tmp_path, ca, start_balancer):
    instance = ScriptedInstance(ca.issue_cert("127.0.0.1"), lambda request: b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n")
    try:
        balancer = start_balancer(
            write_config(tmp_path, [Spec("127.0.0.1", instance.port, 9001)], extra='  <HealthCheck interval="1"/>\n', workers=1)
        )
        # No request at all: gunicorn's post_worker_init started the probes.
        wait_for(lambda: instance.connections >= 2, 5, "two probes")
    finally:
        instance.close()
    assert instance.received == []
    assert not (tmp_path / "certs").exists()


def test_probe_reports_a_certificate_mismatch_and_never_touches_the_reference(tmp_path, ca, make_instance, start_balancer):
    inst = make_instance()
    certs = tmp_path / "certs"
    certs.mkdir()
    reference = certs / "127.0.0.1_9999.pem"
    other = der_to_pem(leaf_der(ca.issue_cert("127.0.0.1")))
    reference.write_bytes(other)
    balancer = start_balancer(write_config(tmp_path, [inst], extra='  <HealthCheck interval="1"/>\n', workers=1))
    found = wait_for(
        lambda: (s := status(balancer.port)["instances"][0])["state"] == "certificate mismatch" and s, 5, "mismatch"
    )
    assert found["last_error"] == f"probe: certificate mismatch (received sha256 {sha256(inst.der)})"
    assert found["reference_sha256"] == sha256(leaf_der_of(other))
    assert (
        f"[ERROR] app.probe: probe: certificate mismatch for instance 127.0.0.1:{inst.port}: expected sha256 "
        f"{found['reference_sha256']} (reference {reference}), received {sha256(inst.der)}"
    ) in balancer.log()
    assert reference.read_bytes() == other
    assert inst.requests == []


def leaf_der_of(pem: bytes) -> bytes:
    from app.pins import pem_to_der

    return pem_to_der(pem)
