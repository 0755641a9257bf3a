"""The tools that test and measure videorelay from a checkout: ``bench`` and ``chaos``.

They are not part of the service: the wheel and the Docker image ship ``app/`` alone, and
nothing in ``app/`` imports this package except ``videorelay bench`` and ``videorelay chaos``,
which look it up when they run (``run_command``). From a checkout, ``python -m tools.bench``
and ``python -m tools.chaos`` do the same.

* ``procs``: what both share (child processes, ports, scratch Postgres, ``percentile``);
* ``bench/``: the hot paths measured against baselines taken in the same run;
* ``chaos`` and ``chaos_report``: replicas killed mid-flight, and the verdict of the run.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

__all__ = ["COMMANDS", "run_command"]

COMMANDS = {"bench": "tools.bench.runner", "chaos": "tools.chaos"}
"""``videorelay`` sub-command -> the module whose ``main(argv, prog=...)`` runs it."""


def run_command(command: str, argv: Sequence[str]) -> int:
    """Run ``videorelay COMMAND ARGV...``; the module is imported only now."""
    module = importlib.import_module(COMMANDS[command])
    code: int = module.main(argv, prog=f"videorelay {command}")
    return code
