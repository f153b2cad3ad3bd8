"""The emulated authorization server: discovery, JWKS, token, revoke, introspect.

Behaviour follows the Credicorp OAuth 2.0 page (``shared/seeds``):
client-credentials only; ``client_secret_post`` or ``client_secret_basic``;
``scope`` optional (the client's full granted set when omitted); ``audience``
optional (``partner/v1``); errors ``invalid_request`` (400),
``unsupported_grant_type`` (400), ``invalid_client`` (401, with a Basic
challenge when Basic was used), ``invalid_scope`` (400, unknown or not
granted), ``temporarily_unavailable`` (503). An audience the client is not
provisioned for is ``invalid_request``. Every provisioned client may make
``rate_limit`` token requests per sliding second (counted by the client id
the request claims, before authentication; refused requests do not count);
more get 429 ``slow_down`` with ``Retry-After``. The OIDC sign-in flow is not emulated:
``/oauth/authorize`` only answers ``unsupported_response_type``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from aiohttp import web

from proxy.emulator.clientauth import (
    NO_STORE,
    OAuthError,
    authenticate,
    claimed_client_id,
    invalid_request,
    parse_form,
    read_body,
)
from proxy.emulator.faults import delay, drop_after_headers, drop_before_headers
from proxy.emulator.issuing import TokenRejected, mint, verify
from proxy.emulator.state import EmulatorState
from proxy.scopes import DEFAULT_AUDIENCE, KNOWN_SCOPES

STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("credicorp_emulator_state", EmulatorState)
AUTH_METHODS = ["client_secret_post", "client_secret_basic"]


def issuer_of(request: web.Request) -> str:
    return request.app[STATE_KEY].issuer_for(request.scheme, request.host)


async def discovery(request: web.Request) -> web.Response:
    """The OIDC discovery document, every endpoint under this emulator's issuer."""
    iss = issuer_of(request)
    return web.json_response(
        {
            "issuer": iss,
            "authorization_endpoint": f"{iss}/oauth/authorize",
            "token_endpoint": f"{iss}/oauth/token",
            "jwks_uri": f"{iss}/.well-known/jwks.json",
            "revocation_endpoint": f"{iss}/oauth/revoke",
            "introspection_endpoint": f"{iss}/oauth/introspect",
            "response_types_supported": ["code"],
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": AUTH_METHODS,
            "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
            "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
            "scopes_supported": sorted(KNOWN_SCOPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "code_challenge_methods_supported": ["S256"],
        }
    )


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].keys.jwks(), headers={"Cache-Control": "max-age=60"})


async def authorize(request: web.Request) -> web.Response:
    return OAuthError(
        400, "unsupported_response_type", "the emulator does not implement OIDC sign-in"
    ).response()


def _scopes(form: dict[str, str], granted: frozenset[str]) -> tuple[str, ...]:
    """The scope set to mint: requested (must be known and granted) or the full granted set."""
    raw = form.get("scope")
    if raw is None:
        return tuple(sorted(granted))
    requested = {s for s in raw.split(" ") if s}
    if not requested:
        raise OAuthError(400, "invalid_scope", "scope is empty")
    if unknown := sorted(requested - KNOWN_SCOPES):
        raise OAuthError(400, "invalid_scope", f"unknown scope: {' '.join(unknown)}")
    if missing := sorted(requested - granted):
        raise OAuthError(400, "invalid_scope", f"scope not granted to this client: {' '.join(missing)}")
    return tuple(sorted(requested))


def _issue(
    request: web.Request, state: EmulatorState, form: dict[str, str], entry: dict[str, Any]
) -> web.Response:
    """Validate a parsed token request and mint; raises OAuthError for every refusal."""
    if "grant_type" not in form or not form["grant_type"]:
        raise invalid_request("grant_type is required")
    auth = authenticate(request, state, form)
    entry.update(client_id=auth.client.client_id, auth_method=auth.method)
    if form["grant_type"] != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type", f"grant_type {form['grant_type']} is not supported")
    audience = form.get("audience") or DEFAULT_AUDIENCE
    entry.update(audience=audience, scope_requested=form.get("scope"))
    if audience not in auth.client.audiences:
        raise invalid_request(f"the client is not provisioned for audience {audience}")
    scopes = _scopes(form, auth.client.scopes)
    token, record = mint(state, auth.client, auth.secret, scopes, audience, issuer_of(request))
    entry["scope"] = record.scope
    body = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": state.token_ttl,
        "scope": record.scope,
    }
    return web.json_response(body, headers=NO_STORE)


