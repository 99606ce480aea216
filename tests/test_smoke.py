from .support import get, write_config


def test_first_request_is_forwarded_and_pins(tmp_path, make_instance, start_balancer):
    inst = make_instance()
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"suppliers": []})
    balancer = start_balancer(write_config(tmp_path, [inst]))
    resp = get(balancer.port, "/api/v.1.1/suppliers")
    assert resp.status == 200
    assert resp.json() == {"suppliers": []}
    assert (tmp_path / "certs" / "127.0.0.1_9999.pem").exists()
