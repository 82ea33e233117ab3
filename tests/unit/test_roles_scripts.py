"""The scripts the roles install: storage usage guard, power profile, low-power shutdown."""

from __future__ import annotations

import datetime
import importlib.util
import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
GUARD = REPO / "roles/common/files/spark-usage-guard"


def load(path: Path) -> ModuleType:
    loader = SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def run_guard(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GUARD), str(config)], capture_output=True, text=True, timeout=30)


def test_usage_guard_marks_a_tier_over_quota_and_clears_it_below_the_low_watermark(tmp_path: Path) -> None:
    tier, metrics = tmp_path / "hot", tmp_path / "textfile"
    tier.mkdir()
    metrics.mkdir()
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"textfile_dir": str(metrics), "paths": [
        {"name": "tier-hot", "path": str(tier), "capacity_bytes": 1_000_000, "low": 0.5, "high": 0.8}]}))

    (tier / "small").write_bytes(b"x" * 100_000)
    assert run_guard(config).returncode == 0
    assert not (tier / ".over-quota").exists()

    (tier / "big").write_bytes(b"x" * 900_000)
    result = run_guard(config)
    assert result.returncode == 1
    assert "above the high watermark 80%" in result.stderr
    assert (tier / ".over-quota").exists()
    prom = (metrics / "spark_usage_guard.prom").read_text()
    assert f'spark_storage_over_quota{{name="tier-hot",path="{tier}"}} 1' in prom
    assert f'spark_storage_capacity_bytes{{name="tier-hot",path="{tier}"}} 1000000' in prom

    (tier / "big").unlink()
    (tier / "mid").write_bytes(b"x" * 550_000)  # between the watermarks: the marker stays (hysteresis)
    run_guard(config)
    assert (tier / ".over-quota").exists()
    (tier / "mid").unlink()
    assert run_guard(config).returncode == 0
    assert not (tier / ".over-quota").exists()
    assert "} 0" in (metrics / "spark_usage_guard.prom").read_text().split("spark_storage_over_quota")[-1]


def test_quiet_hours_cross_midnight() -> None:
    power = load(REPO / "roles/edge/files/spark-power")
    window = ["23:00", "06:00"]
    assert power.in_quiet_hours(window, datetime.time(23, 30))
    assert power.in_quiet_hours(window, datetime.time(5, 59))
    assert not power.in_quiet_hours(window, datetime.time(6, 0))
    assert not power.in_quiet_hours(window, datetime.time(12, 0))
    assert power.in_quiet_hours(["01:00", "03:00"], datetime.time(2, 0))
    assert not power.in_quiet_hours(["01:00", "03:00"], datetime.time(3, 30))
    assert not power.in_quiet_hours(None, datetime.time(2, 0))


def test_low_power_signal_triggers_below_the_threshold(tmp_path: Path) -> None:
    ups = load(REPO / "roles/edge/files/spark-ups-guard")
    profile = {"ups_signal": "gpio", "shutdown_battery_percent": 15, "gpio_path": str(tmp_path / "value")}
    assert ups.battery_low(profile, 14)[0]
    assert not ups.battery_low(profile, 50)[0]
    (tmp_path / "value").write_text("0\n")
    assert not ups.battery_low(profile, None)[0]
    (tmp_path / "value").write_text("1\n")
    low, reason = ups.battery_low(profile, None)
    assert low and "is set" in reason
    assert not ups.battery_low({**profile, "ups_signal": "none"}, None)[0]


def families(text: str) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_ups_guard_writes_its_readings_under_the_registry_names(tmp_path: Path) -> None:
    from primespark.monitoring import metrics as m

    ups = load(REPO / "roles/edge/files/spark-ups-guard")
    line = tmp_path / "value"
    line.write_text("1\n")
    profile = {"ups_signal": "gpio", "shutdown_battery_percent": 15, "gpio_path": str(line),
               "textfile_dir": str(tmp_path)}
    ups.write_metrics(profile, ups.observe(profile, None))
    written = families((tmp_path / "spark_power.prom").read_text())
    assert written[m.POWER_BATTERY_LOW.name][0].value == 1
    assert written[m.POWER_BATTERY_LOW.name][0].labels == {"signal": "gpio"}
    assert m.POWER_CHECK_TIME.name in written and m.POWER_ON_BATTERY.name not in written  # a line knows no status
    ups.write_metrics({**profile, "ups_signal": "nut"}, {"low": False, "charge": 80, "on_battery": True,
                                                         "reason": "test"})
    written = families((tmp_path / "spark_power.prom").read_text())
    assert written[m.POWER_ON_BATTERY.name][0].value == 1
    assert written[m.POWER_BATTERY_CHARGE.name][0].value == 80
    script_names = set(written)
    registry_names = {x.name for x in m.REGISTRY.values() if x.source == m.UPS_GUARD}
    assert script_names == registry_names
    for metric in registry_names:
        assert set(written[metric][0].labels) == set(m.REGISTRY[metric].labels)


def test_usage_guard_writes_the_registry_names(tmp_path: Path) -> None:
    from primespark.monitoring import metrics as m

    tier, metrics = tmp_path / "hot", tmp_path / "textfile"
    tier.mkdir()
    metrics.mkdir()
    config = tmp_path / "guard.json"
    config.write_text(json.dumps({"textfile_dir": str(metrics), "paths": [
        {"name": "tier-hot", "path": str(tier), "capacity_bytes": 1_000_000, "low": 0.5, "high": 0.8}]}))
    assert run_guard(config).returncode == 0
    written = families((metrics / "spark_usage_guard.prom").read_text())
    assert set(written) == {x.name for x in m.REGISTRY.values() if x.source == m.USAGE_GUARD}
    for metric, samples in written.items():
        assert set(samples[0].labels) == set(m.REGISTRY[metric].labels)
