"""Apply and Decisioning rings: applications, hand-off, submit-for-decision, documents.

The decision model is deliberately simple and deterministic (by amount) so a
test can predict the outcome: up to 100k approved, up to 250k referred,
above that declined.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from proxy.emulator.resources import ApiContext, ApiError, Field, listing, now_iso, ok, validate

_PURPOSES = ("working_capital", "equipment", "stock", "refinance", "growth", "other")
APPLICATION_FIELDS = {
    "company_number": Field(str),
    "company_name": Field(str, required=False),
    "amount": Field((int, float), positive=True),
    "term_months": Field(int, positive=True),
    "purpose": Field(str, required=False, choices=_PURPOSES),
    "contact_email": Field(str, required=False),
}


async def list_applications(ctx: ApiContext) -> web.Response:
    items = ctx.store.all("applications")
    if status := ctx.request.query.get("status"):
        items = [a for a in items if a["status"] == status]
    return listing(items, ctx.request)


async def get_application(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("applications", ctx.params["id"], "application"))


async def get_handoff(ctx: ApiContext) -> web.Response:
    """The hosted hand-off URL where the applicant finishes in Credicorp's UI."""
    app = ctx.store.get("applications", ctx.params["id"], "application")
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900))
    url = f"{ctx.issuer}/apply/{app['id']}?h={secrets.token_urlsafe(12)}"
    return ok({"application_id": app["id"], "url": url, "expires_at": expires})


async def create_application(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), APPLICATION_FIELDS)
    stamp = now_iso()
    app = {
        "id": ctx.store.new_id("app"),
        "status": "draft",
        "company_name": None,
        "purpose": "other",
        **data,
        "decision_id": None,
        "documents": [],
        "created_at": stamp,
        "updated_at": stamp,
    }
    return ok(ctx.store.put("applications", app), status=201)


def _draft(ctx: ApiContext) -> dict[str, Any]:
    app = ctx.store.get("applications", ctx.params["id"], "application")
    if app["status"] != "draft":
        raise ApiError(409, "conflict", f"application {app['id']} is {app['status']}, not draft")
    return app


async def patch_application(ctx: ApiContext) -> web.Response:
    changes = validate(ctx.json(), APPLICATION_FIELDS, partial=True)
    app = _draft(ctx)
    app.update(changes, updated_at=now_iso())
    return ok(app)


def decide(amount: float, term_months: int) -> tuple[str, dict[str, Any] | None, list[str]]:
    """(outcome, offered terms, reason codes) for an application: the emulator's credit model."""
    if amount <= 100_000:
        apr = round(9.9 + amount / 50_000, 1)
        return (
            "approved",
            {"amount": amount, "term_months": term_months, "apr": apr, "currency": "GBP"},
            ["R01_STRONG_CASHFLOW"],
        )
    if amount <= 250_000:
        terms = {"amount": 100_000, "term_months": term_months, "apr": 14.9, "currency": "GBP"}
        return "referred", terms, ["R21_MANUAL_REVIEW", "R22_AMOUNT_ABOVE_AUTO_LIMIT"]
    return "declined", None, ["R41_EXPOSURE_LIMIT"]


async def submit_application(ctx: ApiContext) -> web.Response:
    """Submit a draft for decision; the decision is created at once and returned (201)."""
    app = _draft(ctx)
    outcome, terms, reasons = decide(app["amount"], app["term_months"])
    decision = {
        "id": ctx.store.new_id("dec"),
        "application_id": app["id"],
        "outcome": outcome,
        "offered_terms": terms,
        "reason_codes": reasons,
        "decided_at": now_iso(),
    }
    ctx.store.put("decisions", decision)
    app.update(status="decided", decision_id=decision["id"], updated_at=decision["decided_at"])
    return ok(decision, status=201)


async def upload_document(ctx: ApiContext) -> web.Response:
    """Attach a document. The dispatcher already streamed and hashed the body; nothing is kept."""
    app = ctx.store.get("applications", ctx.params["id"], "application")
    doc = {
        "document_id": ctx.store.new_id("doc"),
        "application_id": app["id"],
        "size": ctx.body_size,
        "sha256": ctx.body_sha256,
        "content_type": ctx.request.content_type,
        "received_at": now_iso(),
    }
    app["documents"].append(doc)
    return ok(doc, status=201)


async def list_decisions(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("decisions"), ctx.request)


async def get_decision(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("decisions", ctx.params["id"], "decision"))
