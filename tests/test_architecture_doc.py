"""docs/architecture.md's module table names every module of gateway/ and gateway/dev/, and
nothing that is not there: a newcomer reads the table to find where a concern lives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def _table_modules() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def _modules() -> set[str]:
    # The package's __init__.py files and __main__.py (`python -m gateway` calls cli.main)
    # hold no concern of their own.
    gateway = ROOT / "gateway"
    files = [*gateway.glob("*.py"), *(gateway / "dev").glob("*.py")]
    return {f.relative_to(gateway).as_posix() for f in files if not f.name.startswith("__")}


def test_the_module_table_lists_every_module_once_and_nothing_else() -> None:
    listed = _table_modules()
    assert listed, "no module table found under '## Modules' in docs/architecture.md"
    assert len(listed) == len(set(listed)), (
        f"listed twice: {sorted(m for m in listed if listed.count(m) > 1)}"
    )
    missing = _modules() - set(listed)
    gone = set(listed) - _modules()
    assert not missing, f"modules docs/architecture.md does not list: {sorted(missing)}"
    assert not gone, f"docs/architecture.md lists modules that do not exist: {sorted(gone)}"
