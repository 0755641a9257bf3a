"""Run mutmut over some of the configured modules, resuming where an earlier run stopped.

``python scripts/mutate_run.py [app/security.py ...]``: the modules (default: every one in
pyproject's ``[tool.mutmut] only_mutate``, smallest first). ``mutmut run NAME...`` re-runs the
mutants it is given even when they have a result, and without names it runs every module; so
this passes mutmut the names of the mutants of these modules that have no result yet, were
interrupted, or survived (tests may have been added since). ``MUTATE_JOBS`` sets the number
of workers (default 2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mutmut.__main__ import _run
from mutmut.configuration import config

INTERRUPTED = 2  # mutmut's exit code for a check stopped by Ctrl-C
SURVIVED, NO_TESTS = 0, 33


def unchecked(module: str) -> list[str] | None:
    """Names of ``module``'s mutants to run (again); None when mutmut has not generated them."""
    meta = Path("mutants") / (module + ".meta")
    if not meta.exists():
        return None
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    again = (None, INTERRUPTED, SURVIVED, NO_TESTS)
    return sorted(name for name, code in codes.items() if code in again)


def main(argv: list[str]) -> int:
    modules = argv or sorted(config().only_mutate, key=lambda p: Path(p).stat().st_size)
    jobs = int(os.environ.get("MUTATE_JOBS", "2"))
    names: list[str] = []
    for module in modules:
        todo = unchecked(module)
        if todo is None:  # first run: let mutmut generate them and run them all
            names.append(module.removesuffix(".py").replace("/", ".") + ".*")
        else:
            names += todo
    if not names:
        sys.stdout.write("every mutant of these modules has a result (delete mutants/ to redo)\n")
        return 0
    _run(names, jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
