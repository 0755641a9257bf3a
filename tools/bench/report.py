"""The bench's output: a Markdown table on stdout, progress on stderr, everything in JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tools.bench.common import Measurement, ScenarioResult

__all__ = ["markdown", "progress", "publish", "write_json"]


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _latency(row: Measurement) -> str:
    d = row.details
    if "p50_ms" in d and "p99_ms" in d:
        return f"{_num(d['p50_ms'])} / {_num(d['p99_ms'])}"
    return ""


def _met(row: Measurement) -> str:
    verdict = row.verdict
    if verdict is None:
        return ""
    if verdict == "unstable":
        hits = sum(1 for r in row.reps if r["met"])
        return f"**unstable** ({hits} of {len(row.reps)})"
    return "yes" if verdict == "yes" else "**no**"


def _ratio(row: Measurement) -> str:
    if row.role == "baseline" and row.baseline == "itself":
        return "1 (baseline)"
    arrow = "↑" if row.better == "higher" else "↓"
    spread = row.spread
    around = f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread else ""
    return f"{row.ratio:.2f}× {arrow}{around}"


def markdown(meta: dict[str, Any], scenarios: list[ScenarioResult]) -> str:
    lines = [
        f"## videorelay bench ({meta['mode']}, {meta['date']})",
        "",
        f"{meta['machine']}; {meta['versions']}",
        "",
        f"Load average (1 min) before the run {meta['loadavg_1min_before']:.2f}, after "
        f"{meta['loadavg_1min_after']:.2f} (above ~0.5 before: other work shared the 2 cores).",
        "",
        f"Figures with a range were measured {meta['reps']} times, interleaved with their "
        "baseline: value and ratio are medians, the range is the lowest and highest "
        "repetition's ratio, and **unstable** means some repetitions met the target and "
        "some did not.",
        "",
        "| scenario | case | value | baseline (same run) | ratio | p50 / p99 ms | errors "
        "| target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        if scenario.error is not None:
            lines.append(f"| {scenario.title} | **failed**: {scenario.error} | | | | | | | |")
            continue
        for row in scenario.rows:
            errors = row.details.get("errors", "")
            value = f"{_num(row.value)} {row.metric}"
            base = f"{row.baseline}: {_num(row.baseline_value)} {row.metric}"
            if row.baseline == "itself":
                base = "—"
            lines.append(
                f"| {scenario.title} | {row.case} | {value} | {base} | {_ratio(row)} "
                f"| {_latency(row)} | {errors} | {row.target or ''} | {_met(row)} |"
            )
    lines += ["", "↑: higher is better, ↓: lower is better.", ""]
    for scenario in scenarios:
        if scenario.notes:
            lines += [f"**{scenario.title}** ({scenario.seconds:.0f} s)", ""]
            lines += [f"- {note}" for note in scenario.notes]
            lines.append("")
    for scenario in scenarios:
        for block in scenario.appendix:
            title, _, body = block.partition("\n\n")
            lines += [f"<details><summary>{title}</summary>", "", "```", body, "```", "</details>"]
            lines.append("")
    lines.append(f"Total: {meta['total_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, Any], scenarios: list[ScenarioResult]) -> None:
    data = {"meta": meta, "scenarios": {s.name: s.to_json() for s in scenarios}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def publish(meta: dict[str, Any], scenarios: list[ScenarioResult], json_path: Path | None) -> None:
    if json_path is not None:
        write_json(json_path, meta, scenarios)
    sys.stdout.write(markdown(meta, scenarios))
    sys.stdout.flush()
    if json_path is not None:
        progress(f"JSON written to {json_path}")
