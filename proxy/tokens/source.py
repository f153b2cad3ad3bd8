"""Minting tokens: discovery, the client-credentials request and the error policy.

``TokenSource.mint`` is one logical mint. It owns every rule that protects the
token endpoint (and Credicorp's 10 req/s limit) from this replica: an
``invalid_client`` latch until the secret changes, an ``invalid_scope`` memo per
scope set, capped exponential backoff with jitter, and a rate ceiling on calls.
Single flight per cache key belongs to the manager above it; what a response
must look like on the wire is decided in ``wire.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from proxy.errors import ProxyError, TokenUnavailable
from proxy.metrics import Metrics
from proxy.settings import AuthSettings
from proxy.tokens import backoff as policy
from proxy.tokens.attempt import SharedAttempt
from proxy.tokens.backoff import EndpointFailure, ErrorClass
from proxy.tokens.credentials import CredentialProvider
from proxy.tokens.discovery_trust import UNTRUSTED, DiscoveryTrust
from proxy.tokens.model import CacheKey, Credentials, Token
from proxy.tokens.verify import JwtVerifier, TokenVerificationError, read_bounded
from proxy.tokens.wire import (
    MAX_BODY,
    basic_authorization,
    parse_discovery,
    parse_error_code,
    parse_token_response,
    transient,
)

log = logging.getLogger("proxy.tokens")

DISCOVERY_PATH = "/.well-known/openid-configuration"
DISCOVERY_TTL_S = 3600.0
_ACCEPT = {"Accept": "application/json"}


@dataclass(frozen=True, slots=True)
class Discovery:
    """The parts of the issuer's discovery document the proxy uses."""

    issuer: str
    token_endpoint: str
    jwks_uri: str | None
    fetched_at: float


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """A snapshot for /readyz; ``last_error`` is an error code, never a message from the wire."""

    credentials_rejected: bool
    backing_off_until: float | None
    last_error: str | None


