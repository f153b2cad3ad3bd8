"""The emulated partner/v1 API: its route -> scope table and the request dispatcher.

``API_ROUTES`` is the single statement of which scope each partner/v1
operation needs; the proxy's shipped route table is tested against it. The
dispatcher sees every request that is not for the authorization server or the
control surface, matches the *raw* request path (no normalisation: a ``..``
or ``%2F`` never matches a route), logs it (see ``requestlog``), applies
injected faults, then checks the bearer token and the route's scope before
calling the resource handler. Order of refusals: 404/405, 401/400 (token),
403 (scope).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.emulator import res_apply as ap
from proxy.emulator import res_money as mo
from proxy.emulator import res_platform as pf
from proxy.emulator.authserver import STATE_KEY, issuer_of
from proxy.emulator.bearer import check_bearer, insufficient_scope, invalid_token
from proxy.emulator.faults import delay, drop_after_headers, drop_before_headers
from proxy.emulator.requestlog import consume_body, new_entry, split_target
from proxy.emulator.resources import ApiContext, ApiError, Handler
from proxy.emulator.state import EmulatorState
from proxy.emulator.streams import get_statement, statement_bytes, statement_gzip_bytes

__all__ = ["API_ROUTES", "ApiRoute", "handle_api", "match_route", "statement_bytes", "statement_gzip_bytes"]

#: What a ``{param}`` segment may be: an id, never ``.``/``..``, percent-escapes or empty.
PARAM_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_-]*"
ENTRY_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("credicorp_emulator_log_entry", dict)


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """One partner/v1 operation: method, path template and the one scope it needs."""

    method: str
    path: str
    scope: str
    handler: Handler = field(compare=False, repr=False)
    #: Uploads are hashed while streaming and never kept; other write bodies are parsed as JSON.
    streams_body: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        return _PATTERNS[self.path]


def _route(method: str, path: str, scope: str, handler: Handler, streams_body: bool = False) -> ApiRoute:
    return ApiRoute(method, "/partner/v1" + path, scope, handler, streams_body)


API_ROUTES: tuple[ApiRoute, ...] = (
    _route("GET", "/applications", "applications:read", ap.list_applications),
    _route("GET", "/applications/{id}", "applications:read", ap.get_application),
    _route("GET", "/applications/{id}/handoff", "applications:read", ap.get_handoff),
    _route("POST", "/applications", "applications:write", ap.create_application),
    _route("PATCH", "/applications/{id}", "applications:write", ap.patch_application),
    _route("POST", "/applications/{id}/submit", "applications:write", ap.submit_application),
    _route(
        "POST", "/applications/{id}/documents", "applications:write", ap.upload_document, streams_body=True
    ),
    _route("GET", "/decisions", "decisions:read", ap.list_decisions),
    _route("GET", "/decisions/{id}", "decisions:read", ap.get_decision),
    _route("GET", "/payments", "payments:read", mo.list_payments),
    _route("GET", "/payments/{id}", "payments:read", mo.get_payment),
    _route("GET", "/payments/links/{id}", "payments:read", mo.get_payment_link),
    _route("GET", "/payments/mandates/{id}", "payments:read", mo.get_mandate),
    _route("GET", "/payments/reconciliation", "payments:read", mo.get_reconciliation),
    _route("POST", "/payments/links", "payments:write", mo.create_payment_link),
    _route("POST", "/payments/schedules", "payments:write", mo.create_schedule),
    _route("POST", "/payments/disbursements", "payments:write", mo.create_disbursement),
    _route("GET", "/identity/verifications/{id}", "identity:read", pf.get_verification),
    _route("GET", "/identity/companies/{company_number}/directors", "identity:read", pf.list_directors),
    _route("GET", "/accounts", "accounts:read", mo.list_accounts),
    _route("GET", "/accounts/{id}", "accounts:read", mo.get_account),
    _route("GET", "/accounts/{id}/events", "accounts:read", mo.list_account_events),
    _route("GET", "/accounts/{id}/statement", "accounts:read", get_statement),
    _route("POST", "/accounts/{id}/settlement-quotes", "accounts:write", mo.create_settlement_quote),
    _route("POST", "/accounts/{id}/servicing-requests", "accounts:write", mo.create_servicing_request),
    _route("GET", "/webhooks", "webhooks:manage", pf.list_webhooks),
    _route("POST", "/webhooks", "webhooks:manage", pf.create_webhook),
    _route("GET", "/webhooks/{id}", "webhooks:manage", pf.get_webhook),
    _route("DELETE", "/webhooks/{id}", "webhooks:manage", pf.delete_webhook),
    _route("POST", "/webhooks/{id}/rotate-secret", "webhooks:manage", pf.rotate_webhook_secret),
    _route("GET", "/partner/introductions", "partner:manage", pf.list_introductions),
    _route("POST", "/partner/introductions", "partner:manage", pf.create_introduction),
    _route("GET", "/partner/introductions/{id}", "partner:manage", pf.get_introduction),
    _route("GET", "/partner/payouts", "partner:manage", pf.list_payouts),
    _route("POST", "/partner/payouts", "partner:manage", pf.create_payout),
    _route("GET", "/partner/sub-accounts", "partner:manage", pf.list_sub_accounts),
    _route("POST", "/partner/sub-accounts", "partner:manage", pf.create_sub_account),
    _route("GET", "/partner/sub-accounts/{id}", "partner:manage", pf.get_sub_account),
    _route("PATCH", "/partner/sub-accounts/{id}", "partner:manage", pf.patch_sub_account),
    _route("GET", "/partner/white-label", "partner:manage", pf.get_white_label),
    _route("PUT", "/partner/white-label", "partner:manage", pf.put_white_label),
)


def _compile(template: str) -> re.Pattern[str]:
    parts = [
        f"(?P<{seg[1:-1]}>{PARAM_SEGMENT})" if seg.startswith("{") else re.escape(seg)
        for seg in template.split("/")
    ]
    return re.compile("/".join(parts))


_PATTERNS = {r.path: _compile(r.path) for r in API_ROUTES}


def _specificity(route: ApiRoute) -> int:
    """Literal segments win over parameters: ``/payments/reconciliation`` beats ``/payments/{id}``."""
    return sum(1 for seg in route.path.split("/") if not seg.startswith("{"))


def match_route(method: str, raw_path: str) -> tuple[ApiRoute | None, dict[str, str], list[str]]:
    """(route, path params, methods allowed on this path); route None = 404 or (if allowed) 405."""
    found = [(r, m) for r in API_ROUTES if (m := r.pattern.fullmatch(raw_path))]
    allowed = sorted({r.method for r, _ in found})
    candidates = [(r, m) for r, m in found if r.method == method]
    if not candidates:
        return None, {}, allowed
    route, m = max(candidates, key=lambda rm: _specificity(rm[0]))
    return route, m.groupdict(), allowed


def record_status(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: the log gets the status before any byte is sent."""
    entry = request.get(ENTRY_KEY)
    if entry is not None and "dropped" not in entry:
        entry["status"] = response.status
        request.app[STATE_KEY].counters.api_by_status[str(response.status)] += 1


