"""RFC 6750 bearer-token checks of the partner/v1 API, with the exact challenges Credicorp sends.

* no (Bearer) credentials: 401, ``WWW-Authenticate: Bearer realm="credicorp"`` (no error code)
* more than one Authorization header: 400 ``invalid_request``
* bad, expired, revoked, wrong issuer/audience, unpublished key: 401,
  ``WWW-Authenticate: Bearer error="invalid_token", error_description="..."``
* valid token lacking the route's scope: 403,
  ``WWW-Authenticate: Bearer error="insufficient_scope", scope="<needed>"``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.emulator.issuing import TokenRejected, verify
from proxy.emulator.resources import ApiError
from proxy.emulator.state import EmulatorState, IssuedToken

API_AUDIENCE = "partner/v1"
REALM_CHALLENGE = 'Bearer realm="credicorp"'


def invalid_token(description: str) -> ApiError:
    challenge = f'Bearer error="invalid_token", error_description="{description}"'
    return ApiError(401, "invalid_token", description, headers={"WWW-Authenticate": challenge})


def insufficient_scope(scope: str) -> ApiError:
    challenge = f'Bearer error="insufficient_scope", scope="{scope}"'
    return ApiError(
        403,
        "insufficient_scope",
        f"The request requires scope {scope}",
        headers={"WWW-Authenticate": challenge},
        extra={"scope": scope},
    )


@dataclass(slots=True)
class BearerCheck:
    """The outcome of looking at a request's Authorization headers (computed before routing)."""

    count: int
    scheme: str | None = None
    record: IssuedToken | None = None
    error: ApiError | None = None

    def log(self) -> dict[str, Any]:
        """The request-log view of the credentials: who and what, never the token."""
        r = self.record
        return {
            "present": self.count > 0,
            "count": self.count,
            "scheme": self.scheme,
            "valid": self.error is None,
            "client_id": r.client_id if r else None,
            "scope": r.scope if r else None,
            "jti": r.jti if r else None,
            "error": self.error.description if self.error else None,
        }


def check_bearer(request: web.Request, state: EmulatorState, issuer: str) -> BearerCheck:
    values = request.headers.getall("Authorization", [])
    if not values:
        return BearerCheck(0, error=_missing())
    if len(values) > 1:
        error = ApiError(
            400,
            "invalid_request",
            "more than one Authorization header",
            headers={"WWW-Authenticate": 'Bearer error="invalid_request"'},
        )
        return BearerCheck(len(values), error=error)
    scheme, _, credentials = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return BearerCheck(1, scheme, error=_missing())
    token = credentials.strip()
    if not token:
        return BearerCheck(1, scheme, error=invalid_token("The access token is malformed"))
    try:
        return BearerCheck(1, scheme, verify(state, token, issuer, API_AUDIENCE))
    except TokenRejected as rejected:
        return BearerCheck(1, scheme, rejected.record, invalid_token(rejected.description))


def _missing() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "A bearer access token is required",
        headers={"WWW-Authenticate": REALM_CHALLENGE},
    )
