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
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
# The JWKS fetch: deadline, largest document read, and the age after which cached keys
# are refreshed in the background (so a withdrawn key stops working within this time).
JWKS_TIMEOUT = 5.0
JWKS_MAX_BYTES = 1 << 20
JWKS_MAX_AGE = 600.0


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: the user it names, all its claims and when it runs out."""

    user: str
    claims: Mapping[str, Any]
    expires: float | None


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
        return Identity(
            user=self._user(payload),
            claims=MappingProxyType(payload),
            expires=float(payload["exp"]),
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
        except jwt.ExpiredSignatureError:
            raise TokenError("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError as exc:
            which = "iat" if "iat" in str(exc) else "nbf"
            raise TokenError(
                "not_yet_valid", f"the token is not valid yet (its {which} is in the future)"
            ) from None
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
            raise TokenError("no_user", f"the token's {claim} contains control characters")
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
