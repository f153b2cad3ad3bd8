"""Project exceptions, each carrying its proxy error code and HTTP status (README.md's error table).

The forwarding handler maps any ``ProxyError`` to a response in one place, so
a new failure mode is one new class here, not a new branch in the handler.
Messages are written for the application developer who will read them in an
error body; they never contain a token, a secret or an Authorization value.

    ProxyError
    ├── BadRequest            400 bad_request          unsafe or malformed target
    ├── RouteNotAllowed       403 route_not_allowed    deny by default
    ├── BodyTooLarge          413 body_too_large
    ├── ExpectationFailed     417 expectation_failed   an Expect other than 100-continue
    ├── ClosingError                                   the listener ends the connection after answering
    │   ├── RequestTimeout        408 request_timeout      head or body did not arrive in time
    │   ├── HeadersTooLarge       431 headers_too_large    head over limits.max_header_bytes / max_headers
    │   ├── TooManyConnections    503 too_many_connections listener at its connection cap
    │   └── HttpVersionNotSupported 505 http_version_not_supported  not HTTP/1.0 or 1.1
    ├── UpstreamUnreachable   502 upstream_unreachable connect / reset
    ├── UpstreamTimeout       504 upstream_timeout
    ├── ScopeNotGranted       500 scope_not_granted    token endpoint said invalid_scope
    └── TokenError            503                      no token could be had
        ├── TokenUnavailable      token_unavailable    endpoint down / backing off
        └── CredentialsRejected   credentials_rejected invalid_client

    ClientGone                                         499, never sent: the client's connection broke
    ConfigError                                        a config with problems (not a request error)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from proxy.redact import mask_secrets_in


class ProxyError(Exception):
    """A failure the proxy answers itself, with its own JSON error body."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error (``Retry-After`` for the 503s)."""
        return {}


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class RouteNotAllowed(ProxyError):
    status = 403
    code = "route_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"


class ExpectationFailed(ProxyError):
    status = 417
    code = "expectation_failed"


class ClosingError(ProxyError):
    """A refusal by the listener itself: nothing more is read from the connection, so it is closed."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class RequestTimeout(ClosingError):
    status = 408
    code = "request_timeout"


class HeadersTooLarge(ClosingError):
    status = 431
    code = "headers_too_large"


class TooManyConnections(ClosingError):
    status = 503
    code = "too_many_connections"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", **super().headers()}


class HttpVersionNotSupported(ClosingError):
    status = 505
    code = "http_version_not_supported"


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class ScopeNotGranted(ProxyError):
    """The token endpoint refused the scope set: the route table asks for too much."""

    status = 500
    code = "scope_not_granted"


class TokenError(ProxyError):
    """No valid token could be had; the caller may try again later."""

    status = 503
    code = "token_unavailable"

    def __init__(self, description: str, retry_after: float = 1.0) -> None:
        super().__init__(description)
        self.retry_after = max(1.0, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.retry_after + 0.999))}


class TokenUnavailable(TokenError):
    code = "token_unavailable"


class CredentialsRejected(TokenError):
    """``invalid_client``: never retried with the same secret."""

    code = "credentials_rejected"

    def __init__(self, description: str, retry_after: float = 30.0) -> None:
        super().__init__(description, retry_after)


class ClientGone(Exception):
    """The client's connection broke while we were reading its body or streaming to it.

    Not a ``ProxyError``: there is nobody left to send an error body to. The
    request is logged and counted as 499 ``client_gone``.
    """


class ConfigError(Exception):
    """A configuration with one or more problems, each naming its key path."""

    def __init__(self, problems: Sequence[str]) -> None:
        # Problems quote values (a mistyped cache URL, the YAML a file failed on), and they are
        # printed and pasted: a credential in one is masked here, whoever raised it.
        self.problems = [mask_secrets_in(problem) for problem in problems]
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))
