"""A NATS `.creds` login (GATEWAY_BROKER_CREDS: a user JWT and its NKey seed) against a real
nats-server in operator mode, the way NATS deployments with decentralized auth run.

There is no `nsc` here: the operator, the account and the user, their NKeys and JWTs are made
in the test with the nkeys package (what nats-py signs with), as NATS's JWT v2 format has
them: `base64url(header).base64url(claims).base64url(ed25519 signature of the first two by the
issuer's NKey)`, the header `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims naming the issuer
(`iss`) and the subject (`sub`) by their public NKeys. The operator signs itself and the
account; the account signs the user. The server trusts the operator (`operator:`) and learns
the account from `resolver: MEMORY` with `resolver_preload`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import Broker
from gateway.errors import ConfigError

from . import natsserver
from .gwtest import GatewayProcess, running_gateway
from .natsserver import NatsServer
from .pgconn import pg_connect
from .test_no_loss import TABLES, TOPIC

nkeys = pytest.importorskip("nkeys", reason="nkeys not installed (requirements.lock has it)")
pytest.importorskip("nats", reason="nats-py not installed (requirements.lock has it)")

pytestmark = pytest.mark.timeout(120)

needs_nats = pytest.mark.skipif(
    natsserver.binary() is None,
    reason="nats-server not found (Debian package nats-server; .ci/run installs it)",
)

# No limit, as `nsc` writes it; a limit left out of a JWT is 0 (for `conn`: no connection).
UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def new_key(prefix: int) -> Any:
    """A new NKey pair: its seed is 32 random bytes, encoded with the role's prefix."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (v2) for ``subject`` (a public NKey), signed by ``issuer``'s NKey."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    # The JWT's id: the base32 of the claims' SHA-512/256 with an empty id, as NATS's jwt library makes it.
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = (
        b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        + "."
        + b64url(json.dumps(claims).encode())
    )
    return signed + "." + b64url(issuer.sign(signed.encode()))


