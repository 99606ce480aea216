"""gunicorn settings for ctbalancer, taken from kl_balancer.conf.

    gunicorn -c gunicorn.conf.py wsgi:app

This file runs in the master before any worker exists, and again on every
SIGHUP. It reads the XML with ``app.loader`` alone (standard library and
lxml): importing Flask, requests or urllib3 here would load ssl before the
gevent worker patches it, and the worker would then fail with RecursionError
(docs/design.md, "Traps").
"""

import logging
import os
import sys

from app.lifecycle import activate, active
from app.loader import ConfigError, load
from app.settings import Config
from app.shared import ENV_VAR, runtime_directory

# -- Logging ----------------------------------------------------------------------
# The app's decisions (pin learned, mismatch, instance down or back) go to
# stderr beside gunicorn's own log; app/ attaches no handler itself. The
# handler is replaced, not added: this file runs again on every SIGHUP.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(
    logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s", "[%Y-%m-%d %H:%M:%S %z]")
)
_app_log = logging.getLogger("app")
_app_log.handlers = [_handler]
_app_log.setLevel(os.environ.get("BALANCER_LOG_LEVEL", "INFO").upper())
_app_log.propagate = False


# -- Configuration ------------------------------------------------------------------
# At start-up a bad file stops the master with one line. On SIGHUP gunicorn
# runs this file again, and an exception or SystemExit here would kill the
# master: a bad file is refused, logged, and the configuration already
# served stays active, with the settings below taken from it. Workers forked
# from now on inherit the active configuration (app.lifecycle.active, docs/design.md, "Configuration").
def _configuration() -> Config:
    previous = active()
    reload_log = logging.getLogger("app.reload")
    try:
        config = load()
    except ConfigError as exc:
        if previous is None:
            # One line naming file, line and reason, and a non-zero exit: no traceback.
            sys.stderr.write(f"ctbalancer: configuration error: {exc}\n")
            sys.exit(1)
        reload_log.error("reload refused, still serving the previous configuration: configuration error: %s", exc)
        return previous
    except Exception as exc:
        if previous is None:
            raise
        reload_log.error("reload refused, still serving the previous configuration: %s: %s", type(exc).__name__, exc)
        return previous
    if previous is not None:
        reload_log.info(
            "configuration reloaded from %s: %d instances enabled", config.path, len(config.enabled_instances)
        )
    activate(config)
    return config


_config = _configuration()


# -- Server socket -------------------------------------------------------------
# The Balancer element's address and api_port.
bind = [_config.balancer.bind]

# -- TLS -----------------------------------------------------------------------
# HTTPS when both SSLCertificatePath and SSLPrivateKeyPath are set; the
# configuration loader refuses one without the other.
if _config.tls:
    certfile = str(_config.tls_cert)
    keyfile = str(_config.tls_key)


def ssl_context(conf, default_ssl_context_factory):
    """The TLS element's versions and suites (default: TLS 1.2+, no CBC), handshake deferred to the worker.

    Called in the worker after gevent patched ssl; app.tls is imported here,
    never at the top of this file (docs/design.md, "Traps").
    """
    from app.lifecycle import active
    from app.tls import server_context

    return server_context(conf.certfile, conf.keyfile, active().tls_policy)


# -- Front proxies -----------------------------------------------------------------
# gunicorn trusts SCRIPT_NAME, PATH_INFO and the scheme headers from
# forwarded_allow_ips, by default 127.0.0.1 and ::1: behind a local TLS
# terminator every client could shorten the path the rules match while the
# full one is forwarded. No peer may set SCRIPT_NAME or PATH_INFO; only
# FrontProxy peers may say the scheme was https (docs/design.md, "Hostile clients").
forwarded_allow_ips = ",".join(str(network) for network in _config.front_proxy)
forwarder_headers = ""
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}

# -- Worker processes ------------------------------------------------------------
# gevent: a worker holds many client requests while they wait on instances.
# The worker monkey-patches before it imports wsgi.py, so app/ never patches.
# app.worker.BalancerWorker is gevent's worker with the client deadlines of
# Timeouts client, JSON refusals and one log line per refused connection.
worker_class = "app.worker.BalancerWorker"
workers = int(os.environ.get("BALANCER_WORKERS", _config.workers))
# Limits connections: client connections one worker holds; more wait in the
# listen queue until one closes.
worker_connections = _config.limits.connections
# gunicorn's C parser (gunicorn-h1c, picohttpparser), required rather than
# "auto": the parser decides what is refused from clients, so it must not
# change with what happens to be installed. Every malformed-request test
# (tests/test_client_input.py, test_paths.py, test_fuzz.py) answers the same
# with either; it costs about 10% less CPU per request.
http_parser = "fast"
# Seconds a silent worker may live; gevent workers notify between requests.
timeout = 30
# On SIGHUP and SIGTERM old workers finish the requests they hold: give them
# the longest a request may wait for its answer (Timeouts total, docs/design.md, "Failover").
graceful_timeout = max(30, int(_config.timeouts.total) + 5)
# SIEMs keep connections open between batches.
keepalive = 75

# -- Access log ---------------------------------------------------------------------
# <AccessLog file="..."/>: one JSON line per request (app/accesslog.py), "-" for
# stderr; gunicorn reopens the file on SIGUSR1 (logrotate's postrotate).
logger_class = "app.accesslog.JSONAccessLogger"
accesslog = _config.access_log

# -- Control socket ---------------------------------------------------------------
# gunicorn 27 opens $HOME/.gunicorn/...; several balancers on one machine (and
# the test suite) would collide on it (docs/design.md, "Traps").
control_socket_disable = True

# -- Server hooks -------------------------------------------------------------------


# -- Node-wide state --------------------------------------------------------------------
# The workers of this master share their instance slots and health through
# files in a private runtime directory (app/shared.py): created once, by the
# master before it forks, and named to every worker; a reload keeps it.
# Without it each worker would keep its own, so a failure stops start-up.


def on_starting(server):
    """Create the runtime directory of the workers' shared state (once: reloads keep it)."""
    if ENV_VAR in os.environ:
        return
    try:
        shared = runtime_directory()
        # prometheus_client's multiprocess files (app/metrics.py); the master never imports it.
        (shared / "metrics").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"ctbalancer: cannot create the runtime directory for the workers' shared state: {exc}\n")
        sys.exit(1)
    os.environ[ENV_VAR] = str(shared)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared / "metrics")


def on_exit(server):
    """Remove the runtime directory this master made (systemd removes its own RuntimeDirectory)."""
    import shutil

    path = os.environ.get(ENV_VAR, "")
    if path and not os.environ.get("RUNTIME_DIRECTORY") and os.path.basename(path).startswith("ctbalancer-"):
        shutil.rmtree(path, ignore_errors=True)


def post_worker_init(worker):
    """Register this worker with the node, and start its background work: health checks
    (HealthCheck interval), the pin store's watcher, the journal's replays.

    Imported here, in the worker, after gevent has patched: a probe loop is
    then a greenlet. No probe starts when the interval is 0 (the default).
    """
    from app.probe import start
    from app.proxy import EXTENSION
    from app.shared import node_directory, register_worker

    shared = node_directory()
    if shared is not None:
        register_worker(shared)
        from app.metrics import fold_dead_workers

        fold_dead_workers()  # the files of workers that died before this one started
    balancer = worker.wsgi.extensions[EXTENSION]
    start(balancer)
    # The shared pin store's watcher (etcd) and the fan-out journal's replays run from boot,
    # not from the first request: a restarted balancer replays what it owes before anyone asks.
    balancer.store.start()
    from app.fanout import start_replayer

    start_replayer(balancer)
