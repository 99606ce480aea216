"""The TLS context of the API port: the configured versions and suites, and no handshake before the worker's clock runs.

Built in the worker, after gevent has patched ``ssl`` (gunicorn calls the
``ssl_context`` hook of ``gunicorn.conf.py`` from the worker's ``run()``).
"""

from __future__ import annotations

import ssl

from .settings import TLSPolicy

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(certfile: str, keyfile: str, policy: TLSPolicy) -> ssl.SSLContext:
    """A server context for *policy*, whose sockets leave the handshake to :class:`app.worker.BalancerWorker`.

    gevent's server wraps each accepted socket and, by default, completes the
    handshake right there, with no timeout and before the worker can start
    one: a client that connects and sends nothing would hold the connection
    forever (docs/design.md, "Hostile clients").
    """

    class DeferredHandshakeContext(ssl.SSLContext):
        def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):  # type: ignore[no-untyped-def,override]
            return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)

    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[policy.min_version]
    context.set_ciphers(policy.ciphers)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context
