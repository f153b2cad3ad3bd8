"""The ``/_emulator/`` control surface: read counters, inject faults, reproduce incidents.

For tests and demos only. It has NO authentication: never expose an
emulator port beyond localhost or a test network.

======  ==========================================  ==============================================
GET     /_emulator/stats                            counters: tokens_issued, token_requests,
                                                    tokens_by_scope, tokens_by_secret, api_requests,
                                                    api_by_status, revocations, introspections,
                                                    rate_limited, cancelled, in_flight, ...
GET     /_emulator/faults                           the active fault set (remaining counts)
POST    /_emulator/faults                           replace the fault set (``{}`` clears); see faults.py
POST    /_emulator/revoke-all                       revoke every token issued so far
                                                    (optional ``{"client_id": ...}``)
POST    /_emulator/expire-all                       treat every token issued so far as expired
POST    /_emulator/rotate-signing-key               new current key; the previous stays published
GET     /_emulator/clients                          clients, scopes, secrets (hint, last used)
POST    /_emulator/clients/{id}/secrets             ``{"secret": "..."}`` -> 201; a third -> 409
DELETE  /_emulator/clients/{id}/secrets/{secret}    revoke a secret -> 204; unknown -> 404
GET     /_emulator/settings                         ``{"token_ttl", "rate_limit"}``
POST    /_emulator/settings                         change either at run time (rate_limit null = off)
GET     /_emulator/requests                         ``{"requests": [API log], "token_requests": [...]}``
DELETE  /_emulator/requests                         clear both logs
POST    /_emulator/reset                            clear counters, faults, logs and rate windows
======  ==========================================  ==============================================
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.emulator.authserver import STATE_KEY
from proxy.emulator.faults import KNOWN_KNOBS, FaultSpecError, parse_faults
from proxy.emulator.state import EmulatorState, SecretConflict

PREFIX = "/_emulator"


def _error(status: int, error: str, description: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "error_description": description, **extra}, status=status)


class BadControlRequest(Exception):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body counts as ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadControlRequest("the body must be JSON") from None
    if not isinstance(data, dict):
        raise BadControlRequest("the body must be a JSON object")
    return data


def _state(request: web.Request) -> EmulatorState:
    return request.config_dict[STATE_KEY]  # the parent app's state: this is a sub-application


async def stats(request: web.Request) -> web.Response:
    return web.json_response(_state(request).stats())


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(_state(request).faults.as_dict())


async def set_faults(request: web.Request) -> web.Response:
    try:
        faults = parse_faults(await _json_object(request))
    except FaultSpecError as err:
        return _error(400, "invalid_faults", str(err), problems=err.problems, known=list(KNOWN_KNOBS))
    _state(request).faults = faults
    return web.json_response(faults.as_dict())


async def revoke_all(request: web.Request) -> web.Response:
    client_id = (await _json_object(request)).get("client_id")
    return web.json_response({"revoked": _state(request).revoke_all(client_id)})


async def expire_all(request: web.Request) -> web.Response:
    return web.json_response({"expired": _state(request).expire_all()})


async def rotate_signing_key(request: web.Request) -> web.Response:
    keys = _state(request).keys
    current = keys.rotate()
    return web.json_response({"kid": current.kid, "published": [k.kid for k in keys.published()]})


async def list_clients(request: web.Request) -> web.Response:
    return web.json_response({"clients": [c.describe() for c in _state(request).clients.values()]})


async def add_secret(request: web.Request) -> web.Response:
    client = _state(request).clients.get(request.match_info["client_id"])
    if client is None:
        return _error(404, "not_found", "no such client")
    secret = (await _json_object(request)).get("secret")
    if not isinstance(secret, str) or not secret:
        raise BadControlRequest('the body must be {"secret": "<non-empty string>"}')
    try:
        record = client.add_secret(secret, time.time())
    except SecretConflict as err:
        return _error(409, "conflict", str(err))
    return web.json_response({"client_id": client.client_id, "secret": record.describe()}, status=201)


async def delete_secret(request: web.Request) -> web.Response:
    client = _state(request).clients.get(request.match_info["client_id"])
    if client is None or not client.revoke_secret(request.match_info["secret"]):
        return _error(404, "not_found", "no such client or live secret")
    return web.Response(status=204)


async def get_settings(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response({"token_ttl": state.token_ttl, "rate_limit": state.rate_limit})


def _check_settings(body: dict[str, Any]) -> list[str]:
    problems = [
        f"unknown setting {k!r} (known: token_ttl, rate_limit)"
        for k in body
        if k not in ("token_ttl", "rate_limit")
    ]
    ttl = body.get("token_ttl", 1)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
        problems.append("token_ttl: must be a positive integer (seconds)")
    rate = body.get("rate_limit")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 1):
        problems.append("rate_limit: must be a number >= 1 or null (off)")
    return problems


async def set_settings(request: web.Request) -> web.Response:
    body = await _json_object(request)
    if problems := _check_settings(body):
        return _error(400, "invalid_settings", "; ".join(problems), problems=problems)
    state = _state(request)
    if "token_ttl" in body:
        state.token_ttl = body["token_ttl"]
    if "rate_limit" in body:
        state.limiter.rate = body["rate_limit"]
    return await get_settings(request)


async def get_requests(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response({"requests": list(state.request_log), "token_requests": list(state.token_log)})


async def clear_requests(request: web.Request) -> web.Response:
    state = _state(request)
    state.request_log.clear()
    state.token_log.clear()
    return web.Response(status=204)


async def reset(request: web.Request) -> web.Response:
    _state(request).reset()
    return web.Response(status=204)


@web.middleware
async def _bad_request_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadControlRequest as err:
        return _error(400, "invalid_request", err.description)


def control_app() -> web.Application:
    """A sub-application mounted at PREFIX (its own middleware keeps control errors JSON)."""
    app = web.Application(middlewares=[_bad_request_as_json])
    r = app.router
    r.add_get("/stats", stats)
    r.add_get("/faults", get_faults)
    r.add_post("/faults", set_faults)
    r.add_post("/revoke-all", revoke_all)
    r.add_post("/expire-all", expire_all)
    r.add_post("/rotate-signing-key", rotate_signing_key)
    r.add_get("/clients", list_clients)
    r.add_post("/clients/{client_id}/secrets", add_secret)
    r.add_delete("/clients/{client_id}/secrets/{secret}", delete_secret)
    r.add_get("/settings", get_settings)
    r.add_post("/settings", set_settings)
    r.add_get("/requests", get_requests)
    r.add_delete("/requests", clear_requests)
    r.add_post("/reset", reset)
    return app
