"""Summarise mutmut's results per module (used by scripts/mutate; prints Markdown).

mutmut keeps one ``mutants/<path>.meta`` JSON file per mutated module, mapping each mutant's
name to the exit code of the test run against it; the mapping to a status is mutmut's own.
Score = killed / (all mutants that were checked); a mutant no selected test reaches counts as
not killed; a time-out counts as killed (a caller left waiting forever is a failure).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "crashed", "caught by type check", "segfault"}
# mutmut files exit code 255 under "timeout"; with process_isolation = "forkserver" it is a
# test run that died (e.g. a service that cannot start leaves sockets pytest turns into an
# error at exit). The tests did not pass: a kill, but shown apart.
CRASHED = 255


def main() -> int:
    root = Path("mutants")
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        sys.stderr.write("no mutmut results under mutants/: run `make mutate` first\n")
        return 1
    rows: list[str] = []
    survivors: list[str] = []
    total_killed = total_checked = 0
    for meta in metas:
        module = str(meta.relative_to(root)).removesuffix(".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: dict[str, int] = {}
        for name, code in sorted(codes.items()):
            status = "crashed" if code == CRASHED else status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status not in KILLED and status != "not checked":
                survivors.append(f"- `{name}`: {status}")
        checked = sum(n for s, n in counts.items() if s != "not checked")
        killed = sum(n for s, n in counts.items() if s in KILLED)
        if not checked:
            continue
        total_killed += killed
        total_checked += checked
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        score = 100 * killed / checked
        rows.append(f"| {module} | {killed}/{checked} | {score:.1f} % | {detail} |")
    out = ["| module | killed | score | statuses |", "|---|---|---|---|", *rows]
    if total_checked:
        score = 100 * total_killed / total_checked
        out.append(f"| **all** | {total_killed}/{total_checked} | {score:.1f} % | |")
    out += ["", f"Not killed ({len(survivors)}); `.venv/bin/mutmut show NAME` prints the change:"]
    out += ["", *survivors]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
