"""JWT verification: who is on the other end of a connection.

Lifecycle: ``Authenticator(settings)`` checks the configuration (it refuses to be built
without a secret or a JWKS URL); ``await start()`` opens the HTTP client and fetches the
JWKS once; ``await verify(token)`` runs once per connection and once per token refresh;
``await close()`` closes the HTTP client.

Keys: HS256/384/512 tokens are checked with ``GATEWAY_JWT_SECRET`` and nothing else;
RS/PS/ES tokens only with a key from the JWKS, chosen by the token's ``kid``. Which key
verifies a token therefore depends on the token's algorithm *family*, never on its key
material, so an HS256 token "signed" with an RSA public key is checked against the
secret and fails (the classic algorithm-confusion attack).

Rotation: an unknown ``kid`` triggers a refetch of the JWKS (the issuer may have rotated),
at most once per ``GATEWAY_JWKS_REFRESH_INTERVAL``, and every verification waiting for
keys shares the one fetch in flight. Cached keys older than ``JWKS_MAX_AGE`` are refreshed
in the background so a key the issuer withdrew stops being accepted without a restart.

Concurrency: everything runs on one event loop; the only await in ``verify`` is the
JWKS fetch, so an HS256 verification never suspends.

Tokens are never logged: they are credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .config import HMAC_ALGORITHMS, Settings, jwt_algorithms

log = logging.getLogger(__name__)

# Longest token accepted; bigger input is rejected before any parsing work.
MAX_TOKEN_CHARS = 16384
MAX_USER_CHARS = 200
# The latest time a token's exp, nbf or iat may name: 9999-12-31T23:59:59Z. A number beyond it
# is no time an issuer means (2^63, 1e300), and a float that large has lost its seconds.
MAX_NUMERIC_DATE = 253402300799
TIME_CLAIMS = ("exp", "nbf", "iat")
# The JWKS fetch: deadline, largest document read, and the age after which cached keys
# are refreshed in the background (so a withdrawn key stops working within this time).
JWKS_TIMEOUT = 5.0
JWKS_MAX_BYTES = 1 << 20
JWKS_MAX_AGE = 600.0


class Identity:
    """A verified token: the user it names, all its claims and when it runs out."""

    __slots__ = ("_claims", "expires", "user")

    def __init__(self, user: str, claims: Mapping[str, Any], expires: float | None) -> None:
        self.user = user
        # Every connection holds its Identity as long as it lives, and the claims are read
        # only to authorize a subscribe: kept as compact JSON text (one object) rather than a
        # dict of strings, lists and numbers (a dozen objects, ~450 bytes more per connection).
        self._claims = json.dumps(dict(claims), separators=(",", ":"), allow_nan=True)
        self.expires = expires

    @property
    def claims(self) -> Mapping[str, Any]:
        """All the token's claims, decoded anew at each call (read-only)."""
        return MappingProxyType(json.loads(self._claims))

    def __repr__(self) -> str:
        return f"Identity(user={self.user!r}, expires={self.expires!r})"


