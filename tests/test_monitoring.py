"""The alert rules and the Grafana dashboard in config/: valid, and about the metrics the balancer serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from app import metrics

from .support import ROOT

pytestmark = pytest.mark.unit

RULES = ROOT / "config" / "ctbalancer-alerts.yml"
DASHBOARD = ROOT / "config" / "ctbalancer-dashboard.json"

#: The metric names of docs/design.md, "Metrics" (histograms by their series).
SERVED = {
    "ctbalancer_requests_total",
    "ctbalancer_errors_total",
    "ctbalancer_instance_requests_total",
    "ctbalancer_instance_failures_total",
    "ctbalancer_instance_in_flight",
    "ctbalancer_instance_up",
    "ctbalancer_instance_response_seconds_bucket",
    "ctbalancer_pin_learned_total",
    "ctbalancer_pin_mismatch_total",
    "ctbalancer_pin_expiry_timestamp_seconds",
    "ctbalancer_workers",
    "ctbalancer_pin_store_up",
    "ctbalancer_pin_store_failures_total",
    "ctbalancer_journal_pending",
    "ctbalancer_journal_replays_total",
    "ctbalancer_journal_divergences_total",
}


def names(expr: str) -> set[str]:
    return set(re.findall(r"\bctbalancer_[a-z_]+", expr))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_rules_alert_on_the_six_conditions_with_served_metrics() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"- alert: (\w+)\n\s+expr: (.+)", text)
    assert [a for a, _ in alerts] == [
        "CtbalancerInstanceDown",
        "CtbalancerCertificateMismatch",
        "CtbalancerReferenceExpiringSoon",
        "CtbalancerNoInstanceAvailable",
        "CtbalancerPinStoreUnreachable",
        "CtbalancerJournalBacklog",
    ]
    for _, expr in alerts:
        assert names(expr) and names(expr) <= SERVED, expr
    assert "14 * 86400" in dict(alerts)["CtbalancerReferenceExpiringSoon"]


def test_dashboard_queries_only_served_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(names(e) for e in exprs))
    assert used == SERVED


def test_the_served_metric_names_are_the_documented_ones() -> None:
    defined = {m._name + "_total" for m in (metrics.REQUESTS, metrics.ERRORS, metrics.INSTANCE_REQUESTS,
                                             metrics.INSTANCE_FAILURES, metrics.PIN_LEARNED, metrics.PIN_MISMATCH,
                                             metrics.PIN_STORE_FAILURES, metrics.JOURNAL_REPLAYS,
                                             metrics.JOURNAL_DIVERGENCES)}
    assert defined | {metrics.RESPONSE_SECONDS._name + "_bucket", "ctbalancer_instance_in_flight", "ctbalancer_instance_up",
                      "ctbalancer_pin_expiry_timestamp_seconds", "ctbalancer_workers",
                      "ctbalancer_pin_store_up", "ctbalancer_journal_pending"} == SERVED
