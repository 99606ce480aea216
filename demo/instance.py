"""A small HTTPS server that answers like a CyberTrace instance's REST API.

Used by ``make demo`` and by the tests that need an instance in another
process. ``GET /api/v.1.1/suppliers`` returns a JSON list of suppliers;
``/api/{version}/lookup`` echoes what it received; every request is appended
to ``--log`` (one JSON object per line) so a test can count what arrived.

    python demo/instance.py --port 9444 --cert c.pem --key k.pem --name A --log a.log
    python demo/instance.py --make-cert c.pem k.pem --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import datetime
import json
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
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        if body is None:
            return  # a truncated request is not acted on, as a real server would not
        self._record(body)
        path = self.path.split("?", 1)[0]
        parts = path.split("/")
        if path == "/api/v.1.1/suppliers" or (len(parts) == 4 and parts[1] == "api" and parts[3] == "suppliers"):
            self._send_json(200, {"instance": self.server.name, "suppliers": SUPPLIERS})  # type: ignore[attr-defined]
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

    def __init__(self, address: tuple[str, int], name: str, log_path: str | None) -> None:
        super().__init__(address, Handler)
        self.name = name
        self.log_path = log_path
        self.log_lock = threading.Lock()


def serve(host: str, port: int, cert: str, key: str, name: str, log_path: str | None) -> None:
    server = InstanceServer((host, port), name, log_path)
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
    parser.add_argument("--make-cert", nargs=2, metavar=("CERT", "KEY"), help="write a self-signed pair and exit")
    args = parser.parse_args(argv)
    if args.make_cert:
        make_self_signed(Path(args.make_cert[0]), Path(args.make_cert[1]), args.host, args.name)
        return 0
    if not (args.cert and args.key):
        parser.error("--cert and --key are required to serve")
    serve(args.host, args.port, args.cert, args.key, args.name, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
