"""JWT verification against a real JWKS endpoint (an aiohttp server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import Authenticator, Identity, TokenError, mint_token
from gateway.config import ConfigError, Settings

from .gwtest import serving

SECRET = "s3cret-for-tests-only-0123456789abcdef"
LONG_SECRET = "a-64-byte-secret-long-enough-for-hs512-0123456789abcdefghijklmno"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


class JwksServer:
    """Serves ``keys`` as a JWKS; counts requests; can hold requests until ``gate`` is set."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.status = 200
        self.gate: asyncio.Event | None = None
        self.requested = asyncio.Event()  # set by every request
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.requested.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    async with serving(app) as base:
        server.url = base + "/jwks.json"
        yield server
        if server.gate is not None:  # release requests still waiting, or cleanup waits on them
            server.gate.set()


@pytest.fixture
async def hs() -> AsyncIterator[Authenticator]:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    await auth.start()
    yield auth
    await auth.close()


def jwks_auth(server: JwksServer, **settings: Any) -> Authenticator:
    return Authenticator(Settings(jwt_jwks_url=server.url, **settings))


async def reason(auth: Authenticator, token: str) -> str:
    with pytest.raises(TokenError) as info:
        await auth.verify(token)
    assert str(info.value), "every TokenError carries a sentence for the client"
    return info.value.reason


# --- configuration ------------------------------------------------------------------


def test_refuses_to_build_without_secret_or_jwks() -> None:
    with pytest.raises(ConfigError, match=r"GATEWAY_JWT_SECRET.*GATEWAY_JWT_JWKS_URL"):
        Authenticator(Settings())


def test_refuses_algorithms_without_their_keys() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_JWT_SECRET"):
        Authenticator(Settings(jwt_jwks_url="http://127.0.0.1:1/jwks", jwt_algorithms=("HS256", "RS256")))
    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS_URL"):
        Authenticator(Settings(jwt_secret=SECRET, jwt_algorithms=("RS256",)))


def test_default_algorithms() -> None:
    assert Authenticator(Settings(jwt_secret=LONG_SECRET)).algorithms == ("HS256", "HS384", "HS512")
    assert Authenticator(Settings(jwt_jwks_url="http://127.0.0.1:1/j")).algorithms == ("RS256", "ES256")
    both = Settings(jwt_secret=SECRET, jwt_jwks_url="http://127.0.0.1:1/j")
    assert Authenticator(both).algorithms == ("HS256", "RS256", "ES256")


# --- HS256 --------------------------------------------------------------------------


async def test_hs256_identity(hs: Authenticator) -> None:
    token = mint_token(SECRET, "alice", ttl=60, topics=["room:7"], role="admin")
    identity = await hs.verify(token)
    assert isinstance(identity, Identity)
    assert identity.user == "alice"
    assert identity.claims["topics"] == ["room:7"]
    assert identity.claims["role"] == "admin"
    assert identity.expires == identity.claims["exp"]
    assert identity.expires is not None and identity.expires > time.time()


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hs_family_accepted(alg: str) -> None:
    auth = Authenticator(Settings(jwt_secret=LONG_SECRET))
    identity = await auth.verify(jwt.encode(claims(), LONG_SECRET, algorithm=alg))
    assert identity.user == "alice"


async def test_hs_variants_need_long_enough_secret(hs: Authenticator) -> None:
    # A 38-byte secret is enough for HS256 only (RFC 7518 3.2: key >= hash size).
    assert hs.algorithms == ("HS256",)
    with pytest.raises(ConfigError, match=r"HS512.*64 bytes"):
        Authenticator(Settings(jwt_secret=SECRET, jwt_algorithms=("HS256", "HS512")))


async def test_integer_user_becomes_text(hs: Authenticator) -> None:
    identity = await hs.verify(jwt.encode(claims(sub=42), SECRET, algorithm="HS256"))
    assert identity.user == "42"


async def test_configurable_user_claim() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_user_claim="uid"))
    identity = await auth.verify(jwt.encode(claims(uid="u-9"), SECRET, algorithm="HS256"))
    assert identity.user == "u-9"
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert await reason(auth, token) == "no_user"  # has sub, but not uid


@pytest.mark.parametrize(
    "sub",
    [None, "", True, 1.5, ["alice"], {"id": "alice"}, "x" * 201, "bad\nuser"],
    ids=["absent", "empty", "bool", "float", "list", "object", "too-long", "control-char"],
)
async def test_bad_user_claim(hs: Authenticator, sub: Any) -> None:
    payload = claims(sub=sub)
    if sub is None:
        del payload["sub"]
    assert await reason(hs, jwt.encode(payload, SECRET, algorithm="HS256")) == "no_user"


