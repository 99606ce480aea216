"""``create_app()``: the Flask application for one configuration."""

from __future__ import annotations

import logging

from flask import Flask

from .cli import journal, pins
from .lifecycle import active
from .loader import ConfigError, load
from .pins import loose_permissions, open_store
from .proxy import install
from .settings import Config
from .upstream import Balancer

log = logging.getLogger(__name__)


def create_app(config: Config | None = None) -> Flask:
    """Build the balancer for *config*, or for the file ``BALANCER_CONFIG`` names.

    Under gunicorn the master has loaded the file already and workers use
    that configuration (:func:`app.lifecycle.active`), so that a broken edit
    the master refused on SIGHUP never reaches them. A configuration that
    cannot be used ends the process with its one-line reason (file, line,
    what was wrong and what was expected).
    """
    if config is None:
        config = active()
    if config is None:
        try:
            config = load()
        except ConfigError as exc:
            raise SystemExit(f"ctbalancer: configuration error: {exc}") from None
    app = Flask(__name__, static_folder=None)
    app.config["BALANCER"] = config
    install(app, config, Balancer(config, open_store(config)))
    app.cli.add_command(pins)
    app.cli.add_command(journal)
    for loose in loose_permissions(config.cert_dir):
        log.warning("%s is writable by group or others: whoever can write there decides which certificates "
                    "the balancer trusts; chmod go-w it", loose)
    if not config.tls:
        log.warning(
            "no SSLCertificatePath/SSLPrivateKeyPath in %s: serving plain HTTP on port %s",
            config.path,
            config.balancer.api_port,
        )
    if not config.allowed:
        log.warning("AllowedRequests is empty in %s: every request will be refused", config.path)
    return app
