"""``videorelay bench --quick`` runs end to end: every scenario, each figure beside its baseline.

It checks that the command works (as CI does), not the figures themselves; and that ``bench``
and ``chaos`` hand over to ``tools/`` of a checkout, or say to use one when it is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

SCENARIOS = ("webhook", "download", "media", "reconciler", "submit")


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
        timeout=480,  # about 1.5 min on a quiet machine; a shared one can triple it
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
    # Load figures are medians of interleaved repetitions (two with --quick), with their range.
    assert data["meta"]["reps"] == 2
    assert data["meta"]["cpu_model"] and len(data["meta"]["loadavg_before"]) == 3
    for name in ("webhook", "download", "submit"):
        for row in data["scenarios"][name]["results"]:
            assert len(row["reps"]) == 2, (name, row["case"])
            low, high = row["spread"]
            assert low <= row["ratio"] <= high, (name, row["case"])
            if row["target"]:
                assert row["verdict"] in ("yes", "no", "unstable"), (name, row["case"])


def test_a_target_met_in_some_repetitions_only_is_unstable():
    from tools.bench.common import Measurement

    values, baselines = [50.0, 30.0, 45.0], [100.0, 100.0, 100.0]
    row = Measurement.repeated(
        "subject",
        "case",
        "req/s",
        values,
        "A",
        baselines,
        target=">= 0.4x A",
        meets=lambda i: values[i] >= 0.4 * baselines[i],
    )
    assert (row.ratio, row.spread, row.verdict, row.met) == (0.45, (0.3, 0.5), "unstable", False)
    every = Measurement.repeated(
        "subject", "case", "req/s", values, "A", baselines, meets=lambda i: True
    )
    assert every.verdict == "yes"


@pytest.mark.parametrize("command", ["bench", "chaos"])
def test_the_tool_commands_show_their_options(tmp_path: Path, command: str):
    proc = subprocess.run(
        [*_command(), command, "--help"],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: videorelay {command} ")
    assert "--json PATH" in proc.stdout


def test_without_the_tools_the_command_says_where_to_run_it(tmp_path: Path):
    """An installed wheel has no tools/: ``videorelay bench`` says to use a checkout."""
    script = (
        "import sys\n"
        "sys.modules['tools'] = None  # as in an installed wheel: no tools package\n"
        "from app.cli import main\n"
        "raise SystemExit(main(['bench', '--quick']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "videorelay bench: this command runs from a checkout" in proc.stderr
    assert "Traceback" not in proc.stderr
