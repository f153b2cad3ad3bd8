"""Sample data every fresh emulator starts with.

The demo's printed curl lines and the examples in proxy/emulator/README.md read these ids
(``app_demo_001``, ``dec_demo_001``, ``acc_demo_001``, ...), so they must exist
without any set-up call. Amounts are GBP.
"""

from __future__ import annotations

from proxy.emulator.resources import Store

_T0 = "2026-01-05T09:00:00Z"
_T1 = "2026-01-05T09:04:12Z"


def _apply(store: Store) -> None:
    store.put(
        "applications",
        {
            "id": "app_demo_001",
            "status": "decided",
            "company_number": "12345678",
            "company_name": "Demo Trading Ltd",
            "amount": 50000,
            "term_months": 12,
            "purpose": "working_capital",
            "decision_id": "dec_demo_001",
            "documents": [],
            "created_at": _T0,
            "updated_at": _T1,
        },
    )
    store.put(
        "decisions",
        {
            "id": "dec_demo_001",
            "application_id": "app_demo_001",
            "outcome": "approved",
            "offered_terms": {"amount": 50000, "term_months": 12, "apr": 11.9, "currency": "GBP"},
            "reason_codes": ["R01_STRONG_CASHFLOW", "R07_TRADING_HISTORY"],
            "decided_at": _T1,
        },
    )


def _money(store: Store) -> None:
    store.put(
        "accounts",
        {
            "id": "acc_demo_001",
            "application_id": "app_demo_001",
            "status": "active",
            "principal": 50000,
            "balance": 45833.34,
            "currency": "GBP",
            "apr": 11.9,
            "next_payment": {"due_date": "2026-03-05", "amount": 4442.71},
            "opened_at": "2026-01-06T10:00:00Z",
        },
    )
    store.put(
        "account_events",
        {
            "id": "evt_demo_001",
            "account_id": "acc_demo_001",
            "type": "repayment_collected",
            "amount": 4442.71,
            "at": "2026-02-05T06:00:00Z",
        },
    )
    store.put(
        "payments",
        {
            "id": "pay_demo_001",
            "type": "collection",
            "amount": 4442.71,
            "currency": "GBP",
            "status": "settled",
            "account_id": "acc_demo_001",
            "mandate_id": "mdt_demo_001",
            "settled_at": "2026-02-05T06:00:00Z",
        },
    )
    store.put(
        "payments",
        {
            "id": "pay_demo_002",
            "type": "disbursement",
            "amount": 50000,
            "currency": "GBP",
            "status": "settled",
            "account_id": "acc_demo_001",
            "settled_at": "2026-01-06T10:05:00Z",
        },
    )
    store.put(
        "payment_links",
        {
            "id": "plk_demo_001",
            "amount": 4442.71,
            "currency": "GBP",
            "reference": "ACC-DEMO-001-MAR",
            "status": "open",
            "url": "https://pay.credicorp.co.uk/l/plk_demo_001",
        },
    )
    store.put(
        "mandates",
        {
            "id": "mdt_demo_001",
            "account_id": "acc_demo_001",
            "scheme": "bacs_direct_debit",
            "status": "active",
            "created_at": "2026-01-06T10:00:00Z",
        },
    )


def _platform(store: Store) -> None:
    store.put(
        "verifications",
        {
            "id": "idv_demo_001",
            "type": "kyb",
            "company_number": "12345678",
            "status": "passed",
            "checks": {"companies_house": "passed", "sanctions": "clear", "pep": "clear"},
            "completed_at": _T0,
        },
    )
    store.put(
        "companies",
        {
            "id": "12345678",
            "company_name": "Demo Trading Ltd",
            "directors": [
                {"name": "Ada Example", "appointed_on": "2019-04-01", "verified": True},
                {"name": "Sam Sample", "appointed_on": "2021-09-15", "verified": False},
            ],
        },
    )
    store.put(
        "webhooks",
        {
            "id": "whk_demo_001",
            "url": "https://partner.example/hooks/credicorp",
            "events": ["decision.created", "payment.settled"],
            "created_at": _T0,
        },
    )
    store.put(
        "introductions",
        {
            "id": "int_demo_001",
            "company_name": "Demo Trading Ltd",
            "contact_email": "ops@demo.example",
            "status": "funded",
            "application_id": "app_demo_001",
            "created_at": _T0,
        },
    )
    store.put(
        "payouts",
        {
            "id": "pyo_demo_001",
            "amount": 750,
            "currency": "GBP",
            "status": "paid",
            "period": "2026-01",
        },
    )
    store.put(
        "sub_accounts",
        {
            "id": "sub_demo_001",
            "name": "Demo Brokers North",
            "status": "active",
            "created_at": _T0,
        },
    )
    store.singletons["white_label"] = {
        "brand_name": "Demo Finance",
        "primary_colour": "#0b5fff",
        "logo_url": None,
    }


def seed_store() -> Store:
    """A store holding the documented sample objects."""
    store = Store()
    _apply(store)
    _money(store)
    _platform(store)
    return store