async def test_expired(hs: Authenticator) -> None:
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 600, exp=now - 120), SECRET, algorithm="HS256")
    assert await reason(hs, token) == "expired"


async def test_leeway_tolerates_small_skew(hs: Authenticator) -> None:
    now = int(time.time())
    # Expired 5 s ago, within the default 30 s leeway.
    identity = await hs.verify(jwt.encode(claims(exp=now - 5), SECRET, algorithm="HS256"))
    assert identity.user == "alice"
    strict = Authenticator(Settings(jwt_secret=SECRET, jwt_leeway=0))
    assert await reason(strict, jwt.encode(claims(exp=now - 5), SECRET, algorithm="HS256")) == "expired"


async def test_exp_required(hs: Authenticator) -> None:
    payload = claims()
    del payload["exp"]
    with pytest.raises(TokenError, match="exp") as info:
        await hs.verify(jwt.encode(payload, SECRET, algorithm="HS256"))
    assert info.value.reason == "malformed"


def signed(payload_json: str, secret: str = SECRET) -> str:
    """An HS256 token over exactly this payload text (numbers JSON libraries would not write)."""
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(payload_json.encode())
    sig = _b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{sig}"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    ['"9999999999"', '"1700000000"', "true", "null", "[1]", "{}", "1e300", str(2**63), "-1", "NaN", "Infinity"],
    ids=["string-far", "string-past", "bool", "null", "list", "object", "1e300", "2^63", "negative", "nan", "inf"],
)  # fmt: skip
async def test_time_claims_must_be_sane_numbers(hs: Authenticator, claim: str, value: str) -> None:
    """A correctly signed token whose exp/nbf/iat is no NumericDate is refused, with a sentence
    naming the claim: PyJWT alone reads them with int(), so "9999999999" or 1e300 for exp
    gave a connection that never expires."""
    now = int(time.time())
    fields = {"sub": '"alice"', "iat": str(now), "exp": str(now + 300), claim: value}
    token = signed("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}")
    with pytest.raises(TokenError, match=claim) as info:
        await hs.verify(token)
    assert info.value.reason == "malformed"
    assert "9999999999" not in str(info.value)


async def test_time_claims_may_be_fractional(hs: Authenticator) -> None:
    now = time.time()  # RFC 7519: a NumericDate may have a fraction
    identity = await hs.verify(
        signed(f'{{"sub":"alice","iat":{now - 1.5},"nbf":{now - 1.5},"exp":{now + 60.25}}}')
    )
    assert identity.expires == pytest.approx(now + 60.25)


async def test_exp_counts_at_most_the_max_token_lifetime() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, max_token_lifetime=60))
    far = int(time.time()) + 10 * 365 * 86400
    before = time.time()
    identity = await auth.verify(jwt.encode(claims(exp=far), SECRET, algorithm="HS256"))
    assert before + 60 <= identity.expires <= time.time() + 60
    # A token expiring sooner than the cap keeps its own exp.
    soon = int(time.time()) + 30
    assert (await auth.verify(jwt.encode(claims(exp=soon), SECRET))).expires == soon
    # The default cap is a day.
    assert Settings().max_token_lifetime == 86400
    default = Authenticator(Settings(jwt_secret=SECRET))
    assert (await default.verify(jwt.encode(claims(exp=far), SECRET))).expires <= time.time() + 86400


@pytest.mark.parametrize("grant", ["user:*", "user:alice*", "user:a*"])
async def test_patterns_over_user_topics_are_refused(hs: Authenticator, grant: str) -> None:
    """user:alice* covers user:alice2, user:* every user's private topic: a token granting
    one is refused outright (HTTP 401 / close 4001), naming the grant."""
    token = jwt.encode(claims(topics=["room:1", grant]), SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match=r"pattern over user: topics") as info:
        await hs.verify(token)
    assert info.value.reason == "bad_grant" and grant in str(info.value)
    # Exact user topics and patterns over other kinds stay allowed.
    ok = jwt.encode(claims(topics=["user:bob", "room:*", "doc:team-1-*"]), SECRET, algorithm="HS256")
    assert (await hs.verify(ok)).user == "alice"


