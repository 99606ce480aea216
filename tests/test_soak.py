"""The soak (bench/soak.py): its rules for what is expected, and a short run through 4 gunicorn workers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from .support import ROOT


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["soak"]


def settings(soak, seconds: float, every: float):
    return soak.Settings(seconds, every, 4, 8, 200, 5, 8, 10, 10, ROOT / "unused.md", ROOT / "unused")


def test_restarts_take_turns_and_the_middle_one_rotates(soak):
    a, b = SimpleNamespace(name="A", port=1001), SimpleNamespace(name="B", port=1002)
    restarts, trust = soak.schedule(settings(soak, 600, 60), a, b)
    assert [(r.at, r.instance.name, r.rotate) for r in restarts] == [
        (60, "A", False), (120, "B", False), (180, "A", False), (240, "B", False), (300, "A", True),
        (360, "B", False), (420, "A", False), (480, "B", False), (540, "A", False),
    ]
    assert (trust.at, trust.instance.name) == (308, "A")
    restarts, trust = soak.schedule(settings(soak, 40, 15), a, b)
    assert [(r.at, r.instance.name, r.rotate) for r in restarts] == [(15, "A", True), (30, "B", False)]
    assert (trust.at, trust.instance.name) == (23, "A")


def test_what_counts_as_expected(soak):
    """Mismatches of the rotated instance between its restart and trust + PICKUP; 502 for a
    non-repeatable POST in flight while an instance stopped. Nothing else."""
    a, b = SimpleNamespace(name="A", port=1001), SimpleNamespace(name="B", port=1002)
    rotation = soak.Restart(300, a, rotate=True, sent=1300.0, gone=1300.1, up=1300.3)
    restart = soak.Restart(360, b, rotate=False, sent=1360.0, gone=1360.1, up=1360.3)
    trust = soak.Trust(308, a, started=1308.0, done=1309.0, returncode=0)
    once, repeatable, get = soak.KIND[soak.ONCE_POST], soak.KIND[soak.REPEATABLE_POST], soak.KIND[soak.GET_SUPPLIERS]
    cases = [
        # (failure, expected verdict)
        (soak.Failure(get, 1305.0, 1305.1, 500, "certificate_mismatch", 1001), "mismatch"),
        (soak.Failure(once, 1310.9, 1311.0, 500, "certificate_mismatch", 1001), "mismatch"),
        (soak.Failure(get, 1311.1, 1311.2, 500, "certificate_mismatch", 1001), "unexpected"),  # after pick-up
        (soak.Failure(get, 1299.9, 1300.2, 500, "certificate_mismatch", 1001), "unexpected"),  # before rotation
        (soak.Failure(get, 1305.0, 1305.1, 500, "certificate_mismatch", 1002), "unexpected"),  # not rotated
        (soak.Failure(once, 1359.9, 1360.05, 502, "instance_failed", 1002), "in flight"),
        (soak.Failure(once, 1360.5, 1360.6, 502, "instance_failed", 1002), "in flight"),  # within the slack
        (soak.Failure(once, 1299.95, 1300.0, 502, "instance_failed", 1001), "in flight"),  # the rotation restarts too
        (soak.Failure(once, 1360.7, 1360.8, 502, "instance_failed", 1002), "unexpected"),  # after the slack
        (soak.Failure(once, 1359.0, 1359.9, 502, "instance_failed", 1002), "unexpected"),  # ended before SIGTERM
        (soak.Failure(once, 1359.9, 1360.05, 502, "instance_failed", 1001), "unexpected"),  # other instance
        (soak.Failure(repeatable, 1359.9, 1360.05, 502, "instance_failed", 1002), "unexpected"),  # should fail over
        (soak.Failure(get, 1359.9, 1360.05, 502, "instance_failed", 1002), "unexpected"),
        (soak.Failure(get, 1360.0, 1360.05, 503, "no_instance_available"), "unexpected"),
        (soak.Failure(get, 1360.0, 1360.05, 504, "instance_timeout", 1002), "unexpected"),
        (soak.Failure(once, 1360.0, 1360.05, 0, "ConnectionResetError"), "unexpected"),
        (soak.Failure(get, 1200.0, 1200.05, 200, "unexpected answer"), "unexpected"),
    ]
    failures = [f for f, _ in cases]
    soak.classify(failures, [rotation, restart], trust, rotated_port=1001)
    names = {
        "mismatch": "500 certificate_mismatch between rotation and trust",
        "in flight": "502 non-repeatable POST in flight during a restart",
        "unexpected": "unexpected",
    }
    assert [f.verdict for f in failures] == [names[v] for _, v in cases]


def test_short_soak_has_no_unexpected_failure(tmp_path):
    """40 s through 4 workers: A restarts with a new certificate and is trusted, then B restarts."""
    report = tmp_path / "soak.md"
    env = {
        **os.environ,
        "SOAK_SECONDS": "40",
        "SOAK_RESTART_EVERY": "15",
        "SOAK_REPORT": str(report),
        "SOAK_DIR": str(tmp_path / "work"),
    }
    proc = subprocess.run(
        [sys.executable, "bench/soak.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(report.with_suffix(".json").read_text())
    assert result["unexpected"] == 0 and result["failures"] == []
    assert result["sent"] == result["ok"] + sum(result["expected"].values())
    assert set(result["expected"]) <= {
        "500 certificate_mismatch between rotation and trust",
        "502 non-repeatable POST in flight during a restart",
    }
    assert set(result["served_by"]) == {"A", "B"}
    assert [(r["instance"], r["rotate"]) for r in result["restarts"]] == [("A", True), ("B", False)]
    assert result["trust"]["returncode"] == 0
    assert result["rotated"] and result["references_ok"]
    assert result["memory"]["growth_percent"] < 10
    assert report.read_text().rstrip().endswith("**PASS**")
    # Nothing it started is left running: gunicorn, its 4 workers, 2 + 2 instance processes.
    assert len(result["pids"]) == 9
    assert [pid for pid in result["pids"] if os.path.exists(f"/proc/{pid}")] == []