class TokenError(Exception):
    """A token the gateway does not accept. ``reason`` is a stable code, ``str()`` a sentence."""

    REASONS = frozenset(
        {
            "missing",
            "malformed",
            "expired",
            "not_yet_valid",
            "bad_signature",
            "bad_audience",
            "bad_issuer",
            "unknown_key",
            "algorithm_not_allowed",
            "no_user",
            "bad_grant",
        }
    )

    def __init__(self, reason: str, message: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason


class _Jwk:
    """One usable signature key from the JWKS."""

    __slots__ = ("alg", "key", "kid")

    def __init__(self, kid: str | None, key: Any, alg: str | None) -> None:
        self.kid = kid
        self.key = key  # a cryptography public key object
        self.alg = alg  # the algorithm the JWK declares, if any


def _key_fits(key: Any, alg: str) -> bool:
    """Whether a public key is of the type ``alg`` needs (the curve is checked by PyJWT)."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, RSAPublicKey)
    if alg.startswith("ES"):
        return isinstance(key, EllipticCurvePublicKey)
    if alg == "EdDSA":
        return isinstance(key, Ed25519PublicKey)
    return False


def _parse_jwks(doc: Any) -> dict[str | None, _Jwk]:
    """The usable signature keys of a JWKS document, by kid. Raises ValueError if there are none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('the document is not a JWKS (expected a JSON object with a "keys" list)')
    keys: dict[str | None, _Jwk] = {}
    skipped = 0
    for entry in doc["keys"]:
        # Symmetric keys never belong in a public JWKS, and encryption keys never verify
        # signatures: accepting either would open a confusion attack.
        if (
            not isinstance(entry, dict)
            or entry.get("kty") == "oct"
            or entry.get("use", "sig") != "sig"
            or not isinstance(entry.get("kid", ""), str)
        ):
            skipped += 1
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            skipped += 1
            continue
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        keys[entry.get("kid")] = _Jwk(entry.get("kid"), jwk.key, alg)
    if not keys:
        raise ValueError(f"the JWKS holds no usable signature key ({skipped} skipped)")
    if skipped:
        log.info("JWKS: %d keys skipped (symmetric, not for signatures, or unsupported)", skipped)
    return keys


def _json_kind(value: Any) -> str:
    """What a JSON value is, for an error message that does not repeat the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a number"


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's header, to pick the key. Only a hint: PyJWT parses the token again.

    jwt.get_unverified_header would decode and check all three segments, which doubles
    the cost of an HS256 verification; the header segment alone is enough here, and
    anything this lenient parse lets through is rejected by PyJWT's strict one.
    """
    head, dot, _ = token.partition(".")
    try:
        if not dot or not head:
            raise ValueError
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise TokenError("malformed", "the token is not a JWT (expected header.payload.signature)") from None
    return header


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        algorithms = jwt_algorithms(settings)  # raises ConfigError for unusable JWT settings
        self.algorithms: tuple[str, ...] = algorithms
        self._settings = settings
        self._secret = settings.jwt_secret.encode()
        self._user_claim = settings.jwt_user_claim
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._leeway = settings.jwt_leeway
        self._max_lifetime = settings.max_token_lifetime
        self._topics_claim = settings.jwt_topics_claim
        require = ["exp"]
        if self._audience:
            require.append("aud")
        if self._issuer:
            require.append("iss")
        self._options: jwt.types.Options = {
            "require": require,
            # Without a configured audience/issuer a token's aud/iss are not checked at all
            # (PyJWT would otherwise reject any token that carries an aud).
            "verify_aud": bool(self._audience),
            "verify_iss": bool(self._issuer),
            # The user claim is checked below (it may be an integer; PyJWT wants sub as text).
            "verify_sub": False,
            # exp, nbf and iat are checked below: PyJWT reads them with int(), which takes the
            # string "9999999999" and any huge number (a token that never expires).
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            # A JWKS key below PyJWT's minimum (RSA < 2048 bits) is refused instead of
            # accepted with a warning on every verification.
            "enforce_minimum_key_length": True,
        }
        self._jwt = jwt.PyJWT()
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[str | None, _Jwk] = {}
        self._keys_at = float("-inf")  # monotonic time of the last successful fetch
        self._fetch_at = float("-inf")  # monotonic time of the last fetch attempt
        self._fetch_task: asyncio.Task[None] | None = None
        self.jwks_fetches = 0  # attempts so far, for metrics and tests

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if not self._settings.jwt_jwks_url or self._session is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT))
        task = self._refresh()
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        task, self._fetch_task = self._fetch_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- verification ---------------------------------------------------------------

    async def verify(self, token: str) -> Identity:
        if not isinstance(token, str) or not token.strip():
            raise TokenError("missing", "no token was given")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("malformed", f"the token is longer than {MAX_TOKEN_CHARS} characters")
        if not token.isascii():  # a JWT is base64url and dots; aiohttp maps stray bytes to surrogates
            raise TokenError("malformed", "the token has characters no JWT contains")
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 20 else "?"
            raise TokenError(
                "algorithm_not_allowed",
                f"tokens signed with {shown!r} are not accepted (accepted: {', '.join(self.algorithms)})",
            )
        key: Any
        if alg in HMAC_ALGORITHMS:
            key = self._secret
        else:
            key = await self._public_key(header.get("kid"), alg)
        payload = self._decode(token, key, alg)
        now = time.time()
        exp = self._times(payload, now)
        user = self._user(payload)
        self._check_grants(self._topics_claim, payload.get(self._topics_claim))
        # The publish claim (gateway/authz.py): the same syntax, refused for the same reason.
        self._check_grants("publish", payload.get("publish"))
        return Identity(
            user=user,
            claims=payload,
            # However far away the token's exp is, a connection is only trusted for
            # GATEWAY_MAX_TOKEN_LIFETIME from this verification on; a refresh starts a new period.
            expires=min(exp, now + self._max_lifetime),
        )

    def _times(self, payload: dict[str, Any], now: float) -> float:
        """Check exp, nbf and iat (signature already verified); returns exp.

        RFC 7519 makes them NumericDates: JSON numbers of seconds since 1970, fractions allowed.
        A string, a boolean or a number past MAX_NUMERIC_DATE is refused rather than read as
        some time: an issuer that writes one has a bug, and guessing could mean "never expires".
        """
        for claim in TIME_CLAIMS:
            if claim not in payload:
                continue
            value = payload[claim]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TokenError(
                    "malformed",
                    f"the token's {claim} must be a number of seconds since 1970 (RFC 7519 NumericDate), "
                    f"not {_json_kind(value)}",
                )
            if not (math.isfinite(value) and 0 <= value <= MAX_NUMERIC_DATE):
                raise TokenError(
                    "malformed",
                    f"the token's {claim} is not a time: it must be between 0 and {MAX_NUMERIC_DATE} "
                    "(9999-12-31) seconds since 1970",
                )
        exp = float(payload["exp"])  # required: PyJWT refused a token without it
        if exp <= now - self._leeway:
            raise TokenError("expired", "the token has expired")
        for claim in ("nbf", "iat"):
            if claim in payload and payload[claim] > now + self._leeway:
                raise TokenError(
                    "not_yet_valid", f"the token is not valid yet (its {claim} is in the future)"
                )
        return exp

    def _check_grants(self, claim: str, grants: Any) -> None:
        """Refuse a token whose topics (or publish) claim holds a pattern over users' private topics.

        ``user:alice*`` covers ``user:alice2`` and ``user:*`` every user's own topic: such a
        grant is almost certainly an issuer's mistake, and silently ignoring it would hide that
        mistake while honouring it would leak private topics. Exact ``user:<id>`` grants stay
        allowed (an issuer may deliberately share one user's topic with another).
        """
        if not isinstance(grants, list):
            return  # authz reports a claim that is not a list, and grants nothing from it
        for grant in grants:
            if isinstance(grant, str) and grant.startswith("user:") and "*" in grant:
                # Short enough for a close frame's reason (123 bytes) after "bad token: ".
                raise TokenError(
                    "bad_grant",
                    f"the {claim} claim grants {grant[:40]!r}: a pattern over user: topics "
                    "covers other users' private topics",
                )

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            return self._jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise TokenError("bad_audience", f"the token's aud does not include {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenError("bad_issuer", f"the token's iss is not {self._issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "aud":
                raise TokenError(
                    "bad_audience", f"the token has no aud; expected {self._audience!r}"
                ) from None
            if exc.claim == "iss":
                raise TokenError("bad_issuer", f"the token has no iss; expected {self._issuer!r}") from None
            raise TokenError("malformed", f"the token has no {exc.claim} claim; tokens must expire") from None
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
            # The key does not suit the algorithm (an EC key of another curve) or is too
            # short; PyJWT's message says which, and names no part of the token.
            raise TokenError(
                "algorithm_not_allowed", f"the token's key cannot be used with {alg}: {exc}"
            ) from None
        except jwt.PyJWTError as exc:
            # DecodeError and friends: bad base64, bad JSON, a non-numeric exp... PyJWT's
            # messages describe the structure, never the token's content.
            raise TokenError("malformed", f"the token is malformed: {exc}") from None

    def _user(self, payload: dict[str, Any]) -> str:
        claim = self._user_claim
        value = payload.get(claim)
        # bool is an int subclass, but "true" is no user id.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise TokenError("no_user", f"the token has no {claim} claim naming the user (text or integer)")
        if len(value) > MAX_USER_CHARS:
            raise TokenError("no_user", f"the token's {claim} is longer than {MAX_USER_CHARS} characters")
        if not value.isprintable():
            # Control characters in a user id would end up in logs and presence lists.
            raise TokenError(
                "no_user",
                f"the token's {claim} contains control characters or spaces other than U+0020",
            )
        if value.strip() != value:
            # "alice " would be a second user that looks like alice in every log and presence
            # list; no identity provider means it.
            raise TokenError("no_user", f"the token's {claim} starts or ends with a space")
        if not unicodedata.is_normalized("NFC", value):
            # "é" as one code point and as "e" plus a combining accent look the same but are
            # different strings, so different users. Refused rather than normalised: the
            # gateway's user id must equal the application's own (in `user:<id>` topics, the
            # SQL authorization function, presence), and silently changing it would break that.
            raise TokenError(
                "no_user", f"the token's {claim} is not in Unicode normal form NFC; issue NFC user ids"
            )
        return value

    # --- JWKS -----------------------------------------------------------------------

    async def _public_key(self, kid: Any, alg: str) -> Any:
        jwk = self._lookup(kid)
        if jwk is None:
            task = self._refresh()
            if task is not None:
                # shield: a verifier that gives up (client gone) must not cancel the fetch
                # other verifiers are waiting on.
                await asyncio.shield(task)
                jwk = self._lookup(kid)
            if jwk is None:
                if not self._keys:
                    raise TokenError("unknown_key", "the signing keys could not be fetched; try again later")
                if kid is None:
                    raise TokenError(
                        "unknown_key", "the token has no kid header and the JWKS holds more than one key"
                    )
                raise TokenError("unknown_key", "the token's kid names no key in the JWKS")
        elif time.monotonic() - self._keys_at > JWKS_MAX_AGE:
            self._refresh()  # in the background; this token goes on with the cached key
        if jwk.alg is not None and jwk.alg != alg:
            raise TokenError("algorithm_not_allowed", f"the token's key is for {jwk.alg}, not {alg}")
        if not _key_fits(jwk.key, alg):
            raise TokenError("algorithm_not_allowed", f"the token's key cannot be used with {alg}")
        return jwk.key

    def _lookup(self, kid: Any) -> _Jwk | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if isinstance(kid, str) else None

    def _refresh(self) -> asyncio.Task[None] | None:
        """The JWKS fetch in flight, or a new one if the rate limit allows, else None."""
        if self._fetch_task is not None and not self._fetch_task.done():
            return self._fetch_task
        now = time.monotonic()
        if now - self._fetch_at < self._settings.jwks_refresh_interval or self._session is None:
            return None
        self._fetch_at = now
        self._fetch_task = asyncio.create_task(self._fetch(), name="jwks-fetch")
        return self._fetch_task

    async def _fetch(self) -> None:
        url = self._settings.jwt_jwks_url
        assert self._session is not None
        self.jwks_fetches += 1
        try:
            async with self._session.get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP status {resp.status}")
                body = await resp.content.read(JWKS_MAX_BYTES + 1)
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"the document is larger than {JWKS_MAX_BYTES} bytes")
            keys = _parse_jwks(json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Keep the keys we have: an issuer outage must not log everyone out.
            log.warning(
                "JWKS fetch from %s failed (%s: %s); keeping %d cached keys",
                url,
                type(exc).__name__,
                exc,
                len(self._keys),
            )
            return
        self._keys = keys
        self._keys_at = time.monotonic()
        log.info("JWKS fetched from %s: key ids %s", url, sorted(str(k) for k in keys))


def mint_token(secret: str, user: str, *, ttl: float, topics: list[str] | None = None, **claims: Any) -> str:
    """An HS256 token for ``user`` valid for ``ttl`` seconds (demo and tests)."""
    now = time.time()
    payload: dict[str, Any] = {"sub": user, "iat": int(now), "exp": int(now + ttl)}
    if topics is not None:
        payload["topics"] = list(topics)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")
