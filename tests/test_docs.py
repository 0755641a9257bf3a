"""The README's configuration tables against the code: every documented variable is read, and
every variable the code reads is documented.

A setting is only as real as the code that reads it: ``LOG_FORMAT`` was once documented, a
field of ``Settings``, and read by nothing, so setting it changed nothing for the user.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
# Read on the user's behalf by libraries (botocore's credential chain, OpenTelemetry).
LIBRARY_PREFIXES = ("AWS_", "OTEL_", "PROMETHEUS_MULTIPROC_DIR")
# The process's own environment, not settings of the service.
SYSTEM = {"PATH", "PYTHONPATH", "HOME", "TMPDIR", "CI", "USER", "LANG", "TZ"}


def documented(section: str = "configuration") -> set[str]:
    """Variable names in the first column of the tables of one README section."""
    names: set[str] = set()
    inside = False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip().lower().startswith(f"## {section}")
            continue
        if inside and line.startswith("|"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", line.split("|")[1]))
    return names


def _trees(*folders: str) -> list[tuple[Path, ast.Module]]:
    paths = sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))
    return [(p, ast.parse(p.read_text())) for p in paths]


def read_from_environment(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Names read with ``os.environ[...]``, ``os.environ.get(...)`` or ``os.getenv(...)``."""
    names: set[str] = set()
    for _, tree in trees:
        for node in ast.walk(tree):
            key: ast.expr | None = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.environ.get",
                "os.getenv",
            ):
                key = node.args[0] if node.args else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names.add(key.value)
    return {n for n in names if n not in SYSTEM and not n.startswith(LIBRARY_PREFIXES)}


def attributes_read(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Every ``<something>.NAME`` the code reads (a field definition is not a read)."""
    return {
        node.attr
        for _, tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
    }


def test_every_documented_setting_exists_and_every_read_one_is_documented() -> None:
    in_code = set(Settings.model_fields) | read_from_environment(_trees("app"))
    docs = documented()
    # The S3 credentials row documents botocore's chain, which the code does not read itself.
    docs_ours = {n for n in docs if not n.startswith(LIBRARY_PREFIXES)}
    assert sorted(docs_ours - in_code) == [], "documented in README, unknown to the code"
    assert sorted(in_code - docs) == [], "read by the code, missing from README's Configuration"


def test_the_tools_variables_are_documented_with_the_bench() -> None:
    """``tools/`` (bench, chaos) is not the service: its variables are in "Performance"."""
    in_tools = read_from_environment(_trees("tools")) - set(Settings.model_fields)
    docs = documented("performance")
    assert sorted(in_tools - docs) == [], "read by tools/, missing from README's Performance"
    assert sorted(docs - in_tools) == [], "documented in Performance, read by nothing in tools/"


def test_every_setting_is_read_by_the_code() -> None:
    read = attributes_read(_trees("app"))
    unread = sorted(name for name in Settings.model_fields if name not in read)
    assert unread == [], f"Settings fields nothing reads (setting them changes nothing): {unread}"
