"""docs/protocol.md agrees with gateway/protocol.py, the protocol's source of truth.

Checked: every message type has a section (a heading naming it in backticks) and a JSON example
that decodes with the gateway's own decoder for its direction; every error code is a row of the
error table; the close-code table has exactly the codes of ``CLOSE_CODES`` with their numbers,
and its "reconnect" column matches ``RECONNECT_AFTER``. Nothing documented that does not exist.
The token's claims table and its complete example agree with gateway/auth.py's verifier: the
example verifies, each claim marked required is refused when missing, each optional one is
not, and every example token carries those claims, signed with the secret the page names.
"""

from __future__ import annotations

import json
import re
import time
import typing
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest

from gateway import protocol as p
from gateway.auth import Authenticator, TokenError
from gateway.config import load

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


# --- the token ---------------------------------------------------------------------------------


def claims_example(doc: str) -> dict[str, Any]:
    blocks = re.findall(r"^```json claims\n(.*?)^```", doc, re.M | re.S)
    assert len(blocks) == 1, "docs/protocol.md needs one ```json claims block: a complete token's claims"
    claims: dict[str, Any] = json.loads(blocks[0])
    return claims


def claims_rows(doc: str) -> list[tuple[str, str]]:
    """(claim, required) per row of the claims table: required is yes, no or when <setting> is set."""
    start = doc.index("| claim | required |")
    end = doc.find("\n\n", start)
    return [(unquote(row[0]), row[1]) for row in table(doc[start:end])]


def example_secret(doc: str) -> str:
    m = re.search(r"signed with the secret `([^`]+)`", doc)
    assert m, "docs/protocol.md does not name the secret its example tokens are signed with"
    return m.group(1)


def verifier(doc: str, **env: str) -> Authenticator:
    """The gateway's own verifier, configured the way the page's settings name it."""
    return Authenticator(load({"GATEWAY_JWT_SECRET": example_secret(doc), **env}))


async def verifies(auth: Authenticator, claims: dict[str, Any], secret: str) -> bool:
    try:
        await auth.verify(jwt.encode(claims, secret, algorithm="HS256"))
    except TokenError:
        return False
    return True


def test_every_example_token_is_signed_and_carries_the_example_s_claims(doc: str) -> None:
    example = claims_example(doc)
    tokens = re.findall(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", doc)
    assert len(tokens) >= 3, "the auth and refresh examples should show complete tokens"
    for tok in tokens:
        assert jwt.get_unverified_header(tok) == {"alg": "HS256", "typ": "JWT"}, tok
        # Its exp is in the past by design (the examples are fixed); the signature and the
        # claims are what is checked here.
        claims = jwt.decode(tok, example_secret(doc), algorithms=["HS256"], options={"verify_exp": False})
        assert claims.keys() == example.keys(), claims
        assert {k: v for k, v in claims.items() if k not in ("iat", "exp")} == {
            k: v for k, v in example.items() if k not in ("iat", "exp")
        }
        assert claims["exp"] > claims["iat"]
    first = jwt.decode(tokens[0], example_secret(doc), algorithms=["HS256"], options={"verify_exp": False})
    assert first == example, "the first example token is the one whose claims the page shows"
    welcome = next(ex for ex in json_examples(doc) if ex["type"] == "welcome")
    assert welcome["expires"] == example["exp"] and welcome["user"] == example["sub"]


async def test_the_claims_table_says_what_the_verifier_requires(doc: str) -> None:
    secret = example_secret(doc)
    now = int(time.time())
    # The example, issued now: it verifies and names its user.
    example = {**claims_example(doc), "iat": now, "exp": now + 300}
    auth = verifier(doc)
    identity = await auth.verify(jwt.encode(example, secret, algorithm="HS256"))
    assert identity.user == example["sub"]
    assert dict(identity.claims) == example

    rows = claims_rows(doc)
    documented = {claim for claim, _ in rows}
    assert {"exp", "sub", "aud", "iss", "iat", "nbf", "topics"} <= documented, documented
    required = {claim for claim, need in rows if need == "yes"}
    # The required claims alone are enough...
    assert await verifies(auth, {k: example[k] for k in required}, secret)
    for claim, need in rows:
        if need == "yes":
            # ...and each of them is needed.
            assert not await verifies(auth, {k: v for k, v in example.items() if k != claim}, secret), claim
        elif need == "no":
            assert await verifies(auth, {k: v for k, v in example.items() if k != claim}, secret), claim
        else:
            m = re.fullmatch(r"when `(GATEWAY_[A-Z_]+)` is set", need)
            assert m, f"claim {claim}: 'required' must be yes, no or when `GATEWAY_...` is set, not {need!r}"
            strict = verifier(doc, **{m.group(1): "example-value"})
            assert not await verifies(strict, example, secret), f"{claim} is required with {m.group(1)}"
            assert await verifies(strict, {**example, claim: "example-value"}, secret), claim
            # Without the setting the claim is not checked at all.
            assert await verifies(auth, {**example, claim: "another-value"}, secret), claim
    # Optional time claims are checked when present: not in the future.
    for claim in ("iat", "nbf"):
        assert not await verifies(auth, {**example, claim: now + 3600}, secret), claim