class TokenSource:
    """Mints tokens from Credicorp's token endpoint, within the error policy in proxy/README.md."""

    def __init__(
        self,
        auth: AuthSettings,
        credentials: CredentialProvider,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        verifier: JwtVerifier | None = None,
        sleep: policy.Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._auth, self._credentials, self._session = auth, credentials, session
        self._clock, self._metrics, self._verifier = clock, metrics, verifier
        self._gate = policy.MintGate(clock, rng or random.Random())
        self._limiter = policy.MintRateLimiter(auth.max_mint_rate, clock, sleep)
        self._discovery: Discovery | None = None
        self._discovery_stale = False
        self._discovery_fetch: SharedAttempt[Discovery] = SharedAttempt()
        self._last_error: str | None = None
        self._timeout = aiohttp.ClientTimeout(total=auth.timeout_s)
        credentials.on_change(self._on_credentials_change)
        if verifier is not None and verifier.needs_jwks_uri:
            verifier.set_jwks_uri_provider(self.jwks_uri)

    async def mint(self, scopes: tuple[str, ...], audience: str) -> Token:
        """One token for ``scopes``/``audience``, or a ProxyError saying why not (and for how long)."""
        creds = self._credentials.current()
        key = CacheKey.create(creds, scopes, audience)
        self._refuse_early(creds, key)
        started = self._clock()
        try:
            endpoint = await self._token_endpoint()
        except EndpointFailure as failure:
            raise self._failed(creds, key, failure, called=False, started=started) from None
        await self._acquire_slot(key)
        self._refuse_early(creds, key)  # another mint may have failed while we queued
        started = self._clock()
        try:
            return await self._request(endpoint, creds, key)
        except EndpointFailure as failure:
            raise self._failed(creds, key, failure, called=True, started=started) from None

    async def discover(self) -> Discovery:
        """The discovery document: cached, re-read after a token-endpoint failure."""
        started = self._clock()
        try:
            return await self._discover()
        except EndpointFailure as failure:
            self._count_error(failure.label)
            self._last_error = failure.label
            state = self._gate.backoff
            state.failure(self._clock(), started=started)
            raise TokenUnavailable(failure.description, state.remaining(self._clock())) from None

    async def jwks_uri(self) -> str:
        """``jwks_uri`` from discovery (the verifier's key source)."""
        uri = (await self.discover()).jwks_uri
        if uri is None:
            raise TokenUnavailable("the discovery document names no jwks_uri; cannot verify tokens")
        return uri

    def refused_for(self, key: CacheKey) -> float:
        """Seconds a mint for ``key`` would be refused here without calling (0: it would be tried).

        Synchronous and I/O-free, so the request path can ask it for every stale token: while
        the endpoint is backing off (or latched, or over the rate ceiling) starting a refresh
        would only count one more refusal and serve the same stale token.
        """
        now = self._clock()
        return max(
            self._gate.refused_for(self._credentials.current().generation, key),
            self._limiter.refused_for(now),
        )

    def health(self) -> SourceHealth:
        """What /readyz needs, without I/O."""
        backoff = self._gate.backoff
        return SourceHealth(
            credentials_rejected=self._gate.is_rejected(self._credentials.current().generation),
            backing_off_until=backoff.until if backoff.remaining(self._clock()) > 0 else None,
            last_error=self._last_error,
        )

    # -- before the call --------------------------------------------------------

    def _refuse_early(self, creds: Credentials, key: CacheKey) -> None:
        refusal = self._gate.refusal(creds.generation, key)
        if refusal is not None:
            result, error = refusal
            self._count(key, result)
            raise error

    async def _acquire_slot(self, key: CacheKey) -> None:
        try:
            await self._limiter.acquire()
        except TokenUnavailable:
            self._count(key, "local_throttled")
            raise

    async def _token_endpoint(self) -> str:
        if self._auth.token_endpoint:
            return self._auth.token_endpoint
        return (await self._discover()).token_endpoint

    async def _discover(self) -> Discovery:
        """The cached document, or the one fetch in progress (shared, failure included)."""
        cached = self._discovery
        if cached and not self._discovery_stale and self._clock() - cached.fetched_at < DISCOVERY_TTL_S:
            return cached
        return await self._discovery_fetch.run(self._read_discovery)

    async def _read_discovery(self) -> Discovery:
        discovery = await self._fetch_discovery(self._clock())
        self._discovery, self._discovery_stale = discovery, False
        return discovery

    async def _fetch_discovery(self, now: float) -> Discovery:
        issuer = self._auth.issuer
        try:
            status, _, body = await self._send("GET", issuer.rstrip("/") + DISCOVERY_PATH, headers=_ACCEPT)
            token_endpoint, jwks_uri = parse_discovery(status, body, issuer)
        except EndpointFailure as failure:
            failure.label = (
                failure.label if failure.label.startswith("discovery_") else f"discovery_{failure.label}"
            )
            _event(
                logging.ERROR,
                "discovery failed",
                "discovery_failed",
                error=failure.label,
                issuer=issuer,
                reason=failure.description,
            )
            raise
        self._refuse_untrusted(token_endpoint, jwks_uri)
        _event(logging.INFO, "discovery document read", "discovery_ok", issuer=issuer)
        return Discovery(issuer, token_endpoint, jwks_uri, now)

    def _refuse_untrusted(self, token_endpoint: str, jwks_uri: str | None) -> None:
        """Refuse the whole document if an endpoint it names breaks a trust rule (``trust.py``).

        Checked before anything is sent to either endpoint, and re-checked on every
        fetch, so a document that turns bad later is refused too. Only what the proxy
        will use is judged: a configured ``auth.token_endpoint`` replaces the document's,
        and ``jwks_uri`` is read only to verify tokens.
        """
        used = {
            "token_endpoint": None if self._auth.token_endpoint else token_endpoint,
            "jwks_uri": jwks_uri if self._verifier is not None else None,
        }
        refusal = DiscoveryTrust.for_settings(self._auth).refusal(used)
        if refusal is None:
            return
        _event(
            logging.ERROR,
            "discovery document refused: it names an endpoint the proxy does not trust",
            "discovery_refused",
            error=UNTRUSTED,
            issuer=self._auth.issuer,
            key=refusal.key,
            rule=refusal.rule,
            host=refusal.host,
        )
        raise refusal.failure()

    # -- the call ---------------------------------------------------------------

    async def _request(self, endpoint: str, creds: Credentials, key: CacheKey) -> Token:
        issued_at, started = self._clock(), time.monotonic()
        try:
            status, headers, body = await self._send(
                "POST", endpoint, data=self._form(creds, key), headers=self._headers(creds)
            )
        finally:
            if self._metrics is not None:
                self._metrics.token_mint_duration.observe(time.monotonic() - started)
        if status != 200:
            raise self._error_failure(status, headers, body)
        token = parse_token_response(body, key, issued_at, self._auth.default_expires_in)
        _log_scope_difference(key, token.scopes)
        await self._verify(token)
        token = dataclasses.replace(token, received_at=self._clock())  # in hand now, see Token
        self._succeeded(key, token, time.monotonic() - started)
        return token

    def _form(self, creds: Credentials, key: CacheKey) -> str:
        form = {"grant_type": "client_credentials", "audience": key.audience}
        if key.scopes:
            form["scope"] = key.scope_label
        if self._auth.method == "client_secret_post":
            form |= {"client_id": creds.client_id, "client_secret": creds.secret}
        return urlencode(form)

    def _headers(self, creds: Credentials) -> dict[str, str]:
        headers = {**_ACCEPT, "Content-Type": "application/x-www-form-urlencoded"}
        if self._auth.method == "client_secret_basic":
            headers["Authorization"] = basic_authorization(creds)
        return headers

    async def _send(self, method: str, url: str, **kwargs: Any) -> tuple[int, Mapping[str, str], bytes]:
        """One exchange: no redirects followed, body bounded, network errors become failures."""
        try:
            async with self._session.request(
                method, url, timeout=self._timeout, allow_redirects=False, **kwargs
            ) as resp:
                return resp.status, resp.headers.copy(), await read_bounded(resp, MAX_BODY)
        except TimeoutError:
            raise transient("timeout", f"{method} to the authorization server timed out") from None
        except aiohttp.ClientError as exc:
            reason = f"{method} to the authorization server failed ({type(exc).__name__})"
            raise transient("connect", reason) from None

    def _error_failure(self, status: int, headers: Mapping[str, str], body: bytes) -> EndpointFailure:
        kind, label = policy.classify(status, parse_error_code(body))
        retry_after = policy.parse_retry_after(headers.get("Retry-After"), self._clock())
        description = f"token endpoint answered HTTP {status} ({label})"
        return EndpointFailure(label, kind, description, retry_after=retry_after, status=status)

    async def _verify(self, token: Token) -> None:
        if self._verifier is None:
            return
        try:
            await self._verifier.verify(token.value, audience=token.audience, scopes=token.scopes)
        except TokenVerificationError as exc:
            raise transient("unverified", f"minted token failed verification: {exc}") from None

    # -- after the call ---------------------------------------------------------

    def _succeeded(self, key: CacheKey, token: Token, duration: float) -> None:
        if failures := self._gate.record_success(key):
            _event(logging.INFO, "token endpoint recovered", "backoff_ended", failures=failures)
        self._last_error = None
        self._count(key, "ok")
        _event(
            logging.INFO,
            "token minted",
            "mint_ok",
            scopes=scope_text(token.scopes),
            audience=key.audience,
            expires_in=round(token.lifetime),
            duration_ms=round(duration * 1000, 1),
            token_digest=token.digest,
        )

    def _failed(
        self, creds: Credentials, key: CacheKey, failure: EndpointFailure, *, called: bool, started: float
    ) -> ProxyError:
        """Count, log and apply a failure of a call begun at ``started``; returns the caller's error."""
        self._count_error(failure.label)
        self._count(key, failure.result if called else "error")
        if failure.kind is ErrorClass.REJECTED and self._superseded(creds):
            return self._rejected_after_rotation(creds)
        self._last_error = failure.label
        state = self._gate.record_failure(creds.generation, key, failure, started)
        if failure.kind is ErrorClass.REJECTED:
            return self._latched(creds)
        if state is None:  # invalid_scope: a route-table problem, remembered for a while
            _event(
                logging.ERROR,
                "scope set not granted",
                "mint_failed",
                error=failure.label,
                scopes=key.scope_label,
                audience=key.audience,
            )
            return policy.scope_not_granted_error(key)
        if failure.endpoint_may_have_moved:
            self._discovery_stale = True
        delay = state.remaining(self._clock())
        _event(
            logging.ERROR if failure.kind is ErrorClass.CONFIG else logging.WARNING,
            "token mint failed; backing off",
            "mint_failed",
            error=failure.label,
            status=failure.status,
            scopes=key.scope_label,
            audience=key.audience,
            retry_after=round(delay, 3),
            failures=state.failures,
            backoff_applies_to="all" if state is self._gate.backoff else "scope_set",
        )
        if state.failures == 1:
            _event(
                logging.INFO,
                "backing off the token endpoint",
                "backoff",
                error=failure.label,
                applies_to="all" if state is self._gate.backoff else key.scope_label,
            )
        return TokenUnavailable(f"{failure.description}; retrying in {delay:.1f}s", delay)

    def _superseded(self, creds: Credentials) -> bool:
        """A newer secret arrived while this mint was on the wire."""
        return creds.generation != self._credentials.current().generation

    def _rejected_after_rotation(self, creds: Credentials) -> ProxyError:
        """invalid_client for a secret already replaced: says nothing about the current one.

        Latching it (or raising ``ccp_credentials_rejected``) would report the new secret as
        rejected, with no further change of secret to clear the alert.
        """
        _event(
            logging.WARNING,
            "client credentials rejected for a secret already replaced; the current one is not latched",
            "credentials_rejected_superseded",
            client_id=creds.client_id,
            fingerprint=creds.fingerprint,
            generation=creds.generation,
            current_generation=self._credentials.current().generation,
        )
        return policy.credentials_rejected_error()

    def _latched(self, creds: Credentials) -> ProxyError:
        if self._metrics is not None:
            self._metrics.credentials_rejected.set(1)
        _event(
            logging.ERROR,
            "client credentials rejected; no mints until the secret changes",
            "credentials_rejected",
            client_id=creds.client_id,
            fingerprint=creds.fingerprint,
            generation=creds.generation,
        )
        return policy.credentials_rejected_error()

    def _on_credentials_change(self, creds: Credentials) -> None:
        """A new secret lifts the invalid_client latch: it is the only thing that could fix it."""
        if self._gate.clear_rejection():
            _event(
                logging.INFO,
                "new client secret; minting resumes",
                "credentials_unlatched",
                generation=creds.generation,
            )
        if self._metrics is not None:
            self._metrics.credentials_rejected.set(0)

    def _count(self, key: CacheKey, result: str) -> None:
        if self._metrics is not None:
            self._metrics.token_mints.labels(scopes=key.scope_label, result=result).inc()

    def _count_error(self, label: str) -> None:
        if self._metrics is not None:
            self._metrics.token_endpoint_errors.labels(error=label).inc()


def _event(level: int, message: str, event: str, **fields: object) -> None:
    """A structured token event; the JSON formatter renders ``extra`` as fields."""
    log.log(level, message, extra={"event": event, **fields})


def _log_scope_difference(key: CacheKey, granted: tuple[str, ...]) -> None:
    requested, got = set(key.scopes), set(granted)
    if not key.scopes or requested == got:
        return
    fields = {"requested": key.scope_label, "granted": scope_text(got), "audience": key.audience}
    if requested - got:
        _event(
            logging.WARNING,
            "token endpoint granted fewer scopes than asked",
            "scope_narrowed",
            missing=scope_text(requested - got),
            **fields,
        )
    if got - requested:
        _event(
            logging.WARNING,
            "token endpoint granted scopes not asked for",
            "scope_unexpected",
            unexpected=scope_text(got - requested),
            **fields,
        )


def scope_text(scopes: tuple[str, ...] | set[str]) -> str:
    return " ".join(sorted(scopes))
