"""A fair first-come-first-served queue in front of the model: `serve` under load.

In:  the generation requests (`POST /v1/chat/completions`, `/v1/completions`) that
passed `serve.RequestGuard`'s checks.  Out: one request at a time reaches
llama-cpp-python's routes, in arrival order; the rest wait, or get 503.

Why our own queue when llama-cpp-python's routes already hold a lock:
- a limit: beyond `max_waiting` waiting requests the answer is 503 with `Retry-After`
  (estimated from recent service times), not an ever longer wait;
- a client that leaves while waiting leaves the queue, and one that leaves while its
  answer is generated frees the model at the next token (`on_leave` stops the model:
  llama-cpp-python only notices a disconnect between streamed chunks, and never for
  a non-streamed answer);
- a client that stops reading: each write to it has `send_timeout` seconds; past
  that its stream is dropped and the next request runs. (Answers that fit in the
  socket buffers never block: those clients hold nobody up.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
DEFAULT_MAX_WAITING = 16
DEFAULT_SEND_TIMEOUT = 30.0
# Retry-After bounds in seconds: at least 1 (RFC 9110 delay-seconds is an integer),
# at most 10 minutes so a burst of slow answers cannot tell clients to go away for hours.
RETRY_MIN, RETRY_MAX = 1, 600


class QueueFull(Exception):
    """More requests are waiting than the server takes; `retry_after` in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass
class FairQueue:
    """One slot, FIFO waiters, at most `max_waiting` of them. Runs on one event loop."""

    max_waiting: int = DEFAULT_MAX_WAITING
    busy: bool = False
    served: int = 0
    refused: int = 0  # 503: the queue was full
    left: int = 0  # the client went away while its answer was generated
    stalled: int = 0  # the client stopped reading for send_timeout: dropped
    _waiters: deque = field(default_factory=deque)
    _recent: deque = field(default_factory=lambda: deque(maxlen=20))  # seconds per answer

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one place: recent mean service time x queue."""
        mean = sum(self._recent) / len(self._recent) if self._recent else 1.0
        return min(RETRY_MAX, max(RETRY_MIN, math.ceil(mean * (self.waiting + 1))))

    async def acquire(self) -> None:
        """Take the slot, after everyone who came first; QueueFull when too many wait."""
        if not self.busy and not self.waiting:
            self.busy = True
            return
        if self.waiting >= self.max_waiting:
            self.refused += 1
            raise QueueFull(self.waiting, self.retry_after())
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn in self._waiters:
                self._waiters.remove(turn)
            if turn.done() and not turn.cancelled():  # handed the slot as we were cancelled: pass it on
                self.release()
            raise

    def release(self, seconds: float | None = None) -> None:
        """Give the slot to the longest waiter, or free it."""
        if seconds is not None:
            self._recent.append(seconds)
            self.served += 1
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.busy = False

    def status(self) -> dict:
        return {"running": int(self.busy), "waiting": self.waiting, "max_waiting": self.max_waiting,
                "served": self.served, "refused": self.refused, "left": self.left, "stalled": self.stalled}


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class _SlowClient(Exception):
    """A write to the client did not finish within the send timeout."""


class QueueGate:
    """ASGI middleware: generation requests wait their turn in a FairQueue.

    `on_turn` runs as a request gets the model, `on_leave` when its client disconnects
    while it holds the model (the server uses them to clear and set a stop flag that the
    generating thread checks at every token).
    """

    def __init__(self, app, queue: FairQueue, send_timeout: float = DEFAULT_SEND_TIMEOUT,
                 on_turn: Callable[[], None] = lambda: None, on_leave: Callable[[], None] = lambda: None) -> None:
        self.app, self.queue, self.send_timeout = app, queue, send_timeout
        self.on_turn, self.on_leave = on_turn, on_leave

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body = await receive()  # the whole body: RequestGuard has buffered it
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            if not await self._wait_turn(gone, send):
                return
            await self._run(scope, body, gone, send)
        finally:
            gone.cancel()

    async def _wait_turn(self, gone: asyncio.Future, send: Send) -> bool:
        """True once this request holds the slot; False if it was refused or its client left."""
        turn = asyncio.ensure_future(self.queue.acquire())
        await asyncio.wait({turn, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not turn.done():
            turn.cancel()  # the client left while waiting: out of the queue
            await asyncio.gather(turn, return_exceptions=True)
            return False
        if isinstance(turn.exception(), QueueFull):
            await busy_response(send, turn.exception())
            return False
        turn.result()
        if gone.done():  # got the slot and lost the client in the same instant
            self.queue.release()
            return False
        return True

    async def _run(self, scope: dict, body: dict, gone: asyncio.Future, send: Send) -> None:
        slow = complete = False

        def left(_: asyncio.Future) -> None:
            if not complete:  # after a complete response, receive() says "disconnect" too
                self.queue.left += 1
                self.on_leave()

        gone.add_done_callback(left)

        async def replay() -> dict:
            nonlocal body
            if body is not None:
                first, body = body, None
                return first
            # shield: starlette's is_disconnected() polls receive() under a cancelled scope,
            # which must not cancel our watcher.
            return await asyncio.shield(gone)

        async def timed_send(message: dict) -> None:
            nonlocal slow, complete
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except asyncio.TimeoutError:
                slow = True
                raise _SlowClient from None

        started = time.monotonic()
        self.on_turn()
        try:
            await self.app(scope, replay, timed_send)
        except Exception:
            if not slow:
                raise  # a real error: uvicorn logs it
            self.queue.stalled += 1
            self.on_leave()  # the client stopped reading: stop generating for it
            host, port = scope.get("client") or ("?", 0)
            print(f"dropped client {host}:{port}: it took no data for {self.send_timeout:g} s (--send-timeout)",
                  file=sys.stderr, flush=True)
        finally:
            gone.remove_done_callback(left)
            self.queue.release(time.monotonic() - started)


class QuietDrop(logging.Filter):
    """For uvicorn's error logger: a dropped stalled client is reported by us, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


async def _disconnect(receive: Receive) -> dict:
    """Wait for the client to go (the only message after a complete body)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


async def busy_response(send: Send, full: QueueFull) -> None:
    """503 with Retry-After, as an OpenAI-style error body (the openai client retries on it)."""
    body = json.dumps({"error": {"message": str(full), "type": "server_busy", "param": None,
                                 "code": "queue_full"}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(full.retry_after).encode())]})
    await send({"type": "http.response.body", "body": body})
