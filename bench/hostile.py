#!/usr/bin/env python3
"""``make hostile``: attack the balancer with tools nobody here wrote, and measure normal requests meanwhile.

    make hostile                      # about 4 minutes
    HOSTILE_SECONDS=10 make hostile   # shorter attacks

On loopback only, in bench/.run/hostile/: two demo instances (demo/instance.py),
the balancer in front of them over HTTPS with 2 gevent workers and the
defaults of docs/design.md ("Hostile clients"), then one attack at a time:

* slowhttptest -B (slow body, "R-U-Dead-Yet") on the vendor's lookup POST,
  which is not repeatable: bodies trickle in for the whole test;
* slowhttptest -H (Slowloris) on the same POST: 2,500 connections sending a header line now and then;
* slowhttptest -X (slow read): clients that advertise a tiny window and read a few bytes a second;
* 2,000 TCP connections that never start their TLS handshake (hand-made);
* testssl.sh: protocols, cipher suites and the known TLS vulnerabilities.

During each attack a probe sends normal requests (GET suppliers on a new
TLS connection, from 127.0.0.2, at HOSTILE_RATE per second) and records
whether each got 200 and how long it took. The table gives, per attack, the
share of probe requests answered 200 and their p50 and p99.
Report: bench/results/hostile.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.instance import make_self_signed  # noqa: E402
from demo.run import free_port, stop_all, wait_for_port  # noqa: E402

WORK = ROOT / "bench" / ".run" / "hostile"
REPORT = ROOT / "bench" / "results" / "hostile.md"
SECONDS = float(os.environ.get("HOSTILE_SECONDS", "30"))
RATE = float(os.environ.get("HOSTILE_RATE", "10"))
PROBE_TIMEOUT = 15.0

CONFIG = """<?xml version="1.0" encoding="utf-8"?>
<Config>
  <Balancer api_port="{api_port}" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <SSLCertificatePath>tls/balancer_cert.pem</SSLCertificatePath>
  <SSLPrivateKeyPath>tls/balancer_key.pem</SSLPrivateKeyPath>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance matching_port="9999" api_port="{port_a}">127.0.0.1</Instance>
    <Instance matching_port="9998" api_port="{port_b}">127.0.0.1</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/v.1.1/suppliers</Request>
    <Request method="POST">/api/{{version}}/lookup</Request>
  </AllowedRequests>
  <Workers>2</Workers>
