"""docs/protocol.md agrees with gateway/protocol.py, the protocol's source of truth.

Checked: every message type has a section (a heading naming it in backticks) and a JSON example
that decodes with the gateway's own decoder for its direction; every error code is a row of the
error table; the close-code table has exactly the codes of ``CLOSE_CODES`` with their numbers,
and its "reconnect" column matches ``RECONNECT_AFTER``. Nothing documented that does not exist.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import protocol as p

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def tags(union: Any) -> set[str]:
    return {cls.__struct_config__.tag for cls in typing.get_args(union)}


CLIENT_TAGS = tags(p.ClientMessage)
SERVER_TAGS = tags(p.ServerMessage)
RAW_FIELDS = {
    cls.__struct_config__.tag: {f.name for f in msgspec.structs.fields(cls) if "Raw" in repr(f.type)}
    for cls in typing.get_args(p.ServerMessage)
}


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.exists(), f"{DOC} is missing"
    return DOC.read_text()


def section(doc: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of the same level."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", doc, re.M | re.S)
    assert m, f"docs/protocol.md has no '## {heading}' section"
    return m.group(1)


def table(text: str) -> list[list[str]]:
    """Rows of the first Markdown table in ``text`` (header and separator left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) >= 2 and set(rows[1].replace("|", "").strip()) <= set("-: "), "no table found"
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def json_examples(doc: str) -> list[Any]:
    return [json.loads(block) for block in re.findall(r"^```json\n(.*?)^```", doc, re.M | re.S)]


def test_the_two_directions_do_not_share_a_type() -> None:
    # The examples are checked by their type alone, which is only sound while this holds.
    assert not CLIENT_TAGS & SERVER_TAGS


def test_every_message_type_has_a_section(doc: str) -> None:
    headings = re.findall(r"^#{2,4} .*$", doc, re.M)
    documented = {t for h in headings for t in re.findall(r"`([a-z_]+)`", h)}
    missing = (CLIENT_TAGS | SERVER_TAGS) - documented
    assert not missing, f"docs/protocol.md has no section for {sorted(missing)}"


def test_every_json_example_decodes_and_every_type_has_one(doc: str) -> None:
    examples = json_examples(doc)
    assert examples, "docs/protocol.md has no ```json examples"
    seen: set[str] = set()
    for ex in examples:
        assert isinstance(ex, dict) and "type" in ex, f"an example is not a message: {ex}"
        text = json.dumps(ex)
        if ex["type"] in CLIENT_TAGS:
            p.decoder.decode(text)  # raises, naming the field, if the example is wrong
        else:
            assert ex["type"] in SERVER_TAGS, f"example of an unknown type: {ex}"
            # Fields the gateway passes through as raw JSON (row, data, change) hold any JSON
            # value; msgspec decodes Raw only at the top level, so they are checked apart.
            rest = {k: v for k, v in ex.items() if k not in RAW_FIELDS[ex["type"]]}
            msgspec.json.decode(json.dumps(rest), type=p.ServerMessage)
        if ex["type"] == "error":
            assert ex["code"] in p.ERROR_CODES, ex
        seen.add(ex["type"])
    missing = (CLIENT_TAGS | SERVER_TAGS) - seen
    assert not missing, f"no JSON example of {sorted(missing)}"


def test_every_error_code_is_documented(doc: str) -> None:
    rows = table(section(doc, "Error codes"))
    documented = [unquote(r[0]) for r in rows]
    assert len(documented) == len(set(documented)), "an error code is listed twice"
    assert set(documented) == set(p.ERROR_CODES), (
        f"missing: {sorted(set(p.ERROR_CODES) - set(documented))}, "
        f"not in protocol.py: {sorted(set(documented) - set(p.ERROR_CODES))}"
    )
    for row in rows:
        assert len(row) >= 2 and row[1], f"error code {row[0]} has no meaning"


def test_close_code_table_matches_protocol(doc: str) -> None:
    text = section(doc, "Close codes")
    header = [
        c.strip().lower()
        for c in next(line for line in text.splitlines() if line.startswith("|")).strip("|").split("|")
    ]
    assert header[:3] == ["code", "name", "reconnect"], header
    rows = table(text)
    documented: dict[str, int] = {}
    reconnect: dict[int, bool] = {}
    for row in rows:
        number, name, answer = int(row[0]), unquote(row[1]), row[2].lower()
        assert answer in ("yes", "no"), f"close code {number}: reconnect must be yes or no, not {row[2]!r}"
        assert name not in documented, f"close code {name} listed twice"
        assert len(row) >= 4 and row[3], f"close code {number} has no meaning"
        documented[name] = number
        reconnect[number] = answer == "yes"
    assert documented == p.CLOSE_CODES
    for number, again in reconnect.items():
        assert again == (number in p.RECONNECT_AFTER), (
            f"close code {number}: the doc says reconnect={'yes' if again else 'no'}, "
            f"protocol.RECONNECT_AFTER says {'yes' if number in p.RECONNECT_AFTER else 'no'}"
        )


def test_the_refusals_before_the_upgrade_are_the_code_s_in_its_order(doc: str) -> None:
    m = re.search(r"^### HTTP answers before the upgrade\s*$(.*?)(?=^#)", doc, re.M | re.S)
    assert m, "docs/protocol.md has no '### HTTP answers before the upgrade' section"
    rows = table(m.group(1))
    assert [(int(status), unquote(error)) for status, error, _ in rows] == [
        (r.status, r.error) for r in p.REFUSALS
    ]
    for (_, _, when), refusal in zip(rows, p.REFUSALS, strict=True):
        retry = f"Retry-After: {refusal.retry_after}"
        assert (retry in when) == (refusal.retry_after is not None), (refusal, when)
