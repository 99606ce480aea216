"""``make demo``: two demo instances, the balancer in front of them, and the seed's check request.

Everything lives in ``.demo/`` and listens on loopback only:

1. self-signed certificates for two demo instances and for the balancer;
2. the two instances (``demo/instance.py``) on free ports;
3. a ``kl_balancer.conf`` naming them, and ``gunicorn -c gunicorn.conf.py wsgi:app``;
4. ``GET /api/v.1.1/suppliers`` through the balancer, once per instance, and
   the reference certificates it learned with their SHA-256;
5. instance A restarted with a new certificate: the balancer refuses it with
   the 500 that names it and logs the ``pins trust`` command, the command is
   run, and A serves again; then the node's status;
6. a fan-out write: a supplier created and indicators added through the
   balancer, and each instance asked directly for what it holds: the same;
7. serving until Ctrl-C (``--once`` stops here instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from app.pins import read_reference, sha256
from demo.instance import make_self_signed

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("DEMO_DIR") or ROOT / ".demo").resolve()


def shown(path: Path) -> str:
    """*path* relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30, logs: Path = WORK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited with status {proc.returncode}; see {logs}/*.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not listen on port {port} within {timeout:.0f}s")


CONFIG = """<?xml version="1.0" encoding="utf-8"?>
<!-- Written by `make demo`: two demo instances on loopback. -->
<Config>
  <Balancer api_port="{api_port}" matching_port="9999" cybertrace_port="9998" scanners_count="10">127.0.0.1</Balancer>
  <SSLCertificatePath>tls/balancer_cert.pem</SSLCertificatePath>
  <SSLPrivateKeyPath>tls/balancer_key.pem</SSLPrivateKeyPath>
  <CertDirPath>certs</CertDirPath>
  <Instances>
    <Instance enabled="true" matching_port="9999" api_port="{port_a}">127.0.0.1</Instance>
    <Instance enabled="true" matching_port="9999" api_port="{port_b}">localhost</Instance>
  </Instances>
  <AllowedRequests>
    <Request method="GET">/api/v.1.1/suppliers</Request>
    <Request method="GET">/api/{{version}}/suppliers</Request>
    <Request method="POST">/api/{{version}}/lookup</Request>
    <Request method="POST" fanout="true">/api/{{version}}/suppliers</Request>
    <Request method="PUT" fanout="true">/api/{{version}}/suppliers/{{supplier}}/indicators</Request>
    <Request method="DELETE" fanout="true">/api/{{version}}/suppliers/{{supplier}}/indicators</Request>
  </AllowedRequests>
  <Workers>2</Workers>
</Config>
"""


def stop_all(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """TERM to every process still running, the last started first; KILL what does not end in *timeout*."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_instance(name: str, port: int, work: Path = WORK) -> subprocess.Popen:
    """Demo instance *name* on *port*, with its certificate, key and logs in *work*."""
    log = open(work / f"instance_{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.instance", "--host", "127.0.0.1", "--port", str(port),
         "--cert", str(work / f"instance_{name}.pem"), "--key", str(work / f"instance_{name}.key"),
         "--name", name, "--log", str(work / f"instance_{name}.requests"),
         "--state", str(work / f"instance_{name}.catalog.json")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc, f"instance {name}", logs=work)
    return proc


def rotate(procs: list[subprocess.Popen], ports: dict[str, int], api_port: int, cafile: Path, config: Path) -> None:
    """The seed's story: instance A's certificate changes, A is refused, the operator trusts it, A serves again."""
    print("\nInstance A restarts with a new certificate (renewed by its operator, or an impostor):")
    a = procs.pop(0)
    a.terminate()
    a.wait(10)
    make_self_signed(WORK / "instance_A.pem", WORK / "instance_A.key", "127.0.0.1", "demo instance A, renewed")
    procs.insert(0, start_instance("A", ports["A"]))
    new_fp = sha256(ssl.PEM_cert_to_DER_cert((WORK / "instance_A.pem").read_text()))
    for _ in range(8):  # the workers take the instances in turn
        status, body = fetch(api_port, cafile, "/api/v.1.1/suppliers")
        if status == 500:
            answer = json.loads(body)
            print(f"GET /api/v.1.1/suppliers -> 500 {answer['error']}:\n    {answer['description']}")
            break
    log = (WORK / "balancer.log").read_text(errors="replace")
    line = next((ln for ln in log.splitlines() if "certificate mismatch for instance" in ln), "")
    print(f"The balancer's log:\n    {line.split('app.pins: ', 1)[-1]}")
    command = ["flask", "--app", "wsgi", "pins", "trust", f"127.0.0.1:{ports['A']}", "--sha256", new_fp]
    print(f"\nThe operator checks the new fingerprint on the instance and runs:\n    {' '.join(command)}")
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(config)},
        capture_output=True, text=True, timeout=60,
    )
    for out_line in (done.stdout + done.stderr).strip().splitlines():
        print(f"    {out_line}")
    time.sleep(1.2)  # running workers pick a changed reference up within a second
    for _ in range(8):
        status, body = fetch(api_port, cafile, "/api/v.1.1/suppliers")
        if status == 200 and json.loads(body).get("instance") == "A":
            print("GET /api/v.1.1/suppliers -> 200, answered by instance A again")
            break
    status, body = fetch(api_port, cafile, "/_balancer/status")
    node = json.loads(body)
    print(f"\nGET /_balancer/status -> {status}: scope {node['scope']}, workers {node['workers']}")
    for item in node["instances"]:
        print(f"    {item['host']}:{item['api_port']}  {item['state']}, {item['requests_total']} answers, "
              f"last error: {item['last_error']}")
    status, body = fetch(api_port, cafile, "/_balancer/metrics")
    shown_names = ("ctbalancer_requests_total", "ctbalancer_pin_mismatch_total", "ctbalancer_pin_learned_total",
                   "ctbalancer_instance_up", "ctbalancer_workers")
    print(f"\nGET /_balancer/metrics -> {status} (excerpt):")
    for line in body.splitlines():
        if line.startswith(shown_names):
            print(f"    {line}")


def fetch(port: int, cafile: Path | None, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, str]:
    """(status, body) of one request over TLS; *cafile* None for an instance's self-signed certificate (not checked)."""
    status, _, text = exchange(port, cafile, path, method, body)
    return status, text


def exchange(port: int, cafile: Path | None, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one request over TLS."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else ssl._create_unverified_context()
    head_lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if body:
        head_lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), fields, rest.decode()


def fan_out_story(ports: dict[str, int], api_port: int, cafile: Path) -> None:
    """A write through the balancer reaches both instances: they hold the same indicators."""
    print("\nA fan-out write: a supplier and two indicators, through the balancer:")
    for method, path, payload in (
        ("POST", "/api/v1/suppliers", {"name": "demo-feed"}),
        ("PUT", "/api/v1/suppliers/demo-feed/indicators", {"indicators": ["192.0.2.66", "evil.example"]}),
    ):
        status, fields, _ = exchange(api_port, cafile, path, method, json.dumps(payload).encode())
        print(f"    {method} {path} -> {status}, X-CTBalancer-Fanout: {fields.get('X-CTBalancer-Fanout')}")
    print("Each instance, asked directly:")
    for name, port in ports.items():
        status, body = fetch(port, None, "/api/v1/suppliers/demo-feed/indicators")
        print(f"    instance {name}: {status} {json.loads(body).get('indicators')}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Start the ctbalancer demo.")
    parser.add_argument("--once", action="store_true", help="stop after the check request instead of serving")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "9443")))
    args = parser.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tls").mkdir(parents=True)
    api_port = args.port if _port_is_free(args.port) else free_port()
    ports = {"A": free_port(), "B": free_port()}
    make_self_signed(WORK / "tls" / "balancer_cert.pem", WORK / "tls" / "balancer_key.pem", "127.0.0.1", "balancer")
    hosts = {"A": "127.0.0.1", "B": "localhost"}
    for name, host in hosts.items():
        make_self_signed(WORK / f"instance_{name}.pem", WORK / f"instance_{name}.key", host, f"demo instance {name}")
    config = WORK / "kl_balancer.conf"
    config.write_text(CONFIG.format(api_port=api_port, port_a=ports["A"], port_b=ports["B"]))

    procs: list[subprocess.Popen] = []

    try:
        for name, port in ports.items():
            procs.append(start_instance(name, port))
        balancer_log = open(WORK / "balancer.log", "wb")
        balancer = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env={**os.environ, "BALANCER_CONFIG": str(config)},
            stdout=balancer_log, stderr=subprocess.STDOUT,
        )
        procs.append(balancer)
        wait_for_port(api_port, balancer, "the balancer")
        time.sleep(0.5)

        print(f"Balancer: https://127.0.0.1:{api_port}  (configuration {shown(config)})")
        print(f"Instances: A https://127.0.0.1:{ports['A']}, B https://localhost:{ports['B']}\n")
        cafile = WORK / "tls" / "balancer_cert.pem"
        answered: set[str] = set()
        for _ in range(8):  # each worker takes the instances in turn: ask until both answered
            status, body = fetch(api_port, cafile, "/api/v.1.1/suppliers")
            answer = json.loads(body)
            if answer.get("instance") in answered:
                continue
            answered.add(answer.get("instance"))
            print(f"GET /api/v.1.1/suppliers -> {status}, answered by instance {answer.get('instance')}:")
            for supplier in answer.get("suppliers", []):
                print(f"    {supplier['name']}")
            if len(answered) == len(ports):
                break
        status, body = fetch(api_port, cafile, "/api/v.1.1/../admin")
        print(f"\nGET /api/v.1.1/../admin -> {status} {json.loads(body)['error']} (nothing was sent)")
        print("\nReference certificates learned on first contact:")
        for pem in sorted((WORK / "certs").glob("*.pem")):
            print(f"    {shown(pem)}  sha256 {sha256(read_reference(pem))}")
        rotate(procs, ports, api_port, cafile, config)
        fan_out_story(ports, api_port, cafile)
        print(
            f"\nTry it:  curl --cacert {shown(cafile)} https://127.0.0.1:{api_port}/api/v.1.1/suppliers\n"
            f"Logs:    {shown(WORK)}/balancer.log"
        )
        return 0 if args.once else serve_until_stopped(procs, "demo", WORK)
    except KeyboardInterrupt:
        print("\nStopping.")
        return 0
    finally:
        stop_all(procs)


def serve_until_stopped(procs: list[subprocess.Popen], what: str, work: Path) -> int:
    """Wait for Ctrl-C (KeyboardInterrupt) or SIGTERM; 1 if one of *procs* stops first."""
    print("Serving until Ctrl-C.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Ctrl-C even when started where SIGINT is ignored (in the background of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    print(f"{what}: a process stopped; see the logs in {shown(work)}", file=sys.stderr)
    return 1


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


if __name__ == "__main__":
    sys.exit(main())
