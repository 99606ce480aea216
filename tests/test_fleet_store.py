"""The etcd pin store against a real single-member etcd: watch, compaction, damaged values, auth, TLS, endpoints.

Each ``EtcdStore`` here plays one worker (docs/design.md, "Fleet"); the
watcher runs in a thread, as it runs in a greenlet under gevent.
"""

from __future__ import annotations

import json
import time

import pytest

from app.errors import PinStoreUnavailable, ReferenceUnreadable
from app.fleet import EtcdStore
from app.pins import Entry, StoreUnavailable, der_to_pem, sha256
from app.loader import load
from app.settings import InstanceSpec, PinStoreSpec

from .etcd_support import EtcdCluster
from .support import free_port, leaf_der, write_config, Spec

INSTANCE = InstanceSpec(host="127.0.0.1", api_port=9443, matching_port=9999, enabled=True)
NAME = INSTANCE.reference_name
KEY = "/ctbalancer/pins/127.0.0.1_9999"


@pytest.fixture
def ders(ca):
    return [leaf_der(ca.issue_cert("127.0.0.1")) for _ in range(3)]


@pytest.fixture
def single(tmp_path):
    c = EtcdCluster(tmp_path / "etcd", size=1)
    yield c
    while OPENED:  # the watchers first, while their cluster still answers
        OPENED.pop().close()
    c.close()


#: Every store a test opened, closed after it: no watcher outlives its test and its cluster.
OPENED: list[EtcdStore] = []


@pytest.fixture(autouse=True)
def close_stores():
    yield
    while OPENED:
        OPENED.pop().close()


def store_for(cluster: EtcdCluster, **fields) -> EtcdStore:
    spec = PinStoreSpec(type="etcd", endpoints=tuple(cluster.endpoints.split()), **fields)
    store = EtcdStore(spec, resync_interval=1.0)
    OPENED.append(store)
    return store


