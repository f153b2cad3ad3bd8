"""Every aiohttp client exception has an intended answer, not one a catch-all row gave by accident.

httpx's ``test_httpcore_all_exceptions_mapped`` is the model: the classes are
discovered from the library at test time, so an aiohttp upgrade that adds one
fails here until someone decides what it means to the client.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import aiohttp.client_exceptions as client_exceptions
import pytest

from proxy import errors
from proxy.upstream_errors import UPSTREAM_ERRORS, map_upstream_error

CONNECT_TIMED_OUT = "502 upstream_unreachable: cannot reach the Credicorp API (connect timed out)"
NO_ANSWER = "504 upstream_timeout: the Credicorp API did not answer in time"
CLIENT_GONE = "client_gone"
AS_IS = "raised as is"


def unreachable(cls: type[BaseException]) -> str:
    return f"502 upstream_unreachable: cannot reach the Credicorp API ({cls.__name__})"


_UNREACHABLE_CLASSES = (
    aiohttp.ClientError,
    aiohttp.ClientResponseError,
    aiohttp.ContentTypeError,
    aiohttp.WSServerHandshakeError,
    aiohttp.ClientHttpProxyError,
    aiohttp.TooManyRedirects,
    aiohttp.ClientConnectionError,
    aiohttp.ClientConnectionResetError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectorError,
    aiohttp.ClientConnectorDNSError,
    aiohttp.ClientProxyConnectionError,
    client_exceptions.UnixClientConnectorError,
    aiohttp.ClientSSLError,
    aiohttp.ClientConnectorSSLError,
    aiohttp.ClientConnectorCertificateError,
    aiohttp.ServerConnectionError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ServerFingerprintMismatch,
    aiohttp.UploadAbortedError,
    aiohttp.InvalidURL,
    aiohttp.InvalidUrlClientError,
    aiohttp.InvalidUrlRedirectClientError,
    aiohttp.RedirectClientError,
    aiohttp.NonHttpUrlClientError,
    aiohttp.NonHttpUrlRedirectClientError,
    OSError,
    ConnectionResetError,
    ConnectionRefusedError,
)

#: The intended answer for each class: the one place a reader checks what the client gets.
EXPECTED: dict[type[BaseException], str] = {
    **{cls: unreachable(cls) for cls in _UNREACHABLE_CLASSES},
    aiohttp.ConnectionTimeoutError: CONNECT_TIMED_OUT,  # a TimeoutError too, but the API was never reached
    aiohttp.ServerTimeoutError: NO_ANSWER,
    aiohttp.SocketTimeoutError: NO_ANSWER,
    TimeoutError: NO_ANSWER,  # the answer deadline (upstream.timeout_s) ran out
    aiohttp.ClientPayloadError: CLIENT_GONE,
    RuntimeError: AS_IS,  # not a failure of the call: a bug surfaces, it is not dressed as a 502
    ValueError: AS_IS,
}


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def aiohttp_client_exceptions() -> set[type[BaseException]]:
    """Every ``ClientError`` class aiohttp defines, and every timeout class it exports."""
    found = {aiohttp.ClientError, *_subclasses(aiohttp.ClientError)}
    exported = (getattr(aiohttp, name) for name in aiohttp.__all__)
    found |= {c for c in exported if isinstance(c, type) and issubclass(c, TimeoutError)}
    return {cls for cls in found if cls.__module__.startswith("aiohttp")}


def instance(cls: type[BaseException]) -> BaseException:
    """An instance without its constructor's arguments (which differ per class); only its type is read."""
    return cls.__new__(cls)


def outcome(exc: BaseException) -> str:
    mapped = map_upstream_error(exc)
    if mapped is None:
        return AS_IS
    if isinstance(mapped, errors.ClientGone):
        return CLIENT_GONE
    assert isinstance(mapped, errors.ProxyError), mapped
    return f"{mapped.status} {mapped.code}: {mapped.description}"


def test_every_aiohttp_client_exception_has_an_intended_answer() -> None:
    found = aiohttp_client_exceptions()
    assert aiohttp.ConnectionTimeoutError in found and aiohttp.ClientPayloadError in found  # the walk works
    unlisted = sorted(cls.__qualname__ for cls in found - EXPECTED.keys())
    assert not unlisted, f"aiohttp exceptions with no decided answer: {unlisted}"


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__qualname__)
def test_each_exception_gets_its_intended_answer(cls: type[BaseException]) -> None:
    assert outcome(instance(cls)) == EXPECTED[cls]


def test_every_row_of_the_table_decides_some_exception() -> None:
    """A row shadowed by an earlier one would be dead policy that reads as live."""

    def deciding_row(cls: type[BaseException]) -> int | None:
        return next((i for i, (row, _) in enumerate(UPSTREAM_ERRORS) if issubclass(cls, row)), None)

    decided = {deciding_row(cls) for cls in EXPECTED}
    assert decided >= set(range(len(UPSTREAM_ERRORS)))
