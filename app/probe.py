"""Active health checks: one worker of the node connects to each enabled instance on an interval and checks its pin.

A probe opens a TCP connection, completes the TLS handshake and compares the
certificate the instance presented with its reference file, then closes the
connection. It sends no HTTP request and no credentials, and it never saves,
replaces or deletes a reference: an instance seen for the first time stays
"not yet pinned" until a request learns its certificate (docs/design.md, "Reference certificates").

Verdicts go to the instance's :class:`~app.health.Health`: unreachable is a
failure (the instance is skipped for the cooldown), a certificate that
differs from the reference is a mismatch (logged at ERROR), anything else
brings the instance back up.

Off unless ``HealthCheck interval`` is set. The loops start lazily, inside
the worker (``threading.Thread`` is a greenlet once gevent has patched), and
die with it.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from .pinning import NotConnected, presented_certificate
from .pins import same_fingerprint, sha256
from .upstream import Balancer, Upstream

log = logging.getLogger(__name__)


def start(balancer: Balancer) -> None:
    """Start one probe loop per enabled instance, once per worker; nothing when probes are off."""
    interval = balancer.config.health_check.interval
    if not interval or balancer.probing:
        return
    balancer.probing = True
    for upstream in balancer.upstreams:
        threading.Thread(
            target=_loop, args=(balancer, upstream, interval), name=f"probe {upstream.spec.name}", daemon=True
        ).start()


def _loop(balancer: Balancer, upstream: Upstream, interval: float) -> None:
    # Workers start together: spread their probes over the interval.
    time.sleep(random.uniform(0, min(interval, 1.0)))
    while True:
        try:
            # One worker of the node probes each instance; when it dies, its lock goes and
            # another worker's loop takes over at its next turn (within one interval).
            if upstream.health.claim_prober():
                probe(balancer, upstream)
        except Exception:  # a bug here must not end the checks of this instance
            log.exception("probe of instance %s failed unexpectedly", upstream.spec.name)
        time.sleep(interval)


def probe(balancer: Balancer, upstream: Upstream) -> str:
    """Probe *upstream* once, record the verdict in its health, and return the state it is in."""
    spec, health = upstream.spec, upstream.health
    try:
        der = presented_certificate(spec.host, spec.api_port, balancer.config.timeouts.connect, balancer.ssl_context)
    except NotConnected as exc:
        health.failed(f"probe: {exc.reason}")
        return health.state
    store = balancer.store
    entry = store.known(spec.reference_name)
    reference, problem, path = entry.der, entry.problem, store.location(spec.reference_name)
    if problem is not None:
        health.noted(f"probe: reference certificate {path} unusable: {problem}")
        return health.state
    if reference is None:
        # Nothing to compare with, and a probe never learns: the first request will.
        health.succeeded()
        return health.state
    expected, received = sha256(reference), sha256(der)
    if not same_fingerprint(expected, received):
        log.error(
            "probe: certificate mismatch for instance %s:%s: expected sha256 %s (reference %s), received %s",
            spec.host,
            spec.api_port,
            expected,
            path,
            received,
        )
        health.mismatched(f"probe: certificate mismatch (received sha256 {received})")
        return health.state
    health.succeeded()
    return health.state
