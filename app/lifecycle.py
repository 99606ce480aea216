"""The configuration this process serves, set once the master has loaded it.

gunicorn re-executes ``gunicorn.conf.py`` in the master on SIGHUP and then
forks new workers, which import ``wsgi.py`` and call ``create_app()``. Were
``create_app()`` to read the file itself, a broken edit would reach the new
workers even though the master refused it. So the master loads the file, and
only a configuration that loaded becomes the active one; the workers inherit
it with the rest of the master's memory (docs/design.md, "Configuration").
"""

from __future__ import annotations

from .settings import Config

_active: Config | None = None


def activate(config: Config) -> None:
    """Make *config* the one this process, and every process it forks from now on, serves."""
    global _active
    _active = config


def active() -> Config | None:
    """The configuration :func:`activate` set in this process (or its parent before the fork), if any."""
    return _active