</Config>
"""


class Probe:
    """Normal requests at RATE per second on new TLS connections from 127.0.0.2, each in its own thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[tuple[bool, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = ssl.create_default_context(cafile=str(WORK / "tls" / "balancer_cert.pem"))
        self._threads: list[threading.Thread] = []

    def one(self) -> None:
        started = time.monotonic()
        ok = False
        try:
            with socket.socket() as raw:
                raw.settimeout(PROBE_TIMEOUT)
                raw.bind(("127.0.0.2", 0))
                raw.connect(("127.0.0.1", self.port))
                with self._context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /api/v.1.1/suppliers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
                    ok = data.startswith(b"HTTP/1.1 200 ")
        except OSError:
            ok = False
        with self._lock:
            self.results.append((ok, time.monotonic() - started))

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            thread = threading.Thread(target=self.one, daemon=True)
            thread.start()
            self._threads.append(thread)
            time.sleep(1 / RATE)
        for thread in self._threads:
            thread.join(PROBE_TIMEOUT + 1)

    def summary(self) -> dict:
        times = sorted(t for _, t in self.results)
        ok = sum(1 for good, _ in self.results if good)

        def pct(q: float) -> float:
            return times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else float("nan")

        return {"ok": ok, "total": len(self.results), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def slowhttptest(port: int, mode: str, extra: list[str]) -> subprocess.Popen:
    # Slow body and Slowloris on the vendor's lookup POST, which is not repeatable; slow read on
    # the suppliers list, which has an answer to read.
    url = f"https://127.0.0.1:{port}/api/v.1.1/" + ("suppliers" if mode == "-X" else "lookup")
    args = ["slowhttptest", mode, "-l", str(int(SECONDS)), "-u", url, "-v", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=WORK)


def idle_connections(port: int, count: int, seconds: float) -> None:
    socks = []
    try:
        for _ in range(count):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(seconds)
    finally:
        for sock in socks:
            sock.close()


def under_attack(port: int, name: str, start) -> dict:  # type: ignore[no-untyped-def]
    """Run *start* (the attack), give it 3 s to build up, and probe for the rest of HOSTILE_SECONDS."""
    print(f"hostile: {name} ...", flush=True)
    attack = start()
    time.sleep(3)
    probe = Probe(port)
    probe.run(max(SECONDS - 5, 5))
    if isinstance(attack, subprocess.Popen):
        try:
            attack.wait(SECONDS + 30)
        except subprocess.TimeoutExpired:
            attack.kill()
    elif isinstance(attack, threading.Thread):
        attack.join(SECONDS + 30)
    time.sleep(2)
    return {"attack": name, **probe.summary()}


def testssl(port: int) -> dict:
    print("hostile: testssl.sh ...", flush=True)
    out = WORK / "testssl.json"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        subprocess.run(
            ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--sneaky", "-p", "-s", "-U", "-E",
             "--jsonfile", str(out), f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, cwd=WORK,
        )
    except subprocess.TimeoutExpired:
        return {"attack": "testssl.sh", "findings": ["did not finish within 600 s"]}
    findings = json.loads(out.read_text()) if out.exists() else []
    offered = [f["id"] for f in findings if f.get("id", "").startswith(("SSLv", "TLS1")) and f.get("finding", "").startswith("offered")]
    bad = [f"{f['id']}: {f['finding']}" for f in findings if f.get("severity") in ("MEDIUM", "HIGH", "CRITICAL")]
    cbc = [f["id"] for f in findings if f.get("id", "").startswith("cipher-") and "CBC" in f.get("finding", "")]
    return {
        "attack": "testssl.sh",
        "seconds": round(time.monotonic() - started),
        "protocols": offered,
        "findings": bad,
        "cbc_suites": cbc,
    }


def main() -> int:
    for tool in ("slowhttptest", "testssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"hostile: {tool} is missing; `make hostile` installs it (apt-get install slowhttptest testssl.sh)")
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tls").mkdir(parents=True)
    api_port, port_a, port_b = free_port(), free_port(), free_port()
    make_self_signed(WORK / "tls" / "balancer_cert.pem", WORK / "tls" / "balancer_key.pem", "127.0.0.1", "balancer")
    for name in ("A", "B"):
        make_self_signed(WORK / f"instance_{name}.pem", WORK / f"instance_{name}.key", "127.0.0.1", f"instance {name}")
    (WORK / "kl_balancer.conf").write_text(CONFIG.format(api_port=api_port, port_a=port_a, port_b=port_b))
    procs: list[subprocess.Popen] = []
    results: list[dict] = []
    try:
        for name, port in (("A", port_a), ("B", port_b)):
            proc = subprocess.Popen(
                [sys.executable, "-m", "demo.instance", "--host", "127.0.0.1", "--port", str(port),
                 "--cert", str(WORK / f"instance_{name}.pem"), "--key", str(WORK / f"instance_{name}.key"), "--name", name],
                cwd=ROOT, stdout=open(WORK / f"instance_{name}.log", "wb"), stderr=subprocess.STDOUT,
            )
            procs.append(proc)
            wait_for_port(port, proc, f"instance {name}", logs=WORK)
        balancer = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(WORK / "kl_balancer.conf")},
            stdout=open(WORK / "balancer.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(balancer)
        wait_for_port(api_port, balancer, "the balancer", logs=WORK)
        time.sleep(1)
        results.append(under_attack(api_port, "none (baseline)", lambda: None))
        results.append(under_attack(
            api_port, "slowhttptest -B -c 300 (slow body, lookup POST)",
            lambda: slowhttptest(api_port, "-B", ["-c", "300", "-r", "300", "-i", "2", "-s", "65536", "-t", "POST"]),
        ))
        results.append(under_attack(
            api_port, "slowhttptest -H -c 2500 (Slowloris, lookup POST)",
            lambda: slowhttptest(api_port, "-H", ["-c", "2500", "-r", "500", "-i", "3", "-t", "POST"]),
        ))
        results.append(under_attack(
            api_port, "slowhttptest -X -c 300 (slow read)",
            lambda: slowhttptest(api_port, "-X", ["-c", "300", "-r", "300", "-k", "20", "-n", "2", "-w", "1", "-y", "16", "-z", "4"]),
        ))

        def idle() -> threading.Thread:
            thread = threading.Thread(target=idle_connections, args=(api_port, 2000, SECONDS - 3), daemon=True)
            thread.start()
            return thread

        results.append(under_attack(api_port, "2,000 idle TCP connections (no handshake)", idle))
        tls = testssl(api_port)
        alive = balancer.poll() is None
    finally:
        stop_all(procs, timeout=15)
    log = (WORK / "balancer.log").read_text(errors="replace")
    lines = [
        f"# make hostile ({time.strftime('%Y-%m-%d %H:%M')}, HOSTILE_SECONDS={SECONDS:g}, probe {RATE:g} requests/s)",
        "",
        "| attack | normal requests answered 200 | p50 | p99 |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['attack']} | {r['ok']}/{r['total']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms |")
    lines += [
        "",
        f"testssl.sh ({tls.get('seconds', '?')} s): protocols offered: {', '.join(tls.get('protocols', [])) or 'none found'}; "
        f"CBC suites: {', '.join(tls.get('cbc_suites', [])) or 'none'}; "
        f"findings of severity MEDIUM or above: {'; '.join(tls.get('findings', [])) or 'none'}",
        "",
        f"Balancer still running after the attacks: {'yes' if alive else 'NO'}; "
        f"tracebacks in its log: {log.count('Traceback')}; log lines: {log.count(chr(10))}",
    ]
    text = "\n".join(lines) + "\n"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)
    print()
    print(text)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