def _injected(status: int, body: str | None, retry_after: int | None) -> web.Response:
    """The response for a ``token_status``/``token_body`` fault."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if body is not None:
        return web.Response(status=status, text=body, content_type="application/json", headers=headers)
    if status == 500:
        return web.Response(status=500, text="Internal Server Error", headers=headers)
    if status == 429:
        headers.setdefault("Retry-After", "1")
        return OAuthError(429, "slow_down", "injected rate limit", headers).response()
    if status == 503:
        return OAuthError(503, "temporarily_unavailable", "injected outage", headers).response()
    error = {400: "invalid_request", 401: "invalid_client"}.get(status, "server_error")
    return OAuthError(status, error, f"injected {status}", headers).response()


async def _token_flow(
    request: web.Request, state: EmulatorState, entry: dict[str, Any]
) -> web.StreamResponse:
    """Latency, rate limit, faults, then the real grant, in the order a client would see them."""
    faults = state.faults
    await delay(faults.token_latency_ms)
    raw = await read_body(request)
    claimed = claimed_client_id(request, raw)
    entry["client_id"] = claimed
    # only provisioned clients have a bucket, so made-up ids cannot grow the limiter's memory
    if claimed in state.clients and (wait := state.limiter.admit(claimed, time.monotonic())) is not None:
        state.counters.rate_limited += 1
        retry = str(max(1, math.ceil(wait)))
        raise OAuthError(429, "slow_down", "token endpoint rate limit exceeded", {"Retry-After": retry})
    if mode := faults.take_token_drop():
        state.counters.faults_injected += 1
        entry["dropped"] = mode
        if mode == "before_headers":
            return drop_before_headers(request)
        return await drop_after_headers(request, "application/json")
    if injected := faults.take_token_status():
        state.counters.faults_injected += 1
        return _injected(*injected, faults.token_retry_after)
    return _issue(request, state, parse_form(request, raw), entry)


async def token(request: web.Request) -> web.StreamResponse:
    """``POST /oauth/token``: every request is counted and logged (never its secret)."""
    state = request.app[STATE_KEY]
    state.counters.token_requests += 1
    entry: dict[str, Any] = {
        "time": time.time(),
        "client_id": None,
        "auth_method": None,
        "audience": None,
        "scope_requested": None,
        "scope": None,
        "status": None,
        "error": None,
    }
    state.token_log.append(entry)
    state.in_flight += 1
    try:
        try:
            response = await _token_flow(request, state, entry)
        except asyncio.CancelledError:
            state.counters.cancelled += 1
            entry["status"] = "cancelled"
            raise
        except OAuthError as err:
            state.counters.token_errors[err.error] += 1
            entry["error"] = err.error
            response = err.response()
        if "dropped" not in entry:
            entry["status"] = response.status
        return response
    finally:
        state.in_flight -= 1


async def _client_form(request: web.Request) -> tuple[EmulatorState, dict[str, str], str]:
    """Parse and authenticate a revoke/introspect request; returns (state, form, client_id)."""
    state = request.app[STATE_KEY]
    form = parse_form(request, await read_body(request))
    client = authenticate(request, state, form).client
    if not form.get("token"):
        raise invalid_request("token is required")
    return state, form, client.client_id


async def revoke(request: web.Request) -> web.Response:
    """RFC 7009: 200 whether or not the token was known; only the owner's tokens are revoked."""
    try:
        state, form, client_id = await _client_form(request)
    except OAuthError as err:
        return err.response()
    state.counters.revocations += 1
    record = state.lookup(form["token"])
    if record is not None and record.client_id == client_id:
        record.revoked = True
    return web.Response(status=200, headers=NO_STORE)


async def introspect(request: web.Request) -> web.Response:
    """RFC 7662: ``{"active": false}`` for anything not valid or not the caller's own."""
    try:
        state, form, client_id = await _client_form(request)
    except OAuthError as err:
        return err.response()
    state.counters.introspections += 1
    try:
        record = verify(state, form["token"], issuer_of(request), audience=None)
    except TokenRejected:
        record = None
    if record is None or record.client_id != client_id:
        return web.json_response({"active": False}, headers=NO_STORE)
    return web.json_response(
        {
            "active": True,
            "scope": record.scope,
            "client_id": record.client_id,
            "sub": record.client_id,
            "aud": record.audience,
            "iss": record.issuer,
            "exp": record.exp,
            "iat": record.iat,
            "nbf": record.iat,
            "jti": record.jti,
            "token_type": "Bearer",
        },
        headers=NO_STORE,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/oauth/authorize", authorize)
    app.router.add_post("/oauth/token", token)
    app.router.add_post("/oauth/revoke", revoke)
    app.router.add_post("/oauth/introspect", introspect)
