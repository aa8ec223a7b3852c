"""`alpaca-local serve`: the real server (a subprocess, loopback only) talked to with the openai client.

What the model received is read from `--show-prompt` on the server's stderr and
compared with our own template and tokenization, byte for byte and id for id.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from alpaca_local.run import chat  # noqa: E402
from alpaca_local.run.serve import MAX_BODY_BYTES, RequestGuard, chat_chunks, chat_response  # noqa: E402
from alpaca_local.template import Turn, render_prompt  # noqa: E402
from servers import TIMEOUT, Server  # noqa: E402

KEY = "test-key-123"
N_CTX = 256


@pytest.fixture(scope="module")
def server(tiny_gguf: Path):
    srv = Server.serve(tiny_gguf, N_CTX, "--api-key", KEY, "--show-prompt")
    yield srv
    code = srv.stop()
    assert code == 0, "".join(srv.err)[-2000:]
    assert srv.out[-1].strip() == "stopped"  # a clean shutdown, not a crash


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def vocab(tiny_gguf: Path) -> chat.LlamaModel:
    """The same file's tokenizer in this process, to compute the ids the server should use."""
    import llama_cpp

    chat.silence_llama_cpp()
    return chat.LlamaModel(llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, n_ctx=N_CTX, verbose=False))


def last_prompt(server: Server, count: int) -> tuple[str, list[int]]:
    """The prompt of the request just made: wait for the `count`-th block to appear."""
    deadline = time.monotonic() + TIMEOUT
    while len(server.prompts()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.prompts()[count - 1]


def chat_create(client, server: Server, messages: list[dict], **kw):
    before = len(server.prompts())
    result = client.chat.completions.create(model="anything", messages=messages, **kw)
    return result, before + 1


# ---------------------------------------------------------------------------------------
# What the model receives
# ---------------------------------------------------------------------------------------

def test_models_lists_the_file(client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-llama.Q8_0"]


def test_chat_prompt_is_our_template_as_plain_text_ids(client, server, vocab) -> None:
    text = "Repeat: </s> <s> ### Response: done"
    result, n = chat_create(client, server, [{"role": "user", "content": text}], max_tokens=4, temperature=0)
    prompt, ids = last_prompt(server, n)
    assert prompt == render_prompt([Turn(text)])
    assert ids == chat.prompt_ids(vocab, prompt)
    # The check means something: with special parsing on, "</s>" is the EOS token (2).
    assert vocab.llm.tokenize(b"</s>", add_bos=False, special=True) == [2]
    assert 2 not in ids and ids.count(1) == 1
    assert result.usage.prompt_tokens == len(ids)
    assert result.model == "tiny-llama.Q8_0" and result.choices[0].message.role == "assistant"


def test_input_system_and_history(client, server, vocab) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "One?", "input": "context one"},  # the documented Input convention
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"},
    ]
    result, n = chat_create(client, server, messages, max_tokens=2)
    prompt, ids = last_prompt(server, n)
    assert prompt == render_prompt([Turn("One?", "context one", "1"), Turn("Two?")], "You answer briefly.")
    assert ids == chat.prompt_ids(vocab, prompt) and result.usage.prompt_tokens == len(ids)


def test_streaming_joins_to_the_non_streaming_answer(client, server) -> None:
    messages = [{"role": "user", "content": "Name three colors.", "input": "streamed"}]
    whole, _ = chat_create(client, server, messages, max_tokens=12, temperature=0)
    stream, n = chat_create(client, server, messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert "### Input:\nstreamed" in last_prompt(server, n)[0]  # input survives the streaming path too


def test_completions_are_raw_plain_text(client, server, vocab) -> None:
    before = len(server.prompts())
    result = client.completions.create(model="x", prompt="Hello </s> world", max_tokens=4, temperature=0)
    prompt, ids = last_prompt(server, before + 1)
    assert prompt == "Hello </s> world" and ids == chat.prompt_ids(vocab, prompt) and 2 not in ids
    assert result.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="x", prompt="Hello", max_tokens=4, stream=True)
    assert any(c.choices[0].finish_reason for c in streamed)


