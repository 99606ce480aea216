"""`make demo` as a newcomer runs it: two instances, the balancer, the seed's check request."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .etcd_support import require_etcd
from .support import ROOT, free_port


def run_demo(module: str, directory_variable: str, directory: Path, *args: str) -> str:
    """``python -m MODULE --once ARGS`` as make runs it, in its own directory; its output."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--once", *args],
        cwd=ROOT,
        env={**os.environ, directory_variable: str(directory)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> tuple[int, str]:
    """One `make demo --once` run, shared by the tests that read its story."""
    port = free_port()
    return port, run_demo("demo.run", "DEMO_DIR", tmp_path_factory.mktemp("demo"), "--port", str(port))


def test_demo_answers_through_both_instances_and_shows_references(demo_output):
    port, out = demo_output
    assert f"Balancer: https://127.0.0.1:{port}" in out
    assert "GET /api/v.1.1/suppliers -> 200, answered by instance A:" in out
    assert "GET /api/v.1.1/suppliers -> 200, answered by instance B:" in out
    assert "GET /api/v.1.1/../admin -> 400 invalid_path (nothing was sent)" in out
    refs = re.findall(r"certs/(\S+\.pem)  sha256 ([0-9a-f]{64})", out)
    assert sorted(name for name, _ in refs) == ["127.0.0.1_9999.pem", "localhost_9999.pem"]
    # The seed's story: A's certificate changes, A is refused by name, the operator trusts it, A serves.
    assert "GET /api/v.1.1/suppliers -> 500 certificate_mismatch:" in out
    assert re.search(r"HTTPS connection with the CyberTrace instance 127\.0\.0\.1:\d+ has not been established", out)
    fp = re.search(r"accept it with: flask --app wsgi pins trust 127\.0\.0\.1:\d+ --sha256 ([0-9a-f]{64})", out)
    assert fp, out
    assert f"now holds sha256 {fp.group(1)}" in out
    assert "GET /api/v.1.1/suppliers -> 200, answered by instance A again" in out
    assert re.search(r"GET /_balancer/status -> 200: scope node, workers \[\d+, \d+\]", out)
    assert "GET /_balancer/metrics -> 200 (excerpt):" in out
    assert re.search(r'ctbalancer_pin_mismatch_total\{instance="127\.0\.0\.1:\d+"\} [1-9]', out), out



def test_fleet_demo_learns_once_and_trusts_once_for_both_balancers(tmp_path):
    require_etcd()
    out = run_demo("demo.fleet", "FLEET_DEMO_DIR", tmp_path / "fleet")
    for number in (1, 2):
        for name in ("A", "B"):
            assert f"balancer {number}: GET /api/v.1.1/suppliers -> 200, answered by instance {name}" in out
        assert f"balancer {number}: GET /api/v.1.1/suppliers -> 500 certificate_mismatch" in out
        assert re.search(rf"balancer {number}: GET /_balancer/status -> 200: pin store etcd reachable, 2 references", out)
    keys = re.findall(r"    (/ctbalancer/pins/\S+)  sha256 [0-9a-f]{64}", out)
    assert keys == ["/ctbalancer/pins/127.0.0.1_9999", "/ctbalancer/pins/localhost_9999"]
    assert re.search(r"trusted: etcd:/ctbalancer/pins/127\.0\.0\.1_9999 now holds sha256 [0-9a-f]{64}", out)
    after = out.split("One second later, through both balancers:")[1]
    assert "balancer 1: GET /api/v.1.1/suppliers -> 200, answered by instance A" in after
    assert "balancer 2: GET /api/v.1.1/suppliers -> 200, answered by instance A" in after
    # Everything it started is stopped.
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "fleet")], capture_output=True).stdout == b""


def test_demo_shows_a_fan_out_write_reaching_both_instances(demo_output):
    _port, out = demo_output
    assert "POST /api/v1/suppliers -> 201, X-CTBalancer-Fanout: applied=2; pending=0" in out
    assert "PUT /api/v1/suppliers/demo-feed/indicators -> 200, X-CTBalancer-Fanout: applied=2; pending=0" in out
    assert "instance A: 200 ['192.0.2.66', 'evil.example']" in out
    assert "instance B: 200 ['192.0.2.66', 'evil.example']" in out


def test_ctrl_c_stops_everything_the_fleet_demo_started(tmp_path):
    """As in a terminal: SIGINT to the demo's whole process group (etcd, instances, balancers too)."""
    require_etcd()
    work = tmp_path / "fleet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.fleet"],
        cwd=ROOT,
        env={**os.environ, "FLEET_DEMO_DIR": str(work)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("Serving until Ctrl-C."):
                break
        assert lines and lines[-1].startswith("Serving until Ctrl-C."), "".join(lines)
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        # The demo, three etcd members, two instances, two gunicorn masters and their four workers.
        assert len(group) >= 12, group
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert rest.splitlines()[-1] == "Stopping."
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert left == []
