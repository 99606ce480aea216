"""Trust on first use, end to end: gunicorn, real instances, real reference files (docs/design.md, "Reference certificates")."""

from __future__ import annotations

import socket
import ssl

from app.pins import der_to_pem, read_reference, sha256

from .peers import RecordingPeer
from .support import Spec, get, leaf_der, server_context, write_config


def test_first_contact_saves_reference_and_request_continues(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"suppliers": ["a"]})
    cert_dir = tmp_path / "missing" / "certs"
    balancer = start_balancer(write_config(tmp_path, [inst], cert_dir=str(cert_dir)))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert (resp.status, resp.json()) == (200, {"suppliers": ["a"]})
    path = cert_dir / "127.0.0.1_9999.pem"
    assert read_reference(path) == inst.der
    assert path.read_bytes() == der_to_pem(inst.der)
    assert f"learned reference certificate of instance 127.0.0.1:{inst.port}: {path} sha256 {sha256(inst.der)}" in (
        balancer.log()
    )


def test_mismatch_refuses_before_any_byte_is_sent(tmp_path, ca, start_balancer):
    genuine = ca.issue_cert("127.0.0.1")
    impostor_cert = ca.issue_cert("127.0.0.1")  # same CA, same name: only the pin tells them apart
    impostor = RecordingPeer(server_context(impostor_cert))
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "127.0.0.1_9999.pem").write_bytes(der_to_pem(leaf_der(genuine)))
    config = write_config(tmp_path, [Spec("127.0.0.1", impostor.port, 9999)], [("POST", "/api/{v}/lookup")])
    balancer = start_balancer(config)
    resp = get(
        balancer.port, "/api/v1/lookup", method="POST", body=b"secret body", headers={"Authorization": "Bearer t0ken"}
    )
    # The peer counts the handshake in its own thread, after the client may
    # already hold its answer: wait (bounded) until it has served the connection.
    assert impostor.wait_idle()
    impostor.close()
    assert resp.status == 500
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == {
        "error": "certificate_mismatch",
        "description": f"HTTPS connection with the CyberTrace instance 127.0.0.1:{impostor.port} has not been "
        "established, since the server certificate does not match the one expected.",
        "host": "127.0.0.1",
        "port": impostor.port,
        "expected_sha256": sha256(leaf_der(genuine)),
        "received_sha256": sha256(leaf_der(impostor_cert)),
        "reference": str(tmp_path / "certs" / "127.0.0.1_9999.pem"),
    }
    assert impostor.handshakes == 1
    assert bytes(impostor.received) == b""
    assert read_reference(tmp_path / "certs" / "127.0.0.1_9999.pem") == leaf_der(genuine)
    assert "[ERROR] app.pins: certificate mismatch for instance 127.0.0.1:" in balancer.log()


def test_instance_restarted_with_new_certificate_is_refused(tmp_path, ca, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"ok": 1})
    balancer = start_balancer(write_config(tmp_path, [inst]))
    assert get(balancer.port, "/api/v.1.1/suppliers").status == 200
    old = inst.der
    inst.restart(ca.issue_cert("127.0.0.1", "localhost"))
    inst.server.clear_log()
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert resp.status == 500
    assert resp.json()["error"] == "certificate_mismatch"
    assert (resp.json()["expected_sha256"], resp.json()["received_sha256"]) == (sha256(old), sha256(inst.der))
    assert inst.requests == []
    assert read_reference(tmp_path / "certs" / "127.0.0.1_9999.pem") == old


def test_unreadable_reference_gives_500_and_is_left_untouched(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    (tmp_path / "certs").mkdir()
    damaged = tmp_path / "certs" / "127.0.0.1_9999.pem"
    damaged.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n")
    balancer = start_balancer(write_config(tmp_path, [inst]))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert resp.status == 500
    body = resp.json()
    assert body["error"] == "reference_certificate_unreadable"
    assert (body["host"], body["port"], body["reference"]) == ("127.0.0.1", inst.port, str(damaged))
    assert damaged.read_bytes() == b"-----BEGIN CERTIFICATE-----\nMIIB\n"
    assert inst.requests == []


def test_unsavable_reference_gives_500_and_forwards_nothing(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    (tmp_path / "blocker").write_text("a file where CertDirPath's parent should be")
    balancer = start_balancer(write_config(tmp_path, [inst], cert_dir="blocker/certs"))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert resp.status == 500
    assert resp.json()["error"] == "reference_certificate_unsaved"
    assert "Not a directory" in resp.json()["description"]
    assert inst.requests == []


def test_changed_matching_port_saves_new_file_and_keeps_old(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({})
    first = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", inst.port, 9999)]))
    assert get(first.port, "/api/v.1.1/suppliers").status == 200
    first.stop()
    second = start_balancer(write_config(tmp_path, [Spec("127.0.0.1", inst.port, 7777)]))
    assert get(second.port, "/api/v.1.1/suppliers").status == 200
    assert sorted(p.name for p in (tmp_path / "certs").glob("*.pem")) == ["127.0.0.1_7777.pem", "127.0.0.1_9999.pem"]
    assert read_reference(tmp_path / "certs" / "127.0.0.1_7777.pem") == inst.der


def test_reference_replaced_by_hand_takes_effect_after_restart(tmp_path, ca, make_instance, start_balancer):
    """The seed's certificate-change procedure: new instance certificate, copy it over, restart."""
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({})
    config = write_config(tmp_path, [inst])
    balancer = start_balancer(config)
    assert get(balancer.port, "/api/v.1.1/suppliers").status == 200
    balancer.stop()
    inst.restart(ca.issue_cert("127.0.0.1"))
    (tmp_path / "certs" / "127.0.0.1_9999.pem").write_bytes(der_to_pem(inst.der))
    restarted = start_balancer(config)
    assert get(restarted.port, "/api/v.1.1/suppliers").status == 200


def test_disabled_instance_is_never_contacted_nor_pinned(tmp_path, make_instance, start_balancer):
    on, off = make_instance(), make_instance()
    for inst in (on, off):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    specs = [Spec("127.0.0.1", on.port, 9999), Spec("127.0.0.1", off.port, 9998, enabled=False)]
    balancer = start_balancer(write_config(tmp_path, specs))
    answers = [get(balancer.port, "/api/v.1.1/suppliers").json() for _ in range(6)]
    assert answers == [{"port": on.port}] * 6
    assert off.requests == []
    assert [p.name for p in (tmp_path / "certs").glob("*.pem")] == ["127.0.0.1_9999.pem"]


def test_round_robin_over_enabled_instances(tmp_path, make_instance, start_balancer):
    a, b = make_instance(), make_instance()
    for inst in (a, b):
        inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    balancer = start_balancer(write_config(tmp_path, [a, b]))
    ports = [get(balancer.port, "/api/v.1.1/suppliers").json()["port"] for _ in range(8)]
    assert sorted(ports) == sorted([a.port] * 4 + [b.port] * 4)
    assert ports[0] != ports[1]


def test_balancer_serves_https_when_configured(tmp_path, ca, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"tls": True})
    own = ca.issue_cert("127.0.0.1")
    own.cert_chain_pems[0].write_to_path(str(tmp_path / "balancer_cert.pem"))
    own.private_key_pem.write_to_path(str(tmp_path / "balancer_key.pem"))
    config = write_config(tmp_path, [inst], tls=(tmp_path / "balancer_cert.pem", tmp_path / "balancer_key.pem"))
    balancer = start_balancer(config, scheme="https")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", balancer.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /api/v.1.1/suppliers HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b'\r\n\r\n{\n    "tls": true\n}')
    assert "no SSLCertificatePath" not in balancer.log()
