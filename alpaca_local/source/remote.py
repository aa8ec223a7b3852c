"""One file on a Hugging Face Hub (or any HTTP server), read with range requests.

In: the file's URL, the size and checksum the Hub reports for it, request
headers (the token). Out: `read_at(offset, nbytes)` for `TensorRef`, and
`finish()`, which reads whatever was not asked for and checks size and hash.

Reads must come in increasing offset order (the converter reads tensors in
file order): the file is one streamed GET from the current position to the
end, so every byte is fetched once and hashed in order, memory stays at one
read, and bytes that no tensor needs are hashed and dropped. A dropped
connection, a timeout or a 5xx answer reopens the stream with
`Range: bytes=<where it stopped>-`, after a growing pause; `fetch` is the
random-access form for the few bytes read before streaming (headers).

Requests go through huggingface_hub's own session (`source.hub_http`: requests,
httpx or httpx2, whichever the installed major uses), with the same loop on each.

The checksum is the Hub's: the LFS sha256 for large files, or the git blob
sha1 (sha1 of "blob <size>\\0" + content) for files kept in git itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from alpaca_local.errors import InputError, RuntimeFailure
from alpaca_local.source.hub_http import HttpClient, Response

# Pauses between attempts: 0.5, 1, 2, 4, 8 s (then 8 s); an attempt that made
# progress resets the count, so a long download survives many short drops.
RETRIES = 6
# ALPACA_LOCAL_HUB_BACKOFF changes the first pause (seconds), e.g. 0 for tests against a local server.
BACKOFF_S = float(os.environ.get("ALPACA_LOCAL_HUB_BACKOFF", "0.5"))
MAX_BACKOFF_S = 8.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
SKIP_PIECE = 1 << 20  # unneeded bytes are read and hashed in pieces of this size

Progress = Callable[[int], None]  # bytes just received


@dataclass(frozen=True)
class Checksum:
    """What the Hub says a file is: its size and one digest of its content."""

    size: int
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # files stored in git (no LFS)

    def hasher(self):
        if self.sha256:
            return hashlib.sha256()
        h = hashlib.sha1()
        h.update(b"blob %d\0" % self.size)
        return h

    @property
    def expected(self) -> str:
        return self.sha256 or self.git_sha1 or ""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx)."""


