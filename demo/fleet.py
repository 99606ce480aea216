"""``make fleet-demo``: two balancers sharing one etcd pin store, in front of the demo instances.

Everything lives in ``.fleet-demo/`` and listens on loopback only:

1. a 3-member etcd cluster (Debian's ``etcd``, ``make fleet-demo`` installs
   it when missing);
2. two demo instances, A and B (``demo/instance.py``);
3. two balancers (``gunicorn -c gunicorn.conf.py wsgi:app``, two workers
   each), each with its own ``kl_balancer.conf`` whose ``<PinStore
   type="etcd">`` names the same cluster, as two machines of a fleet would;
4. the seed's request through each balancer, and the keys in etcd: one per
   instance, learned once for both;
5. instance A restarted with a new certificate: both balancers refuse it,
   ``pins trust`` is run once, against the first balancer's configuration,
   and both serve A again within a second;
6. serving until Ctrl-C, which stops every process it started (``--once``
   stops after step 5).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app.pins import sha256
from demo.instance import make_self_signed
from demo.run import ROOT, fetch, free_port, serve_until_stopped, shown, start_instance, stop_all, wait_for_port

WORK = Path(os.environ.get("FLEET_DEMO_DIR") or ROOT / ".fleet-demo").resolve()
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
PREFIX = "/ctbalancer"
SUPPLIERS = "/api/v.1.1/suppliers"

CONFIG = """<?xml version="1.0" encoding="utf-8"?>
<!-- Written by `make fleet-demo`: balancer {number} of a fleet of two. -->
<Config>
  <Balancer api_port="{api_port}" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <SSLCertificatePath>../tls/balancer_cert.pem</SSLCertificatePath>
  <SSLPrivateKeyPath>../tls/balancer_key.pem</SSLPrivateKeyPath>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance enabled="true" matching_port="9999" api_port="{port_a}">127.0.0.1</Instance>
    <Instance enabled="true" matching_port="9999" api_port="{port_b}">localhost</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/{{version}}/suppliers</Request>
  </AllowedRequests>
  <Workers>2</Workers>
  <PinStore type="etcd" endpoints="{endpoints}" prefix="{prefix}"/>
</Config>
"""


def start_etcd(procs: list[subprocess.Popen]) -> list[str]:
    """Three etcd members on loopback; their client URLs once the cluster answers."""
    if not os.access(ETCD, os.X_OK):
        raise SystemExit("fleet-demo: etcd is not installed; `make fleet-demo` installs Debian's etcd-server")
    members = [(f"m{i}", free_port(), free_port()) for i in range(3)]
    cluster = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in members)
    for name, client, peer in members:
        log = open(WORK / f"etcd_{name}.log", "ab")
        procs.append(subprocess.Popen(
            [ETCD, "--name", name, "--data-dir", str(WORK / "etcd" / name),
             "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", "ctbalancer-fleet-demo",
             "--logger", "zap", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
    urls = [f"http://127.0.0.1:{client}" for _, client, _ in members]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(_answers(url) for url in urls):
            return urls
        time.sleep(0.2)
    raise SystemExit(f"fleet-demo: the etcd cluster did not become healthy; see {shown(WORK)}/etcd_*.log")


def _gateway(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=2) as f:
        return json.loads(f.read())


def _answers(url: str) -> bool:
    try:
        _gateway(url, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
        return True
    except OSError:
        return False


def stored(url: str) -> list[tuple[str, dict]]:
    """(key, value) of every reference in the store."""
    start = f"{PREFIX}/pins/".encode()
    end = start[:-1] + bytes([start[-1] + 1])
    answer = _gateway(url, "/v3/kv/range", {"key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
    return [
        (base64.b64decode(kv["key"]).decode(), json.loads(base64.b64decode(kv["value"])))
        for kv in answer.get("kvs", [])
    ]


def start_balancer(number: int, config: Path, procs: list[subprocess.Popen], api_port: int) -> None:
    log = open(config.parent / "balancer.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(config)}, stdout=log, stderr=subprocess.STDOUT,
    )
    procs.append(proc)
    wait_for_port(api_port, proc, f"balancer {number}", logs=config.parent)


def ask_both(balancers: dict[int, int], cafile: Path, want: str) -> None:
    """The seed's request through each balancer until instance *want* answers it; print the answer."""
    for number, port in balancers.items():
        for _ in range(12):  # each worker takes the instances in turn
            status, body = fetch(port, cafile, SUPPLIERS)
            if status == 200 and json.loads(body).get("instance") == want:
                print(f"balancer {number}: GET {SUPPLIERS} -> 200, answered by instance {want}")
                break
            if status != 200:
                answer = json.loads(body)
                print(f"balancer {number}: GET {SUPPLIERS} -> {status} {answer['error']}")
                break
        else:
            print(f"balancer {number}: instance {want} did not answer")


