"""A small HTTPS server that answers like a CyberTrace instance's REST API.

Used by ``make demo`` and by the tests that need an instance in another
process. ``GET /api/{version}/suppliers`` returns a JSON list of suppliers;
``/api/{version}/lookup`` echoes what it received; every request is appended
to ``--log`` (one JSON object per line) so a test can count what arrived.

Suppliers and their indicators are kept (:class:`Catalog`, saved to
``--state`` when given), through the CyberTrace paths the fan-out writes use:

    POST   /api/{version}/suppliers                        {"name": N, "format": F}: 201, or 409 if N exists
    PUT    /api/{version}/suppliers/{name}/indicators      {"indicators": [...]}: adds them (200), 404 if no supplier
    DELETE /api/{version}/suppliers/{name}/indicators      {"indicators": [...]}: removes them (200)
    GET    /api/{version}/suppliers/{name}/indicators      the supplier's indicators, sorted

    python demo/instance.py --port 9444 --cert c.pem --key k.pem --name A --log a.log --state a.json
    python demo/instance.py --make-cert c.pem k.pem --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SUPPLIERS = [
    {"name": "Demo Malicious URL Data Feed", "format": "json", "records": 1250},
    {"name": "Demo IP Reputation Data Feed", "format": "json", "records": 830},
    {"name": "Demo Malicious Hash Data Feed", "format": "json", "records": 4096},
]


def make_self_signed(cert_path: Path, key_path: Path, host: str = "127.0.0.1", name: str = "demo instance") -> None:
    """Write a fresh self-signed certificate and key for *host* (an IP or a name)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)


class Catalog:
    """Suppliers and their indicators, as an instance keeps them; saved to *path* after each change when given.

    Adding an indicator that is there, or removing one that is not, changes
    nothing and answers the same: those writes are safe to apply twice.
    Creating a supplier that exists answers 409: that one is not.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.suppliers: dict[str, dict] = {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            self.suppliers = {n: {"format": v["format"], "indicators": set(v["indicators"])} for n, v in saved.items()}

    def snapshot(self) -> dict[str, dict]:
        """Every supplier with its format and sorted indicators: what two identical instances share."""
        with self.lock:
            return {n: {"format": v["format"], "indicators": sorted(v["indicators"])} for n, v in sorted(self.suppliers.items())}

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, object] | None:
        """(status, JSON answer) for a catalog path; None for any other path."""
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "api" and parts[3] == "suppliers" and method == "POST":
            data = _json_object(body)
            name = data.get("name") if data else None
            if not isinstance(name, str) or not name:
                return 400, {"error": "expected a JSON object with a name"}
            with self.lock:
                if name in self.suppliers:
                    return 409, {"error": f"supplier {name} exists"}
                self.suppliers[name] = {"format": str(data.get("format", "json")), "indicators": set()}
                self._save()
            return 201, {"name": name}
        if len(parts) == 6 and parts[1] == "api" and parts[3] == "suppliers" and parts[5] == "indicators":
            name = parts[4]
            with self.lock:
                supplier = self.suppliers.get(name)
                if supplier is None:
                    return 404, {"error": f"no supplier {name}"}
                if method == "GET":
                    return 200, {"supplier": name, "indicators": sorted(supplier["indicators"])}
                data = _json_object(body)
                indicators = data.get("indicators") if data else None
                if method not in ("PUT", "DELETE"):
                    return 405, {"error": f"{method} is not allowed here"}
                if not isinstance(indicators, list) or not all(isinstance(i, str) for i in indicators):
                    return 400, {"error": "expected a JSON object with a list of indicators"}
                if method == "PUT":
                    supplier["indicators"].update(indicators)
                else:
                    supplier["indicators"].difference_update(indicators)
                self._save()
                return 200, {"supplier": name, "count": len(supplier["indicators"])}
        return None

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({n: {"format": v["format"], "indicators": sorted(v["indicators"])}
                                   for n, v in self.suppliers.items()}))
        os.replace(tmp, self.path)


def _json_object(body: bytes) -> dict | None:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-instance"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _record(self, body: bytes) -> None:
        server: InstanceServer = self.server  # type: ignore[assignment]
        entry = {
            "instance": server.name,
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": len(body),
        }
        if server.log_path:
            with server.log_lock, open(server.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _body(self) -> bytes | None:
        """The request body, or None when the client sent less than its Content-Length (nothing is done then)."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            return None
        return body

    def _send_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Instance", self.server.name)  # type: ignore[attr-defined]
        # Head and body in one write: two small writes on a kept-alive connection wait for
        # the peer's delayed ACK (Nagle), 40 ms per answer.
        self._headers_buffer.append(b"\r\n")  # type: ignore[attr-defined]  # what end_headers() adds
        if self.command != "HEAD":
            self._headers_buffer.append(data)  # type: ignore[attr-defined]
        self.flush_headers()

    def _handle(self) -> None:
        body = self._body()
        if body is None:
            return  # a truncated request is not acted on, as a real server would not
        self._record(body)
        path = self.path.split("?", 1)[0]
        parts = path.split("/")
        server: InstanceServer = self.server  # type: ignore[assignment]
        stored = server.catalog.handle(self.command, path, body)
        if stored is not None:
            self._send_json(*stored)
        elif len(parts) == 4 and parts[1] == "api" and parts[3] == "suppliers":
            kept = [{"name": n, "format": v["format"], "records": len(v["indicators"])}
                    for n, v in server.catalog.snapshot().items()]
            self._send_json(200, {"instance": server.name, "suppliers": SUPPLIERS + kept})
        elif len(parts) == 4 and parts[1] == "api" and parts[3] == "lookup":
            self._send_json(
                200,
                {"instance": self.server.name, "method": self.command, "target": self.path,  # type: ignore[attr-defined]
                 "body": body.decode("utf-8", "replace")},
            )
        else:
            self._send_json(404, {"error": "not found", "target": self.path})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle


class InstanceServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], name: str, log_path: str | None, state: str | None = None) -> None:
        super().__init__(address, Handler)
        self.name = name
        self.log_path = log_path
        self.log_lock = threading.Lock()
        self.catalog = Catalog(Path(state) if state else None)


def serve(host: str, port: int, cert: str, key: str, name: str, log_path: str | None, state: str | None = None) -> None:
    server = InstanceServer((host, port), name, log_path, state)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # The handshake happens in the connection's own thread, on its first read:
    # a client that connects and stays silent cannot hold up the accept loop.
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    print(f"instance {name} listening on https://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--name", default="instance")
    parser.add_argument("--log")
    parser.add_argument("--state", help="keep suppliers and indicators in this JSON file")
    parser.add_argument("--make-cert", nargs=2, metavar=("CERT", "KEY"), help="write a self-signed pair and exit")
    args = parser.parse_args(argv)
    if args.make_cert:
        make_self_signed(Path(args.make_cert[0]), Path(args.make_cert[1]), args.host, args.name)
        return 0
    if not (args.cert and args.key):
        parser.error("--cert and --key are required to serve")
    serve(args.host, args.port, args.cert, args.key, args.name, args.log, args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
