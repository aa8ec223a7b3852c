"""`alpaca-local serve` under load: the server on 127.0.0.1 and many clients.

With the real model (tiny GGUF):
- every client streaming at once gets its whole answer, and at temperature 0 the same
  answer as the same request alone;
- a client that disconnects mid-answer frees the model at the next token.
With the real app and a scripted model (tests/scripted_server.py), whose answers take
as long as a test needs:
- requests are served in the order they arrived; past `--max-queue`, 503 + Retry-After;
- a client that never reads is dropped after `--send-timeout`, and the others go on.
The state is read from /alpaca/status (queue counters, sampling steps), never from timings.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from alpaca_local.run.fairqueue import FairQueue, QueueFull  # noqa: E402
from servers import TIMEOUT, Server  # noqa: E402

N_CTX = 2048
MAX_QUEUE = 6
LONG = 1800  # tokens
# An answer of exactly LONG tokens: EOS banned (the tiny model's id 2, tinymodels: bos 1,
# eos 2) and a grammar without '#', so no marker ends it (left alone, it stops after ~250).
ENDLESS = {"logit_bias": {"2": -100}, "grammar": "root ::= [a-z ]+"}


@pytest.fixture(scope="module")
def server(tiny_gguf: Path):
    srv = Server.serve(tiny_gguf, N_CTX, "--max-queue", str(MAX_QUEUE))
    yield srv
    assert srv.stop() == 0, "".join(srv.err)[-2000:]


@pytest.fixture(scope="module")
def scripted(tiny_gguf: Path):
    srv = Server.scripted(tiny_gguf, "--max-queue", str(MAX_QUEUE), "--show-prompt")
    yield srv
    assert srv.stop() == 0, "".join(srv.err)[-2000:]


def status(srv: Server) -> dict:
    with urllib.request.urlopen(srv.base + "/alpaca/status", timeout=TIMEOUT) as response:
        return json.load(response)


def wait_status(srv: Server, condition, what: str) -> dict:
    import time

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        state = status(srv)
        if condition(state):
            return state
        time.sleep(0.02)
    raise AssertionError(f"server never reached: {what}; last {state}")


def body(content: str, max_tokens: int, **extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, **extra}).encode()


def stream(srv: Server, data: bytes) -> tuple[str, str | None, bool]:
    """POST a streaming chat request; (joined content, finish_reason, saw [DONE])."""
    request = urllib.request.Request(srv.base + "/v1/chat/completions", data, {"content-type": "application/json"})
    text, finish, done = "", None, False
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return text, finish, done


class RawClient:
    """A streaming request on a bare socket with a tiny receive buffer, so it can stall or vanish."""

    def __init__(self, srv: Server, data: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: a small window
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", srv.port))
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    def read_until(self, marker: bytes) -> bytes:
        got = b""
        while marker not in got:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed the stream"
            got += chunk
        return got

    def close(self) -> None:
        self.sock.close()


PROMPTS = [f"Write item {i} of a list about llamas." for i in range(MAX_QUEUE)]


def hold(srv: Server) -> RawClient:
    """A client of a slow scripted answer (300 words, 50 ms each): it holds the model until it is closed."""
    client = RawClient(srv, body("slow hold", 300))
    wait_status(srv, lambda s: s["queue"]["running"], "the holding request running")
    return client


def test_concurrent_streams_each_get_their_whole_answer_as_alone(server) -> None:
    alone = [stream(server, body(p, 24)) for p in PROMPTS]
    assert all(done and finish in ("stop", "length") for _, finish, done in alone)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        under_load = list(pool.map(lambda p: stream(server, body(p, 24)), PROMPTS, timeout=TIMEOUT))
    assert under_load == alone  # every answer whole, [DONE] included, and token for token the same


def test_served_in_arrival_order(scripted) -> None:
    """A long answer holds the model; three more arrive one after the other; the model gets them in that order."""
    seen = len(scripted.prompts())
    holder = hold(scripted)
    threads = []
    for i in range(3):
        t = threading.Thread(target=stream, args=(scripted, body(f"next {i}", 8)))
        t.start()
        threads.append(t)
        wait_status(scripted, lambda s, n=i + 1: s["queue"]["waiting"] == n, f"{i + 1} waiting")
    holder.close()
    for t in threads:
        t.join(TIMEOUT)
    served = [prompt.rsplit("### Instruction:\n", 1)[1].split("\n")[0] for prompt, _ in scripted.prompts()[seen:]]
    assert served == ["slow hold", "next 0", "next 1", "next 2"]


def test_beyond_max_queue_is_503_with_retry_after(scripted) -> None:
    before = status(scripted)["queue"]["refused"]
    holder = hold(scripted)
    waiters = [threading.Thread(target=stream, args=(scripted, body(f"wait {i}", 4))) for i in range(MAX_QUEUE)]
    for i, t in enumerate(waiters):
        t.start()
        wait_status(scripted, lambda s, n=i + 1: s["queue"]["waiting"] == n, f"{i + 1} waiting")
    with pytest.raises(urllib.error.HTTPError) as refused:
        stream(scripted, body("one too many", 4))
    assert refused.value.code == 503
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert json.load(refused.value)["error"]["code"] == "queue_full"
    holder.close()
    for t in waiters:
        t.join(TIMEOUT)
    assert status(scripted)["queue"]["refused"] == before + 1


@pytest.mark.parametrize("streamed", [True, False])
def test_disconnect_mid_answer_frees_the_model_at_once(server, streamed) -> None:
    """llama-cpp-python alone notices a departed client only between streamed chunks, and
    never for a non-streamed answer; our stop flag ends generation at the next token."""
    before = status(server)
    client = RawClient(server, body("a long answer", LONG, stream=streamed, **ENDLESS))
    if streamed:
        client.read_until(b'"content"')  # streaming has begun
    else:
        wait_status(server, lambda s: s["sampling_steps"] > before["sampling_steps"], "generation under way")
    client.close()
    after = wait_status(server, lambda s: not s["queue"]["running"], "the model free again")
    assert after["queue"]["left"] == before["queue"]["left"] + 1
    steps = after["sampling_steps"] - before["sampling_steps"]
    assert steps < LONG // 2, f"{steps} tokens were generated for a client that had left"
    assert stream(server, body("next", 4))[2]  # and the next request is served


def test_a_client_that_never_reads_does_not_block_the_others(tiny_gguf) -> None:
    """The real app with a scripted model that floods 16 KB pieces (tests/scripted_server.py):
    the answer overflows the socket buffers at once; after --send-timeout (2 s) the client is dropped."""
    srv = Server.scripted(tiny_gguf, "--send-timeout", "2")
    try:
        stalled = RawClient(srv, body("flood", 300))
        wait_status(srv, lambda s: s["queue"]["running"], "the stalled request running")
        assert stream(srv, body("after the stall", 64)) == ("Echo: after the stall", "stop", True)
        state = wait_status(srv, lambda s: s["queue"]["served"] == 2, "both requests done")["queue"]
        assert state["stalled"] == 1 and state["left"] == 0
        srv.wait_for(srv.err, r"dropped client 127\.0\.0\.1:\d+: it took no data for 2 s")  # said, in one line
        assert not any("ASGI" in line or "Traceback" in line for line in srv.err)
        stalled.close()
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------------------------------
# The queue alone
# ---------------------------------------------------------------------------------------

def test_queue_is_fifo_and_bounded() -> None:
    import asyncio

    async def scenario() -> tuple[list[int], int]:
        queue, order = FairQueue(max_waiting=3), []
        await queue.acquire()

        async def user(i: int) -> None:
            await queue.acquire()
            order.append(i)
            queue.release(0.5)

        tasks = [asyncio.create_task(user(i)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await queue.acquire()
        tasks[1].cancel()  # a client that leaves the queue keeps no place in it
        await asyncio.sleep(0)
        queue.release(2.0)
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, full.value.retry_after

    order, retry = asyncio.run(scenario())
    assert order == [0, 2]
    assert retry == 4  # no history yet: 1 s per answer x (3 waiting + 1)
