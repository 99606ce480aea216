"""Fixtures: a throwaway CA, real HTTPS instances, and gunicorn balancers, all cleaned up."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
import trustme

from .support import Gunicorn, Instance, config_port


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def make_instance(ca: trustme.CA) -> Iterator[Callable[..., Instance]]:
    """Start real HTTPS instances with certificates from the test CA."""
    started: list[Instance] = []

    def make(host: str = "127.0.0.1") -> Instance:
        inst = Instance(ca, host)
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()


@pytest.fixture
def start_balancer(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start gunicorn on a configuration file; stopped at the end of the test."""
    started: list[Gunicorn] = []

    def start(config: Path, scheme: str = "http", **env: str) -> Gunicorn:
        g = Gunicorn(config, config_port(config), tmp_path / f"gunicorn-{len(started)}.log", env=env, scheme=scheme)
        started.append(g)
        return g.start()

    yield start
    for g in started:
        g.stop()
