"""Identity, Platform (webhooks) and Partner rings.

Webhook signing secrets are shown once, at creation and rotation, as the real
platform does; reads never include them.
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from proxy.emulator.resources import ApiContext, ApiError, Field, listing, now_iso, ok, validate

WEBHOOK_FIELDS = {"url": Field(str), "events": Field(list)}
INTRODUCTION_FIELDS = {
    "company_name": Field(str),
    "contact_email": Field(str),
    "company_number": Field(str, required=False),
    "notes": Field(str, required=False),
}
PAYOUT_FIELDS = {"amount": Field((int, float), positive=True), "period": Field(str)}
SUB_ACCOUNT_FIELDS = {
    "name": Field(str),
    "status": Field(str, required=False, choices=("active", "suspended")),
}
WHITE_LABEL_FIELDS = {
    "brand_name": Field(str),
    "primary_colour": Field(str, required=False),
    "logo_url": Field((str, type(None)), required=False),
}


async def get_verification(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("verifications", ctx.params["id"], "verification"))


async def list_directors(ctx: ApiContext) -> web.Response:
    company = ctx.store.get("companies", ctx.params["company_number"], "company")
    return ok(
        {
            "company_number": company["id"],
            "company_name": company["company_name"],
            "data": company["directors"],
        }
    )


def _public_webhook(hook: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hook.items() if k != "secret"}


async def list_webhooks(ctx: ApiContext) -> web.Response:
    return listing([_public_webhook(h) for h in ctx.store.all("webhooks")], ctx.request)


async def create_webhook(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), WEBHOOK_FIELDS)
    if not data["url"].startswith("https://"):
        raise ApiError(
            422, "validation_error", "url must be an https:// URL", extra={"fields": {"url": "https"}}
        )
    hook = {
        "id": ctx.store.new_id("whk"),
        **data,
        "created_at": now_iso(),
        "secret": "whsec_" + secrets.token_urlsafe(24),
    }
    ctx.store.put("webhooks", hook)
    return ok(hook, status=201)


async def get_webhook(ctx: ApiContext) -> web.Response:
    return ok(_public_webhook(ctx.store.get("webhooks", ctx.params["id"], "webhook")))


async def delete_webhook(ctx: ApiContext) -> web.Response:
    ctx.store.get("webhooks", ctx.params["id"], "webhook")
    del ctx.store.collections["webhooks"][ctx.params["id"]]
    return web.Response(status=204)


async def rotate_webhook_secret(ctx: ApiContext) -> web.Response:
    hook = ctx.store.get("webhooks", ctx.params["id"], "webhook")
    hook["secret"] = "whsec_" + secrets.token_urlsafe(24)
    return ok({"id": hook["id"], "secret": hook["secret"], "rotated_at": now_iso()})


async def list_introductions(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("introductions"), ctx.request)


async def create_introduction(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), INTRODUCTION_FIELDS)
    intro = {"id": ctx.store.new_id("int"), "status": "received", **data, "created_at": now_iso()}
    return ok(ctx.store.put("introductions", intro), status=201)


async def get_introduction(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("introductions", ctx.params["id"], "introduction"))


async def list_payouts(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("payouts"), ctx.request)


async def create_payout(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), PAYOUT_FIELDS)
    payout = {"id": ctx.store.new_id("pyo"), "currency": "GBP", "status": "requested", **data}
    return ok(ctx.store.put("payouts", payout), status=201)


async def list_sub_accounts(ctx: ApiContext) -> web.Response:
    return listing(ctx.store.all("sub_accounts"), ctx.request)


async def create_sub_account(ctx: ApiContext) -> web.Response:
    data = validate(ctx.json(), SUB_ACCOUNT_FIELDS)
    sub = {"id": ctx.store.new_id("sub"), "status": "active", **data, "created_at": now_iso()}
    return ok(ctx.store.put("sub_accounts", sub), status=201)


async def get_sub_account(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.get("sub_accounts", ctx.params["id"], "sub-account"))


async def patch_sub_account(ctx: ApiContext) -> web.Response:
    changes = validate(ctx.json(), SUB_ACCOUNT_FIELDS, partial=True)
    sub = ctx.store.get("sub_accounts", ctx.params["id"], "sub-account")
    sub.update(changes)
    return ok(sub)


async def get_white_label(ctx: ApiContext) -> web.Response:
    return ok(ctx.store.singletons["white_label"])


async def put_white_label(ctx: ApiContext) -> web.Response:
    """PUT replaces the whole settings object: omitted optional fields reset to null."""
    data = validate(ctx.json(), WHITE_LABEL_FIELDS)
    ctx.store.singletons["white_label"] = {"primary_colour": None, "logo_url": None, **data}
    return ok(ctx.store.singletons["white_label"])
