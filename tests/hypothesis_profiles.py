"""hypothesis profiles for the property tests: bounded in CI, long on demand.

    .venv/bin/python -m pytest tests/test_fuzz.py                          # ci: 200 examples per property
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py  # 20000 examples per property

No deadline in either: a shared 2-core machine makes single examples slow at
random, and a flaky timing failure says nothing about the code.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_VARIABLE = "HYPOTHESIS_PROFILE"

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=20000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def load() -> str:
    """Load the profile ``HYPOTHESIS_PROFILE`` names (default ``ci``) and return its name."""
    name = os.environ.get(PROFILE_VARIABLE) or "ci"
    settings.load_profile(name)
    return name
