"""gunicorn settings for ctbalancer, taken from kl_balancer.conf.

    gunicorn -c gunicorn.conf.py wsgi:app

This file runs in the master before any worker exists. It reads the XML with
``app.config`` alone (standard library and lxml): importing Flask, requests
or urllib3 here would load ssl before the gevent worker patches it, and the
worker would then fail with RecursionError (DESIGN section 7).
"""

import logging
import os
import sys

from app.config import ConfigError, load

try:
    _config = load()
except ConfigError as exc:
    # One line naming file, line and reason, and a non-zero exit: no traceback.
    sys.stderr.write(f"ctbalancer: configuration error: {exc}\n")
    sys.exit(1)

# -- Server socket -------------------------------------------------------------
# The Balancer element's address and api_port.
bind = [_config.balancer.bind]

# -- TLS -----------------------------------------------------------------------
# HTTPS when both SSLCertificatePath and SSLPrivateKeyPath are set; the
# configuration loader refuses one without the other.
if _config.tls:
    certfile = str(_config.tls_cert)
    keyfile = str(_config.tls_key)

# -- Worker processes ------------------------------------------------------------
# gevent: a worker holds many client requests while they wait on instances.
# The worker monkey-patches before it imports wsgi.py, so app/ never patches.
worker_class = "gevent"
workers = int(os.environ.get("BALANCER_WORKERS", _config.workers))
worker_connections = 1000
# Seconds a silent worker may live; gevent workers notify between requests.
timeout = 30
graceful_timeout = 30
# SIEMs keep connections open between batches.
keepalive = 75

# -- Control socket ---------------------------------------------------------------
# gunicorn 27 opens $HOME/.gunicorn/...; several balancers on one machine (and
# the test suite) would collide on it (DESIGN section 7).
control_socket_disable = True

# -- Logging ----------------------------------------------------------------------
# The app's decisions (pin learned, mismatch, instance not reached) go to
# stderr beside gunicorn's own log; app/ attaches no handler itself.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(
    logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s", "[%Y-%m-%d %H:%M:%S %z]")
)
_app_log = logging.getLogger("app")
_app_log.addHandler(_handler)
_app_log.setLevel(os.environ.get("BALANCER_LOG_LEVEL", "INFO").upper())
_app_log.propagate = False
