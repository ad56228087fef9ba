"""Bearer tokens: HS256 JWTs carrying `sub` and `org_id` (Supabase-compatible secret), and a
`role` that makes an operator of the bearer."""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass

import jwt

from heimdex.errors import HeimdexError
from heimdex.storable import text_problem

ALGORITHM = "HS256"
SUB_MAX = 255
# Operators see (and the admin acts on) every org's jobs through /ops and the dashboard.
ADMIN_ROLE = "heimdex_admin"
READONLY_ROLE = "heimdex_operator_readonly"
OPERATOR_ROLES = frozenset({ADMIN_ROLE, READONLY_ROLE})


class AuthenticationFailed(HeimdexError):
    """Missing, malformed, expired or wrongly signed credentials."""


class Forbidden(HeimdexError):
    """Authenticated, but the token's role does not allow this."""


# Where the request guard (app.py) leaves the principal it decoded, in the ASGI scope's "state".
PRINCIPAL_KEY = "heimdex_principal"


@dataclass(frozen=True)
class Principal:
    sub: str
    org_id: uuid.UUID
    role: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.role in OPERATOR_ROLES

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN_ROLE


def require_operator(principal: Principal, *, act: bool = False) -> Principal:
    """`principal` if its role may read (any operator role) or, with `act`, change jobs of
    every org (the admin role only); `Forbidden` otherwise."""
    if act and not principal.is_admin:
        raise Forbidden(
            f"this needs the {ADMIN_ROLE} role in the token"
            + (f" (it has {principal.role})" if principal.role else "")
        )
    if not principal.is_operator:
        raise Forbidden(
            f"operator endpoints need the {ADMIN_ROLE} or {READONLY_ROLE} role in the token"
        )
    return principal


def decode_token(token: str, secret: str) -> Principal:
    """The principal of a valid token; `AuthenticationFailed` saying why otherwise.

    A client sends the same token with every request, so a token that verified once is
    remembered (`_verified`, bounded) and only its expiry is checked again: verifying the
    signature and claims costs more CPU than the rest of a job submission's Python. Failures
    are never remembered (an exception is not cached).
    """
    principal, expires = _verified(token, secret)
    if expires is not None and expires <= time.time():
        raise AuthenticationFailed("the bearer token has expired")
    return principal


@functools.lru_cache(maxsize=4096)
def _verified(token: str, secret: str) -> tuple[Principal, float | None]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub"], "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationFailed("the bearer token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthenticationFailed(f"the bearer token is invalid: {exc}") from None
    sub = claims["sub"]
    # `sub` is stored as text (requested_by) and shown on pages.
    if not isinstance(sub, str) or not 1 <= len(sub) <= SUB_MAX or text_problem(sub):
        raise AuthenticationFailed(
            f"the bearer token's sub claim must be a string of 1 to {SUB_MAX} characters"
            " without NUL bytes or lone surrogates"
        )
    raw_org = claims.get("org_id")
    if not isinstance(raw_org, str):
        raise AuthenticationFailed("the bearer token has no org_id claim")
    try:
        org_id = uuid.UUID(raw_org)
    except ValueError:
        raise AuthenticationFailed("the bearer token's org_id claim is not a UUID") from None
    role = claims.get("role")
    exp = claims.get("exp")  # PyJWT checked it is a number when present
    return (
        Principal(sub=sub, org_id=org_id, role=role if isinstance(role, str) else None),
        float(exp) if exp is not None else None,
    )


def bearer(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed("missing Authorization header (Authorization: Bearer <JWT>)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


def issue_token(
    secret: str,
    *,
    org_id: uuid.UUID,
    sub: str = "dev-user",
    ttl_seconds: int = 24 * 3600,
    role: str = "authenticated",
) -> str:
    """A signed token for local use (`heimdex dev-token`) and tests."""
    now = int(time.time())
    claims = {
        "sub": sub,
        "org_id": str(org_id),
        "role": role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
