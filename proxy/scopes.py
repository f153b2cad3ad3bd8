"""The Credicorp scope catalogue, built in so config validation needs no network.

Both the proxy (route validation, over-broad scope warnings) and the emulator
(what a client may be granted, what each API resource needs) read this one table,
so the two can never disagree about what a scope means.
"""

from __future__ import annotations

from typing import Final

DEFAULT_AUDIENCE: Final = "partner/v1"
KNOWN_AUDIENCES: Final = frozenset({"partner/v1", "internal/v1", "public/v1"})

#: scope -> (ring, what it grants), from the Credicorp OAuth 2.0 page.
SCOPE_CATALOGUE: Final[dict[str, tuple[str, str]]] = {
    "applications:write": ("Apply", "Create & update business-loan applications; submit for decision."),
    "applications:read": ("Apply", "Read applications, their status and the hosted hand-off URL."),
    "decisions:read": ("Decisioning", "Read AI decision outcomes, offered terms and the reason codes."),
    "payments:write": (
        "Payments",
        "Create PISP payment links, collection schedules & disbursement instructions.",
    ),
    "payments:read": ("Payments", "Read payment, mandate & reconciliation state."),
    "identity:read": ("Identity", "Read KYB/KYC verification results and director claims."),
    "accounts:read": ("Accounts", "Read funded loan accounts, balances & servicing events."),
    "accounts:write": ("Accounts", "Raise settlement quotes & servicing requests on a funded account."),
    "webhooks:manage": (
        "Platform",
        "Register, rotate & delete webhook endpoints and their signing secrets.",
    ),
    "partner:manage": ("Partner", "Manage introductions, payouts, sub-accounts & white-label settings."),
    "openid": ("OIDC", "OpenID Connect sign-in."),
    "profile": ("OIDC", "OpenID Connect profile claims."),
    "email": ("OIDC", "OpenID Connect email claims."),
}

KNOWN_SCOPES: Final = frozenset(SCOPE_CATALOGUE)

#: Every partner/v1 API scope (what the demo client holds); OIDC scopes are for sign-in only.
PARTNER_SCOPES: Final = frozenset(s for s, (ring, _) in SCOPE_CATALOGUE.items() if ring != "OIDC")

#: Scopes that change state. A GET route asking for one of these is over-broad.
WRITE_SCOPES: Final = frozenset(
    {"applications:write", "payments:write", "accounts:write", "webhooks:manage", "partner:manage"}
)

#: Scopes that can move money or change who is paid: flagged when shared by many routes.
HIGH_RISK_SCOPES: Final = frozenset({"payments:write", "partner:manage", "webhooks:manage"})


def scope_set_label(scopes: frozenset[str] | set[str] | tuple[str, ...]) -> str:
    """The canonical text of a scope set: sorted, space-joined (the OAuth wire form)."""
    return " ".join(sorted(scopes))
