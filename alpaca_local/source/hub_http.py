"""The HTTP client huggingface_hub itself uses, behind one small interface.

In: nothing; `hub_client()` wraps `huggingface_hub.utils.get_session()` (public on every
supported major), so a user's proxy, certificates or `set_client_factory` /
`configure_http_backend` apply to our range requests too. Out: an `HttpClient` with
`open(url, headers, connect_timeout, read_timeout) -> Response` (status_code, headers,
read1, close) and the exception tuples `source.remote` and `source.hub` retry on.

Which library that session is depends on the installed major:

| huggingface_hub | get_session() returns | body read with            |
| --------------- | --------------------- | ------------------------- |
| 0.34 ... 0.36   | requests.Session      | urllib3's `raw.read1`     |
| 1.x             | httpx.Client          | `iter_raw()` chunks       |
| 2.x             | httpx2.Client         | `iter_raw()` chunks       |

Both kinds of `read1(n)` return what has arrived (at most n bytes) and never drop a byte
they returned, so a stall or a drop resumes at the exact byte. Redirects are followed (the
Hub sends LFS files to a CDN); both requests (`should_strip_auth`) and httpx/httpx2
(`_redirect_headers`) drop the Authorization header when a redirect leaves the origin, so
the token never reaches the CDN (tests/test_hub.py checks it on each major).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol


class Response(Protocol):
    """One streamed answer."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive on every client

    def read1(self, n: int) -> bytes:
        """Up to `n` bytes of the body, what has arrived; b"" at its end."""

    def close(self) -> None: ...


class HttpClient(Protocol):
    # connect failures and timeouts before an answer (retried; "cannot reach" when they last)
    network_errors: tuple[type[BaseException], ...]
    # the timeouts among them (a slow network heals; an unknown host does not)
    timeout_errors: tuple[type[BaseException], ...]
    # what a dropped or stalled connection raises while a body is read
    body_errors: tuple[type[BaseException], ...]

    def open(self, url: str, headers: Mapping[str, str], connect_timeout: float, read_timeout: float) -> Response:
        """GET `url`, redirects followed, the body not yet read."""


def hub_client() -> HttpClient:
    """huggingface_hub's current session, wrapped. Cheap: call it where a client is needed
    (0.x keeps one session per thread, 1.x/2.x one client per process)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    family = type(session).__module__.split(".")[0]
    if family == "requests":
        return _RequestsClient(session)
    if family in ("httpx", "httpx2"):
        return _HttpxClient(session, importlib.import_module(family))
    raise RuntimeError(f"huggingface_hub's get_session() gave a {type(session).__module__}.{type(session).__name__}; "
                       "alpaca-local knows requests, httpx and httpx2 sessions")


# -- huggingface_hub 0.x: requests ------------------------------------------------------------


class _RequestsResponse:
    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status_code: int = resp.status_code
        self.headers: Mapping[str, str] = resp.headers
        raw = resp.raw
        # urllib3 >= 2.1 has read1; older ones only read(n), which waits for n bytes
        self._read = raw.read1 if hasattr(raw, "read1") else raw.read

    def read1(self, n: int) -> bytes:
        return self._read(n)

    def close(self) -> None:
        self._resp.close()


class _RequestsClient:
    def __init__(self, session: Any) -> None:
        import http.client

        import requests
        import urllib3

        self._session = session
        self.network_errors = (requests.ConnectionError, requests.Timeout)
        self.timeout_errors = (requests.Timeout,)
        # urllib3's ProtocolError / ReadTimeoutError surface as OSError or requests errors
        self.body_errors = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)

    def open(self, url: str, headers: Mapping[str, str], connect_timeout: float, read_timeout: float) -> Response:
        resp = self._session.get(
            url, headers=dict(headers), stream=True, allow_redirects=True, timeout=(connect_timeout, read_timeout)
        )
        return _RequestsResponse(resp)


# -- huggingface_hub 1.x / 2.x: httpx / httpx2 (the same API) ----------------------------------


class _HttpxResponse:
    def __init__(self, resp: Any, closed_error: type[BaseException]) -> None:
        self._resp = resp
        self.status_code: int = resp.status_code
        self.headers: Mapping[str, str] = resp.headers
        # iter_raw() without a chunk size yields each read from the socket as it comes (not
        # decoded: we ask for identity); the part of a chunk not yet asked for waits in _buf.
        self._chunks = resp.iter_raw()
        self._buf = b""
        self._closed_error = closed_error

    def read1(self, n: int) -> bytes:
        if not self._buf:
            if self._resp.is_closed:
                return b""  # closed by RemoteFile.close() from another thread: the caller stops
            try:
                self._buf = next(self._chunks, b"")
            except self._closed_error:
                return b""
        piece, self._buf = self._buf[:n], self._buf[n:]
        return piece

    def close(self) -> None:
        self._resp.close()


def _core_errors(family: str) -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(network, timeout) errors of the transport under httpx / httpx2 (httpcore / httpcore2).
    httpx maps them into its own classes on the usual paths, but not on all: a connection
    dropped while huggingface_hub 2.x sends an upload's body surfaces as
    httpcore2.RemoteProtocolError."""
    try:
        core = importlib.import_module(family.replace("httpx", "httpcore"))
    except ImportError:
        return (), ()
    return (core.TimeoutException, core.NetworkError, core.ProtocolError, core.ProxyError), (core.TimeoutException,)


class _HttpxClient:
    def __init__(self, session: Any, httpx: Any) -> None:
        self._session, self._httpx = session, httpx
        core_network, core_timeout = _core_errors(httpx.__name__)
        self.network_errors = (httpx.TimeoutException, httpx.NetworkError, httpx.ProtocolError, httpx.ProxyError,
                               *core_network)
        self.timeout_errors = (httpx.TimeoutException, *core_timeout)
        # RemoteProtocolError ("peer closed connection without sending complete message
        # body") for a drop, ReadTimeout for a stall; both TransportErrors
        self.body_errors = (httpx.TransportError, OSError, *core_network)

    def open(self, url: str, headers: Mapping[str, str], connect_timeout: float, read_timeout: float) -> Response:
        timeout = self._httpx.Timeout(read_timeout, connect=connect_timeout)
        request = self._session.build_request("GET", url, headers=dict(headers), timeout=timeout)
        # follow_redirects per request: a client made by a user's set_client_factory may not
        resp = self._session.send(request, stream=True, follow_redirects=True)
        return _HttpxResponse(resp, self._httpx.StreamClosed)