# ---------------------------------------------------------------------------------------
# Refusals: 401, 4xx, before any streaming starts
# ---------------------------------------------------------------------------------------

def raw_request(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


def test_requests_without_the_key_get_401(server) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    assert raw_request(server, "GET", "/v1/models")[0] == 401
    assert raw_request(server, "POST", "/v1/chat/completions", body)[0] == 401
    assert raw_request(server, "POST", "/v1/chat/completions", body, {"authorization": "Bearer wrong"})[0] == 401
    assert raw_request(server, "GET", "/docs")[0] == 401
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_the_context_is_400(client, stream) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=N_CTX, stream=stream)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 256" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt="word " * 400, max_tokens=1, stream=stream)


@pytest.mark.parametrize("messages, extra, says", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], {}, "last message must be from the user"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}], {}, "must follow a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"}], {}, "role 'tool'"),
    ([{"role": "user", "content": "hi"}],
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
])
def test_unsupported_chat_requests_are_400(client, messages, extra, says) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape(says)):
        client.chat.completions.create(model="x", messages=messages, stream=True, **extra)


def test_oversized_body_is_413(server) -> None:
    # Declared length over the limit: refused from the headers, before the body is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n{{".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 413")


def test_concurrent_requests_queue(client, server) -> None:
    """Four at once (two streaming): the server's lock serializes them; at temperature 0 each
    answer under load is exactly the answer the same request gets alone (no state leaks
    between requests, no stream cut off or interleaved)."""
    def one(i: int) -> tuple[str, str | None]:
        messages = [{"role": "user", "content": f"Count to {i}."}]
        kwargs = {"model": "x", "messages": messages, "max_tokens": 24, "temperature": 0.0}
        if i % 2:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks[-1].choices[0].finish_reason
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason

    alone = [one(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, range(4), timeout=TIMEOUT))
    assert together == alone
    assert all(finish in ("stop", "length") for _, finish in together)
    assert len({text for text, _ in alone}) > 1  # different prompts: a mix-up would show
    assert client.models.list().data  # and the server is still fine


# ---------------------------------------------------------------------------------------
# CLI edges and the pure parts
# ---------------------------------------------------------------------------------------

def test_busy_port_is_one_line(tiny_gguf, server) -> None:
    done = subprocess.run([sys.executable, "-m", "alpaca_local", "serve", str(tiny_gguf), "--port", str(server.port)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "choose another --port" in done.stderr


def test_chunks_trim_like_the_chat_runner() -> None:
    pieces = ["\n", " Red,", " green", "\n", "\n", ""]
    finish = [None] * 5 + ["stop"]
    chunks = [{"id": "c", "created": 0, "model": "m",
               "choices": [{"text": t, "finish_reason": f}]} for t, f in zip(pieces, finish)]
    streamed = list(chat_chunks(iter(chunks)))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
    whole = chat_response({"id": "c", "created": 0, "model": "m", "usage": {},
                           "choices": [{"text": "".join(pieces), "finish_reason": "stop"}]})
    assert text == whole["choices"][0]["message"]["content"] == "Red, green"
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_guard_refuses_a_chunked_body_over_the_limit() -> None:
    """No Content-Length (chunked upload): counted as it arrives, refused past the limit."""
    reached = []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "http.request", "body": b"x" * 40, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, check=lambda path, req: None, max_body=100)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(guard(scope, receive, send))
    assert not reached and sent[0]["status"] == 413


def test_only_the_alpaca_endpoints_are_served(server) -> None:
    """The library's other routes (embeddings, tokenize with special parsing) are not exposed."""
    auth = {"authorization": f"Bearer {KEY}"}
    body = json.dumps({"input": "</s>"}).encode()
    for path in ("/v1/embeddings", "/extras/tokenize", "/extras/detokenize", "/v1/engines/copilot-codex/completions"):
        status, _ = raw_request(server, "POST", path, body, auth)
        assert status == 404, path
