"""``videorelay bench --quick`` runs end to end: every scenario, each figure beside its baseline.

It checks that the command works (as CI does), not the figures themselves.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import child_env

SCENARIOS = ("webhook", "download", "reconciler", "submit")


def _command() -> list[str]:
    script = Path(sys.executable).with_name("videorelay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def test_bench_quick_reports_every_scenario_with_a_baseline_and_a_ratio(tmp_path: Path):
    out = tmp_path / "bench.json"
    env = child_env(tmp_path)  # built from scratch: no setting of the developer's shell
    proc = subprocess.run(
        [*_command(), "bench", "--quick", "--database", "sqlite", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| scenario | case |" in proc.stdout

    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "quick"
    assert data["meta"]["databases"] == ["sqlite"]
    assert set(SCENARIOS) <= set(data["scenarios"])
    for name in SCENARIOS:
        scenario = data["scenarios"][name]
        assert scenario["error"] is None, (name, scenario["error"], scenario["notes"])
        assert scenario["baselines"], name
        assert scenario["results"], name
        for row in scenario["baselines"] + scenario["results"]:
            assert row["baseline"], (name, row)
            assert row["baseline_value"] > 0, (name, row)
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, (name, row)
        # Every subject figure is compared with a baseline measured in this run, not itself.
        assert all(r["baseline"] != "itself" for r in scenario["results"]), name