async def test_user_topic_patterns_follow_the_topics_claim_setting() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_topics_claim="grants"))
    assert await reason(auth, jwt.encode(claims(grants=["user:*"]), SECRET)) == "bad_grant"
    assert (await auth.verify(jwt.encode(claims(topics=["user:*"]), SECRET))).user == "alice"


@pytest.mark.parametrize(
    "sub",
    ["alice ", " alice", "alice\u00a0", "cafe\u0301"],
    ids=["trailing-space", "leading-space", "no-break-space", "not-nfc"],
)
async def test_user_ids_that_only_look_like_another_are_refused(hs: Authenticator, sub: str) -> None:
    assert await reason(hs, jwt.encode(claims(sub=sub), SECRET, algorithm="HS256")) == "no_user"


@pytest.mark.parametrize(
    "sub", ["alice", "Alice Smith", "caf\u00e9", "\u0430lice", "\u7528\u6237-7", "42"],
    ids=["ascii", "inner-space", "nfc-accent", "cyrillic-a", "cjk", "digits"],
)  # fmt: skip
async def test_user_ids_accepted_as_the_issuer_wrote_them(hs: Authenticator, sub: str) -> None:
    """NFC text without outer spaces is taken as is, other scripts and mixed scripts included
    (docs/security.md says why look-alikes are not refused)."""
    assert (await hs.verify(jwt.encode(claims(sub=sub), SECRET, algorithm="HS256"))).user == sub


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid(hs: Authenticator, claim: str) -> None:
    token = jwt.encode(claims(**{claim: int(time.time()) + 3600}), SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match=claim) as info:
        await hs.verify(token)
    assert info.value.reason == "not_yet_valid"


async def test_audience() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_audience="gateway"))
    assert (await auth.verify(jwt.encode(claims(aud="gateway"), SECRET, algorithm="HS256"))).user == "alice"
    assert (await auth.verify(jwt.encode(claims(aud=["x", "gateway"]), SECRET))).user == "alice"
    assert await reason(auth, jwt.encode(claims(aud="other"), SECRET)) == "bad_audience"
    assert await reason(auth, jwt.encode(claims(), SECRET)) == "bad_audience"


async def test_audience_not_checked_unless_configured(hs: Authenticator) -> None:
    assert (await hs.verify(jwt.encode(claims(aud="anything"), SECRET))).user == "alice"


async def test_issuer() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_issuer="https://idp.example"))
    assert (await auth.verify(jwt.encode(claims(iss="https://idp.example"), SECRET))).user == "alice"
    assert await reason(auth, jwt.encode(claims(iss="https://evil.example"), SECRET)) == "bad_issuer"
    assert await reason(auth, jwt.encode(claims(), SECRET)) == "bad_issuer"


async def test_forged_signature(hs: Authenticator) -> None:
    other = jwt.encode(claims(), "another-secret-that-is-long-enough-32", algorithm="HS256")
    assert await reason(hs, other) == "bad_signature"
    # A genuine token whose payload was swapped: the signature no longer covers it.
    header, _, signature = mint_token(SECRET, "alice", ttl=60).split(".")
    forged_payload = _b64(json.dumps(claims(sub="admin")).encode())
    assert await reason(hs, f"{header}.{forged_payload}.{signature}") == "bad_signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_rejected(hs: Authenticator, alg: str) -> None:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims()).encode())
    assert await reason(hs, f"{header}.{payload}.") == "algorithm_not_allowed"
    assert await reason(hs, jwt.encode(claims(), "", algorithm="none")) == "algorithm_not_allowed"


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "a.b.c",
        "a.b",
        "!!!.???.***",
        _b64(b"not json") + "." + _b64(b"{}") + ".sig",
        _b64(b"[1,2]") + "." + _b64(b"{}") + ".sig",
        _b64(b'{"alg":"HS256"}') + "." + _b64(b"not json") + ".sig",
        "é.ü.ß",
        "x" * 20000,
    ],
    ids=["one-part", "junk-parts", "two-parts", "bad-base64", "header-not-json", "header-not-object",
         "payload-not-json", "non-ascii", "huge"],
)  # fmt: skip
async def test_garbage_is_malformed(hs: Authenticator, token: str) -> None:
    assert await reason(hs, token) in ("malformed", "bad_signature")
    if "sig" not in token:
        assert await reason(hs, token) == "malformed"


async def test_payload_not_json_with_valid_signature(hs: Authenticator) -> None:
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + _b64(b"not json")
    sig = _b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())
    assert await reason(hs, f"{signing_input}.{sig}") == "malformed"


