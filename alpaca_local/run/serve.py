"""An OpenAI-compatible HTTP server in the Alpaca format: the library behind `alpaca-local serve`.

In:  a GGUF file and server options.  Out: llama-cpp-python's own server app (its
FastAPI routes `/v1/chat/completions`, `/v1/completions`, `/v1/models`, its request
lock and SSE streaming), served by uvicorn on a socket we bind.

What we add to llama-cpp-python's server, and why:
- `AlpacaChatHandler`, plugged in through `Llama(chat_handler=...)`: messages go through
  `template.messages_to_turns` and `template.render_prompt` (the one Alpaca implementation)
  and reach the model as token ids from `chat.prompt_ids` (BOS + plain text). Left to
  itself, llama-cpp-python would render the GGUF's Jinja template and tokenize it with
  special-token parsing on, so a `</s>` typed in a message would become end-of-sequence.
- `PlainTextLlama`: `/v1/completions` prompts are tokenized as plain text too, and a
  request whose prompt plus `max_tokens` exceeds the context is refused, not truncated.
- `RequestGuard`, an ASGI middleware: the API key (401), the body size (413) and the
  request checks (400) happen before the route runs, because once an SSE stream has
  started the status line has already said 200.
- `fairqueue.QueueGate` behind it: one generation at a time in arrival order, 503 past
  `--max-queue`, a departed or stalled client frees the model (`PlainTextLlama.stop_flag`).
- `webapp`: the chat page at `/` and the `/alpaca/prompt` and `/alpaca/status` endpoints
  it uses; `--cors-origin` for pages served elsewhere.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from alpaca_local.run.chat import LlamaModel, StopFilter, load_llama, prompt_ids
from alpaca_local.run.fairqueue import DEFAULT_MAX_WAITING, DEFAULT_SEND_TIMEOUT, FairQueue, QueueGate, QuietDrop
from alpaca_local.run.webapp import PUBLIC_PATHS, add_page
from alpaca_local.errors import UsageError
from alpaca_local.template import MARKERS, messages_to_turns, render_prompt

# A 2048-token conversation is ~10 KB of JSON; 2 MiB leaves room for 100k+ token
# contexts and keeps a hostile client from making us buffer gigabytes.
MAX_BODY_BYTES = 2 * 1024 * 1024
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
# Request fields that pass through to `Llama.create_completion` unchanged.
SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta", "model",
    "logits_processor", "grammar", "logit_bias",
)
OnPrompt = Callable[[str, list[int]], None]

# The raw JSON messages of the request being served. llama-cpp-python validates chat
# messages into TypedDicts that drop unknown keys, so our `input` field would never
# reach the handler; RequestGuard (same request, same context) keeps the raw list here.
_RAW_MESSAGES: contextvars.ContextVar[list | None] = contextvars.ContextVar("alpaca_raw_messages", default=None)


class Refused(ValueError):
    """A request we will not run; becomes an OpenAI-style 400 (the message says why)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


# ---------------------------------------------------------------------------------------
# The model: plain-text prompts, context checks
# ---------------------------------------------------------------------------------------

