#!/usr/bin/env python3
"""Benchmark: what a fan-out write costs, against the same write sent to one instance and sent directly.

    make bench-fanout                         # 300 writes per contender, about a minute
    FANOUT_WRITES=100 make bench-fanout       # shorter

On loopback, in a fresh directory under bench/.run/: two demo instances
(demo/instance.py, keeping what they are sent), and two balancers
(``gunicorn -c gunicorn.conf.py wsgi:app``, 2 workers, plain HTTP): one where
``PUT /api/{version}/suppliers/{supplier}/indicators`` is ``fanout="true"``,
one where it is an ordinary request. One client sends the writes one after
the other, each contender over one kept-alive connection (direct: TLS to
instance A; the balancers: plain HTTP), contenders alternating write by write,
so that both see the same machine. Reported: p50 and p99 latency per
contender, and the ratios fan-out / forwarded and forwarded / direct. The
fan-out write does more by design: it reaches both instances (in parallel),
is fsync-ed into the journal before it is sent and settled before the answer.
Writes bench/results/fanout.md.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.instance import make_self_signed  # noqa: E402
from demo.run import free_port, start_instance, stop_all, wait_for_port  # noqa: E402

WRITES = int(os.environ.get("FANOUT_WRITES", "300"))
TARGET = "/api/v1/suppliers/bench/indicators"

CONFIG = """<?xml version="1.0" encoding="utf-8"?>
<Config>
  <Balancer api_port="{port}" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance enabled="true" matching_port="9999" api_port="{a}">127.0.0.1</Instance>
    <Instance enabled="true" matching_port="9998" api_port="{b}">127.0.0.1</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="PUT"{fanout}>/api/{{version}}/suppliers/{{supplier}}/indicators</Request>
  </AllowedRequests>
  <Workers>2</Workers>
</Config>
"""


def connect(port: int, tls: bool) -> http.client.HTTPConnection:
    """One kept-alive connection per contender: what is measured is the write, not a handshake."""
    if tls:
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ssl._create_unverified_context())
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def send(conn: http.client.HTTPConnection, i: int) -> float:
    body = json.dumps({"indicators": [f"198.51.100.{i % 250}", f"w-{i}"]}).encode()
    started = time.perf_counter()
    conn.request("PUT", TARGET, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise SystemExit(f"bench: a write got {resp.status}")
    return time.perf_counter() - started


def main() -> int:
    work = ROOT / "bench" / ".run" / f"fanout-{int(time.time())}"
    work.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        ports = {"A": free_port(), "B": free_port()}
        for name, port in ports.items():
            make_self_signed(work / f"instance_{name}.pem", work / f"instance_{name}.key", "127.0.0.1", name)
            procs.append(start_instance(name, port, work))
            # The supplier every write goes to, created on each instance directly.
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context())
            conn.request("POST", "/api/v1/suppliers", json.dumps({"name": "bench"}))
            assert conn.getresponse().status == 201
            conn.close()
        balancers = {}
        for label, fanout in (("fan-out", ' fanout="true"'), ("forwarded", "")):
            directory = work / label
            directory.mkdir()
            port = free_port()
            config = directory / "kl_balancer.conf"
            config.write_text(CONFIG.format(port=port, a=ports["A"], b=ports["B"], fanout=fanout))
            log = open(directory / "balancer.log", "wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(config)}, stdout=log, stderr=subprocess.STDOUT,
            )
            procs.append(proc)
            wait_for_port(port, proc, f"the {label} balancer", logs=directory)
            balancers[label] = port
        time.sleep(1.0)
        contenders = [("direct", connect(ports["A"], True)), ("forwarded", connect(balancers["forwarded"], False)),
                      ("fan-out", connect(balancers["fan-out"], False))]
        for name, conn in contenders:  # warm-up: references learned, pools filled
            for i in range(10):
                send(conn, i)
        times: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for i in range(WRITES):
            for name, conn in contenders:
                times[name].append(send(conn, i))
        rows = []
        for name, _ in contenders:
            samples = sorted(times[name])
            p50 = statistics.median(samples) * 1e3
            p99 = samples[int(len(samples) * 0.99) - 1] * 1e3
            rows.append((name, p50, p99))
        p50 = {name: value for name, value, _ in rows}
        lines = [
            f"# Fan-out writes ({WRITES} writes per contender, one client, one kept-alive connection each)",
            "",
            "| contender | p50 ms | p99 ms |",
            "|---|--:|--:|",
            *[f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in rows],
            "",
            f"fan-out / forwarded (p50): {p50['fan-out'] / p50['forwarded']:.2f}x; "
            f"forwarded / direct (p50): {p50['forwarded'] / p50['direct']:.2f}x",
        ]
        report = "\n".join(lines) + "\n"
        print(report)
        results = ROOT / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / "fanout.md").write_text(report)
        return 0
    finally:
        stop_all(procs)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
