"""Payments and Accounts rings: payment links, schedules, disbursements, funded accounts.

The statement download lives in ``streams.py`` because it is about byte
streaming, not about resource state.
"""

from __future__ import annotations

import time

from aiohttp import web

from proxy.emulator.resources import ApiContext, Field, listing, now_iso, ok, validate

LINK_FIELDS = {
    "amount": Field((int, float), positive=True),
    "reference": Field(str),
    "account_id": Field(str, required=False),
    "expires_in_days": Field(int, required=False, positive=True),
}
SCHEDULE_FIELDS = {
    "mandate_id": Field(str),
    "amount": Field((int, float), positive=True),
    "frequency": Field(str, choices=("weekly", "monthly")),
    "start_date": Field(str),
    "count": Field(int, required=False, positive=True),
}
DISBURSEMENT_FIELDS = {
    "account_id": Field(str),
    "amount": Field((int, float), positive=True),
    "reference": Field(str, required=False),
}
QUOTE_FIELDS = {"settlement_date": Field(str, required=False)}
SERVICING_FIELDS = {
    "type": Field(str, choices=("payment_holiday", "change_payment_date", "contact_update", "other")),
    "details": Field(dict, required=False),
}


async def list_payments(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("payments"), ctx.request)


async def get_payment(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("payments", ctx.params["id"], "payment"))


async def get_payment_link(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("payment_links", ctx.params["id"], "payment link"))


async def get_mandate(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("mandates", ctx.params["id"], "mandate"))


async def get_reconciliation(ctx: ApiContext) -> web.Response:
    """Settled vs pending totals over every payment, as of now."""
    payments = ctx.store.all("payments")
    total = {"settled": 0.0, "pending": 0.0}
    for p in payments:
        key = "settled" if p["status"] == "settled" else "pending"
        total[key] = round(total[key] + p["amount"], 2)
    return ok(
        {
            "as_of": now_iso(),
            "currency": "GBP",
            "settled_total": total["settled"],
            "pending_total": total["pending"],
            "payment_count": len(payments),
        }
    )


async def create_payment_link(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), LINK_FIELDS)
    ident = ctx.store.new_id("plk")
    link = {
        "id": ident,
        "currency": "GBP",
        "status": "open",
        **data,
        "url": f"https://pay.credicorp.co.uk/l/{ident}",
        "created_at": now_iso(),
    }
    return ok(ctx.store.put("payment_links", link), status=201)


async def create_schedule(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), SCHEDULE_FIELDS)
    ctx.store.get("mandates", data["mandate_id"], "mandate")
    schedule = {
        "id": ctx.store.new_id("sch"),
        "status": "active",
        "currency": "GBP",
        **data,
        "created_at": now_iso(),
    }
    return ok(ctx.store.put("schedules", schedule), status=201)


async def create_disbursement(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), DISBURSEMENT_FIELDS)
    ctx.store.get("accounts", data["account_id"], "account")
    payment = {
        "id": ctx.store.new_id("pay"),
        "type": "disbursement",
        "currency": "GBP",
        "status": "pending",
        **data,
        "created_at": now_iso(),
    }
    return ok(ctx.store.put("payments", payment), status=201)


async def list_accounts(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("accounts"), ctx.request)


async def get_account(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("accounts", ctx.params["id"], "account"))


async def list_account_events(ctx: ApiContext) -> web.Response:
    account = ctx.store.get("accounts", ctx.params["id"], "account")
    events = [e for e in ctx.store.all("account_events") if e["account_id"] == account["id"]]
    return listing(events, ctx.request)


async def create_settlement_quote(ctx: ApiContext) -> web.Response:
    """Balance plus 30 days' interest, valid for 7 days."""
    data = validate(ctx.json() if ctx.body else {}, QUOTE_FIELDS)
    account = ctx.store.get("accounts", ctx.params["id"], "account")
    interest = round(account["balance"] * account["apr"] / 100 * 30 / 365, 2)
    valid_until = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 7 * 86400))
    quote = {
        "id": ctx.store.new_id("sqt"),
        "account_id": account["id"],
        "currency": "GBP",
        "principal": account["balance"],
        "interest": interest,
        "amount": round(account["balance"] + interest, 2),
        "valid_until": valid_until,
        "settlement_date": data.get("settlement_date"),
    }
    return ok(ctx.store.put("settlement_quotes", quote), status=201)


async def create_servicing_request(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), SERVICING_FIELDS)
    account = ctx.store.get("accounts", ctx.params["id"], "account")
    request = {
        "id": ctx.store.new_id("srq"),
        "account_id": account["id"],
        "status": "received",
        **data,
        "created_at": now_iso(),
    }
    ctx.store.put(
        "account_events",
        {
            "id": ctx.store.new_id("evt"),
            "account_id": account["id"],
            "type": f"servicing_request.{data['type']}",
            "at": request["created_at"],
        },
    )
    return ok(ctx.store.put("servicing_requests", request), status=201)
