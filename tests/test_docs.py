"""The docs name only tests and files that exist: every pytest node id, test file, test name and
repository path written in `backticks` in docs/*.md must resolve in this checkout."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
TOP_DIRS = ("agents", "bench", "docs", "examples", "plugins", "schemas", "scripts", "stratosd",
            "systemd", "tests")
CODE = re.compile(r"`([^`\n]+)`")
NODE_ID = re.compile(r"^(?P<file>[\w/.-]*test_\w+(?:\.py)?)::(?P<names>[\w:]+)"
                     r"(?:\[(?P<param>[^\]]+)\])?$")
REPO_PATH = re.compile(rf"^(?:{'|'.join(TOP_DIRS)})/[\w./-]*\w$")
TEST_NAME = re.compile(r"^test_\w+$")


@cache
def all_test_files() -> tuple[Path, ...]:
    """Every Python file under tests/."""
    return tuple(sorted((ROOT / "tests").rglob("*.py")))


@cache
def definitions(path: Path) -> frozenset[str]:
    """'name' for module-level functions and classes, 'Class::name' for methods."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        if isinstance(node, ast.ClassDef):
            out.update(f"{node.name}::{item.name}" for item in node.body
                       if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(out)


def resolve_file(name: str) -> list[Path]:
    """A test file as the docs write it: tests/x/test_y.py, x/test_y.py, test_y.py, test_y."""
    name = name if name.endswith(".py") else f"{name}.py"
    exact = ROOT / name
    if exact.is_file():
        return [exact]
    return [p for p in all_test_files() if p.as_posix().endswith("/" + name)]


def problems(doc: Path) -> list[str]:
    """What `doc` names that does not exist."""
    out = []
    for ref in dict.fromkeys(CODE.findall(doc.read_text())):
        ref = ref.strip()
        if m := NODE_ID.match(ref):
            files = resolve_file(m["file"])
            if not files:
                out.append(f"{ref}: no test file {m['file']}")
            elif not any(m["names"] in definitions(f) for f in files):
                out.append(f"{ref}: {m['names']} is not defined in {files[0].relative_to(ROOT)}")
            elif m["param"] and not any(m["param"] in f.read_text() for f in files):
                out.append(f"{ref}: no parameter id {m['param']!r}")
        elif REPO_PATH.match(ref):
            if not (ROOT / ref).exists():
                out.append(f"{ref}: no such file")
        elif TEST_NAME.match(ref):
            if not any(ref in definitions(f) for f in all_test_files()):
                out.append(f"{ref}: no test by that name under tests/")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_test_and_file_named_in_the_docs_exists(doc: Path) -> None:
    assert problems(doc) == []


def test_the_checker_catches_stale_references(tmp_path: Path) -> None:
    doc = tmp_path / "stale.md"
    doc.write_text("`tests/e2e/test_restart.py::test_daemon_killed_mid_run_resumes` is real;\n"
                   "`test_restart::test_gone`, `tests/e2e/test_nothing.py`, `test_never_was`, "
                   "`test_faults::test_nats_restart_mid_run_loses_nothing[no-such-id]` and "
                   "`stratosd/no_module.py` are not.\n")
    found = problems(doc)
    assert len(found) == 5, found
    for ref in ("test_gone", "test_nothing.py", "test_never_was", "no-such-id", "no_module.py"):
        assert any(ref in p for p in found), ref
