"""Shared plumbing of the partner/v1 resource handlers: store, context, errors, validation.

The resource modules (``res_apply``, ``res_money``, ``res_platform``) stay
short by describing bodies declaratively (``Field``) and by raising
``ApiError`` instead of building error responses by hand; the dispatcher in
``api.py`` turns every ``ApiError`` into the same JSON error shape.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from proxy.emulator.state import EmulatorState, IssuedToken


class ApiError(Exception):
    """An API error answered as JSON ``{"error", "error_description", ...extra}``."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description, **self.extra}
        return web.json_response(body, status=self.status, headers=self.headers)


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{kind} {ident} not found")


class Store:
    """In-memory collections of JSON objects, keyed by id, in insertion order."""

    def __init__(self) -> None:
        self.collections: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.singletons: dict[str, dict[str, Any]] = {}

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}_{secrets.token_hex(6)}"

    def put(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.collections[collection][obj["id"]] = obj
        return obj

    def get(self, collection: str, ident: str, kind: str) -> dict[str, Any]:
        """The object, or a 404 ApiError naming ``kind``."""
        obj = self.collections[collection].get(ident)
        if obj is None:
            raise not_found(kind, ident)
        return obj

    def all(self, collection: str) -> list[dict[str, Any]]:
        return list(self.collections[collection].values())


@dataclass(slots=True)
class ApiContext:
    """What a resource handler gets: the request, the verified token and the body already read.

    The dispatcher reads (and hashes) the body before routing, so handlers see
    at most ``body`` (kept only for JSON routes) plus its size and digest.
    """

    request: web.Request
    state: EmulatorState
    params: dict[str, str]
    issuer: str
    token: IssuedToken | None = None
    body: bytes | None = None
    body_size: int = 0
    body_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.state.store

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, or a 400 ``invalid_request``."""
        try:
            data = json.loads(self.body or b"")
        except ValueError:
            raise ApiError(400, "invalid_request", "the request body must be a JSON object") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the request body must be a JSON object")
        return data


Handler = Callable[[ApiContext], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Field:
    """One accepted body field: its JSON type, whether required, allowed values, positivity."""

    kind: type | tuple[type, ...]
    required: bool = True
    choices: tuple[Any, ...] | None = None
    positive: bool = False


def _field_problem(value: Any, spec: Field) -> str | None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, bool) and bool not in kinds:
        return "has the wrong type"
    if not isinstance(value, kinds):
        return f"must be of type {'/'.join(k.__name__ for k in kinds)}"
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))}"
    if spec.positive and isinstance(value, int | float) and value <= 0:
        return "must be positive"
    return None


def validate(body: dict[str, Any], schema: dict[str, Field], *, partial: bool = False) -> dict[str, Any]:
    """Check ``body`` against ``schema``; 422 ``validation_error`` naming every bad field.

    ``partial`` (PATCH) makes every field optional but still rejects unknown ones.
    """
    problems = {k: "is not a known field" for k in body if k not in schema}
    for name, spec in schema.items():
        if name not in body:
            if spec.required and not partial:
                problems[name] = "is required"
        elif problem := _field_problem(body[name], spec):
            problems[name] = problem
    if problems:
        text = "; ".join(f"{k} {v}" for k, v in sorted(problems.items()))
        raise ApiError(422, "validation_error", text, extra={"fields": problems})
    return {k: v for k, v in body.items() if k in schema}


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def listing(items: list[dict[str, Any]], request: web.Request) -> web.Response:
    """A list response; ``?limit=`` trims it, as the real API pages."""
    try:
        limit = max(1, min(100, int(request.query.get("limit", "50"))))
    except ValueError:
        raise ApiError(400, "invalid_request", "limit must be an integer") from None
    return ok({"data": items[:limit], "has_more": len(items) > limit})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
