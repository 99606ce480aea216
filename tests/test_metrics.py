"""/_balancer/metrics through real gunicorn: the whole node's counters, exact across SIGKILL, reload and restarts."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from .support import Spec, get, read_response, write_config

SUPPLIERS = "/api/v.1.1/suppliers"


def scrape(port: int) -> str:
    resp = get(port, "/_balancer/metrics")
    assert resp.status == 200, resp.body
    assert (resp.header("Content-Type") or "").startswith("text/plain")
    return resp.body.decode()


def total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of *name* whose labels include *labels*."""
    found = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found += float(m.group(2))
    return found


def workers_of(master: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def wait_workers(master: int, count: int, avoid: set[int] = frozenset(), limit: float = 30.0) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = workers_of(master)
        if len(pids) == count and not (set(pids) & avoid):
            time.sleep(1.0)  # booted and registered
            return pids
        time.sleep(0.1)
    raise AssertionError(f"not {count} new workers within {limit} s")


def test_counters_count_the_node_across_sigkill_and_reload(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request(SUPPLIERS).respond_with_json({"ok": True})
    config = write_config(tmp_path, [inst], workers=4)
    balancer = start_balancer(config)
    name = f"127.0.0.1:{inst.port}"
    for _ in range(40):
        assert get(balancer.port, SUPPLIERS).status == 200
    for _ in range(5):
        assert get(balancer.port, "/nope").status == 404
    text = scrape(balancer.port)
    assert total(text, "ctbalancer_requests_total", status="200") == 40
    assert total(text, "ctbalancer_requests_total", status="404") == 5
    assert total(text, "ctbalancer_errors_total", error="request_not_allowed") == 5
    assert total(text, "ctbalancer_instance_requests_total", instance=name, status="200") == 40
    assert total(text, "ctbalancer_instance_response_seconds_count", instance=name) == 40
    assert total(text, "ctbalancer_pin_learned_total", instance=name) == 1
    assert total(text, "ctbalancer_instance_up", instance=name) == 1
    assert total(text, "ctbalancer_instance_in_flight", instance=name) == 0
    assert total(text, "ctbalancer_pin_expiry_timestamp_seconds", instance=name) > time.time()
    assert total(text, "ctbalancer_workers") == 4
    assert "ctbalancer_requests_total" in text and "/_balancer" not in text  # the scrapes are not counted

    # A worker killed, then a reload: nothing counted is lost.
    before = set(workers_of(balancer.proc.pid))
    os.kill(sorted(before)[0], signal.SIGKILL)
    wait_workers(balancer.proc.pid, 4, avoid={sorted(before)[0]})
    os.kill(balancer.proc.pid, signal.SIGHUP)
    wait_workers(balancer.proc.pid, 4, avoid=before)
    for _ in range(20):
        assert get(balancer.port, SUPPLIERS).status == 200
    text = scrape(balancer.port)
    assert total(text, "ctbalancer_requests_total", status="200") == 60
    assert total(text, "ctbalancer_instance_requests_total", instance=name, status="200") == 60
    assert total(text, "ctbalancer_workers") == 4


def test_counters_stay_exact_and_files_bounded_after_many_worker_restarts(tmp_path, make_instance, start_balancer):
    """50 rounds: 4 requests, then every worker SIGKILLed: 200 workers died, 200 requests counted."""
    inst = make_instance()
    inst.server.expect_request(SUPPLIERS).respond_with_json({"ok": True})
    balancer = start_balancer(write_config(tmp_path, [inst], workers=4))
    directory = None
    for _ in range(50):
        for _ in range(4):
            assert get(balancer.port, SUPPLIERS).status == 200
        directory = directory or metrics_dir(balancer)
        dying = set(live(balancer))
        for pid in dying:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = live(balancer)
            if len(now) == 4 and not set(now) & dying:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the workers were not replaced")
    text = scrape(balancer.port)
    assert total(text, "ctbalancer_requests_total", status="200") == 200
    assert total(text, "ctbalancer_instance_response_seconds_count") == 200
    files = sorted(f.name for f in Path(directory).glob("*.db"))
    # One counter and one histogram file per live worker at most, plus the two retired ones.
    assert len(files) <= 4 * 2 + 2, files
    assert "counter_retired.db" in files


def live(balancer) -> list[int]:
    """The live workers the node knows of (their registration locks)."""
    try:
        resp = get(balancer.port, "/_balancer/status")
    except OSError:
        return []
    return resp.json()["workers"] if resp.status == 200 else []


def metrics_dir(balancer) -> str:
    """The metrics directory the master chose, seen through a worker's open files."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in workers_of(balancer.proc.pid):
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.endswith(".db") and "/metrics/" in target:
                        return str(Path(target).parent)
            except OSError:
                continue
        get(balancer.port, SUPPLIERS)
    raise AssertionError("no worker has a metrics file open")


def test_metrics_answer_admin_addresses_only(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    balancer = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", inst.port)]))
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", balancer.port))
        sock.sendall(b"GET /_balancer/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = read_response(sock)
    assert resp.status == 403
    assert resp.json()["error"] == "forbidden"
