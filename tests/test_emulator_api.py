"""The partner/v1 API: bearer checks, scope enforcement, routing on the raw path, resources."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.emulator.api import API_ROUTES, match_route
from proxy.emulator.app import EmulatorServer
from proxy.emulator.testing import EmulatorClient
from proxy.scopes import PARTNER_SCOPES

DECISION = "/partner/v1/decisions/dec_demo_001"
ALL = " ".join(sorted(PARTNER_SCOPES))

#: A concrete request per route (paths without the /partner/v1 prefix) that succeeds on a fresh emulator.
EXAMPLES: dict[tuple[str, str], tuple[str, Any, int]] = {
    ("GET", "/applications"): ("/applications", None, 200),
    ("GET", "/applications/{id}"): ("/applications/app_demo_001", None, 200),
    ("GET", "/applications/{id}/handoff"): ("/applications/app_demo_001/handoff", None, 200),
    ("POST", "/applications"): (
        "/applications",
        {"company_number": "12345678", "amount": 20000, "term_months": 6},
        201,
    ),
    ("PATCH", "/applications/{id}"): ("/applications/{draft}", {"amount": 30000}, 200),
    ("POST", "/applications/{id}/submit"): ("/applications/{draft}/submit", None, 201),
    ("POST", "/applications/{id}/documents"): ("/applications/app_demo_001/documents", b"%PDF-1.7 demo", 201),
    ("GET", "/decisions"): ("/decisions", None, 200),
    ("GET", "/decisions/{id}"): ("/decisions/dec_demo_001", None, 200),
    ("GET", "/payments"): ("/payments", None, 200),
    ("GET", "/payments/{id}"): ("/payments/pay_demo_001", None, 200),
    ("GET", "/payments/links/{id}"): ("/payments/links/plk_demo_001", None, 200),
    ("GET", "/payments/mandates/{id}"): ("/payments/mandates/mdt_demo_001", None, 200),
    ("GET", "/payments/reconciliation"): ("/payments/reconciliation", None, 200),
    ("POST", "/payments/links"): ("/payments/links", {"amount": 120.5, "reference": "INV-1"}, 201),
    ("POST", "/payments/schedules"): (
        "/payments/schedules",
        {"mandate_id": "mdt_demo_001", "amount": 100, "frequency": "monthly", "start_date": "2026-04-01"},
        201,
    ),
    ("POST", "/payments/disbursements"): (
        "/payments/disbursements",
        {"account_id": "acc_demo_001", "amount": 1000},
        201,
    ),
    ("GET", "/identity/verifications/{id}"): ("/identity/verifications/idv_demo_001", None, 200),
    ("GET", "/identity/companies/{company_number}/directors"): (
        "/identity/companies/12345678/directors",
        None,
        200,
    ),
    ("GET", "/accounts"): ("/accounts", None, 200),
    ("GET", "/accounts/{id}"): ("/accounts/acc_demo_001", None, 200),
    ("GET", "/accounts/{id}/events"): ("/accounts/acc_demo_001/events", None, 200),
    ("GET", "/accounts/{id}/statement"): ("/accounts/acc_demo_001/statement", None, 200),
    ("POST", "/accounts/{id}/settlement-quotes"): ("/accounts/acc_demo_001/settlement-quotes", {}, 201),
    ("POST", "/accounts/{id}/servicing-requests"): (
        "/accounts/acc_demo_001/servicing-requests",
        {"type": "payment_holiday"},
        201,
    ),
    ("GET", "/webhooks"): ("/webhooks", None, 200),
    ("POST", "/webhooks"): ("/webhooks", {"url": "https://x.example/h", "events": ["decision.created"]}, 201),
    ("GET", "/webhooks/{id}"): ("/webhooks/whk_demo_001", None, 200),
    ("DELETE", "/webhooks/{id}"): ("/webhooks/{hook}", None, 204),
    ("POST", "/webhooks/{id}/rotate-secret"): ("/webhooks/whk_demo_001/rotate-secret", None, 200),
    ("GET", "/partner/introductions"): ("/partner/introductions", None, 200),
    ("POST", "/partner/introductions"): (
        "/partner/introductions",
        {"company_name": "Acme Ltd", "contact_email": "a@acme.example"},
        201,
    ),
    ("GET", "/partner/introductions/{id}"): ("/partner/introductions/int_demo_001", None, 200),
    ("GET", "/partner/payouts"): ("/partner/payouts", None, 200),
    ("POST", "/partner/payouts"): ("/partner/payouts", {"amount": 10, "period": "2026-02"}, 201),
    ("GET", "/partner/sub-accounts"): ("/partner/sub-accounts", None, 200),
    ("POST", "/partner/sub-accounts"): ("/partner/sub-accounts", {"name": "South"}, 201),
    ("GET", "/partner/sub-accounts/{id}"): ("/partner/sub-accounts/sub_demo_001", None, 200),
    ("PATCH", "/partner/sub-accounts/{id}"): (
        "/partner/sub-accounts/sub_demo_001",
        {"status": "suspended"},
        200,
    ),
    ("GET", "/partner/white-label"): ("/partner/white-label", None, 200),
    ("PUT", "/partner/white-label"): ("/partner/white-label", {"brand_name": "Acme"}, 200),
}


@pytest.fixture
async def unlimited(make_emulator) -> AsyncIterator[EmulatorClient]:
    """An emulator without the token rate limit, for tests that mint many scope sets."""
    emu = await make_emulator(rate_limit=None)
    async with aiohttp.ClientSession() as session:
        yield EmulatorClient(session, emu.url)


async def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side URL normalisation); (status, whole response)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(data.split(b" ", 2)[1]), data


def test_route_table_covers_every_partner_scope_and_is_unique():
    assert {r.scope for r in API_ROUTES} == PARTNER_SCOPES
    keys = [(r.method, r.path) for r in API_ROUTES]
    assert len(keys) == len(set(keys)) == len(EXAMPLES) == 41
    assert {(m, "/partner/v1" + p) for m, p in EXAMPLES} == set(keys)


def test_literal_segments_win_over_parameters():
    route, params, _ = match_route("GET", "/partner/v1/payments/reconciliation")
    assert route is not None and route.path.endswith("/reconciliation") and params == {}
    route, params, _ = match_route("GET", "/partner/v1/payments/pay_1")
    assert route is not None and params == {"id": "pay_1"}
    assert match_route("DELETE", "/partner/v1/payments/links") == (None, {}, ["GET", "POST"])


async def test_sample_data_answers_200(emu_client: EmulatorClient):
    token = await emu_client.mint()
    for path in ("/partner/v1/applications/app_demo_001", DECISION, "/partner/v1/accounts/acc_demo_001"):
        status, _, body = await emu_client.api("GET", path, token)
        assert status == 200 and body["id"] == path.rsplit("/", 1)[1]


async def test_every_route_works_with_exactly_its_scope_and_only_with_it(unlimited: EmulatorClient):
    only = {s: await unlimited.mint(s) for s in PARTNER_SCOPES}
    without = {s: await unlimited.mint(" ".join(sorted(PARTNER_SCOPES - {s}))) for s in PARTNER_SCOPES}
    _, _, draft = await unlimited.api(
        "POST",
        "/partner/v1/applications",
        only["applications:write"],
        json={"company_number": "1", "amount": 5, "term_months": 3},
    )
    _, _, hook = await unlimited.api(
        "POST",
        "/partner/v1/webhooks",
        only["webhooks:manage"],
        json={"url": "https://x.example", "events": []},
    )
    for route in API_ROUTES:
        path, body, expected = EXAMPLES[(route.method, route.path.removeprefix("/partner/v1"))]
        path = "/partner/v1" + path.format(draft=draft["id"], hook=hook["id"])
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        status, headers, _ = await unlimited.api(route.method, path, without[route.scope], **kwargs)
        assert status == 403, route
        assert headers["WWW-Authenticate"] == f'Bearer error="insufficient_scope", scope="{route.scope}"'
        status, _, answer = await unlimited.api(route.method, path, only[route.scope], **kwargs)
        assert status == expected, (route, answer)


async def test_missing_token_gets_a_bare_realm_challenge(emu_client: EmulatorClient):
    for headers in ({}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        status, resp_headers, body = await emu_client.api("GET", DECISION, headers=headers)
        assert status == 401 and body["error"] == "unauthorized"
        assert resp_headers["WWW-Authenticate"] == 'Bearer realm="credicorp"'


@pytest.mark.parametrize(
    ("token", "description"),
    [
        ("not.a.jwt", "The access token is malformed"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "The access token is not signed by a published key"),
    ],
)
async def test_bad_tokens_get_invalid_token_challenge(emu_client: EmulatorClient, token, description):
    status, headers, body = await emu_client.api("GET", DECISION, token)
    assert (status, body["error"], body["error_description"]) == (401, "invalid_token", description)
    assert headers["WWW-Authenticate"] == f'Bearer error="invalid_token", error_description="{description}"'


async def test_tampered_signature_is_invalid_token(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"
    status, headers, _ = await emu_client.api("GET", DECISION, forged)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_token_from_another_issuer_url_is_rejected(
    emulator: EmulatorServer, emu_client: EmulatorClient
):
    token = await emu_client.mint("decisions:read")  # iss = http://127.0.0.1:port
    status, headers, _ = await emu_client.api(
        "GET", DECISION, token, headers={"Host": f"localhost:{emulator.port}"}
    )
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        'Bearer error="invalid_token", error_description="The access token was issued by another issuer"'
    )


async def test_two_authorization_headers_are_invalid_request(emu_client: EmulatorClient):
    token = await emu_client.mint("decisions:read")
    both = CIMultiDict([("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")])
    status, headers, body = await emu_client.api("GET", DECISION, headers=both)
    assert (status, body["error"]) == (400, "invalid_request")
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'
    assert (await emu_client.requests())[-1]["auth"]["count"] == 2


async def test_unknown_path_404_and_wrong_method_405_as_json(emu_client: EmulatorClient):
    token = await emu_client.mint()
    status, _, body = await emu_client.api("GET", "/partner/v1/nothing-here", token)
    assert (status, body["error"]) == (404, "not_found")
    status, headers, body = await emu_client.api("DELETE", "/partner/v1/applications", token)
    assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "GET, POST")
    status, _, body = await emu_client.api("GET", "/partner/v1/decisions/dec_nope", token)
    assert (status, body["error"], body["error_description"]) == (
        404,
        "not_found",
        "decision dec_nope not found",
    )


@pytest.mark.parametrize(
    "target",
    [
        "/partner/v1/applications/../decisions/dec_demo_001",
        "/partner/v1/decisions/./dec_demo_001",
        "/partner/v1/decisions/dec_demo_001%2Fx",
        "/partner/v1/%64ecisions/dec_demo_001",
        "/partner/v1//decisions/dec_demo_001",
        "/partner/v1/decisions/dec_demo_001/",
    ],
)
async def test_raw_paths_are_matched_without_normalisation(emulator, emu_client: EmulatorClient, target):
    token = await emu_client.mint("decisions:read")
    request = f"GET {target} HTTP/1.1\r\nHost: {emulator.url[7:]}\r\nAuthorization: Bearer {token}\r\n"
    status, _ = await _raw(emulator.url, (request + "Connection: close\r\n\r\n").encode())
    assert status == 404
    assert (await emu_client.requests())[-1]["raw_path"] == target


async def test_application_lifecycle(unlimited: EmulatorClient):
    write, read = (
        await unlimited.mint("applications:write"),
        await unlimited.mint("applications:read decisions:read"),
    )
    status, _, body = await unlimited.api("POST", "/partner/v1/applications", write, json={"amount": -1})
    assert status == 422 and set(body["fields"]) == {"amount", "company_number", "term_months"}
    new = {"company_number": "87654321", "amount": 180_000, "term_months": 24, "purpose": "equipment"}
    status, _, app = await unlimited.api("POST", "/partner/v1/applications", write, json=new)
    assert status == 201 and app["status"] == "draft" and app["id"].startswith("app_")
    path = f"/partner/v1/applications/{app['id']}"
    status, _, app = await unlimited.api("PATCH", path, write, json={"amount": 90_000})
    assert status == 200 and app["amount"] == 90_000
    status, _, decision = await unlimited.api("POST", f"{path}/submit", write)
    assert status == 201 and decision["outcome"] == "approved" and decision["reason_codes"]
    assert decision["offered_terms"]["amount"] == 90_000 and decision["offered_terms"]["term_months"] == 24
    status, _, app = await unlimited.api("GET", path, read)
    assert (app["status"], app["decision_id"]) == ("decided", decision["id"])
    assert (await unlimited.api("GET", f"/partner/v1/decisions/{decision['id']}", read))[2] == decision
    status, _, body = await unlimited.api("PATCH", path, write, json={"amount": 1})
    assert (status, body["error"]) == (409, "conflict")
    status, _, body = await unlimited.api(
        "POST",
        "/partner/v1/applications",
        write,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert (status, body["error"]) == (400, "invalid_request")


async def test_webhook_secret_shown_once(unlimited: EmulatorClient):
    token = await unlimited.mint("webhooks:manage")
    _, _, hook = await unlimited.api(
        "POST",
        "/partner/v1/webhooks",
        token,
        json={"url": "https://x.example/h", "events": ["payment.settled"]},
    )
    assert hook["secret"].startswith("whsec_")
    _, _, fetched = await unlimited.api("GET", f"/partner/v1/webhooks/{hook['id']}", token)
    assert "secret" not in fetched
    assert (await unlimited.api("DELETE", f"/partner/v1/webhooks/{hook['id']}", token))[0] == 204
    assert (await unlimited.api("GET", f"/partner/v1/webhooks/{hook['id']}", token))[0] == 404