def check_room(prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
    """Refuse a prompt that fills the context, or a `max_tokens` that cannot fit after it.

    llama-cpp-python would silently cut `max_tokens`; OpenAI refuses such requests with
    context_length_exceeded, and clients rely on that. None or <= 0: until the context is full.
    """
    wanted = prompt_tokens + (max_tokens if max_tokens and max_tokens > 0 else 0)
    if prompt_tokens >= n_ctx or wanted > n_ctx:
        raise Refused(
            f"This model's maximum context length is {n_ctx} tokens, but {wanted} were requested "
            f"({prompt_tokens} in the prompt, {max(max_tokens or 0, 0)} for the completion); "
            "shorten the messages or lower max_tokens (the server's context is set with -c)",
            param="max_tokens" if prompt_tokens < n_ctx else "messages", code="context_length_exceeded",
        )


class PlainTextLlama(llama_cpp.Llama):
    """A `Llama` whose text prompts are always plain text after BOS, checked against the context."""

    on_prompt: OnPrompt | None = None  # --show-prompt: called with each prompt and its ids
    alias: str | None = None  # the model name responses carry (llama-cpp-python: the request's, or the path)
    stop_flag: threading.Event  # set when the client of the running request has gone: stop at the next token
    # /alpaca/status: llama-cpp-python's stop checks since start, one per sampled token plus
    # one as each answer ends (llama.py: generate() and the end of _create_completion)
    sampling_steps: int = 0

    def prompt_ids(self, text: str) -> list[int]:
        """chat.prompt_ids: BOS when the model asks for it, then the text, specials never parsed."""
        return prompt_ids(LlamaModel(self), text)

    def create_completion(self, prompt: str | list[int], **kwargs: Any):  # type: ignore[override]
        if kwargs.get("suffix") is not None:
            # llama-cpp-python's infill path prepends token 0 for models without FIM tokens.
            raise Refused("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
        if isinstance(prompt, str):
            text, prompt = prompt, self.prompt_ids(prompt)
            if self.on_prompt:
                self.on_prompt(text, prompt)
        check_room(len(prompt), kwargs.get("max_tokens", 16), self.n_ctx())
        if self.alias:  # one model is served, whatever name the client asked for: say which
            kwargs["model"] = self.alias
        kwargs["stopping_criteria"] = llama_cpp.StoppingCriteriaList(
            [*(kwargs.get("stopping_criteria") or []), self._after_token])
        return super().create_completion(prompt, **kwargs)

    def _after_token(self, ids: object, logits: object) -> bool:
        """Called by llama-cpp-python after each sampled token: count it; stop if the client left."""
        self.sampling_steps += 1
        return self.stop_flag.is_set()


def load_server_model(
    path: Path, n_ctx: int = 2048, n_gpu_layers: int = 0, n_threads: int | None = None,
    on_prompt: OnPrompt | None = None, cls: type[PlainTextLlama] = PlainTextLlama, **llama_kwargs,
) -> PlainTextLlama:
    """Validate the file as chat does (header, trained context), then load it once, quietly.
    `llama_kwargs`: e.g. lora_path / lora_scale (`chat.lora_kwargs`)."""
    llm = load_llama(
        path, n_ctx, cls, n_gpu_layers=n_gpu_layers, n_threads=n_threads,
        chat_handler=AlpacaChatHandler(), **llama_kwargs,
    )
    llm.on_prompt = on_prompt
    llm.stop_flag = threading.Event()
    return llm


# ---------------------------------------------------------------------------------------
# Chat: messages -> Alpaca prompt -> ids -> completion -> chat response
# ---------------------------------------------------------------------------------------

def chat_prompt(messages: object) -> str:
    """The Alpaca prompt for chat messages; Refused (400) when they do not fit the convention."""
    if not isinstance(messages, list):
        raise Refused("messages must be a list of {role, content} objects", param="messages")
    try:
        turns, system = messages_to_turns(messages)
    except ValueError as exc:
        raise Refused(str(exc), param="messages") from None
    return render_prompt(turns, system)


def refuse_unsupported(request: dict) -> None:
    """Features an Alpaca model has no format for: say so instead of ignoring them."""
    if request.get("tools") or request.get("functions"):
        raise Refused("tools and functions are not supported: the Alpaca format has no tool calls", param="tools")
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise Refused("response_format other than text is not supported; use grammar", param="response_format")
    if request.get("logprobs"):
        raise Refused("logprobs are not supported by this server", param="logprobs")


class AlpacaChatHandler:
    """A llama-cpp-python `LlamaChatCompletionHandler` that speaks the Alpaca format."""

    def __call__(
        self, *, llama: PlainTextLlama, messages: list, stream: bool = False,
        stop: str | list[str] | None = None, max_tokens: int | None = None, **request: Any,
    ) -> dict | Iterator[dict]:
        refuse_unsupported(request)
        raw = _RAW_MESSAGES.get()
        prompt = chat_prompt(raw if raw is not None and len(raw) == len(messages) else messages)
        ids = llama.prompt_ids(prompt)
        if llama.on_prompt:
            llama.on_prompt(prompt, ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        sampling = {k: request[k] for k in SAMPLING_KEYS if request.get(k) is not None}
        result = llama.create_completion(
            prompt=ids, max_tokens=max_tokens, stop=list(MARKERS) + stops, stream=stream, **sampling
        )
        return chat_chunks(result) if stream else chat_response(result)


def chat_response(completion: dict) -> dict:
    """A text completion as a chat completion, its text trimmed as the chat runner trims it."""
    choice = completion["choices"][0]
    text = StopFilter()
    text.feed(choice["text"])
    text.finish()
    return {
        "id": "chat" + completion["id"], "object": "chat.completion",
        "created": completion["created"], "model": completion["model"],
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text.text},
            "logprobs": None, "finish_reason": choice["finish_reason"],
        }],
        "usage": completion["usage"],
    }


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """Text completion chunks as chat chunks: a role chunk, content deltas, a finish chunk.

    The deltas pass through chat's StopFilter, so they join to exactly the
    non-streaming answer (leading/trailing whitespace dropped, markers never shown).
    """
    stops = StopFilter()
    for i, chunk in enumerate(chunks):
        head = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk",
                "created": chunk["created"], "model": chunk["model"]}
        if i == 0:
            yield _delta(head, {"role": "assistant"}, None)
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or ("stop" if stops.stopped else None)
        text = stops.feed(choice["text"]) if not stops.stopped else ""
        if finish:
            text += stops.finish()
        if text:
            yield _delta(head, {"content": text}, None)
        if finish:
            yield _delta(head, {}, finish)
            return


