"""Someone between the balancer and an instance, after the genuine certificate was learned (docs/design.md, "Reference certificates").

Each test first lets the balancer meet the real instance (a pytest-httpserver
HTTPS instance with a trustme certificate), so the reference file holds the
genuine leaf. Then the instance's address is taken over, and a request that
carries everything worth stealing (request line, ``Authorization``, body) is
sent through the balancer. The attacker records every byte it receives after
the TLS handshake: it must receive none, the client must get the 500
``certificate_mismatch`` naming host and port (or a 503 when no TLS session
could be set up at all), and the reference file must be exactly as learned.

A control step in each test shows the attacker would have received the
request had the balancer sent it (it completed a handshake, or it relays a
direct request to the real instance), so the zero is not a test artefact.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.pins import der_to_pem, sha256

from .peers import InterceptingRelay, NoCertificatePeer, PlainPeer, RecordingPeer, context_from_pem
from .support import Instance, RawResponse, free_port, get, read_response, write_config

TARGET = "/api/v1/lookup"
SECRET_TOKEN = "Bearer s3cr3t-t0ken-8c1f"
SECRET_BODY = b'{"ioc": "secret-indicator-5e2a"}'
#: Bytes of the request that must never reach anyone but the genuine instance.
SECRETS = (b"POST ", TARGET.encode(), b"Authorization", SECRET_TOKEN.encode(), SECRET_BODY, b"X-Forwarded-For")


def send_secret(port: int) -> RawResponse:
    return get(port, TARGET, method="POST", headers={"Authorization": SECRET_TOKEN}, body=SECRET_BODY)


def reissue(ca: trustme.CA, cert: trustme.LeafCert, same_key: bool) -> tuple[bytes, bytes]:
    """A copy of *cert* signed again by *ca*: same subject, SAN and extensions, new serial and validity.

    With *same_key* it keeps the key pair (what a renewal without a new key
    produces); otherwise it gets a fresh one. Returns (certificate PEM, key PEM).
    """
    original = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    if same_key:
        key_pem = cert.private_key_pem.bytes()
        key = serialization.load_pem_private_key(key_pem, password=None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())  # type: ignore[union-attr]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    for extension in original.extensions:
        if isinstance(extension.value, x509.SubjectKeyIdentifier) and not same_key:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), extension.critical  # type: ignore[arg-type]
            )
        else:
            builder = builder.add_extension(extension.value, extension.critical)
    new = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return new.public_bytes(serialization.Encoding.PEM), key_pem


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in CertDirPath (references, lock files, leftovers) with its content."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def learned(tmp_path, make_instance, start_balancer):
    """A balancer that has met the genuine instance once; yields (instance, balancer, reference, snapshot)."""
    genuine: Instance = make_instance()
    # Connection: close, so that no keep-alive connection opened to the
    # genuine instance can carry the next request past the attacker.
    genuine.server.expect_request(TARGET, method="POST").respond_with_json(
        {"genuine": True}, headers={"Connection": "close"}
    )
    balancer = start_balancer(
        # cooldown="0": the instance refused by an attack is tried again on the
        # next request, so the test can show the genuine one is accepted again.
        write_config(
            tmp_path,
            [genuine],
            [("POST", "/api/{version}/lookup")],
            extra='  <Timeouts connect="1"/>\n  <Failover cooldown="0"/>\n',
        )
    )
    first = send_secret(balancer.port)
    assert (first.status, first.json()) == (200, {"genuine": True})
    reference = tmp_path / "certs" / "127.0.0.1_9999.pem"
    assert reference.read_bytes() == der_to_pem(genuine.der)
    genuine.server.clear_log()
    return genuine, balancer, reference, snapshot(reference.parent)


def assert_mismatch(resp: RawResponse, port: int, expected_der: bytes, received_der: bytes, reference: Path) -> None:
    assert resp.status == 500
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == {
        "error": "certificate_mismatch",
        "description": f"HTTPS connection with the CyberTrace instance 127.0.0.1:{port} has not been established, "
        "since the server certificate does not match the one expected.",
        "host": "127.0.0.1",
        "port": port,
        "expected_sha256": sha256(expected_der),
        "received_sha256": sha256(received_der),
        "reference": str(reference),
    }


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


@pytest.mark.parametrize("same_key", [False, True], ids=["new-key-same-names-same-ca", "reissued-same-key"])
def test_impostor_certificate_is_refused_before_any_byte(learned, ca, tmp_path, same_key):
    genuine, balancer, reference, before = learned
    cert_pem, key_pem = reissue(ca, genuine.cert, same_key)
    impostor_der = pem_to_der(cert_pem)
    original = x509.load_der_x509_certificate(genuine.der)
    impostor = x509.load_der_x509_certificate(impostor_der)
    # What only the pin tells apart: same names, same issuer, a valid chain.
    assert (impostor.subject, impostor.issuer) == (original.subject, original.issuer)
    assert impostor.extensions.get_extension_for_class(x509.SubjectAlternativeName) == (
        original.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    )
    assert (impostor.public_key() == original.public_key()) is same_key
    assert impostor_der != genuine.der

    genuine.stop()
    attacker = RecordingPeer(context_from_pem(cert_pem, key_pem, tmp_path), port=genuine.port)
    try:
        resp = send_secret(balancer.port)
        # The balancer has closed its connection: let the attacker finish reading it.
        assert attacker.wait_idle()
    finally:
        attacker.close()

    assert_mismatch(resp, genuine.port, genuine.der, impostor_der, reference)
    assert attacker.handshakes == 1, f"the attacker saw no complete handshake: {attacker.errors}"
    assert bytes(attacker.received) == b""
    assert snapshot(reference.parent) == before
    assert f"[ERROR] app.pins: certificate mismatch for instance 127.0.0.1:{genuine.port}" in balancer.log()

    # The genuine instance back on its address is accepted again: nothing was
    # learned from the attacker and nothing was lost.
    genuine.restart()
    again = send_secret(balancer.port)
    assert (again.status, again.json()) == (200, {"genuine": True})
    assert [(r.method, r.headers.get("Authorization"), r.get_data()) for r in genuine.requests] == [
        ("POST", SECRET_TOKEN, SECRET_BODY)
    ]


def test_intercepting_tls_proxy_is_refused_and_relays_nothing(learned, ca, tmp_path):
    genuine, balancer, reference, before = learned
    address = genuine.port
    # The real instance moves away; a TLS-intercepting proxy takes its address
    # and relays to it, presenting its own certificate from the same CA.
    genuine.stop()
    genuine.port = free_port()
    genuine.restart()
    own = ca.issue_cert("127.0.0.1", "localhost")
    relay = InterceptingRelay(
        context_from_pem(own.cert_chain_pems[0].bytes(), own.private_key_pem.bytes(), tmp_path), genuine.port, address
    )
    try:
        resp = send_secret(balancer.port)
        assert relay.wait_idle()
        refused_handshakes = relay.handshakes

        assert_mismatch(resp, address, genuine.der, pem_to_der(own.cert_chain_pems[0].bytes()), reference)
        assert refused_handshakes == 1
        assert bytes(relay.received) == b""
        assert bytes(relay.relayed) == b""
        assert genuine.requests == []
        assert snapshot(reference.parent) == before

        # Control: the relay does pass a request on to the real instance.
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with socket.create_connection(("127.0.0.1", address), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(
                    f"POST {TARGET} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Length: {len(SECRET_BODY)}\r\n\r\n".encode() + SECRET_BODY
                )
                direct = read_response(tls)
    finally:
        relay.close()
    assert (direct.status, direct.json()) == (200, {"genuine": True})
    assert [(r.method, r.get_data()) for r in genuine.requests] == [("POST", SECRET_BODY)]


@pytest.mark.parametrize(
    "make_peer",
    [
        pytest.param(lambda port: NoCertificatePeer(port=port), id="tls-without-certificate"),
        pytest.param(
            lambda port: PlainPeer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", port=port),
            id="plain-http-answers",
        ),
        # Says nothing at all: the handshake runs into the connect timeout (1 s here).
        pytest.param(lambda port: PlainPeer(port=port), id="plain-tcp-silent"),
    ],
)
def test_peer_without_tls_session_gets_nothing_and_503(learned, make_peer):
    genuine, balancer, reference, before = learned
    genuine.stop()
    peer = make_peer(genuine.port)
    try:
        resp = send_secret(balancer.port)
        assert peer.wait_idle()
    finally:
        peer.close()

    assert resp.status == 503
    assert (resp.header("Retry-After") or "").isdigit()
    body = resp.json()
    assert body["error"] == "no_instance_available"
    assert f"127.0.0.1:{genuine.port}" in body["description"]
    assert peer.connections == 1, "the balancer never reached the peer: the test proves nothing"
    assert peer.handshakes == 0
    received = bytes(peer.received)
    # At most the TLS ClientHello, which carries nothing of the request.
    assert received == b"" or received.startswith(b"\x16\x03")
    for secret in SECRETS:
        assert secret not in received
    assert snapshot(reference.parent) == before
    assert f"instance 127.0.0.1:{genuine.port} not reached" in balancer.log()
