"""The Prometheus alert rules in deploy/prometheus: valid (`promtool check rules`), and each alert firing
when it should and not otherwise (`promtool test rules alerts.test.yml`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
ALERTS = {
    "MicroserveWorkerDown",
    "MicroserveEngineScrapeFailing",
    "MicroserveHighErrorRatio",
    "MicroserveTTFTBudgetBurnFast",
    "MicroserveTTFTBudgetBurnSlow",
    "MicroserveRouterQueueSaturated",
    "MicroserveKVCacheNearlyFull",
    "MicroserveCircuitOpen",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: scripts/setup.sh installs Debian's prometheus package"
    return subprocess.run([exe, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_every_alert_has_unit_tests_and_they_pass() -> None:
    tests = yaml.safe_load((RULES / "alerts.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    defined = {
        rule["alert"]
        for group in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert defined == ALERTS
    assert tested == ALERTS
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """promtool really checks: the same tests with one alert's expected value changed must fail."""
    text = (RULES / "alerts.test.yml").read_text().replace("is 87.89% full", "is 50% full")
    (tmp_path / "alerts.yml").write_text((RULES / "alerts.yml").read_text())
    (tmp_path / "alerts.test.yml").write_text(text)
    exe = shutil.which("promtool")
    assert exe
    result = subprocess.run(
        [exe, "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "MicroserveRouterQueueSaturated" in result.stdout + result.stderr