class RemoteFile:
    """`read_at` in increasing offsets, streamed, hashed, resumed after drops."""

    def __init__(
        self,
        url: str,
        name: str,
        checksum: Checksum,
        headers: dict[str, str],
        client: HttpClient,
        progress: Progress | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url, self.name, self.checksum = url, name, checksum
        self.size = checksum.size
        self._headers = {**headers, "Accept-Encoding": "identity"}  # byte offsets must be the file's
        self._client = client
        self._errors = (_Transient, *client.body_errors)
        self.progress = progress
        self._sleep = sleep
        self._hash = checksum.hasher()
        self._pos = 0  # next byte the stream delivers; everything before it is hashed
        self._resp: Response | None = None
        self._lock = threading.Lock()
        self._closed = False  # set by close() from any thread: the reader stops at its next step
        self.bytes_fetched = 0  # all bytes received, retries and header fetches included

    # -- random access, before streaming -------------------------------------------------

    def fetch(self, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes) by one range request (no hashing)."""
        if nbytes <= 0:
            return b""
        end = min(offset + nbytes, self.size)
        return self._with_retries(lambda: self._get_range(offset, end))

    def start_with(self, prefix: bytes) -> None:
        """Count `prefix` (already fetched and parsed) as the file's first bytes.

        The final hash covers these exact bytes, so a header that did not come
        from the file that the data came from fails the check.
        """
        with self._lock:
            if self._pos:
                raise RuntimeError("start_with after streaming began")
            self._hash.update(prefix)
            self._pos = len(prefix)

    # -- streaming -------------------------------------------------------------------------

    def read_at(self, offset: int, nbytes: int) -> bytes:
        with self._lock:
            if offset < self._pos:
                raise RuntimeError(f"{self.name}: read at {offset} after {self._pos}; reads must go forward")
            if offset + nbytes > self.size:
                raise InputError(f"{self.name}: read past the end of the {self.size}-byte file; the file is corrupt")
            self._skip_to(offset)
            return self._stream(nbytes)

    def finish(self) -> None:
        """Read the rest, then check the size and the checksum; raise if either is wrong."""
        with self._lock:
            self._skip_to(self.size)
            self._close()
            if self.checksum.expected and self._hash.hexdigest() != self.checksum.expected:
                kind = "sha256" if self.checksum.sha256 else "git sha1"
                raise InputError(
                    f"{self.name}: {kind} of the downloaded bytes is {self._hash.hexdigest()[:16]}..., the Hub says "
                    f"{self.checksum.expected[:16]}...; the transfer was corrupted, nothing was written, try again"
                )

    def close(self) -> None:
        """Stop reading; safe from another thread while a read is under way (no lock: the
        read fails at once instead of finishing, retries included)."""
        self._closed = True
        resp = self._resp
        if resp is not None:
            resp.close()

    def _skip_to(self, offset: int) -> None:
        while self._pos < offset:
            self._stream(min(SKIP_PIECE, offset - self._pos))

    def _stream(self, nbytes: int) -> bytes:
        out = bytearray()
        failures = 0
        while len(out) < nbytes:
            if self._closed:
                raise RuntimeFailure(f"{self.name}: reading was stopped")
            try:
                if self._resp is None:
                    self._resp = self._open(self._pos)
                # read1 returns what has arrived, so a stall or a drop loses nothing already
                # received and the next request starts at the exact byte.
                piece = self._resp.read1(nbytes - len(out))
                if not piece:
                    raise _Transient("connection closed early")
            except self._errors as exc:
                self._close()
                failures += 1
                if failures > RETRIES:
                    raise _gave_up(self.name, exc) from None
                self._sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (failures - 1)))
                continue
            failures = 0
            out += piece
            self._hash.update(piece)
            self._pos += len(piece)
            self.bytes_fetched += len(piece)
            if self.progress:
                self.progress(len(piece))
        return bytes(out)

    def _open(self, start: int) -> Response:
        resp = self._request(start, self.size)
        if resp.status_code == 200 and start > 0:
            resp.close()
            raise InputError(f"{self.name}: the server ignores range requests; use --download instead")
        return resp

    def _get_range(self, start: int, end: int) -> bytes:
        resp = self._request(start, end)
        data = bytearray()
        try:
            while len(data) < end - start and (piece := resp.read1(end - start - len(data))):
                data += piece
        finally:
            resp.close()
        self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise _Transient("connection closed early")
        return bytes(data)

    def _request(self, start: int, end: int) -> Response:
        """GET bytes [start, end) following redirects; 2xx or an error, never a retryable answer."""
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        try:
            resp = self._client.open(self.url, headers, CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        except self._client.network_errors as exc:
            raise _Transient(str(exc)) from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            resp.close()
            raise _Transient(f"HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            resp.close()
            raise http_error(resp.status_code, self.name)
        if resp.status_code == 206:
            _check_content_range(resp, start, self)
        elif int(resp.headers.get("Content-Length", self.size)) != self.size:
            resp.close()
            raise _size_mismatch(self, resp.headers.get("Content-Length"))
        return resp

    def _with_retries(self, call: Callable[[], bytes]) -> bytes:
        for attempt in range(RETRIES + 1):
            try:
                return call()
            except self._errors as exc:
                if attempt == RETRIES:
                    raise _gave_up(self.name, exc) from None
                self._sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))
        raise AssertionError("unreachable")

    def _close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None


def _check_content_range(resp: Response, start: int, f: RemoteFile) -> None:
    """`Content-Range: bytes START-END/TOTAL` must start where we asked, in a file of the expected size."""
    value = resp.headers.get("Content-Range", "")
    span, _, total = value.removeprefix("bytes ").partition("/")
    if not span.startswith(f"{start}-"):
        resp.close()
        raise InputError(f"{f.name}: the server answered a different byte range ({value!r}); use --download instead")
    if total.isdigit() and int(total) != f.size:
        resp.close()
        raise _size_mismatch(f, total)


def _size_mismatch(f: RemoteFile, served: str | None) -> InputError:
    return InputError(
        f"{f.name}: the server sends {served} bytes but the Hub lists {f.size}; the file changed "
        "or the transfer is broken, nothing was written, try again"
    )


def _gave_up(name: str, exc: BaseException) -> RuntimeFailure:
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return RuntimeFailure(
        f"{name}: the download kept failing after {RETRIES} retries ({reason}); "
        "nothing was written, check the network and try again"
    )


def http_error(status: int, what: str) -> InputError:
    """The one-line message for a final (non-retryable) HTTP answer."""
    if status in (401, 403):
        return InputError(
            f"{what}: access denied (HTTP {status}); the model is gated or private: accept its terms on the "
            "model page and set HF_TOKEN (or run `hf auth login`)"
        )
    if status == 404:
        return InputError(f"{what}: not found (HTTP 404); check the repository name, revision and file")
    return InputError(f"{what}: the server answered HTTP {status}")