@pytest.mark.parametrize("token", ["", "   "])
async def test_missing(hs: Authenticator, token: str) -> None:
    assert await reason(hs, token) == "missing"


async def test_tokens_never_logged(hs: Authenticator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = jwt.encode(claims(), "another-secret-that-is-long-enough-32", algorithm="HS256")
    good = mint_token(SECRET, "alice", ttl=60)
    await hs.verify(good)
    await reason(hs, bad)
    for token in (good, bad):
        assert token not in caplog.text
        assert token.split(".")[2] not in caplog.text


# --- JWKS: RS256 / ES256 ------------------------------------------------------------


async def test_rs256_and_es256_from_jwks(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1")]
    auth = jwks_auth(jwks)
    await auth.start()
    try:
        assert jwks.hits == 1
        rs = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
        es = jwt.encode(claims(sub="carol"), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
        assert (await auth.verify(rs)).user == "bob"
        assert (await auth.verify(es)).user == "carol"
        assert jwks.hits == 1, "known keys come from the cache"
    finally:
        await auth.close()


async def test_a_secret_and_a_jwks_url_accept_both_kinds(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "rsa-1")]
    auth = jwks_auth(jwks, jwt_secret=SECRET)
    await auth.start()
    try:
        rs = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
        hs = jwt.encode(claims(sub="ann"), SECRET, algorithm="HS256")
        assert (await auth.verify(rs)).user == "bob"
        assert (await auth.verify(hs)).user == "ann"
    finally:
        await auth.close()


async def test_jwks_forged_signature(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "rsa-1")]
    auth = jwks_auth(jwks)
    await auth.start()
    try:
        # Signed with a key the issuer never published, claiming the published kid.
        forged = jwt.encode(claims(), rsa_key2, algorithm="RS256", headers={"kid": "rsa-1"})
        assert await reason(auth, forged) == "bad_signature"
    finally:
        await auth.close()


async def test_key_rotation_without_restart(
    jwks: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "k1")]
    auth = jwks_auth(jwks, jwks_refresh_interval=0)
    await auth.start()
    try:
        old = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert (await auth.verify(old)).user == "alice"

        # The issuer publishes a new key and signs with it: a refetch finds it.
        jwks.keys = [rsa_jwk(rsa_key, "k1"), rsa_jwk(rsa_key2, "k2")]
        new = jwt.encode(claims(sub="bob"), rsa_key2, algorithm="RS256", headers={"kid": "k2"})
        assert (await auth.verify(new)).user == "bob"
        assert jwks.hits == 2

        # The issuer withdraws k1: after the next refetch k1 tokens are refused.
        jwks.keys = [rsa_jwk(rsa_key2, "k2"), ec_jwk(ec_key, "k3")]
        newest = jwt.encode(claims(sub="carol"), ec_key, algorithm="ES256", headers={"kid": "k3"})
        assert (await auth.verify(newest)).user == "carol"
        assert await reason(auth, old) == "unknown_key"
    finally:
        await auth.close()


async def test_unknown_kid_refetch_is_rate_limited(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "k1")]
    auth = jwks_auth(jwks, jwks_refresh_interval=3600)
    await auth.start()
    try:
        assert jwks.hits == 1
        jwks.keys = [rsa_jwk(rsa_key, "k1"), rsa_jwk(rsa_key2, "k2")]
        token = jwt.encode(claims(), rsa_key2, algorithm="RS256", headers={"kid": "k2"})
        for kid in ("k2", "nope", "k2"):
            forged = jwt.encode(claims(), rsa_key2, algorithm="RS256", headers={"kid": kid})
            assert await reason(auth, forged) == "unknown_key"
        assert await reason(auth, token) == "unknown_key"
        assert jwks.hits == 1, "within the refresh interval an unknown kid must not refetch"
    finally:
        await auth.close()


async def test_concurrent_unknown_kids_share_one_fetch(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "k1")]
    auth = jwks_auth(jwks, jwks_refresh_interval=0)
    await auth.start()
    try:
        jwks.keys = [rsa_jwk(rsa_key, "k1"), rsa_jwk(rsa_key2, "k2")]
        jwks.gate = asyncio.Event()  # hold the refetch until every verifier waits on it
        good = jwt.encode(claims(), rsa_key2, algorithm="RS256", headers={"kid": "k2"})
        bad = jwt.encode(claims(), rsa_key2, algorithm="RS256", headers={"kid": "k9"})
        jwks.requested.clear()
        tasks = [asyncio.create_task(auth.verify(good if i % 2 else bad)) for i in range(20)]
        await jwks.requested.wait()
        jwks.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert jwks.hits == 2, "twenty verifications, one refetch"
        assert [r.user for r in results if isinstance(r, Identity)] == ["alice"] * 10
        assert [r.reason for r in results if isinstance(r, TokenError)] == ["unknown_key"] * 10
    finally:
        await auth.close()