def wait_for(predicate, seconds: float = 1.0) -> float:
    """Seconds until *predicate* holds; fails after *seconds*."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_change_reaches_another_worker_through_the_watch(single, ders):
    one, two = store_for(single), store_for(single)
    two.start()
    ref = one.check(INSTANCE, ders[0])
    wait_for(lambda: two.known(NAME).der == ders[0])
    held = two.check(INSTANCE, ders[0])
    assert held.is_current()

    assert one.replace(NAME, ders[1], one.look(NAME))
    wait_for(lambda: not held.is_current())
    assert two.known(NAME).der == ders[1]
    with pytest.raises(Exception) as refused:
        two.check(INSTANCE, ders[0])
    assert refused.value.code == "certificate_mismatch"
    assert refused.value.fields["expected_sha256"] == sha256(ders[1])

    # Deleted: the next contact learns again, and every worker sees the new one.
    assert one.delete(NAME, one.look(NAME))
    wait_for(lambda: two.known(NAME) == Entry(None, None, two.known(NAME).version))
    assert two.check(INSTANCE, ders[2]).der == ders[2]
    assert one.look(NAME).der == ders[2]
    assert ref.der == ders[0]


def test_replace_and_delete_act_only_on_what_was_seen(single, ders):
    store = store_for(single)
    store.check(INSTANCE, ders[0])
    seen = store.look(NAME)
    assert store.replace(NAME, ders[1], seen)
    # Another operator's view is now stale: nothing changes.
    assert not store.replace(NAME, ders[2], seen)
    assert not store.delete(NAME, seen)
    assert store.look(NAME).der == ders[1]


def test_a_compacted_watch_is_replaced_by_a_full_read(single, ders):
    watcher = store_for(single)
    watcher.start()
    writer = store_for(single)
    writer.check(INSTANCE, ders[0])
    wait_for(lambda: watcher.known(NAME).der == ders[0])
    # Many changes, then the history compacted away while the watcher may be between reads.
    for i in range(20):
        single.put("/ctbalancer/pins/other_1", json.dumps({"pem": der_to_pem(ders[i % 2]).decode(), "sha256": sha256(ders[i % 2])}).encode())
    single.compact()
    assert writer.replace(NAME, ders[2], writer.look(NAME))
    wait_for(lambda: watcher.known(NAME).der == ders[2], seconds=3.0)
    assert watcher.known("other_1.pem").der == ders[1]


@pytest.mark.parametrize(
    "value, problem",
    [
        (b"not json", "the value is not JSON; expected an object with pem and sha256"),
        (b'{"pem": 1}', "the value has no pem and sha256 strings; expected an object with both"),
        (b'{"pem": "x", "sha256": "00"}', "the file is not one PEM certificate (BEGIN/END CERTIFICATE)"),
    ],
)
def test_a_damaged_value_refuses_the_instance_and_is_left_untouched(single, ders, value, problem):
    single.put(KEY, value)
    store = store_for(single)
    with pytest.raises(ReferenceUnreadable) as refused:
        store.check(INSTANCE, ders[0])
    assert refused.value.fields["reference"] == f"etcd:{KEY}"
    assert problem in refused.value.description
    assert store.look(NAME).problem == problem
    assert single.kvs(KEY)[0]["raw"] == value


def test_a_value_whose_sha256_is_not_its_certificate_is_refused(single, ders):
    single.put(KEY, json.dumps({"pem": der_to_pem(ders[0]).decode(), "sha256": sha256(ders[1])}).encode())
    with pytest.raises(ReferenceUnreadable):
        store_for(single).check(INSTANCE, ders[0])


def test_the_next_endpoint_is_tried_when_one_is_down(single, ders):
    dead = f"http://127.0.0.1:{free_port()}"
    spec = PinStoreSpec(type="etcd", endpoints=(dead, single.members[0].url))
    store = EtcdStore(spec)
    OPENED.append(store)
    assert store.check(INSTANCE, ders[0]).der == ders[0]
    assert store.etcd.endpoints[store.etcd._first] == single.members[0].url


def test_unreachable_store_keeps_known_references_and_refuses_first_contacts(single, ders):
    store = store_for(single, timeout=0.5)
    store.check(INSTANCE, ders[0])
    single.stop(single.members[0])
    try:
        # Known: checked against the copy in memory.
        assert store.check(INSTANCE, ders[0]).der == ders[0]
        other = InstanceSpec(host="127.0.0.1", api_port=9444, matching_port=9998, enabled=True)
        started = time.monotonic()
        with pytest.raises(PinStoreUnavailable) as refused:
            store.check(other, ders[1])
        assert time.monotonic() - started < 2.0
        error = refused.value
        assert (error.status, error.code, error.retry_after) == (503, "pin_store_unavailable", 1)
        assert error.body()["reference"] == "etcd:/ctbalancer/pins/127.0.0.1_9998"
        assert "no answer within the timeout" in error.description
        assert store.state()["state"] == "unreachable"
        with pytest.raises(StoreUnavailable):
            store.look(NAME)
    finally:
        single.cont(single.members[0])
    other = InstanceSpec(host="127.0.0.1", api_port=9444, matching_port=9998, enabled=True)
    assert store.check(other, ders[1]).der == ders[1]
    assert store.state()["state"] == "reachable"


def test_user_and_password_with_a_token_that_expires(tmp_path, ders):
    cluster = EtcdCluster(tmp_path / "etcd", size=1, extra_args=("--auth-token-ttl", "1"))
    try:
        cluster.enable_auth("ctbalancer", "s3cret", "/ctbalancer/")
        store = store_for(cluster, user="ctbalancer", password="s3cret")
        assert store.check(INSTANCE, ders[0]).der == ders[0]
        time.sleep(2.5)  # the token expires unused; the next request gets a new one
        assert store.look(NAME).der == ders[0]
        assert cluster.kvs(KEY)[0]["version"] == 1
        wrong = store_for(cluster, user="ctbalancer", password="wrong")
        with pytest.raises(StoreUnavailable) as refused:
            wrong.look(NAME)
        assert "user 'ctbalancer' not authenticated: etcdserver: authentication failed" in str(refused.value)
        # The role reaches the prefix only.
        outside = store_for(cluster, user="ctbalancer", password="s3cret", prefix="/elsewhere")
        with pytest.raises(StoreUnavailable) as denied:
            outside.look(NAME)
        assert "permission denied" in str(denied.value)
    finally:
        cluster.close()


def test_tls_with_a_client_certificate(tmp_path, ca, ders):
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("ctbalancer-client")
    files = {}
    for name, blob in (
        ("cert", server.cert_chain_pems[0]),
        ("key", server.private_key_pem),
        ("ca", ca.cert_pem),
        ("client_cert", client.cert_chain_pems[0]),
        ("client_key", client.private_key_pem),
    ):
        files[name] = tmp_path / f"{name}.pem"
        blob.write_to_path(str(files[name]))
    cluster = EtcdCluster(tmp_path / "etcd", size=1, tls=files, client_cert_auth=True)
    try:
        store = store_for(cluster, ca_file=files["ca"], cert_file=files["client_cert"], key_file=files["client_key"])
        assert store.check(INSTANCE, ders[0]).der == ders[0]
        anonymous = store_for(cluster, ca_file=files["ca"])
        with pytest.raises(StoreUnavailable):
            anonymous.look(NAME)
        untrusted = store_for(cluster)  # the system CAs do not know the test CA
        with pytest.raises(StoreUnavailable) as refused:
            untrusted.look(NAME)
        assert "TLS failed" in str(refused.value)
    finally:
        cluster.close()


@pytest.mark.unit
def test_configuration_reads_every_pin_store_attribute(tmp_path):
    (tmp_path / "etcd-ca.pem").write_text("ca")
    (tmp_path / "client.pem").write_text("cert")
    (tmp_path / "client.key").write_text("key")
    (tmp_path / "password").write_text("s3cret\nignored\n")
    element = (
        '  <PinStore type="etcd" endpoints="https://10.0.0.1:2379 https://[::1]:2379/" prefix="/fleet/a"'
        ' ca_file="etcd-ca.pem" cert_file="client.pem" key_file="client.key" user="ctb" password_file="password"'
        ' timeout="1.5"/>\n'
    )
    config = load(write_config(tmp_path, [Spec("127.0.0.1", 9443)], extra=element))
    spec = config.pin_store
    assert spec == PinStoreSpec(
        type="etcd",
        endpoints=("https://10.0.0.1:2379", "https://[::1]:2379"),
        prefix="/fleet/a",
        ca_file=tmp_path / "etcd-ca.pem",
        cert_file=tmp_path / "client.pem",
        key_file=tmp_path / "client.key",
        user="ctb",
        password_file=tmp_path / "password",
        password="s3cret",
        timeout=1.5,
    )
    assert "s3cret" not in repr(config)
    assert load(write_config(tmp_path, [Spec("127.0.0.1", 9443)])).pin_store == PinStoreSpec()


@pytest.mark.unit
def test_an_empty_password_file_stops_start_up(tmp_path):
    (tmp_path / "password").write_text("")
    element = '  <PinStore type="etcd" endpoints="http://10.0.0.1:2379" user="ctb" password_file="password"/>\n'
    path = write_config(tmp_path, [Spec("127.0.0.1", 9443)], extra=element)
    with pytest.raises(Exception) as refused:
        load(path)
    assert str(refused.value) == (
        f"{path}:12: <PinStore> password_file {str(tmp_path / 'password')!r} holds no password on its first line; expected one"
    )