def _delta(head: dict, delta: dict, finish: str | None) -> dict:
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


# ---------------------------------------------------------------------------------------
# Checking requests before they run
# ---------------------------------------------------------------------------------------

def check_request(llm: PlainTextLlama, path: str, request: dict) -> None:
    """What the routes would only find out mid-stream: bad messages, unsupported fields, no room."""
    if path == CHAT_PATH:
        refuse_unsupported(request)
        check_room(len(llm.prompt_ids(chat_prompt(request.get("messages")))), _max_tokens(request, None), llm.n_ctx())
    elif path == COMPLETIONS_PATH:
        if request.get("suffix") is not None:
            raise Refused("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
        prompt = request.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) > 1 or not all(isinstance(p, str) for p in prompt):
                raise Refused("prompt must be one string (batches are not supported)", param="prompt")
            prompt = prompt[0] if prompt else ""
        if isinstance(prompt, str):
            check_room(len(llm.prompt_ids(prompt)), _max_tokens(request, 16), llm.n_ctx())


def _max_tokens(request: dict, default: int | None) -> int | None:
    value = request.get("max_tokens", default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise Refused("max_tokens must be an integer", param="max_tokens")
    return value


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class RequestGuard:
    """ASGI middleware in front of llama-cpp-python's routes: key, size, checks."""

    def __init__(self, app: ASGIApp, check: Callable[[str, dict], None], api_key: str | None = None,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.check, self.api_key, self.max_body = app, check, api_key, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        public = scope["method"] in ("GET", "HEAD") and scope["path"] in PUBLIC_PATHS  # the page holds no secret
        if self.api_key is not None and not public and not self._authorized(headers):
            return await _error(send, 401, "Invalid API key: send it as 'Authorization: Bearer KEY'",
                                "invalid_api_key", {"www-authenticate": "Bearer"})
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > self.max_body:
            return await _error(send, 413, f"request body over {self.max_body} bytes", "request_too_large")
        body = await _read_body(receive, self.max_body)
        if body is None:
            return await _error(send, 413, f"request body over {self.max_body} bytes", "request_too_large")
        token = _RAW_MESSAGES.set(None)
        try:
            refusal = self._check(scope, body)
            if refusal is not None:
                return await _error(send, 400, str(refusal), refusal.code, param=refusal.param)
            await self.app(scope, _replay(body, receive), send)
        finally:
            _RAW_MESSAGES.reset(token)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def _check(self, scope: dict, body: bytes) -> Refused | None:
        if scope["method"] != "POST" or scope["path"] not in (CHAT_PATH, COMPLETIONS_PATH):
            return None
        try:
            request = json.loads(body)
        except ValueError:
            return None  # the route answers malformed JSON with its own 422
        if not isinstance(request, dict):
            return None
        if scope["path"] == CHAT_PATH and isinstance(request.get("messages"), list):
            _RAW_MESSAGES.set(request["messages"])
        try:
            self.check(scope["path"], request)
        except Refused as exc:
            return exc
        return None


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` (chunked bodies declare no length)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # the client left
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Callable) -> Callable[[], Awaitable[dict]]:
    """A receive() that gives the buffered body once, then the client's own messages (disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _error(send: Callable, status: int, message: str, code: str | None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
    """An OpenAI-style error body, which the openai client turns into a typed exception."""
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# The app and the server
# ---------------------------------------------------------------------------------------

@dataclass
class _OneModel:
    """The two calls the routes make on llama-cpp-python's LlamaProxy, for one loaded model."""

    alias: str
    llm: PlainTextLlama

    def __call__(self, model: str | None = None) -> PlainTextLlama:
        return self.llm  # like llama-server: one model, whatever name the client sends

    def __iter__(self) -> Iterator[str]:
        return iter([self.alias])


SERVED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})


def build_app(llm: PlainTextLlama, alias: str, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
              max_queue: int = DEFAULT_MAX_WAITING, send_timeout: float = DEFAULT_SEND_TIMEOUT,
              cors_origins: tuple[str, ...] = ()):
    """llama-cpp-python's router around our model, behind RequestGuard and the fair queue; the page at `/`."""
    from fastapi import FastAPI
    from llama_cpp.server import app as server
    from llama_cpp.server.settings import ServerSettings
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    from alpaca_local import __version__

    # Explicit values so environment variables (API_KEY, INTERRUPT_REQUESTS...) that
    # pydantic-settings would read cannot change them. interrupt_requests=False: a
    # waiting request queues behind a stream instead of cutting it off.
    server.set_server_settings(ServerSettings(
        host="127.0.0.1", port=0, api_key=api_key, interrupt_requests=False,
        disable_ping_events=False, root_path="",
    ))
    # Set the proxy directly: set_llama_proxy() would load a second copy from settings,
    # without our validation, and as a plain Llama.
    server._llama_proxy = _OneModel(alias, llm)
    llm.alias = alias
    queue = FairQueue(max_waiting=max_queue)
    cors = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["authorization", "content-type"], expose_headers=["retry-after"])]
    app = FastAPI(
        title="alpaca-local", version=__version__,
        middleware=[
            *(cors if cors_origins else []),  # outermost: preflights carry no key, errors get the headers too
            Middleware(RequestGuard, check=lambda path, req: check_request(llm, path, req),
                       api_key=api_key, max_body=max_body),
            Middleware(QueueGate, queue=queue, send_timeout=send_timeout,
                       on_turn=llm.stop_flag.clear, on_leave=llm.stop_flag.set),
            Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),)),
        ],
    )
    add_page(app, render=lambda messages: _render(llm, messages),
             status=lambda: {"model": alias, "context": llm.n_ctx(), "queue": queue.status(),
                             "sampling_steps": llm.sampling_steps})
    # Only the endpoints we serve through the Alpaca template: the library's others
    # (/v1/embeddings, /extras/tokenize with special-token parsing on) stay out.
    app.router.routes.extend(r for r in server.router.routes if getattr(r, "path", None) in SERVED_PATHS)
    return app


def _render(llm: PlainTextLlama, messages: object) -> dict:
    """What /v1/chat/completions would send the model for these messages (Refused when it would refuse)."""
    prompt = chat_prompt(messages)
    return {"prompt": prompt, "tokens": len(llm.prompt_ids(prompt)), "context": llm.n_ctx()}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is one clear error and port 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host") \
            from None
    sock.listen(128)
    return sock


def serve_forever(app, sock: socket.socket) -> None:
    """Run uvicorn on `sock` until SIGINT or SIGTERM, then return normally.

    uvicorn re-raises the stopping signal after its graceful shutdown; a no-op handler
    installed first receives it, so stopping the server is an ordinary exit (code 0).
    """
    import logging

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    logging.getLogger("uvicorn.error").addFilter(QuietDrop())  # QueueGate says it instead
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