async def test_hs256_signed_with_rsa_public_key_rejected(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Algorithm confusion: the attacker signs HS256 with the published RSA public key as secret."""
    jwks.keys = [rsa_jwk(rsa_key, "k1")]
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    signing_input += "." + _b64(json.dumps(claims(sub="admin")).encode())
    forged = signing_input + "." + _b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())

    jwks_only = jwks_auth(jwks)
    await jwks_only.start()
    try:
        assert await reason(jwks_only, forged) == "algorithm_not_allowed"
    finally:
        await jwks_only.close()

    # With both kinds configured (both accepted by default), HS tokens are checked against the
    # secret only, never a JWKS key.
    both = Authenticator(Settings(jwt_secret=SECRET, jwt_jwks_url=jwks.url))
    await both.start()
    try:
        assert await reason(both, forged) == "bad_signature"
    finally:
        await both.close()


async def test_key_of_wrong_type_for_algorithm(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "rsa-1"), {**ec_jwk(ec_key, "ec-1"), "alg": "ES256"}]
    auth = jwks_auth(jwks, jwt_algorithms=("RS256", "ES256", "ES384"))
    await auth.start()
    try:
        # An ES256 token naming the RSA key, and an ES384 token naming an ES256-only key.
        es = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
        assert await reason(auth, es) == "algorithm_not_allowed"
        es384 = jwt.encode(claims(), ec.generate_private_key(ec.SECP384R1()), algorithm="ES384",
                           headers={"kid": "ec-1"})  # fmt: skip
        assert await reason(auth, es384) == "algorithm_not_allowed"
    finally:
        await auth.close()


async def test_token_without_kid(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.keys = [rsa_jwk(rsa_key, "k1")]
    auth = jwks_auth(jwks, jwks_refresh_interval=3600)
    await auth.start()
    try:
        # With a single published key, a token without kid can only mean that key.
        assert (await auth.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))).user == "alice"
    finally:
        await auth.close()
    jwks.keys = [rsa_jwk(rsa_key, "k1"), rsa_jwk(rsa_key2, "k2")]
    auth = jwks_auth(jwks, jwks_refresh_interval=3600)
    await auth.start()
    try:
        with pytest.raises(TokenError, match="kid") as info:
            await auth.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))
        assert info.value.reason == "unknown_key"
    finally:
        await auth.close()


async def test_jwks_skips_symmetric_and_encryption_keys(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    oct_key = {"kty": "oct", "kid": "oct-1", "k": _b64(SECRET.encode())}
    jwks.keys = [oct_key, {**rsa_jwk(rsa_key, "enc-1"), "use": "enc"}, rsa_jwk(rsa_key, "k1")]
    auth = jwks_auth(jwks, jwt_algorithms=("RS256",), jwks_refresh_interval=3600)
    await auth.start()
    try:
        enc = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "enc-1"})
        assert await reason(auth, enc) == "unknown_key"
        assert (
            await auth.verify(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "k1"}))
        ).user == "alice"
    finally:
        await auth.close()


async def test_jwks_down_at_start(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    jwks.status = 503
    auth = jwks_auth(jwks, jwks_refresh_interval=0)
    await auth.start()  # logs, does not raise: the issuer may come back
    try:
        assert "JWKS fetch" in caplog.text and "503" in caplog.text
        token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        with pytest.raises(TokenError, match="could not be fetched") as info:
            await auth.verify(token)
        assert info.value.reason == "unknown_key"

        jwks.status = 200
        jwks.keys = [rsa_jwk(rsa_key, "k1")]
        assert (await auth.verify(token)).user == "alice"
    finally:
        await auth.close()


async def test_jwks_unreachable_at_start(caplog: pytest.LogCaptureFixture) -> None:
    # A port where nothing listens: the connection is refused at once.
    auth = Authenticator(Settings(jwt_jwks_url="http://127.0.0.1:9/jwks.json"))
    await auth.start()
    await auth.close()
    assert "JWKS fetch from http://127.0.0.1:9/jwks.json failed" in caplog.text
