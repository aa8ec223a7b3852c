"""The chat page of `alpaca-local serve`: routes for `web/` and the two endpoints it calls.

In:  the FastAPI app, a `render(messages) -> {prompt, tokens, context}` function (the
server's own template code) and a `status() -> dict` function.  Out: routes
- `GET /`, `/web/app.js`, `/web/style.css`: the page, shipped as package data (no CDN,
  no build step), with a Content-Security-Policy that allows only its own script and
  style, so even a bug in the page's Markdown rendering could not run injected script;
- `POST /alpaca/prompt` (same body as `/v1/chat/completions`): the exact prompt and its
  token count, so "show the exact prompt" shows the server's text, never one rebuilt in JS;
- `GET /alpaca/status`: model name, context, queue state.
The page talks to `/v1/chat/completions` like any other client.
"""

# No `from __future__ import annotations`: FastAPI reads the route's `Request` annotation,
# which is imported inside add_page (the server's packages are an extra).
import json
from collections.abc import Callable
from importlib import resources

WEB_FILES = {  # URL path -> (file in web/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset(WEB_FILES)  # served without the API key: they hold no secret
PROMPT_PATH, STATUS_PATH = "/alpaca/prompt", "/alpaca/status"
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def web_file(name: str) -> bytes:
    """One of the page's files from the installed package."""
    return resources.files("alpaca_local.run").joinpath("web", name).read_bytes()


def add_page(app, render: Callable[[object], dict], status: Callable[[], dict]) -> None:
    """Add the page's routes to `app`. `render` raises ValueError (with `.param`) for bad messages."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    def serve_file(path: str) -> Callable[[], Response]:
        name, kind = WEB_FILES[path]
        data = web_file(name)  # read once at start: a broken install fails at startup, not per request

        async def page() -> Response:
            return Response(data, media_type=kind, headers=SECURITY_HEADERS)

        return page

    for path in WEB_FILES:
        app.add_api_route(path, serve_file(path), methods=["GET"], include_in_schema=False)

    async def prompt(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object with messages")
            return JSONResponse(render(body.get("messages")))
        except ValueError as exc:  # also json.JSONDecodeError and serve.Refused
            error = {"message": str(exc), "type": "invalid_request_error",
                     "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}
            return JSONResponse({"error": error}, status_code=400)

    async def state() -> JSONResponse:
        return JSONResponse(status())

    app.add_api_route(PROMPT_PATH, prompt, methods=["POST"], summary="The exact Alpaca prompt for chat messages")
    app.add_api_route(STATUS_PATH, state, methods=["GET"], summary="Model, context and queue")