async def _injected_fault(
    request: web.Request, state: EmulatorState, entry: dict[str, Any]
) -> web.StreamResponse | None:
    faults = state.faults
    await delay(faults.api_latency_ms)
    if mode := faults.take_api_drop():
        state.counters.faults_injected += 1
        entry["dropped"] = mode
        state.counters.api_by_status["dropped"] += 1
        if mode == "before_headers":
            return drop_before_headers(request)
        return await drop_after_headers(request, "application/json")
    if (status := faults.take_api_status()) is None:
        return None
    state.counters.faults_injected += 1
    if faults.api_body is not None:
        headers = CIMultiDict({"Content-Type": "application/json"})
        headers.update(faults.api_headers)  # sent exactly as configured
        return web.Response(status=status, body=faults.api_body.encode(), headers=headers)
    error = (
        invalid_token("injected fault")
        if status == 401
        else ApiError(status, "injected_fault", f"injected {status}")
    )
    response = error.response()
    response.headers.update(faults.api_headers)
    return response


async def _dispatch(request: web.Request, state: EmulatorState, entry: dict[str, Any]) -> web.StreamResponse:
    issuer = issuer_of(request)
    route, params, allowed = match_route(request.method, split_target(request)[0])
    entry["route"] = route.path if route else None
    bearer = check_bearer(request, state, issuer)
    entry["auth"] = bearer.log()
    body = await consume_body(request, entry, retain=route is not None and not route.streams_body)
    if (faulted := await _injected_fault(request, state, entry)) is not None:
        return faulted
    if route is None and allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here",
            headers={"Allow": ", ".join(allowed)},
        )
    if route is None:
        raise ApiError(404, "not_found", "no such partner/v1 resource")
    if bearer.error is not None or bearer.record is None:
        raise bearer.error or invalid_token("The access token is invalid")
    if route.scope not in bearer.record.scopes:
        raise insufficient_scope(route.scope)
    ctx = ApiContext(
        request, state, params, issuer, bearer.record, body, entry["body_size"], entry["body_sha256"]
    )
    return await route.handler(ctx)


async def handle_api(request: web.Request) -> web.StreamResponse:
    """Entry point for every API request: count, log, dispatch, turn ApiError into JSON."""
    state = request.app[STATE_KEY]
    entry = new_entry(request)
    request[ENTRY_KEY] = entry
    state.request_log.append(entry)
    state.counters.api_requests += 1
    state.in_flight += 1
    try:
        return await _dispatch(request, state, entry)
    except ApiError as err:
        return err.response()
    except asyncio.CancelledError:  # the client went away and aiohttp cancelled the handler
        state.counters.cancelled += 1
        entry["status"] = "cancelled"
        raise
    finally:
        state.in_flight -= 1