def main() -> int:
    parser = argparse.ArgumentParser(description="Start the ctbalancer fleet demo.")
    parser.add_argument("--once", action="store_true", help="stop after the rotation instead of serving")
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tls").mkdir(parents=True)
    make_self_signed(WORK / "tls" / "balancer_cert.pem", WORK / "tls" / "balancer_key.pem", "127.0.0.1", "balancer")
    hosts = {"A": "127.0.0.1", "B": "localhost"}
    for name, host in hosts.items():
        make_self_signed(WORK / f"instance_{name}.pem", WORK / f"instance_{name}.key", host, f"demo instance {name}")
    cafile = WORK / "tls" / "balancer_cert.pem"
    ports = {"A": free_port(), "B": free_port()}
    procs: list[subprocess.Popen] = []
    try:
        endpoints = start_etcd(procs)
        print(f"etcd: 3 members, {' '.join(endpoints)}")
        for name, port in ports.items():
            procs.append(start_instance(name, port, WORK))
        print(f"Instances: A https://127.0.0.1:{ports['A']}, B https://localhost:{ports['B']}")
        balancers: dict[int, int] = {}
        configs: dict[int, Path] = {}
        for number in (1, 2):
            directory = WORK / f"balancer-{number}"
            directory.mkdir()
            balancers[number] = free_port()
            configs[number] = directory / "kl_balancer.conf"
            configs[number].write_text(CONFIG.format(
                number=number, api_port=balancers[number], port_a=ports["A"], port_b=ports["B"],
                endpoints=" ".join(endpoints), prefix=PREFIX,
            ))
            start_balancer(number, configs[number], procs, balancers[number])
            print(f"Balancer {number}: https://127.0.0.1:{balancers[number]}  (configuration {shown(configs[number])})")
        time.sleep(0.5)

        print("\nThe seed's request through each balancer, to each instance:")
        for name in ports:
            ask_both(balancers, cafile, name)
        print("\nReferences in etcd: learned once, by whichever balancer met the instance first, used by both:")
        for key, value in stored(endpoints[0]):
            print(f"    {key}  sha256 {value['sha256']}  (learned by {value.get('learned_by')})")

        print("\nInstance A restarts with a new certificate:")
        a = procs[3]
        a.terminate()
        a.wait(10)
        make_self_signed(WORK / "instance_A.pem", WORK / "instance_A.key", "127.0.0.1", "demo instance A, renewed")
        procs[3] = start_instance("A", ports["A"], WORK)
        ask_both(balancers, cafile, "A")
        new_fp = sha256(ssl.PEM_cert_to_DER_cert((WORK / "instance_A.pem").read_text()))
        command = ["flask", "--app", "wsgi", "pins", "trust", f"127.0.0.1:{ports['A']}", "--sha256", new_fp]
        print(f"\nThe operator runs, once, with balancer 1's configuration:\n    {' '.join(command)}")
        done = subprocess.run(
            [sys.executable, "-m", *command], cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(configs[1])},
            capture_output=True, text=True, timeout=60,
        )
        for line in (done.stdout + done.stderr).strip().splitlines():
            print(f"    {line}")
        time.sleep(1.0)  # every worker of every balancer picks the change up within a second
        print("\nOne second later, through both balancers:")
        ask_both(balancers, cafile, "A")
        for number, port in balancers.items():
            status, body = fetch(port, cafile, "/_balancer/status")
            store = json.loads(body)["pin_store"]
            print(f"balancer {number}: GET /_balancer/status -> {status}: pin store {store['type']} {store['state']}, "
                  f"{store['references']} references at revision {store['revision']}")
        print(f"\nLogs: {shown(WORK)}/balancer-*/balancer.log, {shown(WORK)}/etcd_*.log")
        return 0 if args.once else serve_until_stopped(procs, "fleet-demo", WORK)
    except KeyboardInterrupt:
        print("\nStopping.")
        return 0
    finally:
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
