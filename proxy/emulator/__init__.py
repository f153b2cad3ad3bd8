"""A local Credicorp: OAuth 2.0 authorization server plus the partner/v1 API.

Used by ``credicorp-proxy demo``, by the test suite, and by users for their
own integration tests (``credicorp-proxy emulator``). It behaves like the
documented service (ES256 JWTs, JWKS rotation, client-credentials with post
and Basic auth, the documented errors and 10 req/s limit, two live secrets,
scope enforcement with RFC 6750 challenges) and adds a ``/_emulator/``
control surface for fault injection and counters. See ``control`` for the
control surface and ``faults`` for the fault knobs.

Entry points: ``app.make_emulator_app`` (aiohttp app factory),
``app.EmulatorServer`` (in-process server on a free port),
``state.ClientSpec`` (a provisioned client), ``api.API_ROUTES`` (route ->
scope table), ``api.statement_bytes`` (recompute streamed downloads).
"""