def creds_text(user_jwt: str, seed: str) -> str:
    """A `.creds` file as `nsc generate creds` writes it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


@dataclass
class Account:
    key: Any
    jwt: str

    def user(self, name: str) -> tuple[str, str]:
        """A new user of this account: (its JWT, its seed)."""
        user = new_key(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, **UNLIMITED}
        return encode_jwt(self.key, user.public_key.decode(), name, claims), user.seed.decode()


def new_account(operator: Any, name: str) -> Account:
    key = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    return Account(
        key, encode_jwt(operator, key.public_key.decode(), name, {"type": "account", "limits": limits})
    )


def operator_mode_server(tmp_path: Path, operator: Any, *accounts: Account) -> NatsServer:
    """A nats-server trusting ``operator``, with ``accounts`` preloaded in a memory resolver."""
    (tmp_path / "operator.jwt").write_text(
        encode_jwt(operator, operator.public_key.decode(), "test operator", {"type": "operator"})
    )
    preload = "".join(f'  {a.key.public_key.decode()}: "{a.jwt}"\n' for a in accounts)
    conf = tmp_path / "nats-operator.conf"
    conf.write_text(
        f'operator: "{tmp_path / "operator.jwt"}"\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n'
    )
    return NatsServer(tmp_path / "nats-operator.log", args=("-c", str(conf)))


@needs_nats
async def test_a_creds_file_logs_in_to_an_operator_mode_server_and_events_arrive(
    items: str, tmp_path: Path
) -> None:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_account(operator, "gateway")
    user_jwt, seed = account.user("gateway")
    creds = tmp_path / "gateway.creds"
    creds.write_text(creds_text(user_jwt, seed))
    server = operator_mode_server(tmp_path, operator, account).start()
    url = f"nats://127.0.0.1:{server.port}"
    try:
        # Operator mode admits no one without a JWT of a trusted account's user.
        anonymous = GatewayProcess(items, tmp_path / "anonymous.log", tables=TABLES, broker=url)
        with pytest.raises(AssertionError, match="did not start"):
            await anonymous.start()
        assert "cannot connect to the broker" in anonymous.log_path.read_text()
        # With the creds file: the broker carries the doorbells (this mode holds no LISTEN).
        async with running_gateway(items, tables=TABLES, broker=url, broker_creds=str(creds)) as gw:
            c = await gw.connect("1")
            ack = await c.subscribe(TOPIC)
            conn = await pg_connect(items)
            try:
                await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'signed in with creds')")
                listening = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            finally:
                await conn.close()
            (e,) = await c.events(1, timeout=5)
            assert e["pos"] == ack["pos"] + 1 and e["row"]["title"] == "signed in with creds"
            assert listening == 0
            await c.close()
    finally:
        server.stop()


@needs_nats
async def test_a_wrong_creds_file_is_refused_saying_why(items: str, tmp_path: Path) -> None:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_account(operator, "gateway")
    server = operator_mode_server(tmp_path, operator, account).start()
    url = f"nats://127.0.0.1:{server.port}"
    try:
        # Well-formed, but its user belongs to an account this server does not trust.
        stranger_jwt, stranger_seed = new_account(new_key(nkeys.PREFIX_BYTE_OPERATOR), "elsewhere").user("gw")
        stranger = tmp_path / "stranger.creds"
        stranger.write_text(creds_text(stranger_jwt, stranger_seed))
        wrong = GatewayProcess(
            items, tmp_path / "wrong.log", tables=TABLES, broker=url, broker_creds=str(stranger)
        )
        with pytest.raises(AssertionError, match="did not start"):
            await wrong.start()
        (refusal,) = [line for line in wrong.log_path.read_text().splitlines() if "cannot connect" in line]
        # As for a wrong password (test_broker.py): the server's -ERR, or the reset it raced into.
        assert f"cannot connect to the broker at {url}" in refusal, refusal
        assert "Authorization Violation" in refusal or "ConnectionResetError" in refusal, refusal
        assert "authentication error" in server.log_path.read_text()
        assert stranger_seed not in wrong.log_path.read_text()  # the secret is never printed
        # Not a creds file: the seed saved alone. Refused at once, saying what is missing; given
        # to nats-py, whose reader looks for the JWT's line until it finds one, it would hang
        # the process at its first connect.
        alone = tmp_path / "user.nk"
        alone.write_text(
            creds_text(stranger_jwt, stranger_seed).split("************************* IMPORTANT")[1]
        )
        hung = GatewayProcess(
            items, tmp_path / "alone.log", tables=TABLES, broker=url, broker_creds=str(alone)
        )
        with pytest.raises(AssertionError, match="did not start"):
            await hung.start()
        assert f"GATEWAY_BROKER_CREDS={alone} holds no user JWT" in hung.log_path.read_text()
    finally:
        server.stop()


async def test_a_file_that_is_not_user_credentials_is_refused_before_connecting(tmp_path: Path) -> None:
    # nats-py would loop forever reading a file without the JWT line, and sign with another
    # user's seed without a word: each is refused at the start, with what is wrong. No server
    # is needed: nothing is sent.
    account = new_account(new_key(nkeys.PREFIX_BYTE_OPERATOR), "gateway")
    user_jwt, seed = account.user("gateway")
    _, other_seed = account.user("someone else")
    cases = {
        "no user JWT": "just some text\n",
        "no NKey seed": creds_text(user_jwt, seed).split("-----BEGIN USER NKEY SEED")[0],
        "not a JWT": creds_text("not-a-jwt", seed),
        "an account JWT, not a user's": creds_text(account.jwt, seed),
        "not a user's seed": creds_text(user_jwt, account.key.seed.decode()),
        "not a valid seed": creds_text(user_jwt, "SU" + "!" * 56),
        "the two parts come from different users": creds_text(user_jwt, other_seed),
    }
    for problem, text in cases.items():
        path = tmp_path / "bad.creds"
        path.write_text(text)
        broker = Broker(("nats://127.0.0.1:1",), creds=str(path), connect_timeout=0.5)
        with pytest.raises(ConfigError, match=f"GATEWAY_BROKER_CREDS={path}") as refused:
            await broker.start()
        message = str(refused.value)
        assert problem in message, (problem, message)
        assert seed not in message and other_seed not in message
    # The good one gets past the check, to the connection (nothing listens on port 1).
    good = tmp_path / "good.creds"
    good.write_text(creds_text(user_jwt, seed))
    with pytest.raises(ConfigError, match="cannot connect to the broker"):
        await Broker(("nats://127.0.0.1:1",), creds=str(good), connect_timeout=0.5).start()
